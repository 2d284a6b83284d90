"""Command-line options that several jobs share, and the start of a job's log.

Each job module defines ``add_args(parser)`` (its options, with these
helpers for the common ones) and ``main(args)`` (run it from the parsed
options); ``spa3d.cli.main`` only lists the jobs. Units in help texts: Å
unless pixels are said; degrees.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spa3d.jobs.progress import setup_logging


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def add_job_output(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--o", default=None, help=f"{what} (or --project)")
    p.add_argument("--project", default=None, help="RELION project directory: run there (paths relative to it) and "
                                                    "write into the next <Type>/jobNNN/")


def add_dask(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0,
                   help="run on a local Dask cluster of N worker processes (default 0: in this process)")
    p.add_argument("--dask-scheduler", default=None,
                   help="address of a running dask.distributed scheduler (e.g. tcp://host:8786)")


def add_iterative(p: argparse.ArgumentParser) -> None:
    """--dry-run, --seed, --continue and --quiet of the iterative jobs (initial model, class3d)."""
    p.add_argument("--dry-run", action="store_true",
                   help="print the expected wall time, peak memory and poses per particle (from a short "
                        "calibration on this machine) and stop; every run logs this estimate first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--continue", dest="continue_from", default=None,
                   help="run_itNNN_optimiser.star, or a job directory (its last complete iteration), to continue "
                        "from: the run's options are restored; options given again replace them")
    p.add_argument("--quiet", action="store_true", help="no progress on the terminal (the job's run.log still has it)")


def given_options(a, mapping: dict) -> set[str]:
    """The job options (``mapping``: argparse dest -> options field) given on the command line, not defaulted."""
    return {mapping[d] for d in getattr(a, "given_dests", set()) if d in mapping}


def start_log(a, logfile: str | Path | None = None) -> None:
    """Log to the terminal (warnings only with --quiet) and ``logfile``; the command line first."""
    setup_logging(logfile, quiet=getattr(a, "quiet", False))
    if getattr(a, "command_line", None):
        logging.getLogger("spa3d").info(" ".join(a.command_line))


def add_ml_options(p: argparse.ArgumentParser, ini_high: float, maps: str) -> None:
    """The options 3D classification and refinement share (RELION's names): sampling, offsets, reference, masks,
    CTF, symmetry; ``maps`` names what --flatten-solvent masks ("class maps", "half maps")."""
    p.add_argument("--angular-sampling", type=float, default=7.5, help="(initial) angular sampling in degrees: 15, "
                   "7.5, 3.7 (default 7.5)")
    p.add_argument("--healpix-order", type=int, default=None,
                   help="coarse HEALPix order (overrides --angular-sampling; 7.5° = 2)")
    p.add_argument("--offset-range", type=float, default=5.0, help="offset search range in pixels (default 5)")
    p.add_argument("--offset-step", type=float, default=2.0,
                   help="coarse offset search step in pixels, as relion_refine's --offset_step: the search ends at "
                   "half of it, so RELION's GUI step of 1 pixel is 2 here (default 2, the GUI's default)")
    p.add_argument("--perturb", type=float, default=0.5,
                   help="random perturbation of the search grid each iteration, as a fraction of the angular and "
                   "offset steps (RELION's --perturb, default 0.5; 0: a fixed grid)")
    p.add_argument("--ini-high", type=float, default=ini_high,
                   help=f"initial low-pass of the reference in Å (default {ini_high:g})")
    p.add_argument("--particle-diameter", type=float, default=None, help="mask diameter in Å (default: the box)")
    # on by default, as RELION's GUI runs its Class3D and Refine3D jobs (--no-ctf etc. turn them off)
    p.add_argument("--zero-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="zeros outside the particle mask (default on, RELION's GUI; --no-zero-mask: noise)")
    p.add_argument("--flatten-solvent", action=argparse.BooleanOptionalAction, default=True,
                   help=f"mask the {maps} with the particle sphere (default on: RELION's GUI always does)")
    p.add_argument("--ctf", action=argparse.BooleanOptionalAction, default=True,
                   help="CTF correction (default on, RELION's GUI; --no-ctf for particles without CTF)")
    p.add_argument("--ctf-intact-first-peak", action="store_true")
    p.add_argument("--ctf-phase-flipped", action="store_true")
    p.add_argument("--firstiter-cc", action="store_true",
                   help="first iteration by cross-correlation (reference not on absolute greyscale)")
    p.add_argument("--sym", default="C1", help="point group (default C1)")
    p.add_argument("--norm", action=argparse.BooleanOptionalAction, default=True,
                   help="normalisation correction: each image scaled to the average noise level, its scale "
                   "written as rlnNormCorrection (RELION's --norm, on in its GUI; default on)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Batch size, --dry-run/--seed/--continue/--quiet, device and Dask options of the iterative jobs."""
    p.add_argument("--batch-size", type=int, default=None, help="particles per batch (default: from free memory)")
    add_iterative(p)
    add_device(p)
    add_dask(p)


def ml_option_values(a) -> dict:
    """The values of :func:`add_ml_options` and :func:`add_run_options` as the options dataclasses name them."""
    from spa3d.geometry.sampling import healpix_order_for_sampling

    order = a.healpix_order if a.healpix_order is not None else healpix_order_for_sampling(a.angular_sampling)
    return dict(healpix_order=order, offset_range=a.offset_range, offset_step=a.offset_step, ini_high=a.ini_high,
                particle_diameter=a.particle_diameter, zero_mask=a.zero_mask, flatten_solvent=a.flatten_solvent,
                ctf=a.ctf, ctf_intact_first_peak=a.ctf_intact_first_peak, ctf_phase_flipped=a.ctf_phase_flipped,
                firstiter_cc=a.firstiter_cc, perturb=a.perturb, norm_correction=a.norm, symmetry=a.sym, batch_size=a.batch_size, seed=a.seed, dry_run=a.dry_run,
                device=a.device, threads=a.threads, workers=a.workers, dask_scheduler=a.dask_scheduler)
