"""The E-step kernel finds the true pose of simulated particles."""

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from spa3d.fourier.ctf import ctf_half_plane
from spa3d.fourier.grid import irfft2_centered, phase_shift_2d, rfft2_centered
from spa3d.fourier.projector import Projector
from spa3d.geometry.euler import angular_distance_deg, euler_to_matrix
from spa3d.geometry.sampling import orientation_grid, oversampled_orientations, translation_grid
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


def test_single_precision_posteriors_match_double_precision(truth_map):
    """The hot path runs in float32: its posteriors over poses must match float64 on realistic data."""
    vol, _ = truth_map
    rng = np.random.default_rng(9)
    n, r_max = 64, 20
    grid = orientation_grid(1)
    trans = translation_grid(3, 1)
    px = FourierPixels.make(n, r_max)
    proj = Projector(vol, r_max=r_max)
    mats = torch.tensor(euler_to_matrix(*grid.T), dtype=torch.float32)
    refs = px.take(proj.project(mats))
    pick = rng.choice(len(grid), 16)
    ctf = ctf_half_plane(_random_ctf(16, SimulationOptions(), rng), n, 2.0)
    imgs = irfft2_centered(proj.project(mats[pick]) * ctf, n)
    imgs = imgs + 3.0 * imgs.std() * torch.randn(imgs.shape, generator=torch.Generator().manual_seed(1))  # SNR ~0.1
    x = px.take(rfft2_centered(imgs))
    w = px.multiplicity / (9.0 * float(imgs.var()) * n * n)
    ph = px.shift_phases(torch.tensor(trans, dtype=torch.float32))
    c = px.take(ctf)
    post = {}
    for dt in (torch.float32, torch.float64):
        cdt = torch.complex64 if dt == torch.float32 else torch.complex128
        ll = log_likelihoods(x.to(cdt), c.to(dt), w.to(dt), refs.to(cdt), ph.to(cdt)).reshape(16, -1)
        post[dt] = torch.softmax(ll.double(), dim=1)
    diff = (post[torch.float32] - post[torch.float64]).abs().sum(1).max().item()
    print(f"float32 vs float64 posterior total variation: max {diff:.2e}")
    assert diff < 1e-2, f"total variation between float32 and float64 posteriors: {diff:.2e}"
    assert torch.equal(post[torch.float32].argmax(1), post[torch.float64].argmax(1))


def test_coarse_posterior_kernel_matches_torch_selection():
    """The compiled coarse-pass kernel gives the log-posteriors and significant sets of the torch formulation.

    Direct sums for log L, translation, rotation and class priors, a class restriction, posteriors from sharp
    (one sample) to flat (capped at 256 samples).
    """
    import pytest

    from spa3d import kernels
    from spa3d.inference.likelihood import coarse_terms
    from spa3d.inference.search import significant_samples

    if not kernels.have_compiled_kernels():
        pytest.skip("compiled kernels not built (no C compiler)")
    gen = torch.Generator().manual_seed(0)
    n, b, r, k_cls = 16, 6, 40, 3
    px = FourierPixels.make(n, 6)
    p = len(px.index)
    x = torch.complex(torch.randn(b, p, generator=gen), torch.randn(b, p, generator=gen))
    refs = [torch.complex(torch.randn(r, p, generator=gen), torch.randn(r, p, generator=gen)) for _ in range(k_cls)]
    c = torch.rand(b, p, generator=gen)
    # images scaled from sharp to flat posteriors
    w = px.multiplicity.float()
    shifts = torch.tensor(translation_grid(2, 1), dtype=torch.float32)
    ph = px.shift_phases(shifts)
    scale = torch.logspace(1, -4, b)[:, None]
    cross, half_power, norm_x = coarse_terms(x * scale.sqrt(), c, w, refs, ph)
    ll_direct = log_likelihoods(x[:1] * scale[0].sqrt(), c[:1], w, refs[1], ph)[0]
    torch.testing.assert_close(cross[1, 0] - half_power[1, 0][None] - 0.5 * norm_x[0], ll_direct, rtol=1e-4, atol=1e-2)
    row_const = (-0.5 * norm_x)[:, None] + torch.log(torch.tensor([0.5, 0.3, 0.2]))[None]
    row_const[2, 0] = -torch.inf  # image 2 may only take classes 1 and 2
    prior_t = -(shifts**2).sum(1)[None].expand(b, -1).contiguous() / 8
    prior_r = -torch.rand(b, r, generator=gen)
    ll = (cross - half_power[:, :, None, :] + row_const.T[:, :, None, None] + prior_t[None, :, :, None]
          + prior_r[None, :, None, :]).transpose(0, 1).reshape(b, -1)
    img_t, flat_t, n_t, cov_t = significant_samples(ll, 0.999, 256)
    img_k, flat_k, n_k, cov_k, mx, log_z = kernels.coarse_significant(
        cross, half_power, row_const.contiguous(), prior_t, prior_r.contiguous(), 0.999, 256)
    torch.testing.assert_close(cross.transpose(0, 1).reshape(b, -1), ll, rtol=1e-5, atol=1e-3)
    assert n_k.tolist() == n_t.tolist() and n_k[0] < 10 and n_k[-1] == 256
    assert torch.equal(img_k, img_t)
    assert set(flat_k.tolist()) == set(flat_t.tolist())
    torch.testing.assert_close(cov_k, cov_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mx + log_z, torch.logsumexp(ll, 1), rtol=1e-5, atol=1e-3)
    assert not bool((flat_k[img_k == 2] < len(shifts) * r).any())  # nothing in the forbidden class


