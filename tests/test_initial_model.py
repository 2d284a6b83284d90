"""spa3d initial-model: converges from random references, resumes with --continue, same seed same map."""

import numpy as np
import pytest

from spa3d.cli.main import main
from spa3d.fourier.filters import fsc, resolution_at
from spa3d.inference.sgd import SgdSchedule
from spa3d.io.mrc import read_map
from spa3d.io.star import read_star
from spa3d.maps.align import superpose
from conftest import check_estimate

SHORT = ["--sgd-ini-iter", "4", "--sgd-inbetween-iter", "12", "--sgd-fin-iter", "4", "--sgd-ini-subset", "100",
         "--sgd-fin-subset", "200", "--sgd-write-iter", "10", "--particle-diameter", "110", "--seed", "3"]


@pytest.fixture(scope="module")
def im_data(make_dataset):
    return make_dataset(600, 0.5, 21)


@pytest.fixture(scope="module")
def im_run(im_data, tmp_path_factory):
    job = tmp_path_factory.mktemp("im") / "InitialModel"
    assert main(["initial-model", "--i", str(im_data / "particles.star"), "--o", str(job), *SHORT]) == 0
    return job


def test_schedule_is_relions():
    s = SgdSchedule()
    assert s.total == 150
    assert s.at(1) == (35.0, 100) and s.at(25) == (35.0, 100)
    assert s.at(75) == (pytest.approx(25.0), 300) and s.at(125) == (15.0, 500) and s.at(150) == (15.0, 500)


def test_initial_model_reaches_ground_truth(im_data, im_run):
    for f in ("run_it010_class001.mrc", "run_it020_class001.mrc", "run_it020_model.star", "run_it020_data.star",
              "run_it020_optimiser.star", "run.log"):
        assert (im_run / f).exists(), f
    vol, apix = read_map(im_run / "run_it020_class001.mrc")
    truth, _ = read_map(im_data / "truth_class001.mrc")
    aligned, sup = superpose(vol, truth)
    res = resolution_at(fsc(aligned, truth), 64, apix, 0.5)
    assert res < 2 * 15.0  # finer than twice the final SGD resolution
    model = read_star(im_run / "run_it020_model.star")
    assert model["model_classes"]["rlnClassDistribution"].iloc[0] == pytest.approx(1.0)
    data = read_star(im_run / "run_it020_data.star")["particles"]
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnClassNumber"} <= set(data.columns)


def test_continue_gives_the_uninterrupted_result(im_data, im_run, tmp_path):
    job = tmp_path / "cont"
    assert main(["initial-model", "--i", str(im_data / "particles.star"), "--o", str(job), *SHORT,
                 "--continue", str(im_run / "run_it010_optimiser.star")]) == 0
    assert not (job / "run_it010_class001.mrc").exists()
    a, _ = read_map(im_run / "run_it020_class001.mrc")
    b, _ = read_map(job / "run_it020_class001.mrc")
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(a).max())


def test_same_seed_same_map(im_data, tmp_path):
    args = ["--sgd-ini-iter", "2", "--sgd-inbetween-iter", "2", "--sgd-fin-iter", "2", "--sgd-write-iter", "6",
            "--particle-diameter", "110", "--seed", "5"]
    for name in ("a", "b"):
        assert main(["initial-model", "--i", str(im_data / "particles.star"), "--o", str(tmp_path / name), *args]) == 0
    a, _ = read_map(tmp_path / "a" / "run_it006_class001.mrc")
    b, _ = read_map(tmp_path / "b" / "run_it006_class001.mrc")
    np.testing.assert_array_equal(a, b)


def test_bad_input(im_data, tmp_path, capsys):
    assert main(["initial-model", "--i", str(im_data / "particles.star"), "--o", str(tmp_path / "x"), "--K", "0"]) == 2
    assert "--K" in capsys.readouterr().err


def test_estimate_before_launch_is_within_a_factor_of_two(im_data, im_run, tmp_path, capsys):
    """run.log starts with the expected wall time (a short calibration on this machine); the run took within 2x."""
    est = check_estimate(im_run)
    assert 0.05 < est["memory_gib"] < 16 and est["poses"] > 576
    # --dry-run prints the same estimate and writes nothing
    assert main(["initial-model", "--i", str(im_data / "particles.star"), "--o", str(tmp_path / "dry"), *SHORT,
                 "--dry-run"]) == 0
    assert not (tmp_path / "dry").exists()
