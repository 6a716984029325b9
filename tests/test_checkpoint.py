"""metatele.checkpoint: atomic versioned save/load and one typed error per bad-checkpoint case."""
import os

import pytest
import torch

from _meta_tiny import tiny_config
from metatele.checkpoint import (CheckpointCorrupt, CheckpointError, CheckpointMismatch, CheckpointMissing,
                                 ProblemMismatch, load_checkpoint, save_checkpoint)
from metatele.meta import MetaTrainer
from metatele.meta.evaluate import evaluate, load_method


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tr = MetaTrainer("lstm_update_tele", tiny_config())
    tr.run_meta_batch()
    path = tmp_path_factory.mktemp("ck") / "lstm_update_tele.pt"
    tr.save(path)
    return path


def test_roundtrip_holds_everything(ckpt):
    d = load_checkpoint(ckpt)
    for k in ("method", "arch", "dims", "config", "meta_params", "meta_optim", "progress", "rng", "versions"):
        assert k in d
    assert d["method"] == "lstm_update_tele" and d["dims"] == [4, 5, 4, 3]
    assert d["progress"]["meta_batch"] == 1 and set(d["versions"]) >= {"torch", "higher", "python"}
    m, cfg, _ = load_method(ckpt)
    for k, v in m.state_dict().items():
        assert torch.equal(v, d["meta_params"][k])


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "x.pt"
    save_checkpoint(p, {"method": "a", "arch": {}, "dims": [1], "config": {}, "meta_params": {}, "progress": {}})
    first = p.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("crash while writing")

    with pytest.raises(Exception):
        save_checkpoint(p, {"method": "b", "arch": {}, "dims": [1], "config": {}, "meta_params": {},
                            "progress": {}, "bad": Boom()})
    assert p.read_bytes() == first                       # the old checkpoint survived the crash
    assert os.listdir(tmp_path) == ["x.pt"]              # no half-written temporary left behind


def test_missing(tmp_path):
    with pytest.raises(CheckpointMissing, match="does not exist"):
        load_method(tmp_path / "nope.pt")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_metatele"])
def test_corrupt(ckpt, tmp_path, damage):
    p = tmp_path / "bad.pt"
    if damage == "garbage":
        p.write_bytes(b"\x00not a checkpoint" * 10)
    elif damage == "truncated":
        p.write_bytes(ckpt.read_bytes()[:300])
    else:
        torch.save({"weights": torch.zeros(3)}, p)
    with pytest.raises(CheckpointCorrupt):
        load_method(p)


def test_other_architecture(ckpt, tmp_path):
    d = load_checkpoint(ckpt)
    other = MetaTrainer("lstm_update_tele", tiny_config(lstm__update_hidden=5))
    d["meta_params"] = other.method.state_dict()        # weights of another architecture
    p = tmp_path / "arch.pt"
    save_checkpoint(p, d)
    with pytest.raises(CheckpointMismatch, match="architecture"):
        load_method(p)


def test_other_problem_size(ckpt, tmp_path):
    tr = MetaTrainer("lstm_update", tiny_config(problem__dims=[4, 6, 4, 3]))
    p = tmp_path / "lstm_update.pt"
    tr.save(p)
    with pytest.raises(ProblemMismatch, match="dims"):
        evaluate([ckpt, p], seeds=2, steps=2)
    d = load_checkpoint(ckpt)
    d["dims"] = [4, 6, 4, 3]                             # stored dims disagree with its configuration
    q = tmp_path / "dims.pt"
    save_checkpoint(q, d)
    with pytest.raises(ProblemMismatch):
        load_method(q)
    assert issubclass(ProblemMismatch, CheckpointMismatch) and issubclass(CheckpointMismatch, CheckpointError)
