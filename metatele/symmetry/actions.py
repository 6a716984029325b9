"""Group actions of GL_k on pairs of consecutive weights, and on whole networks (docs/mathematics.md, section 3).

Notation for one hidden layer of width ``k``: ``V (..., k, n[+1])`` maps its input ``h (..., n, b)``
to the hidden layer, ``U (..., m, k[+1])`` maps the hidden layer onward, ``g (..., k, k)``.
With ``bias=True`` the last column of each weight is its bias (see :mod:`metatele.nets`): ``V``
acts on ``[h; 1]`` and only the first ``k`` columns of ``U`` are transformed (its bias is unchanged).

| action           | U ->                              | V ->                              |
|------------------|-----------------------------------|-----------------------------------|
| ``inverse``      | ``U g^{-1}``                      | ``sigma^{-1}(g sigma(V h)) h^+`` (P1 eq. 8) |
| ``pseudo_inverse`` | ``U sigma(V h) sigma(g V h)^+`` | ``g V``                           |
| ``linearised``   | ``U (I - T)``                     | ``sigma^{-1}((I + T) sigma(V h)) h^+`` (P2's learned teleport; first order only) |
| ``linear``       | ``U g^{-1}``                      | ``g V`` (needs sigma = identity, slope 1) |

Networks with several hidden layers transform the pairs ``(W_1, W_0), (W_2, W_1), ...`` in order and
recompute each pair's input ``h`` from the *already transformed* earlier weights (docs/mathematics.md, section 3.5;
the public code's reuse of untransformed hidden values is not reproduced: docs/departures.md, section 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..nets import DEFAULT_SLOPE, augment, leaky_relu, leaky_relu_inv
from .group import check_group_element, identity_like

__all__ = [
    "ACTIONS",
    "inverse_form",
    "pseudo_inverse_form",
    "linearised_form",
    "linear_form",
    "transform",
    "Exactness",
    "exactness",
]

ACTIONS = ("inverse", "pseudo_inverse", "linearised", "linear")


def _split_u(U: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
    """Split ``U`` into the columns that read the hidden layer and its bias column (if any)."""
    if U.shape[-1] == k:
        return U, None
    if U.shape[-1] == k + 1:
        return U[..., :k], U[..., k:]
    raise ValueError(f"U has {U.shape[-1]} columns, expected {k} (or {k + 1} with a bias) for a hidden "
                     f"layer of width {k}")


def _join_u(Uw: Tensor, Ub: Tensor | None) -> Tensor:
    return Uw if Ub is None else torch.cat([Uw, Ub], dim=-1)


def _check_slope(slope: float, action: str) -> None:
    if not slope > 0:
        raise ValueError(f"the {action!r} action needs an invertible LeakyReLU (slope > 0), got slope {slope}")


def _times_pinv(A: Tensor, ha: Tensor, h_pinv: Tensor | None, square_solve: bool) -> Tensor:
    """``A ha^+``: with the given ``h_pinv``; by a solve when ``square_solve`` and ``ha`` is square (then
    ``ha^+ = ha^{-1}``; an LU factorisation instead of an SVD); else with ``torch.linalg.pinv``."""
    if h_pinv is not None:
        return A @ h_pinv
    if square_solve and ha.shape[-1] == ha.shape[-2]:
        return torch.linalg.solve(ha, A, left=False)
    return A @ torch.linalg.pinv(ha)


def inverse_form(U: Tensor, V: Tensor, h: Tensor, g: Tensor, *, slope: float = DEFAULT_SLOPE,
                 bias: bool = False, h_pinv: Tensor | None = None,
                 square_solve: bool = False) -> tuple[Tensor, Tensor]:
    """P1 eq. 8: ``U -> U g^{-1}``, ``V -> sigma^{-1}(g sigma(V h)) h^+``.

    Exact on the batch ``h`` when ``[h; 1]`` has full column rank (``b <= n``). ``g^{-1}`` is applied with
    ``torch.linalg.solve``. ``h_pinv`` (the pseudo-inverse of ``h``, or of ``[h; 1]`` with bias) may be
    passed to avoid recomputing it; ``square_solve=True`` applies ``h^{-1}`` by a solve when ``[h; 1]`` is square
    (the exact case ``b = n``). Returns ``(U', V')``.
    """
    _check_slope(slope, "inverse")
    ha = augment(h) if bias else h
    Z = leaky_relu(V @ ha, slope)
    V_new = _times_pinv(leaky_relu_inv(g @ Z, slope), ha, h_pinv, square_solve)
    Uw, Ub = _split_u(U, g.shape[-1])
    Uw_new = torch.linalg.solve(g, Uw, left=False)  # U g^{-1}
    return _join_u(Uw_new, Ub), V_new


def pseudo_inverse_form(U: Tensor, V: Tensor, h: Tensor, g: Tensor, *, slope: float = DEFAULT_SLOPE,
                        bias: bool = False) -> tuple[Tensor, Tensor]:
    """``U -> U sigma(V h) sigma(g V h)^+``, ``V -> g V``; exact when ``b <= k`` (docs/mathematics.md, section 3.2)."""
    _check_slope(slope, "pseudo_inverse")
    ha = augment(h) if bias else h
    V_new = g @ V
    Uw, Ub = _split_u(U, g.shape[-1])
    Uw_new = Uw @ leaky_relu(V @ ha, slope) @ torch.linalg.pinv(leaky_relu(V_new @ ha, slope))
    return _join_u(Uw_new, Ub), V_new


def linearised_form(U: Tensor, V: Tensor, h: Tensor, T: Tensor, *, slope: float = DEFAULT_SLOPE,
                    bias: bool = False, h_pinv: Tensor | None = None,
                    square_solve: bool = False) -> tuple[Tensor, Tensor]:
    """P2's learned-teleport action with ``g = I + T``: ``U -> U (I - T)``, ``V -> sigma^{-1}((I+T) sigma(V h)) h^+``.

    A named approximation: ``(I + T)^{-1} = I - T + O(||T||^2)``, so the loss changes at second order.
    """
    _check_slope(slope, "linearised")
    ha = augment(h) if bias else h
    eye = identity_like(T)
    V_new = _times_pinv(leaky_relu_inv((eye + T) @ leaky_relu(V @ ha, slope), slope), ha, h_pinv, square_solve)
    Uw, Ub = _split_u(U, T.shape[-1])
    return _join_u(Uw @ (eye - T), Ub), V_new


def linear_form(U: Tensor, V: Tensor, g: Tensor, *, slope: float = 1.0) -> tuple[Tensor, Tensor]:
    """Linear layers (``sigma`` = identity, i.e. slope 1): ``U -> U g^{-1}``, ``V -> g V``; always exact."""
    if slope != 1.0:
        raise ValueError(f"the 'linear' action keeps the loss only for sigma = identity (slope 1.0), "
                         f"got slope {slope}; use 'inverse' or 'pseudo_inverse' for LeakyReLU")
    Uw, Ub = _split_u(U, g.shape[-1])
    return _join_u(torch.linalg.solve(g, Uw, left=False), Ub), g @ V


def transform(weights: Sequence[Tensor], X: Tensor, elements: Sequence[Tensor | None], *,
              action: str = "inverse", slope: float = DEFAULT_SLOPE, bias: bool = False,
              X_pinv: Tensor | None = None, validate: bool = True,
              square_solve: bool = False) -> tuple[Tensor, ...]:
    """Apply one group element per hidden layer to a whole network, layer pairs in order.

    ``weights``: ``(W_0, ..., W_L)``, ``W_i (..., out_i, in_i[+1])``; ``X (..., d_in, b)``.
    ``elements``: ``L`` entries, one per hidden layer: ``g_i (..., h_i, h_i)`` for ``inverse``,
    ``pseudo_inverse`` and ``linear``; ``T_i`` for ``linearised``. ``None`` leaves that layer alone.
    ``X_pinv``: optional cached pseudo-inverse of ``X`` (or ``[X; 1]``) for the first pair.
    ``validate``: check every element is finite and (except for ``linearised``) invertible, raising
    ``ValueError`` otherwise; hot loops that build their elements themselves may pass ``False``.
    ``square_solve``: apply ``h^+`` of a square pair input as ``h^{-1}`` by a solve (``inverse``,
    ``linearised``); for callers that know the action is exact (:func:`exactness`).
    The input of pair ``i`` is recomputed from the already transformed ``W_0, ..., W_{i-1}``.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; allowed: {ACTIONS}")
    W = list(weights)
    if len(elements) != len(W) - 1:
        raise ValueError(f"need one group element per hidden layer: {len(W) - 1}, got {len(elements)}")
    h = X
    for i, e in enumerate(elements):
        if e is not None:
            k = W[i].shape[-2]
            if e.shape[-2:] != (k, k):
                raise ValueError(f"group element {i} has shape {tuple(e.shape)}; hidden layer {i} has "
                                 f"width {k}, so it must be (..., {k}, {k})")
            if validate:
                if action == "linearised":
                    if not bool(torch.isfinite(e).all()):
                        raise ValueError(f"T for hidden layer {i} has non-finite entries")
                else:
                    check_group_element(e)
            hp = X_pinv if i == 0 else None
            if action == "inverse":
                W[i + 1], W[i] = inverse_form(W[i + 1], W[i], h, e, slope=slope, bias=bias, h_pinv=hp,
                                              square_solve=square_solve)
            elif action == "pseudo_inverse":
                W[i + 1], W[i] = pseudo_inverse_form(W[i + 1], W[i], h, e, slope=slope, bias=bias)
            elif action == "linearised":
                W[i + 1], W[i] = linearised_form(W[i + 1], W[i], h, e, slope=slope, bias=bias, h_pinv=hp,
                                                 square_solve=square_solve)
            else:
                W[i + 1], W[i] = linear_form(W[i + 1], W[i], e, slope=slope)
        if i + 1 < len(elements):
            h = leaky_relu(W[i] @ (augment(h) if bias else h), slope)
    return tuple(W)


