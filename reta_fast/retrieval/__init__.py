"""The retrieval engine (DRC, docs/method.md §3), bottom to top:

* :mod:`.complexity` - the complexity proxy of a patch;
* :mod:`.search` - the grouped fit-complexity search (fused Triton kernel on the GPU), exact;
* :mod:`.inject` - the residual connection that mixes the retrieved patch into the image;
* :mod:`.pool` - :class:`PatchPool`, the on-disk pool of real patches, features and complexities.
"""
from .complexity import patch_complexity
from .inject import residual_inject
from .pool import PatchPool
from .search import retrieve, retrieve_ref

__all__ = ["PatchPool", "patch_complexity", "residual_inject", "retrieve", "retrieve_ref"]
