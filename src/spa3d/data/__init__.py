"""Data shipped with spa3d: the default structure of the demo (PDB 1TII, E. coli heat-labile enterotoxin IIb, AB5)."""

from importlib.resources import files


def default_structure() -> str:
    """Path of the embedded PDB 1TII (gzipped PDB; gemmi reads it directly)."""
    return str(files("spa3d.data") / "1tii.pdb.gz")
