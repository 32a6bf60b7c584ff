"""GPU checks (skipped without CUDA): the compiled Triton kernel and the CUDA paths against the
references. Run on a GPU machine with ``TRITON_INTERPRET=0 pytest -m gpu``."""
import os

import pytest
import torch

import reta_fast as rf
from conftest import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="GPU checks need the compiled kernels (TRITON_INTERPRET=0)"),
]


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("b,n,d,k", [(1, 1000, 512, 10), (7, 257, 64, 15), (2, 4099, 33, 1), (1, 300, 512, 56)])
def test_fused_knn_matches_reference_on_gpu(b, n, d, k, precision):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(b, n, d, generator=g)
    ours = rf.knn(x.cuda(), k, backend="triton", precision=precision).cpu()
    ref = rf.knn_ref(x, k)
    # Exact fp32 arithmetic in a different order can swap neighbours whose distances differ by a
    # rounding error: allow only those, and count them.
    if not torch.equal(ours, ref):
        xd = x.double()
        dist = lambda idx: (xd.unsqueeze(2) - torch.gather(xd, 1, idx.reshape(b, -1, 1).expand(-1, -1, d)).reshape(b, n, k, d)).norm(dim=-1)  # noqa: E731
        assert_close(dist(ours), dist(ref), atol=1e-5, rtol=1e-5, what="neighbour distances")


def test_ties_on_gpu():
    x = torch.randint(0, 3, (2, 500, 3)).float()
    assert torch.equal(rf.knn(x.cuda(), 6, backend="triton").cpu(), rf.knn_ref(x, 6))


def test_graph_pairs_and_loss_on_gpu():
    # integer points: exact fp32 distances on both devices, so graphs must agree edge for edge
    x = torch.randint(-3, 4, (4, 128, 64)).float()
    gc, gh = rf.mutual_knn_graph(x.cuda(), 10), rf.mutual_knn_graph(x, 10, backend="torch")
    assert torch.equal(gc.edges.cpu(), gh.edges) and torch.equal(gc.offsets, gh.offsets)
    dc = rf.persistence_diagrams(x.cuda().requires_grad_(), 10, essential="max")
    dh = rf.persistence_diagrams(x, 10, essential="max")
    assert_close(dc.h0, dh.h0, atol=1e-5, what="H0 on GPU")
    assert_close(dc.h1, dh.h1, atol=1e-5, what="H1 on GPU")
    syn = torch.randn(4, 64, 128, device="cuda", requires_grad=True)
    loss = rf.TopologyAlignmentLoss(k=10)(syn, torch.randn(4, 64, 128, device="cuda"))
    loss.backward()
    assert torch.isfinite(syn.grad).all()


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fused_retrieve_matches_reference_on_gpu(precision):
    g = torch.Generator().manual_seed(0)
    C, Q, P, D = 37, 11, 150, 512
    z = torch.nn.functional.normalize(torch.randn(C * P, D, generator=g), dim=1)
    q = torch.nn.functional.normalize(torch.randn(C * Q, D, generator=g), dim=1)
    c = torch.rand(C * P, generator=g)
    ql = torch.arange(C).repeat_interleave(Q)
    pl = torch.arange(C).repeat_interleave(P)[torch.randperm(C * P, generator=g)]
    got = rf.retrieve(q.cuda(), ql.cuda(), z.cuda(), pl.cuda(), c.cuda(), precision=precision, backend="triton")
    assert torch.equal(got.cpu(), rf.retrieve_ref(q, ql, z, pl, c))
    assert_close(rf.patch_complexity(z[:8].view(8, 2, 16, 16).cuda()), rf.patch_complexity(z[:8].view(8, 2, 16, 16)),
                 atol=1e-6, rtol=1e-4, what="complexity on GPU")


def _recover_on_gpu(**engine):
    import torch.nn.functional as F

    torch.manual_seed(0)
    t = rf.models.resnet18(num_classes=10, cifar_stem=True).cuda()
    t.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            t(torch.randn(32, 3, 32, 32, device="cuda") * 2 + 0.5)
    t.eval()
    real = F.normalize(torch.randn(10, 12, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(1)), dim=-1)
    crit = rf.RETALoss(t, real_feats=real, k=4, overlap=engine.pop("overlap", False),
                       topo_balance=engine.pop("topo_balance", None))
    y = torch.arange(10, device="cuda").repeat(6)
    ids = torch.arange(60, device="cuda")
    x0 = torch.rand(60, 3, 32, 32, generator=torch.Generator().manual_seed(2)).cuda()
    diagnose = engine.pop("diagnose", False)
    cfg = rf.RecoverConfig(iterations=12, resolutions=(32, 32), drc=False, lr=0.05, **engine)
    out = rf.recover(crit, x0, y, ids, config=cfg, diagnose=diagnose)
    if diagnose:
        return out, x0, [h for h in cfg.history if "ce" in h], [h["grads"] for h in cfg.history if "grads" in h]
    return out, x0, [h for h in cfg.history if "ce" in h]


