"""P2 Fig. 4 (E3): teleport to decrease or increase sharpness or curvature during SGD, and the validation loss
that follows, against plain SGD.

For every run an SGD model (lr = P2's base lr, batch 20) is trained up to ``--teleport-epoch`` (P2: 20; the
public code resumes a saved run at epoch 15, which for deterministic SGD is the same trajectory), then copied
once per variant: ``sharpness+`` / ``sharpness-`` (10 ascent/descent steps on phi, the mean loss under random
perturbations over P2's 20 radii, one direction each) and ``curvature+`` / ``curvature-`` (1 step of
``g = exp(T)`` on psi, the mean curvature of 200 random curves ``exp(tM) . w`` in the level set, with the cross
term of docs/mathematics.md, section 4.4). Each variant teleports before the first ``n`` minibatches of the
teleport epoch (P2: sharpness+ 2, sharpness- 10, curvature+ 10, curvature- 5) on fresh batches of 2000 training
samples (clipped to the training-set size for small datasets), then SGD continues to ``--epochs`` (P2: 40).
Teleport learning rates are P2's per dataset (digits and mnist5k use MNIST's). The validation loss is measured right before
and right after every teleport, and at the end of every epoch.

    python -m metatele.experiments.sharpness_curvature --out results/sharpness_curvature
"""
from __future__ import annotations

import argparse
import copy

import torch

from ..data import TeleportBatches
from ..objectives import SHARPNESS_RADII
from ..optim import TeleportingOptimizer, TeleportSchedule, TeleportSettings
from ..plots import band, grid, save_figure
from . import _common as C

