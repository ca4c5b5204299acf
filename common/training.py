"""One training run from start to summary, shared by Part A and Part B: ``run`` reads top to bottom.

A part's model and normalisation come in as arguments, its command line from ``get_args_parser``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import os
import random
import secrets
import time
from dataclasses import asdict, dataclass, fields, replace
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
from common.config import add_dataclass_args, from_namespace, option
from common.distributed import DistInfo, all_gather_object, barrier, broadcast_tensors, process_group

OPTIMIZERS = ("adam", "adamw", "nadam", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Options that change the trajectory of a run: a resumed run must use the values it started with.
RESUME_MUST_MATCH = (
    *"batch_size optimizer learning_rate weight_decay momentum nesterov lr_schedule warmup_epochs".split(),
    *"label_smoothing grad_clip class_weights augment mixup_alpha cutmix_alpha ema_decay sync_bn".split(),
    *"seed split_seed val_fraction".split(),
)


@dataclass
class RunConfig:
    """Every option that is not the model's. epochs, optimizer, learning_rate and weight_decay default to
    10 epochs of torch's Adam; each train script gives its own (``get_args_parser(**defaults)``)."""

    data_dir: str = option("data", "dataset root (prepared automatically if missing)")
    out_dir: str = option("runs", "folder holding run folders")
    name: str | None = option(None, "run folder name (default: kind and time)")
    epochs: int = option(10, "training epochs")
    batch_size: int = option(32, "training batch size per process")
    eval_batch_size: int = option(256, "batch size for validation and test")
    optimizer: str = option("adam", "optimizer", choices=OPTIMIZERS)
    learning_rate: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.0, "weight decay (L2 for adam/nadam/sgd, decoupled for adamw)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum for SGD")
    lr_schedule: str = option("constant", "LR schedule after warmup", choices=SCHEDULES)
    warmup_epochs: float = option(0.0, "linear LR warmup, in epochs")
    label_smoothing: float = option(0.0, "label smoothing of the training loss")
    grad_clip: float = option(0.0, "clip the gradient norm to this (0: off)")
    class_weights: bool = option(False, "weight the loss by inverse class frequency")
    augment: bool = option(True, "random resized crop + horizontal flip on the device")
    mixup_alpha: float = option(0.0, "MixUp: mix each batch with itself shifted by one, ~Beta(a, a) (0: off)")
    cutmix_alpha: float = option(0.0, "CutMix: paste a box of the shifted batch, area ~ Beta(a, a) (0: off)")
    ema_decay: float = option(0.0, "EMA of the weights for validation, best.pt and the test (0: off)")
    tta: bool = option(False, "with --test: average the softmax of each test image and its mirror image")
    seed: int = option(42, "seed for initialisation, shuffling and augmentation")
    split_seed: int = option(42, "seed of the train/val split (data preparation)")
    val_fraction: float = option(0.2, "stratified fraction of train/ held out for validation")
    precision: str = option(
        "auto", "auto: bf16 on CUDA (fp16 before sm 8.0), MPS and XPU; fp32 on the CPU", choices=PRECISIONS
    )
    compile: bool | None = option(None, "torch.compile the model; default: on for CUDA, off elsewhere")
    cuda_graphs: bool | None = option(None, "replay each step as one CUDA graph (1 GPU); default: per model")
    channels_last: bool = option(True, "channels_last memory format for model and inputs")
    sync_bn: bool = option(False, "under torchrun on GPUs: SyncBatchNorm (slower; no torch.compile)")
    device: str = option("auto", "auto (CUDA, MPS or XPU, else the CPU), cpu, cuda, cuda:N, mps or xpu")
    deterministic: bool = option(False, "deterministic kernels: bit-identical GPU runs, at some speed")
    test: bool = option(False, "evaluate best.pt on the test split (the original val/) at the end")
    resume: bool = option(False, "continue runs/NAME from its last.pt")
    wandb_mode: str | None = option(None, "online, offline or disabled; default: online with credentials")
    wandb_project: str = option("inat12k", "wandb project")
    wandb_entity: str | None = option(None, "wandb entity (user or team)")
    wandb_group: str | None = option(None, "wandb group (the sweep runner sets it)")


