"""Run the sweep in sweep.yaml locally with Optuna (no wandb server needed), and report on it.

    python common/sweep.py sweep.yaml --count 30 [--study NAME] [--storage URL] [--workers K] [--seed S]
                           [--out_dir runs] [--data_dir data] [--set epochs=10 input_size=128 ...]
    python common/sweep.py report --study NAME [--storage URL] [--out DIR]

Each trial is one run of the sweep's ``program`` in ``out_dir/<study>/trial_<number>``; workers and
machines share the study's database, each calling ``study.optimize`` on it (docs/sweeps.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import argparse
import contextlib
import importlib.util
import io
import multiprocessing
import os
import re
import shlex
import signal
import socket
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import yaml
from optuna.trial import FrozenTrial, TrialState

from common.config import UserError, cli_main, from_namespace, to_cli
from common.sweep_space import SweepConfigError, SweepSpec, load_sweep, make_pruner, make_sampler, suggest

ROOT = Path(__file__).resolve().parents[1]
PROGRAM_API = ("get_args_parser", "config_from_args", "run")
INTERRUPTED = "interrupted (Ctrl-C)"
DRIVERS = {"psycopg": '"psycopg[binary]"', "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}
# A CUDA context and the kernels it loads live outside PyTorch's allocator, so outside a worker's share.
CUDA_CONTEXT_BYTES = 1 << 30
TABLE_LOCK = "SELECT pg_advisory_xact_lock(20240520)"  # any number that every machine uses


@dataclass
class SweepOptions:  # the runner's command line
    config: str
    count: int
    study: str | None = None
    storage: str | None = None
    workers: int = 1
    out_dir: str | None = None  # default: the sweep file's out_dir value, else runs
    data_dir: str | None = None  # default: the sweep file's data_dir value, else data
    overrides: dict[str, Any] | None = None
    seed: int | None = None  # the samplers' seed: the same history proposes the same trials


def load_program(path: str) -> ModuleType:
    """Import the sweep's training script; it must offer get_args_parser, config_from_args and run."""
    file = next((base / path for base in (Path.cwd(), ROOT) if (base / path).is_file()), None)
    if file is None:
        raise SweepConfigError(f"program {path} not found (looked in {Path.cwd()} and {ROOT})")
    if (file := file.resolve()).is_relative_to(ROOT):  # import under its real name (part_a.train), once
        module = importlib.import_module(".".join(file.relative_to(ROOT).with_suffix("").parts))
    elif not (module := sys.modules.get(name := f"sweep_program_{abs(hash(str(file)))}")):  # once per path
        spec = importlib.util.spec_from_file_location(name, file)  # elsewhere: a test's fake program
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if missing := [name for name in PROGRAM_API if not hasattr(module, name)]:
        raise SweepConfigError(f"program {path} lacks {', '.join(missing)}; see docs/architecture.md")
    return module


