"""Projection, CTF, back-projection and reconstruction against exact expectations."""

import numpy as np
import pytest
import torch

from spa3d.fourier.backprojector import BackProjector
from spa3d.fourier.ctf import CtfParams, ctf_half_plane, wavelength_angstrom
from spa3d.fourier.filters import fsc, lowpass, resolution_at, soft_sphere
from spa3d.fourier.grid import irfft2_centered, phase_shift_2d, rfft2_centered
from spa3d.fourier.projector import Projector
from spa3d.geometry.euler import euler_to_matrix, random_rotations
from spa3d.geometry.symmetry import symmetry_matrices
from spa3d.kernels import have_compiled_kernels, trilinear_scatter


def _ctf(u, v=None, angle=0.0, q0=0.1, phase=0.0, b=0.0, n=1):
    v = u if v is None else v
    f = lambda x: np.full(n, float(x))
    return CtfParams(f(u), f(v), f(angle), f(300), f(2.7), f(q0), f(b), f(1.0), f(phase))


def test_projection_along_z_is_the_line_integral(truth_map):
    vol, _ = truth_map
    img = irfft2_centered(Projector(vol).project(torch.eye(3)[None]), 64)[0].numpy()
    ref = vol.sum(0)
    assert np.corrcoef(img.ravel(), ref.ravel())[0, 1] > 0.999
    # rot = 90° turns the map about z: the projection is the z-sum of the map rotated by -90° in-plane
    img90 = irfft2_centered(Projector(vol).project(torch.tensor(euler_to_matrix(90, 0, 0), dtype=torch.float32)[None]), 64)[0]
    corr = [np.corrcoef(img90.numpy().ravel(), np.rot90(ref, k).ravel())[0, 1] for k in range(4)]
    assert np.argmax(corr) == 1 and max(corr) > 0.95


def test_wavelength_and_ctf_values():
    assert wavelength_angstrom(300) == pytest.approx(0.019687, abs=1e-6)
    c = ctf_half_plane(_ctf(20000), 128, 1.0, dtype=torch.float64)[0]
    q0 = 0.1
    assert float(c[0, 0]) == pytest.approx(np.sin(np.arctan(q0 / np.sqrt(1 - q0**2))), abs=1e-9)  # > 0 at k = 0
    # first zero of a round CTF: pi*lambda*df*k^2 + K3 = pi (Cs negligible at low k)
    lam = wavelength_angstrom(300)
    k3 = np.arctan(q0 / np.sqrt(1 - q0**2))
    k_zero = np.sqrt((np.pi - k3) / (np.pi * lam * 20000))
    kx = np.arange(65) / 128.0
    row = c[0].numpy()
    i = np.nonzero(np.diff(np.sign(row)))[0][0]
    k_found = kx[i] + (kx[i + 1] - kx[i]) * row[i] / (row[i] - row[i + 1])
    assert k_found == pytest.approx(k_zero, rel=0.01)
    # astigmatism: along the defocus angle the defocus is U
    cu = ctf_half_plane(_ctf(25000, 15000, angle=0.0), 128, 1.0, dtype=torch.float64)[0, 0].numpy()
    cv = ctf_half_plane(_ctf(25000, 15000, angle=90.0), 128, 1.0, dtype=torch.float64)[0, 0].numpy()
    ref_u = ctf_half_plane(_ctf(25000), 128, 1.0, dtype=torch.float64)[0, 0].numpy()
    ref_v = ctf_half_plane(_ctf(15000), 128, 1.0, dtype=torch.float64)[0, 0].numpy()
    np.testing.assert_allclose(cu, ref_u, atol=1e-9)
    np.testing.assert_allclose(cv, ref_v, atol=1e-9)
    # options
    flat = ctf_half_plane(_ctf(20000), 128, 1.0, intact_first_peak=True)[0, 0].numpy()
    assert np.all(flat[: i - 2] == 1.0)
    assert np.all(ctf_half_plane(_ctf(20000), 128, 1.0, phase_flipped=True).numpy() >= 0)


def test_phase_shift_moves_images():
    img = np.zeros((32, 32), np.float32)
    img[16, 16] = 1
    ft = rfft2_centered(torch.tensor(img)[None])
    out = irfft2_centered(ft * phase_shift_2d(32, torch.tensor([[3.0, -2.0]], dtype=torch.float64)).to(ft.dtype), 32)[0]
    assert np.unravel_index(np.argmax(out.numpy()), out.shape) == (14, 19)


