"""Sweeps across machines on a real PostgreSQL server: a throwaway cluster on 127.0.0.1 (Debian's
postgresql binaries, which .ci/run installs), and `python common/sweep.py` processes as the machines.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest
from helpers import fake_sweep, fake_sweep_argv
from optuna.trial import TrialState

from common import sweep

ROOT = Path(__file__).resolve().parents[1]


def _server_binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on the PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    if initdb := shutil.which("initdb"):
        return Path(initdb).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres():
    """``user@127.0.0.1:port`` of a new cluster that trusts local connections, stopped at the end."""
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("needs PostgreSQL's initdb and pg_ctl (apt-get install postgresql, as .ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="sweep-postgres-"))
    as_server = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as nobody
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_server = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"
    subprocess.run(
        [*as_server, binaries / "initdb", "-D", data, "-U", "sweeps", "--auth=trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_server,
            binaries / "pg_ctl",
            "-D",
            data,
            "-l",
            root / "log",
            "-w",
            "start",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"sweeps@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*as_server, binaries / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root)


@pytest.fixture
def new_database(postgres) -> str:
    """The storage URL of a new, empty database (Optuna has created no table in it yet), with the
    driver that docs/sweeps.md names."""
    import psycopg

    name = f"sweeps_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"postgresql://{postgres}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://{postgres}/{name}"


@pytest.fixture
def start_machine(tmp_path, prepared_data, new_database):
    """Starts one machine's `python common/sweep.py` on the fake sweep of tmp_path and new_database."""

    def start(machine: str, *options: str, storage: str = new_database) -> subprocess.Popen:
        env = {**os.environ, "SWEEP_HEARTBEAT": "1"}  # stale after 3 s, not 3 min
        where = fake_sweep_argv(
            tmp_path, prepared_data, tmp_path / machine, "--study", "s", "--storage", storage
        )
        command = [
            sys.executable,
            "common/sweep.py",
            *where,
            *options,
        ]
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    return start


def finish(machine: subprocess.Popen) -> str:
    out, err = machine.communicate(timeout=120)
    assert machine.returncode == 0, out + err
    return out


@pytest.mark.parametrize(
    "url, module, package",
    [
        ("postgresql+psycopg", "psycopg", '"psycopg[binary]"'),
        ("postgresql+psycopg2", "psycopg2", "psycopg2-binary"),
    ],
)
def test_a_missing_driver_or_server_is_one_error_line(
    tmp_path, prepared_data, capsys, monkeypatch, url, module, package
):
    fake_sweep(tmp_path, {"quality": {"values": [0.5]}})
    storage = f"{url}://u:secret@127.0.0.1:1/db"
    argv = fake_sweep_argv(tmp_path, prepared_data, tmp_path / "runs", "--count", "1", "--storage", storage)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, module, None)  # not installed
        assert sweep.main(argv) == 1
    assert capsys.readouterr().err == (
        f"error: the {url} storage needs the database driver {module}, "
        f"which is not installed: pip install {package}\n"
    )
    if module == "psycopg":  # installed: port 1 has no server
        assert sweep.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: cannot open the study database: ") and err.count("\n") == 1
        assert "secret" not in err


def test_two_machines_started_together_on_a_new_database_share_the_study(
    tmp_path, new_database, start_machine
):
    fake_sweep(tmp_path, {"quality": {"min": 0.0, "max": 1.0}, "epochs": {"value": 1}})
    with_password = new_database.replace("sweeps@", "sweeps:secret@")  # the server trusts, ignores it
    machines = [start_machine(name, "--count", "3", storage=with_password) for name in "ab"]
    for machine in machines:
        out = finish(machine)
        assert "sweeps:***@" in out and "secret" not in out  # the closing lines mask the password
    study = optuna.load_study(study_name="s", storage=new_database)
    assert sorted(t.number for t in study.trials if t.state == TrialState.COMPLETE) == list(range(6))
    ran = [{int(p.name.removeprefix("trial_")) for p in (tmp_path / name / "s").iterdir()} for name in "ab"]
    assert len(ran[0]) == len(ran[1]) == 3 and ran[0] | ran[1] == set(range(6))


def test_a_machine_killed_mid_trial_has_its_trial_run_again_by_a_machine_still_running(
    tmp_path, new_database, start_machine
):
    fake_sweep(tmp_path, {"quality": {"min": 0.0, "max": 1.0}, "epochs": {"value": 1}})
    killed = start_machine("a", "--count", "1", "--set", "sleep=600")
    running = start_machine("b", "--count", "8", "--set", "sleep=1")
    while not all((tmp_path / name / "s").is_dir() for name in "ab"):  # both have started a trial
        assert killed.poll() is None and running.poll() is None, killed.communicate() + running.communicate()
        time.sleep(0.1)
    study = optuna.load_study(study_name="s", storage=new_database)
    [lost] = [t for t in study.get_trials() if t.user_attrs["run_dir"].startswith(str(tmp_path / "a"))]
    killed.kill()  # SIGKILL: no Python cleanup, its trial stays RUNNING
    killed.wait()
    # b starts a trial every second; 3 s after a's last heartbeat, the next one fails a's trial, and the
    # storage queues it again: b, which was already running, runs it.
    finish(running)
    assert study.trials[lost.number].state == TrialState.FAIL
    [retry] = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == lost.number]
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params
    assert retry.user_attrs["run_dir"].startswith(str(tmp_path / "b")) and retry.user_attrs["error"] == ""
    assert not sweep.was_interrupted(retry) and sweep.was_interrupted(study.trials[lost.number])
