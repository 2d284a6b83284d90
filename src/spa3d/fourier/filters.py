"""Filters, masks and Fourier shell correlation.

Resolutions are in Å; shells are in cycles per box (shell i ↔ n·pixel/i Å).
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def _radius_grid(shape, device=None, rfft: bool = True) -> torch.Tensor:
    """Frequency radius (cycles per box) of every voxel of a (r)fftn layout."""
    n = shape[-1]
    axes = [torch.fft.fftfreq(s, d=1.0 / s, device=device, dtype=torch.float64) for s in shape[:-1]]
    axes.append((torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(n, d=1.0 / n, device=device, dtype=torch.float64))
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g**2 for g in grids))


def fsc(map1, map2) -> np.ndarray:
    """Fourier shell correlation of two maps (n, n, n), shells 0 .. n//2."""
    a = torch.fft.rfftn(torch.as_tensor(np.asarray(map1), dtype=torch.float64))
    b = torch.fft.rfftn(torch.as_tensor(np.asarray(map2), dtype=torch.float64))
    n = a.shape[0]
    shell = torch.round(_radius_grid(a.shape[:-1] + (n,))).long().view(-1)
    nsh = n // 2 + 1
    keep = shell < nsh
    shell = shell[keep]

    def ssum(x):
        return torch.zeros(nsh, dtype=torch.float64).index_add_(0, shell, x.reshape(-1)[keep])

    num = ssum((a * b.conj()).real)
    den = torch.sqrt(ssum(a.abs() ** 2) * ssum(b.abs() ** 2))
    return (num / den.clamp_min(1e-30)).numpy()


def resolution_at(curve: np.ndarray, n: int, pixel_size: float, threshold: float) -> float:
    """Resolution (Å) where an FSC curve first falls below ``threshold``.

    Interpolates linearly between shells; returns the Nyquist resolution
    (2·pixel) when the curve never falls below.
    """
    curve = np.asarray(curve)
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            c0, c1 = curve[i - 1], curve[i]
            f = (c0 - threshold) / (c0 - c1) if c0 != c1 else 0.0
            shell = (i - 1) + f
            return float(n * pixel_size / max(shell, 1e-6))
    return float(2 * pixel_size)


def lowpass(vol, pixel_size: float, resolution: float, edge_shells: float = 2.0) -> np.ndarray:
    """Low-pass a map (n, n, n) to ``resolution`` Å with a raised-cosine edge."""
    v = torch.as_tensor(np.asarray(vol), dtype=torch.float64)
    n = v.shape[-1]
    r = _radius_grid(v.shape)
    cut = n * pixel_size / resolution
    w = torch.clamp((cut + edge_shells / 2 - r) / edge_shells, 0, 1)
    w = 0.5 - 0.5 * torch.cos(torch.pi * w)
    return torch.fft.irfftn(torch.fft.rfftn(v) * w, s=v.shape).to(torch.float32).numpy()


def lowpass_shells(vol, pixel_size: float, resolution: float, edge_width: int = 2) -> np.ndarray:
    """Low-pass a map to ``resolution`` Å as RELION's lowPassFilterMap (fftw.cpp) does.

    The filter's shell is rounded, round(n·pixel/resolution); a raised cosine
    falls from 1 at ``edge_width``/2 shells below it to 0 as many above.
    (:func:`lowpass` centres its edge on the unrounded shell instead.)
    """
    v = torch.as_tensor(np.asarray(vol), dtype=torch.float64)
    n = v.shape[-1]
    r = _radius_grid(v.shape) / n  # cycles per pixel
    ires = round(n * pixel_size / resolution)
    half = edge_width // 2
    lo, hi = max(0.0, (ires - half) / n), (ires + half) / n
    w = torch.where(r < lo, torch.ones_like(r), torch.where(r > hi, torch.zeros_like(r),
                    0.5 + 0.5 * torch.cos(torch.pi * (r - lo) / max(hi - lo, 1e-12))))
    return torch.fft.irfftn(torch.fft.rfftn(v) * w, s=v.shape).to(torch.float32).numpy()


def soft_sphere(n: int, radius: float, edge: float = 5.0, ndim: int = 3) -> np.ndarray:
    """Soft spherical (ndim=3) or circular (ndim=2) mask, radius and cosine edge in pixels (a new array)."""
    return _soft_sphere(int(n), float(radius), float(edge), int(ndim)).copy()


@functools.lru_cache(maxsize=16)
def _soft_sphere(n: int, radius: float, edge: float, ndim: int) -> np.ndarray:
    """soft_sphere's masks, kept: the M-step asks for the same box-n mask at every reconstruction (computing
    one took 70 ms at box 128, most of an M-step's time on a GPU)."""
    c = (np.arange(n) - n // 2).astype(np.float32) ** 2  # squared radii are integers: exact in float32
    r2 = c
    for axis in range(1, ndim):
        r2 = r2[..., None] + c.reshape((1,) * axis + (n,))
    r = np.sqrt(r2, out=r2)
    out = ((r <= radius) if edge > 0 else (r < radius)).astype(np.float32)
    # the cosine only on the edge's voxels (a box-256 mask in 0.1 s instead of 1.4 s)
    on_edge = (r > radius) & (r < radius + edge)
    m = (radius + edge - r[on_edge].astype(np.float64)) / max(edge, 1e-6)
    out[on_edge] = 0.5 - 0.5 * np.cos(np.pi * m)
    return out


def power_spectrum(vol) -> np.ndarray:
    """Mean |F|² per shell (0 .. n//2) of a map's unnormalised rfftn."""
    f = torch.fft.rfftn(torch.as_tensor(np.asarray(vol), dtype=torch.float64))
    n = f.shape[0]
    shell = torch.round(_radius_grid(f.shape[:-1] + (n,))).long().view(-1)
    nsh = n // 2 + 1
    keep = shell < nsh
    s = torch.zeros(nsh, dtype=torch.float64).index_add_(0, shell[keep], (f.abs() ** 2).reshape(-1)[keep])
    c = torch.zeros(nsh, dtype=torch.float64).index_add_(0, shell[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    return (s / c.clamp_min(1)).numpy()


def relion_power(power: np.ndarray, n: int) -> np.ndarray:
    """A power per Fourier pixel of an n × n image, from spa3d's units (E|F|² of the unnormalised FFT) to
    RELION's model.star units: RELION's forward FFT divides by n², and its σ² is the variance of each of a
    complex pixel's two components, so σ²_RELION = E|F|² / (2 n⁴)."""
    return np.asarray(power, dtype=np.float64) / (2.0 * float(n) ** 4)
