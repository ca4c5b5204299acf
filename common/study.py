"""The whole study in one command, from the data to the report (docs/study.md).

    python common/study.py --data_dir data --out_dir runs [--count 30] [--workers K] [--quick]
                           [--part_b_weights FILE] [--seed 0]

Prepares the data, runs (or continues) the Part A sweep of sweep.yaml, tests its best configuration and
draws its figures, compares the Part B strategies of part_b/sweep.yaml, and writes OUT_DIR/study/report.md
from the run folders. OUT_DIR/study/state.json records the steps: a rerun reuses a step that finished
with the same inputs whose outputs all exist, and redoes any other from its run folders and database.
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
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from common import data, files, sweep
from common.config import UserError, add_dataclass_args, cli_main, from_namespace, to_cli
from common.data_cache import MANIFEST, read_manifest
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


@dataclass
class StudyConfig:
    data_dir: str = field(default="data", metadata={"help": "dataset root (prepared first when missing)"})
    out_dir: str = field(default="runs", metadata={
        "help": "runs folder: the sweeps' trials and databases, the best run, and study/ with the report"})
    count: int | None = field(default=None, metadata={
        "help": f"Part A sweep trials to have finished in all; none = {DEFAULT_COUNT}, or {QUICK_COUNT} with --quick"})
    workers: int = field(default=1, metadata={"help": "parallel sweep workers on this machine (one trial each)"})
    quick: bool = field(default=False, metadata={
        "help": f"check an installation in minutes on a CPU: a {QUICK_COUNT}-trial sweep of "
                f"{QUICK_PART_A['epochs']}-epoch runs at {QUICK_PART_A['input_size']} px, Part B with "
                f"{QUICK_PART_B['model']} at {QUICK_PART_B['input_size']} px"})
    part_b_weights: str | None = field(default=None, metadata={
        "help": "Part B pretrained weights, passed to part_b/train.py --weights (a weights name or a "
                "state-dict FILE); none = part_b/sweep.yaml's, read from the torch hub cache"})
    seed: int = field(default=0, metadata={"help": "seed of the sweeps' proposals (each run keeps its own --seed)"})


class StepSkipped(Exception):
    """A step that cannot run here (Part B without its weights); the study goes on and reports why."""


def environment() -> dict[str, str]:
    """The machine and the software a step ran on, for the report."""
    import torch

    from common.bench_data import cpu_model
    cpu = cpu_model()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    software = [f"python {platform.python_version()}"] + [
        f"{name} {importlib.metadata.version(name)}" for name in ("torch", "torchvision", "numpy", "optuna", "wandb")]
    return {"machine": f"{cpu}, {os.cpu_count()} CPU threads, " + (", ".join(gpus) or "no GPU"),
            "software": ", ".join(software)}


class Steps:
    """The steps' records in ``path`` (JSON, written atomically). A step that finished with the same inputs
    (``key``) and whose ``outputs`` (files its result lists) all exist is reused; any other runs, and its
    time adds to earlier tries with those inputs."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = files.read_json(path)
        self.environment = environment()

    def _save(self, name: str, record: dict) -> None:
        self.records[name] = record
        files.write_json(self.path, self.records)

    def run(self, name: str, key: dict, work: Callable[[], dict]) -> dict:
        key = json.loads(json.dumps(key, default=str))  # as it reads back from the file
        record = self.records.get(name, {})
        outputs = [Path(path) for path in record.get("result", {}).get("outputs", [""])]
        if record.get("status") == "done" and record.get("key") == key and all(map(Path.is_file, outputs)):
            print(f"study: {name}: reused (done {record['finished']})", flush=True)
            return record["result"]
        print(f"study: {name} ...", flush=True)
        spent = record.get("seconds", 0.0) if record.get("key") == key else 0.0
        self._save(name, {"status": "running", "key": key, "seconds": spent})
        started = time.perf_counter()
        try:
            result, status = work(), "done"
        except StepSkipped as skipped:
            result, status = {"reason": str(skipped)}, "skipped"
            print(f"study: {name} skipped: {skipped}", file=sys.stderr, flush=True)
        except BaseException as error:  # Ctrl-C reaches here as itself or as the sweep runner's error
            stopped = isinstance(error, KeyboardInterrupt) or str(error).startswith(sweep.INTERRUPTED)
            self._save(name, {"status": "interrupted" if stopped else "failed", "key": key,
                              "error": f"{type(error).__name__}: {error}",
                              "seconds": spent + time.perf_counter() - started})
            raise
        self._save(name, {"status": status, "key": key, "result": result,
                          "seconds": spent + time.perf_counter() - started,
                          "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **self.environment})
        return result


@dataclass(frozen=True)
class Dataset:
    """What the study needs of the prepared split: a fingerprint of its manifest (every file's path,
    class, split, size and SHA-256) and the number of training images."""
    fingerprint: str
    train_images: int


def read_dataset(split_dir: Path) -> Dataset:
    return Dataset(hashlib.sha256((split_dir / MANIFEST).read_bytes()).hexdigest(),
                   sum(row["split"] == "train" for row in read_manifest(split_dir)))


@dataclass(frozen=True)
class Plan:
    """One sweep of the study: its file, study name, fixed overrides, and how many trials it should hold.
    The name ends in a digest of every input that changes the trials' results but their count (make_plan),
    so other inputs make another study, whose trials never mix with these."""
    file: str
    study: str
    overrides: dict[str, Any]
    trials: int


def make_plan(file: Path, config: StudyConfig, dataset: Dataset, quick: dict[str, Any],
              count: int | None = None, fixed: dict[str, Any] | None = None) -> Plan:
    """The sweep of ``file`` with ``fixed`` values (and ``quick`` ones with --quick); ``count`` None means
    every point of its grid. Refuses a batch size larger than the training split."""
    from common.training import RunConfig
    overrides = {**(quick if config.quick else {}), **(fixed or {})}
    if config.quick:  # a small dataset: at least two steps per epoch
        overrides["batch_size"] = min(overrides["batch_size"], max(1, dataset.train_images // 2))
    spec = load_sweep(file, overrides)  # a bad file fails here, before any step
    batch = spec.search_space.get("batch_size")
    if (largest := max(batch.choices) if batch else spec.fixed.get("batch_size", RunConfig.batch_size)) > \
            dataset.train_images:
        raise UserError(f"{file.relative_to(ROOT)}: batch_size {largest} is larger than the "
                        f"{dataset.train_images} training images of the data; run with --quick (it fits "
                        "its batch sizes to the data) or give the file smaller batch sizes")
    trials = count or math.prod(len(dist.choices) for dist in spec.search_space.values())
    named_files = {v: hashlib.sha256(Path(v).read_bytes()).hexdigest() for v in overrides.values()
                   if isinstance(v, str) and Path(v).is_file()}  # a weights file counts by its content
    inputs = [file.read_text(), overrides, named_files, config.seed, dataset.fingerprint]
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f"{spec.name or file.stem}{'_quick' if config.quick else ''}_{digest}"
    return Plan(str(file.relative_to(ROOT)), name, overrides, trials)


def study_trials(out_dir: str, study: str) -> list[FrozenTrial]:
    storage = sweep.default_storage(out_dir, study)
    if not sweep.database_path(out_dir, study).is_file() or study not in optuna.get_all_study_names(storage):
        return []
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def has_run(trial: FrozenTrial) -> bool:
    return (Path(trial.user_attrs.get("run_dir", "")) / "summary.json").is_file()


def run_plan(plan: Plan, config: StudyConfig, rerun_lost: bool = False) -> dict:
    """Top the study up to ``plan.trials`` ended trials. Run again, first: a trial stopped by Ctrl-C (the
    runner queues it), a failed one while no trial has completed, and with ``rerun_lost`` a completed one
    whose run folder is gone. Raises, with the first error, when no trial has completed."""
    trials = study_trials(config.out_dir, plan.study)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    completed = any(t.state == TrialState.COMPLETE for t in trials)
    ended = [t for t in trials
             if t.state.is_finished() and not sweep.was_interrupted(t) and t.number not in retried]
    redo = [t for t in ended if (t.state == TrialState.FAIL and not completed)
            or (rerun_lost and t.state == TrialState.COMPLETE and not has_run(t))]
    storage = sweep.default_storage(config.out_dir, plan.study)
    for trial in redo:  # queued: the runner takes them before proposing new trials
        optuna.load_study(study_name=plan.study, storage=storage).enqueue_trial(
            trial.params, user_attrs={"retry_of": trial.number})
    if (missing := plan.trials - len(ended) + len(redo)) > 0:
        sweep.sweep_main(sweep.SweepOptions(config=str(ROOT / plan.file), count=missing, study=plan.study,
                                            workers=config.workers, out_dir=config.out_dir,
                                            data_dir=config.data_dir, overrides=plan.overrides, seed=config.seed))
    trials = study_trials(config.out_dir, plan.study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and (has_run(t) or not rerun_lost)]
    if not complete:
        error = next((t.user_attrs["error"] for t in trials if t.state == TrialState.FAIL
                      and not sweep.was_interrupted(t)), "none recorded")
        table = Path(config.out_dir) / "sweeps" / f"{plan.study}_trials.csv"
        raise UserError(f"no trial of study {plan.study} completed; the first error: {error}; every trial "
                        f"is in {table}; fix the cause and run the same command again")
    outputs = [sweep.database_path(config.out_dir, plan.study)] + [
        Path(t.user_attrs["run_dir"]) / "summary.json" for t in complete if rerun_lost]
    return {"study": plan.study, "storage": storage, "file": plan.file, "overrides": plan.overrides,
            "outputs": [str(path) for path in outputs]}


def finished_run(run_dir: Path) -> bool:
    return (run_dir / "best.pt").is_file() and files.read_json(run_dir / "summary.json").get(
        "status") == "finished"


def best_run(trial: FrozenTrial, plan: Plan, config: StudyConfig, study_dir: Path) -> dict:
    """The best configuration trained for its full epochs, then tested by ``common/evaluate.py`` (test metrics
    into the run's summary.json, figures into the study folder). The runner trained the trial's own run with
    exactly the trial's options, so that run is used while it is there; else the options are trained again
    (a started try continues)."""
    from common.evaluate import evaluate_checkpoint
    from part_a import train as part_a_train
    run_dir = Path(trial.user_attrs["run_dir"])
    if retrained := not finished_run(run_dir):
        values = {**trial.user_attrs["fixed"], **trial.params, "data_dir": config.data_dir,
                  "out_dir": config.out_dir, "name": f"{plan.study}_best_{trial.number}"}
        run_dir = Path(config.out_dir) / values["name"]
        if not finished_run(run_dir):
            values["resume"] = (run_dir / "last.pt").is_file()
            part_a_train.run(part_a_train.config_from_args(to_cli(values)))
    figures = [str(path) for path in evaluate_checkpoint(run_dir / "best.pt", config.data_dir,
                                                         out_dir=study_dir)["figures"].values()]
    return {"run_dir": str(run_dir), "trial": trial.number, "retrained": retrained,
            "figures": sorted(Path(path).name for path in figures),
            "outputs": [str(run_dir / "best.pt"), str(run_dir / "summary.json"), *figures]}


def run_part_b(plan: Plan, config: StudyConfig) -> dict:
    """The strategy grid, after loading the backbone's weights once: without them (no cache, no network,
    a bad file) Part B is skipped, saying what is missing and what to do."""
    from part_b.model import build_model
    try:
        build_model(load_sweep(ROOT / plan.file, plan.overrides).fixed)  # a dict: its run options are ignored
    except ValueError as error:  # the weights' error says where the file should be, or what is wrong with it
        raise StepSkipped(f"{error}\nThen run the same command again (with --part_b_weights FILE if the file "
                          "is elsewhere): the finished steps are reused and Part B runs.") from error
    return run_plan(plan, config, rerun_lost=True)


def run_study(config: StudyConfig) -> Path:
    from common.study_report import write_report
    study_dir = Path(config.out_dir) / "study"
    split_dir = data.prepare(config.data_dir)  # does no work when the split is up to date
    dataset = read_dataset(split_dir)
    part_a = make_plan(PART_A_SWEEP, config, dataset, QUICK_PART_A,
                       config.count or (QUICK_COUNT if config.quick else DEFAULT_COUNT))
    part_b = make_plan(PART_B_SWEEP, config, dataset, QUICK_PART_B,
                       fixed={"weights": config.part_b_weights} if config.part_b_weights else None)
    steps = Steps(study_dir / "state.json")
    steps.run("part_a_sweep", dataclasses.asdict(part_a), lambda: run_plan(part_a, config))
    trial = optuna.load_study(study_name=part_a.study, storage=sweep.default_storage(config.out_dir,
                                                                                     part_a.study)).best_trial
    steps.run("part_a_best", {"study": part_a.study, "trial": trial.number},
              lambda: best_run(trial, part_a, config, study_dir))
    try:
        steps.run("part_b", dataclasses.asdict(part_b), lambda: run_part_b(part_b, config))
    finally:  # also when Part B failed: the report says why
        report = write_report(study_dir, steps.records, split_dir)
        print(f"study: report {report}", flush=True)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="The whole study: data, Part A sweep, best model tested and "
                                     "explained, Part B strategies, and a report (resumable).")
    add_dataclass_args(parser, StudyConfig, "study")
    return parser


def config_from_args(argv: list[str] | None = None) -> StudyConfig:
    config = from_namespace(StudyConfig, get_args_parser().parse_args(argv))
    if (config.count is not None and config.count < 1) or config.workers < 1:
        raise ValueError(f"--count and --workers must be >= 1, got {config.count} and {config.workers}")
    return config


def work(config: StudyConfig) -> None:
    try:
        run_study(config)
    except KeyboardInterrupt:
        raise UserError("interrupted (Ctrl-C); run the same command again to continue") from None


def main(argv: list[str] | None = None) -> int:
    return cli_main(config_from_args, work, argv)


if __name__ == "__main__":
    sys.exit(main())
