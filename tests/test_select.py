"""Class selection: the chosen particles, re-centring with RELION's sign, regrouping, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spa3d.cli.main import main
from spa3d.geometry.euler import euler_to_matrix
from spa3d.io.mrc import write_map
from spa3d.io.star import read_particles_star, read_star, write_star

COM = np.array([3.0, -2.0, 1.0])  # x, y, z pixels from the box centre


def _blob(centre_xyz, n=64, sigma=3.0):
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.exp(-((x - centre_xyz[0]) ** 2 + (y - centre_xyz[1]) ** 2 + (z - centre_xyz[2]) ** 2) / (2 * sigma ** 2))


@pytest.fixture()
def fake_class3d(mic_project, tmp_path):
    """A classification job of the micrograph project's particles: class 1 a centred blob, class 2 a blob whose
    centre of mass is at COM; random classes (seeded)."""
    job = tmp_path / "Class3D"
    job.mkdir()
    write_map(job / "run_it025_class001.mrc", _blob((0, 0, 0)), 2.0)
    write_map(job / "run_it025_class002.mrc", _blob(COM), 2.0)
    t = read_star(mic_project / "particles.star")
    parts = t["particles"].copy()
    parts["rlnClassNumber"] = np.random.default_rng(1).integers(1, 3, len(parts))
    write_star(job / "run_it025_data.star", {"optics": t["optics"], "particles": parts})
    classes = pd.DataFrame({"rlnReferenceImage": [str(job / "run_it025_class001.mrc"), str(job / "run_it025_class002.mrc")],
                            "rlnClassDistribution": [0.5, 0.5], "rlnAccuracyRotations": [3.0, 4.0],
                            "rlnAccuracyTranslationsAngst": [1.0, 1.0], "rlnEstimatedResolution": [12.0, 14.0]})
    groups = pd.DataFrame({"rlnGroupNumber": [1], "rlnGroupScaleCorrection": [1.0]})
    write_star(job / "run_it025_model.star", {"model_general": {"rlnPixelSize": 2.0}, "model_classes": classes,
                                              "model_groups": groups})
    return job, parts


def test_select_keeps_the_chosen_classes_and_the_optics(fake_class3d, tmp_path):
    job, parts = fake_class3d
    assert main(["select", "--i", str(job / "run_it025_model.star"), "--o", str(tmp_path / "Sel"),
                 "--classes", "2", "--quiet"]) == 0
    out = read_particles_star(tmp_path / "Sel" / "particles.star")
    want = parts[parts["rlnClassNumber"] == 2]
    assert list(out.particles["rlnImageName"]) == list(want["rlnImageName"])
    src = read_particles_star(job / "run_it025_data.star")
    pd.testing.assert_frame_equal(out.optics, src.optics)
    assert np.allclose(out.particles["rlnOriginXAngst"], want["rlnOriginXAngst"])  # no --recenter: unchanged


def test_select_recenter_moves_origins_by_the_projected_centre_of_mass(fake_class3d, tmp_path):
    """Class 2's mass is off-centre by COM: each origin must move by −(A·COM)_xy (RELION's sign); class 1 stays."""
    job, parts = fake_class3d
    assert main(["select", "--i", str(job / "run_it025_model.star"), "--o", str(tmp_path / "Sel"),
                 "--classes", "1,2", "--recenter", "--quiet"]) == 0
    out = read_particles_star(tmp_path / "Sel" / "particles.star").particles
    a = euler_to_matrix(*(parts[f"rlnAngle{n}"].to_numpy(float) for n in ("Rot", "Tilt", "Psi")))
    moved = np.einsum("nij,j->ni", a, COM)[:, :2] * 2.0  # Å
    is2 = (parts["rlnClassNumber"] == 2).to_numpy()
    want_x = parts["rlnOriginXAngst"].to_numpy(float) - np.where(is2, moved[:, 0], 0)
    want_y = parts["rlnOriginYAngst"].to_numpy(float) - np.where(is2, moved[:, 1], 0)
    assert np.abs(out["rlnOriginXAngst"].to_numpy(float) - want_x).max() < 0.01
    assert np.abs(out["rlnOriginYAngst"].to_numpy(float) - want_y).max() < 0.01
    assert np.abs(moved[is2]).max() > 2.0  # the shift is large enough to see a wrong sign


def test_select_recenter_then_extract_matches_relion_recentring_on_the_point(relion, fake_class3d, mic_project, tmp_path):
    """select --recenter then re-extraction with --recenter puts each particle where relion_preprocess puts it when
    told to re-centre on the class's centre of mass (--recenter_x/y/z): same true centres to 0.01 px."""
    job, parts = fake_class3d
    only2 = parts[parts["rlnClassNumber"] == 2]
    t = read_star(job / "run_it025_data.star")
    write_star(tmp_path / "class2.star", {"optics": t["optics"], "particles": only2})
    relion("relion_preprocess", "--i", "micrographs_ctf.star", "--reextract_data_star", str(tmp_path / "class2.star"),
           "--part_dir", str(tmp_path / "R") + "/", "--part_star", str(tmp_path / "R" / "particles.star"), "--extract",
           "--extract_size", "96", "--recenter", "--recenter_x", str(COM[0]), "--recenter_y", str(COM[1]),
           "--recenter_z", str(COM[2]), cwd=mic_project)
    assert main(["select", "--i", str(job / "run_it025_model.star"), "--o", str(tmp_path / "Sel"),
                 "--classes", "2", "--recenter", "--quiet"]) == 0
    relion("relion_preprocess", "--i", "micrographs_ctf.star", "--reextract_data_star", str(tmp_path / "Sel" / "particles.star"),
           "--part_dir", str(tmp_path / "S") + "/", "--part_star", str(tmp_path / "S" / "particles.star"), "--extract",
           "--extract_size", "96", "--recenter", cwd=mic_project)
    r = read_particles_star(tmp_path / "R" / "particles.star").particles
    s = read_particles_star(tmp_path / "S" / "particles.star").particles
    for ax in "XY":
        cr = r[f"rlnCoordinate{ax}"].to_numpy(float) - r[f"rlnOrigin{ax}Angst"].to_numpy(float) / 2.0
        cs = s[f"rlnCoordinate{ax}"].to_numpy(float) - s[f"rlnOrigin{ax}Angst"].to_numpy(float) / 2.0
        assert np.abs(cr - cs).max() < 0.01


