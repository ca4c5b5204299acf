"""The whole study in one command, from the data to the report (docs/study.md).

    python common/study.py --data_dir data --out_dir runs [--count 30] [--workers K] [--quick]
                           [--part_b_weights FILE] [--seed 0]

Steps: prepare the data; run (or continue) the Part A sweep of sweep.yaml; test its best configuration
(reusing the trial's run when it trained with the same options) and draw the evaluation figures;
compare the Part B strategies of part_b/sweep.yaml; write OUT_DIR/study/report.md from the run
folders. OUT_DIR/study/state.json records each step: running the command again reuses the finished
ones and continues a failed or interrupted one from its run folders and sweep database.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial

from common import data, files, sweep
from common.config import UserError, add_dataclass_args, cli_main, from_namespace, to_cli
from common.sweep_space import load_sweep

ROOT = Path(__file__).resolve().parents[1]
PART_A_SWEEP = ROOT / "sweep.yaml"
PART_B_SWEEP = ROOT / "part_b" / "sweep.yaml"
DEFAULT_COUNT = 30
QUICK_COUNT = 5  # the fewest completed trials parameter importance needs
# --quick: small inputs, two epochs, narrow layers ('same' padding: five blocks need it at 32 px), a small backbone.
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
    """The steps' records in ``path`` (JSON, written atomically). A step that finished with the same
    inputs (``key``) is reused; any other runs, and its time adds to earlier tries with those inputs."""

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
        if record.get("status") == "done" and record.get("key") == key:
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
        except BaseException as error:
            self._save(name, {"status": "failed", "key": key, "error": f"{type(error).__name__}: {error}",
                              "seconds": spent + time.perf_counter() - started})
            raise
        self._save(name, {"status": status, "key": key, "result": result,
                          "seconds": spent + time.perf_counter() - started,
                          "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **self.environment})
        return result


@dataclass(frozen=True)
class Plan:
    """One sweep of the study: its file, study name, fixed overrides, and how many trials it should hold."""
    file: str
    study: str
    overrides: dict[str, Any]
    trials: int


def make_plan(file: Path, config: StudyConfig, quick: dict[str, Any], count: int | None = None,
              fixed: dict[str, Any] | None = None) -> Plan:
    """The sweep of ``file`` with ``fixed`` values (and ``quick`` ones with --quick); ``count`` None means
    every point of its grid. A quick study has its own name, so its small runs never join a full one."""
    overrides = {**(quick if config.quick else {}), **(fixed or {})}
    spec = load_sweep(file, overrides)  # a bad file fails here, before any step
    trials = count or math.prod(len(dist.choices) for dist in spec.search_space.values())
    name = (spec.name or file.stem) + ("_quick" if config.quick else "")
    return Plan(str(file.relative_to(ROOT)), name, overrides, trials)


def finished_trials(out_dir: str, study: str) -> list[FrozenTrial]:
    """The study's trials that ran to an end of their own (complete, pruned, or failed by their error)."""
    storage = sweep.default_storage(out_dir, study)
    if not sweep.database_path(out_dir, study).is_file() or study not in optuna.get_all_study_names(storage):
        return []
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    return [t for t in trials if t.state.is_finished() and not sweep.was_interrupted(t)]


def run_plan(plan: Plan, config: StudyConfig) -> dict:
    """Top the study up to ``plan.trials`` finished trials (interrupted ones run again first)."""
    storage = sweep.default_storage(config.out_dir, plan.study)
    missing = plan.trials - len(finished_trials(config.out_dir, plan.study))
    if missing > 0:
        sweep.sweep_main(sweep.SweepOptions(config=str(ROOT / plan.file), count=missing, study=plan.study,
                                            workers=config.workers, out_dir=config.out_dir,
                                            data_dir=config.data_dir, overrides=plan.overrides, seed=config.seed))
    return {"study": plan.study, "storage": storage, "file": plan.file, "overrides": plan.overrides}


def best_trial(plan: Plan, config: StudyConfig) -> FrozenTrial:
    storage = sweep.default_storage(config.out_dir, plan.study)
    try:
        return optuna.load_study(study_name=plan.study, storage=storage).best_trial
    except ValueError:  # no trial completed
        raise UserError(f"no trial of study {plan.study} completed; their errors are in "
                        f"{Path(config.out_dir) / 'sweeps' / f'{plan.study}_trials.csv'}; fix the cause and run "
                        "the same command again") from None


