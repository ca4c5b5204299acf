"""Benchmarks, one section per subcommand; each prints one JSON object on stdout (progress on stderr).

    python common/bench.py data [--quick]    decode-once cache + DeviceLoader vs ImageFolder + DataLoader
    python common/bench.py step [--quick]    the training step: eager, compile, CUDA graphs, per batch size
    python common/bench.py e2e [--quick]     a whole epoch, data included: ours vs ImageFolder + plain loop

``step`` and ``e2e`` time the training a run does: model, optimizer, precision, backend flags and
wrappers come from the part's own command line and ``training.build_training``, and the clock is
``engine.train_one_epoch``'s. A section is a config dataclass (its fields are the options), a
``check(config)`` that applies --quick and refuses bad options before anything runs, and a ``run``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

if __package__ in (None, ""):  # run as `python common/bench.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common import bench_data, engine, training
from common import device as device_lib
from common.config import add_dataclass_args, from_namespace, to_cli
from common.distributed import DistInfo

VARIANTS = {"eager": dict(compile=False, cuda_graphs=False),
            "compile": dict(compile=True, cuda_graphs=False),
            "graphs": dict(compile=False, cuda_graphs=True),
            "compile_graphs": dict(compile=True, cuda_graphs=True)}
STEP_QUICK = dict(input_size=32, batch_sizes=[8], steps=4, repeats=1, models=["part_a"], variants=["eager"])
E2E_QUICK = dict(images=40, input_size=32, batch_size=8)


@dataclass
class StepBenchConfig:
    models: list[str] = field(default_factory=lambda: ["part_a", "resnet50"], metadata={
        "help": "comma list: part_a (its train script's defaults), resnet50 (part_b's, all layers train)"})
    batch_sizes: list[int] = field(default_factory=lambda: [32, 128, 256], metadata={"help": "batch sizes"})
    input_size: int = field(default=224, metadata={"help": "square input side"})
    steps: int = field(default=20, metadata={"help": "steps per timed epoch"})
    repeats: int = field(default=3, metadata={"help": "timed epochs (the median is reported)"})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={
        "help": "comma list: eager, compile (--compile), graphs (--cuda_graphs), compile_graphs (both)"})
    precision: str = field(default="auto", metadata={"help": "the runs' --precision",
                                                     "choices": training.PRECISIONS})
    device: str = field(default="auto", metadata={"help": "the runs' --device"})
    quick: bool = field(default=False, metadata={"help": f"a seconds-long smoke run: {STEP_QUICK}"})


@dataclass
class E2EBenchConfig:
    images: int = field(default=500, metadata={"help": "generated 800x600 training JPEGs"})
    input_size: int = field(default=224, metadata={"help": "training resolution"})
    batch_size: int = field(default=32, metadata={"help": "training batch size (both loops)"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers of the plain loop"})
    compile: bool | None = field(default=None, metadata={"help": "our loop's --compile; default: the run's"})
    cuda_graphs: bool | None = field(default=None, metadata={
        "help": "our loop's --cuda_graphs; default: the run's"})
    device: str = field(default="auto", metadata={"help": "the runs' --device"})
    quick: bool = field(default=False, metadata={"help": f"a seconds-long smoke run: {E2E_QUICK}"})


def trainer(name: str, options: dict, steps_per_epoch: int) -> tuple[Callable, device_lib.Policy]:
    """What ``python part_a/train.py`` (``name`` part_a) or ``python part_b/train.py --model resnet50``
    (resnet50) trains with these options: its model, optimizer, precision, flags and wrappers, as
    ``epoch(loader)`` (``engine.train_one_epoch``), and its device policy."""
    if name == "part_a":
        from part_a import model as part, train as script
    else:
        from part_b import model as part, train as script
        options = dict(model="resnet50", weights="none", strategy="full", **options)
    model_config, run_config = script.config_from_args(to_cli(options))  # ValueError: cannot run here
    policy = device_lib.resolve(run_config, "part_a" if name == "part_a" else "part_b")
    torch.manual_seed(0)
    parts = training.build_training(run_config, policy, part.build_model(model_config), steps_per_epoch,
                                    torch.arange(model_config.num_classes), model_config.num_classes)
    return functools.partial(engine.train_one_epoch, device_lib.wrap(parts.model, policy, DistInfo()),
                             optimizer=parts.optimizer, scheduler=parts.scheduler, loss_fn=parts.loss_fn,
                             ctx=parts.ctx, epoch=1), policy


def gpu_busy_share(run: Callable[[], object], device: torch.device) -> float | None:
    """The share of ``run``'s wall time in which the GPU executes kernels or copies (torch.profiler);
    None off CUDA, where the question does not arise."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        with record_function("timed"):
            run()
    events = [e for e in profiler.events() if not e.is_user_annotation]
    window = next(e.time_range for e in events if e.name == "timed")
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    return covered_share(spans, window.start, window.end)


