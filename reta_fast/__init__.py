"""reta_fast: fast, tested RETA dataset distillation (Retrieval and Topology Alignment, CVPR 2026).

The package, from the bottom layer up (each imports only from the layers below it):

* ``kernels`` (Triton kernels, installed as ``reta_fast.kernels``), ``_ext`` (the native extension),
  ``_validate``, ``fileio``;
* :mod:`reta_fast.topology` - the PTA engine: mutual k-NN graphs, persistence pairings and diagrams,
  persistence images, :class:`TopologyAlignmentLoss`;
  :mod:`reta_fast.data` - data sets; :mod:`reta_fast.models` - networks and teacher checkpoints;
* :mod:`reta_fast.retrieval` - the DRC engine: complexity proxy, fused fit-complexity search, residual
  injection, :class:`PatchPool`; :mod:`reta_fast.train` - classifier and student training, stored labels;
* :mod:`reta_fast.recover` - :class:`RETALoss` and the recover loop;
* :mod:`reta_fast.stages` - squeeze, distill, relabel, evaluate, report, plan;
* :mod:`reta_fast.cli` - the ``reta`` command.

The method as implemented is described in the repository's ``docs/method.md``.
"""
from ._ext import has_native
from ._version import __version__
from .data import ImageFolder
from .recover import RecoverConfig, RETALoss, recover
from .retrieval import PatchPool, patch_complexity, residual_inject, retrieve, retrieve_ref
from .topology import (KNNGraph, PersistenceDiagrams, PersistencePairs, TopologyAlignmentLoss, diagrams_from_pairs,
                       edge_lengths, knn, knn_ref, mutual_knn_graph, mutual_knn_ref, persistence_diagrams,
                       persistence_image, persistence_image_ref, persistence_pairs, persistence_pairs_ref,
                       rerank_certified)
from . import models, train  # noqa: E402  (subpackages users reach as rf.models / rf.train)

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
    "__version__",
]
