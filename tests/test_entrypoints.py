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


# ---------------------------------------------------------------------------- issue 9: a run never loses work
def _config(tmp_path, save_every=None):
    text = TINY_TOML if save_every is None else TINY_TOML.replace("[train]\n", f"[train]\nsave_every = {save_every}\n")
    p = tmp_path / "tiny.toml"
    p.write_text(text)
    return str(p)


def _one_line_error(capsys, prog):
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.mark.parametrize("script", ["train_meta", "eval_meta"])
@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_unusable_out_fails_before_any_work(trained, tmp_path, capsys, script, where):
    """Item 4 (the experiments: tests/test_experiments.py)."""
    d, _ = trained
    out = tmp_path / "F" if where == "file" else Path("/proc/metatele-x")
    if where == "file":
        out.write_text("not a folder")
    argv = (["--config", _config(tmp_path), "--method", "lstm_update"] if script == "train_meta"
            else ["--ckpt", str(d / "ck" / "lstm_update.pt")]) + ["--out", str(out), "--threads", "1"]
    assert _main(script)(argv) == 2
    line = _one_line_error(capsys, f"{script}.py")
    assert f"--out {str(out)!r}" in line and ("not a folder" if where == "file" else "not a writable") in line


def test_second_writer_is_refused_and_the_lock_released(tmp_path, capsys):
    """Item 5: a second run writing the same checkpoint is refused; the lock goes with the run."""
    from metatele.checkpoint import CheckpointLock

    out = tmp_path / "ck"
    argv = ["--config", _config(tmp_path), "--method", "lstm_update", "--out", str(out), "--no-progress"]
    with CheckpointLock(out / "lstm_update.pt"):          # another run is writing it
        assert _main("train_meta")(argv) == 2
    line = _one_line_error(capsys, "train_meta.py")
    assert "lstm_update.pt" in line and f"being written by another run (PID {os.getpid()}" in line
    assert os.listdir(out) == []
    assert _main("train_meta")(argv) == 0
    assert os.listdir(out) == ["lstm_update.pt"]         # no lock file left after the run
    assert _main("train_meta")(["--resume", str(out / "nope.pt")]) == 2   # an early error releases too
    assert os.listdir(out) == ["lstm_update.pt"]


def test_sigterm_saves_like_ctrl_c_and_more_signals_cannot_abort_the_save(tmp_path, capfd):
    """Item 6: SIGTERM during meta-batch 2 saves meta-batch 1 and exits 143; a Ctrl-C and another SIGTERM
    arriving during that save are held until it is done, and one arriving after it is ignored."""
    import signal

    from _meta_tiny import in_child
    from metatele.config import load_config
    from metatele.meta import MetaTrainer

    out = tmp_path / "ck"
    argv = ["--config", _config(tmp_path), "--method", "lstm_update", "--trajectories", "8", "--out", str(out),
            "--no-progress"]
    train = _main("train_meta")

    def child():
        real_run, real_save = MetaTrainer.run_meta_batch, MetaTrainer.save

        def run_meta_batch(self, *a, **k):
            r = real_run(self, *a, **k)
            if self.progress.meta_batch == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return r

        def save(self, *a, **k):
            os.kill(os.getpid(), signal.SIGINT)      # an impatient user
            os.kill(os.getpid(), signal.SIGTERM)
            return real_save(self, *a, **k)

        def train_one(*a, **k):
            r = train_meta.train_one_unpatched(*a, **k)
            os.kill(os.getpid(), signal.SIGINT)          # still impatient while the run winds up
            return r

        import train_meta
        train_meta.train_one_unpatched, train_meta.train_one = train_meta.train_one, train_one
        MetaTrainer.run_meta_batch, MetaTrainer.save = run_meta_batch, save
        return train(argv)

    assert in_child(child) == 143
    err = capfd.readouterr().err
    assert "interrupted (SIGTERM): saved" in err and err.count("finishing the save first") == 1
    assert "Traceback" not in err and "interrupted (Ctrl-C)" not in err
    assert os.listdir(out) == ["lstm_update.pt"]
    ck = torch.load(out / "lstm_update.pt", weights_only=True)
    assert ck["progress"]["meta_batch"] == 1
    ref = MetaTrainer("lstm_update", load_config(argv[1]))
    ref.run_meta_batch()
    for k, v in ref.method.state_dict().items():
        assert torch.equal(v, ck["meta_params"][k])


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    """Item 7 and the fault-injection test: kill -9 inside meta-batch 3, then again in the middle of a
    checkpoint write; resuming gives exactly the uninterrupted run, and no lock or temporary file stays."""
    import signal

    from _meta_tiny import in_child
    from metatele.meta import MetaTrainer

    train = _main("train_meta")
    argv = ["--config", _config(tmp_path, save_every=1), "--method", "lstm_update", "--trajectories", "8",
            "--no-progress", "--threads", "1"]
    assert train(argv + ["--out", str(tmp_path / "ref")]) == 0
    run = tmp_path / "run"
    ck = run / "lstm_update.pt"

    def killed_in_meta_batch_3():
        real = MetaTrainer.run_meta_batch

        def run_meta_batch(self, *a, **k):
            if self.progress.meta_batch == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **k)

        MetaTrainer.run_meta_batch = run_meta_batch
        return train(argv + ["--out", str(run)])

    assert in_child(killed_in_meta_batch_3) == -signal.SIGKILL
    assert sorted(os.listdir(run)) == [".lstm_update.pt.lock", "lstm_update.pt"]   # a stale lock
    assert torch.load(ck, weights_only=True)["progress"]["meta_batch"] == 2

    def killed_while_saving():
        def half_written(obj, fh, *a, **k):
            fh.write(b"\x00" * 4096)
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_written
        return train(["--resume", str(ck), "--no-progress"])

    assert in_child(killed_while_saving) == -signal.SIGKILL
    assert len([n for n in os.listdir(run) if n.endswith(".tmp")]) == 1
    assert torch.load(ck, weights_only=True)["progress"]["meta_batch"] == 2   # the old checkpoint is whole
    assert train(["--resume", str(ck), "--no-progress"]) == 0
    assert os.listdir(run) == ["lstm_update.pt"]
    a = torch.load(tmp_path / "ref" / "lstm_update.pt", weights_only=True)
    b = torch.load(ck, weights_only=True)
    del a["progress"]["wall"], b["progress"]["wall"]
    assert a["progress"]["meta_batch"] == 4
    for k in ("meta_params", "meta_optim", "progress"):
        assert _same(a[k], b[k]), k


