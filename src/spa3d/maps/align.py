"""Superpose one map onto another: rotation, shift and hand (for FSC against a ground truth), and the relative
orientation of two maps that should share a frame (the half maps of a gold-standard refinement).

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


def _grid_candidates(ref: torch.Tensor, mov: torch.Tensor, mask: torch.Tensor, grid_order: int,
                     n_keep: int) -> list[np.ndarray]:
    """The ``n_keep`` rotations R of a HEALPix grid whose ``mov(R @ x)`` correlate best with ``ref``."""
    grid = euler_to_matrix(*orientation_grid(grid_order).T)
    scores = np.concatenate([_corr_many(ref, rotate_maps(mov, grid[s:s + 256]), mask) for s in range(0, len(grid), 256)])
    return list(grid[np.argsort(scores)[::-1][:n_keep]])


def _refine_rotation(ref: torch.Tensor, mov: torch.Tensor, mask: torch.Tensor, q: np.ndarray,
                     steps=(8.0, 4.0, 2.0, 1.0, 0.5)) -> tuple[float, np.ndarray]:
    """Local refinement of R from ``q`` by steps (degrees) about the three axes: (correlation, R)."""
    s_q = _corr_many(ref, rotate_maps(mov, q[None]), mask)[0]
    for step in steps:
        improved = True
        while improved:
            improved = False
            trial = np.array([rotation_about_axis(ax, sg * step) @ q for ax in np.eye(3) for sg in (1, -1)])
            ts = _corr_many(ref, rotate_maps(mov, trial), mask)
            if ts.max() > s_q + 1e-7:
                q, s_q = trial[np.argmax(ts)], ts.max()
                improved = True
    return float(s_q), q


def superpose(moving: np.ndarray, reference: np.ndarray, working_box: int = 32, try_mirror: bool = True,
              refine: bool = False):
    """Return (moving aligned onto reference, Superposition).

    ``refine``: then refine rotation and shift together at the full box (L-BFGS on the correlation within the
    box's sphere, gradients through trilinear sampling of the moving map Fourier-upsampled 2×, up to box 192)
    and resample the moving map from that copy: sub-degree and sub-pixel, for FSCs near Nyquist (the
    search alone is good to about 0.5° and to a whole pixel, which lowers the FSC at box 128 from about
    shell 30 on; a slower but finer measure).
    """
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
        ms = torch.as_tensor(ms)
        s_q, q = max((_refine_rotation(rs, ms, mask, q) for q in _grid_candidates(rs, ms, mask, 2, 4)),
                     key=lambda c: c[0])
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
    if refine:
        # aligned(x) = mv_c(q (x − s)) = mv(q (x − s) + c), s the shift applied after the rotation
        mv = np.ascontiguousarray(moving[:, :, ::-1]) if mirrored else moving
        s = centre_of_mass(reference) + peak[::-1].astype(float)
        aligned, q = _refine_superposition(reference, mv, q, s, centre_of_mass(mv))
    corr = float(np.corrcoef(aligned.ravel(), reference.ravel())[0, 1])
    return aligned, Superposition(q, mirrored, corr)


def _refine_superposition(reference: np.ndarray, moving: np.ndarray, q: np.ndarray, s: np.ndarray,
                          c: np.ndarray, steps: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Refine aligned(x) = moving(R q (x − s − t) + c) over the small rotation R = exp([ω]×) and shift t (pixels)
    to the best correlation with ``reference`` in the box's sphere; returns (aligned map, R q)."""
    import torch.nn.functional as F

    n = reference.shape[0]
    up = 2 if n <= 192 else 1  # the moving map sampled on a 2× finer grid: trilinear errors 4× smaller
    mov = torch.as_tensor(fourier_resample(moving, up * n) if up > 1 else np.asarray(moving, np.float32))
    big = mov.shape[0]
    cc = torch.arange(n, dtype=torch.float32) - n // 2
    zz, yy, xx = torch.meshgrid(cc, cc, cc, indexing="ij")
    pts = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
    inside = pts.norm(dim=1) <= n / 2 - 2
    ref = torch.as_tensor(np.asarray(reference, np.float32)).reshape(-1)[inside]
    ref = (ref - ref.mean()) / (ref.norm() + 1e-12)
    q_t = torch.as_tensor(q, dtype=torch.float64)
    s_t, c_t = torch.as_tensor(s, dtype=torch.float64), torch.as_tensor(c, dtype=torch.float64)
    params = torch.zeros(6, dtype=torch.float64, requires_grad=True)  # ω (radians), t (pixels)

    def sample(p, x):
        w = x[:3]
        skew = torch.zeros(3, 3, dtype=torch.float64)
        skew = skew.index_put((torch.tensor([2, 1, 0]), torch.tensor([1, 2, 2])), torch.stack([w[0], -w[0], w[1]]))
        skew = skew.index_put((torch.tensor([0, 1, 0]), torch.tensor([2, 0, 1])), torch.stack([-w[1], w[2], -w[2]]))
        rot = torch.linalg.matrix_exp(skew) @ q_t
        src = (p.to(torch.float64) - s_t - x[3:]) @ rot.T + c_t  # pixels from the moving map's centre
        grid = ((src * up + big // 2) / (big - 1) * 2 - 1).to(torch.float32)
        vals = F.grid_sample(mov[None, None], grid[None, :, None, None, :], mode="bilinear", padding_mode="zeros",
                             align_corners=True).reshape(-1)
        return vals, rot

    def loss():
        vals, _ = sample(pts[inside], params)
        vals = vals - vals.mean()
        return -(vals * ref).sum() / (vals.norm() + 1e-12)

    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        vals, rot = sample(pts, params.detach())
    return vals.reshape(n, n, n).numpy(), rot.numpy()


def mirror_x(vol: np.ndarray) -> np.ndarray:
    """The map ``vol(M @ x)``, M = diag(-1, 1, 1): x → −x about the box centre n//2 (exact for even and odd n)."""
    v = np.asarray(vol)[:, :, ::-1]
    return np.ascontiguousarray(np.roll(v, 1, axis=2) if v.shape[2] % 2 == 0 else v)


def whiten(vol: np.ndarray, low_shell: int = 2) -> np.ndarray:
    """The map with every Fourier shell scaled to unit mean power; shells below ``low_shell`` and beyond
    Nyquist set to zero. Correlations of whitened maps weigh fine detail (the hand) as much as the overall shape."""
    v = np.asarray(vol, dtype=np.float64)
    n = v.shape[0]
    f = np.fft.fftn(v)
    k = np.fft.fftfreq(n) * n
    shell = np.round(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)
    power = np.bincount(shell.ravel(), (np.abs(f) ** 2).ravel()) / np.maximum(np.bincount(shell.ravel()), 1)
    f = f / np.sqrt(power[shell] + 1e-30)
    f[(shell < low_shell) | (shell > n // 2)] = 0
    return np.fft.ifftn(f).real.astype(np.float32)


def _angle(r: np.ndarray) -> float:
    """Rotation angle of the proper rotation ``r``, degrees."""
    return float(np.rad2deg(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))


@dataclass
class RelativeOrientation:
    """How map B sits relative to map A about the box centre: B(S @ x) ≈ A(x), S = M·R when mirrored, else R."""

    rotation: np.ndarray  # R (proper)
    mirrored: bool
    correlation: float  # whitened correlation of A and B(S @ x) in the working box
    correlation_as_is: float  # the same for S = identity
    correlation_other: float = float("nan")  # the best for S neither the identity nor a symmetry operation

    @property
    def matrix(self) -> np.ndarray:
        """S (det −1 when mirrored)."""
        return (np.diag([-1.0, 1.0, 1.0]) @ self.rotation) if self.mirrored else self.rotation

    @property
    def angle(self) -> float:
        """Angle of R, degrees."""
        return _angle(self.rotation)


def relative_orientation(a: np.ndarray, b: np.ndarray, working_box: int = 24, n_keep: int = 4,
                         symmetry_ops: np.ndarray | None = None) -> RelativeOrientation:
    """The rotation about the box centre, in either hand, that best takes map ``b`` onto map ``a``.

    Both maps are Fourier-cropped and whitened (``whiten``): candidates come from a 15° HEALPix grid at box 16,
    then the candidates and the identity are refined to 1° at ``working_box``. No centring and no shift: for
    two maps that should share a frame (the half maps of a refinement).
    """
    n = a.shape[0]

    def prepared(w):
        wa, wb = (whiten(fourier_resample(v, w) if w < n else v) for v in (a, b))
        mask = torch.as_tensor(soft_sphere(w, w / 2 - 1, 0) > 0.5)
        return torch.as_tensor(wa), torch.as_tensor(wb), torch.as_tensor(mirror_x(wb)), mask

    ca, cb, cbm, cmask = prepared(min(n, 16))
    fa, fb, fbm, fmask = prepared(min(n, working_box))
    as_is = float(_corr_many(fa, fb[None], fmask)[0])
    steps = (8.0, 4.0, 2.0, 1.0)
    same_all = [_refine_rotation(fa, fb, fmask, q, steps) for q in _grid_candidates(ca, cb, cmask, 2, n_keep)
                + [np.eye(3)]]
    mirror_all = [_refine_rotation(fa, fbm, fmask, q, steps) for q in _grid_candidates(ca, cbm, cmask, 2, n_keep)]
    same, mirror = max(same_all, key=lambda c: c[0]), max(mirror_all, key=lambda c: c[0])
    (c, r), mirrored = (mirror, True) if mirror[0] > same[0] else (same, False)
    ops = np.eye(3)[None] if symmetry_ops is None else np.asarray(symmetry_ops)
    apart = [cs for cs, q in same_all if min(_angle(g.T @ q) for g in ops) > 10.0]
    other = max([mirror[0]] + apart)
    return RelativeOrientation(r, mirrored, c, as_is, float(other))


def transform_map(vol: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The map ``vol(S @ x)`` for S orthogonal (det ±1), trilinear."""
    s = np.asarray(s, dtype=np.float64)
    if np.linalg.det(s) < 0:
        return rotate_map(mirror_x(vol), np.diag([-1.0, 1.0, 1.0]) @ s)
    return rotate_map(vol, s)


def transform_poses(rotations: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Poses A' (N, 3, 3) under which ``vol(S @ x)`` projects as ``vol`` did under A: A' = D·A·S, D = diag(1, 1, −1)
    when S is improper (a flip along the beam, which leaves a projection unchanged), else D = I."""
    d = np.diag([1.0, 1.0, -1.0]) if np.linalg.det(s) < 0 else np.eye(3)
    return d @ np.asarray(rotations) @ s