def test_recover_engines_on_gpu():
    """bf16 + channels-last, torch.compile with CUDA graphs and overlapped PTA stay close to eager fp32
    (relative to how far the pixels moved), with finite loss parts and PTA active."""
    ref, x0, hist = _recover_on_gpu()
    moved = float((ref - x0).abs().mean())
    assert all(h["topo"] > 0 for h in hist)
    for engine, tol in ((dict(amp="bf16", channels_last=True), 0.15), (dict(compile="reduce-overhead"), 0.02),
                        (dict(overlap=True), 0.15),
                        (dict(amp="bf16", channels_last=True, compile="reduce-overhead", overlap=True), 0.15)):
        out, _, h = _recover_on_gpu(**engine)
        assert torch.isfinite(out).all() and all(torch.isfinite(torch.tensor([v["ce"], v["bn"], v["topo"]])).all()
                                                 for v in h)
        err = float((out - ref).abs().mean()) / moved
        assert err < tol, f"{engine}: mean |difference| {err:.3g} of the mean movement"


def test_default_pta_under_cuda_graphs_on_gpu():
    """The default PTA up to 64 px (clean view: two compiled forwards a step; balanced weight: CE's feature
    gradient from the head's weights when compiled) under CUDA graphs stays close to the eager run; so do the
    report's gradient norms (each term carried through an eager forward, no second backward through the
    CUDA-graphed one), which leave the compiled run as it was."""
    ref, x0, hist, eager_g = _recover_on_gpu(pta_view="clean", topo_balance=0.1, diagnose=True)
    moved = float((ref - x0).abs().mean())
    assert all(h["topo"] > 0 for h in hist)
    out, _, h = _recover_on_gpu(pta_view="clean", topo_balance=0.1, compile="reduce-overhead")
    assert torch.isfinite(out).all() and all(v["topo"] > 0 for v in h)
    err = float((out - ref).abs().mean()) / moved
    assert err < 0.02, f"mean |difference| {err:.3g} of the mean movement"
    diag, _, _, comp_g = _recover_on_gpu(pta_view="clean", topo_balance=0.1, compile="reduce-overhead",
                                         diagnose=True)
    err = float((diag - out).abs().mean()) / moved  # (cuDNN may add in another order from run to run)
    assert err < 0.01, f"diagnostics moved the compiled run: mean |difference| {err:.3g} of the mean movement"
    assert len(comp_g) == len(eager_g) == 2
    for a, b in zip(comp_g, eager_g):
        assert all(abs(a[k] - b[k]) <= 0.05 * abs(b[k]) for k in ("ce", "bn", "topo")), (a, b)


def test_overlapped_pta_lag_on_gpu():
    """The worker thread runs the Triton k-NN on the GPU: call t uses call t-1's pairings exactly."""
    g = torch.Generator("cuda").manual_seed(0)
    real = torch.randn(4, 32, 64, device="cuda", generator=g)
    xs = [torch.randn(4, 32, 64, device="cuda", generator=g) for _ in range(4)]
    grid = dict(h0_range=(0.0, 1.6), h1_pers_range=(0.0, 0.5), h1_birth_range=(0.0, 1.6))  # fixed: the
    # union grid would grow with every earlier call of `over` but only with x_{t-1} in `ref`
    over = rf.TopologyAlignmentLoss(k=6, overlap=True, **grid)
    got = [over(x, real) for x in xs]
    for t in range(1, 4):
        ref = rf.TopologyAlignmentLoss(k=6, refresh_every=1000, **grid)
        ref(xs[t - 1], real)
        assert_close(got[t], ref(xs[t], real), atol=1e-5, rtol=1e-4, what=f"overlapped loss at call {t}")


def test_ddp_free_pieces_on_gpu():
    """uint8 distilled sets normalised per batch on the GPU give the same batches as float ones."""
    from reta_fast.train import normalise_pixels, student_batches

    u8 = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8)
    m, s = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    a = list(student_batches(normalise_pixels(u8, m, s), 1, 4, seed=3, device="cuda"))
    b = list(student_batches(u8, 1, 4, seed=3, device="cuda", mean=m, std=s))
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("engine", [dict(topo_refresh=1), dict(topo_refresh=4), dict(overlap=True)])
def test_recover_steps_make_no_hidden_synchronisation_on_gpu(engine):
    """CUDA's own sync detector (torch.cuda.set_sync_debug_mode('error')) around steady-state RETALoss.terms
    calls: a PTA refresh waits only on its transfer's event (not flagged), everything else is asynchronous."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    t = rf.models.resnet18(num_classes=10, cifar_stem=True).cuda().eval()
    real = F.normalize(torch.randn(10, 8, 512, device="cuda"), dim=-1)
    crit = rf.RETALoss(t, real_feats=real, k=4, **engine)
    y = torch.arange(10, device="cuda").repeat(8)
    ids = torch.arange(80, device="cuda")
    x = torch.rand(80, 3, 32, 32, device="cuda")
    with torch.no_grad():
        crit.seed_bank(rf.models.teacher_features(t, x)[1], y, ids)
    micro = [torch.arange(j * 10, (j + 1) * 10, device="cuda") for j in range(8)]
    batches = [(y[m], ids[m]) for m in micro]
    xs = [x[m].clone().requires_grad_() for m in micro]
    for _ in range(2):  # layouts, real side, compilation of kernels: allowed to synchronise
        for j in range(8):
            crit.terms(xs[j], *batches[j])[0].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            for j in range(8):
                loss, parts = crit.terms(xs[j], *batches[j])
                loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert float(parts[2]) > 0
