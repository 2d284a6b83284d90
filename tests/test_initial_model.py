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


def test_resolution_ramp_is_relions_in_fourier_shells():
    """RELION's updateCurrentResolution: one iteration behind, linear in shells ROUND(N·apix/res); box 64 at
    2 Å/px, 35 -> 15 Å: shells 4 -> 9 (the audit's example: half-way 18.3 Å, shell 7, where a ramp in Å gives 25 Å)."""
    s = SgdSchedule(ini_iter=10, inbetween_iter=30, fin_iter=10)
    r = [s.resolution(it, 64, 2.0) for it in range(1, 51)]
    assert r[:10] == [35.0] * 10  # iterations 1..10: the initial resolution
    assert r[10] == pytest.approx(128 / 4)  # iteration 11 (ml iteration 10 set it): shell ROUND(3.66) = 4
    assert r[25] == pytest.approx(128 / 7, abs=0.01)  # iteration 26: 4 + ROUND(15/30 · 5) = 7 shells, 18.3 Å
    assert r[39] == pytest.approx(128 / 9)  # iteration 40: 4 + ROUND(29/30 · 5) = 9 shells, 14.2 Å
    assert r[40:] == [15.0] * 10
    assert SgdSchedule(ini_iter=10, inbetween_iter=30, ramp="angstrom").resolution(25, 64, 2.0) == pytest.approx(25.0)


def test_sampling_gets_finer_when_the_resolution_needs_it_as_relion():
    """RELION's updateAngularSampling for SGD: after the initial phase, one HEALPix order finer whenever the fine
    step exceeds 360°/ceil(π·D/res): 110 Å at 15 Å needs 15° (no change), at 14.2 Å (shell 9) 14.4° (7.5°)."""
    from spa3d.jobs.initial_model import InitialModelOptions, sampling_order

    s = SgdSchedule(ini_iter=10, inbetween_iter=30, fin_iter=10)
    o = InitialModelOptions(particle_diameter=110.0, healpix_order=1)
    orders = [sampling_order(o, s, it, 64, 2.0) for it in range(1, 51)]
    first_finer = orders.index(2) + 1
    assert orders[:first_finer - 1] == [1] * (first_finer - 1) and set(orders[first_finer - 1:]) == {2}
    assert s.resolution(first_finer, 64, 2.0) == pytest.approx(128 / 9)  # the first iteration at 14.2 Å
    o.sampling_refinement = False
    assert {sampling_order(o, s, it, 64, 2.0) for it in range(1, 51)} == {1}
    o = InitialModelOptions(particle_diameter=200.0, healpix_order=1, sampling_refinement=True)  # the tutorial's
    assert sampling_order(o, SgdSchedule(), 150, 64, 3.54) == 2  # 360/ceil(π·200/15) = 8.6°: 7.5°, not 3.75°


def test_classes_are_annealed_towards_their_mean_until_the_inbetween_phase_ends():
    from spa3d.inference.sgd import anneal_classes

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 8, 8, 8)).astype(np.float32)
    mean = maps.mean(0)
    s = SgdSchedule(ini_iter=10, inbetween_iter=20, fin_iter=5)
    ini = anneal_classes(maps, 5, s)  # initial phase: identical references
    assert np.allclose(ini, mean[None], atol=1e-6)
    mid = anneal_classes(maps, 20, s)  # half-way: half the difference from the mean
    assert np.allclose(mid - mean, 0.5 * (maps - mean), atol=1e-5)
    assert anneal_classes(maps, 30, s) is maps  # from the end of the in-between phase: unchanged
    one = maps[:1]
    assert anneal_classes(one, 5, s) is one  # K = 1: nothing to anneal


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