def test_fine_pass_kernels_match_torch_products():
    """The fine pass's compiled products equal the batched-GEMM formulation (cross terms and M-step sums)."""
    import pytest

    from spa3d import kernels

    if not kernels.have_compiled_kernels():
        pytest.skip("compiled kernels not built (no C compiler)")
    gen = torch.Generator().manual_seed(1)
    b, p, n_t, n_u, s = 5, 37, 12, 20, 60
    x = torch.complex(torch.randn(b, p, generator=gen), torch.randn(b, p, generator=gen))
    ph = torch.polar(torch.ones(n_t, p), torch.rand(n_t, p, generator=gen) * 6.3)
    table = torch.complex(torch.randn(n_u, p, generator=gen), torch.randn(n_u, p, generator=gen))
    img = torch.randint(0, b, (s,), generator=gen)
    child_t = torch.randint(0, n_t, (s, 4), generator=gen)
    inv = torch.randint(0, n_u, (s, 8), generator=gen)
    post = torch.rand(s, 4, 8, generator=gen)
    a = x[img][:, None, :] * ph[child_t]  # (S, 4, P)
    cross_ref = torch.einsum("sjp,smp->sjm", torch.view_as_real(a).reshape(s, 4, -1),
                             torch.view_as_real(table[inv]).reshape(s, 8, -1))
    torch.testing.assert_close(kernels.fine_cross(x, ph, table, img, child_t, inv), cross_ref, rtol=1e-4, atol=1e-4)
    acc_ref = torch.zeros(n_u, p, dtype=torch.complex64).index_add_(
        0, inv.reshape(-1), torch.einsum("sjm,sjp->smp", post.to(torch.complex64), a).reshape(-1, p))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        acc = kernels.fine_accumulate(x, ph, post, img, child_t, inv, n_u)
        torch.testing.assert_close(acc, acc_ref, rtol=1e-4, atol=1e-4)
        if threads == 1:
            acc1 = acc
    assert torch.equal(acc, acc1)  # the same sums in the same order for any thread count
    # the power terms per pair, without the dense (B, U) product
    a, tp = torch.rand(b, p, generator=gen), torch.rand(n_u, p, generator=gen)
    torch.testing.assert_close(kernels.pair_power(a, tp, img, inv), (a @ tp.T)[img[:, None], inv], rtol=1e-5,
                               atol=1e-5)


