"""metatele.meta: the higher unroll against a plain-tensor reference and finite differences, graph cuts
between truncation windows, resume, seeds, non-finite meta-updates, evaluation."""
import re
import weakref
from pathlib import Path

import pytest
import torch

from _meta_tiny import straight_and_resumed, tiny_config
from metatele.config import METHODS, load_config
from metatele.meta import AutogradStepper, HigherStepper, MetaTrainer, build_method, run_window, start
from metatele.meta.evaluate import evaluate, summary_table
from metatele.meta.unroll import rollout, window_meta_loss
from metatele.problems import is_eval_seed, regression_batch, train_seeds


def _meta_grads(method, prob, stepper_cls, first_order, K=4, windows=2, kind="sum"):
    """Meta-losses and meta-gradients of ``windows`` consecutive windows (graph cut in between)."""
    stepper = stepper_cls(len(prob.weights), first_order=first_order)
    s = start(method, prob.weights, prob.X, prob.Y)
    losses, grads = [], []
    for _ in range(windows):
        s, meta, rec = run_window(method, s, K, stepper, kind=kind)
        g = torch.autograd.grad(meta, list(method.parameters()), allow_unused=True)
        losses.append(meta.detach())
        grads.append([torch.zeros_like(p) if x is None else x for x, p in zip(g, method.parameters())])
        s = s.cut()
    return losses, grads, s


@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("first_order", [True, False])
def test_higher_unroll_equals_reference(method_name, first_order):
    cfg = tiny_config(problem__dtype="float64", teleport__order="update_then_teleport")
    m = build_method(method_name, cfg)
    prob = regression_batch(cfg.problem.dims, train_seeds(3), dtype=torch.float64)
    L_h, G_h, s_h = _meta_grads(m, prob, HigherStepper, first_order)
    L_r, G_r, s_r = _meta_grads(m, prob, AutogradStepper, first_order)
    for a, b in zip(L_h, L_r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for ga, gb in zip(G_h, G_r):
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)
    for a, b in zip(s_h.weights, s_r.weights):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_teleport_then_update_order_runs_and_matches_reference():
    cfg = tiny_config(problem__dtype="float64", teleport__order="teleport_then_update")
    m = build_method("lstm_update_tele", cfg)
    prob = regression_batch(cfg.problem.dims, train_seeds(2), dtype=torch.float64)
    L_h, G_h, _ = _meta_grads(m, prob, HigherStepper, False, windows=1)
    L_r, G_r, _ = _meta_grads(m, prob, AutogradStepper, False, windows=1)
    torch.testing.assert_close(L_h[0], L_r[0])
    for x, y in zip(G_h[0], G_r[0]):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("order", ["update_then_teleport", "teleport_then_update"])
@pytest.mark.parametrize("method_name", ["lstm_update_tele", "lstm_lr_tele"])
def test_through_teleport_is_second_order_along_the_teleport_only(method_name, order):
    """meta.through_teleport: in a window whose only gradient taken at a teleported point is the last
    one (K = 2 after an update-then-teleport step, K = 1 for teleport-then-update), the teleport LSTM's
    meta-gradient equals full second-order autograd (first_order=False) and the update LSTM's equals
    first order; the losses are unchanged, and higher agrees with the plain-autograd stepper."""
    cfg = tiny_config(problem__dtype="float64", teleport__order=order)
    m = build_method(method_name, cfg).double()
    prob = regression_batch(cfg.problem.dims, train_seeds(3), dtype=torch.float64)
    K = 2 if order == "update_then_teleport" else 1

    def grads(stepper, through):
        s = start(m, prob.weights, prob.X, prob.Y)
        s, meta, rec = run_window(m, s, K, stepper, through_teleport=through)
        g = torch.autograd.grad(meta, list(m.parameters()), allow_unused=True)
        return rec, {n: torch.zeros_like(p) if x is None else x for (n, p), x in zip(m.named_parameters(), g)}

    rec_fo, first = grads(HigherStepper(2, first_order=True), False)
    rec_so, second = grads(HigherStepper(2, first_order=False), False)
    rec_th, through = grads(HigherStepper(2, first_order=True), True)
    _, through_ref = grads(AutogradStepper(first_order=True), True)
    torch.testing.assert_close(rec_th, rec_fo, rtol=0, atol=0)
    torch.testing.assert_close(rec_th, rec_so, rtol=0, atol=0)
    moved = 0.0
    for n, g in through.items():
        ref = second[n] if n.startswith("tele_nets.") else first[n]
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(g, through_ref[n], rtol=1e-12, atol=1e-15)
        if n.startswith("tele_nets.") and "head" in n and "lr_head" not in n:
            moved = max(moved, float((g - first[n]).norm() / g.norm()))
    assert moved > 1e-3  # the teleport path is really there (first order misses it)