def test_select_regroup(fake_class3d, tmp_path):
    job, parts = fake_class3d
    d = read_star(job / "run_it025_data.star")
    p = d["particles"].copy()
    p["rlnGroupNumber"] = np.arange(len(p)) % 8 + 1
    write_star(job / "run_it025_data.star", {"optics": d["optics"], "particles": p})
    assert main(["select", "--i", str(job / "run_it025_model.star"), "--o", str(tmp_path / "Sel"),
                 "--classes", "1,2", "--regroup", "2", "--quiet"]) == 0
    out = read_particles_star(tmp_path / "Sel" / "particles.star").particles
    counts = out["rlnGroupNumber"].value_counts()
    assert sorted(counts.index) == [1, 2] and counts.min() >= 15


@pytest.mark.parametrize("args, problem", [
    (["--classes", "5"], "classes 1..2"),
    (["--best", "3"], "has 2 classes"),
    ([], "--classes"),
], ids=["no-such-class", "too-many-best", "nothing-chosen"])
def test_select_bad_input(fake_class3d, tmp_path, capsys, args, problem):
    job, _ = fake_class3d
    assert main(["select", "--i", str(job / "run_it025_model.star"), "--o", str(tmp_path / "Sel"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]
    assert not (tmp_path / "Sel" / "particles.star").exists()


def test_select_missing_data_star(fake_class3d, tmp_path, capsys):
    job, _ = fake_class3d
    (job / "run_it025_data.star").unlink()
    assert main(["select", "--i", str(job / "run_it025_model.star"), "--o", str(tmp_path / "Sel"), "--best", "1",
                 "--quiet"]) == 2
    assert "run_it025_data.star" in capsys.readouterr().err
