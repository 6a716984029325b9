"""Staggered truncations (train.stagger): per-trajectory teleport schedules equal the unbatched ones, the
population keeps its trajectories spread over the horizon, resuming is exact, and bad settings are refused."""
import dataclasses

import pytest
import torch

from _meta_tiny import straight_and_resumed, tiny_config
from metatele.learned.methods import LearnedMethod
from metatele.meta import HigherStepper, MetaTrainer, build_method, start
from metatele.meta.unroll import inner_step
from metatele.nets import mse_loss
from metatele.problems import regression_batch, train_seeds


def _advance(method, s, n, stepper, through=False):
    for _ in range(n):
        s, _, _ = inner_step(method, s, stepper, through_teleport=through)
    return s


@pytest.mark.parametrize("through", [False, True])
@pytest.mark.parametrize("method_name,order", [("lstm_update_tele", "update_then_teleport"),
                                               ("lstm_update_tele", "teleport_then_update"),
                                               ("lstm_lr_tele", "update_then_teleport")])
def test_trajectories_at_different_steps_follow_their_own_teleport_schedule(method_name, order, through):
    """Two trajectories 3 steps apart, batched with per-trajectory phases, give exactly what each gives
    alone (losses, weights, LSTM states, and the meta-gradient of the end losses, also through the
    teleports): with ``until = 4`` and ``every = 2`` one of them teleports where the other does not, and a
    trajectory that does not teleport keeps its teleport-LSTM state and step size."""
    cfg = tiny_config(problem__dtype="float64", teleport__order=order, teleport__every=2, teleport__until=4)
    m = build_method(method_name, cfg).double()
    stepper = HigherStepper(2, first_order=True)
    prob = regression_batch(cfg.problem.dims, train_seeds(2), dtype=torch.float64)
    one = [start(m, [w[i:i + 1] for w in prob.weights], prob.X[i:i + 1], prob.Y[i:i + 1]) for i in range(2)]
    one[1] = _advance(m, one[1], 3, stepper, through).cut()  # trajectory 1 is 3 steps ahead
    # the batch: trajectory 0 at step 0, trajectory 1 at step 3 (its state copied from the run alone)
    both = start(m, prob.weights, prob.X, prob.Y)
    both = dataclasses.replace(both, phase=torch.tensor([0, 3]))
    both = both.replace(torch.tensor([1]), dataclasses.replace(one[1], phase=torch.tensor([3])))
    for _ in range(4):  # steps (0, 3), (1, 4), (2, 5), (3, 6): teleports at (0, -), (-, -), (2, -), (-, -)
        both, loss_b, _ = inner_step(m, both, stepper, through_teleport=through)
        alone = []
        for i in range(2):
            one[i], loss_i, _ = inner_step(m, one[i], stepper, through_teleport=through)
            alone.append(loss_i)
        torch.testing.assert_close(loss_b.detach(), torch.cat(alone).detach(), rtol=1e-12, atol=0)
    assert both.phase.tolist() == [4, 7] and [o.t for o in one] == [4, 7]
    for i in range(2):
        for a, b in zip(both.weights, one[i].weights):
            torch.testing.assert_close(a[i:i + 1], b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(both.lstm["lr"][i:i + 1], one[i].lstm["lr"], rtol=1e-12, atol=0)
        for (h, c), (h1, c1) in zip(both.lstm["tele"][0], one[i].lstm["tele"][0]):
            torch.testing.assert_close(h[i:i + 1], h1, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(c[i:i + 1], c1, rtol=1e-12, atol=1e-14)
    params = [p for p in m.parameters()]

    def meta_grad(states):
        end = sum(mse_loss(st.weights, st.X, st.Y).sum() for st in states)
        return torch.autograd.grad(end, params, allow_unused=True)

    for a, b in zip(meta_grad([both]), meta_grad(one)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("order", ["update_then_teleport", "teleport_then_update"])
def test_staggered_meta_gradient_through_teleports_of_some_rows(order):
    """As the meta-trainer runs it (deferred LSTM weight gradients, ``backward()``, learning through the
    teleports): a batch of three trajectories of which only some teleport at each step, whose second-order
    work and update-LSTM input gradient are formed for the teleported rows only, gives the meta-gradient of
    the three run alone (float64)."""
    cfg = tiny_config(problem__dtype="float64", teleport__order=order, teleport__every=1, teleport__until=3)
    m = build_method("lstm_update_tele", cfg).double()
    m.defer_weight_grads(True)
    stepper = HigherStepper(2, first_order=True)
    prob = regression_batch(cfg.problem.dims, train_seeds(3), dtype=torch.float64)
    one = [start(m, [w[i:i + 1] for w in prob.weights], prob.X[i:i + 1], prob.Y[i:i + 1]) for i in range(3)]
    ahead = [0, 2, 4]
    one = [_advance(m, o, n, stepper, True).cut() for o, n in zip(one, ahead)]
    both = dataclasses.replace(start(m, prob.weights, prob.X, prob.Y), phase=torch.tensor(ahead))
    for i in (1, 2):
        both = both.replace(torch.tensor([i]), dataclasses.replace(one[i], phase=torch.tensor([ahead[i]])))
    views = []
    for _ in range(3):  # phases (0, 2, 4), (1, 3, 5), (2, 4, 6): teleports at (0, 2, -), (1, -, -), (2, -, -)
        both, _, _ = inner_step(m, both, stepper, through_teleport=True)
        views.append(None if both.view_rows is None else both.view_rows.tolist())
        one = [inner_step(m, o, stepper, through_teleport=True)[0] for o in one]
    # the view of the teleported rows travels to the next step (teleport_then_update uses it within a step)
    assert views == ([[0, 1], [0], [0]] if order == "update_then_teleport" else [None] * 3)

    def meta_grad(states):
        m.zero_grad(set_to_none=True)
        sum(mse_loss(st.weights, st.X, st.Y).sum() for st in states).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    got, ref = meta_grad([both]), meta_grad(one)
    assert set(got) == set(ref) and any("tele" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-14)
    if order == "update_then_teleport":  # dropping a trajectory mid-window keeps the others' views
        kept = both.select(torch.tensor([0, 2]))
        assert kept.view_rows is None and kept.tele_view[0].shape[0] == 2
        torch.testing.assert_close(kept.tele_view[0][0], both.tele_view[0][0], rtol=0, atol=0)
        torch.testing.assert_close(kept.tele_view[0][1], both.weights[0][2].detach(), rtol=0, atol=0)


def test_teleport_scales_per_trajectory():
    cfg = tiny_config(teleport__every=2, teleport__until=4, teleport__taper=2)
    m = build_method("lstm_update_tele", cfg)
    phase = torch.tensor([0, 1, 2, 3, 4, 6])
    assert m.teleport_scales(phase).tolist() == [m.teleport_scale(t) for t in phase.tolist()]
    assert m.teleport_scales(phase).tolist() == pytest.approx([1.0, 0.0, 2 / 3, 0.0, 0.0, 0.0])
    assert m.teleport_scales(torch.tensor([1, 5, 7])) == 0.0  # nobody teleports: the step has no teleport


def test_replace_state_puts_rows_and_keeps_the_others():
    cfg = tiny_config()
    m = build_method("lstm_lr_tele", cfg)
    st = m.init_state(3)
    st = {"update": None, "tele": [tuple((h + 1, c + 2) for h, c in s) for s in st["tele"]], "lr": st["lr"] + 1}
    fresh = m.init_state(1)
    out = LearnedMethod.replace_state(st, torch.tensor([1]), fresh)
    h, c = out["tele"][0][0]
    assert torch.all(h[1] == 0) and torch.all(h[[0, 2]] == 1) and torch.all(c[[0, 2]] == 2)
    assert out["lr"].tolist() == pytest.approx([1 + cfg.lstm.lr_init, cfg.lstm.lr_init, 1 + cfg.lstm.lr_init])
    assert torch.all(st["tele"][0][0][0] == 1)  # out of place


@pytest.mark.parametrize("method_name", ["lstm_update_tele", "lstm_update"])
def test_population_stays_spread_over_the_horizon(method_name):
    """Batch 6, horizon 6, windows of 3: first lives of 3, 6, 3, 6, ... steps; afterwards half of the
    trajectories are always in their first window and half in their second, every window replaces 3 of
    them with new seeds, and the seeds never repeat."""
    cfg = tiny_config(train__batch=6, train__stagger=True)
    cfg.methods[method_name].trajectories = 12  # 2 meta-batches
    tr = MetaTrainer(method_name, cfg)
    info = tr.run_meta_batch()
    pop = tr.population
    assert pop.state.phase.tolist() == [3, 0, 3, 0, 3, 0]
    assert info["seeds"] == train_seeds(6, start=6)  # 3 ended after window 1, 3 more after window 2
    assert tr.progress.trajectories == 6 and tr.progress.updates == 2
    info2 = tr.run_meta_batch()
    assert sorted(tr.population.state.phase.tolist()) == [0, 0, 0, 3, 3, 3]
    assert info2["seeds"] == train_seeds(6, start=12)
    assert pop.next_seed == 18 and tr.progress.trajectories == 12 and tr.progress.updates == 4
    assert torch.all(tr.population.life == 6)


@pytest.mark.parametrize("low", ["same", "bfloat16"])
def test_staggered_resume_equals_uninterrupted(tmp_path, low):
    """The population (weights, LSTM states, phases, seeds) is in the checkpoint: resuming is exact, with
    bfloat16 products too."""
    cfg = tiny_config(train__stagger=True, train__batch=4, meta__matmul_dtype=low)
    cfg.methods["lstm_update_tele"].trajectories = 16  # 4 meta-batches of 4
    a, c, (_, next_seed) = straight_and_resumed(cfg, "lstm_update_tele", tmp_path / "ck.pt")
    assert next_seed == 4 + 2 * 4  # 4 first, then 4 new per meta-batch
    assert a.population.state.phase.tolist() == c.population.state.phase.tolist()
    assert a.population.next_seed == c.population.next_seed
    for x, y in zip(a.population.state.weights, c.population.state.weights):
        assert torch.equal(x, y)


def _meta_training_lowers_the_loss(**changes):
    """A staggered LSTM(update) meta-trained on a tiny config with ``changes``: its log-loss on problems it
    never saw falls, and no meta-update was skipped."""
    cfg = tiny_config(train__stagger=True, train__batch=4, meta__meta_loss="log", **changes)
    cfg.methods["lstm_update"].trajectories = 60
    tr = MetaTrainer("lstm_update", cfg)
    prob = regression_batch(cfg.problem.dims, train_seeds(8, start=10**6), dtype=torch.float32)

    def score():
        from metatele.meta.unroll import rollout
        return float(rollout(tr.method, prob.weights, prob.X, prob.Y, 6)["loss"].log().mean())

    before = score()
    while tr.progress.meta_batch < tr.n_meta_batches:
        tr.run_meta_batch()
    assert tr.progress.skipped == 0 and score() < before
    return tr


def test_staggered_meta_training_learns():
    """The meta-loss of a staggered LSTM(update) falls (same problems before and after meta-training)."""
    _meta_training_lowers_the_loss()


def test_bfloat16_products_meta_train_and_stay_close_to_float32():
    """``meta.matmul_dtype = "bfloat16"`` (per method too): the LSTMs' products run in bfloat16 during
    meta-training only, the meta-gradient stays close to float32's, and meta-training lowers the loss."""
    cfg = tiny_config(train__stagger=True, train__batch=4, meta__meta_loss="log", meta__through_teleport=True)
    grads = {}
    for low in ("same", "bfloat16"):
        cfg.methods["lstm_update_tele"].matmul_dtype = low
        tr = MetaTrainer("lstm_update_tele", cfg)
        assert tr.method.update_net.lstm.matmul_dtype == (None if low == "same" else torch.bfloat16)
        tr.method.zero_grad(set_to_none=True)
        s = tr._new_population().state
        _, meta, _ = tr._window(s, cfg.meta.unroll, HigherStepper(2, first_order=True))
        meta.backward()
        grads[low] = torch.cat([p.grad.flatten() for p in tr.method.parameters() if p.grad is not None])
    assert grads["same"].shape == grads["bfloat16"].shape
    rel = (grads["bfloat16"] - grads["same"]).norm() / grads["same"].norm()
    assert 0 < rel < 0.05, rel
    tr = _meta_training_lowers_the_loss(meta__matmul_dtype="bfloat16")
    assert tr.cfg.matmul_dtype_of("lstm_update") == "bfloat16"
    assert tr.method.update_net.lstm.matmul_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="matmul_dtype"):
        tiny_config(meta__matmul_dtype="float16")


def test_bfloat16_products_fall_back_where_they_would_be_slow(monkeypatch):
    """A CPU without fast bfloat16 products keeps float32 ones, and says so."""
    from metatele.meta.trainer import matmul_dtype
    cpu = torch.device("cpu")
    assert matmul_dtype("same", cpu) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    with pytest.warns(UserWarning, match="keeps float32"):
        assert matmul_dtype("bfloat16", cpu) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert matmul_dtype("bfloat16", cpu) is torch.bfloat16


@pytest.mark.parametrize("change,match", [
    ({"meta__unroll": 4}, "multiple of meta.unroll"),
    ({"meta__first_window_weight": 2.0}, "first_window_weight"),
])
def test_stagger_refuses_what_it_cannot_do(change, match):
    cfg = tiny_config(train__stagger=True, **change)
    with pytest.raises(ValueError, match=match):
        MetaTrainer("lstm_update", cfg)


def test_stagger_is_single_process():
    cfg = tiny_config(train__stagger=True)
    with pytest.raises(ValueError, match="single-process"):
        MetaTrainer("lstm_update", cfg, rank=0, world_size=2)


def test_stagger_must_be_boolean():
    with pytest.raises(ValueError, match="train.stagger"):
        tiny_config(train__stagger="yes")


def test_per_method_stagger_overrides_train_stagger():
    d = tiny_config(train__stagger=True)
    d.methods["lstm_lr_tele"].stagger = False
    d.validate()
    assert d.stagger_of("lstm_update") and not d.stagger_of("lstm_lr_tele")
    lr = MetaTrainer("lstm_lr_tele", d)
    lr.run_meta_batch()
    assert lr.population is None
    up = MetaTrainer("lstm_update", d)
    up.run_meta_batch()
    assert up.population is not None
    with pytest.raises(ValueError, match="methods.lstm_update.stagger"):
        tiny_config(methods__lstm_update={"trajectories": 4, "steps": 6, "stagger": "yes"})


def test_precision_benchmark_runs(capsys):
    """benchmarks/meta_precision.py: its product timings cover both precisions, and bad arguments exit."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import meta_precision

    rows = meta_precision.product_times(reps=1)
    assert [r[0] for r in rows] == meta_precision.SHAPES
    assert all(f32 > 0 and bf16 > 0 for _, f32, bf16 in rows)
    with pytest.raises(SystemExit):
        meta_precision.main(["--rounds", "0"])
    assert "--rounds" in capsys.readouterr().err
