import numpy as np
import pytest

from spa3d.errors import InputError
from spa3d.geometry.euler import angular_distance_deg, euler_to_matrix, matrix_to_euler, random_rotations
from spa3d.geometry.sampling import (healpix_order_for_sampling, orientation_grid, psi_angles,
                                     translation_grid)
from spa3d.geometry.symmetry import symmetry_matrices


def test_euler_matrix_matches_relion_formula():
    rot, tilt, psi = 30.0, 50.0, -70.0
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    expected = np.array([
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb]])
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), expected, atol=1e-12)
    # A = Rz(psi) Ry(tilt) Rz(rot)
    def rz(t):
        c, s = np.cos(np.deg2rad(t)), np.sin(np.deg2rad(t))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])
    def ry(t):
        c, s = np.cos(np.deg2rad(t)), np.sin(np.deg2rad(t))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    np.testing.assert_allclose(rz(psi) @ ry(tilt) @ rz(rot), expected, atol=1e-12)


def test_euler_round_trip_including_degenerate_tilts():
    rng = np.random.default_rng(0)
    mats = random_rotations(500, rng)
    back = euler_to_matrix(*matrix_to_euler(mats))
    assert np.max(angular_distance_deg(mats, back)) < 1e-4
    for tilt in (0.0, 180.0):
        m = euler_to_matrix(40.0, tilt, 25.0)
        assert angular_distance_deg(m, euler_to_matrix(*matrix_to_euler(m))) < 1e-4


@pytest.mark.parametrize("name,order", [("C1", 1), ("C4", 4), ("D2", 4), ("D7", 14), ("T", 12), ("O", 24),
                                        ("I", 60), ("I1", 60), ("I3", 60), ("I4", 60)])
def test_point_groups_are_closed_groups_of_rotations(name, order):
    g = symmetry_matrices(name)
    assert len(g) == order
    for r in g:
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-6)
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-6)
    for a in g[: min(order, 12)]:
        for b in g:
            assert np.min(np.abs(g - a @ b).reshape(len(g), -1).max(1)) < 1e-4


def test_relion_axis_conventions():
    # D2: 2-folds along z and x; I2: a 2-fold along z and a 5-fold along (0.5257, 0, 0.8507)
    d2 = symmetry_matrices("D2")
    assert any(np.allclose(r, np.diag([1, -1, -1]), atol=1e-9) for r in d2)
    assert any(np.allclose(r, np.diag([-1, -1, 1]), atol=1e-9) for r in d2)
    ico = symmetry_matrices("I")
    axis = np.array([0.525731114, 0.0, 0.850650807])
    fivefolds = [r for r in ico if np.allclose(r @ axis, axis, atol=1e-5) and not np.allclose(r, np.eye(3))]
    assert len(fivefolds) == 4


def test_unknown_symmetry_is_an_input_error():
    with pytest.raises(InputError):
        symmetry_matrices("X5")


def test_sampling_counts_as_relion():
    assert healpix_order_for_sampling(15) == 1 and healpix_order_for_sampling(7.5) == 2
    assert healpix_order_for_sampling(3.7) == 3
    assert len(orientation_grid(1)) == 576  # order 1: 48 directions x 12 psi
    assert len(orientation_grid(2)) == 4608
    assert len(psi_angles(2)) == 24
    assert len(translation_grid(6, 2)) == 29
    assert len(translation_grid(5, 1)) == 81


@pytest.mark.parametrize("sym", ["C4", "D2", "T", "O", "I"])
def test_symmetry_reduced_grid_covers_every_direction(sym):
    order = 2
    full = orientation_grid(order)
    red = orientation_grid(order, sym)
    ops = symmetry_matrices(sym)
    n_dirs_full = len(full) // 24
    n_dirs_red = len(red) // 24
    assert n_dirs_red <= n_dirs_full / len(ops) * 3 + 1
    dirs = euler_to_matrix(red[::24, 0], red[::24, 1], 0 * red[::24, 0])[:, 2]
    images = np.einsum("nj,gjk->gnk", dirs, ops).reshape(-1, 3)
    all_dirs = euler_to_matrix(full[::24, 0], full[::24, 1], 0 * full[::24, 0])[:, 2]
    worst = np.rad2deg(np.arccos(np.clip((all_dirs @ images.T).max(1), -1, 1))).max()
    assert worst <= 15.0  # within one step (15° at order 2) of a kept direction
