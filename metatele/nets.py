"""Functional LeakyReLU multi-layer perceptrons on explicit weight tuples.

Conventions (used everywhere in metatele)
-----------------------------------------
* Weights are stored exactly like ``nn.Linear.weight``: ``W_i`` has shape ``(..., out_i, in_i)``.
  With biases (``bias=True``) every ``W_i`` carries its bias as one extra *last column*,
  ``(..., out_i, in_i + 1)``, and multiplies its input augmented with a row of ones (docs/mathematics.md, section 1).
* Data are in the papers' column convention: ``X`` has shape ``(..., d_in, b)`` (features x samples),
  ``Y`` has shape ``(..., d_out, b)``. ``nn.Module`` front-ends take PyTorch's ``(b, features)`` and
  transpose once at the boundary.
* Any number of leading dimensions ``...`` is a batch of independent initialisations; every function
  broadcasts over them, so many networks run in one call without a Python loop.
* ``dims = [b, d_in, h_1, ..., h_{L-1}, d_out]`` describes a problem as in the papers' code:
  ``[20, 20, 20, 20]`` is batch 20, ``X`` 20 x 20, ``W_0`` 20 x 20, ``W_1`` 20 x 20.

Network (docs/mathematics.md, section 1): ``h_0 = X``, ``h_{i+1} = sigma(W_i h_i)``, ``f(X) = W_L h_L`` with
``sigma`` = LeakyReLU of slope 0.1, whose exact inverse is LeakyReLU of slope 10.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

Weights = tuple[Tensor, ...]

DEFAULT_SLOPE = 0.1

__all__ = [
    "DEFAULT_SLOPE",
    "Weights",
    "leaky_relu",
    "leaky_relu_inv",
    "leaky_relu_grad",
    "augment",
    "layer_inputs",
    "forward",
    "mse_loss",
    "ce_loss",
    "loss_fn",
    "init_uniform",
    "init_linear",
    "regression_data",
    "flatten",
    "unflatten",
    "from_sequential",
    "to_sequential",
    "check_weights",
]


def leaky_relu(x: Tensor, slope: float = DEFAULT_SLOPE) -> Tensor:
    """sigma(x) = x for x >= 0, slope * x otherwise."""
    return torch.where(x >= 0, x, slope * x)


def leaky_relu_inv(y: Tensor, slope: float = DEFAULT_SLOPE) -> Tensor:
    """Exact inverse of :func:`leaky_relu` (a LeakyReLU of slope ``1 / slope``)."""
    if slope <= 0:
        raise ValueError(f"LeakyReLU slope must be > 0 to be invertible, got {slope}")
    return torch.where(y >= 0, y, y / slope)


def leaky_relu_grad(x: Tensor, slope: float = DEFAULT_SLOPE) -> Tensor:
    """sigma'(x): 1 for x >= 0, ``slope`` otherwise (same shape as ``x``)."""
    return torch.where(x >= 0, torch.ones_like(x), torch.full_like(x, slope))


def augment(h: Tensor) -> Tensor:
    """Append a row of ones: ``(..., d, b) -> (..., d + 1, b)`` (bias as an extra input column)."""
    ones = torch.ones(*h.shape[:-2], 1, h.shape[-1], dtype=h.dtype, device=h.device)
    return torch.cat([h, ones], dim=-2)


def layer_inputs(weights: Sequence[Tensor], X: Tensor, *, slope: float = DEFAULT_SLOPE,
                 bias: bool = False) -> list[Tensor]:
    """Inputs of every layer, ``[h_0 = X, h_1, ..., h_L]`` (un-augmented), shapes ``(..., d_i, b)``."""
    hs = [X]
    h = X
    for W in weights[:-1]:
        h = leaky_relu(W @ (augment(h) if bias else h), slope)
        hs.append(h)
    return hs


def forward(weights: Sequence[Tensor], X: Tensor, *, slope: float = DEFAULT_SLOPE,
            bias: bool = False) -> Tensor:
    """Network output ``f(X) = W_L sigma(... sigma(W_0 X))``, shape ``(..., d_out, b)``."""
    h = layer_inputs(weights, X, slope=slope, bias=bias)[-1]
    return weights[-1] @ (augment(h) if bias else h)