def test_trilinear_scatter_kernels_agree():
    rng = np.random.default_rng(0)
    coords = torch.tensor(rng.uniform(1, 14, (5000, 3)), dtype=torch.float32)
    vals = torch.tensor(rng.normal(size=(5000, 3)), dtype=torch.float32)
    a = torch.zeros(16, 16, 16, 3)
    b = torch.zeros(16, 16, 16, 3)
    trilinear_scatter(a, coords, vals, use_compiled=True)
    trilinear_scatter(b, coords, vals, use_compiled=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert float(a[..., 0].sum()) == pytest.approx(float(vals[:, 0].sum()), rel=1e-4)
    if not have_compiled_kernels():
        pytest.skip("compiled kernel not built (no C compiler): torch path checked against itself only")


def test_reconstruction_from_noise_free_projections(truth_map):
    vol, _ = truth_map
    rots = random_rotations(2000, np.random.default_rng(0))
    fts = Projector(vol).project(torch.tensor(rots, dtype=torch.float32))
    bp = BackProjector(64)
    bp.insert(fts, torch.tensor(rots))
    rec = bp.reconstruct().numpy()
    curve = fsc(rec, vol)
    assert curve[1:29].min() > 0.99  # up to 0.9 Nyquist
    inside = soft_sphere(64, 26, 0) > 0.5
    a = (rec[inside] * vol[inside]).sum() / (vol[inside] ** 2).sum()
    assert a == pytest.approx(1.0, abs=0.05)  # absolute scale kept


def test_symmetric_reconstruction_from_few_views(truth_map):
    vol, _ = truth_map
    ops = symmetry_matrices("D2")
    sym = lowpass(vol, 2.0, 8.0)
    # reference: every view also inserted at its symmetry-related orientations A·g, which reconstructs
    # the average of the map over the group
    rots = random_rotations(600, np.random.default_rng(1))
    p = Projector(sym)
    views = p.project(torch.tensor(rots, dtype=torch.float32), r_max=16)
    bp = BackProjector(64, r_max=16)
    for g in ops:
        bp.insert(views, torch.tensor(rots @ g))
    ref = bp.reconstruct().numpy()
    # the same map from the first 600 views only, with D2 imposed during reconstruction
    bp2 = BackProjector(64, r_max=16)
    bp2.insert(views, torch.tensor(rots))
    rec = bp2.reconstruct(symmetry_ops=ops).numpy()
    assert fsc(rec, ref)[1:15].min() > 0.98


def test_fsc_and_resolution():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 32, 32))
    assert fsc(a, a)[1:].min() == pytest.approx(1.0)
    assert abs(fsc(a, rng.normal(size=(32, 32, 32)))[4:].mean()) < 0.05
    curve = np.array([1, 1, 0.9, 0.6, 0.4, 0.1])
    assert resolution_at(curve, 10, 1.0, 0.5) == pytest.approx(10 / 3.5)


def test_half_map_fsc_matches_the_fsc_against_the_truth(truth_map):
    """The half sets' FSC from the accumulators: 1 for noise-free halves; with noise it falls where the truth's
    FSC of one half does, 0.143 (half vs half) near 0.5 of (full vs truth) within two shells."""
    from spa3d.fourier.backprojector import half_map_fsc

    vol, _ = truth_map
    rng = np.random.default_rng(1)
    rots = torch.tensor(random_rotations(3000, rng), dtype=torch.float32)
    fts = Projector(vol).project(rots)
    halves = [BackProjector(64), BackProjector(64)]
    for h in (0, 1):
        halves[h].insert(fts[h::2], rots[h::2])
    clean = half_map_fsc(*halves)
    assert clean[1:28].min() > 0.98
    sd = 4.0 * float(fts.abs().mean())
    noisy = fts + sd * torch.complex(torch.randn(fts.shape, generator=torch.Generator().manual_seed(2)),
                                     torch.randn(fts.shape, generator=torch.Generator().manual_seed(3)))
    halves = [BackProjector(64), BackProjector(64)]
    full = BackProjector(64)
    for h in (0, 1):
        halves[h].insert(noisy[h::2], rots[h::2])
    full.insert(noisy, rots)
    half_curve = half_map_fsc(*halves)
    truth_curve = fsc(full.reconstruct().numpy(), vol)
    assert 0.9 > half_curve[5:].min() and half_curve[1] > 0.9  # noise: the curve falls

    def first_below(c, t):
        return int(np.nonzero(c[1:] < t)[0][0])

    assert abs(first_below(half_curve, 0.143) - first_below(truth_curve, 0.5)) <= 2


