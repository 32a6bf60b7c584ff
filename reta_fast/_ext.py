"""Loading of the native extension ``reta_fast._C`` with an announced fallback.

The extension is optional: without it (no compiler at install time, or ``RETA_FAST_NO_EXTENSION=1``)
every op runs its reference implementation, and a warning says so once.
"""
from __future__ import annotations

import os
import warnings

__all__ = ["native", "has_native", "require_native"]

_reason: str | None = None
native = None

if os.environ.get("RETA_FAST_NO_EXTENSION", "") not in ("", "0"):
    _reason = "RETA_FAST_NO_EXTENSION is set"
else:
    try:
        from . import _C as native  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - depends on the install
        _reason = f"the native extension reta_fast._C could not be imported ({exc})"

if native is None:
    warnings.warn(
        f"reta_fast: {_reason}; persistence runs on the reference path (Python union-find for H0, "
        "GUDHI for H1), which is much slower. Reinstall with a C++17 compiler and CMake to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_native() -> bool:
    """True when the compiled extension ``reta_fast._C`` is loaded."""
    return native is not None


def require_native(what: str):
    """Return the extension module, or raise if an explicitly requested native backend is missing."""
    if native is None:
        raise RuntimeError(f"{what}: backend='native' was requested but {_reason}")
    return native