def test_through_teleport_trains_and_leaves_lstm_update_alone():
    cfg = tiny_config(meta__through_teleport=True)
    tr = MetaTrainer("lstm_update_tele", cfg)
    info = tr.run_meta_batch()
    assert info["diverged"] is False and all(torch.isfinite(p).all() for p in tr.method.parameters())
    a = MetaTrainer("lstm_update", cfg)
    b = MetaTrainer("lstm_update", tiny_config())
    a.run_meta_batch(), b.run_meta_batch()
    for x, y in zip(a.method.parameters(), b.method.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_through_teleport_must_be_boolean():
    with pytest.raises(ValueError, match="through_teleport"):
        tiny_config(meta__through_teleport="yes")
    with pytest.raises(ValueError, match="methods.lstm_lr_tele.through_teleport"):
        tiny_config(methods__lstm_lr_tele={"trajectories": 4, "steps": 6, "through_teleport": 1})


def test_per_method_through_teleport_overrides_meta():
    """A method's own ``through_teleport`` wins over ``meta.through_teleport``, and the trainer unrolls with
    it: LSTM(lr,tele) first order gives exactly the meta-gradient of a configuration without the option."""
    cfg = tiny_config(meta__through_teleport=True)
    cfg.methods["lstm_lr_tele"].through_teleport = False
    assert cfg.through_teleport_of("lstm_update_tele") and not cfg.through_teleport_of("lstm_lr_tele")
    plain = tiny_config(meta__through_teleport=False)
    runs = []
    for c in (cfg, plain):
        tr = MetaTrainer("lstm_lr_tele", c)
        tr.run_meta_batch()
        runs.append(tr)
    assert not runs[0].through and runs[0].progress.history == runs[1].progress.history
    for x, y in zip(runs[0].method.parameters(), runs[1].method.parameters()):
        assert torch.equal(x, y)
    assert MetaTrainer("lstm_update_tele", cfg).through


@pytest.mark.parametrize("method_name", METHODS)
def test_meta_gradient_finite_differences(method_name):
    """Second-order meta-gradient through the higher unroll = central differences of the meta-loss."""
    cfg = tiny_config(problem__dtype="float64")
    m = build_method(method_name, cfg)
    prob = regression_batch(cfg.problem.dims, train_seeds(2), dtype=torch.float64)
    params = list(m.parameters())
    gen = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]

    def meta_loss():
        s = start(m, prob.weights, prob.X, prob.Y)
        s, meta, _ = run_window(m, s, 4, HigherStepper(2, first_order=False))
        return meta

    g = torch.autograd.grad(meta_loss(), params, allow_unused=True)
    analytic = sum(float((x * d).sum()) for x, d in zip(g, v) if x is not None)
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
    f_plus = float(meta_loss().detach())
    with torch.no_grad():
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
    f_minus = float(meta_loss().detach())
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
    fd = (f_plus - f_minus) / (2 * eps)
    assert abs(analytic - fd) <= 1e-5 * max(1.0, abs(fd)), (analytic, fd)


