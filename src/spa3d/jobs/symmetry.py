"""``spa3d symmetrize`` and ``spa3d align-symmetry``.

symmetrize: average a map over a point group (relion_image_handler --sym).

align-symmetry: find the rotation that puts a map's symmetry axes on RELION's
axes for the group (relion_align_symmetry). The map is first re-centred on
its centre of mass (every symmetry axis passes through it), resampled to a
small working box, and scored for candidate rotations Q by how well the map
agrees with itself under the group's generators conjugated by Q (the mean
correlation of M with M∘(Qᵀ g Q)). A global search over a HEALPix grid is
followed by local refinement; the output is the full map turned so that
its symmetry axes lie on the standard ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from spa3d.errors import InputError
from spa3d.fourier.filters import soft_sphere
from spa3d.geometry.euler import euler_to_matrix, matrix_to_euler, rotation_about_axis
from spa3d.geometry.sampling import orientation_grid
from spa3d.geometry.symmetry import generator_matrices, symmetry_matrices
from spa3d.io.mrc import read_map, write_map
from spa3d.maps.transform import (centre_of_mass, fourier_resample, rotate_map, rotate_maps, shift_map,
                                  symmetrize)

log = logging.getLogger("spa3d")


def symmetry_score(vol, symmetry: str) -> float:
    """Correlation of a map with its symmetrised self (inside the inscribed sphere)."""
    v = np.asarray(vol, dtype=np.float32)
    s = symmetrize(v, symmetry)
    m = soft_sphere(v.shape[0], v.shape[0] / 2 - 2, 0) > 0.5
    return float(np.corrcoef(v[m], s[m])[0, 1])


@dataclass
class AlignResult:
    rotation: np.ndarray  # Q: aligned(x) = centred_input(Q.T @ x)
    euler: tuple[float, float, float]
    shift_px: np.ndarray  # (x, y, z) applied before rotating
    score_before: float
    score_after: float


def _score_rotations(vol_small: torch.Tensor, gens: np.ndarray, qs: np.ndarray, mask: torch.Tensor,
                     batch: int = 64) -> np.ndarray:
    """Mean correlation of the map with itself under Qᵀ g Q for each Q of ``qs`` (K, 3, 3)."""
    v = vol_small.numpy()
    ref = vol_small[mask]
    ref = (ref - ref.mean()) / (ref.std() + 1e-12)
    scores = np.empty(len(qs))
    conj = np.einsum("kji,gjl,klm->kgim", qs, gens, qs)  # Q^T g Q, (K, G, 3, 3)
    flat = conj.reshape(-1, 3, 3)
    out = np.empty(len(flat))
    for s in range(0, len(flat), batch):
        maps = rotate_maps(v, flat[s:s + batch])[:, mask]
        maps = (maps - maps.mean(1, keepdim=True)) / (maps.std(1, keepdim=True) + 1e-12)
        out[s:s + batch] = (maps @ ref / ref.numel()).numpy()
    scores[:] = out.reshape(len(qs), len(gens)).mean(1)
    return scores


def align_symmetry(vol: np.ndarray, pixel_size: float, symmetry: str, working_box: int = 32,
                   keep_centre: bool = False, lowpass_angstrom: float | None = None) -> tuple[np.ndarray, AlignResult]:
    """Turn a map so that its symmetry axes lie on RELION's axes for ``symmetry``.

    Returns (aligned map, result). The aligned map is
    ``aligned(x) = centred(Q.T @ x)`` where ``centred`` is the input shifted
    so that its centre of mass is at the box centre (unless ``keep_centre``).
    """
    gens = generator_matrices(symmetry)
    n = vol.shape[0]
    shift = np.zeros(3) if keep_centre else -centre_of_mass(vol)
    centred = shift_map(vol, shift) if not keep_centre else np.asarray(vol, dtype=np.float32)
    before = symmetry_score(centred, symmetry)
    if len(gens) == 0:
        return centred, AlignResult(np.eye(3), (0.0, 0.0, 0.0), shift, before, before)
    small_n = min(n, working_box)
    small = fourier_resample(centred, small_n) if small_n < n else centred
    mask = torch.as_tensor(soft_sphere(small_n, small_n / 2 - 1, 0) > 0.5)
    small_t = torch.as_tensor(small)
    # global search (15° HEALPix grid; the orientations Q and g·Q are equivalent, keep all: cheap at this size)
    cands = euler_to_matrix(*orientation_grid(2).T)
    scores = _score_rotations(small_t, gens, cands, mask)
    top = cands[np.argsort(scores)[::-1][:8]]
    best_q, best_s = top[0], -np.inf
    # local refinement of the best few: perturbations about x, y, z with shrinking steps
    for q0 in top:
        q = q0
        s_q = _score_rotations(small_t, gens, q[None], mask)[0]
        for step in (8.0, 4.0, 2.0, 1.0, 0.5):
            improved = True
            while improved:
                improved = False
                trial = np.array([rotation_about_axis(ax, sgn * step) @ q for ax in np.eye(3) for sgn in (1, -1)])
                ts = _score_rotations(small_t, gens, trial, mask)
                if ts.max() > s_q + 1e-6:
                    q, s_q = trial[np.argmax(ts)], ts.max()
                    improved = True
        if s_q > best_s:
            best_q, best_s = q, s_q
    aligned = rotate_map(centred, best_q.T)
    after = symmetry_score(aligned, symmetry)
    rot, tilt, psi = (float(x) for x in matrix_to_euler(best_q))
    return aligned, AlignResult(best_q, (rot, tilt, psi), shift, before, after)


def run_symmetrize(inp: str, out: str, symmetry: str) -> float:
    vol, apix = read_map(inp)
    if len(set(vol.shape)) != 1:
        raise InputError(inp, f"map is not cubic ({vol.shape[2]}x{vol.shape[1]}x{vol.shape[0]})")
    sym = symmetrize(vol, symmetry)
    write_map(out, sym, apix)
    score = symmetry_score(vol, symmetry)
    print(f"symmetrised {inp} with {symmetry.upper()} ({len(symmetry_matrices(symmetry))} operators): {out}")
    print(f"correlation of the input with its symmetrised self: {score:.4f}")
    return score


def run_align_symmetry(inp: str, out: str, symmetry: str, working_box: int = 32, keep_centre: bool = False) -> AlignResult:
    vol, apix = read_map(inp)
    if len(set(vol.shape)) != 1:
        raise InputError(inp, f"map is not cubic ({vol.shape[2]}x{vol.shape[1]}x{vol.shape[0]})")
    aligned, res = align_symmetry(vol, apix, symmetry, working_box=working_box, keep_centre=keep_centre)
    write_map(out, aligned, apix)
    rot, tilt, psi = res.euler
    print(f"shift applied (x, y, z): {res.shift_px[0]:.2f} {res.shift_px[1]:.2f} {res.shift_px[2]:.2f} pixels")
    print(f"rotation found (RELION Euler rot, tilt, psi): {rot:.2f} {tilt:.2f} {psi:.2f} degrees")
    print(f"correlation with the {symmetry.upper()}-symmetrised self: before {res.score_before:.4f}, "
          f"after {res.score_after:.4f}")
    print(f"wrote {out}")
    return res