def test_m_step_takes_the_significant_fine_samples_as_relion():
    """Each image's M-step weights: its largest fine posteriors up to 99.9 % of the mass (RELION's
    exp_significant_weight), renormalised; checked against a per-image sort."""
    from spa3d.inference.search import significant_fine

    gen = torch.Generator().manual_seed(5)
    n_img, rows, fraction = 7, 40, 0.999
    img = torch.randint(0, n_img, (rows,), generator=gen)
    sharp = torch.randn(rows, 32, generator=gen) * 4.0  # a few samples dominate each image
    post = torch.exp(sharp)
    total = torch.zeros(n_img).index_add_(0, img, post.sum(1))
    post = post / total[img][:, None]
    got = significant_fine(post, img, n_img, fraction)
    for b in range(n_img):
        mine = post[img == b].reshape(-1).double()
        if len(mine) == 0:
            continue
        srt = torch.sort(mine, descending=True).values
        n_keep = int(((torch.cumsum(srt, 0) - srt) < fraction).sum())
        thr = srt[n_keep - 1]
        want = torch.where(mine >= thr, mine, torch.zeros_like(mine))
        want = want / want.sum()
        np.testing.assert_allclose(got[img == b].reshape(-1).double().numpy(), want.numpy(), rtol=1e-5, atol=1e-9)
        assert 0 < n_keep < len(mine)  # some samples dropped, the rest held ≥ 99.9 %
        assert float(srt[:n_keep].sum()) >= fraction
    assert torch.equal(significant_fine(post, img, n_img, 1.0), post)


def test_noise_statistics_are_posterior_weighted_residuals():
    """σ²'s residual sum is Σ over every pose of p·m·|X·S − C·P|² (RELION), not the best pose's residual."""
    from spa3d.geometry.euler import random_rotations
    from spa3d.inference.estep import expectation

    n, r_max = 24, 8
    px = FourierPixels.make(n, r_max)
    g = torch.Generator().manual_seed(3)
    n_pix = px.kx.shape[0]
    n_img, n_rot = 30, 5
    rots = torch.as_tensor(random_rotations(n_rot, np.random.default_rng(3)), dtype=torch.float32)
    refs = [torch.complex(torch.randn(n_rot, n_pix, generator=g), torch.randn(n_rot, n_pix, generator=g))
            for _ in range(2)]
    trans = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    ctf = 0.2 + torch.rand(n_img, n_pix, generator=g)
    noise = 1.5 * torch.complex(torch.randn(n_img, n_pix, generator=g), torch.randn(n_img, n_pix, generator=g))
    x = ctf * refs[0][torch.arange(n_img) % n_rot] + noise  # noisy: the posteriors spread over several poses
    sigma2 = torch.full((n_pix,), 40.0)
    post = expectation(x, ctf, px, sigma2, refs, np.log([0.5, 0.5]), rots, trans, 2.0)
    # brute force: log-likelihoods and residuals of every (class, translation, rotation)
    phases = px.shift_phases(trans)
    m = px.multiplicity
    xs = x[:, None, :] * phases[None]  # (B, T, P)
    ll, res = [], []
    for k in range(2):
        d = xs[:, :, None, :] - (ctf[:, None, None, :] * refs[k][None, None])  # (B, T, R, P)
        r2 = (d.abs() ** 2 * m).double()  # (B, T, R, P)
        prior_t = -(trans**2).sum(1).double() / (2 * 2.0**2)
        ll.append(-0.5 * (r2 / sigma2.double()).sum(-1) + prior_t[None, :, None])
        res.append(r2)
    ll = torch.stack(ll, 1)  # (B, K, T, R)
    p = torch.softmax(ll.reshape(n_img, -1), 1).reshape(ll.shape)
    assert float(p.reshape(n_img, -1).max(1).values.mean()) < 0.9  # posteriors are broad here
    per_pixel = (p[..., None] * torch.stack(res, 1)).sum((0, 1, 2, 3))  # (P,)
    want = torch.zeros(int(px.shell.max()) + 1, dtype=torch.float64).index_add_(0, px.shell, per_pixel)
    np.testing.assert_allclose(post.residual_power, want.numpy(), rtol=2e-4)
    # the best pose's residual alone is smaller: it would under-estimate σ²
    best = torch.stack(res, 1).reshape(n_img, -1, n_pix)[torch.arange(n_img), p.reshape(n_img, -1).argmax(1)].sum(0)
    assert float(best.sum()) < 0.99 * float(want.sum())


