"""Triton kernels of reta_fast (installed as ``reta_fast.kernels``).

Each module holds ``@triton.jit`` kernels and their launcher, the only place block sizes and other
launch heuristics live. Importing this package requires triton; the public API in ``reta_fast``
never imports it directly and falls back (loudly) to the PyTorch reference when it is missing.
"""
from .knn import knn_fwd
from .retrieve import retrieve_fwd

__all__ = ["knn_fwd", "retrieve_fwd"]
