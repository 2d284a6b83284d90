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