def get_args_parser(model_config_class: type, description: str, **defaults) -> argparse.ArgumentParser:
    """The "model" options of the part, then the "training" options with the part's ``defaults``."""
    parser = argparse.ArgumentParser(description=description)
    add_dataclass_args(parser, model_config_class, "model")
    add_dataclass_args(parser, RunConfig, "training")
    parser.set_defaults(**defaults)
    return parser


def parse_configs(parser: argparse.ArgumentParser, model_class: type, argv: list[str] | None, check_model):
    """(model config, run config) of one command line, each checked before any data is read."""
    args = parser.parse_args(argv)
    model_config = check_model(from_namespace(model_class, args))
    run_config = from_namespace(RunConfig, args)
    validate_run_config(run_config)
    return model_config, run_config


def validate_run_config(config: RunConfig) -> None:
    """``ValueError`` for a bad option, also one the wandb mode or the device policy cannot take."""
    for name, ok, rule in [
        ("epochs", config.epochs >= 1, ">= 1"),
        ("batch_size", config.batch_size >= 1, ">= 1"),
        ("eval_batch_size", config.eval_batch_size >= 1, ">= 1"),
        ("learning_rate", config.learning_rate > 0, "> 0"),
        ("weight_decay", config.weight_decay >= 0, ">= 0"),
        ("label_smoothing", 0 <= config.label_smoothing < 1, "in [0, 1)"),
        ("grad_clip", config.grad_clip >= 0, ">= 0 (0: off)"),
        ("warmup_epochs", config.warmup_epochs >= 0, ">= 0"),
        ("mixup_alpha", config.mixup_alpha >= 0, ">= 0 (0: off)"),
        ("cutmix_alpha", config.cutmix_alpha >= 0, ">= 0 (0: off)"),
        ("ema_decay", 0 <= config.ema_decay < 1, "in [0, 1) (0: off; e.g. 0.999)"),
        ("val_fraction", 0 < config.val_fraction < 1, "in (0, 1)"),
    ]:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {getattr(config, name)}")
    if config.tta and not config.test:
        raise ValueError("--tta changes only the test: add --test (or part_a/evaluate.py --tta on best.pt)")
    if config.name is not None and (not config.name or "/" in config.name or config.name in (".", "..")):
        raise ValueError(f"name must be a plain folder name, got {config.name!r}")
    tracking.resolve_wandb_mode(config.wandb_mode)
    device_lib.resolve(config)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """Rank > 0 draws its own random numbers (dropout masks, Inductor's RNG), seeded from (seed, rank):
    with one seed every rank would draw the same masks. The weights still come from rank 0 (DDP)."""
    if rank > 0:
        digest = hashlib.sha256(f"{seed}:rank{rank}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def build_optimizer(config: RunConfig, model: nn.Module, param_groups: list[dict] | None, policy):
    """A group's ``lr_scale`` multiplies the learning rate. Fused kernels where the device has them (then
    fp16 loss scaling needs no host sync; nadam has none), capturable for CUDA graphs."""
    groups = [
        {**group, "lr_scale": float(group.get("lr_scale", 1.0))}
        for group in param_groups or [{"params": list(model.parameters())}]
    ]
    groups = [{**group, "lr": config.learning_rate * group["lr_scale"]} for group in groups]
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
    """``optimizer.load_state_dict(state)`` keeping the flags chosen for this device (a run saved on the
    CPU resumes with fused Adam on CUDA) and a learning rate it keeps in a tensor (CUDA graphs)."""
    flags = ("fused", "foreach", "capturable", "differentiable")
    groups = [
        {**saved, **{k: group[k] for k in flags if k in group}}
        for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True)
    ]
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
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


