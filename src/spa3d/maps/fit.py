"""Rigid-body fit of an atomic model into a map (what Chimera's "Fit in Map" is used for), and the map's hand.

The model's density is simulated at the map's resolution on the map's grid
(:func:`spa3d.io.atomic.density_from_atoms`, centred on the model's centre of
mass). The pose is found in two stages:

1. global: rotations on a 15° HEALPix grid; for each, the translation by the
   peak of the FFT cross-correlation, on copies of both maps resampled to a
   32-voxel box;
2. local: the best candidates refined in six parameters (rotation vector in
   degrees, shift in pixels) by Powell's method, maximising the Pearson
   correlation inside the map's inscribed sphere at full size.

The same search against the mirror image of the map (x → −x) gives the
correlation of the other hand: the map has the correct hand when the model
fits the map better than its mirror image.

Convention: a fitted atom is at p' = R (p − c) + (n//2 + t)·a, with c the
model's centre of mass (Å), t the shift in pixels (x, y, z), a the pixel
size, and map voxel (i, j, k) at (k, j, i)·a Å (MRC origin 0, as ChimeraX
places our maps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from spa3d.geometry.euler import euler_to_matrix, matrix_to_euler
from spa3d.geometry.sampling import orientation_grid
from spa3d.io.atomic import density_from_atoms
from spa3d.maps.transform import fourier_resample, rotate_maps

log = logging.getLogger("spa3d")


@dataclass
class Fit:
    """Pose of the model in the map. rotation: (3, 3); shift_px: (x, y, z) pixels from the box centre;
    correlation: Pearson correlation with the map inside the inscribed sphere."""

    rotation: np.ndarray
    shift_px: np.ndarray
    correlation: float


@dataclass
class FitResult:
    fit: Fit  # against the map as given
    mirrored_fit: Fit  # against the mirror image of the map
    centre: np.ndarray  # model centre of mass (Å)
    pixel_size: float
    box: int

    @property
    def hand(self) -> str:
        return "correct" if self.fit.correlation >= self.mirrored_fit.correlation else "mirrored"

    def transform_atoms(self, xyz: np.ndarray) -> np.ndarray:
        """Fitted positions (Å) of atoms ``xyz`` (n, 3)."""
        return (xyz - self.centre) @ self.fit.rotation.T + (self.box // 2 + self.fit.shift_px) * self.pixel_size


def _points(n: int) -> torch.Tensor:
    c = torch.arange(n, dtype=torch.float32) - n // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([xx, yy, zz], -1)


def place_density(density: torch.Tensor, rotation: np.ndarray, shift_px: np.ndarray, pts: torch.Tensor) -> torch.Tensor:
    """The model density turned by R and moved by t: D(Rᵀ(x − t)), trilinear."""
    n = density.shape[-1]
    r = torch.as_tensor(rotation, dtype=torch.float32)
    src = (pts - torch.as_tensor(shift_px, dtype=torch.float32)) @ r + n // 2  # Rᵀ(x − t) as row vectors
    grid = src / (n - 1) * 2 - 1
    return F.grid_sample(density[None, None], grid[None], mode="bilinear", padding_mode="zeros",
                         align_corners=True)[0, 0]


def _global_search(vol: np.ndarray, density: np.ndarray, working_box: int, n_keep: int):
    n = vol.shape[0]
    m = min(n, working_box)
    small_v = fourier_resample(vol, m) if m < n else vol
    small_d = fourier_resample(density, m) if m < n else density
    fv = torch.fft.rfftn(torch.as_tensor(small_v - small_v.mean()))
    grid = euler_to_matrix(*orientation_grid(1).T)
    scores, shifts = [], []
    for s in range(0, len(grid), 256):
        rots = grid[s:s + 256]
        placed = rotate_maps(small_d, np.transpose(rots, (0, 2, 1)))  # D(Rᵀ x)
        placed = placed - placed.mean((1, 2, 3), keepdim=True)
        cc = torch.fft.irfftn(fv[None] * torch.conj(torch.fft.rfftn(placed, dim=(1, 2, 3))), s=(m, m, m), dim=(1, 2, 3))
        flat = cc.reshape(len(rots), -1)
        best, where = flat.max(1)
        scores.append((best / (placed.reshape(len(rots), -1).norm(dim=1) + 1e-12)).numpy())
        iz, iy, ix = np.unravel_index(where.numpy(), (m, m, m))
        sh = np.stack([ix, iy, iz], 1).astype(float)
        sh = np.where(sh > m // 2, sh - m, sh)
        shifts.append(sh * n / m)
    scores, shifts = np.concatenate(scores), np.concatenate(shifts)
    order = np.argsort(scores)[::-1]
    picked = []
    for i in order:
        if all(np.degrees(Rotation.from_matrix(grid[i] @ grid[j].T).magnitude()) > 20 for j in picked):
            picked.append(i)
        if len(picked) == n_keep:
            break
    return [(grid[i], shifts[i]) for i in picked]


def _rodrigues(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of rotation vector ``w`` (radians), differentiable."""
    theta = torch.sqrt((w * w).sum() + 1e-20)
    k = w / theta
    kx = torch.zeros(3, 3, dtype=w.dtype)
    kx = torch.stack([torch.stack([kx[0, 0], -k[2], k[1]]), torch.stack([k[2], kx[1, 1], -k[0]]),
                      torch.stack([-k[1], k[0], kx[2, 2]])])
    return torch.eye(3, dtype=w.dtype) + torch.sin(theta) * kx + (1 - torch.cos(theta)) * (kx @ kx)


