"""``spa3d mask``: a soft solvent mask from a map (RELION's MaskCreate job, relion_mask_create).

Low-pass the map, threshold it, extend the binary mask by a few pixels and
give it a raised-cosine soft edge (:func:`spa3d.maps.postprocess.create_mask`).
Writes mask.mrc into the job directory (RELION's name), values 0..1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from spa3d.errors import InputError
from spa3d.io.atomic_write import atomic_path, ensure_writable_dir
from spa3d.io.mrc import read_map, write_map
from spa3d.maps.postprocess import create_mask

log = logging.getLogger("spa3d")

DESCRIPTION = ("Make a soft solvent mask from a map: low-pass, threshold, extend and soft edge (relion_mask_create). "
               "Writes mask.mrc into --o.")


def run_mask(map_path: str, job_dir: str, lowpass_a: float, threshold: float, extend_px: float, soft_edge_px: float,
             angpix: float | None = None, invert: bool = False) -> Path:
    """Write ``job_dir``/mask.mrc; returns its path."""
    vol, apix = read_map(map_path)
    apix = angpix if angpix and angpix > 0 else apix
    if not apix or apix <= 0:
        raise InputError(map_path, "the map has no pixel size: give --angpix")
    if threshold >= float(vol.max()):
        raise InputError(map_path, f"--ini-threshold {threshold:g} is above the map's maximum {float(vol.max()):.4g}: "
                                   "the mask would be empty")
    mask = create_mask(vol, apix, lowpass_a, threshold, extend_px, soft_edge_px, invert)
    job = Path(job_dir)
    ensure_writable_dir(job)
    out = job / "mask.mrc"
    with atomic_path(out) as tmp:
        write_map(tmp, mask.astype(np.float32), apix)
    frac = float(mask.mean())
    log.info(f"mask: {out} ({frac:.1%} of the box; low-pass {lowpass_a} Å, threshold {threshold:g}, "
             f"extended {extend_px:g} px, soft edge {soft_edge_px:g} px)")
    return out


def add_args(p) -> None:
    from spa3d.jobs.args import add_job_output

    p.add_argument("--i", required=True, help="map (.mrc) to make the mask from")
    add_job_output(p, "job directory (mask.mrc)")
    p.add_argument("--quiet", action="store_true", help="warnings only on the terminal (run.log has everything)")
    p.add_argument("--lowpass", type=float, default=15.0, help="low-pass the map to this resolution (Å) first "
                   "(default 15; 0: not)")
    p.add_argument("--ini-threshold", type=float, required=True,
                   help="voxels of the low-passed map at or above this value are in the initial mask")
    p.add_argument("--extend-inimask", type=float, default=3.0,
                   help="extend the binary mask by this many pixels (negative: shrink; default 3)")
    p.add_argument("--width-soft-edge", type=float, default=3.0, help="raised-cosine soft edge in pixels (default 3)")
    p.add_argument("--angpix", type=float, default=None, help="pixel size in Å (default: the map's header)")
    p.add_argument("--invert", action="store_true", help="1 − mask")


def main(a) -> None:
    from spa3d.jobs.args import start_log

    if a.o:
        Path(a.o).mkdir(parents=True, exist_ok=True)
    start_log(a, Path(a.o) / "run.log" if a.o else None)
    run_mask(a.i, a.o, a.lowpass, a.ini_threshold, a.extend_inimask, a.width_soft_edge, a.angpix, a.invert)