def test_cropped_reconstruction_is_the_full_map_fourier_cropped(truth_map):
    """reconstruct(out_box=m): the full map's transform cropped to m³ (same shells in cycles per box), so the half
    sets' FSC that class3d takes from cropped maps equals the full maps' FSC up to r_max."""
    from spa3d.fourier.backprojector import half_map_fsc

    def centred_ft(v):
        return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(v))) / v.size

    vol, _ = truth_map
    rng = np.random.default_rng(4)
    rots = torch.tensor(random_rotations(1500, rng), dtype=torch.float32)
    fts = Projector(vol).project(rots)
    fts = fts + 2.0 * float(fts.abs().mean()) * torch.complex(
        torch.randn(fts.shape, generator=torch.Generator().manual_seed(5)),
        torch.randn(fts.shape, generator=torch.Generator().manual_seed(6)))
    r_max, m = 14.0, 38

    def halves():
        hs = [BackProjector(64, r_max=r_max), BackProjector(64, r_max=r_max)]
        for h in (0, 1):
            hs[h].insert(fts[h::2], rots[h::2])
        return hs

    full = halves()[0].reconstruct(mask_edge=False).numpy()
    small = halves()[0].reconstruct(mask_edge=False, out_box=m).numpy()
    assert small.shape == (m, m, m)
    # the low frequencies of both maps' transforms (per voxel) agree (measured: 0.17 % of the largest)
    ff, fs = centred_ft(full), centred_ft(small)
    k = 10
    a = ff[32 - k:32 + k + 1, 32 - k:32 + k + 1, 32 - k:32 + k + 1]
    b = fs[m // 2 - k:m // 2 + k + 1, m // 2 - k:m // 2 + k + 1, m // 2 - k:m // 2 + k + 1]
    assert np.abs(a - b).max() <= 0.01 * np.abs(a).max()
    c_full, c_crop = half_map_fsc(*halves()), half_map_fsc(*halves(), cropped=True)
    assert np.abs(c_full[:int(r_max) + 1] - c_crop[:int(r_max) + 1]).max() < 2e-3  # measured 1.4e-4
    assert c_crop[1] > 0.9 and c_crop[int(r_max)] < c_crop[1]
    with pytest.raises(ValueError):
        halves()[0].reconstruct(out_box=2 * int(r_max))  # does not hold r_max


@pytest.mark.parametrize("h", [2, 3, 7, 20])
def test_compiled_density_compensation_matches_the_torch_version(h):
    """The C kernels' separable smoothing of a half grid (mirrored at x < 0) and the density-compensation
    iterations give torch's values, also on grids narrower than the kernel."""
    from spa3d.fourier.backprojector import BackProjector
    from spa3d.kernels import density_iterations, have_compiled_kernels

    if not have_compiled_kernels():
        pytest.skip("no C compiler: the torch version is the only one")
    g = torch.Generator().manual_seed(h)
    shape = (2 * h + 1, 2 * h + 1, h + 1)
    x = torch.rand(shape, generator=g)
    x = (x + torch.flip(x, dims=(0, 1))) / 2  # the x = 0 plane of a function with f(−k) = f(k)
    ref = BackProjector._smooth(x.clone(), use_compiled=False)
    assert torch.allclose(BackProjector._smooth(x.clone()), ref, rtol=1e-5, atol=1e-6)
    w = torch.rand(shape, generator=g) ** 4
    live = (w > 0.05).contiguous()
    d = live.float()
    assert density_iterations(d, w.contiguous(), live, BackProjector._kernel(), 5)
    e = live.float()
    for _ in range(5):
        conv = BackProjector._smooth(e * w, use_compiled=False)
        floor = 1e-6 * float(conv.max())
        e = torch.where(conv > floor, e / conv, e) * live
    assert torch.allclose(d, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sym", ["D2", "O", "C7", "I"])
def test_compiled_symmetrisation_matches_grid_sample(sym):
    """The C kernel that sums the accumulators over a point group (Friedel mates where R·k has x < 0) gives
    grid_sample's values, for data and weights together and for weights alone (D2 and O: operators of 0s and ±1s,
    read directly)."""
    from spa3d.kernels import have_compiled_kernels

    if not have_compiled_kernels():
        pytest.skip("no C compiler: the torch version is the only one")
    n, b = 32, 48
    rng = np.random.default_rng(5)
    bp = BackProjector(n, r_max=n // 2 - 3)
    bp.insert(torch.as_tensor(rng.standard_normal((b, n, n // 2 + 1)) + 1j * rng.standard_normal((b, n, n // 2 + 1)),
                              dtype=torch.complex64),
              torch.as_tensor(euler_to_matrix(*rng.uniform(-180, 180, (3, b))), dtype=torch.float32))
    data, weight = bp._finalise()
    ops = symmetry_matrices(sym)
    d_ref, w_ref = bp._symmetrise(data, weight, ops, use_compiled=False)
    d, w = bp._symmetrise(data, weight, ops)
    _, w_only = bp._symmetrise(None, weight, ops)
    assert float(w_ref.abs().max()) > 0 and float((d_ref - data).abs().max()) > 0.1 * float(data.abs().max())
    assert torch.allclose(d, d_ref, rtol=1e-5, atol=1e-5 * float(d_ref.abs().max()))
    assert torch.allclose(w, w_ref, rtol=1e-5, atol=1e-6 * float(w_ref.abs().max()))
    assert torch.allclose(w_only, w_ref, rtol=1e-5, atol=1e-6 * float(w_ref.abs().max()))


@pytest.mark.skipif(not have_compiled_kernels(), reason="compiled kernels not built")
def test_tiled_back_projection_of_many_slices_equals_slice_by_slice_to_the_bit():
    """backproject_half sorts calls of millions of samples into cache-sized tiles first (box 128: 700 slices,
    4.5 M samples); every voxel must get the same sums, in the same order, as from small calls."""
    from spa3d.kernels import backproject_half

    n, pad = 128, 2
    h = n * pad // 2
    ky, kx = np.meshgrid(np.arange(-n // 2, n // 2), np.arange(0, n // 2 + 1), indexing="ij")
    inside = kx**2 + ky**2 <= (n // 2) ** 2
    kxy = torch.tensor(np.stack([kx[inside], ky[inside]], 1) * float(pad), dtype=torch.float32)
    rot = torch.as_tensor(random_rotations(700, np.random.default_rng(3)), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(700, kxy.shape[0], dtype=torch.complex64, generator=g)
    w = torch.rand(700, kxy.shape[0], generator=g)
    assert 700 * kxy.shape[0] > 4 << 20  # above the tiled path's threshold
    tiled = torch.zeros(2 * h + 1, 2 * h + 1, h + 1, 3)
    backproject_half(tiled, h, rot, kxy, vals, w)
    direct = torch.zeros_like(tiled)
    for s in range(0, 700, 50):
        backproject_half(direct, h, rot[s:s + 50], kxy, vals[s:s + 50], w[s:s + 50])
    assert torch.equal(tiled, direct) and float(direct[..., 2].sum()) > 0.9 * float(w.sum())


def test_vectorised_projection_gives_the_portable_kernels_floats():
    """project_half's AVX-512 path (16 pixels per step, gathers) must give the portable path's floats bit for
    bit: Friedel mates (x < 0), pixels whose corners leave the cube (read as zero), a run's odd tail."""
    from spa3d.kernels import project_half, projection_simd

    if projection_simd() < 16:
        pytest.skip("this CPU (or build) has no AVX-512 projection path")
    n = 48
    vol = torch.as_tensor(np.random.default_rng(5).standard_normal((n, n, n)), dtype=torch.float32)
    proj = Projector(vol, pad=2, r_max=n // 2)
    ky, kx = np.meshgrid(np.arange(-n // 2, n // 2), np.arange(0, n // 2 + 1), indexing="ij")
    keep = kx**2 + ky**2 <= (n // 2 + 3) ** 2  # a few pixels beyond the cube's reach
    kxy = torch.tensor(np.stack([kx[keep], ky[keep]], 1)[:-5] * 2.0, dtype=torch.float32)
    rot = torch.as_tensor(random_rotations(70, np.random.default_rng(6)), dtype=torch.float32)
    try:
        fast = project_half(proj._cube_ri, proj.h, rot, kxy)
        projection_simd(False)
        assert projection_simd() == 1
        portable = project_half(proj._cube_ri, proj.h, rot, kxy)
    finally:
        projection_simd(True)
    assert kxy.shape[0] % 16 != 0 and bool((portable.abs() == 0).any())  # the tail and the outside corners ran
    assert torch.equal(torch.view_as_real(fast).view(torch.int32), torch.view_as_real(portable).view(torch.int32))
