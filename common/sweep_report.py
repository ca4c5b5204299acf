"""What a sweep found: the trials table, the best command, and a report (summary.md and two figures).

``write_report`` writes into one folder:
    summary.md                 best trial, importance ranking, correlations, what the top trials share
    parallel_coordinates.png   the most important parameters against the metric, one line per trial
    metric_per_trial.png       the metric over trial number, with the running best

Each piece has its own function (``parameter_importance``, ``correlations``, ``observations``,
``importance_table``, ``correlation_tables``, ``plot_metric_per_trial``, ``plot_parallel_coordinates``,
``plot_importance``, ``plot_correlations``) for other reports (common/study_report.py) to reuse;
Optuna draws its figures.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import math
import shlex
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization.matplotlib import (plot_optimization_history, plot_parallel_coordinate,
                                              plot_param_importances)

from common.config import to_cli
from common.figures import save_figure
from common.sweep import was_interrupted

MIN_TRIALS_FOR_IMPORTANCE = 5
PARALLEL_AXES = 8  # more parameter axes than this are unreadable at report size
TOP_SHARE = 2 / 3  # a value "shared" by the top trials: held by at least this fraction of them
WEAK_RHO = 0.3  # a rank correlation below this in size is conventionally called weak: no direction is read from it


def metric_name(study: optuna.Study) -> str:
    return study.user_attrs.get("metric", "value")


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def trial_value(trial: FrozenTrial) -> float | None:
    """The trial's metric: its result, or for a pruned trial the last value it reported."""
    if trial.value is None and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return trial.value


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_trials_csv(study: optuna.Study, path: str | Path) -> Path:
    """One row per trial: number, state, metric, duration, every parameter (searched and fixed), error."""
    trials = study.get_trials(deepcopy=False)
    values = [{**t.user_attrs.get("fixed", {}), **t.params} for t in trials]
    names = list(dict.fromkeys(name for row in values for name in row))  # ordered union over trials
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", metric_name(study), "duration_s", *names, "run_dir", "error"])
        for trial, row in zip(trials, values):
            value = trial_value(trial)
            writer.writerow([trial.number, trial.state.name, "" if value is None else value,
                             "" if trial.duration is None else round(trial.duration.total_seconds(), 1),
                             *(row.get(name, "") for name in names),
                             trial.user_attrs.get("run_dir", ""), trial.user_attrs.get("error", "")])
    return path


def best_command(study: optuna.Study) -> str | None:
    """The best trial as a ready-to-run training command, or None before any trial completed."""
    if not _complete(study):
        return None
    best = study.best_trial
    values = {**best.user_attrs.get("fixed", {}), **best.params, "name": f"{study.study_name}_best"}
    program = best.user_attrs.get("program", "part_a/train.py")
    return " ".join(["python", program, *(shlex.quote(arg) for arg in to_cli(values))])


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (tied values share their mean rank); nan when either side is constant.
    Neither numpy nor the project's other dependencies has one."""
    def ranks(values: list[float]) -> np.ndarray:
        _, inverse, counts = np.unique(np.asarray(values, dtype=float), return_inverse=True, return_counts=True)
        return (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1]) if rx.std() > 0 and ry.std() > 0 else float("nan")


def correlation_ratio(groups: dict[Any, list[float]]) -> float:
    """How much of the metric's spread the categories explain (eta, 0..1); nan when constant."""
    values = np.concatenate([np.asarray(v, dtype=float) for v in groups.values()])
    total = ((values - values.mean()) ** 2).sum()
    between = sum(len(v) * (np.mean(v) - values.mean()) ** 2 for v in groups.values())
    return float(math.sqrt(between / total)) if total > 0 else float("nan")


def _is_numeric(dist) -> bool:
    return not isinstance(dist, CategoricalDistribution) or all(
        isinstance(c, (int, float)) and not isinstance(c, bool) for c in dist.choices)


