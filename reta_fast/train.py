"""Training utilities shared by the pipeline stages: the embedded ``digits`` data set, teacher
training (squeeze), accuracy, and the student protocol of METHOD.md section 1 (evaluate)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TensorImageDataset", "digits_dataset", "train_classifier", "accuracy", "train_student"]


class TensorImageDataset:
    """Images held as a tensor ``[N, 3, H, W]`` (uint8, or float in [0, 1]) with ``targets`` and ``classes``;
    items are ``(float [3, H, W] in [0, 1], label)`` like a torchvision data set."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: Sequence[str]):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        if len(targets) != images.shape[0]:
            raise ValueError(f"{len(targets)} targets for {images.shape[0]} images")
        self.images, self.targets, self.classes = images, [int(t) for t in targets], [str(c) for c in classes]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i]
        return (x.float() / 255.0 if not x.is_floating_point() else x.float()), self.targets[i]

    def tensors(self):
        x = self.images
        return (x.float() / 255.0 if not x.is_floating_point() else x.float()), torch.tensor(self.targets)


def digits_dataset(split: str = "train", size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> TensorImageDataset:
    """scikit-learn's 1,797 8x8 digits (shipped with the package, no download) as 3-channel images
    resized to ``size``, split per class into train/test with a fixed seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):  # stratified split
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        test[idx[: int(round(test_fraction * idx.numel()))]] = True
    keep = test if split == "test" else ~test
    x = F.interpolate(x[keep], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return TensorImageDataset(x.expand(-1, 3, -1, -1).contiguous(), y[keep].tolist(), [str(c) for c in range(10)])


def _normalise(x, mean, std):
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


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


def train_classifier(model: nn.Module, dataset, epochs: int = 30, batch_size: int = 128, lr: float = 0.05,
                     weight_decay: float = 5e-4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu",
                     seed: int = 0, pad: int = 2, flip: bool = True, progress: bool = False) -> nn.Module:
    """Train a (teacher) classifier from scratch: SGD momentum 0.9 (Nesterov), one-cycle lr, crop
    (+ flip unless ``flip=False``, e.g. for digits, where a mirrored 2 is not a 2)."""
    x_all, y_all = dataset.tensors()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = epochs * math.ceil(len(y_all) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="squeeze", unit="epoch")
    for _ in it:
        perm = torch.randperm(len(y_all), generator=g)
        for b in range(0, len(perm), batch_size):
            idx = perm[b:b + batch_size]
            x = _normalise(_crop_flip(x_all[idx], pad, g, flip).to(device), mean, std)
            loss = F.cross_entropy(model(x), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, dataset, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), batch_size: int = 512,
             device="cpu") -> float:
    """Top-1 accuracy (%) of ``model`` (eval mode) on ``dataset``."""
    was = model.training
    model.eval()
    x_all, y_all = dataset.tensors()
    correct = 0
    for b in range(0, len(y_all), batch_size):
        logits = model(_normalise(x_all[b:b + batch_size].to(device), mean, std))
        correct += int((logits.argmax(1).cpu() == y_all[b:b + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / max(1, len(y_all))


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


def train_student(student: nn.Module, teacher: nn.Module, images: torch.Tensor, epochs: int = 300,
                  batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.01, temperature: float = 20.0,
                  cutmix: bool = True, crop_scale=(0.08, 1.0), flip: bool = True, device="cpu", seed: int = 0,
                  progress: bool = False) -> nn.Module:
    """The student protocol of METHOD.md section 1 with online teacher soft labels.

    ``images`` ``[N, 3, H, W]`` are normalised synthetic images. Each step: RandomResizedCrop + flip
    per image, CutMix (Beta(1, 1) box, shared partner permutation), teacher logits on the same
    augmented batch, loss ``KL(softmax(t/T) || softmax(s/T)) * T^2``; AdamW, cosine over all steps.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student.to(device).train()
    teacher.to(device).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    n = images.shape[0]
    steps = max(1, epochs * math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="evaluate", unit="epoch")
    for _ in it:
        perm = torch.randperm(n, generator=g)
        for b in range(0, n, batch_size):
            x = _rrc_flip(images[perm[b:b + batch_size]].to(device), crop_scale, g, flip)
            if cutmix and x.shape[0] > 1:
                lam = float(torch.rand((), generator=g))  # Beta(1, 1) is uniform: drawn from g
                H, W = x.shape[-2:]
                h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
                ci, cj = int(torch.randint(0, H, (), generator=g)), int(torch.randint(0, W, (), generator=g))
                i0, i1, j0, j1 = max(0, ci - h // 2), min(H, ci + h // 2), max(0, cj - w // 2), min(W, cj + w // 2)
                partner = torch.randperm(x.shape[0], generator=g).to(device)
                x = x.clone()
                x[..., i0:i1, j0:j1] = x[partner][..., i0:i1, j0:j1]
            with torch.no_grad():
                soft = F.softmax(teacher(x).float() / temperature, dim=1)
            logp = F.log_softmax(student(x).float() / temperature, dim=1)
            loss = F.kl_div(logp, soft, reduction="batchmean") * temperature**2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return student.eval()
