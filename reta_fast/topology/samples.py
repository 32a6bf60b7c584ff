"""Point clouds with a known shape, seeded: stand-ins for teacher features in the topology demo, the
benchmarks and the tests (one definition for all of them)."""
from __future__ import annotations

import math

import torch

__all__ = ["clustered", "rings"]


def clustered(b: int, n: int, d: int, seed: int = 0, clusters: int = 3, spread: float = 0.3, scale: float = 1.0,
              normalize: bool = False, dtype=torch.float32) -> torch.Tensor:
    """``[b, n, d]``: per set, ``n`` points around ``clusters`` Gaussian centres (``scale`` x N(0, 1)) with
    noise ``spread`` x N(0, 1); L2-normalised like features with ``normalize``."""
    g = torch.Generator().manual_seed(seed)
    centres = scale * torch.randn(b, clusters, d, generator=g, dtype=dtype)
    idx = torch.randint(0, clusters, (b, n), generator=g)
    x = torch.gather(centres, 1, idx[..., None].expand(b, n, d)) + spread * torch.randn(b, n, d, generator=g, dtype=dtype)
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def rings(b: int, n: int, d: int, noise: float = 0.05, seed: int = 0, loops: int = 2, dtype=torch.float32,
          evenly: bool = False) -> torch.Tensor:
    """``[b, n, d]``: per set, ``loops`` noisy circles (radii 1 to 1.6, centres 3 apart) each in a random
    plane of R^d; a set's H1 diagram holds one long bar per circle. ``evenly``: points spaced evenly
    around each circle (``n`` divisible by ``loops``) instead of at random angles."""
    g = torch.Generator().manual_seed(seed)
    if evenly:
        per = n // loops
        if per * loops != n:
            raise ValueError(f"n={n} is not a multiple of loops={loops}")
        which = torch.arange(loops).repeat_interleave(per).expand(b, n).to(dtype)
        t = (torch.arange(per, dtype=dtype) * 2 * math.pi / per).repeat(loops).expand(b, n)
        t = t + 2 * math.pi * torch.rand(b, 1, generator=g, dtype=dtype)
    else:
        t = torch.rand(b, n, generator=g, dtype=dtype) * 2 * math.pi
        which = torch.randint(0, loops, (b, n), generator=g).to(dtype)
    radius = 1.0 + 0.6 * which / max(1, loops - 1)
    plane = torch.stack([radius * torch.cos(t) + 3 * which, radius * torch.sin(t)], -1)
    basis = torch.linalg.qr(torch.randn(b, d, 2, generator=g, dtype=dtype)).Q  # [b, d, 2] orthonormal
    return plane @ basis.transpose(1, 2) + noise * torch.randn(b, n, d, generator=g, dtype=dtype)
