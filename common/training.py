"""One training run from start to summary, shared by Part A and Part B: ``run`` reads top to bottom.

What a part does differently (its model, normalisation, which parameters train) comes in as
arguments; its command line is ``get_args_parser`` and ``parse_configs``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import os
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from common import checkpoint as ckpt_io
from common import data as data_lib
from common import device as device_lib
from common import engine, files, tracking
from common.config import add_dataclass_args, from_namespace
from common.distributed import DistInfo, all_gather_object, barrier, broadcast_tensors, process_group

OPTIMIZERS = ("adam", "adamw", "nadam", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Options that change the trajectory of a run: a resumed run must use the values it started with.
RESUME_MUST_MATCH = ("batch_size", "optimizer", "learning_rate", "weight_decay", "momentum", "nesterov",
                     "lr_schedule", "warmup_epochs", "label_smoothing", "grad_clip", "class_weights",
                     "augment", "mixup_alpha", "cutmix_alpha", "ema_decay", "seed", "split_seed", "val_fraction",
                     "sync_bn")
TEST_KEYS = ("test_acc", "test_loss", "test_samples", "test_per_class_acc", "test_checkpoint", "test_epoch",
             "test_precision", "test_tta")


@dataclass
class RunConfig:
    """Every option that is not the model's. epochs, optimizer, learning_rate and weight_decay default to
    10 epochs of torch's Adam; each train script gives its own (``get_args_parser(**defaults)``)."""
    data_dir: str = field(default="data", metadata={"help": "dataset root (prepared automatically if missing)"})
    out_dir: str = field(default="runs", metadata={"help": "folder holding run folders"})
    name: str | None = field(default=None, metadata={"help": "run folder name (default: kind and time)"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "training batch size per process"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch size for validation and test"})
    optimizer: str = field(default="adam", metadata={"help": "optimizer", "choices": OPTIMIZERS})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (L2 for adam/nadam/sgd, decoupled for adamw)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum for SGD"})
    lr_schedule: str = field(default="constant", metadata={"help": "LR schedule after warmup", "choices": SCHEDULES})
    warmup_epochs: float = field(default=0.0, metadata={"help": "linear LR warmup, in epochs"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the training loss"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    class_weights: bool = field(default=False, metadata={"help": "weight the loss by inverse class frequency"})
    augment: bool = field(default=True, metadata={"help": "random resized crop + horizontal flip on the device"})
    mixup_alpha: float = field(default=0.0, metadata={"help": "MixUp: blend each training batch with itself shifted by "
                                                      "one, weight ~ Beta(a, a), labels alike (0: off)"})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix: paste a box of the shifted batch, area ~ "
                                                       "Beta(a, a) (0: off); with mixup_alpha, one of the two per batch"})
    ema_decay: float = field(default=0.0, metadata={
        "help": "keep an exponential moving average of the weights for validation, best.pt and the test; "
                "step t updates it with the decay min(ema_decay, (1 + t) / (10 + t)) (0: off)"})
    tta: bool = field(default=False, metadata={"help": "with --test (required): average the softmax of each test "
                                               "image and its mirror image"})
    seed: int = field(default=42, metadata={"help": "seed for initialisation, shuffling and augmentation"})
    split_seed: int = field(default=42, metadata={"help": "seed of the train/val split (data preparation)"})
    val_fraction: float = field(default=0.2, metadata={"help": "stratified fraction of train/ held out for validation"})
    precision: str = field(default="auto", metadata={
        "help": "autocast precision; auto = bf16 on CUDA (fp16 with loss scaling before compute capability "
                "8.0), MPS and XPU, fp32 on CPU", "choices": PRECISIONS})
    compile: bool | None = field(default=None, metadata={
        "help": "torch.compile the model; default: on for CUDA, off elsewhere"})
    cuda_graphs: bool | None = field(default=None, metadata={
        "help": "capture each training and validation step (forward, backward, optimizer, EMA, metrics) as "
                "one CUDA graph, replayed with one launch; one CUDA process only; default: per model, off "
                "until measured (common/device.py: CUDA_GRAPHS)"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format for model and inputs"})
    sync_bn: bool = field(default=False, metadata={"help": "under torchrun on GPUs, batch norm statistics over the "
                                                   "global batch (SyncBatchNorm; slower, and it turns torch.compile off)"})
    device: str = field(default="auto", metadata={
        "help": "auto (torch's current accelerator: CUDA, MPS or XPU, else the CPU), cpu, cuda, cuda:N, mps "
                "or xpu"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic kernels only (no cuDNN autotuning): "
                                                         "bit-identical GPU runs and resumes, at some speed"})
    test: bool = field(default=False, metadata={"help": "evaluate best.pt on the test split (the original val/) at the end"})
    resume: bool = field(default=False, metadata={"help": "continue runs/NAME from its last.pt"})
    wandb_mode: str | None = field(default=None, metadata={"help": "online, offline or disabled; default: online with credentials, else offline"})
    wandb_project: str = field(default="inat12k", metadata={"help": "wandb project"})
    wandb_entity: str | None = field(default=None, metadata={"help": "wandb entity (user or team)"})
    wandb_group: str | None = field(default=None, metadata={"help": "wandb group (the sweep runner sets it)"})


def get_args_parser(model_config_class: type, description: str, **defaults) -> argparse.ArgumentParser:
    """The "model" options of the part, then the "training" options with the part's ``defaults``."""
    parser = argparse.ArgumentParser(description=description)
    add_dataclass_args(parser, model_config_class, "model")
    add_dataclass_args(parser, RunConfig, "training")
    parser.set_defaults(**defaults)
    return parser


def parse_configs(parser: argparse.ArgumentParser, model_config_class: type, argv: list[str] | None,
                  check_model: Callable[[Any], Any]) -> tuple[Any, RunConfig]:
    """(model config, run config) of one command line, each checked once, before any data is read.
    ``check_model`` raises ``ValueError`` for a bad model config and returns it, resolved."""
    args = parser.parse_args(argv)
    model_config = check_model(from_namespace(model_config_class, args))
    run_config = from_namespace(RunConfig, args)
    validate_run_config(run_config)
    return model_config, run_config


def validate_run_config(config: RunConfig) -> None:
    """Raise ``ValueError`` for a bad option (argparse has checked the choices)."""
    checks = [
        (config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 1 and config.eval_batch_size >= 1, "batch sizes must be >= 1"),
        (config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}"),
        (config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}"),
        (0 <= config.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {config.label_smoothing}"),
        (config.grad_clip >= 0, f"grad_clip must be >= 0, got {config.grad_clip}"),
        (config.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {config.warmup_epochs}"),
        (config.mixup_alpha >= 0 and config.cutmix_alpha >= 0,
         f"mixup_alpha and cutmix_alpha must be >= 0 (0: off), got {config.mixup_alpha} and {config.cutmix_alpha}"),
        (0 <= config.ema_decay < 1, f"ema_decay must be in [0, 1) (0: off; e.g. 0.999), got {config.ema_decay}"),
        (config.test or not config.tta, "--tta changes only the test: add --test, or run part_a/evaluate.py "
                                        "--tta on the run's best.pt"),
        (0 < config.val_fraction < 1, f"val_fraction must be in (0, 1), got {config.val_fraction}"),
        (config.name is None or (config.name and "/" not in config.name and config.name not in (".", "..")),
         f"name must be a plain folder name, got {config.name!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    tracking.resolve_wandb_mode(config.wandb_mode)
    device_lib.resolve(config)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """Give rank ``rank`` > 0 random numbers of its own (dropout masks, Inductor's RNG), from a seed
    derived from (seed, rank): with one seed every rank would draw the same masks for its sample i,
    unlike one process with the global batch. Rank 0 keeps the single-process stream; the weights
    still come from rank 0, which DDP broadcasts."""
    if rank > 0:
        digest = hashlib.sha256(f"{seed}:rank{rank}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)


OPTIMIZER_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def build_optimizer(config: RunConfig, model: nn.Module, param_groups: list[dict] | None,
                    policy: device_lib.Policy) -> torch.optim.Optimizer:
    """Optimizer over all parameters; a group's ``lr_scale`` multiplies the base learning rate. Fused
    kernels where the device has them (adam, adamw, sgd: fp16 loss scaling then needs no host sync; nadam
    has none), capturable for CUDA graphs."""
    groups = [{**group, "lr_scale": float(group.get("lr_scale", 1.0)),
               "lr": config.learning_rate * float(group.get("lr_scale", 1.0))}
              for group in param_groups or [{"params": list(model.parameters())}]]
    common = {"lr": config.learning_rate, "weight_decay": config.weight_decay}
    fused = {"fused": True} if policy.fused else {}
    capturable = {"capturable": True} if policy.cuda_graphs else {}
    if config.optimizer == "sgd":  # capturable without the flag
        return torch.optim.SGD(groups, momentum=config.momentum, nesterov=config.nesterov, **common, **fused)
    if config.optimizer == "nadam":
        return torch.optim.NAdam(groups, **common, **capturable)
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[config.optimizer]
    return optimizer(groups, **common, **fused, **capturable)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping this optimizer's implementation flags: they were
    chosen for this device (a run saved on the CPU resumes on CUDA with fused Adam), and the loaded
    state (e.g. Adam's step counts) is placed as those flags need. A learning rate this optimizer keeps
    in a tensor (for CUDA graphs) stays that tensor, filled with the saved value."""
    groups = [{**saved, **{k: group[k] for k in OPTIMIZER_FLAGS if k in group}}
              for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for group, rate in zip(optimizer.param_groups, rates):
        saved = float(group["lr"])
        group["lr"] = rate.fill_(saved) if isinstance(rate, torch.Tensor) else saved


class Training(NamedTuple):
    """What a run trains with; ``build_training`` makes it, for runs and benchmarks alike."""
    model: nn.Module  # the raw module, placed: what is saved and tested
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ctx: engine.StepContext
    loss_fn: nn.Module
    ema: WeightAverage | None


def build_training(config: RunConfig, policy: device_lib.Policy, model: nn.Module, steps_per_epoch: int,
                   labels: torch.Tensor, num_classes: int) -> Training:
    """``model`` placed by the device policy, its optimizer (over a model's ``param_groups()`` when it has
    them) and per-step schedule, the step context and the loss (``labels``: the training labels, for
    ``--class_weights``)."""
    raw_model = device_lib.place(model, policy)
    param_groups = raw_model.param_groups() if hasattr(raw_model, "param_groups") else None
    optimizer = build_optimizer(config, raw_model, param_groups, policy)
    factor = engine.lr_lambda(config.lr_schedule, config.epochs * steps_per_epoch,
                              int(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)  # stepped once per batch
    if policy.cuda_graphs:  # a captured step reads its rate from the device, where the schedule writes it
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(group["lr"], device=policy.device)
    ctx, loss_fn, ema = _step_context(config, raw_model, policy.amp_dtype, labels, num_classes, policy.device)
    ctx = dataclasses.replace(ctx, cuda_graphs=policy.cuda_graphs)
    return Training(raw_model, optimizer, scheduler, ctx, loss_fn, ema)


def run(config: RunConfig, model_config, build: Callable[[Any], nn.Module], *, kind: str, mean, std,
        epoch_callback: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``build(model_config)``, its output layer sized to the data's classes; return the summary.
    A model's ``param_groups()``, if it has them, become the optimizer's; its ``set_epoch(epoch)``, if it
    has one, sets which parameters train in each epoch; ``epoch_callback(epoch, metrics)`` runs after
    each checkpoint, and what it raises stops the run and propagates."""
    policy = device_lib.resolve(config, kind)
    with process_group(policy.device.type) as info:
        if info.enabled and policy.device.type == "cuda":  # one GPU per process
            policy = dataclasses.replace(policy, device=torch.device("cuda", info.local_rank))
        device = policy.device
        say = print if info.is_main else (lambda *args, **kwargs: None)
        run_dir = _run_dir(config, kind, info)
        loader_options = dict(device=device, mean=mean, std=std, channels_last=config.channels_last,
                              rank=info.rank, world_size=info.world_size)
        split_dir, train_set, val_set, train_loader, val_loader = _data(config, model_config.input_size, info,
                                                                        loader_options)
        # One output per class of the data (10 for iNaturalist-12K, any number for your own); seeded
        # here, so the initial weights never depend on whether the data had to be prepared first.
        model_config = dataclasses.replace(model_config, num_classes=len(train_set.classes))
        seed_everything(config.seed)
        model = build(model_config)
        seed_rank(config.seed, info.rank)
        raw_model, optimizer, scheduler, ctx, loss_fn, ema = build_training(
            config, policy, model, len(train_loader), train_set.labels, model_config.num_classes)
        start_epoch, best_val_acc, best_epoch, wandb_id = 1, -1.0, 0, None
        if config.resume:
            start_epoch, best_val_acc, best_epoch, wandb_id = _resume(
                run_dir, config, model_config, raw_model, ema, optimizer, scheduler, ctx.scaler, info, device)

        record = {"kind": kind, "model_config": dataclasses.asdict(model_config),  # what every checkpoint says
                  "run_config": dataclasses.asdict(config), "classes": list(train_set.classes),
                  "input_size": model_config.input_size, "mean": list(mean), "std": list(std),
                  "split": data_lib.split_digests(split_dir), **ckpt_io.provenance()}
        tracker = _start_tracking(run_dir, config, record, wandb_id) if info.is_main else None
        wandb_id = tracker.id if tracker is not None else None
        summary = {"run_dir": str(run_dir), "kind": kind, "device": str(device), "world_size": info.world_size,
                   "params": sum(p.numel() for p in raw_model.parameters()),
                   "trainable_params": sum(p.numel() for p in raw_model.parameters() if p.requires_grad)}
        if policy.notice:
            say(policy.notice)
        say(_describe(summary, config, policy, train_set, val_set))
        status, started, trainable = "running", time.perf_counter(), None
        try:
            for epoch in range(start_epoch, config.epochs + 1):
                if hasattr(raw_model, "set_epoch"):  # the layers that train this epoch (Part B: gradual)
                    before = _trainable(raw_model)
                    raw_model.set_epoch(epoch)
                    if _trainable(raw_model) != before:
                        say(f"epoch {epoch}: {raw_model.extra_repr()}", flush=True)
                if _trainable(raw_model) != trainable:  # the first epoch, or the trainable set changed
                    trainable = _trainable(raw_model)
                    wrapped, validated = _wrap(raw_model, ema, info, policy)
                train_loader.set_epoch(epoch)
                epoch_start = time.perf_counter()
                with engine.out_of_memory_hint(config.batch_size, epoch):
                    metrics = {"epoch": epoch, **engine.train_one_epoch(wrapped, train_loader, optimizer, scheduler,
                                                                        loss_fn, ctx, epoch)}
                    if ema is not None:  # rank 0's BN statistics in every rank's average, as DDP gives the model
                        broadcast_tensors(ema.module.buffers(), info)
                    metrics.update(engine.evaluate(validated, val_loader, ctx))
                metrics.update(lr=max(float(group["lr"]) for group in optimizer.param_groups),
                               epoch_time_s=time.perf_counter() - epoch_start)
                improved = metrics["val_acc"] > best_val_acc
                if improved:
                    best_val_acc, best_epoch = metrics["val_acc"], epoch
                rng = all_gather_object(ckpt_io.rng_state(device), info)  # each rank's stream, saved by rank 0
                if info.is_main:
                    _save_checkpoints(run_dir, {**record, "model": raw_model.state_dict(), "epoch": epoch,
                                                "val_acc": metrics["val_acc"], "best_val_acc": best_val_acc,
                                                "best_epoch": best_epoch, "wandb_id": wandb_id},
                                      improved, optimizer, scheduler, ctx.scaler, rng, ema)
                    tracking.append_metrics(run_dir / "metrics.jsonl", metrics, tracker)
                    say(_format_epoch(metrics, config.epochs), flush=True)
                barrier(info)
                if epoch_callback is not None:
                    status = "stopped"  # if the callback raises (e.g. a pruned sweep trial): the run folder is complete
                    epoch_callback(epoch, metrics)
                    status = "running"
            status = "finished"
            if config.test and best_epoch > 0:
                summary.update(_test(raw_model, run_dir, split_dir, config, record, loader_options, info),
                               test_epoch=best_epoch)
                if tracker is not None:
                    tracker.log({k: summary[k] for k in ("test_acc", "test_loss")})
        except BaseException as error:
            status = "stopped" if status == "stopped" or isinstance(error, KeyboardInterrupt) else "failed"
            summary["error"] = f"{type(error).__name__}: {error}"
            raise
        finally:
            summary.update(status=status, best_val_acc=max(best_val_acc, 0.0), best_epoch=best_epoch,
                           train_time_s=time.perf_counter() - started)
            if info.is_main:
                summary = _write_summary(run_dir, summary, tracker)
    say(f"best val_acc {summary['best_val_acc']:.4f} at epoch {best_epoch}"
        + (f" | test_acc {summary['test_acc']:.4f}" if "test_acc" in summary else "") + f" | {run_dir}")
    return summary


def default_run_name(kind: str) -> str:
    """A folder name that two runs started in the same second (e.g. agents on two GPUs) never share;
    under ``wandb agent`` it is the wandb run id the agent assigned, so folder and run match."""
    run_id = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
    return f"{kind}-{run_id}" if run_id else f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _run_dir(config: RunConfig, kind: str, info: DistInfo) -> Path:
    name = config.name or all_gather_object(default_run_name(kind), info)[0]  # rank 0's name on every rank
    run_dir = Path(config.out_dir) / name
    last = run_dir / "last.pt"
    if config.resume and not last.is_file():
        elsewhere = (f" on this machine (rank {info.rank}): every machine of a multi-node run reads it, so "
                     "--out_dir must be on a shared filesystem" if info.rank != info.local_rank else "")
        raise ValueError(f"--resume: {last} does not exist{elsewhere}, so there is nothing to resume; "
                         "drop --resume to start the run")
    if not config.resume and last.is_file():
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it, "
                         "or choose another --name")
    return run_dir


def _prepare_data(config: RunConfig, input_size: int, info: DistInfo) -> Path:
    """The split, prepared and decoded once per machine by its local rank 0 (the split is deterministic,
    so machines that do not share ``--data_dir`` get the same one); the other ranks wait. A failure on
    any machine stops every rank with its message."""
    splits = ("train", "val", "test") if config.test else ("train", "val")
    result: str | Exception | None = None
    if info.local_rank == 0:
        try:
            split_dir = data_lib.prepare(config.data_dir, val_fraction=config.val_fraction, seed=config.split_seed)
            for split in splits:
                data_lib.load_cache(split_dir, split, input_size)  # builds the cache if it is missing
            result = str(split_dir)
        except Exception as error:
            if not info.enabled:
                raise
            result = error
    results = all_gather_object(result, info, long_wait=True)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise result if isinstance(result, Exception) else errors[0]
    return Path(results[info.rank - info.local_rank])  # this machine's local rank 0 (torchrun numbers ranks by machine)


def _data(config: RunConfig, input_size: int, info: DistInfo, loader_options: dict):
    """The split (prepared once per machine), its train and val sets, and their loaders."""
    split_dir = _prepare_data(config, input_size, info)
    train_set, val_set = (data_lib.load_cache(split_dir, split, input_size) for split in ("train", "val"))
    train_loader = data_lib.DeviceLoader(train_set.images, train_set.labels, config.batch_size, train=True,
                                         augment=config.augment, seed=config.seed, **loader_options)
    val_loader = data_lib.DeviceLoader(val_set.images, val_set.labels, config.eval_batch_size, train=False,
                                       **loader_options)
    if len(train_loader) == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {len(train_set.labels)} training "
                         "images per process; use a smaller --batch_size")
    return split_dir, train_set, val_set, train_loader, val_loader


def _describe(summary: dict, config: RunConfig, policy: device_lib.Policy, train_set, val_set) -> str:
    dtype = "" if policy.amp_dtype is None else f" ({str(policy.amp_dtype).removeprefix('torch.')})"
    size = train_set.images.shape[1]  # the cache holds [N, S, S, 3] images
    return (f"{summary['kind']} | {summary['run_dir']} | device {summary['device']} x{summary['world_size']} | "
            f"precision {config.precision}{dtype} | compile {policy.compile} | "
            f"cuda_graphs {policy.cuda_graphs} | channels_last {config.channels_last} | "
            f"params {summary['params']:,} ({summary['trainable_params']:,} trainable) | "
            f"train {len(train_set.labels)} val {len(val_set.labels)} images at {size}x{size}")


def _loss(config: RunConfig, labels: torch.Tensor, num_classes: int, device: torch.device) -> nn.Module:
    weight = None
    if config.class_weights:  # inverse class frequency
        counts = torch.bincount(labels.long(), minlength=num_classes).double().clamp_min(1)
        weight = (counts.sum() / (num_classes * counts)).float().to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing, ignore_index=-1)


def _step_context(config: RunConfig, raw_model: nn.Module, amp_dtype, labels: torch.Tensor, num_classes: int,
                  device: torch.device) -> tuple[engine.StepContext, nn.Module, WeightAverage | None]:
    """What each training step uses: loss scaling (fp16 only), MixUp/CutMix, the weight average to
    update (also returned), and the loss."""
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = WeightAverage(raw_model, config.ema_decay) if config.ema_decay > 0 else None
    ctx = engine.StepContext(device, amp_dtype, scaler, config.grad_clip, _mixing(config, num_classes),
                             ema.update if ema else None)
    return ctx, _loss(config, labels, num_classes, device), ema


class WeightAverage:
    """An exponential moving average of ``model``'s weights and buffers (batch-norm statistics) in
    ``module``, which starts as a copy. Update t = 0, 1, ... does ``average = d * average + (1 - d) *
    weights`` with TensorFlow's warm-up of the decay, ``d = min(decay, (1 + t) / (10 + t))``: until d
    reaches ``decay``, after k updates the weights of step j count C(j + 8, 8) / C(k + 9, 9), the initial
    ones 1 / C(k + 9, 9). It follows the raw module, whose tensors the DDP and compile wrappers share."""

    # Not torch's AveragedModel: it reads its update count on the host, a GPU sync at every step.
    def __init__(self, model: nn.Module, decay: float):
        self.module, self.decay = copy.deepcopy(model).requires_grad_(False), decay
        self.updates = torch.zeros((), dtype=torch.int64, device=next(model.parameters()).device)

        def tensors(module: nn.Module, floating: bool) -> list[torch.Tensor]:
            return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point() == floating]
        self.floats, self.counts = ((tensors(self.module, f), tensors(model, f)) for f in (True, False))

    @torch.no_grad()
    def update(self) -> None:
        decay = ((self.updates + 1) / (self.updates + 10)).clamp(max=self.decay)  # a device tensor: no sync
        self.updates += 1
        averaged, current = self.floats
        torch._foreach_mul_(averaged, decay)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - decay))
        if self.counts[0]:  # batch norm's num_batches_tracked: the model's own count
            torch._foreach_copy_(*self.counts)


def _mixing(config: RunConfig, num_classes: int) -> v2.Transform | None:
    """torchvision's MixUp and/or CutMix of a training batch (one of the two per batch when both are on,
    as timm does); they draw from torch's global CPU generator, which a checkpoint saves."""
    chosen = [mix(alpha=alpha, num_classes=num_classes)
              for mix, alpha in ((v2.MixUp, config.mixup_alpha), (v2.CutMix, config.cutmix_alpha)) if alpha > 0]
    if len(chosen) == 2:
        return v2.RandomChoice(chosen)
    return chosen[0] if chosen else None


def _resume(run_dir: Path, config: RunConfig, model_config, model: nn.Module, ema: WeightAverage | None,
            optimizer, scheduler, scaler, info: DistInfo,
            device: torch.device) -> tuple[int, float, int, str | None]:
    """Weights (and their average), optimizer, schedule, scaler and this rank's RNG back from last.pt;
    return the first epoch to run, the best val_acc and its epoch, and the wandb run id."""
    path = run_dir / "last.pt"
    # To the CPU: the RNG states must stay CPU tensors; load_state_dict copies the rest to the device.
    state = ckpt_io.load_checkpoint(path, map_location="cpu")
    # A run saved before an option existed ran without it, i.e. with its default.
    saved_run = {**{f.name: f.default for f in dataclasses.fields(RunConfig)}, **state["run_config"]}
    for what, saved, given in (("model", state["model_config"], dataclasses.asdict(model_config)),
                               ("training", saved_run, {k: getattr(config, k) for k in RESUME_MUST_MATCH})):
        diff = {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"--resume: {what} options differ from those in {path} (saved, given): {diff}; "
                             "a resumed run must use its original values")
    splits = ("train", "val", "test") if config.test else ("train", "val")  # test: this run will be tested
    changes = data_lib.split_changes(state.get("split"), Path(config.data_dir) / "split", splits)
    if changes:
        raise ValueError(f"--resume: the split in {config.data_dir} changed since this run started "
                         f"({changes}); a run trains on one split: start a new run on this one (another "
                         "--name, without --resume)")
    model.load_state_dict(state["model"])
    if ema is not None:  # an older last.pt lacks the count: one update per step, like the schedule's
        ema.module.load_state_dict(state["ema"])
        ema.updates.fill_(state.get("ema_updates", state["scheduler"]["last_epoch"]))
    load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state["scaler"]:  # a run saved without fp16 has an empty scaler state
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank
    if info.rank < len(rng):  # a rank beyond the saved ones keeps its seed_rank stream
        ckpt_io.set_rng_state(rng[info.rank], device)
    if info.is_main:  # lines logged after the checkpoint, before a crash, are not part of the run
        tracking.truncate_metrics(run_dir / "metrics.jsonl", state["epoch"])
        print(f"resuming {run_dir} after epoch {state['epoch']} (best val_acc {state['best_val_acc']:.4f} "
              f"at epoch {state['best_epoch']})")
    return state["epoch"] + 1, state["best_val_acc"], state["best_epoch"], state.get("wandb_id")


def _start_tracking(run_dir: Path, config: RunConfig, record: dict, resume_id: str | None):
    """config.json in the run folder, and the wandb run (None when disabled)."""
    full_config = {"kind": record["kind"], **record["model_config"], **record["run_config"]}
    files.write_json(run_dir / "config.json", full_config)
    return tracking.start_wandb(config.wandb_mode, project=config.wandb_project, entity=config.wandb_entity,
                                name=run_dir.name, group=config.wandb_group, config=full_config, run_dir=run_dir,
                                resume_id=resume_id)


def _trainable(model: nn.Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


def _wrap(raw_model: nn.Module, ema: WeightAverage | None, info: DistInfo,
          policy: device_lib.Policy) -> tuple[nn.Module, nn.Module]:
    """The model to train and the one to validate: DDP, then compile, around the raw module (which is
    what is saved and tested); with ``ema``, its average, compiled alike (no DDP: it takes no
    gradients). Built again when the trainable set changes: DDP fixes its parameters when built."""
    trained = device_lib.wrap(raw_model, policy, info)
    return trained, trained if ema is None else device_lib.wrap(ema.module, policy, DistInfo())


def _save_checkpoints(run_dir: Path, state: dict, improved: bool, optimizer, scheduler, scaler, rng: list,
                      ema: WeightAverage | None) -> None:
    """best.pt (the weights validated: the average's with ``ema``) when val_acc improved; last.pt (all a
    resume needs: the trained weights as ``model``, their average as ``ema``, its ``ema_updates``) each
    epoch."""
    averaged = {} if ema is None else {"ema": ema.module.state_dict(), "ema_updates": int(ema.updates)}
    if improved:
        ckpt_io.save_checkpoint(run_dir / "best.pt", {**state, "model": averaged.get("ema", state["model"])})
    ckpt_io.save_checkpoint(run_dir / "last.pt", {**state, **averaged, "optimizer": optimizer.state_dict(),
                                                 "scheduler": scheduler.state_dict(),
                                                 "scaler": scaler.state_dict(), "rng": rng})


def _format_epoch(metrics: dict, epochs: int) -> str:
    return (f"epoch {metrics['epoch']:>3}/{epochs} | train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_acc']:.4f} | val loss {metrics['val_loss']:.4f} acc {metrics['val_acc']:.4f} | "
            f"lr {metrics['lr']:.2e} | {metrics['epoch_time_s']:6.1f} s | {metrics['images_per_s']:8.0f} img/s")


def _test(raw_model: nn.Module, run_dir: Path, split_dir: Path, config: RunConfig, record: dict,
          loader_options: dict, info: DistInfo) -> dict:
    """Evaluate best.pt once on the test split (the original val/), by ``engine.evaluate_test``'s rule."""
    device = loader_options["device"]
    if info.is_main:
        raw_model.load_state_dict(ckpt_io.load_checkpoint(run_dir / "best.pt", map_location=device)["model"])
    broadcast_tensors(raw_model.state_dict().values(), info)  # no shared run folder needed
    test_set = data_lib.load_cache(split_dir, "test", record["input_size"])
    if list(test_set.classes) != record["classes"]:
        raise ValueError(f"test classes {test_set.classes} differ from training classes {record['classes']}")
    test_loader = data_lib.DeviceLoader(test_set.images, test_set.labels, config.eval_batch_size, train=False,
                                        **loader_options)
    result = engine.evaluate_test(raw_model, test_loader, device, tta=config.tta)
    return {"test_acc": result["test_acc"], "test_loss": result["test_loss"], "test_samples": result["test_samples"],
            "test_checkpoint": "best.pt", "test_precision": engine.TEST_PRECISION, "test_tta": config.tta}


def _write_summary(run_dir: Path, summary: dict, tracker) -> dict:
    """``summary`` and figures of metrics.jsonl merged into summary.json (and wandb's summary, whose run
    then finishes)."""
    speeds = [m["images_per_s"] for m in tracking.read_metrics(run_dir / "metrics.jsonl")]
    summary = _merge_summary(run_dir / "summary.json", {
        **summary, "epochs_run": len(speeds), "median_images_per_s": float(np.median(speeds)) if speeds else 0.0})
    if tracker is not None:
        tracker.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        tracker.finish(exit_code=0 if summary["status"] == "finished" else 1)
    return summary


def _merge_summary(path: Path, summary: dict) -> dict:
    """``summary`` merged into the run's summary.json, without test results that no longer describe
    their checkpoint: a resumed run that wrote a newer best.pt (or last.pt) than the one tested, by
    ``--test`` or ``part_a/evaluate.py``, drops them (test again to get them back)."""
    previous = files.read_json(path)
    if "test_acc" in previous and "test_acc" not in summary:
        tested = previous.get("test_checkpoint", "best.pt")
        now = summary["best_epoch"] if tested == "best.pt" else summary["epochs_run"]
        if previous.get("test_epoch") != now:
            previous = {k: v for k, v in previous.items() if k not in TEST_KEYS}
    merged = {**previous, **summary}
    files.write_json(path, merged)
    return merged
