"""reta_fast: fast, tested RETA dataset distillation (Retrieval and Topology Alignment, CVPR 2026).

Public API of the topology engine (METHOD.md section 4):

* :func:`mutual_knn_graph` - batched mutual k-NN graphs (Triton-fused search on the GPU);
* :func:`persistence_pairs` - H0/H1 pairings of flag complexes (native union-find + reduction);
* :func:`persistence_diagrams` - differentiable diagrams gathered at those pairings;
* :func:`persistence_image` - differentiable persistence images;
* :class:`TopologyAlignmentLoss` - the PTA loss, all classes in one batched pass.

and of the retrieval engine (DRC, METHOD.md section 3): :func:`patch_complexity`, :func:`retrieve`
(fused grouped fit-complexity search), :func:`residual_inject`, :class:`PatchPool`.
"""
from ._ext import has_native
from .knn import KNNGraph, edge_lengths, knn, knn_ref, mutual_knn_graph, mutual_knn_ref, rerank_certified
from .persistence import (
    PersistenceDiagrams,
    PersistencePairs,
    diagrams_from_pairs,
    persistence_diagrams,
    persistence_pairs,
    persistence_pairs_ref,
)
from .pimage import persistence_image, persistence_image_ref
from .retrieval import patch_complexity, residual_inject, retrieve, retrieve_ref
from .pool import PatchPool
from .data import ImageFolder
from .topo_loss import TopologyAlignmentLoss
from .reta_loss import RETALoss
from .recover import RecoverConfig, recover
from . import train
from . import models

__version__ = "0.1.0"

__all__ = [
    "KNNGraph",
    "PersistenceDiagrams",
    "PersistencePairs",
    "TopologyAlignmentLoss",
    "diagrams_from_pairs",
    "edge_lengths",
    "has_native",
    "knn",
    "knn_ref",
    "mutual_knn_graph",
    "mutual_knn_ref",
    "persistence_diagrams",
    "persistence_image",
    "persistence_image_ref",
    "persistence_pairs",
    "persistence_pairs_ref",
    "rerank_certified",
    "patch_complexity",
    "residual_inject",
    "retrieve",
    "retrieve_ref",
    "PatchPool",
    "ImageFolder",
    "RETALoss",
    "RecoverConfig",
    "models",
    "train",
    "recover",
]
