"""Orientation (HEALPix) and translation sampling, as RELION samples them.

HEALPix order N has Nside = 2**N and 12·4**N directions (rot, tilt); the
in-plane angle psi is sampled with the same step, 360°/(6·2**N). The GUI's
"angular sampling" is the fine step after one level of oversampling: 15° is
order 1 (coarse 30°, 4,608 fine orientations) and 7.5° is order 2.

Translations are all grid points (step in pixels) inside the circle of radius
``offset_range`` pixels: range 6, step 2 gives 29 points.
"""

from __future__ import annotations

import healpy
import numpy as np

from spa3d.geometry.euler import euler_to_matrix, matrix_to_euler
from spa3d.geometry.symmetry import symmetry_matrices

def healpix_order_for_sampling(sampling_deg: float) -> int:
    """HEALPix order for the GUI's angular sampling in degrees (15° -> 1, 7.5° -> 2).

    The GUI's value is the fine step after one level of oversampling, so the
    coarse order's step 60°/2**N is twice ``sampling_deg``.
    """
    return int(max(0, round(np.log2(60.0 / float(sampling_deg))) - 1))


def angular_step(order: int) -> float:
    """Angular step in degrees of HEALPix order ``order``."""
    return 360.0 / (6 * 2**order)


def healpix_directions(order: int) -> tuple[np.ndarray, np.ndarray]:
    """(rot, tilt) in degrees of the 12·4**order HEALPix pixel centres (NESTED)."""
    nside = 2**order
    theta, phi = healpy.pix2ang(nside, np.arange(healpy.nside2npix(nside)), nest=True)
    return np.rad2deg(phi), np.rad2deg(theta)


def psi_angles(order: int) -> np.ndarray:
    """In-plane angles in degrees, step 360°/(6·2**order), starting at 0."""
    n = 6 * 2**order
    return np.arange(n) * (360.0 / n)


def _reduce_directions(rot: np.ndarray, tilt: np.ndarray, symmetry: str, order: int) -> np.ndarray:
    """Indices of directions that form one asymmetric unit of ``symmetry``.

    Greedy: walk the directions in order and drop one whose symmetry-related
    copy lies within half a step of a direction already kept. Works for every
    point group without special cases; keeps about 1/|G| of the directions.
    """
    ops = symmetry_matrices(symmetry)
    if len(ops) == 1:
        return np.arange(len(rot))
    # viewing direction of a (rot, tilt, 0) rotation: the third row of A
    mats = euler_to_matrix(rot, tilt, np.zeros_like(rot))
    dirs = mats[:, 2, :]
    # a map symmetric under R gives the same projection for A and A @ R
    sym_dirs = np.einsum("nj,gjk->gnk", dirs, ops)  # (G, n, 3)
    cos_tol = np.cos(np.deg2rad(0.5 * angular_step(order)))
    kept: list[int] = []
    kept_dirs = np.zeros((0, 3))
    for i in range(len(rot)):
        if len(kept):
            # copies g>0 of direction i against the kept directions
            dots = sym_dirs[1:, i, :] @ kept_dirs.T
            if np.any(dots > cos_tol):
                continue
        kept.append(i)
        kept_dirs = np.vstack([kept_dirs, dirs[i]])
    return np.asarray(kept)


def orientation_grid(order: int, symmetry: str = "C1") -> np.ndarray:
    """Euler angles (n, 3) in degrees (rot, tilt, psi) of HEALPix order ``order``.

    With a symmetry other than C1, directions equivalent under the group are
    excluded (one asymmetric unit of directions is kept, as RELION does).
    """
    rot, tilt = healpix_directions(order)
    keep = _reduce_directions(rot, tilt, symmetry, order)
    rot, tilt = rot[keep], tilt[keep]
    psi = psi_angles(order)
    r = np.repeat(rot, len(psi))
    t = np.repeat(tilt, len(psi))
    p = np.tile(psi, len(rot))
    return np.stack([r, t, p], axis=1)


def translation_grid(offset_range: float, offset_step: float) -> np.ndarray:
    """Translations (n, 2) in pixels (x, y): grid of ``offset_step`` inside radius ``offset_range``."""
    if offset_step <= 0 or offset_range <= 0:
        return np.zeros((1, 2))
    m = int(np.floor(offset_range / offset_step + 1e-6))
    g = np.arange(-m, m + 1) * float(offset_step)
    x, y = np.meshgrid(g, g, indexing="xy")
    keep = x**2 + y**2 <= offset_range**2 + 1e-6
    return np.stack([x[keep], y[keep]], axis=1)


def canonical_euler(angles: np.ndarray) -> np.ndarray:
    """Round-trip Euler angles (n, 3) through matrices: tilt in [0, 180]."""
    r, t, p = matrix_to_euler(euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]))
    return np.stack([r, t, p], axis=1)


def oversampled_orientations(order: int, symmetry: str = "C1") -> tuple[np.ndarray, np.ndarray]:
    """Coarse orientations (Rc, 3) of HEALPix ``order`` and their 8 children each (Rc·8, 3), Euler degrees.

    One level of oversampling as RELION's adaptive oversampling: the children
    of coarse sample c (direction d, in-plane angle ψ) are the 4 NESTED
    sub-pixels 4d..4d+3 of order ``order + 1`` times ψ ± step/4. Child j of
    coarse sample c is row ``8·c + j``.
    """
    rot, tilt = healpix_directions(order)
    keep = _reduce_directions(rot, tilt, symmetry, order)
    psi = psi_angles(order)
    step = 360.0 / len(psi)
    coarse = np.stack([np.repeat(rot[keep], len(psi)), np.repeat(tilt[keep], len(psi)),
                       np.tile(psi, len(keep))], axis=1)
    frot, ftilt = healpix_directions(order + 1)
    child_dirs = (4 * keep[:, None] + np.arange(4)[None]).reshape(-1)  # (D·4,)
    d4 = len(child_dirs)
    # row layout: coarse (d, ψ) -> children (sub-direction s, ψ offset o): 8c + 2s + o
    cd = child_dirs.reshape(len(keep), 1, 4, 1)
    dirs = np.broadcast_to(cd, (len(keep), len(psi), 4, 2)).reshape(-1)
    ps = (psi[None, :, None, None] + np.array([-0.25, 0.25])[None, None, None, :] * step)
    ps = np.broadcast_to(ps, (len(keep), len(psi), 4, 2)).reshape(-1) % 360.0
    fine = np.stack([frot[dirs], ftilt[dirs], ps], axis=1)
    assert d4 * len(psi) * 2 == len(fine)
    return coarse, fine


def oversampled_translations(offset_range: float, offset_step: float) -> tuple[np.ndarray, np.ndarray]:
    """Coarse translations (Tc, 2) pixels and their 4 children each (Tc·4, 2): ± step/4 in x and y."""
    coarse = translation_grid(offset_range, offset_step)
    q = 0.25 * offset_step if offset_step > 0 else 0.0
    d = np.array([[-q, -q], [q, -q], [-q, q], [q, q]])
    return coarse, (coarse[:, None, :] + d[None]).reshape(-1, 2)
