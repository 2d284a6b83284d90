"""Run a job from its parsed options: in a RELION project or a plain directory, then write its report.

The ``spa3d`` command and the demo both run jobs through :func:`run_job`:
with ``--project`` the job gets the project's next ``<Type>/jobNNN/`` and a
pipeline entry (:func:`spa3d.jobs.pipeline.project_job`); ``--continue``
resumes in the job directory it names; ``--dry-run`` only prints the
estimate (no directory, no pipeline entry, no report). Jobs that write
results into a job directory then write its report.html.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spa3d.errors import InputError

#: jobs that can run in a RELION project directory (--project), with their RELION job type
PROJECT_JOBS = {"simulate": "Import", "initial-model": "InitialModel", "class3d": "Class3D", "refine3d": "Refine3D",
                "mask": "MaskCreate", "postprocess": "PostProcess", "select": "Select",
                "extract": "Extract"}
#: jobs that write report.html into their job directory when they end
REPORTED_JOBS = ("simulate", "initial-model", "class3d", "refine3d", "mask", "postprocess", "select", "extract")


def given_dests(module, argv: list[str]) -> set[str]:
    """Names (argparse dests) of the options of ``module``'s job that ``argv`` gives (not left at defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    module.add_args(p)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(p.parse_known_args(argv)[0]))
    except SystemExit:
        return set()


def parse_job_args(name: str, module, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the job's own options (``module.add_args``), ready for :func:`run_job`."""
    p = argparse.ArgumentParser(prog=f"spa3d {name}")
    module.add_args(p)
    args = p.parse_args([str(x) for x in argv])
    args.job, args.func = name, module.main
    args.command_line = ["spa3d", name, *map(str, argv)]
    args.given_dests = given_dests(module, [str(x) for x in argv])
    return args


def continued_job_dir(args) -> str | None:
    """The job directory a ``--continue`` resumes in: the directory given, or the optimiser.star's."""
    cont = getattr(args, "continue_from", None)
    if not cont:
        return None
    p = Path(cont)
    project = getattr(args, "project", None)
    where = Path(project) / p if project and not p.is_absolute() else p  # --project: relative to the project
    return str(p if where.is_dir() else p.parent)


def run_job(args) -> str | None:
    """Run ``args.func(args)`` for job ``args.job``; returns the job directory (``args.o``) it wrote into."""
    if getattr(args, "dry_run", False):  # an estimate only: no job directory, no pipeline entry, no report
        if getattr(args, "o", None) is None:
            args.o = continued_job_dir(args) or "."
        args.func(args)
        return None
    if args.job in PROJECT_JOBS and getattr(args, "project", None):
        from spa3d.jobs.pipeline import job_nodes, project_job

        if args.o is not None:
            raise InputError(None, "give either --o or --project, not both")
        with project_job(args.project, PROJECT_JOBS[args.job], args.command_line,
                         continue_job=continued_job_dir(args)) as record:
            args.o = str(record.job_dir)
            args.func(args)
            record.inputs, record.outputs = job_nodes(args.job, args, record.job_dir)
            _report(args)
        return args.o
    if args.job in PROJECT_JOBS and args.o is None:
        args.o = continued_job_dir(args)
        if args.o is None:
            raise InputError(None, "give --o JOBDIR or --project DIR")
    args.func(args)
    _report(args)
    return getattr(args, "o", None)


def _report(args) -> None:
    if args.job in REPORTED_JOBS and not getattr(args, "no_report", False):
        from spa3d.report.job_report import make_report

        make_report(args.o)
