"""P2 Fig. 7 (E2): expected displacement of a minimum under a random shift, against the curvature of the
minimum set at that point.

Two-dimensional model (P2 section 5, Fig. 7): the minimum set is a curve ``gamma`` through the origin ``w0 = 0``,
either the parabola ``y = k x^2`` (curvature ``kappa = 2k`` at the origin) or the circle of radius ``R = 1/kappa``
through the origin (centre ``(0, R)``). A shift ``w`` is uniform on the circle of radius ``r`` around ``w0``;
the plotted quantity is ``E_w[dist(w, gamma)] / r``.

Distances are exact, not measured to a polyline as in the public code:

* circle: ``dist(p, gamma) = | ||p - c|| - R |``;
* parabola: the nearest point ``(x, k x^2)`` solves ``2 k^2 x^3 + (1 - 2 k b) x - a = 0`` for ``p = (a, b)``;
  all three roots are found (eigenvalues of the companion matrix) and the smallest distance over the real
  parts of the roots is taken (every candidate is a point of the parabola, and the true nearest point is one of
  them, so the minimum is exact); ``k = 0`` is the line ``y = 0``.

The expectation over the angle is the trapezoid rule on ``--n-angles`` equally spaced angles, the natural rule
for a periodic integrand (checked against adaptive quadrature in the tests). ``results.json`` also records,
for a few curvatures, the value the public code's polyline gives, to show the difference.

    python -m metatele.experiments.displacement --out results/displacement
"""
from __future__ import annotations

import argparse

import numpy as np

from ..plots import grid, save_figure
from . import _common as C

PARABOLA_R = (2.0, 1.0, 0.5, 0.2, 0.1)
CIRCLE_R = (0.1, 0.05, 0.02, 0.01, 0.005)


def parabola_ks(quick: bool = False) -> np.ndarray:
    """P2's parabola coefficients ``k = 0, 0.3, ..., 39.9`` (kappa = 2k)."""
    return np.arange(0, 40, 3.0 if quick else 0.3)


def circle_radii(quick: bool = False) -> np.ndarray:
    """P2's circle radii ``0.1 ... 0.99`` (step 0.01) and ``1 ... 9.9`` (step 0.1); kappa = 1/R."""
    if quick:
        return np.array([0.1, 0.3, 1.0, 3.0, 9.9])
    return np.concatenate([np.arange(0.1, 1.0, 0.01), np.arange(1.0, 10.0, 0.1)])


