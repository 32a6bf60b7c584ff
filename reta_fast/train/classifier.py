"""Classifier training (the squeeze stage's teacher) and top-1 accuracy, in memory or streamed, on one
device or data-parallel under torchrun."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.sets import Subset, batches_per_epoch, iterate_batches
from ..data.tensors import TensorImageDataset, normalise

__all__ = ["train_classifier", "accuracy", "dist_world"]


def dist_world(distributed: Optional[bool] = None):
    """``(rank, world size)`` of the default process group (torchrun), ``(0, 1)`` without one.
    ``distributed=False`` forces ``(0, 1)``; ``True`` requires an initialised group."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    if distributed and not on:
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group (torchrun)")
    if distributed is False or not on:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _crop_flip(x: torch.Tensor, pad: int, g: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Per-image random crop with zero padding + optional horizontal flip (CIFAR-style), batched."""
    N, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    i = torch.randint(0, 2 * pad + 1, (N,), generator=g)
    j = torch.randint(0, 2 * pad + 1, (N,), generator=g)
    rows = (i[:, None] + torch.arange(H)[None, :]).to(x.device)
    cols = (j[:, None] + torch.arange(W)[None, :]).to(x.device)
    out = xp[torch.arange(N, device=x.device)[:, None, None, None], torch.arange(C, device=x.device)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]
    if not flip:
        return out
    flips = (torch.rand(N, generator=g) < 0.5).to(x.device)
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


def _image_size(dataset, size):
    if size is not None:
        return int(size)
    if isinstance(dataset, TensorImageDataset):
        return int(dataset.images.shape[-1])
    raise ValueError("size is required for a data set that is not held in memory")


def train_classifier(model: nn.Module, dataset, epochs: int = 30, batch_size: int = 128, lr: float = 0.05,
                     weight_decay: float = 5e-4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu",
                     seed: int = 0, pad: int = 2, flip: bool = True, progress: bool = False,
                     size: Optional[int] = None, workers: int = 0) -> nn.Module:
    """Train a (teacher) classifier from scratch: SGD momentum 0.9 (Nesterov), one-cycle lr, crop
    (+ flip unless ``flip=False``, e.g. for digits, where a mirrored 2 is not a 2).

    ``dataset``: a :class:`TensorImageDataset` (sliced in memory) or any data set of ``(image,
    label)`` items, streamed at ``size`` px through a DataLoader with ``workers`` processes.
    """
    size = _image_size(dataset, size)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = epochs * batches_per_epoch(dataset, batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="squeeze", unit="epoch")
    done = 0
    for _ in it:
        for xb, yb in iterate_batches(dataset, batch_size, size, shuffle=True, generator=g, workers=workers):
            x = normalise(_crop_flip(xb.to(device), pad, g, flip), mean, std)
            loss = F.cross_entropy(model(x), yb.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"teacher training diverged (loss {float(loss)}): lower lr={lr}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if done < steps:
                sched.step()
            done += 1
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, dataset, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size: int = 512,
             device="cpu", size: Optional[int] = None, workers: int = 0,
             distributed: Optional[bool] = None) -> float:
    """Top-1 accuracy (%) of ``model`` (eval mode) on ``dataset`` (in memory or streamed at ``size``).

    In a process group (torchrun; ``distributed=None`` detects it) each rank scores every
    ``world``-th image and the counts are summed: every rank returns the accuracy on the whole set."""
    size = _image_size(dataset, size)
    rank, world = dist_world(distributed)
    if world > 1:
        if isinstance(dataset, TensorImageDataset):
            dataset = TensorImageDataset(dataset.images[rank::world], dataset.targets[rank::world], dataset.classes)
        else:
            dataset = Subset(dataset, range(rank, len(dataset), world))
    was = model.training
    model.eval()
    correct = total = 0
    for xb, yb in iterate_batches(dataset, batch_size, size, workers=workers):
        logits = model(normalise(xb.to(device), mean, std))
        correct += int((logits.argmax(1).cpu() == yb).sum())
        total += yb.numel()
    model.train(was)
    if world > 1:
        import torch.distributed as dist

        counts = torch.tensor([correct, total], dtype=torch.float64,
                              device=device if torch.device(device).type == "cuda" else "cpu")
        dist.all_reduce(counts)
        correct, total = (int(v) for v in counts.tolist())
    if total == 0:
        raise ValueError("accuracy needs at least one image: the evaluation set is empty")
    return 100.0 * correct / total
