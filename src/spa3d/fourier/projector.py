"""Central-slice projection of a 3D map in Fourier space.

The map is gridding-corrected (divided by the radial sinc² of the trilinear
interpolator), zero-padded by ``pad`` (2, as RELION), Fourier transformed and
cropped to the sphere of the largest frequency used. A projection with
rotation A (RELION Euler matrix) is the half-plane (kx, ky) slice read at
``A.T @ (kx, ky, 0)`` by trilinear interpolation; frequencies beyond
``r_max`` (cycles per box) are zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from spa3d.fourier.grid import fftn_centered, half_plane_freqs


def cube_halfwidth(n: int, pad: int, r_max: float) -> int:
    """Half-width h (padded voxels) of the cropped Fourier cube of size 2h+1.

    Every trilinear neighbour of a frequency with |k| <= r_max lies inside.
    """
    return int(math.ceil(r_max * pad) + 2)


def recentre(x: torch.Tensor, size: int) -> torch.Tensor:
    """Crop or zero-pad a centred cube (centre at len//2) to ``size`` per axis (centre at size//2)."""
    n = x.shape[0]
    out = torch.zeros((size,) * 3 + tuple(x.shape[3:]), dtype=x.dtype, device=x.device)
    lo = min(n // 2, size // 2)  # voxels kept below the centre
    hi = min(n - n // 2, size - size // 2)  # at and above the centre
    a, b = n // 2 - lo, n // 2 + hi
    c, d = size // 2 - lo, size // 2 + hi
    out[c:d, c:d, c:d] = x[a:b, a:b, a:b]
    return out


def gridding_correct(vol: torch.Tensor, pad: int) -> torch.Tensor:
    """Divide a map (n, n, n) by sinc²(r / (pad·n)) (trilinear interpolator's transform)."""
    n = vol.shape[-1]
    c = torch.arange(n, device=vol.device, dtype=torch.float64) - n // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) / (pad * n)
    sinc = torch.where(r > 0, torch.sin(torch.pi * r) / (torch.pi * r).clamp_min(1e-12), torch.ones_like(r))
    return (vol.to(torch.float64) / sinc**2).to(vol.dtype)


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
        vol = vol.to(torch.float64)
        n = vol.shape[-1]
        self.n, self.pad = n, pad
        self.r_max = float(n // 2 if r_max is None else min(r_max, n // 2))
        self.device = vol.device
        self.dtype = dtype
        npad = pad * n
        padded = torch.zeros((npad,) * 3, dtype=torch.float64, device=vol.device)
        lo = npad // 2 - n // 2
        padded[lo : lo + n, lo : lo + n, lo : lo + n] = gridding_correct(vol, pad)
        ft = fftn_centered(padded)
        h = cube_halfwidth(n, pad, self.r_max)
        ft = recentre(ft, 2 * h + 1)
        self.h = h
        # grid_sample input: (1, 2, D, H, W) with channels (real, imag)
        self._cube = torch.stack([ft.real, ft.imag]).to(dtype)[None].contiguous()

    def project_pixels(self, rotations: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
        """Projections (R, P) at the half-plane frequencies (kx, ky) (cycles per box) only."""
        rot = torch.as_tensor(rotations, device=self.device, dtype=self.dtype)
        k = torch.stack([kx, ky], dim=1).to(self.device, self.dtype) * self.pad  # (P, 2)
        coords = torch.matmul(k, rot[:, :2, :])  # (R, P, 3) = pad * A.T @ (kx, ky, 0)
        grid = (coords / self.h)[None, None]  # (1, 1, R, P, 3)
        vals = F.grid_sample(self._cube, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return torch.complex(vals[0, 0, 0], vals[0, 1, 0])

    def project(self, rotations: torch.Tensor, r_max: float | None = None) -> torch.Tensor:
        """Half-plane FTs (B, n, n//2+1) of the projections for rotations (B, 3, 3)."""
        r_max = self.r_max if r_max is None else min(r_max, self.r_max)
        rot = torch.as_tensor(rotations, device=self.device, dtype=self.dtype)
        coords, mask = slice_coordinates(rot, self.n, self.pad, r_max)
        grid = (coords / self.h)[None]  # (1, B, n, n//2+1, 3): (x, y, z) -> (W, H, D)
        vals = F.grid_sample(self._cube, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out = torch.complex(vals[0, 0], vals[0, 1])
        return out * mask