@pytest.mark.parametrize("extra", [["--steps", "3"], ["--batch", "4"], ["--unroll", "2"], ["--out", "elsewhere"],
                                   ["--method", "lstm_update"], ["--config", "nope.toml"], ["--seed", "3"]])
def test_resume_rejects_flags_it_would_ignore(trained, capsys, extra):
    """Item 8."""
    d, _ = trained
    assert _main("train_meta")(["--resume", str(d / "ck" / "lstm_update.pt"), *extra]) == 2
    line = _one_line_error(capsys, "train_meta.py")
    assert f"{extra[0]} cannot go with it" in line and "allowed with --resume: --trajectories" in line


def test_resume_rejects_duplicates_and_going_back(trained, tmp_path, capsys):
    """Item 8: the same --resume or --method twice; --trajectories below the progress made."""
    d, _ = trained
    ck = str(d / "ck" / "lstm_lr_tele.pt")
    train = _main("train_meta")
    assert train(["--resume", ck, "--resume", ck]) == 2
    assert "--resume" in _one_line_error(capsys, "train_meta.py")
    assert train(["--config", _config(tmp_path), "--method", "lstm_update", "--method", "lstm_update",
                  "--out", str(tmp_path / "o")]) == 2
    assert "--method 'lstm_update' is given twice" in _one_line_error(capsys, "train_meta.py")
    before = (d / "ck" / "lstm_lr_tele.pt").read_bytes()
    assert train(["--resume", ck, "--trajectories", "2", "--no-progress"]) == 2
    assert "--trajectories 2 is below the 4 trajectories" in _one_line_error(capsys, "train_meta.py")
    assert (d / "ck" / "lstm_lr_tele.pt").read_bytes() == before


