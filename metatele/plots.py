"""Shared plotting for the experiments: mean curves with spread bands, PNG + PDF output.

Every figure is written twice, ``NAME.png`` (dpi 150) and ``NAME.pdf``, into the experiment's ``--out``.
Importing this module does not touch matplotlib's backend: the command-line entry points select the
non-interactive ``Agg`` backend themselves (:func:`metatele.experiments._common.cli_main`), and a caller
who runs an experiment from Python keeps whatever backend it has chosen.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["band", "save_figure", "grid"]


def band(ax, x, runs, label: str, *, color=None, log: bool = False, linestyle: str = "-", alpha: float = 0.25):
    """Plot the mean over ``runs`` against ``x`` with a +/- one standard deviation band.

    With ``log=True`` the band is the geometric mean times/divided by the geometric spread, so it stays
    positive on a log axis. Non-finite values (diverged runs) are left out of the mean and spread. ``x``: ``(T,)`` or per-run ``(runs, T)`` (then averaged, e.g. wall-clock times).
    """
    a = np.asarray(runs, dtype=float)
    if a.ndim == 1:
        a = a[None]
    xs = np.asarray(x, dtype=float)
    if xs.ndim == 2:
        xs = xs.mean(0)
    a = np.where(np.isfinite(a), a, np.nan)  # diverged runs: left out of the statistics where they are not finite
    with np.errstate(all="ignore"):
        if log:
            la = np.log(np.clip(a, 1e-300, None))
            m, s = _nanmean(la), _nanstd(la)
            mean, lo, hi = np.exp(m), np.exp(m - s), np.exp(m + s)
        else:
            mean, s = _nanmean(a), _nanstd(a)
        lo, hi = mean - s, mean + s
    line, = ax.plot(xs, mean, label=label, color=color, linestyle=linestyle, linewidth=1.8)
    if a.shape[0] > 1:
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=alpha, linewidth=0)
    if log:
        ax.set_yscale("log")
    return line


def _nanmean(a):
    n = np.isfinite(a).sum(0)
    return np.where(n > 0, np.nansum(a, 0) / np.maximum(n, 1), np.nan)


def _nanstd(a):
    m = _nanmean(a)
    n = np.isfinite(a).sum(0)
    return np.sqrt(np.where(n > 0, np.nansum((a - m) ** 2, 0) / np.maximum(n, 1), np.nan))


def grid(n_rows: int, n_cols: int, *, width: float = 3.6, height: float = 3.0):
    """A figure with an ``(n_rows, n_cols)`` array of axes (always 2-D)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    return fig, axes


def save_figure(fig, out: str, name: str) -> list[str]:
    """Write ``out/name.png`` and ``out/name.pdf``, close the figure, return the two paths."""
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    fig.tight_layout()
    paths = [os.path.join(out, f"{name}.png"), os.path.join(out, f"{name}.pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