def parse_quietly(parse, argv: list[str]):
    """Call an argparse-based ``parse(argv)``; turn its print-and-exit into a ValueError with the message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse(argv)
    except SystemExit as exit_:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()] or [f"exit {exit_.code}"]
        # argparse's last line is "PROG: error: MESSAGE"; PROG would name this runner, not the program.
        raise ValueError(lines[-1].split("error: ", 1)[-1]) from None


def check_program_accepts(program: ModuleType, spec: SweepSpec, fixed: dict[str, Any]) -> None:
    """Fail before any trial when a parameter is not an option of the program or a value does not parse."""
    parser = program.get_args_parser()
    runner = dict.fromkeys(("out_dir", "name", "wandb_group"), "x")  # set per trial by the runner
    for name, dist in {**fixed, **spec.search_space, **runner}.items():
        ends = (dist.low, dist.high) if hasattr(dist, "low") else (dist,)
        for value in getattr(dist, "choices", ends):  # every choice, a range's two ends, or the fixed value
            try:
                parse_quietly(parser.parse_args, to_cli({name: value}))
            except ValueError as error:
                message = f"sweep parameter {name}={value!r} is not accepted by {spec.program}: {error}"
                raise SweepConfigError(message) from None


@dataclass
class Sweep:
    """The sweep being run, and Optuna's objective: one run of the program per trial (picklable)."""

    spec: SweepSpec
    study: str
    storage: str  # the study database's URL
    fixed: dict[str, Any]  # the same for every trial; includes data_dir and out_dir
    out_dir: str  # runs in OUT_DIR/<study>/trial_<number>, torch's compile caches in OUT_DIR/sweeps/
    seed: int | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        name, metric, trials_dir = f"trial_{trial.number}", self.spec.metric, Path(self.out_dir, self.study)
        # Trials with the same model shapes reuse each other's compiled graphs (Inductor's and AOTAutograd's
        # on-disk caches), kept in a folder the sweep owns rather than the user's temporary folder.
        cache = Path(self.out_dir, "sweeps", f"{self.study}_compile_cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        where = dict(run_dir=str(trials_dir / name), host=f"{socket.gethostname()}:{os.getpid()}")
        # error "": a retry starts with a copy of the retried trial's attributes
        for key, value in dict(program=self.spec.program, fixed=self.fixed, error="", **where).items():
            trial.set_user_attr(key, value)
        reported: list[float] = []

        def report_epoch(epoch: int, metrics: dict) -> None:
            if metric not in metrics:
                raise KeyError(f"the program logged no {metric!r} (the sweep's metric): {sorted(metrics)}")
            reported.append(float(metrics[metric]))
            trial.report(reported[-1], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned by hyperband after epoch {epoch} ({reported[-1]:.4f})")

        values = {"wandb_group": self.study, **self.fixed, **suggest(trial, self.spec.search_space)}
        try:
            program = load_program(self.spec.program)
            argv = to_cli({**values, "out_dir": trials_dir, "name": name})
            program.run(parse_quietly(program.config_from_args, argv), epoch_callback=report_epoch)
            if not reported:
                raise RuntimeError(f"the run finished without reporting {metric}")
        except (Exception, KeyboardInterrupt) as error:  # Optuna records the trial as failed (or pruned)
            if not isinstance(error, optuna.TrialPruned):
                stopped = isinstance(error, KeyboardInterrupt)
                trial.set_user_attr("error", INTERRUPTED if stopped else f"{type(error).__name__}: {error}")
            raise
        return max(reported) if self.spec.goal == "maximize" else min(reported)


def database_path(out_dir: str | Path, study: str) -> Path:  # the default study database
    return (Path(out_dir) / "sweeps" / f"{study}.db").resolve()


def default_storage(out_dir: str | Path, study: str) -> str:
    return f"sqlite:///{database_path(out_dir, study)}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study database. A running trial is stamped every SWEEP_HEARTBEAT seconds (default 60); before a
    trial starts, Optuna fails trials unstamped for three times that (their process died) and queues each
    again (RetryHeartbeatStaleTrialCallback), so a worker or machine still running takes them over."""
    beat = os.environ.get("SWEEP_HEARTBEAT", "60")
    if not beat.isdigit() or int(beat) < 1:
        raise ValueError(f"SWEEP_HEARTBEAT must be a whole number of seconds >= 1, got {beat!r}")
    heartbeat = {"heartbeat_interval": int(beat), "grace_period": 3 * int(beat)}
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # wait on locks
    try:
        with contextlib.ExitStack() as lock, warnings.catch_warnings():
            # Optuna creates its tables on a new database by check-then-create, so machines starting together
            # on PostgreSQL would all create them and all but one die on a duplicate key: they take turns.
            if url.startswith("postgresql"):  # the lock is held until this transaction ends
                engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
                lock.enter_context(engine.begin()).execute(sqlalchemy.text(TABLE_LOCK))
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, for years
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
            return optuna.storages.RDBStorage(url, kwargs, **heartbeat, heartbeat_stale_trial_callback=retry)
    except ImportError as error:  # SQLAlchemy imports the URL's driver (Optuna re-raises that as its cause)
        module = getattr(error.__cause__, "name", None) or error.name
        missing = f"{module}, which is not installed: pip install {DRIVERS.get(module, module)}"
        raise UserError(f"the {url.partition(':')[0]} storage needs the database driver {missing}") from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError) as error:  # no password in these
        message = " ".join(str(getattr(error, "orig", None) or error).split())  # psycopg's has several lines
        raise UserError(f"cannot open the study database: {message}") from None


def was_interrupted(trial: FrozenTrial) -> bool:
    """A trial stopped by Ctrl-C, or failed by the heartbeat after its process died (no error of its own)."""
    return trial.state == TrialState.FAIL and (trial.user_attrs.get("error") or INTERRUPTED) == INTERRUPTED


def retried(trials: list[FrozenTrial]) -> set[int]:  # the trials ``requeue`` replaced by a new one
    return {number for t in trials for number in t.system_attrs.get("retry_history", [])}


def requeue(storage: optuna.storages.RDBStorage, study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """Queue each trial again as Optuna queues a dead process's: its parameters and grid point."""
    for trial in trials:
        storage.get_heartbeat_stale_trial_callback()(study, trial)


def gpu_shares(workers: int) -> list[tuple[str | None, float | None]]:
    """Each worker's GPU (worker i: GPU i % count of the visible ones) and, where several share one, the
    fraction of its memory each may allocate: the memory free now, split evenly, less a CUDA context each."""
    import torch  # only here: the tests' fake programs never need it

    from common.data import GPU_MARGIN_BYTES

    listed = [gpu.strip() for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    gpus = (listed or [str(i) for i in range(torch.cuda.device_count())])[: torch.cuda.device_count()]
    if not gpus:
        return [(None, None)] * workers
    shares = {}
    for index, gpu in enumerate(gpus):
        if (sharing := len(range(index, workers, len(gpus)))) > 1:
            free, total = torch.cuda.mem_get_info(index)
            if (share := free / sharing - CUDA_CONTEXT_BYTES) < GPU_MARGIN_BYTES:  # a run's room, its model
                need = sharing * (GPU_MARGIN_BYTES + CUDA_CONTEXT_BYTES) >> 30
                have = f"GPU {gpu} has {free / 2**30:.1f} GiB free and {sharing} workers need {need} GiB"
                raise UserError(f"{have}; use fewer --workers")
            shares[gpu] = share / total
    return [(gpus[i % len(gpus)], shares.get(gpus[i % len(gpus)])) for i in range(workers)]


def _work(sweep: Sweep, trials: int, worker: int = 0, gpu: str | None = None, share: float | None = None):
    """One worker's ``trials`` trials (fewer when a grid runs out); returns whether Ctrl-C stopped it."""
    if gpu is not None:  # before the program touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if share is not None:
        import torch

        torch.cuda.set_per_process_memory_fraction(share)  # this worker's part of the GPU it shares
    try:
        storage = open_storage(sweep.storage)
        study = optuna.load_study(study_name=sweep.study, storage=storage, pruner=make_pruner(sweep.spec))
        seed = sweep.seed
        # The same seed, history and worker propose the same trials; a continued study and each worker draw
        # their own stream. A grid keeps the one seed: it orders the points, as every worker must.
        if seed is not None and sweep.spec.method != "grid":
            seed = int(np.random.SeedSequence([seed, len(study.trials), worker]).generate_state(1)[0])
        study.sampler = make_sampler(sweep.spec, seed)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if sweep.spec.method == "grid" and study.sampler.is_exhausted(study) and not waiting:
            return False  # every point ran: the grid would repeat one
        # A failed trial (crash, out of memory) is recorded as FAIL and the loop goes on; Ctrl-C is recorded
        # as FAIL too and then propagates.
        study.optimize(sweep, n_trials=trials, catch=(Exception,), gc_after_trial=True)
    except KeyboardInterrupt:
        return True
    return False


def run_sweep(sweep: Sweep, count: int, workers: int = 1) -> tuple[optuna.Study, bool]:
    """Run ``count`` more trials (interrupted ones first); return the study and whether Ctrl-C stopped it."""
    storage, goal = open_storage(sweep.storage), sweep.spec.goal
    study = optuna.create_study(storage=storage, study_name=sweep.study, direction=goal, load_if_exists=True)
    if (direction := study.direction.name.lower()) != goal:
        raise SweepConfigError(f"study {sweep.study} {direction}s, the file {goal}s; use another --study")
    study.set_user_attr("metric", sweep.spec.metric)  # for the report
    trials = study.get_trials(deepcopy=False)
    again = retried(trials)
    if lost := [t for t in trials if was_interrupted(t) and t.number not in again]:
        print(f"running the {len(lost)} interrupted trial(s) of study {sweep.study} again first")
    requeue(storage, study, lost)
    if (workers := min(workers, count)) == 1:
        return study, _work(sweep, count)
    context, processes = multiprocessing.get_context("spawn"), []  # spawn: CUDA cannot be forked
    for i, (gpu, share) in enumerate(gpu_shares(workers)):
        n = count // workers + (i < count % workers)  # as Optuna shows: each process its own n_trials
        processes.append(context.Process(target=_work, args=(sweep, n, i, gpu, share), name=f"worker {i}"))
        processes[-1].start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached the workers too; they record their trials
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second one must not orphan them
        print("\nInterrupted: waiting for the workers to record their running trials", file=sys.stderr)
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():  # the runner alone was signalled
                os.kill(process.pid, signal.SIGINT)
            process.join()
        signal.signal(signal.SIGINT, previous)
        return study, True
    if failed := [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode]:
        raise UserError(f"{', '.join(failed)} ended abnormally; the next trial to start runs its trial again")
    return study, False


def sweep_main(options: SweepOptions) -> None:
    spec = load_sweep(options.config, options.overrides)
    study = options.study or spec.name or Path(options.config).stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study):
        raise SweepConfigError(f"study name {study!r} must be letters, digits, '_', '.', '-' (names files)")
    out_dir = options.out_dir or str(spec.fixed.get("out_dir", "runs"))
    data_dir = options.data_dir or str(spec.fixed.get("data_dir", "data"))
    fixed = {**spec.fixed, "data_dir": data_dir, "out_dir": out_dir}
    program = load_program(spec.program)
    check_program_accepts(program, spec, fixed)
    database_path(out_dir, study).parent.mkdir(parents=True, exist_ok=True)
    url = options.storage or default_storage(out_dir, study)
    known = optuna.study.get_all_study_names(storage=open_storage(url))  # a bad URL fails before the data
    shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)  # to print

    from common import data
    from common.sweep_report import best_command, write_trials_csv  # matplotlib: the parent only

    # The data is prepared once here, so parallel workers never race to download, split or decode it.
    split = {"val_fraction": fixed.get("val_fraction"), "seed": fixed.get("split_seed")}  # when fixed
    split_dir = data.prepare(data_dir, **{k: v for k, v in split.items() if v is not None})
    default = program.get_args_parser().get_default("input_size")
    size = spec.search_space.get("input_size", fixed.get("input_size", default))
    # Every size a trial can train at: fixed, listed, or the default (a range has too many to decode ahead).
    for each in getattr(size, "choices", [size]) if options.workers > 1 else []:  # 1: its first trial does
        for split_name in ("train", "val") if isinstance(each, int) else ():
            data.load_cache(split_dir, split_name, each)

    trials_dir = Path(out_dir) / study
    if study not in known and trials_dir.is_dir() and any(trials_dir.iterdir()):
        # A new study numbers its trials from 0 again, and trial_0 ... would collide with these runs.
        other = "pass that study's --storage to continue it, or choose another --study"
        raise SweepConfigError(f"{trials_dir} holds runs of a study {study} that {shown} lacks; {other}")
    sweep = Sweep(spec, study, url, fixed, out_dir, options.seed)
    result, interrupted = run_sweep(sweep, options.count, options.workers)
    csv_path = write_trials_csv(result, Path(out_dir) / "sweeps" / f"{study}_trials.csv")
    print(f"\n{len(result.trials)} trials in study {study} ({shown}); table: {csv_path}")
    command = best_command(result)
    print(f"best configuration:\n  {command}" if command else "no trial has completed yet")
    storage = f" --storage {shlex.quote(shown)}" if options.storage else ""
    storage += f" --out_dir {shlex.quote(out_dir)}" if out_dir != "runs" else ""
    print(f"report: python common/sweep.py report --study {study}{storage}")
    if interrupted:
        raise UserError(f"{INTERRUPTED}; run the same command again to continue the study")


def report_main(args: argparse.Namespace) -> None:
    from common.sweep_report import write_report

    database = database_path(args.out_dir, args.study)
    if args.storage is None and not database.is_file():
        raise SweepConfigError(f"no study database at {database}; pass the runner's --out_dir or --storage")
    storage = open_storage(args.storage or default_storage(args.out_dir, args.study))
    if args.study not in (names := optuna.get_all_study_names(storage)):
        raise SweepConfigError(f"no study {args.study!r} in that database; it holds {names}")
    study = optuna.load_study(study_name=args.study, storage=storage)
    written = write_report(study, args.out or Path(args.out_dir) / "sweeps" / f"{args.study}_report")
    print("wrote " + ", ".join(str(path) for path in written))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run sweep.yaml locally with Optuna; see also: report")
    add = parser.add_argument
    add("config", help="the sweep file, e.g. sweep.yaml")
    add("--count", type=int, required=True, help="trials to run in this invocation, across workers")
    add("--study", help="study name (default: the file's name key, else its stem)")
    add("--storage", help="Optuna database URL (default: sqlite under OUT_DIR/sweeps/)")
    add("--workers", type=int, default=1, help="worker processes on this machine (more than GPUs share them)")
    add("--out_dir", help="runs folder (default: the file's out_dir value, else runs)")
    add("--data_dir", help="dataset root (default: the file's data_dir value, else data)")
    add("--seed", type=int, help="seed of the trial proposals (default: unseeded)")
    add("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="fix it in every trial")
    return parser


def get_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py report", description="Analyse a sweep study.")
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--storage", help="Optuna database URL (default: sqlite under OUT_DIR/sweeps/)")
    parser.add_argument("--out_dir", default="runs", help="the runner's --out_dir (where the database is)")
    parser.add_argument("--out", help="report folder (default: OUT_DIR/sweeps/<study>_report)")
    return parser


def options_from_args(argv: list[str] | None) -> SweepOptions:
    args = get_args_parser().parse_args(argv)
    if args.count < 1 or args.workers < 1:
        raise ValueError(f"--count and --workers must be >= 1, got {args.count} and {args.workers}")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {item!r}")
        overrides[key.lstrip("-")] = yaml.safe_load(value) if value else ""  # 2 -> int, true -> bool
    return from_namespace(SweepOptions, {**vars(args), "overrides": overrides})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return cli_main(get_report_parser().parse_args, report_main, argv[1:])
    return cli_main(options_from_args, sweep_main, argv)


if __name__ == "__main__":
    # Run the importable copy, so worker processes unpickle common.sweep names rather than __main__ ones.
    from common import sweep

    sys.exit(sweep.main())
