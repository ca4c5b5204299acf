"""Run the sweep in sweep.yaml locally with Optuna (no wandb server needed), and report on it.

    python common/sweep.py sweep.yaml --count 30 [--study NAME] [--storage URL] [--workers K] [--seed S]
                           [--out_dir runs] [--data_dir data] [--set epochs=10 input_size=128 ...]
    python common/sweep.py report --study NAME [--storage URL] [--out DIR]

Each trial is one in-process run of the sweep's ``program`` (its ``config_from_args`` and ``run``) in
``out_dir/<study>/trial_<number>``. The study lives in a database (SQLite under ``out_dir/sweeps/``
unless ``--storage`` names another), shared by workers and machines; docs/sweeps.md has the workflow.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

import argparse
import contextlib
import importlib
import importlib.util
import io
import multiprocessing
import os
import re
import shlex
import signal
import socket
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import yaml
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from common.config import UserError, cli_main, from_namespace, to_cli
from common.sweep_space import (SweepConfigError, SweepSpec, load_sweep, make_pruner, make_sampler,
                                sample_values, suggest)

ROOT = Path(__file__).resolve().parents[1]
PROGRAM_API = ("get_args_parser", "config_from_args", "run")
RUNNER_OPTIONS = ("out_dir", "name", "wandb_group")  # set per trial, on top of the sweep's parameters
INTERRUPTED = "interrupted (Ctrl-C)"
RETRY_OF = "retry_of"  # a queued retry's system attribute: the number of the interrupted trial
DRIVER_PACKAGES = {"psycopg": '"psycopg[binary]"', "psycopg2": "psycopg2-binary",  # module: pip package
                   "MySQLdb": "mysqlclient"}


@dataclass
class SweepOptions:
    """The runner's command line."""
    config: str
    count: int
    study: str | None = None
    storage: str | None = None
    workers: int = 1
    out_dir: str | None = None   # default: the sweep file's out_dir value, else runs
    data_dir: str | None = None  # default: the sweep file's data_dir value, else data
    overrides: dict[str, Any] | None = None
    seed: int | None = None      # the samplers' seed: the same history proposes the same trials


def load_program(path: str) -> ModuleType:
    """Import the sweep's training script; it must offer get_args_parser, config_from_args and run."""
    file = Path(path)
    if not file.is_absolute():
        file = next((base / file for base in (Path.cwd(), ROOT) if (base / file).is_file()), file)
    if not file.is_file():
        raise SweepConfigError(f"program {path} not found (looked in {Path.cwd()} and {ROOT})")
    file = file.resolve()
    if file.is_relative_to(ROOT):  # import under its real name (part_a.train), once
        module = importlib.import_module(".".join(file.relative_to(ROOT).with_suffix("").parts))
    else:  # elsewhere (a test's fake program): load the file itself, once per path
        name = f"sweep_program_{abs(hash(str(file)))}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, file)
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
        module = sys.modules[name]
    missing = [name for name in PROGRAM_API if not hasattr(module, name)]
    if missing:
        raise SweepConfigError(f"program {path} lacks {', '.join(missing)}; the local runner calls "
                               f"{', '.join(PROGRAM_API)} (see docs/architecture.md)")
    return module


