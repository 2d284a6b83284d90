"""The SGD gradient is RELION's: the reconstruction of residuals (image − CTF·projection)."""

import numpy as np
import torch

from spa3d.fourier.backprojector import BackProjector
from spa3d.geometry.euler import random_rotations
from spa3d.inference.estep import expectation
from spa3d.inference.likelihood import FourierPixels


def _accumulate(residual: bool, noise: float, seed: int = 0):
    """Back-projector sums of 40 images that are CTF·projections of the references (plus noise)."""
    n, r_max = 32, 10
    px = FourierPixels.make(n, r_max)
    g = torch.Generator().manual_seed(seed)
    n_pix = px.kx.shape[0]
    rots = torch.as_tensor(random_rotations(6, np.random.default_rng(seed)), dtype=torch.float32)
    refs = torch.complex(torch.randn(6, n_pix, generator=g), torch.randn(6, n_pix, generator=g))
    which = torch.arange(40) % 6
    ctf = 0.2 + torch.rand(40, n_pix, generator=g)
    x = ctf * refs[which] + noise * torch.complex(torch.randn(40, n_pix, generator=g), torch.randn(40, n_pix, generator=g))
    bp = BackProjector(n, r_max=r_max)
    post = expectation(x, ctf, px, torch.full((n_pix,), 0.5), [refs], np.zeros(1), rots, torch.zeros(1, 2), 2.0,
                       [bp], residual=residual)
    assert (post.best_rotation == which.numpy()).all()
    return bp.acc[..., :2], bp.acc[..., 2]


def test_residuals_vanish_when_the_reference_explains_the_images():
    data, weight = _accumulate(residual=False, noise=0.0)
    res_data, res_weight = _accumulate(residual=True, noise=0.0)
    torch.testing.assert_close(res_weight, weight)  # same Σ p·CTF² weights
    assert res_data.abs().max() < 1e-4 * data.abs().max()  # the true reference is a fixed point: zero gradient


def test_residuals_are_the_data_minus_the_weighted_reference():
    data, weight = _accumulate(residual=False, noise=0.3)
    res_data, _ = _accumulate(residual=True, noise=0.3)
    clean, _ = _accumulate(residual=False, noise=0.0)
    # Σ p·CTF·(x − CTF·ref) = Σ p·CTF·x − Σ p·CTF²·ref, and Σ p·CTF²·ref is the clean images' sum
    torch.testing.assert_close(res_data, data - clean, atol=1e-4 * float(data.abs().max()), rtol=0)
