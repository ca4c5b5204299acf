"""The whole study in one command, from the data to the report (docs/study.md).

    python common/study.py --data_dir data --out_dir runs [--count 30] [--workers K] [--quick]
                           [--part_b_weights FILE] [--seed 0]

Steps are recorded in OUT_DIR/study/state.json: a rerun reuses one that finished with the same inputs
and whose outputs all exist, and redoes any other from its run folders and database.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from common import data, files, sweep
from common.bench_data import cpu_model
from common.config import UserError, add_dataclass_args, cli_main, from_namespace, option, to_cli
from common.data_cache import MANIFEST, read_manifest
from common.sweep import was_interrupted
from common.sweep_space import load_sweep

ROOT = Path(__file__).resolve().parents[1]
PART_A_SWEEP = ROOT / "sweep.yaml"
PART_B_SWEEP = ROOT / "part_b" / "sweep.yaml"
DEFAULT_COUNT = 30
QUICK_COUNT = 5  # the fewest completed trials parameter importance needs
# --quick: small inputs, two epochs, narrow layers ('same' padding: five blocks need it at 32 px), a small
# backbone; the batch sizes are the most, halved to fit small data (make_plan).
QUICK_PART_A = {"epochs": 2, "input_size": 32, "batch_size": 32, "padding": "same", "n_filters": 16}
QUICK_PART_B = {"model": "resnet18", "input_size": 32, "epochs": 2, "batch_size": 64}
QUICK = {PART_A_SWEEP: QUICK_PART_A, PART_B_SWEEP: QUICK_PART_B}


@dataclass
class StudyConfig:
    data_dir: str = option("data", "dataset root (prepared first when missing)")
    out_dir: str = option("runs", "the sweeps' trials and databases, the best run, and study/ (the report)")
    count: int | None = option(None, f"Part A trials in all (default {DEFAULT_COUNT}, --quick {QUICK_COUNT})")
    workers: int = option(1, "parallel sweep workers on this machine (one trial each)")
    quick: bool = option(False, "check an installation in minutes on a CPU: few, short, small trials")
    part_b_weights: str | None = option(None, "Part B's --weights NAME or FILE; none: part_b/sweep.yaml's")
    seed: int = option(0, "seed of the sweeps' proposals (each run keeps its own --seed)")


class StepSkipped(Exception):
    """A step that cannot run here (Part B without its weights); the study goes on and reports why."""


class Steps:
    """The steps' records in ``path``, with the machine and software they ran on. A step runs unless it
    is done with the same inputs (``key``) and ``outputs`` all there; its time adds up over such tries."""

    def __init__(self, path: Path):
        self.path, self.records = path, files.read_json(path)
        gpus = ", ".join(map(torch.cuda.get_device_name, range(torch.cuda.device_count()))) or "no GPU"
        names = ("torch", "torchvision", "numpy", "optuna", "wandb")
        versions = [f"{name} {importlib.metadata.version(name)}" for name in names]
        machine = f"{cpu_model()}, {os.cpu_count()} CPU threads, {gpus}"
        software = ", ".join([f"python {platform.python_version()}", *versions])
        self.environment = {"machine": machine, "software": software}

    def run(self, name: str, key: dict, work: Callable[[], dict]) -> dict:
        key = json.loads(json.dumps(key, default=str))  # as it reads back from the file
        old, started = self.records.get(name, {}), time.perf_counter()
        same = old.get("key") == key
        if same and old["status"] == "done" and all(map(os.path.isfile, old["result"].get("outputs", [""]))):
            print(f"study: {name}: reused (done {old['finished']})", flush=True)
            return old["result"]
        print(f"study: {name} ...", flush=True)

        def save(status: str, **record) -> None:
            seconds = (old["seconds"] if same else 0.0) + time.perf_counter() - started
            self.records[name] = {"status": status, "key": key, "seconds": seconds, **record}
            files.write_json(self.path, self.records)

        save("running")
        try:
            result, status = work(), "done"
        except StepSkipped as skipped:
            result, status = {"reason": str(skipped)}, "skipped"
            print(f"study: {name} skipped: {skipped}", file=sys.stderr, flush=True)
        except BaseException as error:  # Ctrl-C reaches here as itself or as the sweep runner's error
            stopped = isinstance(error, KeyboardInterrupt) or str(error).startswith(sweep.INTERRUPTED)
            save("interrupted" if stopped else "failed", error=f"{type(error).__name__}: {error}")
            raise
        save(status, result=result, finished=time.strftime("%Y-%m-%d %H:%M:%S"), **self.environment)
        return result


@dataclass(frozen=True)
class Dataset:  # the split: a digest of its manifest (each file's path, class, split, size, SHA-256)
    fingerprint: str
    train_images: int


@dataclass(frozen=True)
class Plan:  # one sweep; its study's name ends in a digest of every input that changes its trials
    file: str
    study: str
    overrides: dict[str, Any]
    trials: int


def make_plan(file: Path, config: StudyConfig, dataset: Dataset, count: int | None = None, **fixed) -> Plan:
    """The sweep of ``file`` with ``fixed`` (and QUICK) values; ``count`` None: every point of its grid."""
    from common.training import RunConfig

    overrides = {**(QUICK[file] if config.quick else {}), **fixed}
    if config.quick:  # a small dataset: at least two steps per epoch
        overrides["batch_size"] = min(overrides["batch_size"], max(1, dataset.train_images // 2))
    spec = load_sweep(file, overrides)  # a bad file fails here, before any step
    batch = spec.search_space.get("batch_size")
    largest = max(batch.choices) if batch else spec.fixed.get("batch_size", RunConfig.batch_size)
    if largest > dataset.train_images:
        fix = "run with --quick (it fits its batch sizes to the data) or give the file smaller ones"
        too_big = f"batch_size {largest} is larger than the {dataset.train_images} training images"
        raise UserError(f"{file.relative_to(ROOT)}: {too_big} of the data; {fix}")
    named_files = [v for v in overrides.values() if isinstance(v, str) and Path(v).is_file()]
    contents = {v: hashlib.sha256(Path(v).read_bytes()).hexdigest() for v in named_files}  # e.g. weights
    inputs = [file.read_text(), overrides, contents, config.seed, dataset.fingerprint]  # not the count
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:8]
    trials = count or math.prod(len(dist.choices) for dist in spec.search_space.values())
    name = f"{spec.name or file.stem}{'_quick' if config.quick else ''}_{digest}"
    return Plan(str(file.relative_to(ROOT)), name, overrides, trials)


def study_trials(out_dir: str, study: str) -> list[FrozenTrial]:
    storage = sweep.default_storage(out_dir, study)
    if sweep.database_path(out_dir, study).is_file() and study in optuna.get_all_study_names(storage):
        return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    return []


def failed(trial: FrozenTrial) -> bool:  # by an error of its own, not by Ctrl-C
    return trial.state == TrialState.FAIL and not was_interrupted(trial)


def lost(trial: FrozenTrial) -> bool:  # completed, but its run folder is gone
    run_dir = Path(trial.user_attrs.get("run_dir", ""))
    return trial.state == TrialState.COMPLETE and not (run_dir / "summary.json").is_file()


def run_plan(plan: Plan, config: StudyConfig, rerun_lost: bool = False) -> dict:
    """Top the study up to ``plan.trials`` ended trials, first running again a trial stopped by Ctrl-C, a
    failed one while none completed, and with ``rerun_lost`` a completed one whose run folder is gone."""
    storage, out_dir = sweep.default_storage(config.out_dir, plan.study), config.out_dir
    trials = study_trials(out_dir, plan.study)
    retried, completed = sweep.retried(trials), any(t.state == TrialState.COMPLETE for t in trials)
    # Ended: counts towards plan.trials (a trial stopped by Ctrl-C runs again, a retried one is replaced).
    ended = [t for t in trials if t.state.is_finished() and not (was_interrupted(t) or t.number in retried)]
    redo = [t for t in ended if (failed(t) and not completed) or (rerun_lost and lost(t))]
    if redo:  # queued as the runner queues interrupted trials: it takes them before proposing new ones
        database = sweep.open_storage(storage)
        sweep.requeue(database, optuna.load_study(study_name=plan.study, storage=database), redo)
    if (missing := plan.trials - len(ended) + len(redo)) > 0:
        where = {name: getattr(config, name) for name in ("workers", "out_dir", "data_dir", "seed")}
        options = sweep.SweepOptions(str(ROOT / plan.file), missing, plan.study, **where)
        options.overrides = plan.overrides
        sweep.sweep_main(options)  # a grid runs its queued retries too (sweep_space.GridSampler)
    trials = study_trials(out_dir, plan.study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and not (rerun_lost and lost(t))]
    if not complete:
        error = next((t.user_attrs["error"] for t in trials if failed(t)), "none recorded")
        table = Path(out_dir) / "sweeps" / f"{plan.study}_trials.csv"
        what = f"no trial of study {plan.study} completed; the first error: {error}"
        raise UserError(f"{what}; every trial is in {table}; fix the cause and run the same command again")
    outputs = [sweep.database_path(out_dir, plan.study)]
    outputs += [Path(t.user_attrs["run_dir"]) / "summary.json" for t in complete if rerun_lost]
    result = {"study": plan.study, "storage": storage, "file": plan.file, "overrides": plan.overrides}
    return {**result, "outputs": [str(path) for path in outputs]}


def finished_run(run_dir: Path) -> bool:
    summary = files.read_json(run_dir / "summary.json")
    return (run_dir / "best.pt").is_file() and summary.get("status") == "finished"


def best_run(trial: FrozenTrial, plan: Plan, config: StudyConfig, study_dir: Path) -> dict:
    """The best trial's own run (or its options trained again), tested; figures into the study folder."""
    from common.evaluate import evaluate_checkpoint
    from part_a import train as part_a_train

    run_dir = Path(trial.user_attrs["run_dir"])
    if retrained := not finished_run(run_dir):
        values = {**trial.user_attrs["fixed"], **trial.params, "name": f"{plan.study}_best_{trial.number}"}
        values.update(data_dir=config.data_dir, out_dir=config.out_dir)
        run_dir = Path(config.out_dir) / values["name"]
        if not finished_run(run_dir):
            values["resume"] = (run_dir / "last.pt").is_file()
            part_a_train.run(part_a_train.config_from_args(to_cli(values)))
    figures = evaluate_checkpoint(run_dir / "best.pt", config.data_dir, out_dir=study_dir)["figures"].values()
    outputs = [str(run_dir / "best.pt"), str(run_dir / "summary.json"), *map(str, figures)]
    result = {"run_dir": str(run_dir), "trial": trial.number, "retrained": retrained, "outputs": outputs}
    return {**result, "figures": sorted(Path(path).name for path in figures)}


