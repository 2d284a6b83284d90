"""Central-slice projection of a 3D map in Fourier space.

The map is gridding-corrected (divided by the radial sinc² of the trilinear
interpolator), zero-padded by ``pad`` (2, as RELION), Fourier transformed
(real FFT: only kx ≥ 0 is kept, as RELION does) and cropped to the sphere of
the largest frequency used. A projection with rotation A (RELION Euler
matrix) is the half-plane (kx, ky) slice read at ``A.T @ (kx, ky, 0)`` by
trilinear interpolation, from the Friedel mate (−k, conjugate) where that
frequency has kx < 0; frequencies beyond ``r_max`` (cycles per box) are zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from spa3d.fourier.grid import half_plane_freqs
from spa3d.kernels import have_compiled_kernels, project_half, sample_half


def cube_halfwidth(n: int, pad: int, r_max: float) -> int:
    """Half-width h (padded voxels) of the cropped Fourier cube of size 2h+1.

    Every trilinear neighbour of a frequency with |k| <= r_max lies inside.
    """
    return int(math.ceil(r_max * pad) + 2)


def half_to_rfft_layout(half: torch.Tensor, npad: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """A centred half grid (D, D, h+1; index [z + h, y + h, x]) as an rfftn array (npad, npad, npad//2+1).

    z and y go to FFT order; frequencies beyond the padded box (|k| > npad/2, and +npad/2) are dropped.
    ``half`` is complex, or real (D, D, h+1, 2: real, imaginary); ``scale`` (D, D, h+1, real) multiplies it on
    the way (block by block: no full-size temporary).
    """
    h = (half.shape[0] - 1) // 2
    split = not torch.is_complex(half)
    dtype = (torch.complex64 if half.dtype == torch.float32 else torch.complex128) if split else half.dtype
    out = torch.zeros((npad, npad, npad // 2 + 1), dtype=dtype, device=half.device)
    target = torch.view_as_real(out) if split else out
    lo, hi = min(h, npad // 2), min(h, npad // 2 - 1)  # kept: -lo .. hi
    nx = min(half.shape[2], npad // 2 + 1)
    for zs, zd in ((slice(h, h + hi + 1), slice(0, hi + 1)), (slice(h - lo, h), slice(npad - lo, npad))):
        for ys, yd in ((slice(h, h + hi + 1), slice(0, hi + 1)), (slice(h - lo, h), slice(npad - lo, npad))):
            block = half[zs, ys, :nx]
            if scale is not None:
                f = scale[zs, ys, :nx]
                block = block * (f[..., None] if split else f)
            target[zd, yd, :nx] = block
    return out


def rfft_to_half_layout(ft: torch.Tensor, h: int) -> torch.Tensor:
    """The inverse of :func:`half_to_rfft_layout`: an rfftn array (N, N, N//2+1) as a centred half grid (2h+1, 2h+1, h+1).

    Frequencies the transform does not hold (|k| > N/2, +N/2 on every axis) are zero.
    """
    npad = ft.shape[0]
    out = torch.zeros((2 * h + 1, 2 * h + 1, h + 1), dtype=ft.dtype, device=ft.device)
    lo, hi = min(h, npad // 2), min(h, npad // 2 - 1)
    nx = min(h + 1, npad // 2)
    for zd, zs in ((slice(h, h + hi + 1), slice(0, hi + 1)), (slice(h - lo, h), slice(npad - lo, npad))):
        for yd, ys in ((slice(h, h + hi + 1), slice(0, hi + 1)), (slice(h - lo, h), slice(npad - lo, npad))):
            out[zd, yd, :nx] = ft[zs, ys, :nx]
    return out


def gridding_correct(vol: torch.Tensor, pad: int) -> torch.Tensor:
    """Divide a map (n, n, n) by sinc²(r / (pad·n)) (trilinear interpolator's transform)."""
    n = vol.shape[-1]
    # in the map's precision (float64 maps in float64; the factor lies in [0.4, 1], so float32 keeps 1e-7)
    dt = torch.float64 if vol.dtype == torch.float64 else torch.float32
    c = (torch.arange(n, device=vol.device, dtype=dt) - n // 2) ** 2
    x = torch.pi / (pad * n) * torch.sqrt(c[:, None, None] + c[None, :, None] + c[None, None, :])
    sinc = torch.where(x > 0, torch.sin(x) / x.clamp_min(1e-12), torch.ones_like(x))
    return (vol.to(dt) / sinc.square_()).to(vol.dtype)


def slice_coordinates(rotations: torch.Tensor, n: int, pad: int, r_max: float):
    """3D frequencies (B, n, n//2+1, 3) = pad·A.T @ (kx, ky, 0) in padded voxels, and the r ≤ r_max mask."""
    kx, ky = half_plane_freqs(n, device=rotations.device, dtype=rotations.dtype)
    mask = kx**2 + ky**2 <= r_max**2
    # A.T @ (kx, ky, 0) = kx * A[0, :] + ky * A[1, :]
    coords = kx[None, :, :, None] * rotations[:, None, None, 0, :] + ky[None, :, :, None] * rotations[:, None, None, 1, :]
    return coords * pad, mask


class Projector:
    """Fourier-space projector of one 3D map.

    Parameters
    ----------
    volume : (n, n, n) real map, centre at n//2, (z, y, x) order.
    pad : padding factor (2 as RELION).
    r_max : largest frequency projected, cycles per box (default n/2, Nyquist).
    """

    def __init__(self, volume, pad: int = 2, r_max: float | None = None, device=None, dtype=torch.float32):
        vol = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume, device=device)
        n = vol.shape[-1]
        self.n, self.pad = n, pad
        self.r_max = float(n // 2 if r_max is None else min(r_max, n // 2))
        self.device = vol.device
        self.dtype = dtype
        npad = pad * n
        # the padded map in FFT order (centre at index 0), then its real FFT
        padded = torch.zeros((npad,) * 3, dtype=torch.float32, device=vol.device)
        corrected = gridding_correct(vol.to(torch.float64), pad).to(torch.float32)
        dst = (torch.arange(n, device=vol.device) - n // 2) % npad
        padded[dst[:, None, None], dst[None, :, None], dst[None, None, :]] = corrected
        del corrected
        ft = torch.fft.rfftn(padded)
        del padded
        h = cube_halfwidth(n, pad, self.r_max)
        half = rfft_to_half_layout(ft, h)
        del ft
        self.h = h
        self._cube = self._cube_ri = None
        if have_compiled_kernels() and half.device.type == "cpu" and dtype == torch.float32:
            # the compiled kernel's input: (D, D, h+1, 2) interleaved (real, imag)
            self._cube_ri = torch.view_as_real(half.to(torch.complex64)).contiguous()
        else:
            # grid_sample input: (1, 2, D, D, h+1) with channels (real, imag); x = 0 .. h along the last axis
            self._cube = torch.stack([half.real, half.imag]).to(dtype)[None].contiguous()

    def _sample(self, coords: torch.Tensor) -> torch.Tensor:
        """Trilinear values (complex) at padded frequencies ``coords`` (..., 3: x, y, z), Friedel mates for x < 0."""
        if self._cube is None:  # the compiled kernel
            vals = sample_half(self._cube_ri, self.h, coords)
            return vals.reshape(coords.shape[:-1]).to(torch.complex64 if self.dtype == torch.float32 else torch.complex128)
        sign = torch.where(coords[..., 0] < 0, -1.0, 1.0).to(coords.dtype)
        scale = torch.tensor([2.0 / self.h, 1.0 / self.h, 1.0 / self.h], device=self.device, dtype=coords.dtype)
        shift = torch.tensor([-1.0, 0.0, 0.0], device=self.device, dtype=coords.dtype)
        grid = coords * sign[..., None] * scale + shift
        shape = grid.shape[:-1]
        grid = grid.reshape(1, 1, 1, -1, 3)
        vals = F.grid_sample(self._cube, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return torch.complex(vals[0, 0, 0, 0].reshape(shape), vals[0, 1, 0, 0].reshape(shape) * sign)

    def project_pixels(self, rotations: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
        """Projections (R, P) at the half-plane frequencies (kx, ky) (cycles per box) only."""
        rot = torch.as_tensor(rotations, device=self.device, dtype=self.dtype)
        k = torch.stack([kx, ky], dim=1).to(self.device, self.dtype) * self.pad  # (P, 2)
        if self._cube is None:
            return project_half(self._cube_ri, self.h, rot, k)
        coords = torch.matmul(k, rot[:, :2, :])  # (R, P, 3) = pad * A.T @ (kx, ky, 0)
        return self._sample(coords)

    def project(self, rotations: torch.Tensor, r_max: float | None = None) -> torch.Tensor:
        """Half-plane FTs (B, n, n//2+1) of the projections for rotations (B, 3, 3)."""
        r_max = self.r_max if r_max is None else min(r_max, self.r_max)
        rot = torch.as_tensor(rotations, device=self.device, dtype=self.dtype)
        coords, mask = slice_coordinates(rot, self.n, self.pad, r_max)
        return self._sample(coords) * mask
