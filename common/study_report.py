"""The study's report, written on each run of ``common/study.py``: OUT_DIR/study/report.md with its PNGs,
and results.json with the same numbers. One ``*_results`` function per section collects its facts from the
split, run folders, sweep databases and step records; ``render`` fills ``study_report.md.j2`` with them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import optuna
import torch
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState
from torch import nn

from common import files, sweep_report, tracking
from common.config import from_namespace
from common.data_cache import read_manifest
from common.figures import save_figure
from common.flops import count_config, question1_text
from common.sweep import was_interrupted
from common.sweep_space import load_sweep

ROOT = Path(__file__).resolve().parents[1]


def data_results(split_dir: Path) -> dict:
    """The split's classes and sizes (manifest.csv); what its test and validation sets are (prepare.json)."""
    rows, prepared = read_manifest(split_dir), files.read_json(split_dir / "prepare.json")
    source, test_fraction = prepared.get("source"), prepared.get("test_fraction")
    origin = "the original `train/`" if source is None else f"`{source}`"
    val = f"a stratified {prepared.get('val_fraction', 0):.0%} of each class of {origin}"
    if source is None:
        test = "the original `val/` of iNaturalist-12K"
    elif test_fraction:
        test = f"a stratified {test_fraction:.0%} of each class of `{source}`"
    else:
        test = f"the test folder given in `{source}`"
    classes, images = sorted({row["class"] for row in rows}), Counter(row["split"] for row in rows)
    return {"split_dir": str(split_dir), "classes": classes, "images": images, "test": test, "val": val}


def _describe(dist) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "one of " + ", ".join(map(str, dist.choices))
    kind = "log-uniform" if dist.log else "integers" if isinstance(dist, IntDistribution) else "uniform"
    return f"{kind} {dist.low:g} to {dist.high:g}" + (f", step {dist.step:g}" if dist.step else "")


def sweep_results(result: dict, study_dir: Path) -> dict:
    study = optuna.load_study(study_name=result["study"], storage=result["storage"])
    spec = load_sweep(ROOT / result["file"], result["overrides"])
    metric, best = sweep_report.metric_name(study), study.best_trial
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    importance, method = sweep_report.parameter_importance(study)
    corr = sweep_report.correlations(complete)
    order = sweep_report.ranking(importance, corr)
    drawn = {"sweep_metric_per_trial": sweep_report.plot_metric_per_trial(study)}
    if order:
        axes = order[: sweep_report.PARALLEL_AXES]
        drawn["sweep_parallel_coordinates"] = sweep_report.plot_parallel_coordinates(study, axes)
    if importance:
        drawn["sweep_importance"] = sweep_report.plot_importance(study, method)
    if any(not math.isnan(c["strength"]) for c in corr.values()):
        drawn["sweep_correlations"] = sweep_report.plot_correlations(corr, order, metric)
    states = Counter("interrupted" if was_interrupted(t) else t.state.name.lower() for t in study.trials)
    results = {"study": study.study_name, "file": result["file"], "method": spec.method, "metric": metric}
    results.update(maximize=spec.goal == "maximize", trials=dict(states), complete=len(complete))
    results["space"] = {name: _describe(dist) for name, dist in spec.search_space.items()}
    results["fixed"] = {k: v for k, v in spec.fixed.items() if k not in ("data_dir", "out_dir")}
    results["best"] = {"trial": best.number, "value": best.value, "params": best.params}
    results["best"].update(command=sweep_report.best_command(study), run_dir=best.user_attrs.get("run_dir"))
    results.update(importance=importance, importance_method=method, correlations=corr, order=order)
    results["observations"] = sweep_report.observations(importance, method, corr, metric)
    results["figures"] = [save_figure(fig, study_dir / f"{k}.png", dpi=120).name for k, fig in drawn.items()]
    return results


def question1_results(run_dir: Path) -> dict:
    """Question 1 for the trained configuration (``common/flops.py``), and the model's own count."""
    from part_a.model import ModelConfig

    config = from_namespace(ModelConfig, files.read_json(run_dir / "config.json"))
    counts = count_config(config)
    results = {name: getattr(counts, name) for name in ("macs", "flops", "element_ops", "params")}
    results["model_params"] = files.read_json(run_dir / "summary.json").get("params")
    return {"input_size": config.input_size, **results, "text": question1_text(config, counts)}


