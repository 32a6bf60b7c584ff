"""Triton kernels of reta_fast (installed as ``reta_fast.kernels``).

Each module holds ``@triton.jit`` kernels and their launcher, the only place block sizes and other
launch heuristics live: one ``*_launch_config`` function per kernel, which its launcher calls and
its ``*_configs`` enumeration walks. ``configs`` compiles every enumerated GPU configuration ahead of
time (no GPU needed) and reads its registers, spills and shared memory (``bench/kernel_resources.py``,
``tests/test_kernel_resources.py``). Importing this package requires triton; the public API in
``reta_fast`` never imports it directly and falls back (loudly) to the PyTorch reference when it is
missing.
"""
from .knn import knn_configs, knn_fwd, knn_launch_config
from .retrieve import retrieve_configs, retrieve_fwd, retrieve_launch_config

__all__ = ["knn_configs", "knn_fwd", "knn_launch_config", "retrieve_configs", "retrieve_fwd",
           "retrieve_launch_config"]
