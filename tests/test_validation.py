"""Bad input gets a clear ValueError/TypeError naming the argument; valid corner cases work."""
import pytest
import torch

import reta_fast as rf
from reta_fast.recover.loop import RecoverConfig
from reta_fast.stages.config import DistillConfig, EvalConfig

BACKENDS = ["reference"] + (["native"] if rf.has_native() else [])


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), ValueError, "points contains 1 NaN"),
    (torch.tensor([[0.0, float("inf")], [1.0, 1.0]]), ValueError, "points contains"),
    (torch.zeros(1, 3), ValueError, "at least 2 points"),
    (torch.zeros(0, 5, 3), ValueError, "batch size 0"),
    (torch.zeros(5), ValueError, r"\[n, d\] or \[b, n, d\]"),
    (torch.zeros(4, 3, dtype=torch.int64), TypeError, "floating-point"),
    ([[0.0, 1.0]], TypeError, "torch.Tensor"),
])
def test_points_errors(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        rf.mutual_knn_graph(bad, 2)
    with pytest.raises(exc, match=msg):
        rf.persistence_diagrams(bad, 2)


@pytest.mark.parametrize("k,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_k_errors(k, exc):
    with pytest.raises(exc, match="k must"):
        rf.mutual_knn_graph(torch.randn(5, 2), k)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        rf.mutual_knn_graph(torch.randn(5, 2), 2, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        rf.persistence_pairs(torch.tensor([[0, 1]]), torch.tensor([1.0]), 2, backend="fast")


E = torch.tensor([[0, 1], [1, 2]])
W = torch.tensor([0.5, 0.7])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edges,weights,n,kw,exc,msg", [
    (E, torch.tensor([0.5, float("nan")]), 3, {}, ValueError, r"weights\[1\] = nan \(graph 0\) is not finite"),
    (E, torch.tensor([0.5, float("-inf")]), 3, {}, ValueError, "is not finite"),
    (E, torch.tensor([0.5, -0.1]), 3, {}, ValueError, r"weights\[1\] = -0.1.* is negative"),
    (torch.tensor([[0, 3]]), torch.tensor([1.0]), 3, {}, ValueError,
     r"edges\[0\] = \(0, 3\) of graph 0 has an endpoint outside \[0, 3\)"),
    (torch.tensor([[-1, 1]]), torch.tensor([1.0]), 3, {}, ValueError, "outside"),
    (torch.tensor([[1, 1]]), torch.tensor([1.0]), 3, {}, ValueError, "self-loop"),
    (torch.tensor([[0, 1], [1, 0]]), W, 3, {}, ValueError, "duplicate edge"),
    (E.float(), W, 3, {}, TypeError, "edges must be an integer"),
    (E, torch.tensor([1, 2]), 3, {}, TypeError, "weights must be a floating"),
    (E, W[:1], 3, {}, ValueError, r"weights must have shape \[E\]"),
    (E[:, :1], W, 3, {}, ValueError, r"edges must have shape \[E, 2\]"),
    (E, W, 3, {"offsets": [0, 1]}, ValueError, "offsets must"),
    (E, W, [3], {"offsets": [0, 1, 2]}, ValueError, "num_nodes has 1 entries but there are 2 graphs"),
    (E, W, 3, {"maxdim": 2}, ValueError, "maxdim"),
    (E, W.to("meta"), 3, {}, ValueError, "weights is on meta"),
])
def test_pairs_errors(backend, edges, weights, n, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        rf.persistence_pairs(edges, weights, n, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_edges_and_duplicates_are_valid(backend):
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    dg = rf.persistence_diagrams(x, 3, backend=backend)
    assert sorted(dg.h0[:, 1].tolist()) == [0.0, 0.0, 3.0]


def test_int32_edges_accepted():
    p32 = rf.persistence_pairs(E.int(), W, 3)
    p64 = rf.persistence_pairs(E, W.double(), 3)
    assert torch.equal(p32.h0, p64.h0)


def test_more_bad_arguments():
    x = torch.randn(10, 3)
    for bad in (float("nan"), -5.0, True, "min"):
        with pytest.raises(ValueError, match="essential"):
            rf.persistence_diagrams(x, 3, essential=bad)
        with pytest.raises(ValueError, match="essential"):
            rf.TopologyAlignmentLoss(essential=bad)
    with pytest.raises(TypeError, match="num_nodes must hold integers"):
        rf.persistence_pairs(E, W, [3.5], offsets=[0, 2])
    with pytest.raises(ValueError, match="offsets must"):
        rf.persistence_image(torch.rand(7, 2), 4, offsets=torch.tensor([2, 4, 7]))
    with pytest.raises(ValueError, match=r"k must be <= n - 1"):
        rf.knn(torch.randn(1, 5, 2), 5)
    with pytest.raises(ValueError, match="k must be"):
        rf.knn(torch.randn(1, 5, 2), 0)


def test_edge_length_double_backward_raises_instead_of_lying():
    x = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    g = rf.mutual_knn_graph(x, 2)
    (grad,) = torch.autograd.grad(g.lengths.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


@pytest.mark.parametrize("cls, kw, match", [
    ("distill", dict(method="retta"), r"method must be one of .*'reta', got 'retta'"),
    ("distill", dict(ipc=0), "ipc must be an integer >= 1, got 0"),
    ("distill", dict(iterations=2.5), "iterations must be an integer >= 1"),
    ("distill", dict(topo_k=True), "topo_k must be an integer >= 1, got True"),
    ("distill", dict(lam=float("nan")), "lam must be a finite number >= 0"),
    ("distill", dict(lam_topo=-0.5), "lam_topo must be a finite number >= 0"),
    ("distill", dict(topo_ref_batch=-1), "topo_ref_batch must be an integer >= 0, got -1"),
    ("distill", dict(drc_margin=1.0), r"drc_margin must be a finite number in \[0.0, 1.0\), got 1.0"),
    ("distill", dict(pta_real_view="blurred"), "pta_real_view must be one of 'clean', 'augmented'"),
    ("distill", dict(pta_set="all"), "pta_set must be one of 'complete', 'initial'"),
    ("distill", dict(pta_from_block=-1), "pta_from_block must be an integer >= 0, got -1"),
    ("eval", dict(labels="soft"), "labels must be one of 'online', 'stored'"),
    ("eval", dict(batch_size=0), "batch_size must be an integer >= 1"),
    ("recover", dict(alpha=1.5), r"alpha must be a finite number in \[0.0, 1.0\]"),
    ("recover", dict(iterations=1, resolutions=(8, 16)), r"iterations \(at least one step per block\) must be an "
                                                          "integer >= 2"),
    ("recover", dict(jitter=-1), "jitter must be a finite number >= 0"),
])
def test_every_settings_field_is_checked_by_name(cls, kw, match):
    make = dict(distill=DistillConfig, eval=EvalConfig, recover=RecoverConfig)[cls]
    make().validate()  # the defaults pass
    with pytest.raises(ValueError, match=match):
        make(**kw).validate()


def test_topo_ref_batch_is_in_the_identity_only_where_it_moves_a_batch_weight():
    def ident(C, size=224, **kw):  # above 64 px PTA's default is the paper's fixed weight, which the scaling moves
        return DistillConfig(**kw).resolved(size).identity(C)

    assert DistillConfig(ipc=10).batch_sizes(10) == [100]  # CIFAR-10: 10 classes x 10 items
    assert DistillConfig(ipc=50).batch_sizes(1000) == [100]  # ImageNet-1K: 100 classes x 1 item
    assert DistillConfig(ipc=10).batch_sizes(150) == [50, 100]  # a last class group of 50
    assert DistillConfig(ipc=10, batch_classes=10, ipc_per_batch=4).batch_sizes(10) == [20, 40]
    assert DistillConfig(ipc=10, batch_classes=20, ipc_per_batch=10).batch_sizes(10) == [100]  # bc > C
    assert DistillConfig(ipc=3, ipc_per_batch=5).batch_sizes(10) == [30]  # ipc_per_batch > ipc
    assert "topo_ref_batch" not in ident(10, ipc=10)  # runs of 100-image batches keep their identity
    assert "topo_ref_batch" not in ident(1000, ipc=50)
    assert ident(10, ipc=10, batch_classes=10, ipc_per_batch=1)["topo_ref_batch"] == 100
    assert ident(150, ipc=10)["topo_ref_batch"] == 100
    assert "topo_ref_batch" not in ident(10, ipc=10, batch_classes=10, ipc_per_batch=1, topo_ref_batch=0)
    assert "topo_ref_batch" not in ident(10, ipc=10, batch_classes=10, ipc_per_batch=1, pta=False)
    assert "topo_ref_batch" not in ident(10, method="fadrm", ipc=10, batch_classes=10, ipc_per_batch=1)
    assert ident(10, ipc=10, topo_ref_batch=50)["topo_ref_batch"] == 50
    # under pta_balance PTA's weight comes from the gradients: the batch scaling does not act, so not in it
    assert "topo_ref_batch" not in ident(10, ipc=10, batch_classes=10, ipc_per_batch=1, pta_balance=0.1)
    assert "topo_ref_batch" not in ident(10, ipc=10, topo_ref_batch=50, pta_balance=0.1)
    # ... nor under the default up to 64 px, which balances PTA from the gradients; the paper's PTA is scaled there
    assert "topo_ref_batch" not in ident(10, size=32, ipc=10, batch_classes=10, ipc_per_batch=1)
    assert ident(10, size=32, ipc=10, batch_classes=10, ipc_per_batch=1, pta_view="augmented")["topo_ref_batch"] == 100
