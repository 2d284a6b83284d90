"""RELION's Euler angles (rot, tilt, psi), in degrees, ZYZ.

The matrix ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` (RELION's sign convention)
maps a point of the reference (map) frame into the particle frame. The 2D
Fourier transform of the projection at (kx, ky) is the 3D transform of the map
at ``A.T @ (kx, ky, 0)``.
"""

from __future__ import annotations

import numpy as np


def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """Rotation matrices (..., 3, 3) from RELION Euler angles in degrees."""
    a, b, g = (np.deg2rad(np.asarray(x, dtype=np.float64)) for x in (rot, tilt, psi))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cb * ca - sg * sa
    m[..., 0, 1] = cg * cb * sa + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cb * ca - cg * sa
    m[..., 1, 1] = -sg * cb * sa + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sb * ca
    m[..., 2, 1] = sb * sa
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION Euler angles (rot, tilt, psi) in degrees from matrices (..., 3, 3).

    tilt is in [0, 180]; rot and psi in (-180, 180]. When tilt is 0 or 180
    only rot ± psi is defined; rot is then set to 0.
    """
    m = np.asarray(m, dtype=np.float64)
    sb = np.hypot(m[..., 2, 0], m[..., 2, 1])
    regular = sb > 1e-6
    rot = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    tilt = np.arctan2(sb, m[..., 2, 2])
    psi_regular = np.arctan2(m[..., 1, 2], -m[..., 0, 2])
    psi_up = np.arctan2(m[..., 0, 1], m[..., 0, 0])  # tilt = 0: A = Rz(psi + rot)
    psi_down = np.arctan2(m[..., 0, 1], -m[..., 0, 0])  # tilt = 180
    psi = np.where(regular, psi_regular, np.where(m[..., 2, 2] > 0, psi_up, psi_down))
    tilt = np.where(regular, tilt, np.where(m[..., 2, 2] > 0, 0.0, np.pi))
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def rotation_about_axis(axis, angle_deg: float) -> np.ndarray:
    """Right-handed rotation matrix of ``angle_deg`` degrees about ``axis``."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    t = np.deg2rad(angle_deg)
    c, s, C = np.cos(t), np.sin(t), 1 - np.cos(t)
    return np.array(
        [
            [c + x * x * C, x * y * C - z * s, x * z * C + y * s],
            [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
            [z * x * C - y * s, z * y * C + x * s, c + z * z * C],
        ]
    )


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices drawn uniformly from SO(3) (unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def angular_distance_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees of the rotation ``a @ b.T`` (the geodesic distance)."""
    r = np.einsum("...ij,...kj->...ik", a, b)
    tr = np.clip((np.trace(r, axis1=-2, axis2=-1) - 1) / 2, -1.0, 1.0)
    return np.rad2deg(np.arccos(tr))
