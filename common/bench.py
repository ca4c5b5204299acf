"""Benchmarks, one section per subcommand; each prints one JSON object on stdout (progress on stderr).

    python common/bench.py data [--quick]    decode-once cache + DeviceLoader vs ImageFolder + DataLoader
    python common/bench.py step [--quick]    the training step: eager, compile, CUDA graphs, per batch size
    python common/bench.py e2e [--quick]     a whole epoch, data included: ours vs ImageFolder + plain loop

``step`` and ``e2e`` time the training a run does: model, optimizer, precision, backend flags and
wrappers come from the part's own command line and ``training.build_training``, and the clock is
``engine.train_one_epoch``'s. A section is a config dataclass (the options) and a ``run``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as `python common/bench.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common import bench_data, engine, training
from common import device as device_lib
from common.bench_data import DataBenchConfig, check_options, option, run_data, timed
from common.config import add_dataclass_args, from_namespace, to_cli
from common.distributed import DistInfo

VARIANTS = ("eager", "compile", "graphs", "compile_graphs")  # the runs' --compile and --cuda_graphs
MODELS = ("part_a", "resnet50")


@dataclass
class StepBenchConfig:
    """training-step images/s, ms/step and GPU busy share: eager, compile, CUDA graphs"""

    QUICK = dict(input_size=32, batch_sizes=[8], steps=4, repeats=1, models=["part_a"], variants=["eager"])
    models: list[str] = option(list(MODELS), "comma list: part_a (its defaults), resnet50 (part_b's, full)")
    batch_sizes: list[int] = option([32, 128, 256], "batch sizes")
    input_size: int = option(224, "square input side")
    steps: int = option(20, "steps per timed epoch")
    repeats: int = option(3, "timed epochs (the median is reported)")
    variants: list[str] = option(list(VARIANTS), "comma list: eager, compile, graphs (--cuda_graphs), both")
    precision: str = option("auto", "the runs' --precision", choices=training.PRECISIONS)
    device: str = option("auto", "the runs' --device")
    quick: bool = option(False, f"a seconds-long smoke run: {QUICK}")

    def check(self) -> None:
        if unknown := set(self.variants) - set(VARIANTS) | set(self.models) - set(MODELS):
            raise ValueError(f"unknown variants or models {sorted(unknown)}: choose from {VARIANTS + MODELS}")


@dataclass
class E2EBenchConfig:
    """one epoch with data: decode-once cache + our engine vs ImageFolder + a plain eager loop"""

    QUICK = dict(images=40, input_size=32, batch_size=8)
    images: int = option(500, "generated 800x600 training JPEGs")
    input_size: int = option(224, "training resolution")
    batch_size: int = option(32, "training batch size (both loops)")
    workers: int = option(2, "DataLoader workers of the plain loop")
    compile: bool | None = option(None, "our loop's --compile; default: the run's")
    cuda_graphs: bool | None = option(None, "our loop's --cuda_graphs; default: the run's")
    device: str = option("auto", "the runs' --device")
    quick: bool = option(False, f"a seconds-long smoke run: {QUICK}")

    def run_options(self) -> dict:  # --compile and --cuda_graphs none: the run's own defaults
        names = ("device", "batch_size", "input_size", "compile", "cuda_graphs")
        return {name: getattr(self, name) for name in names}

    def check(self) -> None:
        from part_a import train as part_a_train

        bench_data.check_images(self.images, self.batch_size)
        part_a_train.config_from_args(to_cli(self.run_options()))  # what our run would refuse


def trainer(name: str, options: dict, steps: int) -> tuple[Callable, device_lib.Policy]:
    """What ``part_a/train.py`` (``name`` part_a) or ``part_b/train.py --model resnet50`` trains with these
    options (model, optimizer, precision, flags, wrappers) as ``epoch(loader)``, and its device policy."""
    kind = "part_a" if name == "part_a" else "part_b"
    part, script = (importlib.import_module(f"{kind}.{module}") for module in ("model", "train"))
    if kind == "part_b":
        options = dict(model="resnet50", weights="none", strategy="full", **options)
    model_config, run_config = script.config_from_args(to_cli(dict(options, wandb_mode="disabled")))
    policy, classes = device_lib.resolve(run_config, kind), model_config.num_classes
    torch.manual_seed(0)
    model = part.build_model(model_config)
    run = training.build_training(run_config, policy, model, steps, torch.arange(classes), classes)
    model = device_lib.wrap(run.model, policy, DistInfo())
    step = (run.optimizer, run.scheduler, run.loss_fn, run.ctx)
    return lambda loader: engine.train_one_epoch(model, loader, *step, 1), policy


def gpu_busy_share(run: Callable[[], object], device: torch.device) -> float | None:
    """The share of ``run``'s wall time the GPU is busy (kernels, copies; torch.profiler); None off CUDA."""
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