def parse_quietly(parse, argv: list[str]):
    """Call an argparse-based ``parse(argv)``; turn its print-and-exit into a ValueError with the message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse(argv)
    except SystemExit as exit_:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        # argparse's last line is "PROG: error: MESSAGE"; PROG would name this runner, not the program.
        message = lines[-1].split("error: ", 1)[-1] if lines else f"option parsing exited with code {exit_.code}"
        raise ValueError(message) from None


def check_program_accepts(program: ModuleType, spec: SweepSpec, fixed: dict[str, Any]) -> None:
    """Fail before any trial when a parameter is not an option of the program or a value does not parse."""
    parser = program.get_args_parser()
    candidates: dict[str, BaseDistribution | Any] = {**fixed, **spec.search_space, **dict.fromkeys(RUNNER_OPTIONS, "x")}
    for name, dist in candidates.items():
        for value in sample_values(dist):
            try:
                parse_quietly(parser.parse_args, to_cli({name: value}))
            except ValueError as error:
                raise SweepConfigError(f"sweep parameter {name}={value!r} is not accepted by "
                                       f"{spec.program}: {error}") from None


@dataclass
class TrialRunner:
    """The Optuna objective: one training run of ``program`` per trial (picklable for workers)."""
    program: str
    study: str
    search_space: dict[str, BaseDistribution]
    fixed: dict[str, Any]  # the same for every trial; includes data_dir and out_dir
    metric: str
    goal: str
    trials_dir: str

    def __call__(self, trial: optuna.Trial) -> float:
        name = f"trial_{trial.number}"
        values = {"wandb_group": self.study, **self.fixed, **suggest(trial, self.search_space),
                  "out_dir": self.trials_dir, "name": name}
        for key, value in (("program", self.program), ("fixed", self.fixed),
                           ("run_dir", str(Path(self.trials_dir) / name)),
                           ("host", f"{socket.gethostname()}:{os.getpid()}")):
            trial.set_user_attr(key, value)
        reported: list[float] = []

        def report_epoch(epoch: int, metrics: dict) -> None:
            if self.metric not in metrics:
                raise KeyError(f"the program logged no {self.metric!r} (the sweep's metric); it logged "
                               f"{', '.join(sorted(metrics))}")
            reported.append(float(metrics[self.metric]))
            trial.report(reported[-1], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned by hyperband after epoch {epoch} ({self.metric} {reported[-1]:.4f})")

        try:
            program = load_program(self.program)
            program.run(parse_quietly(program.config_from_args, to_cli(values)), epoch_callback=report_epoch)
            if not reported:
                raise RuntimeError(f"the run finished without reporting {self.metric}")
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", INTERRUPTED)
            raise
        except Exception as error:  # recorded with the trial; the sweep goes on (optimize's catch)
            trial.set_user_attr("error", f"{type(error).__name__}: {error}")
            raise
        return max(reported) if self.goal == "maximize" else min(reported)


def database_path(out_dir: str | Path, study: str) -> Path:
    """The default study database, a SQLite file under ``out_dir/sweeps/``."""
    return (Path(out_dir) / "sweeps" / f"{study}.db").resolve()


def default_storage(out_dir: str | Path, study: str) -> str:
    """The Optuna URL of ``database_path``."""
    return f"sqlite:///{database_path(out_dir, study)}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study database. Heartbeats let any worker mark a killed worker's trial as failed: a running
    trial is stamped every SWEEP_HEARTBEAT seconds (default 60) and is stale after three times that."""
    heartbeat = os.environ.get("SWEEP_HEARTBEAT", "60")
    if not heartbeat.isdigit() or int(heartbeat) < 1:
        raise ValueError(f"SWEEP_HEARTBEAT must be a whole number of seconds >= 1, got {heartbeat!r}")
    heartbeat = int(heartbeat)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # wait on locks
    try:
        with _table_creation_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, for years
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                              grace_period=3 * heartbeat)
    except ImportError as error:  # SQLAlchemy imports the URL's driver (Optuna re-raises that as its cause)
        module = getattr(error.__cause__, "name", None) or error.name
        raise UserError(f"the {url.partition(':')[0]} storage needs the database driver {module}, which is "
                        f"not installed: pip install {DRIVER_PACKAGES.get(module, module)}") from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError) as error:  # no password in these
        message = " ".join(str(getattr(error, "orig", None) or error).split())  # psycopg's has several lines
        raise UserError(f"cannot open the study database: {message}") from None


