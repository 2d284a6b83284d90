"""Hand-written CPU kernels (C, loaded with ctypes), with torch fallbacks.

``trilinear_scatter`` is the back-projection's scatter-add; measured on 2 CPU
cores it is about 5x faster than the best torch formulation (a weighted
``bincount``), which is used when the compiled kernel is absent (no C
compiler at install time) or the tensors live on a GPU.
``smooth_half`` is the separable Gaussian of the reconstruction's density
compensation on a half grid (OpenMP over lines): about 8x faster than the
torch formulation (15 shifted adds) on a box-256 grid.
``project_half`` reads central slices from an interleaved half-grid cube,
the rotation applied on the fly (about 4x faster than ``grid_sample`` on its
planar cube; on CPUs with AVX-512, 16 pixels per step with gathers, the same
floats, 1.5x faster again for a local search's rotations at box 128); ``backproject_half`` is its transpose, the insertion of
central slices into the half-grid accumulators (coordinates, Friedel mates
and the scatter in one pass).
``symmetrise_half`` sums the accumulators over a point group's operators
(trilinear, Friedel mates where R·k has x < 0): at box 256 with D2 1.7 s
instead of grid_sample's 14 s.
``coarse_significant`` assembles the coarse pass's log-posteriors from the
GEMM outputs and lists each image's significant samples in one sweep per
image (the torch formulation makes about ten passes over a B × K·T·R array
and exponentiates all of it; on 2 cores, 512 images × 140,000 samples, the
kernel is about 10x faster).
``fine_cross`` and ``fine_accumulate`` are the fine pass's per-sample
products (4 child translations × 8 child rotations of each significant coarse
sample) without gathering the table rows into batched-GEMM operands.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import numpy as np
import torch

_LIB = None


def _load():
    global _LIB
    if _LIB is None:
        _LIB = False
        here = Path(__file__).parent
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            p = here / f"_trilinear{suffix}"
            if p.exists():
                lib = ctypes.CDLL(str(p))
                if not hasattr(lib, "projection_simd"):  # a library built from an older source
                    continue
                lib.trilinear_scatter_grid.restype = None
                lib.trilinear_scatter_grid.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                       ctypes.c_int64]
                lib.smooth_half.restype = None
                lib.smooth_half.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                lib.density_iteration.restype = None
                lib.density_iteration.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [
                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int64]
                lib.project_half.restype = None
                lib.project_half.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                             ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
                lib.projection_simd.restype = ctypes.c_int
                lib.projection_simd.argtypes = [ctypes.c_int]
                lib.sample_half.restype = None
                lib.sample_half.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_void_p, ctypes.c_int64]
                lib.fine_cross.restype = None
                lib.fine_cross.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64]
                lib.fine_accumulate.restype = None
                lib.fine_accumulate.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctypes.c_void_p,
                                                                                               ctypes.c_int64]
                lib.pair_power.restype = None
                lib.pair_power.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64]
                lib.backproject_half.restype = None
                lib.backproject_half.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_int64]
                lib.symmetrise_half.restype = None
                lib.symmetrise_half.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [
                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                lib.coarse_significant.restype = None
                lib.coarse_significant.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [
                    ctypes.c_double, ctypes.c_int64, ctypes.c_double] + [ctypes.c_void_p] * 6 + [ctypes.c_int64]
                lib.fine_weights.restype = None
                lib.fine_weights.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64]
                lib.residual_terms.restype = None
                lib.residual_terms.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [
                    ctypes.c_int64]
                _LIB = lib
                break
    return _LIB


def have_compiled_kernels() -> bool:
    return bool(_load())


def trilinear_scatter(acc: torch.Tensor, coords: torch.Tensor, vals: torch.Tensor, use_compiled: bool = True) -> None:
    """Add ``vals`` (M, C) at ``coords`` (M, 3: x, y, z voxels) into ``acc`` (Dz, Dy, Dx, C), trilinearly.

    Samples whose neighbourhood leaves the grid are skipped.
    """
    dz, dy, dx, nch = acc.shape
    lib = _load() if use_compiled else None
    if lib and acc.device.type == "cpu" and acc.dtype == torch.float32 and acc.is_contiguous():
        c = coords.to(torch.float32).contiguous()
        v = vals.to(torch.float32).contiguous()
        lib.trilinear_scatter_grid(acc.data_ptr(), dz, dy, dx, c.data_ptr(), v.data_ptr(), c.shape[0], nch,
                                   torch.get_num_threads())
        return
    base = torch.floor(coords)
    frac = (coords - base).to(vals.dtype)
    base = base.long()
    size = torch.tensor([dx, dy, dz], device=base.device)
    ok = ((base >= 0) & (base + 1 < size)).all(dim=1)
    base, frac, vals = base[ok], frac[ok], vals[ok]
    wz = torch.stack([1 - frac[:, 2], frac[:, 2]])
    wy = torch.stack([1 - frac[:, 1], frac[:, 1]])
    wx = torch.stack([1 - frac[:, 0], frac[:, 0]])
    t = (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).reshape(8, -1)
    o = torch.arange(2, device=acc.device)
    offs = ((o[:, None, None] * dy + o[None, :, None]) * dx + o[None, None, :]).reshape(8, 1)
    idx0 = (base[:, 2] * dy + base[:, 1]) * dx + base[:, 0]
    flat = acc.view(-1, nch)
    if acc.device.type == "cpu":
        # weighted bincount over (voxel, channel) pairs: the fastest torch scatter-add on CPU
        chan = torch.arange(nch, device=acc.device)
        flat_idx = ((idx0[None] + offs)[..., None] * nch + chan).reshape(-1)
        contrib = (t[..., None] * vals[None]).reshape(-1)
        acc.view(-1).add_(torch.bincount(flat_idx, weights=contrib, minlength=acc.numel()).to(acc.dtype))
    else:
        flat.index_add_(0, (idx0[None] + offs).reshape(-1), (t[..., None] * vals[None]).reshape(-1, nch).to(acc.dtype))


def smooth_half(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor | None:
    """Separable convolution of a half grid (Dz, Dy, Dx) of a symmetric function by ``kernel`` (2r+1 taps).

    Values at x < 0 are the mirrored ones (f(-x,-y,-z) = f(x,y,z)); zero beyond the grid elsewhere.
    ``x`` is used as work space (overwritten). Returns None when the compiled kernel cannot run
    (not built, or a GPU tensor): the caller then uses its torch code.
    """
    lib = _load()
    if not lib or x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return None
    out = torch.empty_like(x)
    k = torch.as_tensor(np.asarray(kernel, dtype=np.float32)).contiguous()
    dz, dy, dx = x.shape
    lib.smooth_half(x.data_ptr(), out.data_ptr(), dz, dy, dx, k.data_ptr(), (len(k) - 1) // 2,
                    torch.get_num_threads())
    return out


def symmetrise_half(acc: torch.Tensor, rotations: np.ndarray, imag: int = -1) -> torch.Tensor | None:
    """``acc`` (D, D, h+1, C ≤ 4; centred half grid) plus its samples at R·k for each rotation (N, 3, 3), compiled.

    Where R·k has x < 0 the Friedel mate is read and channel ``imag`` (−1: none) changes sign; trilinear, zero
    beyond the grid (as ``BackProjector._symmetrise``'s grid_sample). Returns a new tensor, or None when the
    compiled kernel cannot run.
    """
    lib = _load()
    if (not lib or acc.device.type != "cpu" or acc.dtype != torch.float32 or not acc.is_contiguous()
            or acc.dim() != 4 or acc.shape[-1] > 4):
        return None
    h = acc.shape[2] - 1
    out = torch.empty_like(acc)
    r = torch.as_tensor(np.ascontiguousarray(rotations, dtype=np.float32)).reshape(-1, 9).contiguous()
    lib.symmetrise_half(acc.data_ptr(), out.data_ptr(), h, acc.shape[-1], int(imag), r.data_ptr(), r.shape[0],
                        torch.get_num_threads())
    return out


def density_iterations(d: torch.Tensor, w: torch.Tensor, live: torch.Tensor, kernel: np.ndarray, n_iter: int,
                       floor_frac: float = 1e-6) -> bool:
    """Density compensation of a half grid in place on ``d`` (see ``BackProjector.reconstruct``), compiled.

    Each iteration: conv = smooth(d·w); where ``live``, d /= conv if conv > floor_frac·max(conv); d = 0
    elsewhere. Returns False (``d`` untouched) when the compiled kernel cannot run.
    """
    lib = _load()
    ok = (lib and d.device.type == "cpu" and d.dtype == torch.float32 and w.dtype == torch.float32
          and d.is_contiguous() and w.is_contiguous() and live.is_contiguous() and live.dtype == torch.bool)
    if not ok:
        return False
    t1, t2 = torch.empty_like(d), torch.empty_like(d)
    k = torch.as_tensor(np.asarray(kernel, dtype=np.float32)).contiguous()
    dz, dy, dx = d.shape
    for _ in range(n_iter):
        lib.density_iteration(d.data_ptr(), w.data_ptr(), live.data_ptr(), t1.data_ptr(), t2.data_ptr(), dz, dy, dx,
                              k.data_ptr(), (len(k) - 1) // 2, float(floor_frac), torch.get_num_threads())
    return True


def coarse_significant(cross: torch.Tensor, half_power: torch.Tensor, row_const: torch.Tensor, prior_t: torch.Tensor,
                       prior_r: torch.Tensor | None, fraction: float, cap: int):
    """Coarse log-posteriors and significant samples (see ``posterior.c``), or None when it cannot run.

    cross: (K, B, T, R) float32 Re Σ conj(w·C·X·S)·P, overwritten with the log-posteriors; half_power: (K, B, R)
    Σ w·C²|P|²/2; row_const: (B, K) −Σ w|X|²/2 + log class prior (−inf: class not allowed); prior_t: (B, T);
    prior_r: (B, R) or None. Returns (image index, flat sample index (k·T + t)·R + r, count per image, covered
    mass per image, max per image, log Σ exp(ll − max) per image), as :func:`spa3d.inference.search.significant_samples`.
    """
    lib = _load()
    tensors = [cross, half_power, row_const, prior_t] + ([prior_r] if prior_r is not None else [])
    if not lib or any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    k, b, t, r = cross.shape
    s = k * t * r
    cap = max(1, min(int(cap), s))
    # samples more than `cut` below an image's maximum hold < s·exp(−cut) ≤ 1e-12 of its posterior together
    cut = float(np.log(s) + 12 * np.log(10.0))
    row_max = torch.empty(b, dtype=torch.float32)
    log_z = torch.empty(b, dtype=torch.float64)
    sel = torch.empty((b, cap), dtype=torch.int64)
    sel_p = torch.empty((b, cap), dtype=torch.float32)
    count = torch.empty(b, dtype=torch.int64)
    covered = torch.empty(b, dtype=torch.float64)
    lib.coarse_significant(cross.data_ptr(), half_power.data_ptr(), row_const.data_ptr(), prior_t.data_ptr(),
                           prior_r.data_ptr() if prior_r is not None else None, k, b, t, r, float(fraction), cap, cut,
                           row_max.data_ptr(), log_z.data_ptr(), sel.data_ptr(), sel_p.data_ptr(), count.data_ptr(),
                           covered.data_ptr(), torch.get_num_threads())
    keep = torch.arange(cap)[None, :] < count[:, None]
    img = torch.arange(b)[:, None].expand(b, cap)[keep]
    return img, sel[keep], count, covered.to(torch.float32), row_max, log_z.to(torch.float32)


def project_half(cube_ri: torch.Tensor, h: int, rotations: torch.Tensor, kxy_pad: torch.Tensor) -> torch.Tensor | None:
    """Central slices (R, P) complex64 of a half-grid cube (2h+1, 2h+1, h+1, 2) at frequencies ``kxy_pad`` (P, 2).

    kxy_pad: (kx, ky) in padded voxels; rotations: (R, 3, 3). None when the compiled kernel cannot run.
    """
    lib = _load()
    if not lib or cube_ri.device.type != "cpu" or cube_ri.dtype != torch.float32 or not cube_ri.is_contiguous():
        return None
    rot = rotations.to(torch.float32).reshape(-1, 9).contiguous()
    k = kxy_pad.to(torch.float32).contiguous()
    out = torch.empty((rot.shape[0], k.shape[0], 2), dtype=torch.float32)
    lib.project_half(cube_ri.data_ptr(), int(h), rot.data_ptr(), rot.shape[0], k.data_ptr(), k.shape[0],
                     out.data_ptr(), torch.get_num_threads())
    return torch.view_as_complex(out)


def projection_simd(enable: bool | None = None) -> int:
    """Lanes per step of :func:`project_half` (16: its AVX-512 path, 1: the portable one; 0 without kernels).

    ``enable`` switches the AVX-512 path on (where the CPU has it) or off; both give the same floats. The
    environment variable ``SPA3D_NO_AVX512=1`` starts a process with it off.
    """
    lib = _load()
    if not lib:
        return 0
    return int(lib.projection_simd(-1 if enable is None else int(bool(enable))))


def sample_half(cube_ri: torch.Tensor, h: int, coords: torch.Tensor) -> torch.Tensor | None:
    """Trilinear values (M,) complex64 of a half-grid cube (as :func:`project_half`) at ``coords`` (M, 3: x, y, z)."""
    lib = _load()
    if not lib or cube_ri.device.type != "cpu" or cube_ri.dtype != torch.float32 or not cube_ri.is_contiguous():
        return None
    c = coords.to(torch.float32).reshape(-1, 3).contiguous()
    out = torch.empty((c.shape[0], 2), dtype=torch.float32)
    lib.sample_half(cube_ri.data_ptr(), int(h), c.data_ptr(), c.shape[0], out.data_ptr(), torch.get_num_threads())
    return torch.view_as_complex(out)


def _fine_args(x, phases, img, child_t, inv):
    ok = all(t.device.type == "cpu" for t in (x, phases, img, child_t, inv))
    if not _load() or not ok:
        return None
    xr = torch.view_as_real(x.to(torch.complex64).contiguous()).contiguous()
    pr = torch.view_as_real(phases.to(torch.complex64).contiguous()).contiguous()
    return xr, pr, img.to(torch.int64).contiguous(), child_t.to(torch.int64).contiguous(), inv.to(torch.int64).contiguous()


def fine_cross(x: torch.Tensor, phases: torch.Tensor, table: torch.Tensor, img: torch.Tensor, child_t: torch.Tensor,
               inv: torch.Tensor) -> torch.Tensor | None:
    """(S, 4, 8) Re Σ_p conj(x[img]·phases[child_t[:, j]])·table[inv[:, m]] (all complex (·, P)); None if not run."""
    args = _fine_args(x, phases, img, child_t, inv)
    if args is None or table.device.type != "cpu":
        return None
    xr, pr, im, ct, iv = args
    tr = torch.view_as_real(table.to(torch.complex64).contiguous()).contiguous()
    out = torch.empty((len(im), 4, 8), dtype=torch.float32)
    _LIB.fine_cross(xr.data_ptr(), pr.data_ptr(), tr.data_ptr(), im.data_ptr(), ct.data_ptr(), iv.data_ptr(), len(im),
                    x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def pair_power(a: torch.Tensor, table_power: torch.Tensor, img: torch.Tensor, inv: torch.Tensor) -> torch.Tensor | None:
    """(S, 8) Σ_p a[img[s], p]·table_power[inv[s, m], p] (real (·, P) arrays): each pair's power terms without
    the dense (B, U) product; None when the compiled kernel cannot run."""
    if not _load() or any(t.device.type != "cpu" for t in (a, table_power, img, inv)):
        return None
    a_ = a.to(torch.float32).contiguous()
    tp = table_power.to(torch.float32).contiguous()
    im, iv = img.to(torch.int64).contiguous(), inv.to(torch.int64).contiguous()
    out = torch.empty((len(im), 8), dtype=torch.float32)
    _LIB.pair_power(a_.data_ptr(), tp.data_ptr(), im.data_ptr(), iv.data_ptr(), len(im), a_.shape[1], out.data_ptr(),
                    torch.get_num_threads())
    return out


def fine_weights(c2: torch.Tensor, post: torch.Tensor, img: torch.Tensor, inv: torch.Tensor,
                 n_rows: int) -> torch.Tensor | None:
    """(U, P) float32 sums acc[inv[s, m]] += (Σ_j post[s, j, m])·c2[img[s]] (c2 real (B, P), post (S, 4, 8)): each
    table row's M-step weight from its pairs alone; None if not run."""
    if not _load() or any(t.device.type != "cpu" for t in (c2, post, img, inv)):
        return None
    c = c2.to(torch.float32).contiguous()
    p = post.to(torch.float32).contiguous()
    im, iv = img.to(torch.int64).contiguous(), inv.to(torch.int64).contiguous()
    acc = torch.zeros((n_rows, c.shape[1]), dtype=torch.float32)
    _LIB.fine_weights(c.data_ptr(), p.data_ptr(), im.data_ptr(), iv.data_ptr(), len(im), c.shape[1], acc.data_ptr(),
                      torch.get_num_threads())
    return acc


def residual_terms(data: torch.Tensor, projections: torch.Tensor, weight: torch.Tensor):
    """(t1, t2) float64 (P,): Σ_u Re data·conj(projections) and Σ_u weight·|projections|² over the rows of (U, P)
    complex data and projections and real weight (``likelihood.residual_power_terms``); None if not run."""
    if not _load() or any(t.device.type != "cpu" for t in (data, projections, weight)):
        return None
    d = torch.view_as_real(data.to(torch.complex64).contiguous()).contiguous()
    q = torch.view_as_real(projections.to(torch.complex64).contiguous()).contiguous()
    w = weight.to(torch.float32).contiguous()
    n_u, n_pix = w.shape
    t1 = torch.empty(n_pix, dtype=torch.float64)
    t2 = torch.empty(n_pix, dtype=torch.float64)
    _LIB.residual_terms(d.data_ptr(), q.data_ptr(), w.data_ptr(), n_u, n_pix, t1.data_ptr(), t2.data_ptr(),
                        torch.get_num_threads())
    return t1, t2


def fine_accumulate(x: torch.Tensor, phases: torch.Tensor, post: torch.Tensor, img: torch.Tensor,
                    child_t: torch.Tensor, inv: torch.Tensor, n_rows: int) -> torch.Tensor | None:
    """(U, P) complex64 sums acc[inv[s, m]] += Σ_j post[s, j, m]·x[img[s]]·phases[child_t[s, j]]; None if not run."""
    args = _fine_args(x, phases, img, child_t, inv)
    if args is None or post.device.type != "cpu":
        return None
    xr, pr, im, ct, iv = args
    p = post.to(torch.float32).contiguous()
    acc = torch.zeros((n_rows, x.shape[1], 2), dtype=torch.float32)
    _LIB.fine_accumulate(xr.data_ptr(), pr.data_ptr(), p.data_ptr(), im.data_ptr(), ct.data_ptr(), iv.data_ptr(),
                         len(im), x.shape[1], acc.data_ptr(), torch.get_num_threads())
    return torch.view_as_complex(acc)


def backproject_half(acc: torch.Tensor, h: int, rotations: torch.Tensor, kxy_pad: torch.Tensor, values: torch.Tensor,
                     weights: torch.Tensor) -> bool:
    """Insert slices ``values`` (R, P) complex with ``weights`` (R, P) into ``acc`` (2h+1, 2h+1, h+1, 3).

    kxy_pad: (P, 2) frequencies in padded voxels. Returns False (``acc`` untouched) when the kernel cannot run.
    """
    lib = _load()
    if not lib or acc.device.type != "cpu" or acc.dtype != torch.float32 or not acc.is_contiguous():
        return False
    rot = rotations.to(torch.float32).reshape(-1, 9).contiguous()
    k = kxy_pad.to(torch.float32).contiguous()
    v = torch.view_as_real(values.to(torch.complex64).contiguous()).contiguous()
    w = weights.to(torch.float32).contiguous()
    lib.backproject_half(acc.data_ptr(), int(h), rot.data_ptr(), rot.shape[0], k.data_ptr(), k.shape[0], v.data_ptr(),
                         w.data_ptr(), torch.get_num_threads())
    return True
