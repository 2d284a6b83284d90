"""A lazy particle set: a RELION STAR table plus its image stacks on disk.

Images are read in batches straight from the stacks (never all at once), so
memory does not grow with the number of particles. Image names
``NNNNNN@path.mrcs`` are resolved the way RELION does: relative to the
project directory (the working directory of the job). When a relative path
does not exist there, the directory of the STAR file and its parents are
tried, so a STAR file can also be used from elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spa3d.errors import InputError
from spa3d.io.mrc import MrcHeader, read_header, read_images
from spa3d.io.star import ParticleTable, read_particles_star

if TYPE_CHECKING:  # torch is imported with the CTF code only where a job needs it (extract, select do not)
    from spa3d.fourier.ctf import CtfParams

CTF_COLUMNS = ["rlnDefocusU", "rlnDefocusV"]


@dataclass
class ParticleBatch:
    """One batch of particles.

    images: float32 (B, n, n); indices: rows in the STAR table; angles: (B, 3)
    rot, tilt, psi in degrees; origins_px: (B, 2) rlnOriginX/YAngst in pixels;
    ctf: per-particle CTF parameters (or None without CTF columns).
    """

    indices: np.ndarray
    images: np.ndarray
    angles: np.ndarray
    origins_px: np.ndarray
    ctf: CtfParams | None


def split_image_name(name: str) -> tuple[int, str]:
    """'000012@Particles/a.mrcs' -> (11, 'Particles/a.mrcs') (0-based index)."""
    if "@" in name:
        num, path = name.split("@", 1)
        return int(num) - 1, path
    return 0, name


class ParticleSet:
    """Particles of a STAR file with lazy access to their images.

    Parameters
    ----------
    star : path of the STAR file, or a :class:`ParticleTable` already read.
    project_dir : where relative image paths start (default: the working
        directory, then the STAR file's directory and its parents).
    """

    def __init__(self, star: str | os.PathLike | ParticleTable, project_dir: str | os.PathLike | None = None):
        self.table = star if isinstance(star, ParticleTable) else read_particles_star(star)
        self.star_path = self.table.star_path
        p = self.table.particles
        parsed = [split_image_name(str(s)) for s in p["rlnImageName"]]
        self._index = np.array([i for i, _ in parsed], dtype=np.int64)
        rel_paths = [s for _, s in parsed]
        self._stack_names, self._stack_of = np.unique(np.array(rel_paths, dtype=object), return_inverse=True)
        self.project_dir = self._find_project_dir(project_dir)
        self._headers: dict[int, MrcHeader] = {}
        self.box = self._check_box()
        self.pixel_size = float(self.table.optics["rlnImagePixelSize"].astype(float).iloc[0])

    # -- set-up -----------------------------------------------------------------
    def _find_project_dir(self, project_dir) -> Path:
        first = Path(str(self._stack_names[0]))
        if project_dir is not None:
            return Path(project_dir)
        if first.is_absolute():
            return Path("/")
        candidates = [Path.cwd()]
        if self.star_path:
            d = Path(self.star_path).resolve().parent
            candidates += [d, *d.parents]
        for c in candidates:
            if (c / first).exists():
                return c
        raise InputError(self.star_path, f"image stack {first} not found (looked in the working directory "
                                         f"and beside the STAR file)")

    def stack_path(self, k: int) -> Path:
        p = Path(str(self._stack_names[k]))
        return p if p.is_absolute() else self.project_dir / p

    def header(self, k: int) -> MrcHeader:
        if k not in self._headers:
            path = self.stack_path(k)
            if not path.exists():
                raise InputError(path, f"image stack not found (named in {self.star_path})")
            self._headers[k] = read_header(path)
        return self._headers[k]

    def _check_box(self) -> int:
        boxes = {}
        for k in range(len(self._stack_names)):
            h = self.header(k)
            nz, ny, nx = h.shape
            if ny != nx:
                raise InputError(h.path, f"images are not square ({nx}x{ny})")
            boxes.setdefault(nx, h.path)
            need = self._index[self._stack_of == k].max() + 1
            if need > nz:
                raise InputError(h.path, f"STAR file asks for image {need} but the stack holds {nz}")
        if len(boxes) > 1:
            desc = ", ".join(f"{b} px in {p}" for b, p in boxes.items())
            raise InputError(self.star_path, f"stacks have different box sizes: {desc}")
        box = next(iter(boxes))
        optics = self.table.optics
        if "rlnImageSize" in optics:
            sizes = optics["rlnImageSize"].astype(int)
            if (sizes == 0).all():
                optics["rlnImageSize"] = box
            elif (sizes != box).any():
                raise InputError(self.star_path, f"data_optics says rlnImageSize {int(sizes.iloc[0])} but the stacks hold {box}x{box} images")
        return box

    # -- metadata -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table.particles)

    def column(self, name: str, default: float | None = None) -> np.ndarray:
        p = self.table.particles
        if name in p:
            return p[name].to_numpy()
        if name in self.table.optics:
            return self.table.per_particle(name)
        if default is None:
            raise InputError(self.star_path, f"missing column {name}")
        return np.full(len(p), default)

    def has_ctf(self) -> bool:
        return all(c in self.table.particles for c in CTF_COLUMNS) and all(
            c in self.table.optics or c in self.table.particles for c in ("rlnVoltage", "rlnSphericalAberration"))

    def require_columns(self, names: list[str], why: str) -> None:
        missing = [c for c in names if c not in self.table.particles and c not in self.table.optics]
        if missing:
            raise InputError(self.star_path, f"missing column(s) {', '.join(missing)} needed {why}")

    def ctf_params(self, idx: np.ndarray | slice = slice(None)) -> CtfParams:
        """CTF parameters of particles ``idx`` (RELION defaults where a column is absent)."""
        self.require_columns(["rlnDefocusU", "rlnVoltage", "rlnSphericalAberration"], "for CTF correction")
        u = self.column("rlnDefocusU").astype(float)
        v = self.column("rlnDefocusV", np.nan).astype(float)
        v = np.where(np.isnan(v), u, v)
        from spa3d.fourier.ctf import CtfParams

        return CtfParams(
            defocus_u=u, defocus_v=v,
            defocus_angle=self.column("rlnDefocusAngle", 0.0).astype(float),
            voltage=self.column("rlnVoltage").astype(float),
            cs=self.column("rlnSphericalAberration").astype(float),
            amplitude_contrast=self.column("rlnAmplitudeContrast", 0.1).astype(float),
            bfactor=self.column("rlnCtfBfactor", 0.0).astype(float),
            scale=self.column("rlnCtfScalefactor", 1.0).astype(float),
            phase_shift=self.column("rlnPhaseShift", 0.0).astype(float),
        ).subset(idx)

    def angles(self) -> np.ndarray:
        """(N, 3) rot, tilt, psi in degrees (0 where absent)."""
        return np.stack([self.column(c, 0.0).astype(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], 1)

    def origins_px(self) -> np.ndarray:
        """(N, 2) origins in pixels of the image (rlnOriginX/YAngst ÷ pixel size)."""
        apix = self.column("rlnImagePixelSize").astype(float)
        return np.stack([self.column(f"rlnOrigin{a}Angst", 0.0).astype(float) / apix for a in ("X", "Y")], 1)

    # -- images -----------------------------------------------------------------------
    def read(self, idx: np.ndarray) -> np.ndarray:
        """Images of particles ``idx`` (float32 (B, n, n)); checks for NaN/inf."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.box, self.box), dtype=np.float32)
        stacks = self._stack_of[idx]
        for k in np.unique(stacks):
            sel = np.nonzero(stacks == k)[0]
            h = self.header(int(k))
            imgs = read_images(h, self._index[idx[sel]])
            if not np.all(np.isfinite(imgs)):
                bad = int(self._index[idx[sel]][~np.isfinite(imgs).all(axis=(1, 2))][0]) + 1
                raise InputError(h.path, f"image {bad} contains NaN or infinite values")
            out[sel] = imgs
        return out

    def batches(self, batch_size: int = 256, indices: np.ndarray | None = None, with_ctf: bool = False):
        """Yield :class:`ParticleBatch` of ``batch_size`` particles (in STAR order or ``indices``)."""
        order = np.arange(len(self)) if indices is None else np.asarray(indices)
        angles = self.angles()
        origins = self.origins_px()
        ctf = self.ctf_params() if with_ctf else None
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            yield ParticleBatch(idx, self.read(idx), angles[idx], origins[idx], ctf.subset(idx) if ctf else None)