def run_part_b(plan: Plan, config: StudyConfig) -> dict:
    """The strategy grid, skipped (saying what to do) when the backbone's weights cannot be loaded."""
    from part_b.model import build_model

    try:
        build_model(load_sweep(ROOT / plan.file, plan.overrides).fixed)  # a dict: its run options are ignored
    except ValueError as error:  # the weights' error says where the file should be, or what is wrong with it
        again = "Then run the same command again (with --part_b_weights FILE if the file is elsewhere)"
        raise StepSkipped(f"{error}\n{again}: the finished steps are reused and Part B runs.") from error
    return run_plan(plan, config, rerun_lost=True)


def run_study(config: StudyConfig) -> None:
    from common.study_report import write_report

    study_dir = Path(config.out_dir) / "study"
    try:
        split_dir = data.prepare(config.data_dir)  # does no work when the split is up to date
        train_images = sum(row["split"] == "train" for row in read_manifest(split_dir))
        dataset = Dataset(hashlib.sha256((split_dir / MANIFEST).read_bytes()).hexdigest(), train_images)
        weights = {"weights": config.part_b_weights} if config.part_b_weights else {}
        count = config.count or (QUICK_COUNT if config.quick else DEFAULT_COUNT)
        part_a = make_plan(PART_A_SWEEP, config, dataset, count)
        part_b = make_plan(PART_B_SWEEP, config, dataset, **weights)
        steps = Steps(study_dir / "state.json")
        steps.run("part_a_sweep", dataclasses.asdict(part_a), lambda: run_plan(part_a, config))
        storage = sweep.default_storage(config.out_dir, part_a.study)
        trial = optuna.load_study(study_name=part_a.study, storage=storage).best_trial
        best = {"study": part_a.study, "trial": trial.number}
        steps.run("part_a_best", best, lambda: best_run(trial, part_a, config, study_dir))
        try:
            steps.run("part_b", dataclasses.asdict(part_b), lambda: run_part_b(part_b, config))
        finally:  # also when Part B failed: the report says why
            print(f"study: report {write_report(study_dir, steps.records, split_dir)}", flush=True)
    except KeyboardInterrupt:
        raise UserError("interrupted (Ctrl-C); run the same command again to continue") from None


def get_args_parser() -> argparse.ArgumentParser:
    what = "data, Part A sweep, best model tested and explained, Part B strategies, a report (resumable)"
    parser = argparse.ArgumentParser(description=f"The whole study: {what}.")
    add_dataclass_args(parser, StudyConfig, "study")
    return parser


def main(argv: list[str] | None = None) -> int:
    def parse(argv: list[str] | None) -> StudyConfig:
        config = from_namespace(StudyConfig, get_args_parser().parse_args(argv))
        if (config.count is not None and config.count < 1) or config.workers < 1:
            raise ValueError(f"--count and --workers must be >= 1, got {config.count} and {config.workers}")
        return config

    return cli_main(parse, run_study, argv)


if __name__ == "__main__":
    sys.exit(main())
