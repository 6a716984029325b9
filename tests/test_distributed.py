"""Data-parallel meta-training (metatele.meta.distributed): seed split, device and backend choice, and
real two-process gloo runs on 127.0.0.1 that must equal one process seeing the same initialisations."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metatele.checkpoint import load_checkpoint
from metatele.meta import MetaTrainer
from metatele.meta.distributed import (env_world, init_distributed, make_trainer, resolve_backend,
                                       resolve_device, shard)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist_worker import apply_poison  # noqa: E402
from _meta_tiny import TINY, TINY_TOML, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_dist_worker.py"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


# ------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_world(spec: dict, world: int, tmp: Path, timeout: float = 120) -> list[str]:
    """Start ``world`` worker processes the way torchrun does (env://), wait, return their outputs."""
    spec = dict(spec, world_size=world)
    sp = tmp / "spec.json"
    sp.write_text(json.dumps(spec))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(sp)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=child_env(RANK=r, WORLD_SIZE=world, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=port))
             for r in range(world)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{out[-3000:]}\n" + "\n".join(o[-3000:] for o in outs)
    return outs


def config_dict(**overrides) -> dict:
    d = json.loads(json.dumps(TINY))
    d["train"]["drop_diverged"] = False  # data-parallel runs abandon a meta-batch with a diverged trajectory
    for k, v in overrides.items():
        sec, key = k.split("__")
        d.setdefault(sec, {})[key] = v
    return d


def train_alone(method: str, cfg_dict: dict, *, poison=None, monkeypatch=None, resume=None,
                trajectories=None) -> MetaTrainer:
    """The one-process reference: every trajectory of every meta-batch in one process."""
    from metatele.config import config_from_dict

    if resume is not None:
        tr = MetaTrainer.resume(resume, trajectories=trajectories, device="cpu")
    else:
        tr = MetaTrainer(method, config_from_dict(cfg_dict), device="cpu")
    apply_poison(tr, poison, lambda mod, name, fn: monkeypatch.setattr(mod, name, fn))
    while tr.progress.meta_batch < tr.n_meta_batches:
        tr.run_meta_batch()
    return tr


