"""``spa3d report``: (re)write a job's report.html and PNGs (every job writes one when it ends).

The report itself is :func:`spa3d.report.job_report.make_report`.
"""

from __future__ import annotations

from pathlib import Path

from spa3d.errors import InputError

DESCRIPTION = ("Write JOBDIR/report.html (self-contained, images embedded) and JOBDIR/report/*.png: per-iteration "
               "plots, slices, projections and isosurfaces of the maps, class gallery, orientation distribution, "
               "FSC against a ground truth, particle gallery.")


def add_args(p) -> None:
    p.add_argument("job_dir", help="job directory")
    p.add_argument("--truth", default=None, help="ground-truth map for FSC curves (.mrc)")


def main(a) -> None:
    from spa3d.jobs.progress import setup_logging
    from spa3d.report.job_report import make_report

    setup_logging()
    if not Path(a.job_dir).is_dir():
        raise InputError(a.job_dir, "not a directory")
    make_report(a.job_dir, a.truth)