def covered_share(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """The share of [start, end] that the union of ``spans`` covers."""
    covered, reached = 0.0, start
    for span_start, span_end in sorted(spans):
        span_start, span_end = max(span_start, reached), min(span_end, end)
        if span_end > span_start:
            covered, reached = covered + span_end - span_start, span_end
    return covered / (end - start)


def check_step(config: StepBenchConfig) -> StepBenchConfig:
    """--quick replaces the options left at their defaults; unknown names are refused here."""
    if config.quick:
        defaults = StepBenchConfig()
        config = StepBenchConfig(**{k: STEP_QUICK[k] if k in STEP_QUICK and v == getattr(defaults, k) else v
                                    for k, v in config.__dict__.items()})
    device_lib.resolve_device(config.device)
    unknown = set(config.variants) - set(VARIANTS) | set(config.models) - {"part_a", "resnet50"}
    if unknown:
        raise ValueError(f"unknown variants or models {sorted(unknown)}; variants: {list(VARIANTS)}, models: "
                         "part_a, resnet50")
    if min(config.batch_sizes, default=0) < 1 or config.steps < 1 or config.repeats < 1:
        raise ValueError("--batch_sizes, --steps and --repeats must be at least 1")
    return config


def run_step(config: StepBenchConfig) -> dict:
    """Per model, batch size and variant: images/s and ms per step (medians of ``repeats`` epochs), the
    share of a step the GPU is busy, and the warm-up (compile, capture). Variants run one after another,
    each freed before the next (a compile resets Dynamo, which an interleaved one would then redo)."""
    device = device_lib.resolve_device(config.device)
    results = []
    for name in config.models:
        for batch_size in config.batch_sizes:
            row = {"model": name, "batch_size": batch_size, "variants": {}}
            for variant in config.variants:
                row["variants"][variant] = _time_variant(name, batch_size, variant, config)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(row)
    return {"section": "step", "hardware": bench_data.hardware(device), "config": config.__dict__,
            "results": results}


def _time_variant(name: str, batch_size: int, variant: str, config: StepBenchConfig) -> dict:
    options = dict(device=config.device, precision=config.precision, batch_size=batch_size,
                   input_size=config.input_size, wandb_mode="disabled", **VARIANTS[variant])
    try:
        epoch, policy = trainer(name, options, config.steps)
    except ValueError as error:  # e.g. CUDA graphs on a CPU
        return {"skipped": str(error)}
    size, memory_format = config.input_size, torch.channels_last if policy.channels_last else None
    images = torch.randn(batch_size, 3, size, size, device=policy.device)
    images = images.contiguous(memory_format=memory_format or torch.contiguous_format)
    batch = (images, torch.randint(0, 10, (batch_size,), device=policy.device))  # one batch: the step alone
    start = time.perf_counter()
    epoch([batch] * (engine.WARMUP_STEPS + 2))  # compiles, autotunes, captures
    warmup_s = time.perf_counter() - start
    rates = [epoch([batch] * config.steps)["images_per_s"] for _ in range(config.repeats)]
    rate = statistics.median(rates)
    busy = gpu_busy_share(lambda: epoch([batch] * config.steps), policy.device)
    return {"images_per_s": rate, "ms_per_step": 1000 * batch_size / rate, "runs": rates,
            "warmup_s": warmup_s, "gpu_busy": busy, "precision": _precision(policy)}


def _precision(policy: device_lib.Policy) -> str:
    return str(policy.amp_dtype).removeprefix("torch.") if policy.amp_dtype else "fp32"


def _plain_epoch(model: torch.nn.Module, loader, device: torch.device) -> tuple[float, int]:
    """The loop most scripts write: eager fp32, NCHW, torch's default flags, a host sync per step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    seen, start = 0, time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        loss.item()
        seen += len(labels)
    bench_data.synchronize(device)
    return time.perf_counter() - start, seen


def _e2e_options(config: E2EBenchConfig) -> dict:
    """Our run's options: the e2e ones, and its own defaults for --compile and --cuda_graphs unless given."""
    chosen = (("compile", config.compile), ("cuda_graphs", config.cuda_graphs))
    return dict(device=config.device, batch_size=config.batch_size, input_size=config.input_size,
                wandb_mode="disabled", **{name: value for name, value in chosen if value is not None})


def check_e2e(config: E2EBenchConfig) -> E2EBenchConfig:
    """--quick applied; what our run or the image count would refuse is refused before any image exists."""
    from part_a import train as part_a_train
    if config.quick:
        config = E2EBenchConfig(**{**config.__dict__, **E2E_QUICK})
    bench_data.check_images(config.images, config.batch_size)
    part_a_train.config_from_args(to_cli(_e2e_options(config)))
    return config


def run_e2e(config: E2EBenchConfig) -> dict:
    """One Part A training epoch, data included: the plain loop first (torch's default flags), then ours
    (the run's), each over the same generated images."""
    from common.data import DeviceLoader, load_cache, prepare
    from part_a.model import MEAN, STD, ModelConfig, build_model
    device = device_lib.resolve_device(config.device)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        bench_data.generate(Path(tmp), config.images)
        with contextlib.redirect_stdout(sys.stderr):
            split_dir = prepare(tmp, val_fraction=bench_data.VAL_FRACTION)
        start = time.perf_counter()
        cached = load_cache(split_dir, "train", config.input_size)
        cache_build_s = time.perf_counter() - start
        torch.manual_seed(0)
        folder = bench_data.imagefolder_loader(split_dir / "train", bench_data.DataBenchConfig(
            size=config.input_size, batch_size=config.batch_size, workers=config.workers), device)
        plain_s, plain_seen = _plain_epoch(build_model(ModelConfig(input_size=config.input_size)).to(device),
                                           folder, device)
        del folder
        epoch, policy = trainer("part_a", _e2e_options(config), len(cached.labels) // config.batch_size)
        loader = DeviceLoader(cached.images, cached.labels, config.batch_size, policy.device, train=True,
                              augment=True, seed=0, mean=MEAN, std=STD, channels_last=policy.channels_last)
        epochs = []
        for number in range(2):  # the first warms up (compiles, captures)
            start = time.perf_counter()
            loader.set_epoch(number)
            epochs.append({**epoch(loader), "wall_s": time.perf_counter() - start})
    ours_rate, plain_rate = epochs[1]["images_per_s"], plain_seen / plain_s
    return {"section": "e2e", "hardware": bench_data.hardware(device), "config": config.__dict__,
            "ours": {"images_per_s": ours_rate, "compile": policy.compile, "cuda_graphs": policy.cuda_graphs,
                     "channels_last": policy.channels_last, "precision": _precision(policy),
                     "first_epoch_s_incl_compile": epochs[0]["wall_s"], "cache_build_s": cache_build_s},
            "plain_imagefolder_eager": {"images_per_s": plain_rate, "workers": config.workers},
            "ratio": ours_rate / plain_rate}


class Section(NamedTuple):
    help: str
    config: type
    check: Callable[[object], object]  # the config with --quick applied; ValueError for a bad option
    run: Callable[[object], dict]


SECTIONS: dict[str, Section] = {
    "data": Section("images/s of the cached device loader vs ImageFolder + DataLoader, and the cache build rate",
                    bench_data.DataBenchConfig, bench_data.check, bench_data.run),
    "step": Section("training-step images/s, ms/step and GPU busy share: eager, compile, CUDA graphs",
                    StepBenchConfig, check_step, run_step),
    "e2e": Section("one epoch with data: decode-once cache + our engine vs ImageFolder + a plain eager loop",
                   E2EBenchConfig, check_e2e, run_e2e),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="project benchmarks; each section prints one JSON object")
    sections = parser.add_subparsers(dest="section", required=True)
    for name, section in SECTIONS.items():
        add_dataclass_args(sections.add_parser(name, help=section.help), section.config, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    section = SECTIONS[args.section]
    try:
        config = section.check(from_namespace(section.config, args))
    except ValueError as error:  # a bad option: one line and exit code 2, as argparse's own errors
        parser.error(str(error))
    print(json.dumps(section.run(config), indent=2))  # an error from here on is a bug: traceback
    return 0


if __name__ == "__main__":
    sys.exit(main())
