"""``spa3d symmetrize``: impose a point group on a map (what ``relion_image_handler --sym`` does).

The map is averaged over the rotations of the group, RELION's axes (:func:`spa3d.jobs.symmetry.symmetrize`).
"""

from __future__ import annotations

from spa3d.jobs.symmetry import run_symmetrize

DESCRIPTION = "Average a map over the rotations of a point group (RELION's axes)."


def add_args(p) -> None:
    p.add_argument("--i", required=True, help="input map (.mrc)")
    p.add_argument("--o", required=True, help="output map (.mrc)")
    p.add_argument("--sym", required=True, help="point group: Cn, Dn, T, O, I (I2), I1, I3, I4")


def main(a) -> None:
    run_symmetrize(a.i, a.o, a.sym)