def mse_loss(weights: Sequence[Tensor], X: Tensor, Y: Tensor, *, slope: float = DEFAULT_SLOPE,
             bias: bool = False) -> Tensor:
    """Regression loss ``L = 1/2 ||Y - f(X)||_F^2`` (a sum over samples), shape ``(...)``."""
    r = Y - forward(weights, X, slope=slope, bias=bias)
    return 0.5 * r.pow(2).sum(dim=(-2, -1))


def ce_loss(weights: Sequence[Tensor], X: Tensor, labels: Tensor, *, slope: float = DEFAULT_SLOPE,
            bias: bool = False) -> Tensor:
    """Cross-entropy (log-softmax + NLL, mean over the ``b`` samples), shape ``(...)``.

    ``labels``: integer classes, shape ``(..., b)`` or ``(b,)``.
    """
    return ce_loss_from_logits(forward(weights, X, slope=slope, bias=bias), labels)


def ce_loss_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits ``(..., C, b)`` against integer labels ``(..., b)`` / ``(b,)``, mean over ``b``."""
    logp = torch.log_softmax(logits, dim=-2)
    labels = labels.expand(*logits.shape[:-2], labels.shape[-1]).long()
    nll = -torch.gather(logp, -2, labels.unsqueeze(-2)).squeeze(-2)
    return nll.mean(dim=-1)


_LOSSES = {"mse": mse_loss, "ce": ce_loss}


def loss_fn(name: str):
    """The loss function called ``name`` (``"mse"`` or ``"ce"``)."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; allowed: {sorted(_LOSSES)}") from None


def _check_dims(dims: Sequence[int]) -> list[int]:
    dims = [int(d) for d in dims]
    if len(dims) < 3 or any(d <= 0 for d in dims):
        raise ValueError(f"dims must be [batch, d_in, hidden..., d_out] with at least 3 positive "
                         f"entries, got {dims}")
    return dims


