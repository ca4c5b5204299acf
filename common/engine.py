"""The hand-written step loop: one ``train_one_epoch``, one ``evaluate``.

Features are switches on one code path, never copies of it: autocast and the GradScaler take
``enabled=``; the model may be plain, channels_last, compiled or DDP-wrapped. Metrics accumulate on
the device and are read (one host sync) only at log points.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from common.config import UserError

SYNC_EVERY = 50  # steps between host syncs (non-finite check, progress-bar loss)
TEST_PRECISION = "fp32"  # recorded beside test_acc in summary.json


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class BatchSizeOOMError(UserError):
    """CUDA ran out of memory for the requested batch size."""


@dataclass
class StepContext:
    """What the step needs besides model and data: device, precision and the update rule."""
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    scaler: torch.amp.GradScaler
    grad_clip: float = 0.0
    # MixUp/CutMix: (images, labels) -> (mixed images, soft targets [B, classes]); None: off.
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    update_ema: Callable[[], None] | None = None  # after every optimizer step; None: no weight average

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def _progress(iterable: Iterable, total: int, desc: str) -> tqdm:
    """A progress bar only when a person is watching (stderr is a terminal)."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def _zeros(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On-device sums of loss, correct predictions and samples (read once, by ``_totals``)."""
    return (torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device, dtype=torch.int64),
            torch.zeros((), device=device, dtype=torch.int64))


def _totals(loss_sum: torch.Tensor, correct: torch.Tensor, seen: torch.Tensor) -> tuple[float, float, int]:
    """Mean loss, accuracy and sample count over every rank: one host sync."""
    totals = torch.stack([loss_sum, correct.double(), seen.double()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    return loss_sum / max(seen, 1), correct / max(seen, 1), int(seen)


def _check_finite(first_bad_step: torch.Tensor, epoch: int) -> None:
    """Raise on every rank alike: a rank that stopped alone would leave the others waiting in DDP's
    next all-reduce until the collective timeout."""
    none = torch.iinfo(torch.int64).max
    first = torch.where(first_bad_step < 0, none, first_bad_step)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(first, op=dist.ReduceOp.MIN)  # the earliest bad step of any rank
    bad = int(first.item())
    if bad != none:
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {bad + 1}: training stopped; the last good "
            "checkpoint is kept. Try a lower --learning_rate, --grad_clip 1.0, or --precision fp32")


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int, epoch: int):
    """A CUDA out-of-memory error becomes one line naming a batch size that may fit."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        raise BatchSizeOOMError(f"CUDA ran out of memory at batch size {batch_size} (epoch {epoch}); "
                                f"try --batch_size {max(1, batch_size // 2)}") from error


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler,
                    loss_fn: Callable, ctx: StepContext, epoch: int) -> dict[str, float]:
    """One pass over ``loader``; returns ``train_loss``, ``train_acc`` and throughput figures."""
    model.train()
    device = ctx.device
    loss_sum, correct, seen = _zeros(device)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = _progress(loader, len(loader), f"epoch {epoch}")
    start = time.perf_counter()
    for step, (images, labels) in enumerate(bar):
        targets = labels
        if ctx.mix is not None:  # train_acc then counts the dominant label of each mixed image
            images, targets = ctx.mix(images, labels)
            labels = targets.argmax(dim=1)
        with ctx.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        ctx.scaler.scale(loss).backward()
        if ctx.grad_clip > 0:
            ctx.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip)
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ctx.update_ema is not None:
            ctx.update_ema()

        detached = loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(detached), step, first_bad)
        loss_sum += detached.double() * labels.numel()
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += labels.numel()
        if (step + 1) % SYNC_EVERY == 0:
            _check_finite(first_bad, epoch)
            if not bar.disable:  # the loss read costs a host sync
                bar.set_postfix(loss=f"{(loss_sum / seen).item():.4f}")
    _check_finite(first_bad, epoch)
    loss, accuracy, seen = _totals(loss_sum, correct, seen)  # the sync that ends the epoch's timing
    elapsed = time.perf_counter() - start
    return {"train_loss": loss, "train_acc": accuracy, "train_time_s": elapsed,
            "images_per_s": seen / elapsed if elapsed > 0 else 0.0}


def predict(model: nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """fp32 logits; with ``tta``, the log of the mean softmax of each image and its mirror image: its
    softmax is that mean, so loss, accuracy and probabilities all follow the average."""
    logits = model(images).float()
    if tta:
        mirrored = model(images.flip(3)).float()
        logits = torch.logaddexp(logits.log_softmax(dim=1), mirrored.log_softmax(dim=1)) - math.log(2)
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: StepContext, prefix: str = "val",
             return_predictions: bool = False, tta: bool = False) -> dict:
    """Loss and accuracy over every sample once; padding labels (-1) are ignored. ``tta``: see ``predict``."""
    model.eval()
    loss_sum, correct, seen = _zeros(ctx.device)
    predictions, targets, probabilities = [], [], []
    for images, labels in _progress(loader, len(loader), prefix):
        with ctx.autocast():
            logits = predict(model, images, tta)
        valid = labels >= 0
        loss_sum += nn.functional.cross_entropy(logits, labels, ignore_index=-1, reduction="sum").double()
        correct += ((logits.argmax(dim=1) == labels) & valid).sum()
        seen += valid.sum()
        if return_predictions:
            predictions.append(logits.argmax(dim=1)[valid].cpu())
            targets.append(labels[valid].cpu())
            probabilities.append(logits.softmax(dim=1)[valid].cpu())
    loss, accuracy, seen = _totals(loss_sum, correct, seen)
    result = {f"{prefix}_loss": loss, f"{prefix}_acc": accuracy, f"{prefix}_samples": seen}
    if return_predictions:
        result["predictions"] = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
        result["targets"] = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
        result["probabilities"] = torch.cat(probabilities) if probabilities else torch.empty(0)
    return result


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions without TF32 tensor cores (PyTorch enables them for cuDNN by
    default, and training runs for matmuls too), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def evaluate_test(model: nn.Module, loader, device: torch.device, return_predictions: bool = False,
                  tta: bool = False) -> dict:
    """Test metrics by one rule for ``--test`` and ``part_a/evaluate.py`` alike: the raw (uncompiled)
    model in exact fp32, whatever precision the run trained in, so the two never disagree."""
    ctx = StepContext(device=device, amp_dtype=None, scaler=torch.amp.GradScaler(device.type, enabled=False))
    with exact_fp32():
        return evaluate(model, loader, ctx, prefix="test", return_predictions=return_predictions, tta=tta)


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Per-step LR factor: linear warmup, then constant, cosine to zero, or one-cycle (fast.ai's shape:
    warmup to the peak, 30% of training when no warmup is given, then cosine to 1/1000 of it)."""
    if schedule == "onecycle" and warmup_steps == 0:
        warmup_steps = max(1, int(0.3 * total_steps))
    floor = 1e-3 if schedule == "onecycle" else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
