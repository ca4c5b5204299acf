"""The study's report, written again each time ``common/study.py`` runs: OUT_DIR/study/report.md with its
PNGs, and results.json holding the same numbers for other tools. One ``*_results`` function per section
collects its facts from the data split, run folders, sweep databases and step records; one ``_*_markdown``
function per section turns them into sentences. Nothing in it is typed by hand.
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
from common.data_cache import MANIFEST, read_manifest
from common.figures import save_figure
from common.flops import count_config, question1_text
from common.sweep import was_interrupted
from common.sweep_space import load_sweep

ROOT = Path(__file__).resolve().parents[1]
STEP_TITLES = {"part_a_sweep": "Part A sweep", "part_a_best": "best configuration trained, tested, explained",
               "part_b": "Part B strategies"}


def data_results(split_dir: Path) -> dict:
    """The split's classes and sizes (manifest.csv); what its test and validation sets are (prepare.json)."""
    rows, prepared = read_manifest(split_dir), files.read_json(split_dir / "prepare.json")
    source, test_fraction = prepared.get("source"), prepared.get("test_fraction")
    val = f"a stratified {prepared.get('val_fraction', 0):.0%} of each class of " + (
        "the original `train/`" if source is None else f"`{source}`")
    test = ("the original `val/` of iNaturalist-12K" if source is None
            else f"a stratified {test_fraction:.0%} of each class of `{source}`" if test_fraction
            else f"the test folder given in `{source}`")
    return {"split_dir": str(split_dir), "classes": sorted({row["class"] for row in rows}),
            "images": Counter(row["split"] for row in rows), "test": test, "val": val}


def _describe(dist) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "one of " + ", ".join(map(str, dist.choices))
    kind = "log-uniform" if dist.log else "integers" if isinstance(dist, IntDistribution) else "uniform"
    return f"{kind} {dist.low:g} to {dist.high:g}" + (f", step {dist.step:g}" if dist.step else "")


def sweep_results(result: dict, study_dir: Path) -> dict:
    """The Part A sweep: space, trial counts, best trial, importance, correlations, observations, figures."""
    study = optuna.load_study(study_name=result["study"], storage=result["storage"])
    spec = load_sweep(ROOT / result["file"], result["overrides"])
    metric = sweep_report.metric_name(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    importance, method = sweep_report.parameter_importance(study)
    corr = sweep_report.correlations(complete)
    order = sweep_report.ranking(importance, corr)
    drawn = {"sweep_metric_per_trial": sweep_report.plot_metric_per_trial(study)}
    if order:
        drawn["sweep_parallel_coordinates"] = sweep_report.plot_parallel_coordinates(
            study, order[:sweep_report.PARALLEL_AXES])
    if importance:
        drawn["sweep_importance"] = sweep_report.plot_importance(study, method)
    if any(not math.isnan(c["strength"]) for c in corr.values()):
        drawn["sweep_correlations"] = sweep_report.plot_correlations(corr, order, metric)
    best = study.best_trial
    return {"study": study.study_name, "file": result["file"], "method": spec.method, "metric": metric,
            "maximize": spec.goal == "maximize", "trials": dict(Counter(
                "interrupted" if was_interrupted(t) else t.state.name.lower() for t in study.trials)),
            "space": {name: _describe(dist) for name, dist in spec.search_space.items()},
            "fixed": {k: v for k, v in spec.fixed.items() if k not in ("data_dir", "out_dir")},
            "best": {"trial": best.number, "value": best.value, "params": best.params,
                     "command": sweep_report.best_command(study), "run_dir": best.user_attrs.get("run_dir")},
            "complete": len(complete), "importance": importance, "importance_method": method,
            "correlations": corr, "order": order,
            "observations": sweep_report.observations(importance, method, corr, metric),
            "figures": [save_figure(fig, study_dir / f"{name}.png", dpi=120).name for name, fig in drawn.items()]}


def question1_results(run_dir: Path) -> dict:
    """Question 1 for the trained configuration, from ``common/flops.py`` (its text evaluates the formula
    where the configuration is the Question 1 network), and the model's own count."""
    from part_a.model import ModelConfig
    config = from_namespace(ModelConfig, files.read_json(run_dir / "config.json"))
    counts = count_config(config)
    return {"input_size": config.input_size, "macs": counts.macs, "flops": counts.flops,
            "element_ops": counts.element_ops, "params": counts.params,
            "model_params": files.read_json(run_dir / "summary.json").get("params"),
            "text": question1_text(config, counts)}


def best_model_results(best: dict) -> dict:
    """Train (at the best epoch), validation and test accuracy, per-class test accuracy, figures."""
    run_dir = Path(best["run_dir"])
    summary = files.read_json(run_dir / "summary.json")
    at_best = next(m for m in tracking.read_metrics(run_dir / "metrics.jsonl") if m["epoch"] == summary["best_epoch"])
    return {"run_dir": str(run_dir), "trial": best["trial"], "retrained": best["retrained"],
            "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"], "train_acc": at_best["train_acc"],
            "val_acc": summary["best_val_acc"], "test_acc": summary["test_acc"], "test_loss": summary["test_loss"],
            "per_class": summary["test_per_class_acc"], "device": summary.get("device"),
            "augment": files.read_json(run_dir / "config.json").get("augment"), "figures": best["figures"]}