VARIANTS = ("sharpness+", "sharpness-", "curvature+", "curvature-")
#: P2's teleport learning rates (``teleport_sharpness_curvature.py``): dataset -> variant -> lr.
TELEPORT_LR = {
    "mnist": {"sharpness+": 5e-2, "sharpness-": 5e-2, "curvature+": 5e-2, "curvature-": 2e-1},
    "fashion_mnist": {"sharpness+": 3e-1, "sharpness-": 1e-1, "curvature+": 3e-3, "curvature-": 5e-3},
    "cifar10": {"sharpness+": 5e-2, "sharpness-": 5e-2, "curvature+": 5e-2, "curvature-": 2e-1},
}
TELEPORT_LR["digits"] = TELEPORT_LR["mnist5k"] = TELEPORT_LR["mnist"]
#: P2's number of teleports (consecutive minibatches of the teleport epoch) per variant.
N_TELEPORTS = {"sharpness+": 2, "sharpness-": 10, "curvature+": 10, "curvature-": 5}
STEPS = {"sharpness": 10, "curvature": 1}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metatele.experiments.sharpness_curvature", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(p)
    C.add_common_args(p, runs=5, epochs=40, seed=54321, out="results/sharpness_curvature")
    p.add_argument("--teleport-epoch", type=int, default=20)
    p.add_argument("--teleport-batch", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--lr", type=float, default=None, help="SGD lr (default: P2's base lr of the dataset)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--n-curves", type=int, default=200, help="curves in the curvature objective (P2: 200)")
    p.add_argument("--curvature-method", default="closed", choices=("closed", "paper"),
                   help="closed: with the cross term (correct); paper: the public code's version")
    p.add_argument("--directions", default="gaussian", choices=("gaussian", "uniform"),
                   help="random directions (uniform = the public code's U[0,1), docs/departures.md, section 2)")
    p.add_argument("--shuffle", action="store_true")
    return p


def settings_for(variant: str, dataset: str, args) -> tuple[TeleportSchedule, TeleportSettings]:
    objective, sign = variant[:-1], variant[-1]
    kwargs = ({"radii": SHARPNESS_RADII[C.RADII_KEY[dataset]], "n_dirs": 1, "directions": args.directions}
              if objective == "sharpness" else
              {"n_curves": args.n_curves, "method": args.curvature_method, "directions": args.directions})
    schedule = TeleportSchedule(epochs=(args.teleport_epoch,), per_epoch=N_TELEPORTS[variant],
                                batch_size=args.teleport_batch)
    settings = TeleportSettings(objective=objective, maximize=(sign == "+"), loss="ce", steps=STEPS[objective],
                                lr=TELEPORT_LR[dataset][variant], rule="raw",
                                param="exp" if objective == "curvature" else "I+T", objective_kwargs=kwargs)
    return schedule, settings


def run(args) -> dict:
    C.setup(args)
    if args.quick:
        args.runs, args.epochs, args.teleport_epoch = min(args.runs, 1), 3, 1
        args.n_curves = min(args.n_curves, 10)
        args.teleport_batch = min(args.teleport_batch, 100)
    for name in ("runs", "epochs", "batch_size", "teleport_batch", "n_curves"):
        C.check_positive(name, getattr(args, name))
    if not 0 <= args.teleport_epoch < args.epochs:
        raise ValueError(f"--teleport-epoch must be in [0, {args.epochs - 1}], got {args.teleport_epoch}")
    data = C.load_data(args)
    lr = args.lr if args.lr is not None else C.BASE_LR[args.dataset]
    widths = [data.n_features, *C.hidden_widths(args.dataset), data.n_classes]
    results = {"experiment": "sharpness_curvature", "paper": "P2 Fig. 4", "config": vars(args).copy(),
               "data": data.summary(), "widths": widths, "lr": lr, "sgd": [], "variants": {v: [] for v in args.variants}}
    n_after = args.epochs - args.teleport_epoch
    pb = C.bar(args.runs * (args.epochs + len(args.variants) * n_after), "sharpness/curvature", args)
    for r in range(args.runs):
        seed = args.seed + r
        model = C.make_model(widths, seed)
        sgd = TeleportingOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr))
        pb.set_description(f"run {r} SGD")
        h = C.train_epochs(model, sgd, data, epochs=range(args.teleport_epoch), batch_size=args.batch_size,
                           seed=seed, shuffle=args.shuffle, progress=pb)
        snapshot = copy.deepcopy(model.state_dict())
        snap_hist = copy.deepcopy(h)
        C.train_epochs(model, sgd, data, epochs=range(args.teleport_epoch, args.epochs),
                       batch_size=args.batch_size, seed=seed, shuffle=args.shuffle, history=h, progress=pb)
        h["seed"] = seed
        results["sgd"].append(h)
        for variant in args.variants:
            pb.set_description(f"run {r} {variant}")
            model = C.make_model(widths, seed)
            model.load_state_dict(snapshot)
            schedule, settings = settings_for(variant, args.dataset, args)
            batches = TeleportBatches(data.train, schedule.batch_size, torch.Generator().manual_seed(7919 * seed + 3))
            opt = TeleportingOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr), schedule=schedule,
                                       settings=settings, batches=batches, state_policy="reset",
                                       generator=torch.Generator().manual_seed(seed + 17))
            log = []
            state = {"val": C.evaluate(model, data.val)[0]}

            def on_teleport(ev, state=state, model=model, log=log):
                after = C.evaluate(model, data.val)[0]
                d = ev.as_dict()
                d.update(val_loss_before=state["val"], val_loss_after=after)
                log.append(d)

            def wrapped_start(epoch, i, opt=opt, state=state, model=model, _orig=opt.start_batch):
                if opt.schedule.due(epoch, i, opt.step_count):
                    state["val"] = C.evaluate(model, data.val)[0]
                return _orig(epoch, i)

            opt.start_batch = wrapped_start
            hv = C.train_epochs(model, opt, data, epochs=range(args.teleport_epoch, args.epochs),
                                batch_size=args.batch_size, seed=seed, shuffle=args.shuffle,
                                history=copy.deepcopy(snap_hist), on_teleport=on_teleport, progress=pb)
            hv["events"] = log
            hv["seed"] = seed
            results["variants"][variant].append(hv)
    pb.close()
    results["summary"] = summarise(results, args)
    plot(results, args)
    C.write_results(args.out, results)
    return results