def best_model_results(best: dict) -> dict:
    run_dir = Path(best["run_dir"])
    summary = files.read_json(run_dir / "summary.json")
    metrics = tracking.read_metrics(run_dir / "metrics.jsonl")
    train_acc = next(m["train_acc"] for m in metrics if m["epoch"] == summary["best_epoch"])
    results = {name: best[name] for name in ("run_dir", "trial", "retrained", "figures")}
    results.update({k: summary.get(k) for k in ("epochs_run", "best_epoch", "test_acc", "test_loss")})
    results.update(train_acc=train_acc, val_acc=summary["best_val_acc"])
    results.update(per_class=summary["test_per_class_acc"], device=summary.get("device"))
    return {**results, "augment": files.read_json(run_dir / "config.json").get("augment")}


def _strategy_row(run_dir: Path) -> dict:
    """One Part B run: what trained, how long, how well; the head and setup from its model rebuilt on meta."""
    from torchvision.models import get_model_weights

    from part_b.model import build_from_config, normalisation, resolve_config

    saved, summary = files.read_json(run_dir / "config.json"), files.read_json(run_dir / "summary.json")
    with torch.device("meta"):
        model = build_from_config(saved)
    config, head = model.config, model.layout.head
    linears = [m for m in model.net.get_submodule(head).modules() if isinstance(m, nn.Linear)]
    setup = {name: getattr(config, name) for name in ("model", "weights", "input_size", "backbone_lr_scale")}
    setup["mean"], setup["std"] = normalisation(config)
    setup["native_input_size"] = resolve_config({**saved, "input_size": None}).input_size
    setup["imagenet_classes"] = len(get_model_weights(config.model).DEFAULT.meta["categories"])
    setup.update(head_layer=head, outputs=config.num_classes, learning_rate=saved["learning_rate"])
    times = [m["epoch_time_s"] for m in tracking.read_metrics(run_dir / "metrics.jsonl")]
    row = {name: summary.get(name) for name in ("trainable_params", "params", "best_val_acc", "test_acc")}
    row["trainable_params_last_epoch"] = model.set_epoch(summary["epochs_run"])["trainable_params"]
    row.update(run_dir=str(run_dir), epochs=summary["epochs_run"], epoch_time_s=statistics.mean(times))
    return {**row, "head": [linears[0].in_features, *(m.out_features for m in linears)], "setup": setup}


def part_b_results(record: dict) -> dict:
    """Per strategy, its last completed run, else how its trials ended (failed with an error, interrupted)."""
    if record.get("status") != "done":
        reason = record.get("result", {}).get("reason") or record.get("error", "")
        return {"status": record.get("status", "not run"), "reason": reason}
    result = record["result"]
    study = optuna.load_study(study_name=result["study"], storage=result["storage"])
    strategies = load_sweep(ROOT / result["file"], result["overrides"]).search_space["strategy"].choices
    rows: dict[str, dict] = {name: {} for name in strategies}  # {}: no trial of it has ended
    for trial in study.trials:
        strategy, run_dir = trial.params.get("strategy"), Path(trial.user_attrs.get("run_dir", ""))
        if trial.state == TrialState.COMPLETE and (run_dir / "summary.json").is_file():
            rows[strategy] = _strategy_row(run_dir)
        elif trial.state == TrialState.FAIL and "run_dir" not in rows[strategy]:
            error = "interrupted" if was_interrupted(trial) else f"failed: {trial.user_attrs['error']}"
            rows[strategy] = {"ended": error}
    return {"status": "done", "study": result["study"], "rows": rows}


def write_report(study_dir: Path, records: dict[str, dict], split_dir: Path) -> Path:
    """results.json and report.md (with the sweep's figures) in ``study_dir``; returns the report's path."""
    best = records["part_a_best"]["result"]
    results = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "data": data_results(split_dir)}
    results["question1"] = question1_results(Path(best["run_dir"]))
    results["sweep"] = sweep_results(records["part_a_sweep"]["result"], study_dir)
    results["best_model"] = best_model_results(best)
    results["part_b"] = part_b_results(records.get("part_b", {}))
    steps = [name for name in ("part_a_sweep", "part_a_best", "part_b") if name in records]
    keys = ("status", "seconds", "finished", "machine", "software")
    results["steps"] = {name: {k: records[name].get(k) for k in keys} for name in steps}
    files.write_json(study_dir / "results.json", results)
    with files.atomic_path(study_dir / "report.md") as tmp:
        tmp.write_text(render(results))
    return study_dir / "report.md"


def render(results: dict) -> str:
    places = Counter((r["machine"], r["software"]) for r in results["steps"].values() if r["machine"])
    return sweep_report.render("study_report.md.j2", {**results, "places": places, "duration": _duration})


def _duration(seconds: float | None) -> timedelta:
    return timedelta(seconds=round(seconds or 0))