def init_uniform(dims: Sequence[int], generator: torch.Generator | None = None, *,
                 n_init: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> Weights:
    """Papers' regression initialisation: every entry of every ``W_i`` uniform in [0, 1).

    ``dims = [b, d_in, h_1, ..., d_out]``; returns ``W_i`` of shape ``([n_init,] dims[i+2], dims[i+1])``.
    """
    dims = _check_dims(dims)
    lead = () if n_init is None else (n_init,)
    return tuple(torch.rand(*lead, dims[i + 2], dims[i + 1], generator=generator, dtype=dtype,
                            device=device) for i in range(len(dims) - 2))


def regression_data(dims: Sequence[int], generator: torch.Generator | None = None, *,
                    n_init: int | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Papers' regression data: ``X (.., d_in, b)`` and ``Y (.., d_out, b)``, entries uniform in [0, 1)."""
    dims = _check_dims(dims)
    lead = () if n_init is None else (n_init,)
    X = torch.rand(*lead, dims[1], dims[0], generator=generator, dtype=dtype, device=device)
    Y = torch.rand(*lead, dims[-1], dims[0], generator=generator, dtype=dtype, device=device)
    return X, Y


def init_linear(widths: Sequence[int], generator: torch.Generator | None = None, *,
                bias: bool = True, n_init: int | None = None, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> Weights:
    """PyTorch's ``nn.Linear`` initialisation U(-k, k), k = 1/sqrt(fan_in), for ``widths = [d_in, ..., d_out]``.

    With ``bias=True`` each weight has the bias as its last column (drawn from the same U(-k, k)).
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or any(w <= 0 for w in widths):
        raise ValueError(f"widths must be [d_in, ..., d_out] with >= 2 positive entries, got {widths}")
    lead = () if n_init is None else (n_init,)
    out = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        k = fan_in ** -0.5
        cols = fan_in + (1 if bias else 0)
        W = (torch.rand(*lead, fan_out, cols, generator=generator, dtype=dtype, device=device) * 2 - 1) * k
        out.append(W)
    return tuple(out)


def flatten(weights: Sequence[Tensor], n_lead: int = 0) -> Tensor:
    """Concatenate all weights into one vector per initialisation: ``(*lead, P)``."""
    return torch.cat([W.reshape(*W.shape[:n_lead], -1) for W in weights], dim=-1)


def unflatten(vec: Tensor, like: Sequence[Tensor], n_lead: int = 0) -> Weights:
    """Inverse of :func:`flatten`: split ``(*lead, P)`` into tensors shaped like ``like``."""
    out, start = [], 0
    for W in like:
        shape = W.shape[n_lead:]
        n = shape.numel()
        out.append(vec[..., start:start + n].reshape(*vec.shape[:-1], *shape))
        start += n
    if start != vec.shape[-1]:
        raise ValueError(f"vector has {vec.shape[-1]} entries, the weights need {start}")
    return tuple(out)


def check_weights(weights: Sequence[Tensor], X: Tensor, *, bias: bool = False) -> None:
    """Raise ``ValueError`` naming the first shape mismatch between consecutive layers and ``X``."""
    if len(weights) < 1:
        raise ValueError("need at least one weight matrix")
    d = X.shape[-2]
    for i, W in enumerate(weights):
        if W.dim() < 2:
            raise ValueError(f"weight {i} must be at least 2-D (out, in), got shape {tuple(W.shape)}")
        expected = d + (1 if bias else 0)
        if W.shape[-1] != expected:
            raise ValueError(f"weight {i} has shape {tuple(W.shape)}: its last dimension must be "
                             f"{expected} (input width {d}{' + 1 bias column' if bias else ''})")
        d = W.shape[-2]


# ----------------------------------------------------------------------------- nn.Sequential adapters

def _sequential_layers(model: nn.Module) -> tuple[list[nn.Linear], float, bool]:
    """Validate ``model`` as Linear, LeakyReLU, Linear, ..., Linear and return (linears, slope, bias)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential of nn.Linear and nn.LeakyReLU, got {type(model).__name__}")
    mods = [m for m in model if not isinstance(m, (nn.Identity, nn.Flatten))]
    linears, slopes = [], set()
    for j, m in enumerate(mods):
        want_linear = j % 2 == 0
        if want_linear and not isinstance(m, nn.Linear):
            raise TypeError(f"layer {j} of the Sequential must be nn.Linear, got {type(m).__name__}")
        if not want_linear:
            if not isinstance(m, nn.LeakyReLU):
                raise TypeError(f"layer {j} must be nn.LeakyReLU (the only activation with an exact "
                                f"inverse supported here), got {type(m).__name__}")
            slopes.add(float(m.negative_slope))
        if want_linear:
            linears.append(m)
    if not mods or not isinstance(mods[-1], nn.Linear):
        raise TypeError("the Sequential must end with an nn.Linear layer")
    if len(slopes) > 1:
        raise ValueError(f"all LeakyReLU layers must share one slope, got {sorted(slopes)}")
    slope = slopes.pop() if slopes else DEFAULT_SLOPE
    if slope <= 0:
        raise ValueError(f"LeakyReLU slope must be > 0 for an invertible activation, got {slope}")
    has_bias = {m.bias is not None for m in linears}
    if len(has_bias) > 1:
        raise ValueError("either every nn.Linear has a bias or none does")
    return linears, slope, has_bias.pop()


def from_sequential(model: nn.Module) -> tuple[Weights, float, bool]:
    """Copy the weights of ``nn.Sequential(Linear, LeakyReLU, ..., Linear)`` into a weight tuple.

    Returns ``(weights, slope, bias)``; with biases each weight is ``[W | b]``, shape ``(out, in + 1)``.
    The tensors are detached copies.
    """
    linears, slope, bias = _sequential_layers(model)
    weights = []
    for m in linears:
        W = m.weight.detach()
        if bias:
            W = torch.cat([W, m.bias.detach().unsqueeze(-1)], dim=-1)
        weights.append(W.clone())
    return tuple(weights), slope, bias


def to_sequential(weights: Sequence[Tensor], model: nn.Module) -> nn.Module:
    """Write a weight tuple (as returned by :func:`from_sequential`) back into ``model`` in place."""
    linears, _, bias = _sequential_layers(model)
    if len(weights) != len(linears):
        raise ValueError(f"got {len(weights)} weights for a model with {len(linears)} Linear layers")
    with torch.no_grad():
        for W, m in zip(weights, linears):
            expected = (m.out_features, m.in_features + (1 if bias else 0))
            if tuple(W.shape) != expected:
                raise ValueError(f"weight of shape {tuple(W.shape)} does not fit {m} (expected {expected})")
            m.weight.copy_(W[:, :m.in_features])
            if bias:
                m.bias.copy_(W[:, -1])
    return model
