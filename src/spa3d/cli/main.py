"""``spa3d <job> [options]``: the command-line entry point.

It only lists the jobs: each job's module defines its options
(``add_args(parser)``) and runs them (``main(args)``), the pattern of
cryoDRGN's commands. Every job's options use RELION's names with hyphens. Units: lengths in Å
unless the help says pixels; angles in degrees. A problem with the input is
reported as one line ``spa3d <job>: error: <file>: <problem>`` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spa3d import __version__
from spa3d.errors import InputError
from spa3d.jobs.runner import given_dests, run_job


#: the jobs: name -> (module defining ``add_args(parser)``, ``main(args)``, HELP and DESCRIPTION; one-line help).
#: A job's module is imported only when that job runs (or shows its help), so ``spa3d --help`` stays instant.
JOBS = {
    "simulate": ("spa3d.jobs.simulate", "simulate particles (and micrographs) with known ground truth"),
    "reconstruct": ("spa3d.jobs.reconstruct", "3D map from particles with known poses (as relion_reconstruct)"),
    "initial-model": ("spa3d.jobs.initial_model", "de novo initial model by SGD (RELION 3.1 InitialModel)"),
    "class3d": ("spa3d.jobs.class3d", "3D classification by maximum likelihood (RELION 3.1 Class3D)"),
    "refine3d": ("spa3d.jobs.refine3d", "gold-standard 3D auto-refinement (RELION 3.1 Refine3D)"),
    "mask": ("spa3d.jobs.mask", "soft solvent mask from a map (as relion_mask_create)"),
    "postprocess": ("spa3d.jobs.postprocess", "resolution and sharpening from two half maps (as relion_postprocess)"),
    "symmetrize": ("spa3d.jobs.symmetrize", "impose a point group on a map (as relion_image_handler --sym)"),
    "align-symmetry": ("spa3d.jobs.align_symmetry", "rotate a map so its symmetry axes lie on RELION's axes"),
    "select": ("spa3d.jobs.select", "keep the particles of chosen 3D classes (RELION's Select)"),
    "extract": ("spa3d.jobs.extract", "re-extract particles from micrographs (relion_preprocess --reextract_data_star)"),
    "fit": ("spa3d.jobs.fit", "fit an atomic model into a map and tell the map's hand (Chimera's Fit in Map)"),
    "report": ("spa3d.jobs.report", "(re)write a job's report.html and PNGs"),
    "demo": ("spa3d.jobs.demo", "run the workflow end to end on the embedded default data (PDB 1TII)"),
}


def build_parser(job: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``job``'s sub-command gets its module's options (the others only their one-line help)."""
    parser = argparse.ArgumentParser(prog="spa3d", description="Single-particle cryo-EM: 2D particles to 3D maps, "
                                     "RELION-compatible (STAR, MRC, RELION conventions).")
    parser.add_argument("--version", action="version", version=f"spa3d {__version__}")
    sub = parser.add_subparsers(dest="job", metavar="<job>")
    for name, (module, help_line) in JOBS.items():
        p = sub.add_parser(name, help=help_line)
        if name == job:
            mod = importlib.import_module(module)
            p.description = mod.DESCRIPTION
            mod.add_args(p)
            p.set_defaults(func=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    job = argv[0] if argv and argv[0] in JOBS else None
    parser = build_parser(job)
    args = parser.parse_args(argv)
    args.command_line = ["spa3d", *argv]
    args.given_dests = given_dests(importlib.import_module(JOBS[job][0]), argv[1:]) if job else set()
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        run_job(args)
    except InputError as exc:
        print(f"spa3d {args.job}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only or vanished directory...: say which file, no traceback
        where = exc.filename or getattr(args, "o", None) or "output"
        print(f"spa3d {args.job}: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"spa3d {args.job}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