def build_training(config: RunConfig, policy, model, steps_per_epoch: int, labels, num_classes: int):
    """``model`` placed by the device policy, its optimizer (over its ``param_groups()`` if any), per-step
    schedule, step context and loss (``labels``: the training labels, for ``--class_weights``)."""
    model = device_lib.place(model, policy)
    param_groups = model.param_groups() if hasattr(model, "param_groups") else None
    optimizer = build_optimizer(config, model, param_groups, policy)
    steps, warmup = config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch)
    factor = engine.lr_lambda(config.lr_schedule, steps, warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)  # stepped once per batch
    if policy.cuda_graphs:  # a captured step reads its rate from the device, where the schedule writes it
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(group["lr"], device=policy.device)
    ema = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.amp_dtype == torch.float16)
    mix, update_ema = _mixing(config, num_classes), ema.update if ema else None
    device, graphs = policy.device, policy.cuda_graphs
    ctx = engine.StepContext(device, policy.amp_dtype, scaler, config.grad_clip, mix, update_ema, graphs)
    return Training(model, optimizer, scheduler, ctx, _loss(config, labels, num_classes, policy.device), ema)


class Data(NamedTuple):
    split_dir: Path
    train_set: Any  # data_cache.CachedSplit
    train_loader: data_lib.DeviceLoader
    val_loader: data_lib.DeviceLoader
    options: dict  # the loaders' device, normalisation and rank, for the test loader


def run(config: RunConfig, model_config, build, *, kind: str, mean, std, epoch_callback=None) -> dict:
    """Train ``build(model_config)``, its output layer sized to the data's classes; return the summary.
    A model's ``param_groups()`` become the optimizer's, its ``set_epoch(epoch)`` sets the layers that
    train in each epoch (Part B); ``epoch_callback(epoch, metrics)`` (the sweeps') runs after each
    checkpoint, and what it raises stops the run."""
    policy = device_lib.resolve(config, kind)
    with process_group(policy.device.type) as info:
        if info.enabled and policy.device.type == "cuda":  # one GPU per process
            policy = replace(policy, device=torch.device("cuda", info.local_rank))
        say = print if info.is_main else (lambda *args, **kwargs: None)
        run_dir = _run_dir(config, kind, info)
        data = _data(config, model_config.input_size, info, dict(device=policy.device, mean=mean, std=std))
        # One output per class of the data (10 for iNaturalist-12K, any number for your own); seeded
        # here, so the initial weights never depend on whether the data had to be prepared first.
        model_config = replace(model_config, num_classes=len(data.train_set.classes))
        seed_everything(config.seed)
        model = build(model_config)
        seed_rank(config.seed, info.rank)
        labels, classes = data.train_set.labels, model_config.num_classes
        parts = build_training(config, policy, model, len(data.train_loader), labels, classes)
        record = _record(kind, model_config, config, data)  # what every checkpoint says
        progress = dict(epoch=0, val_acc=None, best_val_acc=-1.0, best_epoch=0, wandb_id=None)
        if config.resume:
            progress = _resume(run_dir, config, record, parts, info)
        tracker = _start_tracking(run_dir, config, record, progress["wandb_id"]) if info.is_main else None
        progress["wandb_id"] = tracker.id if tracker is not None else None
        summary = dict(run_dir=str(run_dir), kind=kind, device=str(policy.device), world_size=info.world_size)
        summary.update(params=_count(parts.model, False), trainable_params=_count(parts.model, True))
        say(_describe(summary, config, policy, data))
        started, summary["status"], models = time.perf_counter(), "running", None
        try:
            for epoch in range(progress["epoch"] + 1, config.epochs + 1):
                if _set_epoch(parts.model, epoch, say) or models is None:
                    models = _wrap(parts, info, policy)  # again when the trainable set changed (DDP)
                metrics = {"epoch": epoch, **_train_and_validate(models, data, parts, epoch, config, info)}
                improved = metrics["val_acc"] > progress["best_val_acc"]
                if improved:
                    progress.update(best_val_acc=metrics["val_acc"], best_epoch=epoch)
                progress.update(epoch=epoch, val_acc=metrics["val_acc"])
                rng = all_gather_object(ckpt_io.rng_state(policy.device), info)  # every rank's, for last.pt
                if info.is_main:
                    _save_checkpoints(run_dir, {**record, **progress}, improved, parts, rng)
                    tracking.append_metrics(run_dir / "metrics.jsonl", metrics, tracker)
                    say(_format_epoch(metrics, config.epochs), flush=True)
                barrier(info)
                if epoch_callback is not None:
                    summary["status"] = "stopped"  # if it raises (a pruned trial): the folder is complete
                    epoch_callback(epoch, metrics)
                    summary["status"] = "running"
            summary["status"] = "finished"
            if config.test and progress["best_epoch"] > 0:
                summary.update(_test(parts.model, run_dir, data, config, record, info))
                summary["test_epoch"] = progress["best_epoch"]
                if tracker is not None:
                    tracker.log({k: summary[k] for k in ("test_acc", "test_loss")})
        except BaseException as error:
            stopped = summary["status"] == "stopped" or isinstance(error, KeyboardInterrupt)
            summary["status"] = "stopped" if stopped else "failed"
            summary["error"] = f"{type(error).__name__}: {error}"
            raise
        finally:
            summary.update(best_val_acc=max(progress["best_val_acc"], 0.0), best_epoch=progress["best_epoch"])
            summary["train_time_s"] = time.perf_counter() - started
            if info.is_main:
                summary = _write_summary(run_dir, summary, tracker)
    return summary