def test_local_search_finds_poses_near_the_prior(truth_map, monkeypatch):
    """Local searches (RELION's σ_ang prior) score each image's own neighbourhood and recover its pose."""
    from scipy.spatial.transform import Rotation

    from spa3d.fourier.backprojector import BackProjector
    from spa3d.fourier.projector import Projector
    from spa3d.geometry.euler import random_rotations
    from spa3d.inference.local_search import local_rotations, local_search_batch

    vol, _ = truth_map
    n, r_max, n_img = 64, 20, 24
    rng = np.random.default_rng(5)
    true = torch.as_tensor(random_rotations(n_img, rng), dtype=torch.float32)
    proj = Projector(vol, r_max=r_max + 2)
    px = FourierPixels.make(n, r_max)
    clean = proj.project(true)  # (B, n, n//2+1)
    shift = torch.as_tensor(rng.uniform(-1, 1, (n_img, 2)), dtype=torch.float32)
    phases = torch.stack([FourierPixels.make(n, n).shift_phases(-shift[i:i + 1])[0] for i in range(n_img)])
    full = FourierPixels.make(n, n)
    x = torch.zeros_like(clean).reshape(n_img, -1)
    x[:, full.index] = full.take(clean) * phases  # the image moved by -shift: the search should find +shift
    x = x.reshape(clean.shape)
    sigma = 0.3 * float(x.abs().pow(2).mean().sqrt())
    x = x + sigma * torch.complex(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)),
                                  torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    # priors 4° away from the truth, in random directions
    axes = rng.standard_normal((n_img, 3))
    axes = 4.0 * axes / np.linalg.norm(axes, axis=1, keepdims=True)
    prior = torch.as_tensor(true.numpy() @ Rotation.from_rotvec(np.deg2rad(axes)).as_matrix(), dtype=torch.float32)
    step, sig = 1.875, 3.75
    local = local_rotations(step, sig)
    assert 100 < len(local[0]) < 300 and np.isclose(local[1].min(), 0.0) and len(local[2]) == 8 * len(local[0])
    from spa3d.geometry.sampling import oversampled_translations

    ct, ft = (torch.as_tensor(t, dtype=torch.float32) for t in oversampled_translations(2.0, 1.0))
    sigma2 = torch.full((n // 2 + 1,), 2 * sigma**2)
    bps = [BackProjector(n, r_max=r_max)]
    r = local_search_batch(x, torch.ones(x.shape), torch.zeros(n_img, 2), prior,
                           tuple(torch.as_tensor(a, dtype=torch.float32) for a in local), ct, ft, [proj],
                           FourierPixels.make(n, 12), px, sigma2, torch.zeros(1), 3.0, sig, bps)
    err = np.rad2deg(np.arccos(np.clip((np.einsum("bij,bij->b", r.best_rotation, true.numpy()) - 1) / 2, -1, 1)))
    assert np.median(err) < 1.5 and err.max() < 3.0, err
    terr = np.abs(r.best_translation - shift.numpy())
    assert np.median(terr) <= 0.3 and terr.max() <= 0.6, terr
    assert np.all(r.n_significant >= 1) and np.all(r.max_posterior > 0) and r.flops > 0
    assert float(bps[0].weight.sum()) > 0
    # the local pre-pass (refine3d's default): every coarse point in some cell, the identity a pre-pass point;
    # the same poses as the whole lattice, from fewer coarse poses
    from spa3d.inference.local_search import LOCAL_PREPASS_MARGIN, local_prepass_cells

    pre, member = local_prepass_cells(step, sig)
    assert member.shape == (len(pre), len(local[0])) and member.any(0).all() and np.isclose(local[1][pre], 0).sum() == 1
    assert 20 <= len(pre) <= 40 and member.sum(1).max() <= 27
    r_pre = local_search_batch(x, torch.ones(x.shape), torch.zeros(n_img, 2), prior,
                               tuple(torch.as_tensor(a, dtype=torch.float32) for a in local), ct, ft, [proj],
                               FourierPixels.make(n, 12), px, sigma2, torch.zeros(1), 3.0, sig, None,
                               prepass=(torch.as_tensor(pre), torch.as_tensor(member), LOCAL_PREPASS_MARGIN))
    assert np.array_equal(r_pre.best_rotation, r.best_rotation)
    assert np.array_equal(r_pre.best_translation, r.best_translation)
    np.testing.assert_allclose(r_pre.max_posterior, r.max_posterior, rtol=1e-3)
    assert r_pre.poses < 0.6 * r.poses
    # the fine pass in parts (here down to one image each, as where its rows would not fit in memory): the same
    import spa3d.inference.search as search

    monkeypatch.setattr(search, "FINE_TABLE_BYTES", {"cpu": 1, "cuda": 1})
    parts = [BackProjector(n, r_max=r_max)]
    r2 = local_search_batch(x, torch.ones(x.shape), torch.zeros(n_img, 2), prior,
                            tuple(torch.as_tensor(a, dtype=torch.float32) for a in local), ct, ft, [proj],
                            FourierPixels.make(n, 12), px, sigma2, torch.zeros(1), 3.0, sig, parts)
    assert np.array_equal(r2.best_rotation, r.best_rotation) and np.array_equal(r2.n_significant, r.n_significant)
    np.testing.assert_allclose(r2.max_posterior, r.max_posterior, rtol=1e-5)
    assert torch.allclose(parts[0].weight, bps[0].weight, rtol=1e-4, atol=1e-6 * float(bps[0].weight.abs().max()))


def test_add_at_sums_repeated_indices_in_the_same_order_every_time():
    """The M-step's (image, table row) sums: equal to numpy's add.at and bit-identical run to run, where torch's
    index_put_(accumulate=True) on the CPU adds with atomics across threads (a same-seed class3d then differed in
    the last bits of its maps, amplified to 2e-4 by iteration 3)."""
    from spa3d.inference.search import add_at

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 300, (200_000, 8), generator=g)
    cols = torch.randint(0, 5_000, (200_000, 8), generator=g)
    vals = torch.rand(200_000, 8, generator=g)
    first = add_at(torch.zeros(300, 5_000), rows, cols, vals)
    for _ in range(5):
        assert torch.equal(add_at(torch.zeros(300, 5_000), rows, cols, vals), first)
    ref = np.zeros((300, 5_000))
    np.add.at(ref, (rows.numpy(), cols.numpy()), vals.numpy().astype(np.float64))
    np.testing.assert_allclose(first.numpy(), ref, rtol=1e-5, atol=1e-5)


def _noisy_projections(vol, n, n_img, rng, r_max, noise=0.3):
    """Images (B, n, n//2+1) of ``vol`` at random rotations, moved by random shifts (−1..1 px), with white noise."""
    from spa3d.geometry.euler import random_rotations

    true = torch.as_tensor(random_rotations(n_img, rng), dtype=torch.float32)
    proj = Projector(vol, r_max=r_max + 2)
    clean = proj.project(true)
    shift = torch.as_tensor(rng.uniform(-1, 1, (n_img, 2)), dtype=torch.float32)
    full = FourierPixels.make(n, n)
    phases = torch.stack([full.shift_phases(-shift[i:i + 1])[0] for i in range(n_img)])
    x = torch.zeros_like(clean).reshape(n_img, -1)
    x[:, full.index] = full.take(clean) * phases
    x = x.reshape(clean.shape)
    sigma = noise * float(x.abs().pow(2).mean().sqrt())
    x = x + sigma * torch.complex(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)),
                                  torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    return x, true, shift, proj, sigma


