"""The E-step kernel finds the true pose of simulated particles."""

import numpy as np
import torch

from spa3d.fourier.ctf import ctf_half_plane
from spa3d.fourier.grid import irfft2_centered, phase_shift_2d, rfft2_centered
from spa3d.fourier.projector import Projector
from spa3d.geometry.euler import angular_distance_deg, euler_to_matrix
from spa3d.geometry.sampling import orientation_grid, translation_grid
from spa3d.inference.likelihood import FourierPixels, gemm_flops, log_likelihoods
from spa3d.jobs.simulate import SimulationOptions, _random_ctf


def test_log_likelihood_equals_direct_sum():
    n, b, r = 16, 3, 5
    px = FourierPixels.make(n, 6)
    p = len(px.index)
    x = torch.complex(torch.randn(b, p, dtype=torch.float64), torch.randn(b, p, dtype=torch.float64))
    proj = torch.complex(torch.randn(r, p, dtype=torch.float64), torch.randn(r, p, dtype=torch.float64))
    c = torch.rand(b, p, dtype=torch.float64)
    w = px.multiplicity.double() / torch.rand(p, dtype=torch.float64).add(0.5)
    shifts = torch.tensor(translation_grid(2, 1), dtype=torch.float64)
    ph = px.shift_phases(shifts)
    ll = log_likelihoods(x, c, w, proj, ph)
    direct = torch.empty_like(ll)
    for i in range(b):
        for j in range(len(shifts)):
            for k in range(r):
                d = x[i] * ph[j] - c[i] * proj[k]
                direct[i, j, k] = -0.5 * (w * d.abs() ** 2).sum()
    torch.testing.assert_close(ll, direct)
    assert gemm_flops(b, len(shifts), r, p) > 0


def test_true_pose_has_the_highest_likelihood(truth_map):
    vol, _ = truth_map
    rng = np.random.default_rng(4)
    grid = orientation_grid(1)  # 576 orientations, 30° apart
    trans = translation_grid(4, 2)
    n, r_max = 64, 12
    px = FourierPixels.make(n, r_max)
    proj = Projector(vol, r_max=r_max)
    mats = torch.tensor(euler_to_matrix(*grid.T), dtype=torch.float32)
    refs = px.take(proj.project(mats))
    truth_r = rng.choice(len(grid), 20)
    truth_t = rng.choice(len(trans), 20)
    ctf_p = _random_ctf(20, SimulationOptions(), rng)
    ctf = ctf_half_plane(ctf_p, n, 2.0)
    ft = proj.project(mats[truth_r]) * ctf
    # the particle sits at -t; the likelihood shifts images by +t to centre them
    ft = ft * phase_shift_2d(n, -torch.tensor(trans[truth_t])).to(ft.dtype)
    imgs = irfft2_centered(ft, n)
    imgs = imgs + 0.5 * imgs.std() * torch.randn(imgs.shape, generator=torch.Generator().manual_seed(0))
    x = px.take(rfft2_centered(imgs))
    w = px.multiplicity / (0.25 * float(imgs.var()) * n * n)
    ll = log_likelihoods(x, px.take(ctf), w, refs, px.shift_phases(torch.tensor(trans, dtype=torch.float32)))
    best = ll.reshape(20, -1).argmax(1)
    best_t, best_r = best // len(grid), best % len(grid)
    assert (best_t.numpy() == truth_t).all()
    err = angular_distance_deg(euler_to_matrix(*grid[best_r.numpy()].T), euler_to_matrix(*grid[truth_r].T))
    assert np.median(err) < 1e-3
