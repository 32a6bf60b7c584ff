"""What the pipeline reads off a teacher network: its penultimate features (the input of its classifier
head) and a fingerprint of its weights."""
from __future__ import annotations

import hashlib
from typing import Optional, Union

import torch

__all__ = ["feature_head", "named_feature_head", "set_feature_head", "teacher_features", "teacher_fingerprint"]

# the attribute a teacher carries when set_feature_head named its classifier (the module's name, a str, so that
# it is neither a parameter nor a submodule and survives copy.deepcopy)
_HEAD_ATTR = "_reta_feature_head"


def _unwrapped(teacher: torch.nn.Module) -> torch.nn.Module:
    """The network inside a ``torch.compile`` wrapper (whose module names gain an ``_orig_mod.`` prefix)."""
    return getattr(teacher, "_orig_mod", teacher)


def set_feature_head(teacher: torch.nn.Module, head: Union[str, torch.nn.Linear]) -> torch.nn.Module:
    """Name the teacher's classifier head: the ``nn.Linear`` whose output are the logits and whose input are
    the penultimate features everything in reta_fast reads (the pool's and DRC's retrieval features, PTA's
    points, CE's gradient on them under ``topo_balance``). ``head``: the layer itself or its name in
    ``teacher.named_modules()``. Without it the head is the teacher's last ``nn.Linear`` in
    ``teacher.modules()`` order, which is right for torchvision and timm classifiers; a network that
    registers its classifier before other ``nn.Linear`` layers (say, an MLP block defined after the head)
    needs this. Call it before building a pool or a :class:`reta_fast.RETALoss` with the teacher; the name
    enters the pool's fingerprint (:func:`teacher_fingerprint` with ``features=True``), so a pool built with
    another head is refused. It lives on the module (copies and ``torch.save`` of the module keep it;
    :func:`reta_fast.models.save_teacher` records it in the checkpoint, :func:`reta_fast.models.load_teacher`
    names it again; ``--teacher-head`` on the command line). Returns ``teacher``."""
    wrapper, teacher = teacher, _unwrapped(teacher)
    by_name = dict(teacher.named_modules())
    names = {m: n for n, m in by_name.items()}
    if isinstance(head, str):
        mod = by_name.get(head)
        if mod is None:
            raise ValueError(f"the teacher has no module named {head!r}")
        name = head
    elif isinstance(head, torch.nn.Module):
        if head not in names:
            raise ValueError(f"{type(head).__name__} is not a module of the teacher")
        mod, name = head, names[head]
    else:
        raise ValueError(f"head must be an nn.Linear of the teacher or its name, got {head!r}")
    if not isinstance(mod, torch.nn.Linear):
        raise ValueError(f"the head must be an nn.Linear (its input: the penultimate features [N, D]), but "
                         f"{name or 'the teacher itself'!r} is a {type(mod).__name__}")
    object.__setattr__(teacher, _HEAD_ATTR, name)
    return wrapper


def feature_head(teacher: torch.nn.Module) -> torch.nn.Linear:
    """The teacher's classifier head: the layer :func:`set_feature_head` named, else its last ``nn.Linear``."""
    teacher = _unwrapped(teacher)
    name = getattr(teacher, _HEAD_ATTR, None)
    if name is not None:
        mod = dict(teacher.named_modules()).get(name)
        if not isinstance(mod, torch.nn.Linear):
            raise ValueError(f"the teacher's named head {name!r} is no longer an nn.Linear of it")
        return mod
    linears = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the teacher has no nn.Linear head: cannot find its penultimate features "
                         "(reta_fast.models.set_feature_head names the classifier layer)")
    return linears[-1]


def named_feature_head(teacher: torch.nn.Module) -> Optional[str]:
    """The name :func:`set_feature_head` gave the teacher's head where it is not the default (the last
    ``nn.Linear``), else None: what a checkpoint or a run's manifest must record to give the same features."""
    teacher = _unwrapped(teacher)
    name = getattr(teacher, _HEAD_ATTR, None)
    if name is None:
        return None
    linears = [n for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear)]
    return None if linears and name == linears[-1] else name


def check_head_output(teacher: torch.nn.Module, head_out, logits) -> None:
    """Refuse, naming the fix, a head whose output is not shaped as the teacher's logits ``[N, K]``: its input
    would not be the penultimate features (a last ``nn.Linear`` that is not the classifier)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"the teacher must return logits [N, K], got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if head_out is None or tuple(head_out.shape) != tuple(logits.shape):
        teacher = _unwrapped(teacher)
        names = {m: n for n, m in teacher.named_modules()}
        head = feature_head(teacher)
        got = "did not run" if head_out is None else f"outputs {tuple(head_out.shape)}"
        raise ValueError(f"the teacher's head {names.get(head, '?')!r} (its "
                         f"{'named head' if getattr(teacher, _HEAD_ATTR, None) is not None else 'last nn.Linear'}) "
                         f"{got}, not the logits {tuple(logits.shape)}: its input is not the penultimate features; "
                         f"name the classifier layer with reta_fast.models.set_feature_head(teacher, name)")


def teacher_fingerprint(teacher: torch.nn.Module, features: bool = False) -> str:
    """sha256 over the teacher's parameter and buffer names, shapes and values (hex, 16 chars): which network
    it is (the run record, stored soft labels). ``features=True``: which features it gives, i.e. with the head
    :func:`set_feature_head` named where it is not the default (the last ``nn.Linear``): what a patch pool is
    built for."""
    teacher = _unwrapped(teacher)
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.detach().float().cpu().numpy().tobytes())
    head = named_feature_head(teacher) if features else None
    if head is not None:  # naming the default changes nothing
        h.update(f"feature head {head}".encode())
    return h.hexdigest()[:16]


def teacher_features(teacher: torch.nn.Module, x: torch.Tensor):
    """``(logits [N, K], penultimate features [N, D])`` in one forward pass.

    The features are the input of the teacher's classifier head (:func:`feature_head`: its last
    ``nn.Linear`` unless :func:`set_feature_head` named another; the global-average-pooled features of
    torchvision/timm-style classifiers), captured with a forward hook. A head whose output is not the
    logits' shape is refused.
    """
    head = feature_head(teacher)
    store = {}

    def hook(m, inp, out):
        store["f"], store["out"] = inp[0], out

    handle = head.register_forward_hook(hook)
    try:
        logits = teacher(x)
    finally:
        handle.remove()
    check_head_output(teacher, store.get("out"), logits)
    return logits, store["f"].flatten(1)
