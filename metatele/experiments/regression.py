"""P1 section 5 (N3): GD and AdaGrad with and without teleportation on the 3-layer LeakyReLU regression.

``dims = [4, 5, 6, 7, 8]``: ``X`` 5 x 4, ``W_0`` 6 x 5, ``W_1`` 7 x 6, ``W_2`` 8 x 7, ``Y`` 8 x 4; every entry
uniform in [0, 1) from the run's seed (:func:`metatele.problems.regression_problem`); loss
``1/2 ||Y - f(X)||^2``; full-batch (batch 4). P1's settings are the defaults: 300 steps; GD lr 1e-4 with one
teleport before step 5 (8 ascent steps on ``||grad L||^2``, teleport lr 1e-7); AdaGrad lr 1e-1 (eps 1e-10) with
one teleport before step 5 (2 steps, teleport lr 1e-5); 5 runs. The optimisers are ``torch.optim.SGD`` and
``torch.optim.Adagrad`` inside :class:`metatele.optim.TeleportingOptimizer`; the teleport uses the exact
inverse-form action (P1's code uses the first-order ``U (I - T)``; here the batch 4 is below every width, so
the loss is kept exactly). AdaGrad's accumulated squares are kept across the teleport, as in P1's code
(``--state-policy``). Logged per step: loss, ``||grad L||^2`` (= -dL/dt of gradient flow) and wall-clock time.

    python -m metatele.experiments.regression --out results/regression
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from ..nets import to_sequential
from ..optim import STATE_POLICIES, TeleportingOptimizer, TeleportSchedule, TeleportSettings
from ..plots import band, grid, save_figure
from ..problems import regression_problem
from . import _common as C

DIMS = [4, 5, 6, 7, 8]
#: P1's settings (``multi_layer_regression.py``): method -> (optimiser, lr, teleport lr, teleport steps).
METHODS = {"GD": ("sgd", 1e-4, 1e-7, 8), "AdaGrad": ("adagrad", 1e-1, 1e-5, 2)}


def build_model(weights) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, W in enumerate(weights):
        if i:
            layers.append(nn.LeakyReLU(0.1))
        layers.append(nn.Linear(W.shape[1], W.shape[0], bias=False))
    model = nn.Sequential(*layers)
    to_sequential(weights, model)
    return model


def train(weights, X, Y, method: str, teleport: bool, args) -> dict:
    """Full-batch training; ``X (d_in, b)``, ``Y (d_out, b)`` in the papers' column convention."""
    kind, lr, tele_lr, tele_steps = METHODS[method]
    model = build_model(weights)
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if kind == "sgd"
           else torch.optim.Adagrad(model.parameters(), lr=lr, eps=1e-10))
    inputs, targets = X.T.contiguous(), Y.T.contiguous()
    if teleport:
        schedule = TeleportSchedule(epochs=(), per_epoch=0, steps=tuple(args.teleport_at), batch_size=inputs.shape[0])
        # P1's raw ascent rule, explicitly (metatele's default is the normalised rule)
        settings = TeleportSettings(objective="grad_norm", loss="mse", steps=tele_steps,
                                    lr=tele_lr * args.teleport_lr_scale, rule="raw", action=args.action, cap=args.cap)
        wrapped = TeleportingOptimizer(model, opt, schedule=schedule, settings=settings,
                                       batches=lambda: (inputs, targets), state_policy=args.state_policy)
    else:
        wrapped = TeleportingOptimizer(model, opt)
    losses, gns, times = [], [], []
    clock = 0.0
    for step in range(args.steps):
        t0 = time.perf_counter()
        wrapped.start_batch(0, step)
        wrapped.zero_grad()
        loss = 0.5 * (targets - model(inputs)).pow(2).sum()
        loss.backward()
        gn = sum(float(p.grad.pow(2).sum()) for p in model.parameters())
        wrapped.step()
        clock += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        gns.append(gn)
        times.append(clock)
    return {"loss": losses, "grad_norm_sq": gns, "time": times,
            "events": [e.as_dict() for e in wrapped.events]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metatele.experiments.regression", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--teleport-at", type=int, nargs="+", default=[5], help="steps before which to teleport")
    p.add_argument("--seed", type=int, default=0, help="run r uses problem seed (seed + r)")
    p.add_argument("--state-policy", default="keep", choices=STATE_POLICIES)
    p.add_argument("--action", default="inverse", choices=("inverse", "linearised"),
                   help="inverse: exact group action (default); linearised: P1 code's U (I - T), first order")
    p.add_argument("--teleport-lr-scale", type=float, default=1.0,
                   help="multiply P1's teleport learning rates (1e-7 for GD, 1e-5 for AdaGrad) by this")
    p.add_argument("--cap", type=float, default=None, help="stop a teleport once ||grad L||^2 exceeds this")
    p.add_argument("--out", default="results/regression")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> dict:
    torch.set_num_threads(max(1, args.threads))
    if args.quick:
        args.runs, args.steps = min(args.runs, 2), min(args.steps, 30)
    C.check_positive("runs", args.runs)
    C.check_positive("steps", args.steps)
    res = {"experiment": "regression", "paper": "P1 section 5 (3-layer regression)", "config": vars(args).copy(),
           "dims": DIMS, "runs": {}}
    # warm-up so the first timed run does not pay for lazy initialisation (as P1 does)
    w, X, Y = regression_problem(DIMS, 10 ** 6)
    train(w, X, Y, "GD", True, argparse.Namespace(**{**vars(args), "steps": min(args.steps, 10)}))
    pb = C.bar(args.runs * 4, "regression", args)
    for method in METHODS:
        for teleport in (False, True):
            key = f"{method} + teleport" if teleport else method
            res["runs"][key] = []
            for r in range(args.runs):
                w, X, Y = regression_problem(DIMS, args.seed + r)
                res["runs"][key].append(train(w, X, Y, method, teleport, args))
                pb.update(1)
    pb.close()
    summ = {}
    for key, hs in res["runs"].items():
        L = np.array([h["loss"] for h in hs])
        summ[key] = {"loss_at": {str(s): float(np.exp(np.log(L[:, s]).mean())) for s in (0, 5, 6, 10, 50, 100, 299)
                                 if s < L.shape[1]},
                     "final_loss_geomean": float(np.exp(np.log(L[:, -1]).mean())),
                     "wall_time_s": float(np.mean([h["time"][-1] for h in hs])),
                     "diverged_runs": C.diverged_runs([h["loss"] for h in hs])}
        ev = [e for h in hs for e in h["events"]]
        if ev:
            summ[key]["grad_norm_sq_before_after"] = [float(np.mean([e["objective_before"] for e in ev])),
                                                      float(np.mean([e["objective_after"] for e in ev]))]
            summ[key]["loss_rel_change"] = float(np.max([abs(e["loss_after"] - e["loss_before"]) / e["loss_before"]
                                                         for e in ev]))
            summ[key]["exactness"] = sorted({e["exactness"] for e in ev})
    res["summary"] = summ
    plot(res, args.out)
    C.write_results(args.out, res)
    return res


