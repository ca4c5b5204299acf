"""The hand-written step loop: one ``train_one_epoch``, one ``evaluate``, each calling one step function.

Features are switches on one code path: autocast and GradScaler take ``enabled=``, the model may be
plain, compiled or DDP-wrapped, and with ``cuda_graphs`` the same step is captured once and replayed.
No step reads back to the host: metrics and the non-finite check are read only at log points.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from common.config import UserError

SYNC_EVERY = 50  # steps between host syncs (non-finite check, progress-bar loss)
WARMUP_STEPS = 3  # eager steps before a step is captured: autotuning, compilation, lazy optimizer state
TEST_PRECISION = "fp32"  # recorded beside test_acc in summary.json


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


@dataclass
class StepContext:
    """What the step needs besides model and data: device, precision and the update rule."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    scaler: torch.amp.GradScaler
    grad_clip: float = 0.0
    mix: Callable | None = None  # MixUp/CutMix: (images, labels) -> (mixed images, soft targets); None: off
    update_ema: Callable[[], None] | None = None  # after every optimizer step; None: no weight average
    cuda_graphs: bool = False  # capture each step as a CUDA graph (device.py says when it can)
    steps: dict[str, tuple[Any, Step]] = field(default_factory=dict, init=False, repr=False)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def step(self, kind: str, key: tuple, fn: Callable) -> Step:
        """The ``kind`` step of ``fn``, kept while the objects it closes over (``key``) stay the same."""
        if kind not in self.steps or self.steps[kind][0] != key:
            self.steps[kind] = (key, Step(fn, self.device, self.cuda_graphs))
        return self.steps[kind][1]


class Sums:
    """A pass's on-device sums (loss, correct predictions, samples), its step count and first non-finite
    step, added to in place: a captured step keeps adding into the same tensors."""

    def __init__(self, device: torch.device):
        real = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.loss = torch.zeros((), device=device, dtype=real)
        counts = [torch.zeros((), device=device, dtype=torch.int64) for _ in range(3)]
        self.correct, self.seen, self.steps = counts
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)

    def zero_(self) -> Sums:
        for total in (self.loss, self.correct, self.seen, self.steps):
            total.zero_()
        self.first_bad.fill_(-1)
        return self

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: torch.Tensor | int) -> None:
        bad = (self.first_bad < 0) & ~torch.isfinite(loss_sum)
        self.first_bad.copy_(torch.where(bad, self.steps, self.first_bad))
        self.loss += loss_sum
        self.correct += correct
        self.seen += seen
        self.steps += 1


class Step:
    """``fn(sums, *inputs)`` with the sums it adds to. With ``graph``, the first WARMUP_STEPS calls run
    eagerly on a side stream (as PyTorch's CUDA graph documentation warms up), the next is captured, and
    later calls copy their inputs into the captured ones and replay it: one launch instead of hundreds.
    What changes between steps must be a tensor ``fn`` reads (the learning rate is one)."""

    def __init__(self, fn: Callable, device: torch.device, graph: bool):
        self.fn, self.sums, self.graph = fn, Sums(device), graph
        self.calls, self.inputs, self.replay = 0, None, None

    def __call__(self, *inputs: torch.Tensor) -> Any:
        self.calls += 1
        if not self.graph:
            return self.fn(self.sums, *inputs)
        if self.replay is None and self.calls <= WARMUP_STEPS:
            with _side_stream():
                return self.fn(self.sums, *inputs)
        if self.replay is None:
            self.inputs = [x.clone() for x in inputs]  # the graph reads its inputs from these
            self.replay = _capture(lambda: self.fn(self.sums, *self.inputs))
        for captured, x in zip(self.inputs, inputs, strict=True):
            captured.copy_(x)
        self.replay()


@contextlib.contextmanager
def _side_stream():
    """CUDA work on the warm-up stream, after the current stream's and before what follows on it."""
    side = _warm_up_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


@functools.cache
def _warm_up_stream() -> torch.cuda.Stream:
    return torch.cuda.Stream()  # one, so that each warm-up reuses the memory the last one freed


def _capture(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn``'s CUDA work, recorded (not run) as one graph; returns its replay."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as error:  # e.g. something in the step waited for the GPU
        what = f"the step could not be captured as a CUDA graph ({str(error).strip().splitlines()[0]})"
        raise UserError(f"--cuda_graphs: {what}; train without --cuda_graphs") from error
    return graph.replay


def _progress(iterable: Iterable, total: int, desc: str) -> tqdm:
    """A progress bar only when a person is watching (stderr is a terminal)."""
    watched = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not watched)


