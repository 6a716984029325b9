"""P1 section 5 (N1, N2): gradient descent with and without SO(2) teleportation on Rosenbrock and Booth.

Both losses are ``L = u^2 + v^2`` for an invertible ``(u, v) = phi(x, y)``, so rotating ``(u, v)`` by any angle
keeps the loss (:func:`metatele.symmetry.so2_teleport`). A teleport picks the angle ``theta`` that maximises the
squared gradient norm ``||grad L||^2`` at the rotated point (``--theta-search``):

* ``grid`` (default): the global maximiser over ``--n-grid`` equally spaced angles in ``[0, 2 pi)``, refined
  by golden-section search on the bracketing grid interval (the objective is smooth in ``theta``);
* ``ascent``: the public code's procedure, 10 steps of gradient ascent on ``theta`` from a random start in
  ``[0, pi)`` with step ``--lr-theta`` (P1: 0.1 for Rosenbrock, 0.001 for Booth): a local maximiser.

P1's settings are the defaults: Rosenbrock, lr 1e-3, start (-1, -1), 1000 steps, teleport before the steps
99, 199, ..., 999 (every 100); Booth, lr 0.08, start (5, -5), 10 steps, teleport once before step 4.
Computed in float64. Output: trajectories on the level sets, loss and squared gradient norm against step.

    python -m metatele.experiments.benchmark_functions --out results/benchmark_functions
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ..plots import grid, save_figure
from ..symmetry import BOOTH, ROSENBROCK, BenchmarkFunction, so2_teleport
from . import _common as C

#: P1's settings per function: lr, start, steps, teleport steps, lr_theta (for ``ascent``), plot window.
SETTINGS = {
    "rosenbrock": {"lr": 1e-3, "start": (-1.0, -1.0), "steps": 1000, "teleport_at": list(range(99, 1000, 100)),
                   "lr_theta": 0.1, "window": (-2.0, 2.0, -2.0, 2.0), "levels": [1e0, 1e1, 1e2, 1e3, 1e4],
                   "minimum": (1.0, 1.0)},
    "booth": {"lr": 0.08, "start": (5.0, -5.0), "steps": 10, "teleport_at": [4], "lr_theta": 1e-3,
              "window": (-10.0, 10.0, -10.0, 10.0),
              "levels": [1e0, 10 ** 0.5, 1e1, 10 ** 1.5, 1e2, 10 ** 2.5, 1e3, 10 ** 3.5, 1e4],
              "minimum": (1.0, 3.0)},
}
FUNCTIONS = {"rosenbrock": ROSENBROCK, "booth": BOOTH}


def grad(fn: BenchmarkFunction, p: torch.Tensor) -> torch.Tensor:
    """``grad L`` at points ``p (..., 2)``."""
    p = p.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn.loss(p).sum(), p)
    return g


def grad_norm_sq_rotated(fn: BenchmarkFunction, p: torch.Tensor, theta: torch.Tensor, create_graph=False) -> torch.Tensor:
    """``||grad L(R_theta . p)||^2`` for angles ``theta (n,)`` -> ``(n,)``."""
    with torch.enable_grad():
        q = so2_teleport(fn, p.expand(*theta.shape, 2), theta)
        if not q.requires_grad:
            q = q.requires_grad_(True)
        (g,) = torch.autograd.grad(fn.loss(q).sum(), q, create_graph=create_graph)
    return g.pow(2).sum(-1)


def best_angle_grid(fn: BenchmarkFunction, p: torch.Tensor, n_grid: int = 3600, iters: int = 60) -> float:
    """Global maximiser of ``||grad L||^2`` over the SO(2) orbit: grid search, then golden-section refinement."""
    th = torch.arange(n_grid, dtype=p.dtype) * (2 * math.pi / n_grid)
    s = grad_norm_sq_rotated(fn, p, th)
    i = int(torch.argmax(s))
    a, b = float(th[i]) - 2 * math.pi / n_grid, float(th[i]) + 2 * math.pi / n_grid
    f = lambda t: float(grad_norm_sq_rotated(fn, p, torch.tensor([t], dtype=p.dtype))[0])  # noqa: E731
    phi = (math.sqrt(5) - 1) / 2
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = f(d)
    t = (a + b) / 2
    return t if f(t) >= float(s[i]) else float(th[i])


def best_angle_ascent(fn: BenchmarkFunction, p: torch.Tensor, lr_theta: float, generator: torch.Generator,
                      steps: int = 10) -> float:
    """P1's procedure: gradient ascent on ``theta`` from a random start in ``[0, pi)``."""
    theta = torch.rand((), generator=generator, dtype=p.dtype) * math.pi
    for _ in range(steps):
        t = theta.detach().reshape(1).requires_grad_(True)
        with torch.enable_grad():
            s = grad_norm_sq_rotated(fn, p, t, create_graph=True)
            (d,) = torch.autograd.grad(s.sum(), t)
        theta = theta + lr_theta * d[0]
    return float(theta)