def _refine(vol_t: torch.Tensor, dens_t: torch.Tensor, mask: torch.Tensor, pts: torch.Tensor, r0: np.ndarray,
            t0: np.ndarray, steps: int = 60) -> Fit:
    """Local refinement of (R, t) from (r0, t0): L-BFGS on the correlation, gradients through trilinear sampling."""
    n = dens_t.shape[-1]
    target = vol_t[mask] - vol_t[mask].mean()
    target = target / (target.norm() + 1e-12)
    r0_t = torch.as_tensor(r0, dtype=torch.float32)
    x = torch.zeros(6, dtype=torch.float32, requires_grad=True)
    p = pts[mask]
    base = dens_t[None, None]

    def corr():
        r = _rodrigues(x[:3] * (np.pi / 180)) @ r0_t
        src = (p - (torch.as_tensor(t0, dtype=torch.float32) + x[3:])) @ r + n // 2
        grid = (src / (n - 1) * 2 - 1)[None, :, None, None, :]
        vals = F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=True).reshape(-1)
        vals = vals - vals.mean()
        return (vals * target).sum() / (vals.norm() + 1e-12)

    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -corr()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        c = float(corr())
        xs = x.detach().numpy().astype(np.float64)
    r = Rotation.from_rotvec(np.radians(xs[:3])).as_matrix() @ r0
    return Fit(r, t0 + xs[3:], c)


def fit_density(vol: np.ndarray, density: np.ndarray, working_box: int = 32, n_candidates: int = 4) -> Fit:
    """Best pose of ``density`` (model density centred in the same box) in ``vol`` (see module docstring)."""
    n = vol.shape[0]
    pts = _points(n)
    mask = pts.norm(dim=-1) <= n // 2 - 1
    vol_t = torch.as_tensor(np.ascontiguousarray(vol), dtype=torch.float32)
    dens_t = torch.as_tensor(np.ascontiguousarray(density), dtype=torch.float32)
    fits = [_refine(vol_t, dens_t, mask, pts, r0, t0) for r0, t0 in _global_search(vol, density, working_box, n_candidates)]
    return max(fits, key=lambda f: f.correlation)