def correlations(trials: list[FrozenTrial]) -> dict[str, dict]:
    """Per parameter: Spearman rho with the metric (numeric) or the mean metric per category."""
    result = {}
    for name in dict.fromkeys(name for trial in trials for name in trial.params):
        having = [t for t in trials if name in t.params]
        values, metric = [t.params[name] for t in having], [t.value for t in having]
        if _is_numeric(having[0].distributions[name]):
            rho = spearman(values, metric)
            result[name] = {"kind": "numeric", "rho": rho, "strength": abs(rho), "n": len(having)}
            continue
        groups: dict[Any, list[float]] = {}
        for value, score in zip(values, metric):
            groups.setdefault(value, []).append(score)
        result[name] = {"kind": "categorical", "n": len(having), "strength": correlation_ratio(groups),
                        "means": {k: (float(np.mean(v)), len(v)) for k, v in groups.items()}}
    return result


def importance_evaluator() -> tuple[optuna.importance.BaseImportanceEvaluator, str]:
    """fANOVA when scikit-learn (its random forest) is installed, else PED-ANOVA; and the method's name."""
    if importlib.util.find_spec("sklearn") is not None:
        return optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    return optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA (install scikit-learn for fANOVA)"


def parameter_importance(study: optuna.Study) -> tuple[dict[str, float], str]:
    """(importances, method) - empty with the reason when there are too few completed trials."""
    complete = _complete(study)
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}, (f"only {len(complete)} completed trials (importance needs {MIN_TRIALS_FOR_IMPORTANCE}); "
                    "parameters are ranked by the strength of their correlation with the metric instead")
    if len({t.value for t in complete}) == 1:  # evaluators would call every parameter equally important
        return {}, f"{metric_name(study)} was {complete[0].value:.4g} in every completed trial"
    evaluator, method = importance_evaluator()
    try:
        return optuna.importance.get_param_importances(study, evaluator=evaluator), method
    except (ValueError, RuntimeError) as error:  # e.g. every parameter constant so far
        return {}, f"{method} failed ({error}); parameters are ranked by correlation strength instead"


def ranking(importance: dict[str, float], corr: dict[str, dict]) -> list[str]:
    """Parameters by importance, or by correlation strength when importance is unknown."""
    if importance:
        return list(importance)
    strength = {name: (0.0 if math.isnan(c["strength"]) else c["strength"]) for name, c in corr.items()}
    return sorted(strength, key=strength.get, reverse=True)


@contextlib.contextmanager
def _optuna_drawing():
    """Optuna's matplotlib plots warn that they are experimental (and, for a parameter with one value
    so far, about its flat axis) and switch the global style to ggplot; keep all that inside the block."""
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Attempting to set identical low and high ylims", UserWarning)
        yield


def plot_metric_per_trial(study: optuna.Study) -> Figure:
    """Completed trials' metric and the running best (Optuna's history plot); pruned trials at the
    value they had when stopped, failed ones (not those stopped by Ctrl-C) as crosses along the bottom."""
    metric, trials = metric_name(study), study.get_trials(deepcopy=False)
    with _optuna_drawing():
        ax = plot_optimization_history(study, target_name=metric)
        pruned = [t for t in trials if t.state == TrialState.PRUNED and trial_value(t) is not None]
        failed = [t.number for t in trials if t.state == TrialState.FAIL and not was_interrupted(t)]
        if pruned:
            ax.scatter([t.number for t in pruned], [trial_value(t) for t in pruned], facecolors="none",
                       edgecolors="0.4", label="pruned (value when stopped)")
        if failed:  # axes coordinates in y: no value to place them at
            ax.scatter(failed, [0.02] * len(failed), marker="x", color="tab:red", label="failed",
                       transform=ax.get_xaxis_transform())
        if trials:
            ax.set_xlim(-0.5, trials[-1].number + 0.5)  # failed crosses do not widen the limits
            ax.legend(loc="best", fontsize=9)
        ax.set_title(f"{study.study_name}: {metric} per trial")
        ax.figure.set_size_inches(8, 4.5)
    return ax.figure


def plot_parallel_coordinates(study: optuna.Study, params: list[str], title: str = "") -> Figure:
    """One line per completed trial through ``params`` and the metric, coloured by the metric."""
    with _optuna_drawing():
        ax = plot_parallel_coordinate(study, params=params, target_name=metric_name(study))
        ax.set_title(title or f"{study.study_name}: parallel coordinates", y=1.03)
        ax.figure.set_size_inches(max(8.0, 1.45 * len(params) + 3), 5.5)
        ax.figure.tight_layout()  # room for the slanted parameter names
    return ax.figure


