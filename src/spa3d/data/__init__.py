"""Data shipped with spa3d: the default structure of the demo (PDB 1TII, E. coli heat-labile enterotoxin IIb, AB5)."""

from __future__ import annotations

from importlib.resources import files

import numpy as np


def default_structure() -> str:
    """Path of the embedded PDB 1TII (gzipped PDB; gemmi reads it directly)."""
    return str(files("spa3d.data") / "1tii.pdb.gz")


def default_mixture(box: int = 64, pixel_size: float = 2.0, seed: int = 5) -> list[np.ndarray]:
    """Three species for classification demos and benchmarks, maps (box³) centred on their centres of mass.

    1. 1TII's AB5 complex (chains A, C, D–H);
    2. its B5 ring alone (chains D–H): the complex without its A subunit;
    3. "junk": an unrelated compact pseudo-protein, a random walk of 250
       carbon-like residues (3.8 Å steps, 7 atoms each) confined to a 20 Å sphere.
    """
    import gemmi

    from spa3d.io.atomic import density_from_atoms

    st = gemmi.read_structure(default_structure())
    st.remove_hydrogens()
    st.remove_waters()
    xyz, z, chain = [], [], []
    for ch in st[0]:
        for res in ch:
            for atom in res:
                xyz.append(atom.pos.tolist())
                z.append(atom.element.atomic_number)
                chain.append(ch.name)
    xyz, z, chain = np.asarray(xyz), np.asarray(z, dtype=float), np.asarray(chain)
    ring = np.isin(chain, list("DEFGH"))
    rng = np.random.default_rng(seed)
    walk = [np.zeros(3)]
    while len(walk) < 250:
        step = rng.normal(size=3)
        p = walk[-1] + 3.8 * step / np.linalg.norm(step)
        if np.linalg.norm(p) < 20.0:
            walk.append(p)
    walk = np.asarray(walk)
    junk = density_from_atoms(walk, np.full(len(walk), 7 * 6.6), box, pixel_size)
    return [density_from_atoms(xyz, z, box, pixel_size), density_from_atoms(xyz[ring], z[ring], box, pixel_size), junk]
