"""Atomic models (PDB / mmCIF via ``gemmi``) and their simulated density.

The density is a sum of Gaussians, one per atom, weighted by its atomic
number (a simple stand-in for electron scattering), blurred to the requested
resolution, in a cubic box centred on the model's centre of mass.
"""

from __future__ import annotations

import os

import gemmi
import numpy as np

from spa3d.errors import InputError


def read_atoms(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (n, 3) in Å (x, y, z) and atomic numbers of a model's first model.

    Waters and hydrogens are left out.
    """
    path = str(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    try:
        st = gemmi.read_structure(path)
    except Exception as exc:
        raise InputError(path, f"not a readable PDB/mmCIF file ({exc})") from None
    st.remove_hydrogens()
    st.remove_waters()
    if len(st) == 0:
        raise InputError(path, "structure has no models")
    xyz, z = [], []
    for chain in st[0]:
        for res in chain:
            for atom in res:
                xyz.append(atom.pos.tolist())
                z.append(atom.element.atomic_number)
    if not xyz:
        raise InputError(path, "structure has no atoms")
    return np.asarray(xyz, dtype=np.float64), np.asarray(z, dtype=np.float64)


def density_from_atoms(xyz: np.ndarray, weights: np.ndarray, box: int, pixel_size: float,
                       resolution: float | None = None, center: np.ndarray | None = None) -> np.ndarray:
    """Map (box, box, box) in (z, y, x) order of atoms at ``xyz`` Å.

    Atoms are placed relative to ``center`` (default: their weighted centre of
    mass) at the box centre (index box//2), spread trilinearly, then blurred
    with a Gaussian whose FWHM-like width matches ``resolution`` Å (default
    2 pixels).
    """
    if center is None:
        center = (xyz * weights[:, None]).sum(0) / weights.sum()
    pos = (xyz - center) / pixel_size + box // 2  # (x, y, z) in pixels
    vol = np.zeros((box, box, box), dtype=np.float64)
    base = np.floor(pos).astype(np.int64)
    frac = pos - base
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                ix, iy, iz = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                w = (frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1]) * (
                    frac[:, 2] if dz else 1 - frac[:, 2])
                ok = (ix >= 0) & (ix < box) & (iy >= 0) & (iy < box) & (iz >= 0) & (iz < box)
                np.add.at(vol, (iz[ok], iy[ok], ix[ok]), weights[ok] * w[ok])
    res = resolution if resolution else 2.0 * pixel_size
    # Gaussian with exp(-2 pi^2 sigma^2 k^2) = 1/e at k = 1/res  ->  sigma = res / (pi * sqrt(2))
    sigma = res / (np.pi * np.sqrt(2.0))
    k = np.fft.fftfreq(box, d=pixel_size)
    kr = np.fft.rfftfreq(box, d=pixel_size)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2
    g = np.exp(-2 * np.pi**2 * sigma**2 * k2)
    vol = np.fft.irfftn(np.fft.rfftn(vol) * g, s=vol.shape, axes=(0, 1, 2))
    return vol.astype(np.float32)


def model_density(path: str | os.PathLike, box: int, pixel_size: float, resolution: float | None = None) -> np.ndarray:
    """Simulated density map of an atomic model file (see :func:`density_from_atoms`)."""
    xyz, z = read_atoms(path)
    return density_from_atoms(xyz, z, box, pixel_size, resolution)
