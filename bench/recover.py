"""One recover step (docs/method.md §2): reta_fast's RETALoss step (CE + BN + PTA, frozen teacher)
(the paper's PTA: the augmented view at the fixed weight, ``--pta-view augmented``) against the same step with
PTA on the clean view (``--pta-view clean``), the default up to 64 px (the clean view with PTA's weight from
the gradients, ``--pta-balance 0.1``), the step without PTA and a plain
eager SRe2L-style step (CE + BN, teacher parameters still requiring grad, as much published code leaves
them). Same teacher, batch and augmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from run import Case, Op

import reta_fast as rf
from reta_fast.recover import augment


def setup(cfg: dict, device: str) -> Case:
    C, res, n = cfg["classes"], cfg["res"], cfg["points"]
    torch.manual_seed(0)
    teacher = rf.models.resnet18(num_classes=C, cifar_stem=res <= 64).to(device).eval()
    real = F.normalize(torch.randn(C, n, 512), dim=-1).to(device)
    y = torch.arange(C, device=device)
    g = torch.Generator().manual_seed(0)

    def make_step(crit, ids=None, amp=None, channels_last=False, clean_view=False):
        x = torch.randn(C, 3, res, res, device=device, requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.25, betas=(0.5, 0.9))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        # RETALoss.terms: no host sync per step (recover() reads the loss parts once per block)
        loss_fn = getattr(crit, "terms", crit)

        def step():
            opt.zero_grad(set_to_none=True)
            xa = augment(x, res, 4, (0.08, 1.0), g).contiguous(memory_format=fmt)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                if clean_view:  # --pta-view clean: PTA's features from the images as they are
                    loss, _ = loss_fn(xa, y, ids, x_topo=x.contiguous(memory_format=fmt))
                else:
                    loss, _ = loss_fn(xa, y, ids) if ids is not None else loss_fn(xa, y)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(-3.0, 3.0)
        return step

    def engine_teacher(channels_last):
        t = rf.models.resnet18(num_classes=C, cifar_stem=res <= 64).to(device).eval()
        t.load_state_dict(teacher.state_dict())
        return t.to(memory_format=torch.channels_last) if channels_last else t

    def filled(crit):
        with torch.no_grad():  # register n distinct images per class in the PTA bank (the step's are among them)
            feats = torch.cat([rf.models.teacher_features(crit.teacher, torch.randn(
                C, 3, res, res, device=device))[1].float() for _ in range(n)])  # row b * C + c: image (c, b)
            crit.seed_bank(feats, y.repeat(n), y.repeat(n) * n + torch.arange(n, device=device).repeat_interleave(C))
        return crit

    reta = filled(rf.RETALoss(teacher, real_feats=real, k=cfg["k"]))
    reta_clean = filled(rf.RETALoss(teacher, real_feats=real, k=cfg["k"]))
    reta_small = filled(rf.RETALoss(teacher, real_feats=real, k=cfg["k"], topo_balance=0.1))
    plain = rf.RETALoss(teacher, lam_topo=0.0)
    variants = {}  # the recover engine's options (RecoverConfig amp / channels_last / compile)
    for name, amp, cl, mode, overlap in cfg.get("engine", []):
        crit = filled(rf.RETALoss(engine_teacher(cl), real_feats=real, k=cfg["k"], overlap=overlap))
        if mode is not None:
            crit.compile_teacher(mode)
        variants[f"reta_fast RETA step, {name}"] = make_step(crit, y * n, amp=amp, channels_last=cl)
    if cfg.get("engine"):  # the same engine without DRC+PTA: what RETA's overhead is measured against
        name, amp, cl, mode, _ = cfg["engine"][-1]
        crit = rf.RETALoss(engine_teacher(cl), lam_topo=0.0)
        if mode is not None:
            crit.compile_teacher(mode)
        variants[f"reta_fast step without PTA, {name}"] = make_step(crit, amp=amp, channels_last=cl)

    eager_teacher = rf.models.resnet18(num_classes=C, cifar_stem=res <= 64).to(device).eval()
    eager_teacher.load_state_dict(teacher.state_dict())  # weights requiring grad, as in published code
    stats = []
    for m in eager_teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, inp, out: stats.append(
                torch.norm(inp[0].mean((0, 2, 3)) - mod.running_mean, 2)
                + torch.norm(inp[0].var((0, 2, 3), unbiased=False) - mod.running_var, 2)))

    def sre2l(x_aug, yy):
        stats.clear()
        return F.cross_entropy(eager_teacher(x_aug), yy) + 0.01 * sum(stats), {}

    return Case({
        "reta_fast RETA step (CE+BN+PTA; the paper's PTA, --pta-view augmented)": make_step(reta, y * n),
        "reta_fast RETA step, PTA on the clean view at the fixed weight (--pta-view clean: a second teacher forward)":
            make_step(reta_clean, y * n, clean_view=True),
        "reta_fast RETA step, default PTA up to 64 px (clean view, --pta-balance 0.1)":
            make_step(reta_small, y * n, clean_view=True),
        "reta_fast step without PTA (CE+BN)": make_step(plain),
        **variants,
        "eager SRe2L-style step (CE+BN, teacher grads)": make_step(sre2l),
    }, unit="images/s", work=C, note=f"PTA on {n} points per class, k={cfg['k']}")


# (label, amp, channels_last, torch.compile mode, PTA pairings overlapped with the step); the last one
# also runs without PTA, the denominator of RETA's overhead
CPU_ENGINE = [("overlapped PTA", None, False, None, True), ("channels-last", None, True, None, False),
              ("bf16 autocast", "bf16", False, None, False), ("compiled", None, False, "default", False)]
GPU_ENGINE = [("overlapped PTA", None, False, None, True), ("channels-last + bf16", "bf16", True, None, False),
              ("compiled", None, False, "default", False),
              ("bf16 + channels-last + CUDA graphs (compile reduce-overhead) + overlapped PTA", "bf16", True,
               "reduce-overhead", True)]
OPS = {"recover_step": Op(setup, sweep=[dict(classes=100, res=32, points=16, k=10, engine=CPU_ENGINE)],
                          quick=[dict(classes=10, res=32, points=12, k=10)],
                          gpu_sweep=[dict(classes=100, res=32, points=16, k=10, engine=GPU_ENGINE),
                                     dict(classes=100, res=224, points=16, k=10, engine=GPU_ENGINE)])}
