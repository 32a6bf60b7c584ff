"""The topology engine (PTA, docs/method.md §4), bottom to top:

* :mod:`.knn` - batched (mutual) k-NN graphs of point sets (Triton-fused search on the GPU) and
  differentiable edge lengths;
* :mod:`.h0_device` - H0 pairings with tensor ops on the graph's device (Borůvka);
* :mod:`.pairs` - H0/H1 pairings of flag complexes (native union-find + reduction, references);
* :mod:`.diagrams` - differentiable diagrams gathered at those pairings;
* :mod:`.pimage` - differentiable persistence images;
* :mod:`.pta` - :class:`TopologyAlignmentLoss`, all classes in one batched pass.
"""
from .diagrams import PersistenceDiagrams, diagrams_from_pairs, persistence_diagrams
from .knn import KNNGraph, edge_lengths, knn, knn_ref, mutual_knn_graph, mutual_knn_ref, rerank_certified
from .pairs import PersistencePairs, persistence_pairs, persistence_pairs_ref
from .pimage import persistence_image, persistence_image_ref
from .pta import TopologyAlignmentLoss

__all__ = ["KNNGraph", "PersistenceDiagrams", "PersistencePairs", "TopologyAlignmentLoss", "diagrams_from_pairs",
           "edge_lengths", "knn", "knn_ref", "mutual_knn_graph", "mutual_knn_ref", "persistence_diagrams",
           "persistence_image", "persistence_image_ref", "persistence_pairs", "persistence_pairs_ref",
           "rerank_certified"]