def _graph_size(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        stack.extend(f for f, _ in n.next_functions)
    return len(seen)


@pytest.mark.parametrize("method_name", ["lstm_update_tele", "lstm_lr_tele"])
def test_graph_and_memory_do_not_grow_across_windows(method_name):
    cfg = tiny_config()
    m = build_method(method_name, cfg)
    prob = regression_batch(cfg.problem.dims, train_seeds(2))
    stepper = HigherStepper(2, first_order=True)
    s = start(m, prob.weights, prob.X, prob.Y)
    sizes, refs = [], []
    for w in range(8):
        s, meta, _ = run_window(m, s, 3, stepper)
        sizes.append(_graph_size(meta))
        refs.append(weakref.ref(meta))
        meta.backward()
        del meta
        s = s.cut()
        assert all(x.grad_fn is None for x in s.weights)
        assert all(h.grad_fn is None and c.grad_fn is None for st in (s.lstm["tele"] or []) for h, c in st)
    assert len(set(sizes)) == 1, sizes          # every window's graph has the same size
    assert all(r() is None for r in refs[:-1])  # earlier windows' graphs were freed


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_config()
    cfg.methods["lstm_update_tele"].trajectories = 8  # 4 meta-batches of 2
    _, c, (saved, _) = straight_and_resumed(cfg, "lstm_update_tele", tmp_path / "ck.pt")
    assert saved.meta_batch == 2 and c.progress.meta_batch == 4


def test_seed_schedule_is_disjoint_across_ranks_and_steps():
    cfg = tiny_config(train__batch=7)  # train.batch is the global meta-batch, shared 2/2/3 by 3 ranks
    seen = []
    for r in range(3):
        tr = MetaTrainer("lstm_lr_tele", cfg, rank=r, world_size=3)
        for i in range(4):
            seen += tr.seeds_for(i)
    assert len(seen) == len(set(seen))
    assert all(s % 2 == 0 for s in seen)
    one = MetaTrainer("lstm_lr_tele", cfg)
    assert sorted(seen) == sorted(s for i in range(4) for s in one.seeds_for(i))


def test_non_finite_meta_gradient_is_skipped():
    cfg = tiny_config()

    def poison(params):
        params[0].grad.fill_(float("nan"))

    tr = MetaTrainer("lstm_update", cfg, grad_hook=poison)
    before = {k: v.clone() for k, v in tr.method.state_dict().items()}
    tr.run_meta_batch()
    assert tr.progress.skipped == tr.progress.windows == 2 and tr.progress.updates == 0
    for k, v in tr.method.state_dict().items():
        assert torch.equal(v, before[k])
        assert torch.isfinite(v).all()


def test_window_meta_loss_kinds():
    L = [torch.tensor([4.0, 2.0]), torch.tensor([2.0, 1.0])]
    start = torch.tensor([8.0, 4.0])
    assert float(window_meta_loss(L, start, "sum")) == pytest.approx((6 + 3) / 2)
    assert float(window_meta_loss(L, start, "sum", decay=0.5)) == pytest.approx((0.5 * 6 + 3) / 2)
    assert float(window_meta_loss(L, start, "mean_ratio")) == pytest.approx((0.5 + 0.25) * 2 / 2)
    assert float(window_meta_loss(L, start, "log")) == pytest.approx(
        float(sum(torch.log(x) for x in L).mean()))


def test_evaluation_seeds_are_unseen_and_rollout_has_no_graph(tmp_path):
    cfg = tiny_config()
    paths = []
    for name in METHODS:
        tr = MetaTrainer(name, cfg)
        tr.run_meta_batch()
        tr.run_meta_batch()
        paths.append(tmp_path / f"{name}.pt")
        tr.save(paths[-1])
    res = evaluate(paths, seeds=3, steps=6)
    assert set(res["methods"]) == {"gd", "gd_tele", *METHODS}
    assert not set(res["eval_seeds"]) & set(res["train_seeds"])
    assert all(is_eval_seed(s) for s in res["eval_seeds"]) and len(res["train_seeds"]) == 4
    for e in res["methods"].values():
        assert len(e["loss_mean"]) == len(e["loss_std"]) == len(e["grad_norm_mean"]) == len(e["time_mean"]) == 6
    # method runs start from the same initialisations as GD
    assert res["methods"]["gd"]["loss_mean"][0] == pytest.approx(res["methods"]["lstm_update"]["loss_mean"][0])
    assert "steps to 1" in summary_table(res, [0, 3], [1.0])
    m = build_method("lstm_update_tele", cfg)
    prob = regression_batch(cfg.problem.dims, [1, 3])
    r = rollout(m, prob.weights, prob.X, prob.Y, 5)
    assert r["loss"].shape == (2, 5) and r["loss"].grad_fn is None


def test_config_errors_name_value_and_range(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[meta]\nunroll = 0\n")
    with pytest.raises(ValueError, match=r"meta.unroll = 0 .*allowed \[1"):
        load_config(p)
    p.write_text("[teleport]\naction = 'sideways'\n")
    with pytest.raises(ValueError, match="teleport.action = 'sideways'"):
        load_config(p)
    p.write_text("[lstm]\nhiden = 3\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_config(p)
    cfg = load_config("configs/paper.toml")
    assert (cfg.methods["lstm_update_tele"].trajectories, cfg.methods["lstm_update_tele"].steps) == (700, 100)
    assert cfg.meta.unroll == 10 and cfg.meta.lr_update == 1e-3 and cfg.meta.lr_teleport == 1e-4


@pytest.mark.parametrize("text, msg", [("[eval]\ntele_at = 5\n", "eval.tele_at = 5 must be a list, e.g. [5]"),
                                       ("[eval]\nthresholds = 1.5\n", "eval.thresholds = 1.5 must be a list"),
                                       ("[eval]\nreport_steps = 'all'\n", "eval.report_steps = 'all' must be a list")])
def test_config_scalar_for_a_list_names_the_key(tmp_path, text, msg):
    """Issue 9 item 9: a ValueError naming the key, not a TypeError from iterating a number."""
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=re.escape(msg)):
        load_config(p)


def test_config_file_errors_name_the_file(tmp_path):
    p = tmp_path / "binary.toml"
    p.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=re.escape(f"config file {str(p)!r} is not a text (UTF-8) TOML file")):
        load_config(p)
    with pytest.raises(ValueError, match=re.escape(f"config file {str(tmp_path)!r} is a directory")):
        load_config(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_diverging_window_keeps_finite_terms():
    """A learned update that blows up: the window stops at the first non-finite loss and the meta-loss of
    the finite steps before it is finite, with finite meta-gradients."""
    cfg = tiny_config(lstm__update_param="precond", lstm__precond_lr=0.5, lstm__precond_range=0.0)
    m = build_method("lstm_update", cfg)
    prob = regression_batch(cfg.problem.dims, train_seeds(1))
    prob = type(prob)(tuple(w * 30 for w in prob.weights), prob.X, prob.Y, prob.seeds, prob.dims)
    s = start(m, prob.weights, prob.X, prob.Y)
    s, meta, rec = run_window(m, s, 40, HigherStepper(2), kind="log")
    assert len(rec) < 40 and not all(bool(torch.isfinite(w).all()) for w in s.weights)
    assert torch.isfinite(meta)
    g = torch.autograd.grad(meta, list(m.parameters()), allow_unused=True)
    assert all(x is None or bool(torch.isfinite(x).all()) for x in g)


def test_diverged_trajectories_are_dropped_not_the_meta_batch():
    """With train.drop_diverged, a trajectory whose weights go non-finite leaves its meta-batch and the
    others go on to the end; without it the whole meta-batch is abandoned."""
    def run(drop: bool):
        cfg = tiny_config()
        cfg.train.drop_diverged = drop
        cfg.methods["lstm_update"].steps = 9
        tr = MetaTrainer("lstm_update", cfg, stepper="autograd")
        state = {}
        orig = tr.method.propose_update

        def poisoned(w, g, st, grad_rows=None):  # trajectory 0 blows up at inner step 4
            new, st = orig(w, g, st, grad_rows)
            state["t"] = state.get("t", -1) + 1
            if state["t"] == 4:
                new = tuple(torch.cat([torch.full_like(x[:1], float("inf")), x[1:]]) for x in new)
            return new, st

        tr.method.propose_update = poisoned
        ts = []
        r = tr.run_meta_batch(on_window=lambda info: ts.append(info["t"]))
        return tr.progress, r, ts

    p, r, ts = run(True)
    assert p.dropped == 1 and p.diverged == 0 and not r["diverged"] and ts[-1] == 9
    p, r, ts = run(False)
    assert p.dropped == 0 and p.diverged == 1 and r["diverged"] and ts[-1] < 9


def test_selection_keeps_the_best_meta_parameters(tmp_path):
    """train.select_every: the trainer scores its meta-parameters on held-out training-stream problems
    and keeps the best; checkpoints carry them, evaluation loads them, resume restores them."""
    from metatele.checkpoint import load_checkpoint
    from metatele.meta.evaluate import load_method

    cfg = tiny_config(train__select_every=1, train__select_trajectories=2, train__select_horizon=1.5)
    tr = MetaTrainer("lstm_update", cfg)
    scores = []
    orig = tr.selection_score
    tr.selection_score = lambda: scores.append(orig()) or scores[-1]
    tr.run_meta_batch()
    tr.run_meta_batch()
    assert len(scores) == 2 and tr.best["score"] == min(scores)
    assert set(tr.selection_seeds()).isdisjoint(set(tr.seeds_for(0) + tr.seeds_for(1)))
    assert all(s % 2 == 0 for s in tr.selection_seeds())  # training stream, never evaluation seeds
    tr.save(tmp_path / "a.pt")
    ck = load_checkpoint(tmp_path / "a.pt")
    m, _, _ = load_method(tmp_path / "a.pt")
    for k, v in m.state_dict().items():
        assert torch.equal(v, ck["best"]["meta_params"][k])
    tr2 = MetaTrainer("lstm_update", cfg)
    tr2.load_payload(ck)
    assert tr2.best["score"] == tr.best["score"] and tr2.best["meta_batch"] == tr.best["meta_batch"]


def test_inner_gradient_is_partial_after_a_two_hidden_layer_teleport():
    """After a teleport of a two-hidden-layer network the later weights are functions of the earlier
    ones; the steppers must still hand the update the partial derivatives (those of detached weights)."""
    from metatele.learned.teleport import apply_learned_teleport
    from metatele.nets import mse_loss

    prob = regression_batch([5, 6, 5, 5, 4], train_seeds(2), dtype=torch.float64)
    W = tuple(w.clone().requires_grad_(True) for w in prob.weights)
    gen = torch.Generator().manual_seed(0)
    Ts = [0.05 * torch.randn(2, 5, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    Wt = apply_learned_teleport(W, prob.X, Ts)  # W_2' depends on W_1'
    lf = lambda w: mse_loss(w, prob.X, prob.Y)  # noqa: E731
    wd = tuple(w.detach().requires_grad_(True) for w in Wt)
    ref = torch.autograd.grad(lf(wd).sum(), wd)
    for stepper in (AutogradStepper(first_order=True), AutogradStepper(first_order=False),
                    HigherStepper(3, first_order=True), HigherStepper(3, first_order=False)):
        _, g = stepper.grad(Wt, lf)
        for a, b in zip(g, ref):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        _, _, g2 = stepper.step(Wt, lf, lambda w, g: tuple(x - 1e-3 * y for x, y in zip(w, g)))
        for a, b in zip(g2, ref):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_selection_score_penalises_instability_beyond_the_horizon():
    from metatele.meta.trainer import selection_score

    good = torch.tensor([[100.0, 10.0, 5.0, 4.0, 3.0, 3.0]]).repeat(4, 1)
    fast_then_spike = good.clone() * 0.5
    fast_then_spike[0, 5] = 1e3  # one problem spikes after the horizon (3 steps)
    assert selection_score(fast_then_spike, 3) > selection_score(good, 3)
    assert selection_score(good * 0.5, 3) < selection_score(good, 3)  # faster within the horizon wins
    nan = good.clone()
    nan[1, 4] = float("nan")
    assert selection_score(nan, 3) > selection_score(good, 3) + 10


def test_teleport_until_the_training_horizon():
    """teleport.until / until_horizon: no learned teleport from that inner step on (same result as a
    method without teleport there), per method's own horizon."""
    cfg = tiny_config(teleport__until_horizon=True)
    m = build_method("lstm_update_tele", cfg)
    assert m.tele_until == cfg.methods["lstm_update_tele"].steps == 6
    assert build_method("lstm_lr_tele", cfg).tele_until == cfg.methods["lstm_lr_tele"].steps
    prob = regression_batch(cfg.problem.dims, train_seeds(2))
    calls = []
    orig = m.teleport
    m.teleport = lambda *a, **k: calls.append(1) or orig(*a, **k)
    rollout(m, prob.weights, prob.X, prob.Y, 10)
    assert len(calls) == 6
    m.tele_until = 0
    rollout(m, prob.weights, prob.X, prob.Y, 10)
    assert len(calls) == 16


def test_per_method_magnitude_and_batch():
    cfg = tiny_config()
    cfg.methods["lstm_update_tele"].magnitude = 0.2
    cfg.methods["lstm_lr_tele"].batch = 1
    cfg.validate()
    assert build_method("lstm_update_tele", cfg).tele_cfg.magnitude == 0.2
    assert build_method("lstm_lr_tele", cfg).tele_cfg.magnitude == cfg.teleport.magnitude == 0.05
    assert cfg.batch_of("lstm_lr_tele") == 1 and cfg.batch_of("lstm_update") == cfg.train.batch
    assert MetaTrainer("lstm_lr_tele", cfg).n_meta_batches == cfg.methods["lstm_lr_tele"].trajectories
    cfg.methods["lstm_update"].magnitude = -1
    with pytest.raises(ValueError, match="methods.lstm_update.magnitude"):
        cfg.validate()


def test_per_method_magnitude_mode():
    cfg = tiny_config()
    cfg.methods["lstm_update_tele"].magnitude_mode = "learned"
    cfg.validate()
    assert build_method("lstm_update_tele", cfg).tele_cfg.magnitude_mode == "learned"
    assert build_method("lstm_lr_tele", cfg).tele_cfg.magnitude_mode == cfg.teleport.magnitude_mode == "fixed"
    cfg.methods["lstm_update_tele"].magnitude_mode = "large"
    with pytest.raises(ValueError, match="methods.lstm_update_tele.magnitude_mode"):
        cfg.validate()


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    for m in cfg.methods:
        build_method(m, cfg)  # every method of every configuration builds


def test_paper_fast_recipe():
    """configs/paper_fast.toml's LSTM(update,tele) teleports with a learned distance up to 0.15 over its first
    50 steps, learning through its teleports; LSTM(lr,tele) teleports to its horizon on one thread; the
    update LSTMs train with staggered truncations."""
    cfg = load_config(CONFIGS / "paper_fast.toml")
    tele = build_method("lstm_update_tele", cfg)
    assert (tele.tele_until, tele.tele_cfg.magnitude, tele.tele_cfg.magnitude_mode) == (50, 0.15, "learned")
    lr = build_method("lstm_lr_tele", cfg)
    assert (lr.tele_until, lr.tele_cfg.magnitude, lr.tele_cfg.magnitude_mode) == (300, 0.01, "fixed")
    assert cfg.meta.through_teleport and cfg.threads_of("lstm_lr_tele") == 1 and cfg.train.batch == 32
    # staggered truncations for the two update LSTMs (at the paper's meta lr), lockstep for LSTM(lr,tele)
    assert cfg.stagger_of("lstm_update_tele") and cfg.stagger_of("lstm_update") and not cfg.stagger_of("lstm_lr_tele")
    assert cfg.meta.lr_update == 1e-3 and cfg.batch_of("lstm_update_tele") == 32
    assert cfg.through_teleport_of("lstm_update_tele") and not cfg.through_teleport_of("lstm_lr_tele")


def test_teleport_scale_first_magnitude_and_taper():
    cfg = tiny_config(teleport__first_magnitude=0.5, teleport__taper=3, teleport__until_horizon=True)
    m = build_method("lstm_update_tele", cfg)  # magnitude 0.05, horizon 6
    assert m.tele_until == 6
    scales = [m.teleport_scale(t) for t in range(8)]
    assert scales == pytest.approx([10.0, 1.0, 1.0, 3 / 4, 2 / 4, 1 / 4, 0.0, 0.0])
    # the scaled T is what the action receives: a step-0 teleport 10x as far as with the plain config
    prob = regression_batch(cfg.problem.dims, train_seeds(2), dtype=torch.float64)
    seen = []
    orig = m.teleport
    m.teleport = lambda w, X, Ts, Xp=None: (seen.append([float(T.flatten(1).norm(dim=1).max()) for T in Ts]),
                                            orig(w, X, Ts, Xp))[1]
    m.double()
    rollout(m, prob.weights, prob.X, prob.Y, 6)
    assert seen[0][0] == pytest.approx(0.5, rel=1e-6) and seen[1][0] == pytest.approx(0.05, rel=1e-6)
    assert seen[5][0] == pytest.approx(0.05 / 4, rel=1e-6)


@pytest.mark.parametrize("key, value, match", [("first_magnitude", 1.0, "first_magnitude"),
                                               ("taper", -1, "taper"), ("taper", 2, "needs an end")])
def test_teleport_schedule_validation(key, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{f"teleport__{key}": value})


def test_cpu_threads_restores_and_per_method_threads_validate():
    from metatele.devices import cpu_threads
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(0):
        assert torch.get_num_threads() == before
    cfg = tiny_config()
    cfg.methods["lstm_lr_tele"].threads = 1
    cfg.validate()
    assert cfg.threads_of("lstm_lr_tele") == 1 and cfg.threads_of("lstm_update") == 0
    cfg.methods["lstm_lr_tele"].threads = -1
    with pytest.raises(ValueError, match="methods.lstm_lr_tele.threads"):
        cfg.validate()


def test_per_method_until_takes_precedence_over_the_horizon():
    cfg = tiny_config(teleport__until_horizon=True)
    cfg.methods["lstm_update_tele"].until = 3
    cfg.validate()
    assert build_method("lstm_update_tele", cfg).tele_until == 3
    assert build_method("lstm_lr_tele", cfg).tele_until == cfg.methods["lstm_lr_tele"].steps
    plain = tiny_config()
    assert build_method("lstm_lr_tele", plain).tele_until == 0
    m = build_method("lstm_update_tele", cfg)
    calls = []
    orig = m.teleport
    m.teleport = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    prob = regression_batch(cfg.problem.dims, train_seeds(2))
    rollout(m, prob.weights, prob.X, prob.Y, 6)
    assert len(calls) == 3  # steps 0, 1, 2
    cfg.methods["lstm_update"].until = -1
    with pytest.raises(ValueError, match="methods.lstm_update.until"):
        cfg.validate()


def test_first_window_weight_scales_only_the_first_windows_meta_loss():
    seen = {}
    for w in (1.0, 3.0):
        tr = MetaTrainer("lstm_update", tiny_config(meta__first_window_weight=w))  # 6 steps, windows of 3
        got = []
        orig = tr._meta_update
        tr._meta_update = lambda loss, got=got, orig=orig: (got.append(float(loss.detach())), orig(loss))[1]
        info = tr.run_meta_batch()
        seen[w] = (got, info["meta_loss"])
    (a1, a2), (b1, b2) = seen[1.0][0], seen[3.0][0]
    assert b1 == pytest.approx(3.0 * a1, rel=1e-6)  # same first window, weighted
    assert seen[3.0][1] == pytest.approx(seen[1.0][1], rel=1e-6)  # the logged meta-loss is unweighted
    with pytest.raises(ValueError, match="first_window_weight"):
        tiny_config(meta__first_window_weight=0.0)