def plot(res: dict, out: str) -> None:
    fig, axes = grid(1, 4, width=3.8, height=3.2)
    for i, (key, hs) in enumerate(res["runs"].items()):
        steps = np.arange(len(hs[0]["loss"]))
        color, ls = f"C{i // 2}", ("--" if "teleport" in key else "-")
        n_ok = sum(np.isfinite(h["loss"][-1]) for h in hs)
        if n_ok < len(hs):  # the mean is then over the runs that stayed finite
            key = f"{key} ({len(hs) - n_ok}/{len(hs)} runs diverged)"
        band(axes[0, 0], steps, [h["loss"] for h in hs], key, color=color, log=True, linestyle=ls)
        band(axes[0, 1], [h["time"] for h in hs], [h["loss"] for h in hs], key, color=color, log=True, linestyle=ls)
        band(axes[0, 2], steps, [h["grad_norm_sq"] for h in hs], key, color=color, log=True, linestyle=ls)
        axes[0, 3].plot(hs[0]["loss"], hs[0]["grad_norm_sq"], color=color, linestyle=ls, label=key.split(" (")[0])
    for ax, xl, yl in ((axes[0, 0], "step", "loss"), (axes[0, 1], "wall-clock time (s)", "loss"),
                       (axes[0, 2], "step", r"$\|\nabla L\|^2$ (= -dL/dt)"),
                       (axes[0, 3], "loss (run 0)", r"$\|\nabla L\|^2$ (run 0)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    axes[0, 3].set_xscale("log")
    axes[0, 3].set_yscale("log")
    fig.suptitle(f"3-layer regression dims {res['dims']} (geometric mean ± std over {len(hs)} runs)")
    save_figure(fig, out, "regression")


def _report(res: dict) -> None:
    for k, v in res["summary"].items():
        print(k, v)
    for k, hs in res["runs"].items():
        C.warn_diverged(k, [h["loss"] for h in hs])


def main(argv=None) -> int:
    return C.cli_main(argv, parser(), run, "regression", _report)


if __name__ == "__main__":
    raise SystemExit(main())