def _strategy_row(run_dir: Path) -> dict:
    """One Part B run: what trained, for how long, how well, with the trainable count at the last epoch,
    the head's widths and the setup (input, normalisation, head) from its model rebuilt on the meta device."""
    from torchvision.models import get_model_weights

    from part_b.model import build_from_config, normalisation, resolve_config
    saved, summary = files.read_json(run_dir / "config.json"), files.read_json(run_dir / "summary.json")
    with torch.device("meta"):
        model = build_from_config(saved)
    config = model.config
    linears = [m for m in model.net.get_submodule(model.layout.head).modules() if isinstance(m, nn.Linear)]
    mean, std = normalisation(config)
    setup = {"model": config.model, "weights": config.weights, "input_size": config.input_size,
             "native_input_size": resolve_config({**saved, "input_size": None}).input_size, "mean": mean,
             "std": std, "imagenet_classes": len(get_model_weights(config.model).DEFAULT.meta["categories"]),
             "head_layer": model.layout.head, "outputs": config.num_classes,
             "learning_rate": saved["learning_rate"], "backbone_lr_scale": config.backbone_lr_scale}
    return {"run_dir": str(run_dir), "trainable_params": summary["trainable_params"],
            "trainable_params_last_epoch": model.set_epoch(summary["epochs_run"])["trainable_params"],
            "params": summary["params"], "epochs": summary["epochs_run"],
            "epoch_time_s": statistics.mean(m["epoch_time_s"]
                                            for m in tracking.read_metrics(run_dir / "metrics.jsonl")),
            "best_val_acc": summary["best_val_acc"], "test_acc": summary.get("test_acc"),
            "head": [linears[0].in_features, *(layer.out_features for layer in linears)], "setup": setup}


def part_b_results(record: dict) -> dict:
    """Per strategy, its last completed run, else how its trials ended (failed with an error, interrupted)."""
    if record.get("status") != "done":
        return {"status": record.get("status", "not run"),
                "reason": record.get("result", {}).get("reason") or record.get("error", "")}
    result = record["result"]
    study = optuna.load_study(study_name=result["study"], storage=result["storage"])
    rows: dict[str, dict] = {name: {} for name in load_sweep(ROOT / result["file"], result["overrides"])
                             .search_space["strategy"].choices}  # {}: no trial of it has ended
    for trial in study.trials:
        strategy, run_dir = trial.params.get("strategy"), Path(trial.user_attrs.get("run_dir", ""))
        if trial.state == TrialState.COMPLETE and (run_dir / "summary.json").is_file():
            rows[strategy] = _strategy_row(run_dir)
        elif trial.state == TrialState.FAIL and "run_dir" not in rows[strategy]:
            rows[strategy] = {"ended": "interrupted" if was_interrupted(trial)
                              else f"failed: {trial.user_attrs['error']}"}
    return {"status": "done", "study": result["study"], "rows": rows}