def same_finished_run(run_dir: Path | None, model_config, run_config) -> bool:
    """Whether ``run_dir`` finished training with these model options and these trajectory options."""
    from common.training import RESUME_MUST_MATCH
    if run_dir is None or not (run_dir / "best.pt").is_file():
        return False
    saved = files.read_json(run_dir / "config.json")
    wanted = {**dataclasses.asdict(model_config),
              **{name: getattr(run_config, name) for name in ("epochs", *RESUME_MUST_MATCH)}}
    return (files.read_json(run_dir / "summary.json").get("status") == "finished"
            and all(saved.get(name) == value for name, value in wanted.items()))


def best_run(trial: FrozenTrial, plan: Plan, config: StudyConfig) -> dict:
    """The best configuration trained for its full epochs: the trial's own run when it is one, else a
    new run (continued when an earlier try was cut short) tested at the end."""
    from part_a import train as part_a_train
    values = {**trial.user_attrs.get("fixed", {}), **trial.params, "out_dir": config.out_dir,
              "name": f"{plan.study}_best_{trial.number}", "test": True}
    model_config, run_config = part_a_train.config_from_args(to_cli(values))
    trial_dir = Path(trial.user_attrs["run_dir"]) if "run_dir" in trial.user_attrs else None
    if same_finished_run(trial_dir, model_config, run_config):
        print(f"study: trial {trial.number} trained the best configuration for its full epochs; "
              f"testing its run {trial_dir}", flush=True)
        return {"run_dir": str(trial_dir), "trial": trial.number, "retrained": False}
    run_dir = Path(run_config.out_dir) / run_config.name
    summary = files.read_json(run_dir / "summary.json")
    if not (summary.get("status") == "finished" and "test_acc" in summary):
        run_config.resume = (run_dir / "last.pt").is_file()
        part_a_train.run((model_config, run_config))
    return {"run_dir": str(run_dir), "trial": trial.number, "retrained": True}


def evaluate_best(run_dir: str, config: StudyConfig, study_dir: Path) -> dict:
    """Test metrics into the run's summary.json, and the evaluation figures into the study folder."""
    from common.evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(Path(run_dir) / "best.pt", config.data_dir, out_dir=study_dir)
    return {"figures": sorted(path.name for path in result["figures"].values())}


def run_part_b(plan: Plan, config: StudyConfig) -> dict:
    """The strategy grid, after loading the backbone's weights once: without them (no cache, no network,
    a bad file) Part B is skipped, saying what is missing and what to do."""
    from part_b.model import build_model
    try:
        build_model(load_sweep(ROOT / plan.file, plan.overrides).fixed)  # a dict: its run options are ignored
    except ValueError as error:  # the weights' error says where the file should be, or what is wrong with it
        raise StepSkipped(f"{error}\nThen run the same command again (with --part_b_weights FILE if the file "
                          "is elsewhere): the finished steps are reused and Part B runs.") from error
    return run_plan(plan, config)


def run_study(config: StudyConfig) -> Path:
    study_dir = Path(config.out_dir) / "study"
    count = config.count or (QUICK_COUNT if config.quick else DEFAULT_COUNT)
    part_a = make_plan(PART_A_SWEEP, config, QUICK_PART_A, count)
    part_b = make_plan(PART_B_SWEEP, config, QUICK_PART_B,
                       fixed={"weights": config.part_b_weights} if config.part_b_weights else None)
    steps = Steps(study_dir / "state.json")
    steps.run("prepare", {"data_dir": config.data_dir}, lambda: {"split_dir": str(data.prepare(config.data_dir))})
    steps.run("part_a_sweep", {**dataclasses.asdict(part_a), "seed": config.seed, "data_dir": config.data_dir},
              lambda: run_plan(part_a, config))
    trial = best_trial(part_a, config)
    best = steps.run("part_a_best", {"study": part_a.study, "trial": trial.number},
                     lambda: best_run(trial, part_a, config))
    steps.run("part_a_evaluate", {"run_dir": best["run_dir"]},
              lambda: evaluate_best(best["run_dir"], config, study_dir))
    steps.run("part_b", {**dataclasses.asdict(part_b), "seed": config.seed, "data_dir": config.data_dir},
              lambda: run_part_b(part_b, config))
    from common.study_report import write_report
    report = write_report(study_dir, steps.records)
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