def plot_importance(study: optuna.Study, method: str) -> Figure:
    """Optuna's importance bars, by the evaluator ``parameter_importance`` used (the same numbers)."""
    with _optuna_drawing():
        ax = plot_param_importances(study, evaluator=importance_evaluator()[0], target_name=metric_name(study))
        # loc="left" replaces Optuna's own left-aligned title instead of printing over it
        ax.set_title(f"{study.study_name}:\nparameter importance ({method.split(' (')[0]})", loc="left")
        ax.figure.set_size_inches(8, 4.5)
        ax.figure.tight_layout()
    return ax.figure


def plot_correlations(corr: dict[str, dict], order: list[str], metric: str) -> Figure:
    """One bar per parameter: Spearman's rho with the metric (numeric, signed) or the correlation ratio
    eta (categorical, 0..1, no direction)."""
    names = [name for name in order if name in corr and not math.isnan(corr[name]["strength"])][::-1]
    values = [corr[n]["rho"] if corr[n]["kind"] == "numeric" else corr[n]["strength"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.5), layout="constrained")
    ax.barh([f"{n} ({'rho' if corr[n]['kind'] == 'numeric' else 'eta'})" for n in names], values,
            color=["tab:blue" if corr[n]["kind"] == "numeric" else "tab:orange" for n in names])
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel(f"correlation with {metric}: Spearman rho (blue) or correlation ratio eta (orange)")
    return fig


def observations(importance: dict[str, float], method: str, corr: dict[str, dict], metric: str,
                 top: int = 3) -> list[str]:
    """Sentences on the ``top`` ranked parameters, each stating the numbers it rests on (none on a
    parameter whose correlation is undefined: it or the metric never varied)."""
    sentences = []
    ranked = [n for n in ranking(importance, corr) if n in corr and not math.isnan(corr[n]["strength"])]
    for name in ranked[:top]:
        c = corr[name]
        weight = f"importance {importance[name]:.2f} by {method.split(' (')[0]}; " if name in importance else ""
        if c["kind"] == "categorical":
            means = sorted(c["means"].items(), key=lambda item: item[1][0], reverse=True)
            (high, (high_mean, high_n)), (low, (low_mean, low_n)) = means[0], means[-1]
            finding = (f"mean {metric} {high_mean:.3f} with {_fmt(high)} ({high_n} trials) against {low_mean:.3f} "
                       f"with {_fmt(low)} ({low_n}); correlation ratio eta {c['strength']:.2f}"
                       if len(means) > 1 else f"only {_fmt(high)} was tried")
        elif math.isnan(c["rho"]) or abs(c["rho"]) < WEAK_RHO:
            finding = (f"Spearman rho {c['rho']:+.2f} over {c['n']} trials: no clear monotone relation with {metric} "
                       f"(|rho| < {WEAK_RHO})")
        else:
            finding = (f"Spearman rho {c['rho']:+.2f} over {c['n']} trials: higher {name} went with "
                       f"{'higher' if c['rho'] > 0 else 'lower'} {metric}")
        sentences.append(f"`{name}` ({weight}{finding}).")
    return sentences


def _shared_by_top(complete: list[FrozenTrial], maximize: bool) -> tuple[int, list[str]]:
    """What the best fifth (at least three) of the completed trials have in common."""
    top = sorted(complete, key=lambda t: t.value, reverse=maximize)[:max(3, math.ceil(len(complete) / 5))]
    lines = []
    for name in dict.fromkeys(n for t in top for n in t.params):
        values = [t.params[name] for t in top if name in t.params]
        dist = next(t.distributions[name] for t in top if name in t.params)
        if not isinstance(dist, CategoricalDistribution):
            lines.append(f"- `{name}` from {_fmt(min(values))} to {_fmt(max(values))} "
                         f"(searched {_fmt(dist.low)} to {_fmt(dist.high)})")
            continue
        value, count = Counter(values).most_common(1)[0]
        if len(dist.choices) > 1 and count >= TOP_SHARE * len(top):
            lines.append(f"- `{name}` = {_fmt(value)} in {count} of {len(top)}")
    return len(top), lines


