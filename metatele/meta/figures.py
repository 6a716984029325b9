"""Figures of the learning-to-teleport comparison (P2 Figure 6): loss vs step, loss vs wall-clock time,
gradient norm vs loss; mean over evaluation seeds with a min-max band (log scale)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["LABELS", "plot_results"]

LABELS = {"gd": "GD", "gd_tele": "GD + teleport", "lstm_lr_tele": "LSTM(lr,tele)",
          "lstm_update": "LSTM(update)", "lstm_update_tele": "LSTM(update,tele)"}


def plot_results(results: dict[str, Any], out_dir: str | Path, stem: str = "meta") -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf`` (three panels) to ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, e in results["methods"].items():
        lab = LABELS.get(name, name)
        mean = np.asarray(e["loss_mean"], dtype=float)
        lo = np.asarray(e.get("loss_min", mean), dtype=float)
        hi = np.asarray(e.get("loss_max", mean), dtype=float)
        steps = np.arange(len(mean))
        (line,) = axes[0].plot(steps, mean, label=lab)
        axes[0].fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
        t = np.asarray(e["time_mean"], dtype=float)
        axes[1].plot(t, mean, label=lab, color=line.get_color())
        axes[1].fill_between(t, lo, hi, color=line.get_color(), alpha=0.15)
        gn = np.asarray(e["grad_norm_mean"], dtype=float)
        axes[2].plot(mean, gn, label=lab, color=line.get_color())
    axes[0].set(xlabel="step", ylabel="loss", yscale="log", title="loss vs step (mean, min-max band)")
    axes[1].set(xlabel="wall-clock time (s)", ylabel="loss", yscale="log", title="loss vs time")
    axes[2].set(xlabel="loss", ylabel="||grad L||^2", xscale="log", yscale="log",
                title="squared gradient norm vs loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{len(results['eval_seeds'])} unseen initialisations, dims {results.get('dims')}")
    fig.tight_layout()
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths
