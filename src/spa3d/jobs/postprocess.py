"""``spa3d postprocess``: resolution and sharpening from two half maps (RELION's PostProcess job, relion_postprocess).

Masked and unmasked FSC of the half maps, the masked FSC corrected by phase
randomisation, the resolution at 0.143, an automatic B-factor from the
Guinier plot and the FSC-weighted, sharpened map
(:func:`spa3d.maps.postprocess.postprocess`). Writes, with RELION's names,
postprocess.mrc, postprocess_masked.mrc (with a mask) and postprocess.star
(data_general, data_fsc, data_guinier) into the job directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from spa3d.errors import InputError
from spa3d.io.atomic_write import atomic_path, ensure_writable_dir
from spa3d.io.mrc import read_map, write_map
from spa3d.io.star import read_star, write_star
from spa3d.maps.postprocess import PostprocessResult, postprocess

log = logging.getLogger("spa3d")

DESCRIPTION = ("Gold-standard resolution and map sharpening from two half maps (relion_postprocess): masked FSC "
               "corrected by phase randomisation, automatic B-factor, FSC-weighted sharpened map. Writes "
               "postprocess.mrc, postprocess_masked.mrc and postprocess.star into --o.")


def half2_name(half1: str) -> str:
    """The second half map's name from the first's (``half1`` → ``half2``), as relion_postprocess guesses it."""
    name = Path(half1).name
    if "half1" not in name:
        raise InputError(half1, "cannot guess the second half map (no 'half1' in the name): give --i2")
    return str(Path(half1).with_name(name.replace("half1", "half2")))


def read_mtf(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A detector MTF STAR file: (frequency in 1/pixel, MTF)."""
    blocks = read_star(path)
    table = next(iter(blocks.values()))
    try:
        return (np.asarray(table["rlnResolutionInversePixel"], float), np.asarray(table["rlnMtfValue"], float))
    except KeyError as exc:
        raise InputError(path, f"MTF file lacks {exc.args[0]}") from None