def test_pruned_search_finds_the_exhaustive_search_poses(truth_map):
    """The pre-pass at 7.5° keeps the poses that the exhaustive 3.75° search finds, scoring a fraction of the grid;
    images it cannot settle go through the exhaustive search, with the same results."""
    import dataclasses

    from spa3d.fourier.backprojector import BackProjector
    from spa3d.geometry.symmetry import symmetry_matrices
    from spa3d.inference.pruned_search import make_prepass, pruned_search_batch
    from spa3d.inference.search import coarse_radius, make_search_grid, search_batch

    vol, _ = truth_map
    n, r_max, n_img = 64, 20, 16
    rng = np.random.default_rng(8)
    x, true, shift, proj, sigma = _noisy_projections(vol, n, n_img, rng, r_max, noise=1.0)
    grid = make_search_grid(3, "C1", 2.0, 1.0)
    pre_grid = make_search_grid(2, "C1", 2.0, 1.0)
    r_c = coarse_radius(3, 110, n, 2.0)
    px_c, px_f, px_p = FourierPixels.make(n, min(r_max, r_c)), FourierPixels.make(n, r_max), FourierPixels.make(
        n, np.ceil(r_c / 2))
    refs = [proj.project_pixels(grid.coarse_rot, px_c.kx, px_c.ky)]
    sigma2 = torch.full((n // 2 + 1,), 2 * sigma**2)
    ctf, old = torch.ones(x.shape), torch.zeros(n_img, 2)
    args = (x, ctf, old)
    bp_full = [BackProjector(n, r_max=r_max)]
    full = search_batch(*args, grid, [proj], refs, px_c, px_f, sigma2, torch.zeros(1), 3.0, bp_full,
                        marginalise_broad=False)
    err = np.rad2deg(np.arccos(np.clip((np.einsum("bij,bij->b", full.best_rotation, true.numpy()) - 1) / 2, -1, 1)))
    assert np.median(err) < 3.0, err  # the exhaustive search itself finds the poses
    pre = make_prepass(pre_grid.coarse_rot, grid, symmetry_matrices("C1"), [proj], px_p, 1.25 * 15.0)
    bp = [BackProjector(n, r_max=r_max)]
    pruned = pruned_search_batch(*args, grid, pre, [proj], refs, px_c, px_f, sigma2, torch.zeros(1), 3.0, bp,
                                 marginalise_broad=False)
    assert np.array_equal(pruned.best_rotation, full.best_rotation)
    assert np.array_equal(pruned.best_translation, full.best_translation)
    np.testing.assert_allclose(pruned.max_posterior, full.max_posterior, rtol=1e-3, atol=1e-4)
    assert pruned.poses < 0.3 * full.poses, (pruned.poses, full.poses)
    assert torch.allclose(bp[0].weight, bp_full[0].weight, rtol=1e-3, atol=1e-4 * float(bp_full[0].weight.abs().max()))
    # with previous poses 20° off, the same poses (the previous pose only widens the search)
    axes = rng.standard_normal((n_img, 3))
    prior = torch.as_tensor(true.numpy() @ Rotation.from_rotvec(np.deg2rad(20.0) * axes / np.linalg.norm(
        axes, axis=1, keepdims=True)).as_matrix(), dtype=torch.float32)
    seeded = pruned_search_batch(*args, grid, pre, [proj], refs, px_c, px_f, sigma2, torch.zeros(1), 3.0, None,
                                 marginalise_broad=False, prior_rot=prior)
    assert np.array_equal(seeded.best_rotation, full.best_rotation)
    # no image settled by the pre-pass: every image searched exhaustively, as search_batch does
    bp_ex = [BackProjector(n, r_max=r_max)]
    ex = pruned_search_batch(*args, grid, dataclasses.replace(pre, max_rotations=0), [proj], refs, px_c, px_f, sigma2,
                             torch.zeros(1), 3.0, bp_ex, marginalise_broad=False)
    assert np.array_equal(ex.best_rotation, full.best_rotation) and ex.poses > full.poses
    np.testing.assert_allclose(ex.residual_shell, full.residual_shell, rtol=1e-5)
    assert torch.equal(bp_ex[0].weight, bp_full[0].weight)


def test_rotation_index_finds_neighbours_across_the_asymmetric_unit():
    """The pre-pass's neighbours are symmetry-aware: for random rotations the D2 grid row nearest to them (over
    the mates A·L, as orientation changes are measured) is within the reach."""
    from spa3d.geometry.symmetry import symmetry_matrices
    from spa3d.inference.pruned_search import RotationIndex
    from spa3d.jobs.refine3d import orientation_changes

    ops = symmetry_matrices("D2")
    grid = euler_to_matrix(*oversampled_orientations(3, "D2")[0].T)
    x = Rotation.random(200, random_state=3).as_matrix()
    index = RotationIndex(grid, ops)
    indptr, indices = index.near(x, 8.0)
    for i in range(len(x)):
        d = orientation_changes(np.repeat(x[i:i + 1], len(grid), 0), grid, ops)
        hits = indices[indptr[i]:indptr[i + 1]]
        assert int(d.argmin()) in set(hits.tolist()) and d[hits].max() <= 8.0 + 1e-6


def test_candidate_scores_kernel_matches_torch(monkeypatch):
    """The pre-pass's coarse pass scores each image's own candidates: the compiled kernels (blocks of 4 shifts × 8
    candidates read from the projection table) and the batched products of the GPU path agree."""
    from spa3d import kernels
    from spa3d.inference.pruned_search import _coarse_scores

    g = torch.Generator().manual_seed(3)
    n_i, n_t, n_p, n_r, k_cls = 5, 7, 40, 50, 2

    def cplx(*shape):
        return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))

    xs, cs, w = cplx(n_i, n_p), torch.rand(n_i, n_p, generator=g), torch.rand(n_p, generator=g) + 0.5
    phases = torch.polar(torch.ones(n_t, n_p), torch.rand(n_t, n_p, generator=g) * 6.28)
    refs = [cplx(n_r, n_p) for _ in range(k_cls)]
    per = torch.tensor([1, 9, 17, 3, 8])  # candidates per image, padded to 17
    valid = torch.arange(17)[None, :] < per[:, None]
    rot_pad = torch.randint(0, n_r, (n_i, 17), generator=g) * valid
    cls_pad = torch.randint(0, k_cls, (n_i, 17), generator=g) * valid
    lpt, prior = -torch.rand(n_i, n_t, generator=g), torch.log(torch.tensor([0.3, 0.7]))
    args = (xs, cs, w, phases, refs, rot_pad, cls_pad, valid, lpt, prior, 1 << 20)
    if not kernels.have_compiled_kernels():
        return
    fast = _coarse_scores(*args)
    monkeypatch.setattr(kernels, "have_compiled_kernels", lambda: False)
    ref = _coarse_scores(*args)
    assert torch.equal(torch.isinf(fast), torch.isinf(ref)) and int(torch.isfinite(ref).sum()) == n_t * int(per.sum())
    fin = torch.isfinite(ref)
    torch.testing.assert_close(fast[fin], ref[fin], rtol=1e-4, atol=1e-3)


