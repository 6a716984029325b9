"""Every experiment at --quick scale, in process: on the offline digits, and on MNIST / FashionMNIST / CIFAR-10
files written in their own formats and read by torchvision's loaders; the missing-data message; and the
exact point-to-curve distances of the displacement experiment against independent references."""
import json
import math
import os

import numpy as np
import pytest

from _fake_datasets import skip_cifar_md5, write_cifar10, write_mnist
from metatele.experiments import (benchmark_functions, correlation, displacement, optimizers, regression,
                                  sharpness_curvature)


def outputs(out, name):
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    for ext in ("png", "pdf"):
        assert os.path.getsize(os.path.join(out, f"{name}.{ext}")) > 1000
    return res


def test_optimizers_quick_digits(tmp_path):
    out = str(tmp_path / "o")
    assert optimizers.main(["--quick", "--no-progress", "--out", out, "--optimizers", "adagrad", "adam"]) == 0
    res = outputs(out, "optimizers")
    for name in ("adagrad", "adam"):
        e = res["optimizers"][name]
        assert len(e["baseline"]) == 1 and len(e["baseline"][0]["train_loss"]) == 3
        assert len(e["teleport"][0]["events"]) == 8
        assert all(math.isfinite(v) for v in e["teleport"][0]["val_loss"])
        assert e["summary"]["teleport_events"]["count_per_run"] == 8


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_optimizers_quick_on_idx_files(tmp_path, name, folder):
    write_mnist(str(tmp_path / "data"), folder, n_train=100, n_test=30)
    out = str(tmp_path / "o")
    assert optimizers.main(["--quick", "--no-progress", "--dataset", name, "--data-root", str(tmp_path / "data"),
                            "--out", out, "--optimizers", "momentum", "--teleport-batch", "50"]) == 0
    res = outputs(out, "optimizers")
    assert res["widths"] == [784, 16, 10, 10] and res["data"]["n_train"] == 80


def test_correlation_quick_on_cifar_batches(tmp_path, monkeypatch):
    write_cifar10(str(tmp_path / "data"), n_per_batch=20, n_test=20)
    skip_cifar_md5(monkeypatch)
    out = str(tmp_path / "c")
    assert correlation.main(["--quick", "--no-progress", "--dataset", "cifar10", "--data-root",
                             str(tmp_path / "data"), "--out", out, "--test-as-val"]) == 0
    res = outputs(out, "correlation")
    assert res["widths"] == [3072, 128, 32, 10] and res["data"]["val_is_test"]
    assert res["table"]["n_models"] == 4
    for m in res["models"]:
        assert m["phi"] > 0 and m["psi"] > 0 and m["psi_paper"] > 0


def test_correlation_quick_digits(tmp_path):
    out = str(tmp_path / "c")
    assert correlation.main(["--quick", "--no-progress", "--out", out]) == 0
    t = outputs(out, "correlation")["table"]
    assert t["n_models"] == 4 and all(-1 <= t[k]["r"] <= 1 for k in ("phi", "psi", "psi_paper"))


def test_sharpness_curvature_quick(tmp_path):
    out = str(tmp_path / "s")
    assert sharpness_curvature.main(["--quick", "--no-progress", "--out", out]) == 0
    res = outputs(out, "sharpness_curvature")
    counts = {"sharpness+": 2, "sharpness-": 10, "curvature+": 10, "curvature-": 5}
    for v, n in counts.items():
        run = res["variants"][v][0]
        assert len(run["events"]) == n and len(run["val_loss"]) == 3
        for e in run["events"]:
            assert math.isfinite(e["val_loss_after"]) and math.isfinite(e["val_loss_before"])
    # sharpness ascent raises phi, descent lowers it, on the teleport batch
    s = res["summary"]
    assert s["sharpness+"]["objective_after"] > s["sharpness+"]["objective_before"]
    assert s["sharpness-"]["objective_after"] < s["sharpness-"]["objective_before"]


def test_displacement_quick(tmp_path):
    out = str(tmp_path / "d")
    assert displacement.main(["--quick", "--no-progress", "--out", out]) == 0
    res = outputs(out, "displacement")
    # flat curve (k = 0) and huge circle: E|sin theta| = 2 / pi
    assert res["parabola"]["E_dist_over_r"][0][0] == pytest.approx(2 / math.pi, rel=1e-3)
    assert res["circle"]["E_dist_over_r"][-1][-1] == pytest.approx(2 / math.pi, rel=1e-3)