def test_bad_config_path_threads_and_rounded_trajectories(tmp_path, capsys):
    """Item 9 (the configuration file's contents: tests/test_meta.py)."""
    train = _main("train_meta")
    assert train(["--config", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is a directory" in _one_line_error(capsys, "train_meta.py")
    assert train(["--threads", "-4", "--out", str(tmp_path / "o")]) == 2
    assert "--threads -4 must be >= 0" in _one_line_error(capsys, "train_meta.py")
    assert _main("eval_meta")(["--ckpt", "x.pt", "--threads", "-4"]) == 2
    assert "--threads -4 must be >= 0" in _one_line_error(capsys, "eval_meta.py")
    assert train(["--config", _config(tmp_path), "--method", "lstm_update", "--trajectories", "1",
                  "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 trajectories is not a whole number of meta-batches of 2; trains 2" in out
    assert torch.load(tmp_path / "o" / "lstm_update.pt", weights_only=True)["progress"]["trajectories"] == 2


@pytest.mark.parametrize("edit", ["nan", "arch", "progress"])
def test_eval_refuses_non_finite_and_hand_edited_checkpoints(trained, tmp_path, capsys, edit):
    """Item 10 (every field check: tests/test_checkpoint.py)."""
    from metatele.checkpoint import load_checkpoint, save_checkpoint

    d, _ = trained
    ck = load_checkpoint(d / "ck" / "lstm_update.pt")
    if edit == "nan":
        next(iter(ck["meta_params"].values())).view(-1)[0] = float("nan")
    elif edit == "arch":
        ck["arch"] = "lstm"
    else:
        del ck["progress"]["meta_batch"]
    p = tmp_path / "edited.pt"
    save_checkpoint(p, ck)
    assert _main("eval_meta")(["--ckpt", str(p), "--out", str(tmp_path / "res"), "--no-plots"]) == 2
    line = _one_line_error(capsys, "eval_meta.py")
    assert str(p) in line and {"nan": "non-finite", "arch": "arch must be a dict",
                               "progress": "lacks 'meta_batch'"}[edit] in line


def test_results_json_is_strict(trained, tmp_path, monkeypatch):
    """Item 10: a diverged method's NaN losses are written as null, never as a bare NaN."""
    import metatele.meta.evaluate as ev

    d, _ = trained
    real = ev.evaluate

    def diverging(*a, **k):
        res = real(*a, **k)
        res["methods"]["lstm_update"]["loss_mean"][-1] = float("nan")
        res["methods"]["lstm_update"]["final_loss"][0] = float("inf")
        return res

    monkeypatch.setattr(ev, "evaluate", diverging)
    assert _main("eval_meta")(["--ckpt", str(d / "ck" / "lstm_update.pt"), "--seeds", "2",
                               "--out", str(tmp_path / "res"), "--no-plots", "--threads", "1"]) == 0

    def bare(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    res = json.loads((tmp_path / "res" / "results.json").read_text(), parse_constant=bare)
    assert res["methods"]["lstm_update"]["loss_mean"][-1] is None
    assert res["methods"]["lstm_update"]["final_loss"][0] is None


def test_eval_several_seeds_of_one_method_keeps_per_initialisation_curves(trained, tmp_path):
    """Checkpoints of one method from two meta-training runs get distinct labels; results.json keeps the
    loss and squared-gradient-norm curve of every initialisation and a diverged flag, as strict JSON."""
    d, _ = trained
    run2 = tmp_path / "seed1"
    r = run(str(ROOT / "train_meta.py"), "--config", str(d / "tiny.toml"), "--out", str(run2), "--seed", "1",
            "--method", "lstm_update", "--threads", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run(str(ROOT / "eval_meta.py"), "--ckpt", str(d / "ck" / "lstm_update.pt"), "--ckpt",
            str(run2 / "lstm_update.pt"), "--seeds", "3", "--out", str(tmp_path / "res"), "--threads", "1",
            "--no-plots")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "res" / "results.json").read_text()
    res = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in results.json"))
    labels = sorted(k for k in res["methods"] if k.startswith("lstm_update"))
    assert labels == ["lstm_update@ck", "lstm_update@seed1"]
    for k in labels:
        e = res["methods"][k]
        assert e["method"] == "lstm_update" and len(e["loss"]) == 3 and len(e["loss"][0]) == 6
        assert len(e["grad_norm_sq"]) == 3 and e["diverged"] == [False, False, False]
    assert res["methods"][labels[0]]["loss"] != res["methods"][labels[1]]["loss"]


def test_train_uses_each_methods_own_threads_unless_the_command_line_sets_them(tmp_path, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_meta_under_test", ROOT / "train_meta.py")
    tm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tm)
    assert TINY_TOML.rstrip().endswith("[methods.lstm_lr_tele]\ntrajectories = 4\nsteps = 6")
    (tmp_path / "tiny.toml").write_text(TINY_TOML.rstrip() + "\nthreads = 1\n")
    seen = {}

    def fake_train_one(tr, path, progress):
        seen[tr.name] = torch.get_num_threads()
        return False, {"method": tr.name, "meta_batches": 0, "trajectories": 0, "updates": 0, "skipped": 0,
                       "diverged": 0, "dropped": 0, "wall_s": 0.0, "final_meta_loss": None}

    monkeypatch.setattr(tm, "train_one", fake_train_one)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = ["--config", str(tmp_path / "tiny.toml"), "--no-progress", "--method", "lstm_lr_tele",
                "--method", "lstm_update"]
        assert tm.main(args + ["--out", str(tmp_path / "a")]) == 0
        assert seen == {"lstm_lr_tele": 1, "lstm_update": 2}
        torch.set_num_threads(2)
        assert tm.main(args + ["--out", str(tmp_path / "b"), "--threads", "2"]) == 0
        assert seen == {"lstm_lr_tele": 2, "lstm_update": 2}
    finally:
        torch.set_num_threads(before)
