"""Superpose one map onto another: rotation, shift and hand (for FSC against a ground truth).

Both maps are centred on their centres of mass and compared in a small box:
a global search over a 15° HEALPix grid of rotations, for the map and its
mirror image, then local refinement of the best candidates. The shift is then
refined by the peak of the cross-correlation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spa3d.fourier.filters import soft_sphere
from spa3d.geometry.euler import euler_to_matrix, rotation_about_axis
from spa3d.geometry.sampling import orientation_grid
from spa3d.maps.transform import centre_of_mass, fourier_resample, rotate_map, rotate_maps, shift_map


@dataclass
class Superposition:
    rotation: np.ndarray  # aligned(x) = moving_centred(R @ x) (moving mirrored first when mirrored)
    mirrored: bool
    correlation: float


def _corr_many(ref: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    a = ref[mask]
    a = (a - a.mean()) / (a.std() + 1e-12)
    b = maps[:, mask]
    b = (b - b.mean(1, keepdim=True)) / (b.std(1, keepdim=True) + 1e-12)
    return (b @ a / a.numel()).numpy()


def superpose(moving: np.ndarray, reference: np.ndarray, working_box: int = 32, try_mirror: bool = True):
    """Return (moving aligned onto reference, Superposition)."""
    n = reference.shape[0]
    ref_c = shift_map(reference, -centre_of_mass(reference))
    candidates = []
    for mirrored in ((False, True) if try_mirror else (False,)):
        mv = np.ascontiguousarray(moving[:, :, ::-1]) if mirrored else moving
        mv_c = shift_map(mv, -centre_of_mass(mv))
        small_n = min(n, working_box)
        rs = torch.as_tensor(fourier_resample(ref_c, small_n) if small_n < n else ref_c)
        ms = fourier_resample(mv_c, small_n) if small_n < n else mv_c
        mask = torch.as_tensor(soft_sphere(small_n, small_n / 2 - 1, 0) > 0.5)
        grid = euler_to_matrix(*orientation_grid(2).T)
        scores = np.concatenate([_corr_many(rs, rotate_maps(ms, grid[s:s + 256]), mask) for s in range(0, len(grid), 256)])
        for q in grid[np.argsort(scores)[::-1][:4]]:
            s_q = _corr_many(rs, rotate_maps(ms, q[None]), mask)[0]
            for step in (8.0, 4.0, 2.0, 1.0, 0.5):
                improved = True
                while improved:
                    improved = False
                    trial = np.array([rotation_about_axis(ax, sg * step) @ q for ax in np.eye(3) for sg in (1, -1)])
                    ts = _corr_many(rs, rotate_maps(ms, trial), mask)
                    if ts.max() > s_q + 1e-7:
                        q, s_q = trial[np.argmax(ts)], ts.max()
                        improved = True
            candidates.append((s_q, mirrored, q, mv_c))
    s_best, mirrored, q, mv_c = max(candidates, key=lambda c: c[0])
    aligned = rotate_map(mv_c, q)
    # put it where the reference is (undo the reference's centring), then refine the shift by cross-correlation
    aligned = shift_map(aligned, centre_of_mass(reference))
    fa, fr = np.fft.rfftn(aligned), np.fft.rfftn(reference)
    cc = np.fft.irfftn(fr * np.conj(fa), s=aligned.shape, axes=(0, 1, 2))
    peak = np.array(np.unravel_index(np.argmax(cc), cc.shape))
    peak = np.where(peak > n // 2, peak - n, peak)
    aligned = shift_map(aligned, peak[::-1].astype(float))
    corr = float(np.corrcoef(aligned.ravel(), reference.ravel())[0, 1])
    return aligned, Superposition(q, mirrored, corr)