@contextlib.contextmanager
def _table_creation_lock(url: str):
    """Optuna creates its tables on a new database by check-then-create, so machines starting together on
    PostgreSQL all create them and all but one die on a duplicate key; this lock makes them take turns."""
    if not url.startswith("postgresql"):
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as connection:  # held until this transaction ends
        connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(20240520)"))  # any number all share
        yield
    engine.dispose()


def was_interrupted(trial: FrozenTrial) -> bool:
    """A trial stopped by Ctrl-C, or failed by a heartbeat after its worker was killed (no error of its own)."""
    return trial.state == TrialState.FAIL and trial.user_attrs.get("error", INTERRUPTED) == INTERRUPTED


def requeue_interrupted(study: optuna.Study) -> int:
    """Queue a retry of each interrupted trial not retried yet, with its parameters (and grid point), so
    a continued sweep runs it (a grid would otherwise count it as visited); return how many."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get(RETRY_OF) for t in trials}
    todo = [t for t in trials if was_interrupted(t) and t.number not in retried]
    for trial in todo:
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                                  distributions=trial.distributions,
                                                  system_attrs={**trial.system_attrs, RETRY_OF: trial.number}))
    return len(todo)


def _sampler(spec: SweepSpec, seed: int | None, trials: int, worker: int) -> optuna.samplers.BaseSampler:
    """The same seed, history and worker propose the same trials; a continued study and each worker draw
    their own stream (one stream would repeat the first trials' proposals). A grid keeps the one seed: it
    orders the grid's points, an order every worker and continuation must share."""
    if seed is not None and spec.method != "grid":
        seed = int(np.random.SeedSequence([seed, trials, worker]).generate_state(1)[0])
    return make_sampler(spec, seed)


def _take_ticket(tickets) -> bool:
    """Claim one of the trials this invocation may start; shared by all workers, so none overshoots."""
    with tickets.get_lock():
        tickets.value -= 1
        return tickets.value >= 0


@contextlib.contextmanager
def _interrupt_once():
    """The first Ctrl-C stops the sweep; later ones are ignored so Optuna can still record the trial."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _work(study_name: str, storage_url: str, spec: SweepSpec, runner: TrialRunner, tickets,
          seed: int | None = None, worker: int = 0) -> bool:
    """One worker: run trials against the shared study until the tickets (or the grid and the queue)
    run out. Returns whether Ctrl-C stopped it."""
    try:
        with _interrupt_once():
            study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url),
                                      pruner=make_pruner(spec))
            study.sampler = _sampler(spec, seed, len(study.trials), worker)
            grid = isinstance(study.sampler, optuna.samplers.GridSampler)

            def more() -> bool:  # a grid ends when every point was tried, unless a trial is queued
                return (not grid or not study.sampler.is_exhausted(study)
                        or bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))))
            while more() and _take_ticket(tickets):
                # A failed trial (crash, out of memory) is recorded as FAIL and the loop goes on;
                # Ctrl-C is recorded as FAIL too and then propagates.
                study.optimize(runner, n_trials=1, catch=(Exception,), gc_after_trial=True)
                torch = sys.modules.get("torch")
                if torch is not None and torch.cuda.is_initialized():  # an out-of-memory trial's cached blocks
                    torch.cuda.empty_cache()
    except KeyboardInterrupt:
        return True
    return False


def _worker_process(index: int, gpus: list[str], *args) -> None:
    if gpus:  # before the program touches CUDA: worker i trains on GPU i % count
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    if _work(*args, worker=index):
        sys.exit(130)


def _visible_gpus() -> list[str]:
    import torch  # only here: the fake programs of the tests never need it
    listed = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return (listed or [str(i) for i in range(torch.cuda.device_count())])[:torch.cuda.device_count()]


def _run_workers(context, workers: int, args: tuple) -> bool:
    """``workers`` processes running ``_work``; returns whether Ctrl-C stopped them."""
    gpus = _visible_gpus()
    processes = [context.Process(target=_worker_process, args=(i, gpus, *args), name=f"sweep-worker-{i}")
                 for i in range(workers)]
    for process in processes:
        process.start()
    try:
        with _interrupt_once():
            for process in processes:
                process.join()
    except KeyboardInterrupt:
        print("\nInterrupted: waiting (up to 2 minutes) for the workers to record their running trials",
              file=sys.stderr)
        for process in processes:  # a worker that already got the terminal's Ctrl-C ignores this one
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in processes:
            process.join(timeout=120)
            if process.is_alive():  # its trial stays RUNNING until the heartbeat marks it failed
                process.terminate()
                process.join()
        return True
    failed = [p.name for p in processes if p.exitcode not in (0, 130)]
    if failed:
        raise RuntimeError(f"{', '.join(failed)} exited abnormally (exit codes "
                           f"{[p.exitcode for p in processes]}); see the messages above")
    return False


def run_sweep(spec: SweepSpec, runner: TrialRunner, *, study_name: str, storage_url: str, count: int,
              workers: int = 1, seed: int | None = None) -> tuple[optuna.Study, bool]:
    """Run ``count`` more trials of the study (created or continued, interrupted trials first); return it
    and whether Ctrl-C stopped it."""
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage_url),
                                direction=spec.goal, load_if_exists=True)
    if study.direction.name.lower() != spec.goal:
        raise SweepConfigError(f"study {study_name} exists and {study.direction.name.lower()}s; the sweep "
                               f"file says {spec.goal}; use another --study name")
    study.set_user_attr("metric", spec.metric)  # for the report
    if queued := requeue_interrupted(study):
        print(f"running the {queued} interrupted trial(s) of study {study_name} again first")
    context = multiprocessing.get_context("spawn")  # fresh processes: CUDA cannot be forked
    args = (study_name, storage_url, spec, runner, context.Value("i", count), seed)
    return study, _run_workers(context, workers, args) if workers > 1 else _work(*args)


def _input_sizes(program: ModuleType, spec: SweepSpec, fixed: dict[str, Any]) -> list[int]:
    """Every input_size a trial can train at: fixed, listed, or the program's default."""
    dist = spec.search_space.get("input_size")
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return [int(size) for size in dist.choices]
    if dist is not None:  # a range: too many sizes to decode ahead; trials build what they need
        return []
    size = fixed.get("input_size", program.get_args_parser().get_default("input_size"))
    return [int(size)] if size is not None else []


def _prepare_data(program: ModuleType, spec: SweepSpec, fixed: dict[str, Any], workers: int) -> None:
    """Prepare the data once here, so parallel workers never race to download, split or decode it
    (the split options are the program's val_fraction and split_seed when the sweep fixes them)."""
    from common import data
    split_options = {"val_fraction": fixed.get("val_fraction"), "seed": fixed.get("split_seed")}
    split_dir = data.prepare(fixed["data_dir"], **{k: v for k, v in split_options.items() if v is not None})
    if workers > 1:  # else each worker's first trial would decode the same images at once
        for size in _input_sizes(program, spec, fixed):
            for split in ("train", "val"):
                data.load_cache(split_dir, split, size)


def sweep_main(options: SweepOptions) -> None:
    spec = load_sweep(options.config, options.overrides)
    study = options.study or spec.name or Path(options.config).stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study):
        raise SweepConfigError(f"study name {study!r} must be letters, digits, '_', '.', '-' (it names files)")
    out_dir = options.out_dir or str(spec.fixed.get("out_dir", "runs"))
    fixed = {**spec.fixed, "data_dir": options.data_dir or str(spec.fixed.get("data_dir", "data")), "out_dir": out_dir}
    program = load_program(spec.program)
    check_program_accepts(program, spec, fixed)
    database = database_path(out_dir, study)
    database.parent.mkdir(parents=True, exist_ok=True)
    storage_url = options.storage or default_storage(out_dir, study)
    known = optuna.study.get_all_study_names(storage=open_storage(storage_url))  # a bad URL fails before the data
    _prepare_data(program, spec, fixed, options.workers)

    from common.sweep_report import best_command, write_trials_csv  # matplotlib: the parent only
    trials_dir = Path(out_dir) / study
    if study not in known and trials_dir.is_dir() and any(trials_dir.iterdir()):
        # A new study numbers its trials from 0 again, and trial_0 ... would collide with these runs.
        raise SweepConfigError(f"{trials_dir} holds runs of an earlier study {study}, which {storage_url} does not "
                               "have; pass that study's --storage to continue it, or choose another --study")
    runner = TrialRunner(program=spec.program, study=study, search_space=spec.search_space, fixed=fixed,
                         metric=spec.metric, goal=spec.goal, trials_dir=str(trials_dir))
    result, interrupted = run_sweep(spec, runner, study_name=study, storage_url=storage_url,
                                    count=options.count, workers=options.workers, seed=options.seed)
    csv_path = write_trials_csv(result, Path(out_dir) / "sweeps" / f"{study}_trials.csv")
    print(f"\n{len(result.trials)} trials in study {study} ({storage_url}); table: {csv_path}")
    command = best_command(result)
    print(f"best configuration:\n  {command}" if command else "no trial has completed yet")
    print(f"report: python common/sweep.py report --study {study}"
          + (f" --storage {shlex.quote(storage_url)}" if options.storage else "")
          + (f" --out_dir {shlex.quote(out_dir)}" if out_dir != "runs" else ""))
    if interrupted:
        raise UserError("interrupted (Ctrl-C); run the same command again to continue the study")