def run_step(config: StepBenchConfig) -> dict:
    """Per model, batch size and variant: images/s and ms per step (medians of ``repeats`` epochs), the
    share of a step the GPU is busy, and the warm-up (compile, autotuning, capture)."""
    results = []
    for name in config.models:
        for batch_size in config.batch_sizes:
            variants = {v: _time_variant(name, batch_size, v, config) for v in config.variants}
            results.append({"model": name, "batch_size": batch_size, "variants": variants})
    hardware = bench_data.hardware(device_lib.resolve_device(config.device))
    return {"section": "step", "hardware": hardware, "config": vars(config), "results": results}


def _time_variant(name: str, batch_size: int, variant: str, config: StepBenchConfig) -> dict:
    """One variant, freed before the next: a compile resets Dynamo, which an interleaved one would redo."""
    gc.collect()
    torch.cuda.empty_cache()
    size, flags = config.input_size, dict(compile="compile" in variant, cuda_graphs="graphs" in variant)
    options = dict(device=config.device, precision=config.precision, batch_size=batch_size, input_size=size)
    try:
        epoch, policy = trainer(name, dict(options, **flags), config.steps)
    except ValueError as error:  # e.g. CUDA graphs on a CPU
        return {"skipped": str(error)}
    layout = torch.channels_last if policy.channels_last else torch.contiguous_format
    images = torch.randn(batch_size, 3, size, size, device=policy.device).contiguous(memory_format=layout)
    batch = [(images, torch.randint(0, 10, (batch_size,), device=policy.device))]  # one batch: the step alone
    warmup_s, _ = timed(epoch, batch * (engine.WARMUP_STEPS + 2))  # compiles, autotunes, captures
    rates = [epoch(batch * config.steps)["images_per_s"] for _ in range(config.repeats)]
    rate, busy = statistics.median(rates), gpu_busy_share(lambda: epoch(batch * config.steps), policy.device)
    figures = dict(images_per_s=rate, ms_per_step=1000 * batch_size / rate, runs=rates, warmup_s=warmup_s)
    return dict(figures, gpu_busy=busy, precision=str(policy.amp_dtype or "fp32").removeprefix("torch."))


def run_e2e(config: E2EBenchConfig) -> dict:
    """One Part A training epoch, data included, over the same generated images: first the loop most
    scripts write (eager fp32, NCHW, torch's default flags, a host sync per step), then ours (the run's)."""
    from common.data import DeviceLoader, load_cache
    from part_a.model import MEAN, STD, ModelConfig, build_model

    device = device_lib.resolve_device(config.device)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        _, split_dir = bench_data.generate_split(Path(tmp), config.images)
        cache_build_s, cached = timed(load_cache, split_dir, "train", config.input_size)
        torch.manual_seed(0)
        folder = bench_data.imagefolder_loader(split_dir / "train", config.input_size, config, device)
        model = build_model(ModelConfig(input_size=config.input_size)).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def plain_step(images: torch.Tensor, labels: torch.Tensor) -> None:  # eager fp32, NCHW, synced
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            loss.item()

        plain_s, _, plain_seen = bench_data.timed_epochs(folder, device, 1, plain_step)[0]
        del folder  # its workers stop before ours runs
        epoch, policy = trainer("part_a", config.run_options(), len(cached.labels) // config.batch_size)
        options = dict(train=True, augment=True, mean=MEAN, std=STD, channels_last=policy.channels_last)
        loader = DeviceLoader(cached.images, cached.labels, config.batch_size, policy.device, **options)
        epochs = []
        for number in range(2):  # the first warms up (compiles, captures)
            loader.set_epoch(number)
            epochs.append(timed(epoch, loader))
    (first_s, _), (_, ours) = epochs
    ours_rate, plain_rate = ours["images_per_s"], plain_seen / plain_s
    flags = {name: getattr(policy, name) for name in ("compile", "cuda_graphs", "channels_last")}
    precision = str(policy.amp_dtype or "fp32").removeprefix("torch.")
    ours = {"images_per_s": ours_rate, **flags, "precision": precision}
    ours.update(first_epoch_s_incl_compile=first_s, cache_build_s=cache_build_s)
    plain = {"images_per_s": plain_rate, "workers": config.workers}
    result = {"section": "e2e", "hardware": bench_data.hardware(device), "config": vars(config), "ours": ours}
    return dict(result, plain_imagefolder_eager=plain, ratio=ours_rate / plain_rate)


SECTIONS = {"data": (DataBenchConfig, run_data), "step": (StepBenchConfig, run_step)}
SECTIONS["e2e"] = (E2EBenchConfig, run_e2e)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="project benchmarks; each section prints one JSON object")
    sections = parser.add_subparsers(dest="section", required=True)
    for name, (config_class, _) in SECTIONS.items():
        add_dataclass_args(sections.add_parser(name, help=config_class.__doc__), config_class, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    config_class, run = SECTIONS[args.section]
    if args.quick:  # a smoke run: its values replace the options left at their defaults
        defaults = vars(parser.parse_args([args.section]))
        vars(args).update({k: v for k, v in config_class.QUICK.items() if getattr(args, k) == defaults[k]})
    config = from_namespace(config_class, args)
    try:  # refused before anything runs, with one line and exit code 2, as argparse's own errors
        check_options(config)
        config.check()
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(run(config), indent=2))  # an error from here on is a bug: traceback
    return 0


if __name__ == "__main__":
    sys.exit(main())
