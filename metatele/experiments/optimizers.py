"""P2 Fig. 5 (E4): teleportation inside AdaGrad, SGD with momentum, RMSProp, Adam (and plain SGD).

For every optimiser and run, the same initialisation is trained twice, without and with teleports, and the
training loss, validation loss and accuracy are logged per epoch against epoch and wall-clock time.
P2's settings (P2 Fig. 5; docs/experiments.md, section 1) are the defaults: base lr 1e-2 (CIFAR-10 2e-2; AdaGrad
and SGD at base, momentum 0.9 at base/10, RMSProp and Adam at base/100), batch 20, 40 epochs, 5 runs; 8
gradient-norm teleports of 10 ascent steps before the first 8 minibatches of epoch 0 (momentum, RMSProp, Adam;
teleport lr 5e-2) or epoch 2 (SGD, AdaGrad; teleport lr 1e-4), each on a fresh batch of 200 training samples;
optimiser state reset after a teleport (``--state-policy``). Run seeds are ``(seed + r)``; the training order is
P2's sequential order unless ``--shuffle``.

    python -m metatele.experiments.optimizers --out results/optimizers
"""
from __future__ import annotations

import argparse

import torch

from ..data import TeleportBatches
from ..optim import P2_OPTIMIZERS, STATE_POLICIES, TeleportingOptimizer, make_optimizer, p2_teleport_config
from ..plots import band, grid, save_figure
from . import _common as C

DEFAULT_OPTIMIZERS = ("sgd", "adagrad", "momentum", "rmsprop", "adam")
REPORT_EPOCHS = [1, 2, 3, 5, 10, 20, 40]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metatele.experiments.optimizers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_data_args(p)
    C.add_common_args(p, runs=5, epochs=40, seed=54321, out="results/optimizers")
    p.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=sorted(P2_OPTIMIZERS))
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--base-lr", type=float, default=None, help="default: P2's per-dataset base lr")
    p.add_argument("--teleport-batch", type=int, default=200, help="samples per teleport batch (P2: 200)")
    p.add_argument("--teleports", type=int, default=8, help="teleports in the teleport epoch (P2: 8)")
    p.add_argument("--teleport-steps", type=int, default=10, help="ascent steps per teleport (P2: 10)")
    p.add_argument("--teleport-lr", type=float, default=None, help="override P2's per-optimiser teleport lr")
    p.add_argument("--teleport-rule", default="raw", choices=("raw", "normalized"),
                   help="raw: P2's T = lr dS/dT (default, reproduces the paper); normalized: metatele's "
                        "scale-free steps of ||T|| = lr (default 0.1 unless --teleport-lr)")
    p.add_argument("--teleport-epoch", type=int, default=None, help="override P2's per-optimiser epoch")
    p.add_argument("--state-policy", default="reset", choices=STATE_POLICIES)
    p.add_argument("--shuffle", action="store_true", help="shuffle the training set every epoch")
    return p


