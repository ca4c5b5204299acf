"""What a sweep found: the trials table, the best command, and a report with two figures.

``write_report`` writes into one folder:
    summary.md                 best trial, importance ranking, correlations, what the top trials share
    parallel_coordinates.png   the most important parameters against the metric, one line per trial
    metric_per_trial.png       the metric over trial number, with the running best

Importance is fANOVA (Optuna's, needs scikit-learn) or, without scikit-learn, PED-ANOVA; with too
few completed trials for either to mean anything, parameters are ranked by their correlation with
the metric instead, and the summary says so.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import optuna
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from common.config import to_cli

MIN_TRIALS_FOR_IMPORTANCE = 5
PARALLEL_AXES = 8  # more parameter axes than this are unreadable at report size
TOP_SHARE = 2 / 3  # a value "shared" by the top trials: held by at least this fraction of them


def metric_name(study: optuna.Study) -> str:
    return study.user_attrs.get("metric", "value")


def trial_value(trial: FrozenTrial) -> float | None:
    """The trial's metric: its result, or for a pruned trial the last value it reported."""
    if trial.value is not None:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_trials_csv(study: optuna.Study, path: str | Path) -> Path:
    """One row per trial: number, state, metric, duration, every parameter (searched and fixed), error."""
    trials = study.get_trials(deepcopy=False)
    param_names: dict[str, None] = {}  # ordered union over trials
    for trial in trials:
        param_names.update(dict.fromkeys(trial.params))
        param_names.update(dict.fromkeys(trial.user_attrs.get("fixed", {})))
    metric = metric_name(study)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", metric, "duration_s", *param_names, "run_dir", "error"])
        for trial in trials:
            values = {**trial.user_attrs.get("fixed", {}), **trial.params}
            value = trial_value(trial)
            writer.writerow([trial.number, trial.state.name, "" if value is None else value,
                             "" if trial.duration is None else round(trial.duration.total_seconds(), 1),
                             *(values.get(name, "") for name in param_names),
                             trial.user_attrs.get("run_dir", ""), trial.user_attrs.get("error", "")])
    return path


def best_command(study: optuna.Study) -> str | None:
    """The best trial as a ready-to-run training command, or None before any trial completed."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    values = {**best.user_attrs.get("fixed", {}), **best.params, "name": f"{study.study_name}_best"}
    program = best.user_attrs.get("program", "part_a/train.py")
    return " ".join(["python", program, *(shlex.quote(arg) for arg in to_cli(values))])


def _is_numeric(dist: BaseDistribution) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in dist.choices)
    return True


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); nan when either side is constant."""
    def ranks(values: list[float]) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values), dtype=float)
        for value in np.unique(values):  # average the ranks of tied values
            tied = values == value
            result[tied] = result[tied].mean()
        return result
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def correlation_ratio(groups: dict[Any, list[float]]) -> float:
    """How much of the metric's spread the categories explain (eta, 0..1); nan when constant."""
    values = np.concatenate([np.asarray(v, dtype=float) for v in groups.values()])
    total = ((values - values.mean()) ** 2).sum()
    if total == 0:
        return float("nan")
    between = sum(len(v) * (np.mean(v) - values.mean()) ** 2 for v in groups.values())
    return float(math.sqrt(between / total))


def correlations(trials: list[FrozenTrial]) -> dict[str, dict]:
    """Per parameter: Spearman rho with the metric (numeric) or the mean metric per category."""
    result = {}
    names = dict.fromkeys(name for trial in trials for name in trial.params)
    for name in names:
        having = [t for t in trials if name in t.params]
        dist = having[0].distributions[name]
        values = [t.params[name] for t in having]
        metric = [t.value for t in having]
        if _is_numeric(dist):
            rho = spearman(values, metric)
            result[name] = {"kind": "numeric", "rho": rho, "strength": abs(rho), "n": len(having)}
        else:
            groups: dict[Any, list[float]] = {}
            for value, score in zip(values, metric):
                groups.setdefault(value, []).append(score)
            result[name] = {"kind": "categorical", "n": len(having), "strength": correlation_ratio(groups),
                            "means": {k: (float(np.mean(v)), len(v)) for k, v in groups.items()}}
    return result


