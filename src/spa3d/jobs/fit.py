"""``spa3d fit``: fit an atomic model into a map and tell the map's hand (Chimera's Fit in Map).

The fit itself is :func:`spa3d.maps.fit.run_fit`.
"""

from __future__ import annotations

DESCRIPTION = ("Rigid-body fit of an atomic model (PDB/mmCIF) into a map: global search over rotations and "
               "translations, then local refinement, on the model's density simulated at the map's resolution. "
               "Prints the correlation, the transformation, the correlation with the mirrored map and the hand; "
               "writes the fitted model.")


def add_args(p) -> None:
    p.add_argument("--map", required=True, help="map (.mrc)")
    p.add_argument("--model", required=True, help="atomic model (.pdb, .cif, optionally gzipped)")
    p.add_argument("--o", default=None, help="fitted model (.pdb or .cif; default <model>_fitted.pdb beside the map)")
    p.add_argument("--resolution", type=float, default=None,
                   help="resolution in Å of the simulated model density (default 3 pixels)")


def main(a) -> None:
    from spa3d.maps.fit import run_fit

    run_fit(a.map, a.model, a.o, a.resolution)
