"""Argument checks shared by the public API: each error names the argument and the problem."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

__all__ = ["check_points", "check_k", "check_finite", "check_positive_int", "check_labels", "check_int_setting",
           "check_number_setting", "check_choice"]


def check_points(points, name: str = "points", finite: bool = True) -> torch.Tensor:
    """Validate a point cloud ``[n, d]`` or a batch ``[b, n, d]``; return it as ``[b, n, d]``. With
    ``finite=False`` the values are not read (no host synchronisation): the caller checks them later."""
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(points).__name__}")
    if not points.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {points.dtype}")
    if points.dim() == 2:
        points = points.unsqueeze(0)
    elif points.dim() != 3:
        raise ValueError(f"{name} must have shape [n, d] or [b, n, d], got {tuple(points.shape)}")
    b, n, d = points.shape
    if b == 0:
        raise ValueError(f"{name} holds no point sets (batch size 0): every class needs points")
    if n < 2:
        raise ValueError(f"{name} must hold at least 2 points per set, got n={n}")
    if d == 0:
        raise ValueError(f"{name} has feature dimension 0")
    if finite:
        check_finite(points, name)
    return points


def check_finite(t: torch.Tensor, name: str) -> None:
    # Host synchronisation: one scalar read per call, the price of never returning a silent NaN.
    # A sum is one cheap pass and is finite whenever every element is (a NaN or inf propagates);
    # only when it is not (or overflowed) is the element-wise check run.
    if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_int_setting(value, name: str, minimum: int = 1) -> None:
    """A settings field (config dataclasses, command line): :func:`check_positive_int`'s rule, always a
    ValueError that repeats the value (a settings file or flag is data, not a call with a wrong type)."""
    try:
        check_positive_int(value, name, minimum)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None


def check_number_setting(value, name: str, low: float = 0.0, high: Optional[float] = None,
                         high_open: bool = False) -> None:
    """A settings field: a finite number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        rng = f">= {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")


def check_positive_number(value, name: str, unset: str = "") -> None:
    """A finite number > 0 (``unset``: what leaving it out means, for the message)."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0{unset}, got {value!r}")


def check_choice(value, name: str, choices) -> None:
    """A settings field that takes one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_k(k) -> int:
    return check_positive_int(k, "k", 1)


def check_labels(labels, n: int, name: str, device=None, num_classes: Optional[int] = None) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {tuple(labels.shape)}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} contains a negative label ({int(labels.min())})")
    if n and num_classes is not None and int(labels.max()) >= num_classes:
        raise ValueError(f"{name} contains label {int(labels.max())} >= num_classes={num_classes}")
    return labels.long()