# ----------------------------------------------------------------------------- exactness check

_ORDER = {"exact": 0, "projection": 1, "first_order": 2, "approximate": 3}


@dataclass
class Exactness:
    """Whether an action preserves the loss on a batch, per hidden layer and overall.

    Verdicts: ``"exact"`` (loss kept, ``g = I`` leaves the weights unchanged), ``"projection"`` (loss kept
    on this batch, but even ``g = I`` projects the weights: batch smaller than the width), ``"first_order"``
    (the linearised action: error ``O(||T||^2)``), ``"approximate"`` (batch larger than the width: the loss
    changes at first order in ``g - I``).
    """

    verdict: str
    per_layer: list[str] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)

    @property
    def loss_preserving(self) -> bool:
        return self.verdict in ("exact", "projection")


def _svd_rank(mat: Tensor, vectors: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """Numerical rank of ``mat`` at its own precision (``torch.linalg.matrix_rank``'s default tolerance,
    ``max(m, n) * eps(dtype) * sigma_max``: the cut-off ``torch.linalg.pinv`` uses, so a verdict of full rank
    and the pseudo-inverse the action applies agree) and, if ``vectors``, its SVD ``(U, S, Vh)``."""
    m = mat.detach()
    if m.dtype not in (torch.float32, torch.float64):
        m = m.double()
    if vectors:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        svd = (U, S, Vh)
    else:
        S, svd = torch.linalg.svdvals(m), None
    if S.numel() == 0:
        return torch.zeros(S.shape[:-1], dtype=torch.long, device=S.device), svd
    tol = S[..., :1] * (max(m.shape[-2], m.shape[-1]) * torch.finfo(m.dtype).eps)
    return (S > tol).sum(-1), svd


def pinv_from_svd(svd: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype, shape: tuple[int, int]) -> Tensor:
    """Moore-Penrose pseudo-inverse from an SVD, with ``torch.linalg.pinv``'s default cut-off for ``dtype``
    (singular values below ``max(m, n) * eps(dtype) * sigma_max`` are dropped), returned in ``dtype``."""
    U, S, Vh = svd
    if S.numel() == 0:
        return torch.zeros(*S.shape[:-1], shape[1], shape[0], dtype=dtype, device=S.device)
    cut = S[..., :1] * (max(shape) * torch.finfo(dtype).eps)
    inv = torch.where(S > cut, 1.0 / S.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(S))
    return ((Vh.mT * inv.unsqueeze(-2)) @ U.mT).to(dtype)


def _rank_verdict(mat: Tensor, what: str, rank_svd=None) -> tuple[str, str]:
    """Verdict for a right pseudo-inverse ``A mat^+ mat = A``: needs full column rank ``b``.

    ``rank_svd``: an already computed ``(rank, svd)`` of ``mat`` (see :func:`_svd_rank`)."""
    rows, b = mat.shape[-2], mat.shape[-1]
    if b > rows:
        return "approximate", f"batch {b} > {what} {rows}"
    if not bool(torch.isfinite(mat).all()):
        return "approximate", f"non-finite values in the input of {what} {rows}"
    rank = (rank_svd if rank_svd is not None else _svd_rank(mat))[0]
    if bool((rank < b).any()):
        return "approximate", f"{what} {rows} >= batch {b} but rank {int(rank.min())} < {b}"
    if b < rows:
        return "projection", f"batch {b} < {what} {rows}"
    return "exact", f"batch {b} == {what} {rows}, full rank"


def exactness(weights: Sequence[Tensor], X: Tensor, *, action: str = "inverse",
              slope: float = DEFAULT_SLOPE, bias: bool = False, return_pinv: bool = False):
    """Tell whether ``action`` keeps the loss of this network on the batch ``X`` (docs/mathematics.md, section 3.8).

    ``inverse`` needs each pair's input ``[h; 1]`` to have full column rank (``b <= n``);
    ``pseudo_inverse`` needs ``sigma(g V h)`` (``k x b``) to have full column rank (``b <= k``);
    ``linearised`` is first order only; ``linear`` is exact for slope 1.

    ``return_pinv=True`` returns ``(Exactness, X_pinv)``: the pseudo-inverse of ``X`` (``[X; 1]`` with a bias)
    that the ``inverse`` and ``linearised`` actions need, built from the same singular value decomposition as
    the rank test of the first layer (one SVD of the batch instead of two; ``None`` for the other actions).
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; allowed: {ACTIONS}")
    per, detail = [], []
    hs = [X]
    for W in weights[:-2]:
        hs.append(leaky_relu(W @ (augment(hs[-1]) if bias else hs[-1]), slope))
    X_pinv = None
    for i, h in enumerate(hs):
        ha = augment(h) if bias else h
        if action == "linear":
            v, d = ("exact", "linear layers") if slope == 1.0 else ("approximate", f"slope {slope} != 1")
        elif action == "inverse":
            rs = None
            if i == 0 and return_pinv and bool(torch.isfinite(ha).all()):
                rs = _svd_rank(ha, vectors=True)
                X_pinv = pinv_from_svd(rs[1], ha.dtype, tuple(ha.shape[-2:]))
            v, d = _rank_verdict(ha, f"input width of layer {i}{' (+1 bias)' if bias else ''}", rs)
        elif action == "pseudo_inverse":
            v, d = _rank_verdict(leaky_relu(weights[i] @ ha, slope), f"hidden width {i}")
        else:
            v, d = "first_order", "linearised action: error O(||T||^2)"
        per.append(v)
        detail.append(d)
    verdict = max(per, key=_ORDER.__getitem__) if per else "exact"
    ex = Exactness(verdict, per, detail)
    if not return_pinv:
        return ex
    if X_pinv is None and action in ("inverse", "linearised"):
        Xa = augment(X) if bias else X
        X_pinv = torch.linalg.pinv(Xa)
    return ex, X_pinv
