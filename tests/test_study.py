"""metatele.meta.study: several meta-training seeds as one resumable study, and its statistics."""
import json
from pathlib import Path

import numpy as np
import pytest

from _meta_tiny import TINY_TOML
from metatele.config import config_to_dict, load_config
from metatele.meta import study


def test_compare_counts_pairs_and_brackets_the_mean_log_ratio():
    rng = np.random.default_rng(0)
    b = rng.uniform(10, 20, (3, 20))
    a = b * 0.9
    c = study.compare(a, b)
    assert c["frac_lower"] == 1.0 and c["pairs"] == 60
    assert c["ci_low"] <= np.log(0.9) + 1e-12 <= c["ci_high"] + 1e-12
    assert abs(c["mean_log_ratio"] - np.log(0.9)) < 1e-12
    # a baseline with one 'seed' broadcasts over the training seeds; a diverged run weighs against its method
    a2 = a.copy()
    a2[0, 0] = np.nan
    c2 = study.compare(a2, b[:1])
    assert c2["pairs"] == 60 and c2["mean_log_ratio"] > c["mean_log_ratio"]
    assert np.isfinite([c2["ci_low"], c2["ci_high"]]).all()


def test_spikes_and_divergence_are_counted_per_run():
    L = np.array([[10.0, 5.0, 4.0, 3.0],      # fine
                  [10.0, 2.0, 30.0, 1.0],     # 30 > 10 x running minimum 2: spike
                  [10.0, 5.0, np.inf, 1.0]])  # diverged
    s = study.spikes(L)
    assert s == {"runs": 3, "diverged": 1, "spiked": 1, "max_rise": 15.0}  # 30 / 2, the diverged run aside
    assert study.spikes(L[:1])["max_rise"] == 1.0  # a loss that only falls never rose
    assert np.isnan(study.spikes(L[2:])["max_rise"])  # no finite run


def test_overrides_parse_toml_values_and_reject_bad_keys():
    d = study.apply_overrides(config_to_dict(load_config(None)),
                              ["meta.lr_update=3e-3", 'teleport.order="teleport_then_update"', "train.batch=4"])
    assert d["meta"]["lr_update"] == 3e-3 and d["teleport"]["order"] == "teleport_then_update"
    for bad in ["meta.lr_update", "lr=1", "meta.lr_update=fast"]:
        with pytest.raises(ValueError, match="--set"):
            study.apply_overrides({}, [bad])


def test_seed_configs_differ_in_initialisation_and_data():
    cfg = load_config(None)
    c0, c2 = study.seed_config(cfg, 0), study.seed_config(cfg, 2)
    assert (c0.train.seed, c2.train.seed) == (0, 2)
    n = max(m.trajectories for m in cfg.methods.values())
    assert c2.train.seed_offset - c0.train.seed_offset == 2 * n  # disjoint blocks of training problems


def test_tiny_study_end_to_end_and_resumable(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TINY_TOML)
    out = tmp_path / "st"
    args = ["--config", str(cfg_path), "--seeds", "2", "--out", str(out), "--eval-seeds", "3",
            "--methods", "lstm_update_tele", "lstm_update", "--threads", "1", "--no-plots"]
    assert study.main(args) == 0
    first = capsys.readouterr().out
    assert "lstm_update_tele vs lstm_update" in first and "spiked" in first
    s = json.loads((out / "study.json").read_text())  # strict JSON
    assert s["steps"] == 18 and s["train_steps"] == 6 and s["seeds"] == [0, 1]
    curves = s["curves"]["lstm_update_tele"]
    assert np.array(curves, dtype=float).shape == (2, 3, 18)
    assert set(s["stats"]["loss"]) == {"gd", "gd_tele", "lstm_update", "lstm_update_tele"}
    assert (out / "study.md").read_text().startswith("# Meta-training seeds study")
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    assert len(mtimes) == 4
    assert study.main(args) == 0  # a second run trains nothing and reports the same numbers
    assert "complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == mtimes
    assert json.loads((out / "study.json").read_text())["stats"] == s["stats"]
    # the same checkpoints on other unseen initialisations: a report beside the main one
    assert study.main(args + ["--eval-offset", "3"]) == 0
    other = json.loads((out / "study_eval3.json").read_text())
    assert other["eval_seeds"] == [7, 9, 11] and s["eval_seeds"] == [1, 3, 5]
    assert json.loads((out / "study.json").read_text())["stats"] == s["stats"]
    assert other["stats"] != s["stats"]
    assert study.main(args + ["--eval-offset", "-1"]) == 2


def test_study_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "default.toml")
    assert study.main(["--out", str(tmp_path / "f"), "--config", cfg]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert study.main(["--out", str(tmp_path / "o"), "--set", "meta.nope=1"]) == 2
    assert "unknown key" in capsys.readouterr().err
