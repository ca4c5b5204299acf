"""What a sweep found: the trials table, the best command, and a report (summary.md from sweep_report.md.j2,
two figures). common/study_report.py reuses each table and figure; Optuna computes and draws them.
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

import jinja2
import matplotlib
import numpy as np
import optuna
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as optuna_plots

from common.config import to_cli
from common.figures import save_figure
from common.sweep import was_interrupted

MIN_TRIALS = 5  # completed trials before parameter importance is computed
PARALLEL_AXES = 8  # more parameter axes than this are unreadable at report size
TOP_SHARE = 2 / 3  # a value "shared" by the top trials: held by at least this fraction of them
WEAK_RHO = 0.3  # a rank correlation weaker than this is conventionally called weak: no direction is read


def metric_name(study: optuna.Study) -> str:
    return study.user_attrs.get("metric", "value")


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def trial_value(trial: FrozenTrial) -> float | None:  # for a pruned trial, the last value it reported
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
        for trial, row in zip(trials, values, strict=True):
            value = "" if (result := trial_value(trial)) is None else result
            duration = "" if trial.duration is None else round(trial.duration.total_seconds(), 1)
            cells = [row.get(name, "") for name in names]
            attrs = [trial.user_attrs.get(key, "") for key in ("run_dir", "error")]
            writer.writerow([trial.number, trial.state.name, value, duration, *cells, *attrs])
    return path


def best_command(study: optuna.Study) -> str | None:  # None before any trial completed
    if not _complete(study):
        return None
    best = study.best_trial
    values = {**best.user_attrs.get("fixed", {}), **best.params, "name": f"{study.study_name}_best"}
    program = best.user_attrs.get("program", "part_a/train.py")
    return " ".join(["python", program, *(shlex.quote(arg) for arg in to_cli(values))])


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank); nan when either side is constant."""
    ranks = []
    for values in (x, y):
        _, inverse, counts = np.unique(np.asarray(values, float), return_inverse=True, return_counts=True)
        ranks.append((np.cumsum(counts) - (counts - 1) / 2)[inverse])
    constant = ranks[0].std() == 0 or ranks[1].std() == 0
    return float("nan") if constant else float(np.corrcoef(*ranks)[0, 1])


def correlations(trials: list[FrozenTrial]) -> dict[str, dict]:
    """Per parameter: Spearman rho with the metric, or the mean metric per category and eta (0..1)."""
    result = {}
    for name in dict.fromkeys(name for trial in trials for name in trial.params):
        having = [t for t in trials if name in t.params]
        params, values = [t.params[name] for t in having], np.array([t.value for t in having], dtype=float)
        choices = getattr(having[0].distributions[name], "choices", [0])  # a float or int range has none
        if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
            rho = spearman(params, values)
            result[name] = {"kind": "numeric", "rho": rho, "strength": abs(rho), "n": len(having)}
            continue
        groups = {key: values[[p == key for p in params]] for key in dict.fromkeys(params)}
        between = sum(len(v) * (v.mean() - values.mean()) ** 2 for v in groups.values())
        eta = math.sqrt(between / (len(values) * values.var())) if values.var() > 0 else float("nan")
        means = {key: (float(v.mean()), len(v)) for key, v in groups.items()}
        result[name] = {"kind": "categorical", "n": len(having), "strength": eta, "means": means}
    return result


def importance_evaluator() -> tuple[optuna.importance.BaseImportanceEvaluator, str]:
    """fANOVA when scikit-learn (its random forest) is installed, else PED-ANOVA; and its name."""
    if importlib.util.find_spec("sklearn") is not None:
        return optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    return optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA (install scikit-learn for fANOVA)"


def parameter_importance(study: optuna.Study) -> tuple[dict[str, float], str]:
    """(importances, method), or empty with the reason they are not computed."""
    complete = _complete(study)
    if len(complete) < MIN_TRIALS:
        instead = "parameters are ranked by the strength of their correlation with the metric instead"
        return {}, f"only {len(complete)} completed trials (importance needs {MIN_TRIALS}); {instead}"
    if len({t.value for t in complete}) == 1:  # evaluators would call every parameter equally important
        return {}, f"{metric_name(study)} was {complete[0].value:.4g} in every completed trial"
    evaluator, method = importance_evaluator()
    try:
        return optuna.importance.get_param_importances(study, evaluator=evaluator), method
    except (ValueError, RuntimeError) as error:  # e.g. every parameter constant so far
        return {}, f"{method} failed ({error}); parameters are ranked by correlation strength instead"