def default_run_name(kind: str) -> str:
    """Unique even for two runs started in one second; under ``wandb agent``, the agent's run id."""
    run_id = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
    return f"{kind}-{run_id}" if run_id else f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _run_dir(config: RunConfig, kind: str, info: DistInfo) -> Path:
    name = config.name or all_gather_object(default_run_name(kind), info)[0]  # rank 0's name on every rank
    run_dir = Path(config.out_dir) / name
    last = run_dir / "last.pt"
    if config.resume and not last.is_file():
        shared = "every machine reads it: --out_dir must be on a shared filesystem"
        elsewhere = "" if info.rank == info.local_rank else f" on this machine (rank {info.rank}; {shared})"
        raise ValueError(f"--resume: {last} does not exist{elsewhere}; drop --resume to start the run")
    if not config.resume and last.is_file():
        raise ValueError(f"{run_dir} already holds a run: pass --resume to continue it, or another --name")
    return run_dir


def _prepare_data(config: RunConfig, input_size: int, info: DistInfo) -> Path:
    """The split, prepared and decoded once per machine by its local rank 0 while the other ranks wait;
    a failure on any machine stops every rank with its message."""
    result: str | Exception | None = None
    if info.local_rank == 0:
        try:
            seeds = dict(val_fraction=config.val_fraction, seed=config.split_seed)
            split_dir = data_lib.prepare(config.data_dir, **seeds)
            for split in ("train", "val", "test") if config.test else ("train", "val"):
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
    return Path(results[info.rank - info.local_rank])  # this machine's local rank 0 (torchrun's numbering)


def _data(config: RunConfig, input_size: int, info: DistInfo, options: dict) -> Data:
    """The split (prepared once per machine) and its train and val loaders."""
    split_dir = _prepare_data(config, input_size, info)
    train_set, val_set = (data_lib.load_cache(split_dir, split, input_size) for split in ("train", "val"))
    options.update(channels_last=config.channels_last, rank=info.rank, world_size=info.world_size)
    loader = functools.partial(data_lib.DeviceLoader, **options)
    train_options = dict(train=True, augment=config.augment, seed=config.seed)
    train_loader = loader(train_set.images, train_set.labels, config.batch_size, **train_options)
    if len(train_loader) == 0:
        what = f"batch_size {config.batch_size} is larger than the {len(train_set.labels)} training images"
        raise ValueError(f"{what} per process; use a smaller --batch_size")
    val_loader = loader(val_set.images, val_set.labels, config.eval_batch_size, train=False)
    return Data(split_dir, train_set, train_loader, val_loader, options)