def dist_parabola(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Exact distance from points ``(a, b)`` (arrays of one shape) to the parabola ``y = k x^2``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if k == 0:
        return np.abs(b)
    # companion matrix of x^3 + p x + q with p = (1 - 2kb) / (2k^2), q = -a / (2k^2)
    p = (1 - 2 * k * b) / (2 * k * k)
    q = -a / (2 * k * k)
    comp = np.zeros(a.shape + (3, 3))
    comp[..., 1, 0] = 1.0
    comp[..., 2, 1] = 1.0
    comp[..., 0, 2] = -q
    comp[..., 1, 2] = -p
    xs = np.linalg.eigvals(comp).real                      # (..., 3) candidate abscissae
    d = np.sqrt((xs - a[..., None]) ** 2 + (k * xs ** 2 - b[..., None]) ** 2)
    return d.min(-1)


def dist_circle(a: np.ndarray, b: np.ndarray, R: float) -> np.ndarray:
    """Exact distance from points ``(a, b)`` to the circle of radius ``R`` centred at ``(0, R)``."""
    return np.abs(np.hypot(a, np.asarray(b, float) - R) - R)


def expected_displacement(dist, r: float, n_angles: int) -> float:
    """``E_theta[dist(r cos theta, r sin theta)] / r`` by the trapezoid rule on ``n_angles`` angles."""
    th = np.arange(n_angles) * (2 * np.pi / n_angles)
    return float(dist(r * np.cos(th), r * np.sin(th)).mean() / r)


def dist_polyline(a: np.ndarray, b: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Distance from points to the polyline through the vertices ``(vx, vy)`` (what the public code measures)."""
    px, py = np.asarray(a, float)[:, None], np.asarray(b, float)[:, None]
    x0, y0, dx, dy = vx[:-1], vy[:-1], np.diff(vx), np.diff(vy)
    L2 = np.maximum(dx * dx + dy * dy, 1e-300)
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / L2, 0, 1)
    return np.sqrt((px - x0 - t * dx) ** 2 + (py - y0 - t * dy) ** 2).min(1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metatele.experiments.displacement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/displacement")
    p.add_argument("--n-angles", type=int, default=20000, help="angles of the trapezoid rule")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> dict:
    if args.quick:
        args.n_angles = min(args.n_angles, 400)
    C.check_positive("n_angles", args.n_angles, 8)
    ks, Rs = parabola_ks(args.quick), circle_radii(args.quick)
    res = {"experiment": "displacement", "paper": "P2 Fig. 7", "config": vars(args).copy(),
           "parabola": {"k": ks, "kappa": 2 * ks, "r": list(PARABOLA_R), "E_dist_over_r": []},
           "circle": {"R": Rs, "kappa": 1 / Rs, "r": list(CIRCLE_R), "E_dist_over_r": []}}
    pb = C.bar(len(PARABOLA_R) * len(ks) + len(CIRCLE_R) * len(Rs), "displacement", args)
    curves = (("parabola", PARABOLA_R, ks, dist_parabola), ("circle", CIRCLE_R, Rs, dist_circle))
    for name, radii, params, dist in curves:
        for r in radii:
            row = []
            for q in params:
                row.append(expected_displacement(lambda a, b: dist(a, b, q), r, args.n_angles))
                pb.update(1)
            res[name]["E_dist_over_r"].append(row)
    pb.close()
    # the public code's polylines, for comparison at a few points
    n = min(args.n_angles, 2000)
    comp = []
    vx = np.arange(-10, 10, 0.1)
    for r in (PARABOLA_R[0], PARABOLA_R[-1]):
        for k in (ks[1], ks[len(ks) // 2], ks[-1]):
            exact = expected_displacement(lambda a, b: dist_parabola(a, b, k), r, n)
            poly = expected_displacement(lambda a, b: dist_polyline(a, b, vx, k * vx ** 2), r, n)
            comp.append({"curve": "parabola", "k": float(k), "r": r, "exact": exact, "polyline": poly,
                         "rel_error": abs(poly - exact) / exact})
    th = np.arange(0, 2 * np.pi, 1e-3)
    for r in (CIRCLE_R[0], CIRCLE_R[-1]):
        for R in (Rs[0], Rs[-1]):
            exact = expected_displacement(lambda a, b: dist_circle(a, b, R), r, n)
            poly = expected_displacement(lambda a, b: dist_polyline(a, b, R * np.cos(th), R * np.sin(th) + R), r, n)
            comp.append({"curve": "circle", "R": float(R), "r": r, "exact": exact, "polyline": poly,
                         "rel_error": abs(poly - exact) / exact})
    res["polyline_comparison"] = comp
    plot(res, args.out)
    C.write_results(args.out, res)
    return res


def plot(res: dict, out: str) -> None:
    fig, axes = grid(1, 2, width=4.6, height=3.6)
    panels = (("parabola", r"curvature $\kappa = 2k$ of $y = kx^2$ at the minimum", "parabola"),
              ("circle", r"curvature $\kappa = 1/R$ of the circle", "circle through the minimum"))
    for ax, (name, xlabel, title) in zip(axes[0], panels):
        for i, r in enumerate(res[name]["r"]):
            ax.plot(res[name]["kappa"], res[name]["E_dist_over_r"][i], label=f"r = {r}", color=f"C{i}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(r"$E_{w \sim S_r}[\mathrm{dist}(w, \gamma)] / r$")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("Expected displacement of a minimum vs curvature (exact distances)")
    save_figure(fig, out, "displacement")


def _report(res: dict) -> None:
    for c in res["polyline_comparison"]:
        print(c)


def main(argv=None) -> int:
    return C.cli_main(argv, parser(), run, "displacement", _report)


if __name__ == "__main__":
    raise SystemExit(main())