def ranking(importance: dict[str, float], corr: dict[str, dict]) -> list[str]:  # else by correlation strength
    if importance:
        return list(importance)
    strength = {name: (0.0 if math.isnan(c["strength"]) else c["strength"]) for name, c in corr.items()}
    return sorted(strength, key=strength.get, reverse=True)


@contextlib.contextmanager
def _optuna_drawing():
    """Optuna's plots warn (experimental, a flat axis) and switch the global style; keep that inside."""
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Attempting to set identical low and high ylims", UserWarning)
        yield


def plot_metric_per_trial(study: optuna.Study) -> Figure:
    """Optuna's history plot; pruned trials at their value when stopped, failed ones as crosses."""
    metric, trials = metric_name(study), study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == TrialState.PRUNED and trial_value(t) is not None]
    failed = [t.number for t in trials if t.state == TrialState.FAIL and not was_interrupted(t)]
    with _optuna_drawing():
        ax = optuna_plots.plot_optimization_history(study, target_name=metric)
        if pruned:
            numbers, values = zip(*[(t.number, trial_value(t)) for t in pruned], strict=True)
            ax.scatter(numbers, values, fc="none", ec="0.4", label="pruned (value when stopped)")
        if failed:
            crosses = dict(c="tab:red", marker="x", label="failed", transform=ax.get_xaxis_transform())
            ax.scatter(failed, [0.02] * len(failed), **crosses)  # y in axes coordinates: no value
        if trials:
            ax.set_xlim(-0.5, trials[-1].number + 0.5)  # failed crosses do not widen the limits
            ax.legend(loc="best", fontsize=9)
        ax.set_title(f"{study.study_name}: {metric} per trial")
        ax.figure.set_size_inches(8, 4.5)
    return ax.figure


def plot_parallel_coordinates(study: optuna.Study, params: list[str], title: str = "") -> Figure:
    with _optuna_drawing():
        ax = optuna_plots.plot_parallel_coordinate(study, params=params, target_name=metric_name(study))
        ax.set_title(title or f"{study.study_name}: parallel coordinates", y=1.03)
        ax.figure.set_size_inches(max(8.0, 1.45 * len(params) + 3), 5.5)
        ax.figure.tight_layout()  # room for the slanted parameter names
    return ax.figure


def plot_importance(study: optuna.Study, method: str) -> Figure:
    with _optuna_drawing():
        evaluator = importance_evaluator()[0]
        ax = optuna_plots.plot_param_importances(study, evaluator=evaluator, target_name=metric_name(study))
        # loc="left" replaces Optuna's own left-aligned title instead of printing over it
        ax.set_title(f"{study.study_name}:\nparameter importance ({method.split(' (')[0]})", loc="left")
        ax.figure.set_size_inches(8, 4.5)
        ax.figure.tight_layout()
    return ax.figure


def plot_correlations(corr: dict[str, dict], order: list[str], metric: str) -> Figure:
    names = [name for name in order if name in corr and not math.isnan(corr[name]["strength"])][::-1]
    numeric = [corr[name]["kind"] == "numeric" for name in names]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.5), layout="constrained")
    labels = [f"{name} ({'rho' if num else 'eta'})" for name, num in zip(names, numeric, strict=True)]
    values = [corr[name]["rho" if num else "strength"] for name, num in zip(names, numeric, strict=True)]
    ax.barh(labels, values, color=["tab:blue" if num else "tab:orange" for num in numeric])
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel(f"correlation with {metric}: Spearman rho (blue) or correlation ratio eta (orange)")
    return fig