def fit_model(vol: np.ndarray, pixel_size: float, xyz: np.ndarray, weights: np.ndarray,
              resolution: float | None = None) -> FitResult:
    """Fit atoms ``xyz`` (Å) with ``weights`` into ``vol`` (z, y, x) of ``pixel_size`` Å, and test the hand."""
    n = vol.shape[0]
    if vol.shape != (n, n, n):
        raise ValueError("the map must be a cube")
    res = resolution if resolution else 3.0 * pixel_size
    centre = (xyz * weights[:, None]).sum(0) / weights.sum()
    density = density_from_atoms(xyz, weights, n, pixel_size, res, centre)
    vol = np.asarray(vol, dtype=np.float32)
    fit = fit_density(vol, density)
    mirrored = fit_density(np.ascontiguousarray(vol[:, :, ::-1]), density)
    return FitResult(fit, mirrored, centre, pixel_size, n)


def describe(result: FitResult) -> str:
    """The lines ``spa3d fit`` prints."""
    f = result.fit
    rot, tilt, psi = (float(np.asarray(a).ravel()[0]) for a in matrix_to_euler(f.rotation[None]))
    r = f.rotation
    shift_a = (result.box // 2 + f.shift_px) * result.pixel_size - result.centre
    lines = [
        f"correlation: {f.correlation:.4f}",
        f"correlation with the mirrored map: {result.mirrored_fit.correlation:.4f}",
        "rotation matrix (applied to model coordinates about their centre of mass):",
        *(f"  {r[i, 0]:9.5f} {r[i, 1]:9.5f} {r[i, 2]:9.5f}" for i in range(3)),
        f"rotation as RELION Euler angles (rot, tilt, psi): {rot:.2f} {tilt:.2f} {psi:.2f} degrees",
        f"translation of the centre of mass: {shift_a[0]:.2f} {shift_a[1]:.2f} {shift_a[2]:.2f} Å",
        f"hand: {result.hand}",
    ]
    return "\n".join(lines)


def write_fitted_model(model_path: str, out_path: str, result: FitResult) -> None:
    """Write the model moved to its fitted pose (PDB, or mmCIF when ``out_path`` ends in .cif), atomically."""
    import gemmi

    from spa3d.io.atomic_write import atomic_path

    st = gemmi.read_structure(str(model_path))
    for model in st:
        for chain in model:
            for res in chain:
                for atom in res:
                    p = result.transform_atoms(np.array([atom.pos.tolist()]))[0]
                    atom.pos = gemmi.Position(*p)
    with atomic_path(out_path) as tmp:
        if str(out_path).lower().endswith((".cif", ".mmcif")):
            st.setup_entities()
            st.make_mmcif_document().write_file(str(tmp))
        else:
            st.write_pdb(str(tmp))


def run_fit(map_path: str, model_path: str, out_path: str | None = None, resolution: float | None = None) -> FitResult:
    """``spa3d fit``: fit, print the result, write the fitted model (default: <model>_fitted.pdb beside the map)."""
    from pathlib import Path

    from spa3d.errors import InputError
    from spa3d.io.atomic import read_atoms
    from spa3d.io.mrc import read_map

    vol, apix = read_map(map_path)
    if vol.shape[0] != vol.shape[1] or vol.shape[1] != vol.shape[2]:
        raise InputError(map_path, f"map is not a cube ({vol.shape[2]}x{vol.shape[1]}x{vol.shape[0]})")
    if apix <= 0:
        raise InputError(map_path, "map header has no pixel size")
    xyz, z = read_atoms(model_path)
    result = fit_model(vol, apix, xyz, z, resolution)
    print(describe(result))
    if out_path is None:
        stem = Path(model_path).name.split(".")[0]
        out_path = str(Path(map_path).with_name(f"{stem}_fitted.pdb"))
    write_fitted_model(model_path, out_path, result)
    print(f"fitted model: {out_path}")
    return result