def test_residual_terms_kernel_matches_torch():
    """The compiled per-pixel sums of the noise power's cross and power terms equal the torch formulation."""
    import pytest

    from spa3d import kernels

    if not kernels.have_compiled_kernels():
        pytest.skip("compiled kernels not built (no C compiler)")
    gen = torch.Generator().manual_seed(3)
    u, p = 300, 131  # p not a multiple of the kernel's 64-pixel blocks
    d = torch.complex(torch.randn(u, p, generator=gen), torch.randn(u, p, generator=gen))
    q = torch.complex(torch.randn(u, p, generator=gen), torch.randn(u, p, generator=gen))
    w = torch.rand(u, p, generator=gen)
    t1, t2 = kernels.residual_terms(d, q, w)
    torch.testing.assert_close(t1, (d.real * q.real + d.imag * q.imag).sum(0, dtype=torch.float64), rtol=1e-12,
                               atol=1e-9)
    torch.testing.assert_close(t2, (w * (q.real**2 + q.imag**2)).sum(0, dtype=torch.float64), rtol=1e-12, atol=1e-9)


def test_fine_weights_kernel_matches_the_dense_product():
    """Each table row's M-step weight summed from its pairs equals the dense (rows × images) product."""
    import pytest

    from spa3d import kernels
    from spa3d.inference.search import add_at

    if not kernels.have_compiled_kernels():
        pytest.skip("compiled kernels not built (no C compiler)")
    gen = torch.Generator().manual_seed(4)
    b, p, n_u, s = 7, 53, 40, 90
    c2 = torch.rand(b, p, generator=gen)
    post = torch.rand(s, 4, 8, generator=gen) * (torch.rand(s, 4, 8, generator=gen) > 0.5)
    img = torch.randint(0, b, (s,), generator=gen)
    inv = torch.randint(0, n_u, (s, 8), generator=gen)
    wrow = torch.zeros((b, n_u))
    add_at(wrow, img[:, None].expand(-1, 8), inv, post.sum(1))
    torch.testing.assert_close(kernels.fine_weights(c2, post, img, inv, n_u), wrow.T @ c2, rtol=1e-5, atol=1e-5)