def run_gd(fn: BenchmarkFunction, cfg: dict, teleport: bool, args, generator: torch.Generator) -> dict:
    """GD from ``cfg['start']``; log the point before each step, the loss and ``||grad||^2`` at it."""
    p = torch.tensor(cfg["start"], dtype=torch.float64)
    path, losses, gns, tele = [p.tolist()], [], [], []
    for step in range(cfg["steps"]):
        if teleport and step in cfg["teleport_at"]:
            if args.theta_search == "grid":
                theta = best_angle_grid(fn, p, args.n_grid)
            else:
                theta = best_angle_ascent(fn, p, cfg["lr_theta"], generator)
            before = (float(fn.loss(p)), float(grad(fn, p).pow(2).sum()))
            p = so2_teleport(fn, p, torch.tensor(theta, dtype=p.dtype))
            tele.append({"step": step, "theta": theta, "loss_before": before[0], "loss_after": float(fn.loss(p)),
                         "grad_norm_sq_before": before[1], "grad_norm_sq_after": float(grad(fn, p).pow(2).sum()),
                         "point_after": p.tolist()})
            path.append(p.tolist())
        g = grad(fn, p)
        losses.append(float(fn.loss(p)))
        gns.append(float(g.pow(2).sum()))
        p = p - cfg["lr"] * g
        path.append(p.tolist())
    return {"loss": losses, "grad_norm_sq": gns, "path": path, "teleports": tele, "final_loss": float(fn.loss(p)),
            "final_point": p.tolist()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metatele.experiments.benchmark_functions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--functions", nargs="+", default=["rosenbrock", "booth"], choices=sorted(SETTINGS))
    p.add_argument("--theta-search", default="grid", choices=("grid", "ascent"))
    p.add_argument("--n-grid", type=int, default=3600)
    p.add_argument("--seed", type=int, default=0, help="random start angle of --theta-search ascent")
    p.add_argument("--out", default="results/benchmark_functions")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> dict:
    if args.quick:
        args.n_grid = min(args.n_grid, 360)
    C.check_positive("n_grid", args.n_grid, 8)
    res = {"experiment": "benchmark_functions", "paper": "P1 section 5", "config": vars(args).copy(), "functions": {}}
    for name in tqdm(args.functions, desc="benchmark functions", disable=args.no_progress, leave=False):
        cfg = dict(SETTINGS[name])
        if args.quick and name == "rosenbrock":
            cfg["steps"], cfg["teleport_at"] = 200, [99, 199]
        fn = FUNCTIONS[name]
        gen = torch.Generator().manual_seed(args.seed)
        res["functions"][name] = {"settings": cfg, "gd": run_gd(fn, cfg, False, args, gen),
                                  "gd_teleport": run_gd(fn, cfg, True, args, gen)}
    plot(res, args.out)
    C.write_results(args.out, res)
    return res


def plot(res: dict, out: str) -> None:
    names = list(res["functions"])
    fig, axes = grid(len(names), 3, width=4.0, height=3.5)
    for i, name in enumerate(names):
        e, cfg, fn = res["functions"][name], res["functions"][name]["settings"], FUNCTIONS[name]
        ax = axes[i, 0]
        t = torch.linspace(0, 2 * math.pi, 1000, dtype=torch.float64)
        for L in cfg["levels"]:
            xy = fn.from_uv(math.sqrt(L) * torch.stack([torch.cos(t), torch.sin(t)], -1)).numpy()
            ax.plot(xy[:, 0], xy[:, 1], color="0.8", linewidth=0.8)
        for key, label, color in (("gd", "GD", "C0"), ("gd_teleport", "GD + teleport", "C1")):
            path = np.asarray(e[key]["path"])
            ax.plot(path[:, 0], path[:, 1], ".-", color=color, markersize=3, linewidth=0.8, label=label)
        for tp in e["gd_teleport"]["teleports"]:
            ax.plot(*tp["point_after"], "o", color="C3", markersize=4)
        ax.plot(*cfg["minimum"], "*", color="C2", markersize=10, label="minimum")
        x0, x1, y0, y1 = cfg["window"]
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(f"{name}: trajectories on level sets (red: after teleport)", fontsize=8)
        ax.legend(fontsize=7)
        for ax, key, yl in ((axes[i, 1], "loss", "loss L"), (axes[i, 2], "grad_norm_sq", r"$\|\nabla L\|^2$ (= -dL/dt)")):
            for k2, label, color in (("gd", "GD", "C0"), ("gd_teleport", "GD + teleport", "C1")):
                ax.plot(np.maximum(np.asarray(e[k2][key]), 1e-300), color=color, label=label)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel(yl)
            ax.legend(fontsize=7)
    fig.suptitle("GD with and without SO(2) teleportation")
    save_figure(fig, out, "benchmark_functions")


def _report(res: dict) -> None:
    for name, e in res["functions"].items():
        print(f"{name}: final loss GD {e['gd']['final_loss']:.3e}, "
              f"GD + teleport {e['gd_teleport']['final_loss']:.3e}")


def main(argv=None) -> int:
    return C.cli_main(argv, parser(), run, "benchmark_functions", _report)


if __name__ == "__main__":
    raise SystemExit(main())
