"""simulate and reconstruct as a user runs them: ground truth recovered, same seed same data."""

import numpy as np
import pytest

from spa3d.cli.main import main
from spa3d.data import default_structure
from spa3d.fourier.filters import fsc, resolution_at
from spa3d.io.mrc import read_header, read_map
from spa3d.io.particles import ParticleSet
from spa3d.io.star import read_star


def test_reconstruct_reaches_ground_truth(sim_dataset, tmp_path):
    out = tmp_path / "rec.mrc"
    assert main(["reconstruct", "--i", str(sim_dataset / "particles.star"), "--o", str(out), "--ctf", "--quiet"]) == 0
    rec, apix = read_map(out)
    truth, _ = read_map(sim_dataset / "truth_class001.mrc")
    assert apix == pytest.approx(2.0)
    # 1,000 particles at SNR 0.1 with true poses: FSC 0.5 finer than 6 Å
    assert resolution_at(fsc(rec, truth), 64, apix, 0.5) < 6.0
    # without CTF correction the same data give a clearly worse map
    out2 = tmp_path / "noctf.mrc"
    assert main(["reconstruct", "--i", str(sim_dataset / "particles.star"), "--o", str(out2), "--quiet"]) == 0
    assert resolution_at(fsc(read_map(out2)[0], truth), 64, apix, 0.5) > resolution_at(fsc(rec, truth), 64, apix, 0.5)


def test_half_sets_and_classes(sim_dataset, tmp_path):
    a, b = tmp_path / "h1.mrc", tmp_path / "h2.mrc"
    for k, out in ((1, a), (2, b)):
        assert main(["reconstruct", "--i", str(sim_dataset / "particles.star"), "--o", str(out), "--ctf",
                     "--subset", str(k), "--quiet"]) == 0
    curve = fsc(read_map(a)[0], read_map(b)[0])
    assert curve[1:10].min() > 0.8  # independent halves agree at low resolution


def test_micrographs_hold_the_particles(tmp_path):
    d = tmp_path / "mics"
    assert main(["simulate", "--i", default_structure(), "--o", str(d), "--n", "600", "--micrographs", "6",
                 "--mic-size", "384", "--snr", "0.3", "--seed", "3", "--quiet"]) == 0
    mics = read_star(d / "micrographs_ctf.star")
    assert len(mics["micrographs"]) == 6 and "rlnMicrographPixelSize" in mics["optics"]
    h = read_header(d / "Micrographs" / "mic001.mrc")
    assert h.shape == (1, 384, 384)
    ps = ParticleSet(d / "particles.star")
    assert set(ps.column("rlnMicrographName")) == set(mics["micrographs"]["rlnMicrographName"])
    # particles cut from the micrographs (inverted) reconstruct the truth at their poses and origins
    assert main(["reconstruct", "--i", str(d / "particles.star"), "--o", str(d / "rec.mrc"), "--ctf", "--quiet"]) == 0
    rec, apix = read_map(d / "rec.mrc")
    truth, _ = read_map(d / "truth_class001.mrc")
    assert resolution_at(fsc(rec, truth), 64, apix, 0.5) < 8.0
    # protein is dark on the micrographs: the micrograph around a particle anticorrelates with its extracted image
    mic, _ = read_map(d / "Micrographs" / "mic001.mrc")
    x, y = int(ps.column("rlnCoordinateX")[0]), int(ps.column("rlnCoordinateY")[0])
    assert np.corrcoef(mic[0, y - 32:y + 32, x - 32:x + 32].ravel(), ps.read([0])[0].ravel())[0, 1] < -0.99


def test_same_seed_same_data(tmp_path):
    for name in ("a", "b"):
        assert main(["simulate", "--i", default_structure(), "--o", str(tmp_path / name), "--n", "50",
                     "--seed", "7", "--quiet"]) == 0
    pa, pb = ParticleSet(tmp_path / "a" / "particles.star"), ParticleSet(tmp_path / "b" / "particles.star")
    np.testing.assert_array_equal(pa.read(np.arange(50)), pb.read(np.arange(50)))
    np.testing.assert_array_equal(pa.angles(), pb.angles())


def test_simulate_bad_input(tmp_path, capsys):
    assert main(["simulate", "--i", str(tmp_path / "missing.pdb"), "--o", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pdb" in err[0]
    assert main(["simulate", "--i", default_structure(), "--o", str(tmp_path / "y"), "--box", "63", "--quiet"]) == 2
    assert not (tmp_path / "y" / "particles.star").exists()