def _totals(sums: Sums) -> tuple[float, float, int]:
    """Mean loss, accuracy and sample count over every rank: one host sync."""
    totals = torch.stack([sums.loss, sums.correct.to(sums.loss.dtype), sums.seen.to(sums.loss.dtype)])
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
        what = f"non-finite loss at epoch {epoch}, step {bad + 1}: stopped, the last good checkpoint kept"
        raise NonFiniteLossError(f"{what}; try a lower --learning_rate, --grad_clip 1.0 or --precision fp32")


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int, epoch: int):
    """A CUDA out-of-memory error becomes one line naming a batch size that may fit."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        what = f"CUDA ran out of memory at batch size {batch_size} (epoch {epoch})"
        raise UserError(f"{what}; try --batch_size {max(1, batch_size // 2)}") from error


def train_step(model, optimizer, loss_fn, ctx: StepContext, params, sums: Sums, images, targets, labels):
    """One optimizer step, its loss and accuracy added to ``sums``; no host read: a graph can capture it."""
    optimizer.zero_grad(set_to_none=True)  # in a graph: once, at capture; each replay refills those .grad
    with ctx.autocast():
        logits = model(images)
        loss = loss_fn(logits.float(), targets)
    ctx.scaler.scale(loss).backward()
    if ctx.grad_clip > 0:
        ctx.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip)
    ctx.scaler.step(optimizer)  # a fused optimizer skips an overflowed fp16 step on the device
    ctx.scaler.update()
    if ctx.update_ema is not None:
        ctx.update_ema()
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    sums.add(loss.detach().to(sums.loss.dtype) * labels.numel(), correct, labels.numel())


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn, ctx: StepContext, epoch) -> dict:
    """One pass over ``loader``; returns ``train_loss``, ``train_acc`` and throughput figures."""
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Another trainable set (Part B's gradual unfreezing) is another step, captured again.
    key = (model, optimizer, loss_fn, tuple(p.requires_grad for p in params))
    step = ctx.step("train", key, functools.partial(train_step, model, optimizer, loss_fn, ctx, params))
    sums = step.sums.zero_()
    bar = _progress(loader, len(loader), f"epoch {epoch}")
    start = time.perf_counter()
    for index, (images, labels) in enumerate(bar):
        targets = labels
        if ctx.mix is not None:  # drawn on the host, outside the step; train_acc counts the dominant label
            images, targets = ctx.mix(images, labels)
            labels = targets.argmax(dim=1)
        step(images, targets, labels)
        if scheduler is not None:  # a captured step reads a tensor learning rate that this writes in place
            scheduler.step()
        if (index + 1) % SYNC_EVERY == 0:
            _check_finite(sums.first_bad, epoch)
            if not bar.disable:  # the loss read costs a host sync
                bar.set_postfix(loss=f"{(sums.loss / sums.seen).item():.4f}")
    _check_finite(sums.first_bad, epoch)
    loss, accuracy, seen = _totals(sums)  # the sync that ends the epoch's timing
    elapsed = time.perf_counter() - start
    speed = seen / elapsed if elapsed > 0 else 0.0
    return {"train_loss": loss, "train_acc": accuracy, "train_time_s": elapsed, "images_per_s": speed}


def predict(model: nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """fp32 logits; with ``tta``, the log of the mean softmax of each image and its mirror image (so
    loss, accuracy and probabilities all follow the average)."""
    logits = model(images).float()
    if tta:
        mirrored = model(images.flip(3)).float()
        logits = torch.logaddexp(logits.log_softmax(dim=1), mirrored.log_softmax(dim=1)) - math.log(2)
    return logits


def _eval_step(model: nn.Module, ctx: StepContext, tta: bool, sums: Sums, images, labels) -> torch.Tensor:
    with ctx.autocast():
        logits = predict(model, images, tta)
    valid = labels >= 0
    loss_sum = nn.functional.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
    sums.add(loss_sum.to(sums.loss.dtype), ((logits.argmax(dim=1) == labels) & valid).sum(), valid.sum())
    return logits


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: StepContext, prefix="val", return_predictions=False, tta=False):
    """Loss and accuracy over every sample once; padding labels (-1) are ignored. ``tta``: see ``predict``.
    ``return_predictions`` reads each batch back, so it takes a ``ctx`` without CUDA graphs."""
    model.eval()
    step = ctx.step(prefix, (model, tta), functools.partial(_eval_step, model, ctx, tta))
    sums = step.sums.zero_()
    predictions, targets, probabilities = [], [], []
    for images, labels in _progress(loader, len(loader), prefix):
        logits = step(images, labels)
        if return_predictions:
            valid = labels >= 0
            predictions.append(logits.argmax(dim=1)[valid].cpu())
            targets.append(labels[valid].cpu())
            probabilities.append(logits.softmax(dim=1)[valid].cpu())
    loss, accuracy, seen = _totals(sums)
    result = {f"{prefix}_loss": loss, f"{prefix}_acc": accuracy, f"{prefix}_samples": seen}
    if return_predictions:
        result["predictions"] = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
        result["targets"] = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
        result["probabilities"] = torch.cat(probabilities) if probabilities else torch.empty(0)
    return result


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions without TF32 (cuDNN's default, and training's), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def evaluate_test(model: nn.Module, loader, device: torch.device, return_predictions=False, tta=False):
    """Test metrics by one rule for ``--test`` and ``part_a/evaluate.py`` alike: the raw (uncompiled)
    model in exact fp32, whatever precision the run trained in, so the two never disagree."""
    ctx = StepContext(device, None, torch.amp.GradScaler(device.type, enabled=False))
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