def summarise(results: dict, args) -> dict:
    te = args.teleport_epoch
    sgd = results["sgd"]
    out = {"sgd": {"val_loss_at_teleport_epoch": _mean([h["val_loss"][te - 1] if te > 0 else float("nan") for h in sgd]),
                   "val_loss_final": _mean([h["val_loss"][-1] for h in sgd])}}
    for v, hs in results["variants"].items():
        evs = [e for h in hs for e in h["events"]]
        out[v] = {
            "teleports_per_run": len(evs) / max(len(hs), 1),
            "objective_before": _mean([e["objective_before"] for e in evs]),
            "objective_after": _mean([e["objective_after"] for e in evs]),
            "val_loss_change_per_teleport": _mean([e["val_loss_after"] - e["val_loss_before"] for e in evs]),
            "train_batch_loss_rel_change": _mean([abs(e["loss_after"] - e["loss_before"]) / abs(e["loss_before"])
                                                  for e in evs]),
            "val_loss_after_teleport_epoch": _mean([h["val_loss"][te] for h in hs]),
            "val_loss_final": _mean([h["val_loss"][-1] for h in hs]),
            "sgd_val_loss_after_teleport_epoch": _mean([h["val_loss"][te] for h in sgd]),
            "exactness": sorted({e["exactness"] for e in evs}),
        }
    return out


def _mean(xs):
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


def plot(results: dict, args) -> None:
    variants = list(results["variants"])
    fig, axes = grid(1, 4, width=4.2, height=3.4)
    sgd = results["sgd"]
    epochs = list(range(1, len(sgd[0]["val_loss"]) + 1))
    start = max(args.teleport_epoch - 5, 0)
    sl = slice(start, None)
    for ax, key, yl in ((axes[0, 0], "val_loss", "validation loss (CE)"), (axes[0, 1], "train_loss", "training loss (CE)")):
        band(ax, epochs[sl], [h[key][sl] for h in sgd], "SGD", color="k")
        for i, v in enumerate(variants):
            band(ax, epochs[sl], [h[key][sl] for h in results["variants"][v]], f"SGD + teleport {v}",
                 color=f"C{i}")
        ax.axvline(args.teleport_epoch + 0.5, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    ax = axes[0, 2]  # paired difference to SGD from the same initialisation: removes run-to-run spread
    for i, v in enumerate(variants):
        diffs = [[a - b for a, b in zip(hv["val_loss"][sl], hs["val_loss"][sl])]
                 for hv, hs in zip(results["variants"][v], sgd)]
        band(ax, epochs[sl], diffs, f"teleport {v}", color=f"C{i}")
    ax.axhline(0, color="k", linewidth=1)
    ax.axvline(args.teleport_epoch + 0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss minus SGD's (same run)")
    ax.legend(fontsize=7)
    ax = axes[0, 3]
    for i, v in enumerate(variants):
        evs = [e for h in results["variants"][v] for e in h["events"]]
        ax.scatter([i] * len(evs), [e["val_loss_after"] - e["val_loss_before"] for e in evs], color=f"C{i}", s=12)
    ax.axhline(0, color="gray", linewidth=1)
    ax.set_xticks(range(len(variants)), variants, rotation=20)
    ax.set_ylabel("validation-loss change per teleport")
    ax.set_title("immediate effect of each teleport")
    fig.suptitle(f"Teleporting sharpness / curvature during SGD ({results['data']['dataset']}, "
                 f"{len(sgd)} runs, mean ± std)")
    save_figure(fig, args.out, "sharpness_curvature")


def _report(res: dict) -> None:
    for k, v in res["summary"].items():
        print(k, v)


def main(argv=None) -> int:
    return C.cli_main(argv, parser(), run, "sharpness_curvature", _report)


if __name__ == "__main__":
    raise SystemExit(main())