def _record(kind: str, model_config, config: RunConfig, data: Data) -> dict:
    """What every checkpoint of the run holds besides its weights and progress."""
    record = dict(kind=kind, model_config=asdict(model_config), run_config=asdict(config))
    record.update(classes=list(data.train_set.classes), input_size=model_config.input_size)
    record.update(mean=list(data.options["mean"]), std=list(data.options["std"]))
    return {**record, "split": data_lib.split_digests(data.split_dir), **ckpt_io.provenance()}


def _describe(summary: dict, config: RunConfig, policy: device_lib.Policy, data: Data) -> str:
    """What the run starts with, as said on the log (after the policy's notice, if any)."""
    notice = f"{policy.notice}\n" if policy.notice else ""
    dtype = "" if policy.amp_dtype is None else f" ({str(policy.amp_dtype).removeprefix('torch.')})"
    size, train, val = data.train_loader.size, len(data.train_set.labels), len(data.val_loader.labels)
    where = f"{summary['kind']} | {summary['run_dir']} | device {summary['device']} x{summary['world_size']}"
    how = f"precision {config.precision}{dtype} | compile {policy.compile} | cuda_graphs {policy.cuda_graphs}"
    params = f"params {summary['params']:,} ({summary['trainable_params']:,} trainable)"
    what = f"{params} | train {train} val {val} images at {size}x{size}"
    return f"{notice}{where} | {how} | channels_last {config.channels_last} | {what}"


def _loss(config: RunConfig, labels: torch.Tensor, num_classes: int, device: torch.device) -> nn.Module:
    weight = None
    if config.class_weights:  # inverse class frequency
        counts = torch.bincount(labels.long(), minlength=num_classes).double().clamp_min(1)
        weight = (counts.sum() / (num_classes * counts)).float().to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing, ignore_index=-1)


class WeightAverage:
    """An exponential moving average of ``model``'s weights and buffers in ``module`` (a copy at first):
    update t does ``average = d * average + (1 - d) * weights`` with TensorFlow's warm-up of the decay,
    ``d = min(decay, (1 + t) / (10 + t))``. It follows the raw module, which the wrappers share."""

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
    """torchvision's MixUp and/or CutMix (one of the two per batch when both are on, as timm does)."""
    mixes = ((v2.MixUp, config.mixup_alpha), (v2.CutMix, config.cutmix_alpha))
    chosen = [mix(alpha=alpha, num_classes=num_classes) for mix, alpha in mixes if alpha > 0]
    if len(chosen) == 2:
        return v2.RandomChoice(chosen)
    return chosen[0] if chosen else None