def importance_table(importance: dict[str, float], method: str) -> list[str]:
    """Markdown lines: the importance ranking, or why there is none."""
    if not importance:
        return [f"Not computed: {method}.", ""]
    return [f"Method: {method}.", "", "| rank | parameter | importance |", "| --- | --- | --- |",
            *(f"| {i} | {name} | {value:.3f} |" for i, (name, value) in enumerate(importance.items(), 1)), ""]


def correlation_tables(metric: str, order: list[str], corr: dict[str, dict], maximize: bool) -> list[str]:
    """Markdown lines: Spearman's rho of each numeric parameter, the mean metric per value of each other."""
    lines = ["Numeric parameters (Spearman's rank correlation):", "",
             "| parameter | rho | trials |", "| --- | --- | --- |"]
    lines += [f"| {name} | {corr[name]['rho']:+.2f} | {corr[name]['n']} |"
              for name in order if corr.get(name, {}).get("kind") == "numeric"]
    lines += ["", f"Categorical parameters (mean {metric} per value, trials in brackets):", "",
              "| parameter | values |", "| --- | --- |"]
    for name in order:
        if corr.get(name, {}).get("kind") == "categorical":
            means = sorted(corr[name]["means"].items(), key=lambda item: item[1][0], reverse=maximize)
            lines.append(f"| {name} | " + ", ".join(f"{_fmt(k)}: {m:.3f} ({n})" for k, (m, n) in means) + " |")
    return lines


def _summary_markdown(study: optuna.Study, importance: dict[str, float], method: str, corr: dict[str, dict],
                     figures: list[str]) -> str:
    metric, maximize, complete = metric_name(study), study.direction.name == "MAXIMIZE", _complete(study)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in trials)
    lines = [f"# Sweep report: {study.study_name}", "",
             f"{len(trials)} trials ({', '.join(f'{n} {s}' for s, n in states.items())}); "
             f"metric `{metric}`, {'maximized' if maximize else 'minimized'}.", ""]
    if not complete:
        return "\n".join(lines + ["No trial has completed yet, so there is nothing to analyse.", ""])
    best = study.best_trial
    where = f" (run folder `{best.user_attrs['run_dir']}`)" if "run_dir" in best.user_attrs else ""
    lines += ["## Best trial", "", f"Trial {best.number}: {metric} = {best.value:.4f}{where}", "",
              "| parameter | value |", "| --- | --- |",
              *(f"| {name} | {_fmt(value)} |" for name, value in best.params.items()), "",
              "Ready to run:", "", "```", best_command(study), "```", "", "## Parameter importance", "",
              *importance_table(importance, method), f"## Correlation with {metric}", "",
              *correlation_tables(metric, ranking(importance, corr), corr, maximize)]
    top_count, shared = _shared_by_top(complete, maximize)
    lines += ["", f"## What the top {top_count} trials share", "", *(shared or ["- nothing stands out"]), "",
              "## Figures", "", *(f"![{name}]({name})" for name in figures), ""]
    return "\n".join(lines)


def write_report(study: optuna.Study, out_dir: str | Path) -> list[Path]:
    """Write summary.md and the figures into ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    complete = _complete(study)
    importance, method = parameter_importance(study)
    corr = correlations(complete)
    written = [save_figure(plot_metric_per_trial(study), out_dir / "metric_per_trial.png", dpi=120)]
    params = ranking(importance, corr)[:PARALLEL_AXES]
    if complete and params:
        title = (f"{study.study_name}: {len(complete)} completed trials, top {len(params)} parameters by "
                 + ("importance" if importance else "correlation strength"))
        written.append(save_figure(plot_parallel_coordinates(study, params, title),
                                   out_dir / "parallel_coordinates.png", dpi=120))
    summary = out_dir / "summary.md"
    summary.write_text(_summary_markdown(study, importance, method, corr, [p.name for p in written]))
    return [summary, *written]
