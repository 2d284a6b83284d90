"""spa3d against RELION 3.1.3 on the same input: projection, conventions, reconstruction."""

import numpy as np
import pytest

from spa3d.cli.main import main
from spa3d.fourier.filters import fsc, resolution_at, soft_sphere
from spa3d.fourier.projector import Projector
from spa3d.geometry.euler import euler_to_matrix
from spa3d.io.mrc import read_map
from spa3d.io.particles import ParticleSet
from spa3d.jobs.simulate import render_particles

pytestmark = pytest.mark.relion


def _spa3d_images(vol, ps, idx, origin_sign=-1.0, transpose=False):
    mats = euler_to_matrix(*ps.angles()[idx].T)
    if transpose:
        mats = np.transpose(mats, (0, 2, 1))
    return render_particles([Projector(vol)], np.zeros(len(idx), int), mats, origin_sign * ps.origins_px()[idx],
                            ps.ctf_params(idx), ps.box, ps.pixel_size)


def _corr(a, b, mask):
    return np.array([np.corrcoef(x[mask], y[mask])[0, 1] for x, y in zip(a, b)])


def test_projection_with_ctf_matches_relion_project(relion_dataset):
    vol, _ = read_map(relion_dataset / "truth_class001.mrc")
    ps = ParticleSet(relion_dataset / "clean.star")
    rel = ParticleSet(relion_dataset / "clean.star")
    idx = np.arange(300)
    mine = _spa3d_images(vol, ps, idx)
    theirs = rel.read(idx)
    particle_area = soft_sphere(64, 28, 0, ndim=2) > 0.5
    c = _corr(mine, theirs, particle_area)
    assert c.min() >= 0.999
    scale = (mine * theirs).sum() / (mine**2).sum()
    assert scale == pytest.approx(1.0, abs=0.01)  # same absolute scale as RELION


def test_euler_and_origin_conventions_agree_with_relion(relion_dataset):
    """A particle made by relion_project at a known pose is found by spa3d at that pose, not its mirror."""
    vol, _ = read_map(relion_dataset / "truth_class001.mrc")
    ps = ParticleSet(relion_dataset / "clean.star")
    noisy = ParticleSet(relion_dataset / "noisy.star")
    idx = np.arange(200)
    data = noisy.read(idx)
    area = soft_sphere(64, 28, 0, ndim=2) > 0.5
    right = _corr(_spa3d_images(vol, ps, idx), data, area)
    wrong_origin = _corr(_spa3d_images(vol, ps, idx, origin_sign=+1.0), data, area)
    inverse_rotation = _corr(_spa3d_images(vol, ps, idx, transpose=True), data, area)
    # mirror: the hand-flipped map (x -> -x) seen at the same pose
    mirror = _corr(_spa3d_images(vol[:, :, ::-1].copy(), ps, idx), data, area)
    assert np.mean(right) > 0.25
    for other in (wrong_origin, inverse_rotation, mirror):
        assert np.mean(right > other) > 0.95


def test_reconstruct_agrees_with_relion_reconstruct(relion_dataset, relion, tmp_path):
    relion("relion_reconstruct", "--i", "noisy.star", "--o", tmp_path / "relion.mrc", "--ctf", cwd=relion_dataset)
    assert main(["reconstruct", "--i", str(relion_dataset / "noisy.star"), "--o", str(tmp_path / "spa3d.mrc"),
                 "--ctf", "--quiet"]) == 0
    ours, apix = read_map(tmp_path / "spa3d.mrc")
    theirs, _ = read_map(tmp_path / "relion.mrc")
    truth, _ = read_map(relion_dataset / "truth_class001.mrc")
    mutual = fsc(ours, theirs)
    assert mutual[1 : int(0.8 * 32) + 1].min() >= 0.9  # up to 0.8 x Nyquist
    ours_res = resolution_at(fsc(ours, truth), 64, apix, 0.5)
    theirs_res = resolution_at(fsc(theirs, truth), 64, apix, 0.5)
    assert ours_res <= theirs_res * 1.05


def test_reconstruct_with_symmetry_and_maxres_agrees_with_relion(relion_dataset, relion, tmp_path):
    relion("relion_reconstruct", "--i", "noisy.star", "--o", tmp_path / "relion_d2.mrc", "--sym", "D2",
           "--maxres", "8", "--ctf", cwd=relion_dataset)
    assert main(["reconstruct", "--i", str(relion_dataset / "noisy.star"), "--o", str(tmp_path / "spa3d_d2.mrc"),
                 "--sym", "D2", "--maxres", "8", "--ctf", "--quiet"]) == 0
    ours, _ = read_map(tmp_path / "spa3d_d2.mrc")
    theirs, _ = read_map(tmp_path / "relion_d2.mrc")
    mutual = fsc(ours, theirs)
    assert mutual[1:14].min() >= 0.9  # up to 8 Å = shell 16