def run(args) -> dict:
    C.setup(args)
    if args.quick:
        args.runs, args.epochs = min(args.runs, 1), min(args.epochs, 3)
    for name in ("runs", "epochs", "batch_size", "teleport_batch", "teleport_steps"):
        C.check_positive(name, getattr(args, name))
    data = C.load_data(args)
    base_lr = args.base_lr if args.base_lr is not None else C.BASE_LR[args.dataset]
    widths = [data.n_features, *C.hidden_widths(args.dataset), data.n_classes]
    results = {"experiment": "optimizers", "paper": "P2 Fig. 5", "config": vars(args).copy(),
               "data": data.summary(), "widths": widths, "base_lr": base_lr, "optimizers": {}}
    pb = C.bar(len(args.optimizers) * args.runs * 2 * args.epochs, "optimizers", args)
    for name in args.optimizers:
        schedule, settings = p2_teleport_config(name, base_lr)
        schedule.batch_size, schedule.per_epoch = args.teleport_batch, args.teleports
        settings.steps = args.teleport_steps
        settings.rule = args.teleport_rule
        if args.teleport_rule != "raw":
            settings.lr = None  # the rule's default step length; P2's raw learning rates mean nothing here
        if args.teleport_lr is not None:
            settings.lr = args.teleport_lr
        if args.teleport_epoch is not None:
            schedule.epochs = (args.teleport_epoch,)
        if args.quick:
            schedule.epochs = tuple(min(e, args.epochs - 1) for e in schedule.epochs)
        entry = {"lr": base_lr * P2_OPTIMIZERS[name][1], "teleport_epochs": list(schedule.epochs),
                 "teleport_lr": settings.lr, "teleport_rule": settings.rule, "baseline": [], "teleport": []}
        for r in range(args.runs):
            seed = args.seed + r
            for with_teleport in (False, True):
                pb.set_description(f"{name} run {r} {'teleport' if with_teleport else 'baseline'}")
                model = C.make_model(widths, seed)
                opt = make_optimizer(name, model.parameters(), base_lr)
                if with_teleport:
                    batches = TeleportBatches(data.train, schedule.batch_size,
                                              torch.Generator().manual_seed(7919 * seed + 1))
                    wrapped = TeleportingOptimizer(model, opt, schedule=schedule, settings=settings,
                                                   batches=batches, state_policy=args.state_policy,
                                                   generator=torch.Generator().manual_seed(seed))
                else:
                    wrapped = TeleportingOptimizer(model, opt)  # no schedule: exactly the bare optimiser
                h = C.train_epochs(model, wrapped, data, epochs=range(args.epochs), batch_size=args.batch_size,
                                   seed=seed, shuffle=args.shuffle, progress=pb)
                h["seed"] = seed
                if with_teleport:
                    h["events"] = [e.as_dict() for e in wrapped.events]
                    h["teleport_seconds"] = wrapped.teleport_seconds
                entry["teleport" if with_teleport else "baseline"].append(h)
        summary = {}
        for key in ("baseline", "teleport"):
            hs = entry[key]
            summary[key] = {
                "train_loss": C.summarise([h["train_loss"] for h in hs], REPORT_EPOCHS),
                "val_loss": C.summarise([h["val_loss"] for h in hs], REPORT_EPOCHS),
                "val_acc": C.summarise([h["val_acc"] for h in hs], REPORT_EPOCHS),
                "wall_time_s": float(sum(h["time"][-1] for h in hs) / len(hs)),
            }
        ev = [e for h in entry["teleport"] for e in h.get("events", [])]
        if ev:
            summary["teleport_events"] = {
                "count_per_run": len(ev) / len(entry["teleport"]),
                "grad_norm_sq_before_mean": sum(e["objective_before"] for e in ev) / len(ev),
                "grad_norm_sq_after_mean": sum(e["objective_after"] for e in ev) / len(ev),
                "loss_rel_change_mean": sum(abs(e["loss_after"] - e["loss_before"]) / abs(e["loss_before"])
                                            for e in ev) / len(ev),
                "exactness": sorted({e["exactness"] for e in ev}),
                "seconds_per_teleport": sum(e["seconds"] for e in ev) / len(ev),
            }
        entry["summary"] = summary
        results["optimizers"][name] = entry
    pb.close()
    plot(results, args.out)
    C.write_results(args.out, results)
    return results


def plot(results: dict, out: str) -> None:
    names = list(results["optimizers"])
    fig, axes = grid(4, len(names))
    for j, name in enumerate(names):
        e = results["optimizers"][name]
        for key, label, color in (("baseline", name, "C0"), ("teleport", f"{name} + teleport", "C1")):
            hs = e[key]
            epochs = list(range(1, len(hs[0]["train_loss"]) + 1))
            times = [h["time"] for h in hs]
            band(axes[0, j], epochs, [h["train_loss"] for h in hs], label, color=color, log=True)
            band(axes[1, j], epochs, [h["val_loss"] for h in hs], label, color=color, log=True)
            band(axes[2, j], times, [h["train_loss"] for h in hs], label, color=color, log=True)
            band(axes[3, j], times, [h["val_loss"] for h in hs], label, color=color, log=True)
        for i, (xl, yl) in enumerate((("epoch", "training loss (CE)"), ("epoch", "validation loss (CE)"),
                                      ("wall-clock time (s)", "training loss (CE)"),
                                      ("wall-clock time (s)", "validation loss (CE)"))):
            axes[i, j].set_xlabel(xl)
            axes[i, j].set_ylabel(yl)
            axes[i, j].legend(fontsize=7)
        axes[0, j].set_title(f"{name} (lr {e['lr']:.0e})")
    fig.suptitle(f"Teleport inside optimisers ({results['data']['dataset']}; mean ± std over "
                 f"{len(results['optimizers'][names[0]]['baseline'])} runs)")
    save_figure(fig, out, "optimizers")


def main(argv=None) -> int:
    return C.cli_main(argv, parser(), run, "optimizers")


if __name__ == "__main__":
    raise SystemExit(main())