def test_exact_distances_against_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-2, 2, 200), rng.uniform(-1, 3, 200)
    xs = np.linspace(-30, 30, 600001)

    def brute_parabola(p, q, k):  # dense grid, then a finer grid around its best point
        d = lambda x: np.sqrt((x - p) ** 2 + (k * x ** 2 - q) ** 2)  # noqa: E731
        x0 = xs[np.argmin(d(xs))]
        fine = np.linspace(x0 - 2e-4, x0 + 2e-4, 40001)
        return d(fine).min()

    for k in (0.0, 0.3, 5.0, 39.9):
        exact = displacement.dist_parabola(a, b, k)
        brute = np.array([brute_parabola(p, q, k) for p, q in zip(a[:20], b[:20])])
        np.testing.assert_allclose(exact[:20], brute, rtol=1e-9, atol=1e-12)
        assert (exact <= np.hypot(a, b) + 1e-12).all()   # never farther than the origin, which is on the curve
    th = np.linspace(0, 2 * np.pi, 200001)
    R = 0.7
    brute = np.array([np.hypot(p - R * np.cos(th), q - R - R * np.sin(th)).min() for p, q in zip(a[:20], b[:20])])
    np.testing.assert_allclose(displacement.dist_circle(a[:20], b[:20], R), brute, rtol=1e-6, atol=1e-9)


def test_trapezoid_expectation_against_adaptive_quadrature():
    from scipy.integrate import quad

    k, r = 7.0, 0.3
    f = lambda t: float(displacement.dist_parabola(np.array([r * np.cos(t)]), np.array([r * np.sin(t)]), k)[0])  # noqa: E731
    ref = quad(f, 0, 2 * np.pi, limit=400, epsabs=1e-12)[0] / (2 * np.pi * r)
    got = displacement.expected_displacement(lambda x, y: displacement.dist_parabola(x, y, k), r, 20000)
    assert got == pytest.approx(ref, rel=1e-6)


def test_benchmark_functions_quick(tmp_path):
    out = str(tmp_path / "t")
    assert benchmark_functions.main(["--quick", "--no-progress", "--out", out]) == 0
    res = outputs(out, "benchmark_functions")
    for name, e in res["functions"].items():
        for tp in e["gd_teleport"]["teleports"]:
            assert tp["loss_after"] == pytest.approx(tp["loss_before"], rel=1e-9)   # SO(2) keeps the loss
            assert tp["grad_norm_sq_after"] >= tp["grad_norm_sq_before"] * (1 - 1e-9)
        assert e["gd_teleport"]["final_loss"] < e["gd"]["final_loss"]
    assert len(res["functions"]["booth"]["gd"]["loss"]) == 10


def test_regression_quick(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert regression.main(["--quick", "--no-progress", "--out", out]) == 0
    res = outputs(out, "regression")
    assert set(res["runs"]) == {"GD", "GD + teleport", "AdaGrad", "AdaGrad + teleport"}
    err = capsys.readouterr().err
    for key, s in res["summary"].items():             # issue 9 item 10: a divergence is said, not hidden
        assert (f"warning: {key} diverged" in err) == (s["diverged_runs"] > 0)
    for key in ("GD + teleport", "AdaGrad + teleport"):
        ev = res["runs"][key][0]["events"]
        assert len(ev) == 1 and ev[0]["step"] == 5
        assert ev[0]["objective_after"] > ev[0]["objective_before"]
        assert abs(ev[0]["loss_after"] - ev[0]["loss_before"]) < 1e-3 * ev[0]["loss_before"]
    # identical until the teleport
    assert res["runs"]["GD"][0]["loss"][:5] == res["runs"]["GD + teleport"][0]["loss"][:5]


def test_missing_dataset_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        optimizers.main(["--quick", "--no-progress", "--dataset", "mnist", "--data-root", str(tmp_path),
                         "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "--download" in err and "Traceback" not in err


def test_divergence_warning(capsys):
    from metatele.experiments._common import diverged_runs, warn_diverged

    curves = [[10.0, 5.0, 1.0], [10.0, 50.0, 2e5], [10.0, 1.0, float("nan")]]
    assert diverged_runs(curves) == 2 and diverged_runs(curves[:1]) == 0
    warn_diverged("GD + teleport", curves)
    warn_diverged("GD", curves[:1])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: GD + teleport diverged in 2 of 3 run(s): loss 10 at the start, 2e+05 at the end"]


@pytest.mark.parametrize("out", ["file", "/proc/metatele-x"])
def test_unusable_out_fails_before_any_work(tmp_path, capsys, out):
    if out == "file":
        out = tmp_path / "F"
        out.write_text("not a folder")
    assert regression.main(["--quick", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m metatele.experiments.regression: error: --out")
    assert str(out) in err[0]
    assert optimizers.main(["--quick", "--threads", "-4", "--out", str(tmp_path / "o")]) == 2
    assert "--threads -4 must be >= 0" in capsys.readouterr().err


def test_bad_argument_is_reported(tmp_path, capsys):
    assert optimizers.main(["--quick", "--runs", "0", "--out", str(tmp_path)]) == 2
    assert "--runs must be >= 1" in capsys.readouterr().out
