"""train_meta.py and eval_meta.py end to end at a tiny scale (subprocesses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _meta_tiny import TINY_TOML

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    (d / "tiny.toml").write_text(TINY_TOML)
    r = run(str(ROOT / "train_meta.py"), "--config", str(d / "tiny.toml"), "--out", str(d / "ck"),
            "--threads", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    return d, r


def test_train_writes_one_checkpoint_per_method(trained):
    d, r = trained
    assert sorted(p.name for p in (d / "ck").glob("*.pt")) == ["lstm_lr_tele.pt", "lstm_update.pt",
                                                               "lstm_update_tele.pt"]
    assert "skipped (non-finite)" in r.stdout


def test_eval_writes_results_and_figures(trained):
    d, _ = trained
    ck = d / "ck"
    r = run(str(ROOT / "eval_meta.py"), *sum((["--ckpt", str(ck / f"{m}.pt")] for m in
                                              ("lstm_update_tele", "lstm_update", "lstm_lr_tele")), []),
            "--seeds", "3", "--out", str(d / "res"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    res = json.loads((d / "res" / "results.json").read_text())
    assert set(res["methods"]) == {"gd", "gd_tele", "lstm_lr_tele", "lstm_update", "lstm_update_tele"}
    for e in res["methods"].values():
        assert {"loss_mean", "loss_std", "grad_norm_mean", "time_mean"} <= set(e)
        assert len(e["loss_mean"]) == 6                  # default horizon = the training horizon
    assert not set(res["eval_seeds"]) & set(res["train_seeds"])
    for ext in ("png", "pdf"):
        assert (d / "res" / f"meta.{ext}").stat().st_size > 0
    assert "speed-up" in r.stdout


def _main(script):
    sys.path.insert(0, str(ROOT))
    return __import__(script).main


def test_resume_from_cli_extends_the_run(trained, tmp_path):
    d, _ = trained
    src = d / "ck" / "lstm_lr_tele.pt"
    p = tmp_path / "lstm_lr_tele.pt"
    p.write_bytes(src.read_bytes())
    rc = _main("train_meta")(["--resume", str(p), "--trajectories", "6", "--no-progress"])
    assert rc == 0
    ck = torch.load(p, weights_only=True)
    assert ck["progress"]["meta_batch"] == 3


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_bad_checkpoint_one_line_exit_2(tmp_path, case, capsys):
    p = tmp_path / "x.pt"
    if case == "corrupt":
        p.write_bytes(b"garbage")
    rc = _main("eval_meta")(["--ckpt", str(p), "--out", str(tmp_path / "res")])
    assert rc == 2
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if x]
    assert len(lines) == 1 and "error" in lines[0] and str(p) in lines[0]


def test_bad_checkpoint_subprocess_exit_2(tmp_path):
    r = run(str(ROOT / "eval_meta.py"), "--ckpt", str(tmp_path / "nope.pt"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr


def test_bad_config_value_exit_2(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[meta]\nunroll = -3\n")
    rc = _main("train_meta")(["--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path)])
    assert rc == 2 and "meta.unroll = -3" in capsys.readouterr().err


def test_ctrl_c_saves_last_completed_meta_batch(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train_meta
    from _meta_tiny import tiny_config
    from metatele.meta import MetaTrainer

    cfg = tiny_config()
    cfg.methods["lstm_update"].trajectories = 8
    tr = MetaTrainer("lstm_update", cfg)
    calls = {"n": 0}
    real = tr.run_meta_batch

    def interrupted_second_time(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            real(*a, **k)            # progress mutated, then the user presses Ctrl-C
            raise KeyboardInterrupt
        return real(*a, **k)

    tr.run_meta_batch = interrupted_second_time
    p = tmp_path / "lstm_update.pt"
    interrupted, summ = train_meta.train_one(tr, p, show_progress=False)
    assert interrupted
    ck = torch.load(p, weights_only=True)
    assert ck["progress"]["meta_batch"] == 1          # the state at the last completed meta-batch
    ref = MetaTrainer("lstm_update", cfg)
    ref.run_meta_batch()
    for k, v in ref.method.state_dict().items():
        assert torch.equal(v, ck["meta_params"][k])