def run_postprocess(half1: str, half2: str | None, job_dir: str, mask: str | None = None, angpix: float | None = None,
                    autob_lowres: float = 10.0, autob_highres: float = 0.0, adhoc_bfac: float = 0.0,
                    randomize_at_fsc: float = 0.8, randomize_at_a: float = -1.0, low_pass: float = 0.0,
                    fsc_weighting: bool = True, mtf: str | None = None, mtf_angpix: float | None = None,
                    seed: int = 0) -> PostprocessResult:
    """Post-process two half maps into ``job_dir``; returns what was measured."""
    half2 = half2 or half2_name(half1)
    h1, a1 = read_map(half1)
    h2, a2 = read_map(half2)
    if h1.shape != h2.shape or h1.shape[0] != h1.shape[1] or h1.shape[1] != h1.shape[2]:
        raise InputError(half2, f"half maps of different or non-cubic shapes: {h1.shape} and {h2.shape}")
    apix = angpix if angpix and angpix > 0 else a1
    if not apix or apix <= 0:
        raise InputError(half1, "the half map has no pixel size: give --angpix")
    m = None
    if mask:
        m, _ = read_map(mask)
        if m.shape != h1.shape:
            raise InputError(mask, f"mask is {m.shape}, half maps are {h1.shape}")
        if m.min() < -1e-3 or m.max() > 1 + 1e-3:
            raise InputError(mask, f"a mask holds values between 0 and 1 (found {m.min():.3g} .. {m.max():.3g})")
    mtf_curve = read_mtf(mtf) if mtf else None
    if mtf_curve is not None and not (mtf_angpix and mtf_angpix > 0):
        raise InputError(mtf, "--mtf needs --mtf-angpix (the micrographs' pixel size in Å)")
    try:
        r = postprocess(h1, h2, apix, m, autob_lowres, autob_highres, adhoc_bfac, randomize_at_fsc, randomize_at_a,
                        low_pass, fsc_weighting, mtf_curve, mtf_angpix, seed)
    except ValueError as exc:
        raise InputError(half1, str(exc)) from None
    job = Path(job_dir)
    ensure_writable_dir(job)
    with atomic_path(job / "postprocess.mrc") as tmp:
        write_map(tmp, r.sharpened, apix)
    if m is not None:
        with atomic_path(job / "postprocess_masked.mrc") as tmp:
            write_map(tmp, r.sharpened * m, apix)
    n = h1.shape[0]
    shells = np.arange(n // 2 + 1)
    general = {"rlnFinalResolution": r.resolution, "rlnBfactorUsedForSharpening": r.bfactor,
               "rlnUnfilteredMapHalf1": half1, "rlnUnfilteredMapHalf2": half2}
    if m is not None:
        general.update({"rlnMaskName": mask, "rlnRandomiseFrom": n * apix / max(r.randomize_at, 1)})
    if not adhoc_bfac:
        general.update({"rlnFittedSlopeGuinierPlot": r.fit_slope, "rlnFittedInterceptGuinierPlot": r.fit_intercept,
                        "rlnCorrelationFitGuinierPlot": r.fit_corr})
    fsc_table = {"rlnSpectralIndex": shells, "rlnResolution": shells / (n * apix),
                 "rlnAngstromResolution": np.where(shells > 0, n * apix / np.maximum(shells, 1), 999.0),
                 "rlnFourierShellCorrelationCorrected": r.fsc_corrected[: len(shells)],
                 "rlnFourierShellCorrelationUnmaskedMaps": r.fsc_unmasked[: len(shells)]}
    if m is not None:
        fsc_table["rlnFourierShellCorrelationMaskedMaps"] = r.fsc_masked[: len(shells)]
        fsc_table["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"] = r.fsc_random_masked[: len(shells)]
    guinier = pd.DataFrame({"rlnResolutionSquared": r.guinier_x, "rlnLogAmplitudesOriginal": r.guinier_original,
                            "rlnLogAmplitudesWeighted": r.guinier_weighted,
                            "rlnLogAmplitudesSharpened": r.guinier_sharpened,
                            "rlnLogAmplitudesIntercept": r.fit_intercept + r.fit_slope * r.guinier_x})
    with atomic_path(job / "postprocess.star") as tmp:
        write_star(tmp, {"general": general, "fsc": pd.DataFrame(fsc_table), "guinier": guinier})
    log.info(f"postprocess: final resolution {r.resolution:.2f} Å (FSC 0.143"
             + (f", masked, phases randomised from {n * apix / max(r.randomize_at, 1):.2f} Å" if m is not None else
                ", unmasked") + f"); B-factor {r.bfactor:.1f} Å²"
             + (" (the unmasked FSC reached further than the masked one and was used: check the mask)"
                if r.unmasked_used else ""))
    return r


def add_args(p) -> None:
    from spa3d.jobs.args import add_job_output

    p.add_argument("--i", required=True, help="first unfiltered half map (run_half1_class001_unfil.mrc)")
    p.add_argument("--i2", default=None, help="second half map (default: --i with half1 replaced by half2)")
    add_job_output(p, "job directory")
    p.add_argument("--quiet", action="store_true", help="warnings only on the terminal (run.log has everything)")
    p.add_argument("--mask", default=None, help="solvent mask (.mrc, 0..1), e.g. from spa3d mask")
    p.add_argument("--angpix", type=float, default=None, help="pixel size in Å (default: the maps' header)")
    p.add_argument("--autob-lowres", type=float, default=10.0,
                   help="lowest resolution (Å) in the B-factor fit (default 10)")
    p.add_argument("--autob-highres", type=float, default=0.0,
                   help="highest resolution (Å) in the B-factor fit (default 0: Nyquist)")
    p.add_argument("--adhoc-bfac", type=float, default=0.0, help="use this B-factor (Å², e.g. -400) instead of fitting")
    p.add_argument("--randomize-at-fsc", type=float, default=0.8,
                   help="randomise phases from where the unmasked FSC falls below this (default 0.8)")
    p.add_argument("--randomize-at-A", dest="randomize_at_a", type=float, default=-1.0,
                   help="randomise phases from this resolution (Å) on instead")
    p.add_argument("--low-pass", type=float, default=0.0,
                   help="low-pass the sharpened map at this resolution (Å; negative: the final resolution; 0: not)")
    p.add_argument("--skip-fsc-weighting", action="store_true", help="no sqrt(2·FSC/(1+FSC)) weighting")
    p.add_argument("--mtf", default=None, help="detector MTF (STAR: rlnResolutionInversePixel, rlnMtfValue)")
    p.add_argument("--mtf-angpix", type=float, default=None, help="pixel size (Å) of the micrographs the MTF is for")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the phase randomisation")


def main(a) -> None:
    from spa3d.jobs.args import start_log

    if a.o:
        Path(a.o).mkdir(parents=True, exist_ok=True)
    start_log(a, Path(a.o) / "run.log" if a.o else None)
    run_postprocess(a.i, a.i2, a.o, a.mask, a.angpix, a.autob_lowres, a.autob_highres, a.adhoc_bfac,
                    a.randomize_at_fsc, a.randomize_at_a, a.low_pass, not a.skip_fsc_weighting, a.mtf, a.mtf_angpix,
                    a.random_seed)
