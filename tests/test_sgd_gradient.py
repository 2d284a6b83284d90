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


def _search_accumulate(residual: bool, seed: int = 0):
    """Coarse-to-fine search (the initial model's default) over noise-free images made at fine grid poses."""
    from spa3d.fourier.grid import phase_shift_2d
    from spa3d.fourier.projector import Projector
    from spa3d.inference.search import make_search_grid, search_batch

    n, r_max = 32, 10
    rng = np.random.default_rng(seed)
    from spa3d.fourier.filters import lowpass

    vol = np.zeros((n, n, n), np.float32)
    for _ in range(6):  # a smooth asymmetric blob: likelihoods fall off with the angle to the true pose
        c = rng.integers(10, 22, 3)
        vol[c[0] - 3:c[0] + 3, c[1] - 2:c[1] + 2, c[2] - 4:c[2] + 4] += 1.0
    vol = lowpass(vol, 1.0, 4.0).astype(np.float32)
    grid = make_search_grid(1, "C1", 2.0, 1.0)
    proj = Projector(vol, r_max=r_max + 2)
    ctf = torch.as_tensor(0.3 + rng.uniform(size=(12, n, n // 2 + 1)), dtype=torch.float32)
    px_f, px_c = FourierPixels.make(n, r_max), FourierPixels.make(n, 6)
    coarse = [proj.project_pixels(grid.coarse_rot, px_c.kx, px_c.ky)]

    def images(rots, shifts):  # images that the pose (rotation, +shift) explains exactly: shifted, they are C·P
        return ctf * proj.project(rots) * phase_shift_2d(n, -shifts.double()).to(torch.complex64)

    def search(x, bps):
        return search_batch(x, ctf, torch.zeros(12, 2), grid, [proj], coarse, px_c, px_f,
                            torch.full((n // 2 + 1,), 1e-3), torch.zeros(1), 5.0, bps, residual=residual)

    # poses on the fine grid that the coarse-to-fine search reaches: those it finds for images made near them
    start = search(images(grid.fine_rot[torch.as_tensor(rng.choice(len(grid.fine_rot), 12, replace=False))],
                          grid.fine_trans[torch.as_tensor(rng.choice(len(grid.fine_trans), 12))]), None)
    rots, shifts = torch.as_tensor(start.best_rotation), torch.as_tensor(start.best_translation)
    bp = BackProjector(n, r_max=r_max)
    r = search(images(rots, shifts), [bp])
    np.testing.assert_allclose(r.best_rotation, rots.numpy(), atol=1e-5)
    assert (r.max_posterior > 0.99).all()
    return bp.acc[..., :2].clone(), bp.acc[..., 2].clone()


def test_coarse_to_fine_residuals_vanish_at_the_true_poses():
    data, weight = _search_accumulate(residual=False)
    res_data, res_weight = _search_accumulate(residual=True)
    torch.testing.assert_close(res_weight, weight)
    assert res_data.abs().max() < 1e-3 * data.abs().max()