def assert_same_state(ck: dict, tr: MetaTrainer, atol: float, rtol: float = 0.0):
    ref = tr.method.state_dict()
    assert set(ck["meta_params"]) == set(ref)
    for k, v in ck["meta_params"].items():
        torch.testing.assert_close(v, ref[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")
    p, q = ck["progress"], tr.progress
    for key in ("meta_batch", "trajectories", "windows", "updates", "skipped", "diverged"):
        assert p[key] == getattr(q, key), (key, p[key], getattr(q, key))
    assert len(p["history"]) == len(q.history)
    for a, b in zip(p["history"], q.history):
        assert (a != a and b != b) or abs(a - b) <= atol * 10 + 1e-5 * abs(b), (p["history"], q.history)


# ------------------------------------------------------------------------------------------ pure parts
def test_shard_covers_every_item_once_and_rejects_too_many_ranks():
    for n in range(1, 10):
        for w in range(1, n + 1):
            parts = [shard(n, r, w) for r in range(w)]
            items = [i for lo, hi in parts for i in range(lo, hi)]
            assert items == list(range(n))
            sizes = [hi - lo for lo, hi in parts]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match=r"world size 3 is larger than the 2 trajectories"):
        shard(2, 0, 3)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard(4, 2, 2)


def test_rank_seeds_union_is_the_one_process_meta_batch():
    cfg = tiny_config(train__batch=5)
    one = MetaTrainer("lstm_update", cfg)
    for world in (1, 2, 3, 5):
        trs = [MetaTrainer("lstm_update", cfg, rank=r, world_size=world) for r in range(world)]
        for i in (0, 1, 7):
            got = [s for t in trs for s in t.seeds_for(i)]
            assert got == one.seeds_for(i), (world, i)
        assert all(t.n_meta_batches == one.n_meta_batches for t in trs)
    with pytest.raises(ValueError, match=r"world size 6 .*train.batch = 5"):
        MetaTrainer("lstm_update", cfg, rank=0, world_size=6)


def test_device_and_backend_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("gloo", torch.device("cpu")) == "gloo"
    with pytest.raises(ValueError, match="nccl.*gloo"):
        resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend 'tcp'"):
        resolve_backend("tcp", torch.device("cpu"))
    with pytest.raises(ValueError, match="device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="train.device"):
        tiny_config(train__device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            MetaTrainer("lstm_update", tiny_config(), device="cuda")


def test_environment_parsing_and_missing_rendezvous():
    assert env_world({}) == (0, 1, 0)
    assert env_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="RANK=4"):
        env_world({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        env_world({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed("cpu", "auto", environ={"RANK": "0", "WORLD_SIZE": "2"})
    ctx = init_distributed("cpu", "auto", environ={})  # alone: no process group, no-op collectives
    assert not ctx.distributed and ctx.is_main and not torch.distributed.is_initialized()
    tr = make_trainer("lstm_update", tiny_config(), ctx)
    assert tr.grad_hook is None and tr.window_hook is None and tr.stop_hook is None
    ctx.close()


def test_cli_device_and_backend_errors_exit_2(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    import train_meta

    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    base = ["--config", str(tmp_path / "tiny.toml"), "--method", "lstm_update", "--no-progress",
            "--out", str(tmp_path / "o")]
    assert train_meta.main(base + ["--device", "tpu"]) == 2
    assert "'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_meta.main(base + ["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    assert train_meta.main(base + ["--device", "cpu", "--backend", "nccl"]) == 2  # before any rendezvous
    assert "backend 'nccl' needs CUDA" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ 2 processes
def test_two_processes_equal_one_process(tmp_path, monkeypatch):
    """Two gloo ranks on 127.0.0.1 end with the meta-parameters, Adam progress and (world-averaged)
    meta-loss history of one process that unrolls every initialisation itself: uneven shares (3 = 1 + 2),
    a float32 method, a NaN meta-loss on one rank (every rank skips), a trajectory diverging inside a
    window on one rank (every rank stops that window at the same step, learns from the finite terms and
    abandons the meta-batch), an infinite loss with finite weights on one rank (every rank stops, rewinds
    to that step and goes on from it), and a 1-process checkpoint resumed on 2 ranks."""
    f64 = dict(problem__dtype="float64")
    resume_cfg = config_dict(train__batch=2, **f64)
    resume_cfg["methods"]["lstm_update_tele"]["trajectories"] = 2  # 1 meta-batch before the checkpoint
    first = train_alone("lstm_update_tele", resume_cfg)
    first.save(tmp_path / "one_rank.pt")
    scenarios = [
        {"method": "lstm_update_tele", "config": config_dict(train__batch=3, **f64), "tol": 1e-9},
        {"method": "lstm_lr_tele", "config": config_dict(train__batch=4), "tol": 2e-5},
        {"method": "lstm_update", "config": config_dict(train__batch=2, **f64), "tol": 1e-9,
         "poison": {"nan_loss_window": 0, "diverge_t": 5}},
        {"method": "lstm_update_tele", "config": config_dict(train__batch=2, meta__unroll=4, **f64), "tol": 1e-9,
         "steps": 8, "poison": {"inf_loss_t": 2}},
        {"resume": str(tmp_path / "one_rank.pt"), "trajectories": 6, "tol": 1e-9},
    ]
    for i, sc in enumerate(scenarios):
        sc["out"] = str(tmp_path / f"s{i}.pt")
        if "steps" in sc:
            sc["config"]["methods"][sc["method"]]["steps"] = sc["steps"]
    outs = run_world({"scenarios": scenarios, "device": "cpu", "backend": "auto"}, 2, tmp_path)
    assert "rank 1" in outs[1] and "rank 0" in outs[0]
    for i, sc in enumerate(scenarios):
        ck = load_checkpoint(sc["out"])
        assert ck["distributed"]["world_size"] == 2 and ck["distributed"]["rank"] == 0
        if sc.get("resume"):
            ref = train_alone(None, None, resume=tmp_path / "one_rank.pt", trajectories=6)
            uninterrupted_cfg = json.loads(json.dumps(resume_cfg))
            uninterrupted_cfg["methods"]["lstm_update_tele"]["trajectories"] = 6
            ref2 = train_alone("lstm_update_tele", uninterrupted_cfg)
            assert_same_state(ck, ref2, sc["tol"])
        else:
            with monkeypatch.context() as mp:
                ref = train_alone(sc["method"], sc["config"], poison=sc.get("poison"), monkeypatch=mp)
        assert_same_state(ck, ref, sc["tol"])
        if sc.get("poison", {}).get("diverge_t"):  # the poison did bite: skips, abandoned meta-batches, updates
            assert ref.progress.skipped >= 1 and ref.progress.diverged == 2 and ref.progress.updates >= 2
        if sc.get("poison", {}).get("inf_loss_t"):  # windows [0, 3) (stopped at step 2), [3, 7), [7, 8)
            assert ref.progress.windows == 6 and ref.progress.diverged == 0 and ref.progress.updates == 6


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_cli_two_ranks_then_resume_on_one(tmp_path):
    """``torchrun --nproc_per_node=2 train_meta.py`` stops half way (checkpoint), ``python train_meta.py
    --resume`` finishes on one process: the same meta-parameters as one uninterrupted process."""
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    common = ["--config", str(tmp_path / "tiny.toml"), "--method", "lstm_update", "--batch", "4",
              "--threads", "1", "--no-progress", "--device", "cpu"]
    port = free_port()
    r = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
                        str(ROOT / "train_meta.py"), *common, "--trajectories", "4", "--out", str(tmp_path / "a")],
                       cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("saved") == 1 and "data-parallel: 2 processes, backend gloo" in r.stdout  # rank 0 only
    ck = tmp_path / "a" / "lstm_update.pt"
    assert load_checkpoint(ck)["progress"]["trajectories"] == 4
    r = subprocess.run([sys.executable, str(ROOT / "train_meta.py"), "--resume", str(ck), "--trajectories", "8",
                        "--threads", "1", "--no-progress", "--device", "cpu"],
                       cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    from metatele.config import config_to_dict, load_config

    d = config_to_dict(load_config(tmp_path / "tiny.toml"))
    d["train"]["batch"] = 4
    d["methods"]["lstm_update"]["trajectories"] = 8
    ref = train_alone("lstm_update", d)  # one uninterrupted process, 2 meta-batches of 4
    assert_same_state(load_checkpoint(ck), ref, 2e-5)


# ------------------------------------------------------------------------------------------ GPU
@needs_cuda
def test_cuda_training_matches_cpu_and_checkpoint_loads_on_cpu(tmp_path):
    cfg = tiny_config(problem__dtype="float64", train__device="cuda")
    gpu = MetaTrainer("lstm_update_tele", cfg)
    assert next(gpu.method.parameters()).is_cuda
    for _ in range(2):
        gpu.run_meta_batch()
    gpu.save(tmp_path / "gpu.pt")
    ck = torch.load(tmp_path / "gpu.pt", map_location="cpu", weights_only=True)
    assert all(not v.is_cuda for v in ck["meta_params"].values())
    cpu = MetaTrainer("lstm_update_tele", tiny_config(problem__dtype="float64"), device="cpu")
    for _ in range(2):
        cpu.run_meta_batch()
    assert_same_state(load_checkpoint(tmp_path / "gpu.pt"), cpu, 1e-7, 1e-6)
    res = MetaTrainer.resume(tmp_path / "gpu.pt", device="cpu")  # written on a GPU, resumed on a CPU
    assert not next(res.method.parameters()).is_cuda
    res.run_meta_batch()


@needs_cuda
def test_cuda_evaluation_matches_cpu(tmp_path):
    from metatele.meta.evaluate import evaluate

    tr = MetaTrainer("lstm_lr_tele", tiny_config(problem__dtype="float64"), device="cpu")
    tr.run_meta_batch()
    tr.save(tmp_path / "m.pt")
    a = evaluate([tmp_path / "m.pt"], device="cpu")
    b = evaluate([tmp_path / "m.pt"], device="cuda")
    assert b["device"].startswith("cuda")
    for name in a["methods"]:
        torch.testing.assert_close(torch.tensor(b["methods"][name]["loss_mean"]),
                                   torch.tensor(a["methods"][name]["loss_mean"]), rtol=1e-6, atol=1e-9)


@needs_2_gpus
def test_two_gpus_nccl_equal_one_process(tmp_path):
    sc = {"method": "lstm_update_tele", "config": config_dict(train__batch=4, problem__dtype="float64"),
          "out": str(tmp_path / "g.pt")}
    run_world({"scenarios": [sc], "device": "cuda", "backend": "auto"}, 2, tmp_path)
    ck = load_checkpoint(sc["out"])
    assert_same_state(ck, train_alone(sc["method"], sc["config"]), 1e-7)