def observations(importance: dict, method: str, corr: dict, metric: str, top: int = 3) -> list[str]:
    """Sentences on the ``top`` ranked parameters with their numbers (none where either side never varied)."""
    sentences = []
    ranked = [n for n in ranking(importance, corr) if n in corr and not math.isnan(corr[n]["strength"])]
    for name in ranked[:top]:
        c, rho = corr[name], corr[name].get("rho", 0.0)
        finding = f"Spearman rho {rho:+.2f} over {c['n']} trials: "
        if c["kind"] == "categorical" and len(c["means"]) == 1:
            finding = f"only {_fmt(next(iter(c['means'])))} was tried"
        elif c["kind"] == "categorical":
            by_mean = sorted(c["means"].items(), key=lambda item: item[1][0], reverse=True)
            (high, (high_mean, high_n)), *_, (low, (low_mean, low_n)) = by_mean
            finding = f"mean {metric} {high_mean:.3f} with {_fmt(high)} ({high_n} trials) against "
            finding += f"{low_mean:.3f} with {_fmt(low)} ({low_n}); correlation ratio eta {c['strength']:.2f}"
        elif math.isnan(rho) or abs(rho) < WEAK_RHO:
            finding += f"no clear monotone relation with {metric} (|rho| < {WEAK_RHO})"
        else:
            finding += f"higher {name} went with {'higher' if rho > 0 else 'lower'} {metric}"
        if name in importance:
            finding = f"importance {importance[name]:.2f} by {method.split(' (')[0]}; {finding}"
        sentences.append(f"`{name}` ({finding}).")
    return sentences


def _shared_by_top(top: list[FrozenTrial]) -> list[str]:
    """Markdown lines: the range of each numeric parameter over ``top`` and the categories most share."""
    lines = []
    for name in dict.fromkeys(n for t in top for n in t.params):
        values = [t.params[name] for t in top if name in t.params]
        dist = next(t.distributions[name] for t in top if name in t.params)
        if not isinstance(dist, CategoricalDistribution):
            searched = f"(searched {_fmt(dist.low)} to {_fmt(dist.high)})"
            lines.append(f"- `{name}` from {_fmt(min(values))} to {_fmt(max(values))} {searched}")
            continue
        value, count = Counter(values).most_common(1)[0]
        if len(dist.choices) > 1 and count >= TOP_SHARE * len(top):
            lines.append(f"- `{name}` = {_fmt(value)} in {count} of {len(top)}")
    return lines


def render(template: str, values: dict) -> str:
    """The Jinja ``template`` beside this file filled with ``values``; ``{{ 1234|fmt(",") }}`` is 1,234."""
    loader = jinja2.FileSystemLoader(Path(__file__).parent)
    blocks = dict(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    environment = jinja2.Environment(loader=loader, **blocks)
    environment.filters.update(fmt=format, short=_fmt)
    return environment.get_template(template).render(values)


def write_report(study: optuna.Study, out_dir: str | Path) -> list[Path]:
    """Write summary.md and the figures into ``out_dir``; return the paths written."""
    out_dir, complete, metric = Path(out_dir), _complete(study), metric_name(study)
    importance, method = parameter_importance(study)
    corr = correlations(complete)
    order = ranking(importance, corr)
    written = [save_figure(plot_metric_per_trial(study), out_dir / "metric_per_trial.png", dpi=120)]
    if complete and (params := order[:PARALLEL_AXES]):
        by = "importance" if importance else "correlation strength"
        title = f"{study.study_name}: {len(complete)} completed trials, top {len(params)} parameters by {by}"
        figure = plot_parallel_coordinates(study, params, title)
        written.append(save_figure(figure, out_dir / "parallel_coordinates.png", dpi=120))
    maximize = study.direction.name == "MAXIMIZE"
    top = sorted(complete, key=lambda t: t.value, reverse=maximize)[: max(3, math.ceil(len(complete) / 5))]
    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    values = dict(study=study.study_name, states=states, metric=metric, maximize=maximize, order=order)
    values.update(best=study.best_trial if complete else None, command=best_command(study), top=len(top))
    values.update(importance=importance, method=method, corr=corr, shared=_shared_by_top(top))
    summary = out_dir / "summary.md"
    summary.write_text(render("sweep_report.md.j2", {**values, "figures": [p.name for p in written]}))
    return [summary, *written]
