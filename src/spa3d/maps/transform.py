"""Rotate, shift, resample and symmetrise 3D maps (real space, trilinear or Fourier).

Maps are (z, y, x) arrays centred at index n//2. ``rotate_map(vol, R)``
returns the map whose value at x (pixels from the centre, as (x, y, z)) is
``vol(R @ x)``: the density is turned by Rᵀ.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spa3d.geometry.symmetry import symmetry_matrices


def _centred_points(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    c = torch.arange(n, device=device, dtype=dtype) - n // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)  # (n, n, n, 3) as (x, y, z)


def rotate_maps(vol, rotations: np.ndarray) -> torch.Tensor:
    """Maps ``vol(R @ x)`` for each R of ``rotations`` (G, 3, 3): tensor (G, n, n, n), trilinear, zero outside."""
    v = torch.as_tensor(np.asarray(vol, dtype=np.float32))
    n = v.shape[-1]
    pts = _centred_points(n)
    rots = torch.as_tensor(np.asarray(rotations), dtype=torch.float32)
    src = torch.einsum("zyxj,gij->gzyxi", pts, rots) + n // 2  # index coordinates (x, y, z)
    grid = src / (n - 1) * 2 - 1
    out = F.grid_sample(v[None, None].expand(len(rots), 1, n, n, n), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out[:, 0]


def rotate_map(vol, rotation: np.ndarray) -> np.ndarray:
    """The map ``vol(R @ x)`` (see module docstring), float32 numpy."""
    return rotate_maps(vol, np.asarray(rotation)[None])[0].numpy()


def symmetrize(vol, symmetry: str) -> np.ndarray:
    """Average of a map over the rotations of point group ``symmetry`` (what relion_image_handler --sym does)."""
    ops = symmetry_matrices(symmetry)
    out = torch.zeros(np.asarray(vol).shape, dtype=torch.float32)
    for s in range(0, len(ops), 12):
        out += rotate_maps(vol, ops[s:s + 12]).sum(0)
    return (out / len(ops)).numpy()


def shift_map(vol, shift_xyz) -> np.ndarray:
    """Shift a map by (x, y, z) pixels (Fourier phase shift, periodic)."""
    v = np.asarray(vol, dtype=np.float64)
    n = v.shape
    kz = np.fft.fftfreq(n[0])[:, None, None]
    ky = np.fft.fftfreq(n[1])[None, :, None]
    kx = np.fft.rfftfreq(n[2])[None, None, :]
    sx, sy, sz = shift_xyz
    phase = np.exp(-2j * np.pi * (kx * sx + ky * sy + kz * sz))
    return np.fft.irfftn(np.fft.rfftn(v) * phase, s=n, axes=(0, 1, 2)).astype(np.float32)


def centre_of_mass(vol) -> np.ndarray:
    """Centre of mass (x, y, z) in pixels from the box centre, of the positive density."""
    v = np.clip(np.asarray(vol, dtype=np.float64), 0, None)
    n = v.shape[0]
    c = np.arange(n) - n // 2
    total = v.sum()
    if total <= 0:
        return np.zeros(3)
    return np.array([(v.sum((0, 1)) * c).sum(), (v.sum((0, 2)) * c).sum(), (v.sum((1, 2)) * c).sum()]) / total


def fourier_resample(vol, new_size: int) -> np.ndarray:
    """Crop (or pad) a map's Fourier transform to ``new_size`` voxels per axis; the pixel grows by n/new_size."""
    v = torch.as_tensor(np.asarray(vol, dtype=np.float64))
    n = v.shape[0]
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(v)))  # torch's transforms: all cores (numpy's: one)
    del v
    out = torch.zeros((new_size,) * 3, dtype=ft.dtype)
    m = min(n, new_size)
    a, b = n // 2 - m // 2, new_size // 2 - m // 2
    out[b:b + m, b:b + m, b:b + m] = ft[a:a + m, a:a + m, a:a + m]
    del ft
    res = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(out))).real * (new_size / n) ** 3
    return res.numpy().astype(np.float32)


def window(vol, new_box: int) -> np.ndarray:
    """The map cut or zero-padded to ``new_box`` voxels per axis about the box centre (voxel n//2 stays the centre)."""
    v = np.asarray(vol, dtype=np.float32)
    n = v.shape[0]
    out = np.zeros((new_box,) * 3, dtype=np.float32)
    m = min(n, new_box)
    a, b = n // 2 - m // 2, new_box // 2 - m // 2
    out[b:b + m, b:b + m, b:b + m] = v[a:a + m, a:a + m, a:a + m]
    return out


def rescale_map(vol, pixel_size: float, new_pixel_size: float, new_box: int) -> tuple[np.ndarray, float]:
    """A map at another pixel size and box, as ``relion_image_handler --angpix --rescale_angpix --new_box``.

    The map is resampled in Fourier space to round(n·pixel/new_pixel) voxels,
    made even (so the pixel becomes n·pixel over that, within a few percent of
    ``new_pixel_size``, as RELION's), then cut or padded to ``new_box``. Returns (map, pixel size in Å).
    """
    n = np.asarray(vol).shape[0]
    m = int(round(n * pixel_size / new_pixel_size))
    m -= m % 2  # even, as relion_image_handler makes it
    v = fourier_resample(vol, m) if m != n else np.asarray(vol, dtype=np.float32)
    return window(v, new_box), n * pixel_size / m
