"""What the pipeline reads off a teacher network: its penultimate features and a fingerprint of its weights."""
from __future__ import annotations

import hashlib

import torch

__all__ = ["teacher_features", "teacher_fingerprint"]


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 over the teacher's parameter and buffer names, shapes and values (hex, 16 chars)."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_features(teacher: torch.nn.Module, x: torch.Tensor):
    """``(logits [N, K], penultimate features [N, D])`` in one forward pass.

    The features are the input of the teacher's last ``nn.Linear`` (the global-average-pooled
    features of torchvision/timm-style classifiers), captured with a forward hook.
    """
    linears = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the teacher has no nn.Linear head: cannot find its penultimate features")
    store = {}
    handle = linears[-1].register_forward_hook(lambda m, inp, out: store.__setitem__("f", inp[0]))
    try:
        logits = teacher(x)
    finally:
        handle.remove()
    feats = store["f"].flatten(1)
    return logits, feats
