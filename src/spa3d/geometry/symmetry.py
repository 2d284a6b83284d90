"""Point groups Cn, Dn, T, O, I (I2) with RELION's axis conventions.

The groups are generated from RELION's generator axes (symmetries.cpp):
Cn: n-fold along z. Dn: n-fold along z and a 2-fold along x. T: 3-fold along
z and a 2-fold along (0, 0.816496, 0.577350). O: 3-fold along (1, 1, 1)/√3
and a 4-fold along z. I (= I2): 2-fold along z, 5-fold along
(0.525731, 0, 0.850651), 3-fold along (0, 0.356822, 0.934172).
I1, I3 and I4 are also available with RELION's axes.
"""

from __future__ import annotations

import re

import numpy as np

from spa3d.errors import InputError
from spa3d.geometry.euler import rotation_about_axis

_GENERATORS = {
    "T": [(3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0.0, 0.0, 1.0))],
    "I": [(2, (0.0, 0.0, 1.0)), (5, (0.525731114, 0.0, 0.850650807)), (3, (0.0, 0.356822076, 0.934172364))],
    "I1": [(2, (1.0, 0.0, 0.0)), (5, (0.85065080702670, 0.0, -0.5257311142635)), (3, (0.9341723640, 0.3568220765, 0.0))],
    "I3": [(2, (-0.5257311143, 0.0, 0.8506508070)), (5, (0.0, 0.0, 1.0)), (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0.0, 0.8506508070)), (5, (0.8944271932547096, 0.0, 0.4472135909903704)), (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}
_GENERATORS["I2"] = _GENERATORS["I"]


def _generators(name: str):
    n = name.upper()
    m = re.fullmatch(r"([CD])(\d+)", n)
    if m:
        order = int(m.group(2))
        if order < 1:
            raise InputError(None, f"symmetry group {name}: order must be at least 1")
        gens = [(order, (0.0, 0.0, 1.0))]
        if m.group(1) == "D":
            gens.append((2, (1.0, 0.0, 0.0)))
        return gens
    if n in _GENERATORS:
        return _GENERATORS[n]
    raise InputError(None, f"unknown or unsupported symmetry group '{name}' (use Cn, Dn, T, O, I, I1-I4)")


def symmetry_matrices(name: str) -> np.ndarray:
    """All rotation matrices (|G|, 3, 3) of point group ``name``, identity first."""
    gens = [rotation_about_axis(axis, 360.0 / fold) for fold, axis in _generators(name) if fold > 1]
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in gens:
                c = h @ g
                if not any(np.allclose(c, e, atol=1e-4) for e in group):
                    group.append(c)
                    new.append(c)
        frontier = new
        if len(group) > 120:
            raise RuntimeError(f"symmetry group {name} did not close")
    mats = np.array(group)
    mats[np.abs(mats) < 1e-12] = 0.0
    return mats


def generator_matrices(name: str) -> np.ndarray:
    """The rotations (k, 3, 3) that generate point group ``name`` (RELION's generator axes)."""
    gens = [rotation_about_axis(axis, 360.0 / fold) for fold, axis in _generators(name) if fold > 1]
    return np.array(gens).reshape(-1, 3, 3)


def group_order(name: str) -> int:
    return len(symmetry_matrices(name))
