"""Test configuration: Triton kernels run in the interpreter on the CPU (set before any import)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def _has_triton() -> bool:
    try:
        import reta_fast.kernels  # noqa: F401
    except Exception:
        return False
    return True


HAS_TRITON = _has_triton()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(actual, expected, atol, rtol=0.0, what="value"):
    """Compare float tensors; on failure report max diff, where, and NaN/inf mismatches."""
    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    fin_a, fin_e = torch.isfinite(a), torch.isfinite(e)
    if not torch.equal(fin_a, fin_e):
        where = (fin_a != fin_e).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: NaN/inf pattern differs at {where}")
    diff = (a - e).abs().where(fin_a, torch.zeros_like(a))
    tol = atol + rtol * e.abs().where(fin_e, torch.zeros_like(e))
    bad = diff > tol
    if bool(bad.any()):
        i = int(diff.flatten().argmax())
        idx = np.unravel_index(i, tuple(a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements out of tolerance; max |diff| "
            f"{float(diff.max()):.3e} at {tuple(int(j) for j in idx)} "
            f"(actual {float(a.flatten()[i]):.6g}, expected {float(e.flatten()[i]):.6g})"
        )


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