def report_main(args: argparse.Namespace) -> None:
    from common.sweep_report import write_report
    database = database_path(args.out_dir, args.study)
    if args.storage is None and not database.is_file():
        raise SweepConfigError(f"no study database at {database}; pass the runner's --out_dir, or --storage URL")
    storage_url = args.storage or default_storage(args.out_dir, args.study)
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise SweepConfigError(f"no study {args.study!r} in {storage_url}; it holds: "
                               f"{', '.join(names) or 'none'}") from None
    written = write_report(study, args.out or Path(args.out_dir) / "sweeps" / f"{args.study}_report")
    print("wrote " + ", ".join(str(path) for path in written))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run sweep.yaml locally with Optuna "
                                     "(report: python common/sweep.py report --study NAME).")
    parser.add_argument("config", help="the sweep file, e.g. sweep.yaml")
    parser.add_argument("--count", type=int, required=True, help="trials to run in this invocation, across workers")
    parser.add_argument("--study", help="study name (default: the file's name key, else its stem)")
    parser.add_argument("--storage", help="Optuna database URL, e.g. postgresql+psycopg://user:pw@host/db "
                        "(default: sqlite under OUT_DIR/sweeps/)")
    parser.add_argument("--workers", type=int, default=1,
                        help="parallel worker processes on this machine, one trial each (default: 1)")
    parser.add_argument("--out_dir", help="runs folder (default: the file's out_dir value, else runs)")
    parser.add_argument("--data_dir", help="dataset root (default: the file's data_dir value, else data)")
    parser.add_argument("--seed", type=int, help="seed of the trial proposals: the same history proposes the "
                        "same trials (default: unseeded)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="fix a parameter for every trial (searched or not), e.g. --set epochs=5")
    return parser


def get_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py report", description="Analyse a sweep study.")
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--storage", help="Optuna database URL (default: sqlite under OUT_DIR/sweeps/)")
    parser.add_argument("--out_dir", default="runs", help="the runner's --out_dir (finds the default database)")
    parser.add_argument("--out", help="report folder (default: OUT_DIR/sweeps/<study>_report)")
    return parser


def options_from_args(argv: list[str] | None) -> SweepOptions:
    args = get_args_parser().parse_args(argv)
    if args.count < 1 or args.workers < 1:
        raise ValueError(f"--count and --workers must be >= 1, got {args.count} and {args.workers}")
    overrides = {}
    for item in args.overrides:
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
