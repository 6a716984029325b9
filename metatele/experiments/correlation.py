"""P2 Table 1 (E1): Pearson correlation of sharpness phi and curvature psi of SGD minima with validation loss.

``--runs`` models (P2: 100) are trained by SGD from different seeds (lr = P2's base lr, batch 20, 40 epochs).
For each final model:

* ``phi`` -- sharpness: the mean cross-entropy at ``w + t u/||u||`` over P2's 20 radii ``t`` (MNIST radii for
  digits), one zero-mean Gaussian direction ``u`` per radius (``--directions uniform``: the public code's
  U[0, 1)), on each of ``--n-batches`` (P2: 200) batches of 200 training samples; averaged.
* ``psi`` -- curvature of the minimum: mean curvature ``kappa`` of random curves ``exp(tM) . w`` in the level
  set, one curve per batch (200 in P2), with the closed form *including* the cross term that the public code
  omits (``--curvature-method paper`` reproduces it; ``autograd`` is the slow reference). The public code's
  value ``psi_paper`` is always computed too, on the same curves and batches, for comparison.

Validation loss is on the validation split held out from the training set (``--test-as-val``: the test set,
as P2 did). Output: the table (Pearson r and p-value for phi, psi and psi_paper against validation loss, and
the number of models) and the scatter plots. Because models that trained further have both a lower training
loss and a lower validation loss, the table also gives the correlation of the final training loss with the
validation loss, and of phi, psi, psi_paper with the generalisation gap (validation minus training loss).

    python -m metatele.experiments.correlation --out results/correlation
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from ..data import TeleportBatches
from ..nets import from_sequential
from ..objectives import SHARPNESS_RADII, curvature, sharpness
from ..optim import TeleportingOptimizer
from ..plots import grid, save_figure
from . import _common as C


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metatele.experiments.correlation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(p)
    C.add_common_args(p, runs=100, epochs=40, seed=54321, out="results/correlation")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--lr", type=float, default=None, help="SGD lr (default: P2's base lr of the dataset)")
    p.add_argument("--n-batches", type=int, default=200, help="batches for phi and psi (P2: 200)")
    p.add_argument("--measure-batch", type=int, default=200, help="samples per batch (P2: 200)")
    p.add_argument("--curvature-method", default="closed", choices=("closed", "paper", "autograd"))
    p.add_argument("--directions", default="gaussian", choices=("gaussian", "uniform"))
    p.add_argument("--chunk", type=int, default=25, help="batches evaluated together (memory)")
    p.add_argument("--shuffle", action="store_true")
    return p


def pearson(x, y) -> dict:
    """Pearson r (and its two-sided p-value when scipy is present) of two equally long sequences."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return {"r": float("nan"), "p": float("nan"), "n": int(len(x))}
    r = float(np.corrcoef(x, y)[0, 1])
    try:
        from scipy.stats import pearsonr
        p = float(pearsonr(x, y).pvalue)
    except Exception:  # scipy missing: report r only
        p = float("nan")
    return {"r": r, "p": p, "n": int(len(x))}


def measure(weights, batches: list, radii, args, gen: torch.Generator) -> dict:
    """phi, psi and psi_paper of one network over the given ``batches`` [(X (b, d), y (b,)), ...]."""
    phis, psis, psis_paper = [], [], []
    for start in range(0, len(batches), args.chunk):
        chunk = batches[start:start + args.chunk]
        n = len(chunk)
        X = torch.stack([x.T for x, _ in chunk])            # (n, d, b)
        Y = torch.stack([y for _, y in chunk])              # (n, b)
        W = tuple(w.expand(n, *w.shape).clone() for w in weights)   # one copy per batch: own directions
        with torch.no_grad():
            phis.append(sharpness(W, X, Y, loss="ce", radii=radii, n_dirs=1, generator=gen,
                                  directions=args.directions))
        state = gen.get_state()
        psis.append(curvature(W, X, n_curves=1, generator=gen, method=args.curvature_method,
                              directions=args.directions).detach())
        gen.set_state(state)  # the same curves for the public code's version
        psis_paper.append(curvature(W, X, n_curves=1, generator=gen, method="paper",
                                    directions=args.directions).detach())
    cat = lambda xs: float(torch.cat([x.reshape(-1) for x in xs]).double().mean())  # noqa: E731
    return {"phi": cat(phis), "psi": cat(psis), "psi_paper": cat(psis_paper)}


