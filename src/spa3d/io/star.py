"""RELION STAR files (via ``starfile``).

RELION 3.1 particle files hold two tables: ``optics`` (per optics group:
voltage in kV, Cs in mm, amplitude contrast, pixel size in Å, box size in
pixels) and ``particles`` (per particle: image name ``NNNNNN@stack.mrcs``,
defocus in Å, Euler angles in degrees, origins in Å, ...). RELION 3.0 files
have a single table with the optics columns on every row and origins in
pixels; :func:`read_particles_star` converts them on read.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from spa3d.errors import InputError
from spa3d.io.atomic_write import atomic_path

OPTICS_COLUMNS_FROM_30 = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read every data block of a STAR file into DataFrames, keyed by block name."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnImageName", "rlnMicrographName"])
    except Exception as exc:
        raise InputError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    if not blocks:
        raise InputError(path, "STAR file has no data blocks")
    out = {}
    for name, block in blocks.items():
        if isinstance(block, dict):  # a key-value block (data_model_general ...)
            block = pd.DataFrame([block])
        out[name] = block
    return out


def write_star(path: str | os.PathLike, blocks: dict[str, pd.DataFrame | dict], version: int = 30001) -> None:
    """Write data blocks to a STAR file atomically, with RELION's version line.

    A ``dict`` block is written as a key-value block; a DataFrame as a loop.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f")
        text = tmp.read_text()
        lines = [ln for ln in text.splitlines() if not ln.startswith("# Created by the starfile")]
        tmp.write_text(f"\n# version {version}\n" + "\n".join(lines) + "\n")


@dataclass
class ParticleTable:
    """The two tables of a RELION 3.1 particle STAR file.

    ``star_path`` is the file read; ``extra_blocks`` keeps any other blocks so
    that they are written back unchanged.
    """

    optics: pd.DataFrame
    particles: pd.DataFrame
    star_path: str = ""
    extra_blocks: dict[str, pd.DataFrame] = field(default_factory=dict)

    def copy(self) -> "ParticleTable":
        return ParticleTable(self.optics.copy(), self.particles.copy(), self.star_path, dict(self.extra_blocks))

    def optics_row(self, group: int) -> pd.Series:
        rows = self.optics[self.optics["rlnOpticsGroup"].astype(int) == int(group)]
        if len(rows) == 0:
            raise InputError(self.star_path, f"optics group {group} is used by particles but not in data_optics")
        return rows.iloc[0]

    def per_particle(self, column: str) -> np.ndarray:
        """A column of the optics table broadcast to every particle."""
        groups = self.particles["rlnOpticsGroup"].astype(int).to_numpy()
        lookup = dict(zip(self.optics["rlnOpticsGroup"].astype(int), self.optics[column]))
        try:
            return np.array([lookup[g] for g in groups])
        except KeyError as exc:
            raise InputError(self.star_path, f"optics group {exc.args[0]} is used by particles but not in data_optics") from None

    def write(self, path: str | os.PathLike) -> None:
        blocks = {"optics": self.optics, "particles": self.particles}
        blocks.update(self.extra_blocks)
        write_star(path, blocks)


def _convert_30(table: pd.DataFrame, path: str) -> ParticleTable:
    """Convert a RELION 3.0 particle table (no optics block) to 3.1 form."""
    df = table.copy()
    for col in OPTICS_COLUMNS_FROM_30:
        if col not in df:
            raise InputError(path, f"RELION 3.0 STAR file lacks column {col}")
    if "rlnImagePixelSize" in df:
        apix = df["rlnImagePixelSize"].astype(float)
    elif "rlnPixelSize" in df:
        apix = df["rlnPixelSize"].astype(float)
    elif "rlnDetectorPixelSize" in df and "rlnMagnification" in df:
        apix = df["rlnDetectorPixelSize"].astype(float) * 1e4 / df["rlnMagnification"].astype(float)
    else:
        raise InputError(path, "RELION 3.0 STAR file has no pixel size (rlnDetectorPixelSize and rlnMagnification)")
    keys = pd.DataFrame({c: df[c].astype(float) for c in OPTICS_COLUMNS_FROM_30})
    keys["apix"] = apix.round(6)
    uniq = keys.drop_duplicates().reset_index(drop=True)
    uniq["rlnOpticsGroup"] = np.arange(1, len(uniq) + 1)
    merged = keys.merge(uniq, how="left", on=list(keys.columns))
    df["rlnOpticsGroup"] = merged["rlnOpticsGroup"].to_numpy()
    px = apix.to_numpy()
    for ax in ("X", "Y"):
        if f"rlnOrigin{ax}" in df:
            df[f"rlnOrigin{ax}Angst"] = df[f"rlnOrigin{ax}"].astype(float) * px
            df = df.drop(columns=[f"rlnOrigin{ax}"])
    drop = [c for c in OPTICS_COLUMNS_FROM_30 + ["rlnMagnification", "rlnDetectorPixelSize", "rlnPixelSize", "rlnImagePixelSize"] if c in df]
    df = df.drop(columns=drop)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in uniq["rlnOpticsGroup"]],
            "rlnOpticsGroup": uniq["rlnOpticsGroup"].astype(int),
            "rlnMicrographOriginalPixelSize": uniq["apix"],
            "rlnVoltage": uniq["rlnVoltage"],
            "rlnSphericalAberration": uniq["rlnSphericalAberration"],
            "rlnAmplitudeContrast": uniq["rlnAmplitudeContrast"],
            "rlnImagePixelSize": uniq["apix"],
            "rlnImageSize": 0,  # filled in from the stacks by ParticleSet
            "rlnImageDimensionality": 2,
        }
    )
    return ParticleTable(optics, df.reset_index(drop=True), path)


def read_particles_star(path: str | os.PathLike) -> ParticleTable:
    """Read a particle STAR file (RELION 3.1, or 3.0 converted to 3.1)."""
    path = str(path)
    blocks = read_star(path)
    if "particles" in blocks:
        particles = blocks.pop("particles")
        if "optics" not in blocks:
            raise InputError(path, "STAR file has data_particles but no data_optics block")
        optics = blocks.pop("optics")
        for col in ("rlnOpticsGroup", "rlnImagePixelSize"):
            if col not in optics:
                raise InputError(path, f"data_optics lacks column {col}")
        if "rlnOpticsGroup" not in particles:
            if len(optics) != 1:
                raise InputError(path, "data_particles lacks rlnOpticsGroup and there are several optics groups")
            particles["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
        try:
            used = set(pd.to_numeric(particles["rlnOpticsGroup"], errors="raise").astype(int))
        except (ValueError, TypeError):
            raise InputError(path, "data_particles has rlnOpticsGroup values that are not numbers") from None
        unknown = sorted(used - set(optics["rlnOpticsGroup"].astype(int)))
        if unknown:
            n_bad = int(particles["rlnOpticsGroup"].astype(int).isin(unknown).sum())
            raise InputError(path, f"{n_bad} particle(s) in optics group(s) {', '.join(map(str, unknown))} "
                                   f"that data_optics does not define")
        table = ParticleTable(optics.reset_index(drop=True), particles.reset_index(drop=True), path, blocks)
    else:
        # RELION 3.0: one table (data_ or data_images)
        name, df = next(iter(blocks.items()))
        if "rlnImageName" not in df:
            raise InputError(path, "no data_particles block and no table with rlnImageName")
        table = _convert_30(df, path)
    if "rlnImageName" not in table.particles:
        raise InputError(path, "data_particles lacks column rlnImageName")
    if len(table.particles) == 0:
        raise InputError(path, "STAR file holds no particles")
    return table