def _resume(run_dir: Path, config: RunConfig, record: dict, parts: Training, info: DistInfo) -> dict:
    """Everything back from last.pt, after checking it may resume here; the progress it saved."""
    path = run_dir / "last.pt"
    # To the CPU: the RNG states must stay CPU tensors; load_state_dict copies the rest to the device.
    state = ckpt_io.load_checkpoint(path, map_location="cpu")
    # A run saved before an option existed ran without it, i.e. with its default.
    saved_run = {**{f.name: f.default for f in fields(RunConfig)}, **state["run_config"]}
    given_run = {k: getattr(config, k) for k in RESUME_MUST_MATCH}
    checks = {"model": (state["model_config"], record["model_config"]), "training": (saved_run, given_run)}
    for what, (saved, given) in checks.items():
        if diff := {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}:
            differ = f"--resume: {what} options differ from those in {path} (saved, given): {diff}"
            raise ValueError(f"{differ}; a resumed run must use its original values")
    splits = ("train", "val", "test") if config.test else ("train", "val")  # test: this run will be tested
    if changes := data_lib.split_changes(state.get("split"), Path(config.data_dir) / "split", splits):
        what = f"--resume: the split in {config.data_dir} changed since this run started ({changes})"
        raise ValueError(f"{what}; a run trains on one split: start a new run (another --name, no --resume)")
    parts.model.load_state_dict(state["model"])
    if parts.ema is not None:  # its update count is the schedule's step count: one update per step
        parts.ema.module.load_state_dict(state["ema"])
        parts.ema.updates.fill_(state["scheduler"]["last_epoch"])
    load_optimizer_state(parts.optimizer, state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.ctx.scaler.is_enabled() and state["scaler"]:  # a run saved without fp16 has an empty one
        parts.ctx.scaler.load_state_dict(state["scaler"])
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank
    if info.rank < len(rng):  # a rank beyond the saved ones keeps its seed_rank stream
        ckpt_io.set_rng_state(rng[info.rank], parts.ctx.device)
    if info.is_main:  # lines logged after the checkpoint, before a crash, are not part of the run
        tracking.truncate_metrics(run_dir / "metrics.jsonl", state["epoch"])
        best = f"best val_acc {state['best_val_acc']:.4f} at epoch {state['best_epoch']}"
        print(f"resuming {run_dir} after epoch {state['epoch']} ({best})")
    return {k: state.get(k) for k in ("epoch", "val_acc", "best_val_acc", "best_epoch", "wandb_id")}


def _start_tracking(run_dir: Path, config: RunConfig, record: dict, resume_id: str | None):
    """config.json in the run folder, and the wandb run (None when disabled)."""
    full_config = {"kind": record["kind"], **record["model_config"], **record["run_config"]}
    files.write_json(run_dir / "config.json", full_config)
    init = dict(project=config.wandb_project, entity=config.wandb_entity, group=config.wandb_group)
    init.update(name=run_dir.name, config=full_config)
    return tracking.start_wandb(config.wandb_mode, run_dir, resume_id, **init)


def _count(model: nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _set_epoch(model: nn.Module, epoch: int, say: Callable) -> bool:
    """The model's ``set_epoch`` (Part B's strategies); whether the trainable layers changed."""
    if not hasattr(model, "set_epoch"):
        return False
    before = [p.requires_grad for p in model.parameters()]
    model.set_epoch(epoch)
    if changed := [p.requires_grad for p in model.parameters()] != before:
        say(f"epoch {epoch}: {model.extra_repr()}", flush=True)
    return changed


def _wrap(parts: Training, info: DistInfo, policy: device_lib.Policy) -> tuple[nn.Module, nn.Module]:
    """The model to train and the one to validate (with an EMA, the average): DDP, then compile, around
    the raw module. Built again when the trainable set changes: DDP fixes its parameters when built."""
    trained = device_lib.wrap(parts.model, policy, info)
    return trained, trained if parts.ema is None else device_lib.wrap(parts.ema.module, policy, DistInfo())


def _train_and_validate(models, data: Data, parts: Training, epoch: int, config: RunConfig, info) -> dict:
    """``engine.train_one_epoch``, then ``engine.evaluate``: the epoch's metrics."""
    (trained, validated), start = models, time.perf_counter()
    data.train_loader.set_epoch(epoch)
    with engine.out_of_memory_hint(config.batch_size, epoch):
        step = (parts.optimizer, parts.scheduler, parts.loss_fn, parts.ctx)
        metrics = engine.train_one_epoch(trained, data.train_loader, *step, epoch)
        if parts.ema is not None:  # rank 0's BN statistics in every rank's average, as DDP gives the model
            broadcast_tensors(parts.ema.module.buffers(), info)
        metrics.update(engine.evaluate(validated, data.val_loader, parts.ctx))
    lr = max(float(group["lr"]) for group in parts.optimizer.param_groups)
    return {**metrics, "lr": lr, "epoch_time_s": time.perf_counter() - start}


def _save_checkpoints(run_dir: Path, state: dict, improved: bool, parts: Training, rng: list) -> None:
    """best.pt (the validated weights: the EMA's if any) when val_acc improved; last.pt each epoch."""
    ema, model = parts.ema, parts.model.state_dict()
    averaged = {} if ema is None else {"ema": ema.module.state_dict()}
    if improved:
        ckpt_io.save_checkpoint(run_dir / "best.pt", {**state, "model": averaged.get("ema", model)})
    resume = dict(optimizer=parts.optimizer.state_dict(), scheduler=parts.scheduler.state_dict(), rng=rng)
    resume["scaler"] = parts.ctx.scaler.state_dict()
    ckpt_io.save_checkpoint(run_dir / "last.pt", {**state, "model": model, **averaged, **resume})


def _format_epoch(metrics: dict, epochs: int) -> str:
    m = metrics
    train = f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}"
    val = f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}"
    speed = f"{m['epoch_time_s']:6.1f} s | {m['images_per_s']:8.0f} img/s"
    return f"epoch {m['epoch']:>3}/{epochs} | {train} | {val} | lr {m['lr']:.2e} | {speed}"