def write_report(study_dir: Path, records: dict[str, dict], split_dir: Path) -> Path:
    """results.json and report.md (with the sweep's figures) in ``study_dir``; returns the report's path."""
    best = records["part_a_best"]["result"]
    results = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "data": data_results(split_dir),
               "question1": question1_results(Path(best["run_dir"])),
               "sweep": sweep_results(records["part_a_sweep"]["result"], study_dir),
               "best_model": best_model_results(best), "part_b": part_b_results(records.get("part_b", {})),
               "steps": {name: {k: records[name].get(k) for k in ("status", "seconds", "finished", "machine",
                                                                  "software")}
                         for name in STEP_TITLES if name in records}}
    files.write_json(study_dir / "results.json", results)
    report = study_dir / "report.md"
    with files.atomic_path(report) as tmp:
        tmp.write_text(render(results))
    return report


# --- markdown -------------------------------------------------------------------------------------

def _data_markdown(d: dict) -> list[str]:
    n = Counter(d["images"])
    return ["## Data", "", f"`{d['split_dir']}` (`{MANIFEST}`): {len(d['classes'])} classes "
            f"({', '.join(d['classes'])}); {n['train']} training, {n['val']} validation and {n['test']} test "
            f"images. Test set: {d['test']}; validation set: {d['val']}.", ""]


def _question1_markdown(q1: dict) -> list[str]:
    w = q1["input_size"]
    lines = ["## Question 1: computations and parameters", "",
             f"The best configuration (below) at {w}x{w}: **{q1['macs']:,} multiply-accumulates "
             f"({q1['flops']:,} FLOPs at 2 per multiply-accumulate)**, {q1['element_ops']:,} element-wise "
             f"operations, and **{q1['params']:,} parameters** per image, counted by `common/flops.py` from "
             f"the layer shapes; the trained model's `summary.json` says {q1['model_params']:,} parameters.",
             ""]
    return lines + ["```text", q1["text"], "```", ""]


def _sweep_markdown(s: dict) -> list[str]:
    trials = sum(s["trials"].values())
    lines = ["## Part A: the sweep", "",
             f"Study `{s['study']}` of `{s['file']}` ({s['method']} search, `{s['metric']}` "
             f"{'maximized' if s['maximize'] else 'minimized'}): {trials} trials, "
             + ", ".join(f"{n} {state}" for state, n in s["trials"].items()) + ".", "",
             "| parameter | searched |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in s["space"].items()), "",
             "Fixed for every trial: " + (", ".join(f"`{k}={v}`" for k, v in s["fixed"].items()) or "nothing") + ".",
             "", *(f"![{name}]({name})" for name in s["figures"]), "",
             "### Best configuration", "",
             f"Trial {s['best']['trial']}: {s['metric']} = {s['best']['value']:.4f} "
             f"(run folder `{s['best']['run_dir']}`).", "", "| parameter | value |", "| --- | --- |",
             *(f"| {k} | {v} |" for k, v in s["best"]["params"].items()), "",
             "The command that trains it again (add `--test` to test it):", "", "```", s["best"]["command"], "```", "",
             "### Parameter importance", "", *sweep_report.importance_table(s["importance"], s["importance_method"]),
             f"### Correlation with {s['metric']}", "",
             *sweep_report.correlation_tables(s["metric"], s["order"], s["correlations"], s["maximize"]), "",
             "## Observations", ""]
    if not s["observations"]:
        return lines + [f"From {s['complete']} completed trials no parameter could be ranked: "
                        f"{s['importance_method']}.", ""]
    ranked_by = f"importance ({s['importance_method'].split(' (')[0]})" if s["importance"] else "correlation strength"
    return lines + [f"From {s['complete']} completed trials, the parameters ranked highest by {ranked_by}:",
                    "",
                    *(f"- {sentence}" for sentence in s["observations"]), ""]


