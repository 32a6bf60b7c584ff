"""Training utilities shared by the pipeline stages: the embedded ``digits`` data set, teacher
training (squeeze), accuracy, and the student protocol of docs/method.md §5 (evaluate)."""
from __future__ import annotations

import gc
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tensors import normalise_pixels
from .classifier import dist_world

__all__ = ["student_batches", "relabel_batches", "relabel", "train_student"]


def _rrc_flip(x: torch.Tensor, scale, g: torch.Generator, flip: bool) -> torch.Tensor:
    """Per-image RandomResizedCrop (area ``scale``, aspect 3/4-4/3) + horizontal flip, back to the
    input size, as one batched ``affine_grid`` + ``grid_sample`` (bilinear)."""
    N, _, H, W = x.shape
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(N, generator=g)
    logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(N, generator=g)
    ratio = torch.exp(logr)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the side
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * torch.rand(N, generator=g) + w / 2  # box centre in [0, 1]
    cy = (1 - h) * torch.rand(N, generator=g) + h / 2
    sign = torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(N)
    theta = torch.zeros(N, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def student_batches(images: torch.Tensor, epochs: int, batch_size: int, crop_scale=(0.08, 1.0), flip: bool = True,
                    cutmix: bool = True, seed: int = 0, device="cpu", mean=None, std=None) -> Iterator[torch.Tensor]:
    """The augmented batches of the student protocol (docs/method.md §1), one per step, as a
    deterministic function of ``seed``: shuffled each epoch, per-image RandomResizedCrop + flip,
    CutMix (Beta(1, 1) box, partner permutation). Relabelling (stored soft labels) and evaluation
    replay the same stream, so stored and online teacher labels agree step by step.

    ``images``: normalised floats, or uint8 pixels with their ``mean``/``std`` (normalised batch by
    batch, the same values as normalising the whole set first, at a quarter of the memory)."""
    raw = not images.is_floating_point()
    if raw and (mean is None or std is None):
        raise ValueError("uint8 images need the mean and std to normalise them with")
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(0, n, batch_size):
            xb = images[perm[b:b + batch_size]]
            x = _rrc_flip((normalise_pixels(xb, mean, std) if raw else xb).to(device), crop_scale, g, flip)
            if cutmix and x.shape[0] > 1:
                lam = float(torch.rand((), generator=g))  # Beta(1, 1) is uniform: drawn from g
                H, W = x.shape[-2:]
                h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
                ci, cj = int(torch.randint(0, H, (), generator=g)), int(torch.randint(0, W, (), generator=g))
                i0, i1, j0, j1 = max(0, ci - h // 2), min(H, ci + h // 2), max(0, cj - w // 2), min(W, cj + w // 2)
                partner = torch.randperm(x.shape[0], generator=g).to(device)
                x = x.clone()
                x[..., i0:i1, j0:j1] = x[partner][..., i0:i1, j0:j1]
            yield x


def relabel_batches(teacher: nn.Module, images: torch.Tensor, epochs: int = 300, batch_size: int = 64,
                    crop_scale=(0.08, 1.0), flip: bool = True, cutmix: bool = True, seed: int = 0, device="cpu",
                    progress: bool = False, mean=None, std=None) -> Iterator[torch.Tensor]:
    """FKD-style soft labels, one batch at a time: the teacher's logits (fp16, on the CPU) for every
    augmented batch the student protocol will draw with this ``seed``, in stream order. Stream them
    to disk with :func:`reta_fast.labels.write_logits`; :func:`relabel` collects them in memory."""
    teacher.to(device).eval()
    stream = student_batches(images, epochs, batch_size, crop_scale, flip, cutmix, seed, device, mean, std)
    if progress:
        from tqdm.auto import tqdm

        stream = tqdm(stream, desc="relabel", unit="step", total=epochs * math.ceil(images.shape[0] / batch_size))
    for x in stream:
        with torch.no_grad():  # not around the yield: grad mode would leak into the caller
            logits = teacher(x).half().cpu()
        yield logits


def relabel(teacher: nn.Module, images: torch.Tensor, epochs: int = 300, batch_size: int = 64,
            crop_scale=(0.08, 1.0), flip: bool = True, cutmix: bool = True, seed: int = 0, device="cpu",
            progress: bool = False, mean=None, std=None) -> torch.Tensor:
    """All of :func:`relabel_batches` in memory: ``[epochs * N, K]`` fp16 in stream order. Pass them
    to :func:`train_student` (``soft_labels=``) with the same arguments."""
    return torch.cat(list(relabel_batches(teacher, images, epochs, batch_size, crop_scale, flip, cutmix, seed,
                                          device, progress, mean, std)))


def train_student(student: nn.Module, teacher: Optional[nn.Module], images: torch.Tensor, epochs: int = 300,
                  batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.01, temperature: float = 20.0,
                  cutmix: bool = True, crop_scale=(0.08, 1.0), flip: bool = True, device="cpu", seed: int = 0,
                  progress: bool = False, soft_labels=None, distributed: Optional[bool] = None, mean=None,
                  std=None) -> nn.Module:
    """The student protocol of docs/method.md §5.

    ``images`` ``[N, 3, H, W]`` are normalised synthetic images, or uint8 pixels with ``mean``/``std``. Each step (:func:`student_batches`):
    RandomResizedCrop + flip per image, CutMix; soft labels = the teacher's logits on the same
    augmented batch (online), or the stored ``soft_labels`` from :func:`relabel` (a tensor) or
    :class:`reta_fast.labels.StoredLogits` (read from disk row range by row range) with the same seed
    and arguments; loss ``KL(softmax(t/T) || softmax(s/T)) * T^2``; AdamW, cosine over all steps.

    Data-parallel in a process group (torchrun; ``distributed=None`` detects it): every rank draws
    the same augmented batch, takes its contiguous share and trains the same student under
    ``DistributedDataParallel``; the loss is scaled so that the averaged gradient is the whole
    batch's (a batch smaller than the world is computed whole on every rank). On CUDA the student's
    BatchNorm layers become ``SyncBatchNorm`` (statistics over the whole batch, as on one device);
    on the CPU (gloo) each rank normalises with its own share's statistics. Returns the trained
    student, which may be a new module (SyncBatchNorm conversion): use the return value.
    """
    if (teacher is None) == (soft_labels is None):
        raise ValueError("pass exactly one of teacher (online soft labels) or soft_labels (stored)")
    rank, world = dist_world(distributed)
    torch.manual_seed(seed)
    student.to(device).train()
    model = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        dev = torch.device(device)
        if dev.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student).to(dev)
        model = DistributedDataParallel(student, device_ids=[dev] if dev.type == "cuda" else None)
    if teacher is not None:
        teacher.to(device).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    n = images.shape[0]
    steps = max(1, epochs * math.ceil(n / batch_size))
    expected_rows = epochs * n
    if soft_labels is not None and soft_labels.shape[0] != expected_rows:
        raise ValueError(f"soft_labels has {soft_labels.shape[0]} rows; {epochs} epochs over {n} images need "
                         f"{expected_rows}: relabel with the same images, epochs and batch size")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    stream = student_batches(images, epochs, batch_size, crop_scale, flip, cutmix, seed, device, mean, std)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        stream = tqdm(stream, desc="evaluate", unit="step", total=steps)
    row = 0
    for x in stream:
        n = x.shape[0]
        share = world > 1 and n >= world
        a, b = (rank * n // world, (rank + 1) * n // world) if share else (0, n)  # this rank's rows of the batch
        xs = x[a:b]
        if soft_labels is None:
            with torch.no_grad():
                t = teacher(xs).float()
        else:
            t = soft_labels[row + a:row + b].to(device).float()
        row += n
        soft = F.softmax(t / temperature, dim=1)
        logp = F.log_softmax(model(xs).float() / temperature, dim=1)
        if share:  # DDP averages the ranks' gradients: sum over this share * world / n = the batch mean
            loss = F.kl_div(logp, soft, reduction="sum") * (world / n * temperature**2)
        else:
            loss = F.kl_div(logp, soft, reduction="batchmean") * temperature**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if model is not student:  # free DDP's reducer now: collected after the process group is gone, it aborts
        del model
        gc.collect()
        import torch.distributed as dist

        with torch.no_grad():  # DDP syncs buffers before each forward only: the last step's BN statistics
            for buf in student.buffers():  # differ per rank (CPU: per-share batches); take rank 0's
                dist.broadcast(buf, 0)
    return student.eval()