def run(args) -> dict:
    C.setup(args)
    if args.quick:
        args.runs, args.epochs, args.n_batches = min(args.runs, 4), min(args.epochs, 2), min(args.n_batches, 4)
        args.measure_batch = min(args.measure_batch, 50)
    for name in ("runs", "epochs", "batch_size", "n_batches", "measure_batch", "chunk"):
        C.check_positive(name, getattr(args, name))
    if args.runs < 3:
        raise ValueError(f"--runs must be >= 3 for a correlation, got {args.runs}")
    data = C.load_data(args)
    lr = args.lr if args.lr is not None else C.BASE_LR[args.dataset]
    widths = [data.n_features, *C.hidden_widths(args.dataset), data.n_classes]
    radii = SHARPNESS_RADII[C.RADII_KEY[args.dataset]]
    models = []
    pb = C.bar(args.runs * args.epochs, "correlation: SGD models", args)
    for r in range(args.runs):
        seed = args.seed + r
        model = C.make_model(widths, seed)
        opt = TeleportingOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr))
        h = C.train_epochs(model, opt, data, epochs=range(args.epochs), batch_size=args.batch_size,
                           seed=seed, shuffle=args.shuffle, progress=pb)
        stream = TeleportBatches(data.train, args.measure_batch, torch.Generator().manual_seed(12345))
        batches = [stream() for _ in range(args.n_batches)]
        W, _, _ = from_sequential(model)
        m = measure(W, batches, radii, args, torch.Generator().manual_seed(seed + 99))
        train_final = C.evaluate(model, data.train)[0]
        m.update(seed=seed, train_loss=train_final, val_loss=h["val_loss"][-1], val_acc=h["val_acc"][-1],
                 gap=h["val_loss"][-1] - train_final)
        models.append(m)
    pb.close()
    val = [m["val_loss"] for m in models]
    gap = [m["gap"] for m in models]
    table = {"n_models": len(models),
             "phi": pearson([m["phi"] for m in models], val),
             "psi": pearson([m["psi"] for m in models], val),
             "psi_paper": pearson([m["psi_paper"] for m in models], val),
             "train_loss": pearson([m["train_loss"] for m in models], val),
             "vs_generalisation_gap": {k: pearson([m[k] for m in models], gap) for k in ("phi", "psi", "psi_paper")}}
    results = {"experiment": "correlation", "paper": "P2 Table 1", "config": vars(args).copy(),
               "data": data.summary(), "widths": widths, "lr": lr, "radii": list(radii), "table": table,
               "models": models}
    plot(results, args.out)
    C.write_results(args.out, results)
    return results


def plot(results: dict, out: str) -> None:
    models, t = results["models"], results["table"]
    fig, axes = grid(1, 3, width=3.8, height=3.3)
    val = [m["val_loss"] for m in models]
    for ax, key, xl in ((axes[0, 0], "phi", r"sharpness $\phi$ (mean perturbed CE)"),
                        (axes[0, 1], "psi", r"curvature $\psi$ (with cross term)"),
                        (axes[0, 2], "psi_paper", r"curvature $\psi$ (public code)")):
        ax.scatter([m[key] for m in models], val, s=10)
        r = t[key]["r"]
        ax.set_title(f"Pearson r = {r:.3f}" if math.isfinite(r) else "Pearson r = n/a")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (CE)")
    fig.suptitle(f"{results['data']['dataset']}: {t['n_models']} SGD models")
    save_figure(fig, out, "correlation")


def _report(res: dict) -> None:
    t = res["table"]
    print(f"models: {t['n_models']}")
    for k in ("phi", "psi", "psi_paper", "train_loss"):
        print(f"corr({k}, validation loss) = {t[k]['r']:.4f} (p = {t[k]['p']:.3g})")
    for k, v in t["vs_generalisation_gap"].items():
        print(f"corr({k}, validation - training loss) = {v['r']:.4f} (p = {v['p']:.3g})")


def main(argv=None) -> int:
    return C.cli_main(argv, parser(), run, "correlation", _report)


if __name__ == "__main__":
    raise SystemExit(main())