def _best_model_markdown(b: dict, metric: str, test_set: str) -> list[str]:
    origin = (f"trained again for its full epochs, as trial {b['trial']}'s own run was gone or unfinished"
              if b["retrained"] else f"the run of trial {b['trial']}, which trained it for its full epochs")
    return ["## The best model", "",
            f"`{b['run_dir']}`: {origin}. Its `best.pt` was tested on the test set ({test_set}); "
            f"it trained on {b['device']}.", "",
            "| split | accuracy |", "| --- | --- |",
            f"| train (epoch {b['best_epoch']}, on the {'augmented ' * bool(b['augment'])}batches as they "
            f"trained) | {b['train_acc']:.4f} |",
            f"| validation (best {metric}: epoch {b['best_epoch']} of {b['epochs_run']}) | {b['val_acc']:.4f} |",
            f"| test (loss {b['test_loss']:.4f}) | {b['test_acc']:.4f} |", "",
            "| class | test accuracy |", "| --- | --- |",
            *(f"| {name} | {acc:.4f} |" for name, acc in b["per_class"].items()), "",
            *(f"![{name}]({name})" for name in b["figures"]), ""]


def _part_b_markdown(p: dict) -> list[str]:
    lines = ["## Part B: fine-tuning strategies", ""]
    if p["status"] != "done":
        return lines + [f"Not {'run' if p['status'] == 'skipped' else 'finished'} ({p['status']}):", "",
                        "```text", p["reason"], "```", ""]
    if setup := next((row["setup"] for row in p["rows"].values() if "setup" in row), None):
        size, native = setup["input_size"], setup["native_input_size"]
        lines += [f"`{setup['model']}` with weights `{setup['weights']}`. Images enter at {size}x{size} pixels ("
                  + ("the crop size of the weights' transforms" if size == native else
                     f"set by `--input_size`; the weights' transforms crop to {native}x{native}")
                  + f"), normalised with the weights' mean {setup['mean']} and std {setup['std']}. The "
                  f"{setup['imagenet_classes']:,}-class ImageNet classifier `{setup['head_layer']}` was replaced by a "
                  f"new, randomly initialised head with {setup['outputs']} outputs (widths below), trained "
                  f"at the full learning rate {setup['learning_rate']:g}; "
                  f"pretrained layers that train use {setup['backbone_lr_scale']:g} times it.", ""]
    lines += ["| strategy | trainable parameters | epochs | s per epoch | best val_acc | test_acc | head | run |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in p["rows"].items():
        if "run_dir" not in row:  # no numbers: it did not finish
            lines.append(f"| {name} | {row.get('ended', 'not run')} | | | | | | |")
            continue
        trainable = f"{row['trainable_params']:,}"
        if row["trainable_params_last_epoch"] != row["trainable_params"]:
            trainable += f" to {row['trainable_params_last_epoch']:,} (epoch {row['epochs']})"
        test = "" if row["test_acc"] is None else f"{row['test_acc']:.4f}"
        head = " -> ".join(map(str, row["head"]))
        lines.append(f"| {name} | {trainable} of {row['params']:,} | {row['epochs']} | {row['epoch_time_s']:.1f} | "
                     f"{row['best_val_acc']:.4f} | {test} | {head} | `{row['run_dir']}` |")
    return lines + [""]


def _steps_markdown(steps: dict) -> list[str]:
    lines = ["## Hardware, software and time", "", "| step | status | time | finished |", "| --- | --- | --- | --- |"]
    lines += [f"| {STEP_TITLES[name]} | {r['status']} | {timedelta(seconds=round(r['seconds'] or 0))} | "
              f"{r['finished'] or ''} |" for name, r in steps.items()]
    total = timedelta(seconds=round(sum(r["seconds"] or 0 for r in steps.values())))
    lines += ["", f"Total: {total} (a step's time adds up its tries). The steps ran on:", ""]
    places = Counter((r["machine"], r["software"]) for r in steps.values() if r["machine"])
    return lines + [f"- {machine}; {software}" for machine, software in places] + [""]


def render(results: dict) -> str:
    return "\n".join([
        "# Study report", "",
        f"Written by `python common/study.py` on {results['written']}. Every number below is read from the "
        "data split, run folders and sweep databases it names (the same numbers are in `results.json`).", "",
        *_data_markdown(results["data"]), *_question1_markdown(results["question1"]),
        *_sweep_markdown(results["sweep"]),
        *_best_model_markdown(results["best_model"], results["sweep"]["metric"], results["data"]["test"]),
        *_part_b_markdown(results["part_b"]), *_steps_markdown(results["steps"])])
