"""Train a small zoo model on the procedurally drawn shapes: a real classifier to quantize.

A random-init model's accuracy means nothing, and there are no ImageNet weights here, so tests
and demos train SHViT-S1 (10 classes, 64 px by default) on :mod:`.shapes` for a minute or two on
two CPU cores, through exactly the preprocessing that evaluation uses, and save the checkpoint
in our layout (``{'model': state_dict}``), which ``--weights`` loads like any other.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EdgeExportError
from ..progress import Callback, emit
from ..registry import create_model, get_model_info, parse_resolution
from .data import Preprocess
from .shapes import domain_module

# Seeds of the three disjoint draws; a held-out test set uses TEST_SEED (or any other seed).
TRAIN_SEED, VAL_SEED, TEST_SEED = 1, 2, 3


@dataclass
class TrainResult:
    checkpoint: Path
    model: str
    res: int
    classes: list[str]
    train_images: int
    val_images: int
    epochs: int
    steps: int
    train_top1: float           # percent, last epoch, on augmented batches in train mode
    val_top1: float             # percent, held-out draw, eval mode
    seconds: float
    threads: int
    history: list[dict] = field(default_factory=list)


def draw_size(res: int, crop_pct: float = 0.875) -> int:
    """The side to draw images at so that preprocessing crops exactly ``res`` from them."""
    return round(res / crop_pct)


def shapes_tensor(per_class: int, res: int, seed: int, mean, std,
                  domain: str = "shapes") -> tuple[torch.Tensor, torch.Tensor]:
    """Drawn images (of ``domain``, see :data:`.shapes.DOMAINS`) through the model's preprocessing
    → (N, 3, res, res) float, (N,) labels."""
    mod = domain_module(domain)
    pre = Preprocess((res, res), tuple(mean), tuple(std))
    side = draw_size(res)
    xs, ys = [], []
    for k, cls in enumerate(mod.CLASSES):
        for i in range(per_class):
            xs.append(pre.image(mod.draw(cls, side, seed, i)))
            ys.append(k)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)


def default_threads() -> int:
    """Two threads on an idle two-core box; one when the machine is already busy, where OpenMP
    barriers between two threads stall far more than one thread loses (measured: ~5×)."""
    n = min(2, os.cpu_count() or 1)
    try:
        if os.getloadavg()[0] > (os.cpu_count() or 1):
            return 1
    except OSError:
        pass
    return n


@torch.no_grad()
def _accuracy(model, x, y, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / max(1, len(x))


def train_shapes(checkpoint: str | Path, *, model: str = "shvit_s1", res: int = 64, per_class: int = 200,
                 val_per_class: int = 40, epochs: int = 10, batch: int = 128, lr: float = 8e-3,
                 weight_decay: float = 0.05, seed: int = 0, threads: int | None = None,
                 domain: str = "shapes", progress: Callback | None = None) -> TrainResult:
    """Train ``model`` with a 10-class head on drawn shapes; save ``{'model': state_dict}``.

    ``domain`` picks the drawn set (:data:`.shapes.DOMAINS`: ``"shapes"`` or ``"textures"``).
    ``progress`` hears of the data drawing and of every training step.
    """
    try:
        classes = domain_module(domain).CLASSES
    except ValueError as e:
        raise EdgeExportError(str(e)) from None
    info = get_model_info(model)
    hw = parse_resolution(res, info)
    if hw[0] != hw[1]:
        raise EdgeExportError("train a square resolution, e.g. --res 64")
    if per_class < 1 or epochs < 1 or batch < 1:
        raise EdgeExportError("--per-class, --epochs and --batch must be at least 1")
    from ..memory import check_fits

    check_fits(model, info, hw, min(batch, per_class * len(classes)), "train",
               per_pixel=3 * 4 * (per_class + val_per_class) * len(classes))   # the drawn sets, float32
    checkpoint = Path(checkpoint).expanduser()
    if checkpoint.parent and not checkpoint.parent.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    threads = threads or default_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        emit(progress, "draw training shapes", 0, 1)
        x, y = shapes_tensor(per_class, res, TRAIN_SEED + 10 * seed, info.mean, info.std, domain)
        xv, yv = shapes_tensor(val_per_class, res, VAL_SEED + 10 * seed, info.mean, info.std, domain)
        emit(progress, "draw training shapes", 1, 1)

        net = create_model(model, num_classes=len(classes), seed=seed).train()
        decay = [p for n, p in net.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        g = torch.Generator().manual_seed(seed)
        steps_per_epoch = math.ceil(len(x) / batch)
        total = steps_per_epoch * epochs
        warmup = max(1, steps_per_epoch // 2)

        def lr_at(step: int) -> float:
            if step < warmup:
                return lr * (step + 1) / warmup
            t = (step - warmup) / max(1, total - warmup)
            return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

        history = []
        step = 0
        train_top1 = 0.0
        for epoch in range(epochs):
            net.train()
            perm = torch.randperm(len(x), generator=g)
            correct = seen = 0
            for i in range(0, len(x), batch):
                idx = perm[i:i + batch]
                if len(idx) < 2:   # BatchNorm needs two samples
                    continue
                xb, yb = x[idx], y[idx]
                flip = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
                flip = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(2), xb)
                for grp in opt.param_groups:
                    grp["lr"] = lr_at(step)
                out = net(xb)
                loss = F.cross_entropy(out, yb, label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct += int((out.argmax(1) == yb).sum())
                seen += len(idx)
                step += 1
                emit(progress, "train", step, total)
            train_top1 = 100.0 * correct / max(1, seen)
            history.append({"epoch": epoch + 1, "train_top1": round(train_top1, 2),
                            "loss": round(float(loss.detach()), 4)})
        val_top1 = _accuracy(net, xv, yv)
        history[-1]["val_top1"] = round(val_top1, 2)
        net.eval()
        tmp = checkpoint.with_name(f".{checkpoint.name}.tmp{os.getpid()}")
        torch.save({"model": net.state_dict(), "classes": list(classes)}, tmp)
        os.replace(tmp, checkpoint)
    finally:
        torch.set_num_threads(old_threads)
    return TrainResult(checkpoint, model, res, list(classes), len(x), len(xv), epochs, step, train_top1,
                       val_top1, time.perf_counter() - t0, threads, history)