def _test(model: nn.Module, run_dir: Path, data: Data, config: RunConfig, record: dict, info: DistInfo):
    """Evaluate best.pt once on the test split (the original val/), by ``engine.evaluate_test``'s rule."""
    batch_size, device = config.eval_batch_size, data.options["device"]
    if info.is_main:
        model.load_state_dict(ckpt_io.load_checkpoint(run_dir / "best.pt", map_location=device)["model"])
    broadcast_tensors(model.state_dict().values(), info)  # no shared run folder needed
    test = data_lib.load_cache(data.split_dir, "test", record["input_size"])
    if list(test.classes) != record["classes"]:
        raise ValueError(f"test classes {test.classes} differ from training classes {record['classes']}")
    loader = data_lib.DeviceLoader(test.images, test.labels, batch_size, train=False, **data.options)
    result = engine.evaluate_test(model, loader, device, tta=config.tta)
    tested = {k: result[k] for k in ("test_acc", "test_loss", "test_samples")}
    tested.update(test_checkpoint="best.pt", test_precision=engine.TEST_PRECISION, test_tta=config.tta)
    return tested


def _write_summary(run_dir: Path, summary: dict, tracker) -> dict:
    """``summary`` with metrics.jsonl's figures into summary.json and wandb, which then finishes."""
    speeds = [m["images_per_s"] for m in tracking.read_metrics(run_dir / "metrics.jsonl")]
    median = float(np.median(speeds)) if speeds else 0.0
    summary = {**summary, "epochs_run": len(speeds), "median_images_per_s": median}
    summary = _merge_summary(run_dir / "summary.json", summary)
    if tracker is not None:
        tracker.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        tracker.finish(exit_code=0 if summary["status"] == "finished" else 1)
    if summary["status"] == "finished":
        best = f"best val_acc {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']}"
        test = f" | test_acc {summary['test_acc']:.4f}" if "test_acc" in summary else ""
        print(f"{best}{test} | {run_dir}")
    return summary


def _merge_summary(path: Path, summary: dict) -> dict:
    """``summary`` merged into the run's summary.json, without test results that no longer describe
    their checkpoint: a resumed run that wrote a newer best.pt (or last.pt) than the one tested, by
    ``--test`` or ``part_a/evaluate.py``, drops them (test again to get them back)."""
    previous = files.read_json(path)
    if "test_acc" in previous and "test_acc" not in summary:
        tested = previous.get("test_checkpoint", "best.pt")
        now = summary["best_epoch"] if tested == "best.pt" else summary["epochs_run"]
        if previous.get("test_epoch") != now:  # every test_* key is a result of that test
            previous = {k: v for k, v in previous.items() if not k.startswith("test_")}
    merged = {**previous, **summary}
    files.write_json(path, merged)
    return merged