def parameter_importance(study: optuna.Study) -> tuple[dict[str, float], str]:
    """(importances, method) - empty with the reason when there are too few completed trials."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}, (f"only {len(complete)} completed trials (importance needs {MIN_TRIALS_FOR_IMPORTANCE}); "
                    "parameters are ranked by the strength of their correlation with the metric instead")
    if importlib.util.find_spec("sklearn") is not None:  # fANOVA's random forest
        evaluator, method = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    else:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        method = "PED-ANOVA (install scikit-learn for fANOVA)"
    try:
        return optuna.importance.get_param_importances(study, evaluator=evaluator), method
    except (ValueError, RuntimeError) as error:  # e.g. every parameter constant so far
        return {}, f"{method} failed ({error}); parameters are ranked by correlation strength instead"


def _ranking(importance: dict[str, float], corr: dict[str, dict]) -> list[str]:
    if importance:
        return list(importance)
    strength = {name: (0.0 if math.isnan(c["strength"]) else c["strength"]) for name, c in corr.items()}
    return sorted(strength, key=strength.get, reverse=True)


def _axis(values: list[Any], dist: BaseDistribution) -> tuple[np.ndarray, list[float], list[str]]:
    """Positions in [0, 1] for one parallel-coordinates axis, with its tick positions and labels."""
    if isinstance(dist, CategoricalDistribution):
        choices = list(dist.choices)
        spread = max(len(choices) - 1, 1)
        positions = [choices.index(v) / spread if v in choices else np.nan for v in values]
        ticks = [i / spread for i in range(len(choices))]
        return np.asarray(positions, dtype=float), ticks, [_fmt(c) for c in choices]
    scale = np.log10 if dist.log else (lambda v: v)
    low, high = scale(dist.low), scale(dist.high)
    span = (high - low) or 1.0
    positions = [(scale(v) - low) / span if v is not None else np.nan for v in values]
    ticks = [0.0, 0.5, 1.0]
    labels = [_fmt(10 ** (low + t * span) if dist.log else low + t * span) for t in ticks]
    if not dist.log and isinstance(dist.low, int):
        labels = [str(round(low + t * span)) for t in ticks]
    return np.asarray(positions, dtype=float), ticks, labels


def plot_parallel_coordinates(trials: list[FrozenTrial], params: list[str], metric: str, title: str,
                              path: Path) -> None:
    values = np.array([t.value for t in trials], dtype=float)
    lo, hi = float(values.min()), float(values.max())
    columns = [_axis([t.params.get(name) for t in trials],
                     next(t.distributions[name] for t in trials if name in t.distributions)) for name in params]
    span = (hi - lo) or 1.0
    metric_ticks = [0.0, 0.5, 1.0]
    columns.append(((values - lo) / span, metric_ticks, [f"{lo + t * span:.3f}" for t in metric_ticks]))
    ys = np.stack([positions for positions, _, _ in columns])

    fig, ax = plt.subplots(figsize=(max(8.0, 1.45 * len(columns) + 1.5), 5.5))
    cmap, norm = plt.get_cmap("viridis"), Normalize(lo, hi if hi > lo else lo + 1e-9)
    for index in np.argsort(values):  # best trials drawn last, on top
        ax.plot(range(len(columns)), ys[:, index], color=cmap(norm(values[index])), alpha=0.75, linewidth=1.6)
    for x, (_, ticks, labels) in enumerate(columns):
        ax.axvline(x, color="0.25", linewidth=1)
        for tick, label in zip(ticks, labels):
            ax.text(x + 0.04, tick, label, fontsize=8, va="center", ha="left",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([*params, metric], rotation=20, ha="right", fontsize=10)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(columns) - 0.4)
    ax.set_ylim(-0.06, 1.06)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric, pad=0.02)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric_per_trial(study: optuna.Study, metric: str, path: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    fig, ax = plt.subplots(figsize=(8, 4.5))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and trial_value(t) is not None]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if complete:
        numbers = [t.number for t in complete]
        values = np.array([t.value for t in complete])
        ax.scatter(numbers, values, color="tab:blue", s=28, label="completed", zorder=3)
        best = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
        ax.step(numbers, best, where="post", color="tab:orange", linewidth=2, label="running best")
    if pruned:
        ax.scatter([t.number for t in pruned], [trial_value(t) for t in pruned], facecolors="none",
                   edgecolors="0.5", s=28, label="pruned (value when stopped)", zorder=2)
    if failed:  # no value: marked along the bottom edge
        ax.scatter([t.number for t in failed], [0.02] * len(failed), marker="x", color="tab:red", s=30,
                   transform=ax.get_xaxis_transform(), label="failed", zorder=3)
    if trials:  # failed trials are drawn in axes coordinates, which do not widen the limits
        ax.set_xlim(-0.5, max(t.number for t in trials) + 0.5)
    ax.set_xlabel("trial number")
    ax.set_ylabel(metric)
    ax.set_title(f"{study.study_name}: {metric} per trial")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if trials:
        ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _shared_by_top(complete: list[FrozenTrial], maximize: bool) -> tuple[int, list[str]]:
    """What the best fifth (at least three) of the completed trials have in common."""
    ranked = sorted(complete, key=lambda t: t.value, reverse=maximize)
    top = ranked[:max(3, math.ceil(len(ranked) / 5))]
    lines = []
    for name in dict.fromkeys(n for t in top for n in t.params):
        values = [t.params[name] for t in top if name in t.params]
        dist = top[0].distributions.get(name) or next(t.distributions[name] for t in top if name in t.params)
        if isinstance(dist, CategoricalDistribution):
            value, count = Counter(values).most_common(1)[0]
            if len(dist.choices) > 1 and count >= TOP_SHARE * len(top):
                lines.append(f"- `{name}` = {_fmt(value)} in {count} of {len(top)}")
        else:
            lines.append(f"- `{name}` from {_fmt(min(values))} to {_fmt(max(values))} "
                         f"(searched {_fmt(dist.low)} to {_fmt(dist.high)})")
    return len(top), lines


def _summary_markdown(study: optuna.Study, metric: str, importance: dict[str, float], method: str,
                      corr: dict[str, dict], figures: list[str]) -> str:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    lines = [f"# Sweep report: {study.study_name}", "",
             f"{len(trials)} trials ({', '.join(f'{n} {s}' for s, n in states.items())}); "
             f"metric `{metric}`, {'maximized' if maximize else 'minimized'}.", ""]
    if not complete:
        return "\n".join(lines + ["No trial has completed yet, so there is nothing to analyse.", ""])
    best = study.best_trial
    lines += ["## Best trial", "", f"Trial {best.number}: {metric} = {best.value:.4f}"
              + (f" (run folder `{best.user_attrs['run_dir']}`)" if "run_dir" in best.user_attrs else ""), "",
              "| parameter | value |", "| --- | --- |",
              *(f"| {name} | {_fmt(value)} |" for name, value in best.params.items()), "",
              "Ready to run:", "", "```", best_command(study), "```", ""]
    lines += ["## Parameter importance", ""]
    if importance:
        lines += [f"Method: {method}.", "", "| rank | parameter | importance |", "| --- | --- | --- |",
                  *(f"| {i} | {name} | {value:.3f} |" for i, (name, value) in enumerate(importance.items(), 1)), ""]
    else:
        lines += [f"Not computed: {method}.", ""]
    lines += ["## Correlation with " + metric, "", "Numeric parameters (Spearman's rank correlation):", "",
              "| parameter | rho | trials |", "| --- | --- | --- |"]
    for name in _ranking(importance, corr):
        c = corr.get(name)
        if c and c["kind"] == "numeric":
            lines.append(f"| {name} | {c['rho']:+.2f} | {c['n']} |")
    lines += ["", f"Categorical parameters (mean {metric} per value, trials in brackets):", "",
              "| parameter | values |", "| --- | --- |"]
    for name in _ranking(importance, corr):
        c = corr.get(name)
        if c and c["kind"] == "categorical":
            cells = ", ".join(f"{_fmt(k)}: {m:.3f} ({n})" for k, (m, n) in
                              sorted(c["means"].items(), key=lambda item: item[1][0], reverse=maximize))
            lines.append(f"| {name} | {cells} |")
    top_count, shared = _shared_by_top(complete, maximize)
    lines += ["", f"## What the top {top_count} trials share", "", *(shared or ["- nothing stands out"]), ""]
    lines += ["## Figures", "", *(f"![{name}]({name})" for name in figures), ""]
    return "\n".join(lines)


def write_report(study: optuna.Study, out_dir: str | Path) -> list[Path]:
    """Write summary.md and the figures into ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = metric_name(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    importance, method = parameter_importance(study)
    corr = correlations(complete)
    written = []
    per_trial = out_dir / "metric_per_trial.png"
    plot_metric_per_trial(study, metric, per_trial)
    written.append(per_trial)
    params = _ranking(importance, corr)[:PARALLEL_AXES]
    if complete and params:
        parallel = out_dir / "parallel_coordinates.png"
        basis = "importance" if importance else "correlation strength"
        plot_parallel_coordinates(complete, params, metric,
                                  f"{study.study_name}: {len(complete)} completed trials, "
                                  f"top {len(params)} parameters by {basis}", parallel)
        written.append(parallel)
    summary = out_dir / "summary.md"
    summary.write_text(_summary_markdown(study, metric, importance, method, corr, [p.name for p in written]))
    return [summary, *written]
