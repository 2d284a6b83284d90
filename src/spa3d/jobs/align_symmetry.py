"""``spa3d align-symmetry``: turn a map so its symmetry axes lie on RELION's axes (``relion_align_symmetry``).

The search is :func:`spa3d.jobs.symmetry.align_symmetry`.
"""

from __future__ import annotations

from spa3d.jobs.symmetry import run_align_symmetry

DESCRIPTION = ("Find the rotation (after re-centring on the centre of mass) that puts the map's symmetry axes on "
               "RELION's convention for the group, as relion_align_symmetry does; print it and how symmetric the "
               "map is.")


def add_args(p) -> None:
    p.add_argument("--i", required=True, help="input map (.mrc)")
    p.add_argument("--o", required=True, help="output map (.mrc)")
    p.add_argument("--sym", required=True, help="point group: Cn, Dn, T, O, I")
    p.add_argument("--box-size", type=int, default=32, help="working box in pixels for the search (default 32)")
    p.add_argument("--keep-centre", action="store_true", help="do not re-centre the map on its centre of mass")


def main(a) -> None:
    run_align_symmetry(a.i, a.o, a.sym, working_box=a.box_size, keep_centre=a.keep_centre)
