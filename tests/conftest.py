"""Shared fixtures: a private state directory and a runner for the real
executables in bin/ as subprocesses."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")
# The source root holding the package (plugin/xapi_storage_tasks).
SRC = os.path.join(ROOT, "plugin")
sys.path.insert(0, SRC)


class Result:
    """What one executable call produced."""

    def __init__(self, proc):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def json(self):
        return json.loads(self.stdout)

    @property
    def error_name(self):
        assert self.returncode == 1, (self.stdout, self.stderr)
        return self.json["params"][0]


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A fresh state directory, exported as TASK_STATE_DIR for this test and
    for the executables it runs."""
    path = tmp_path / "state"
    monkeypatch.setenv("TASK_STATE_DIR", str(path))
    monkeypatch.setenv("TASK_SYSLOG", "0")
    return path


@pytest.fixture
def store(state_dir):
    from xapi_storage_tasks.tasks.store import Store

    with Store(str(state_dir)) as s:
        yield s


def run_bin(method, stdin=b"", args=("--json",), env=None, timeout=30):
    """Run ``bin/<method>`` with ``stdin`` (bytes, str or a JSON-able
    object) and return a :class:`Result`."""
    if not isinstance(stdin, (bytes, str)):
        stdin = json.dumps(stdin)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    proc = subprocess.run(
        [os.path.join(BIN, method), *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
    )
    return Result(proc)


@pytest.fixture
def call():
    """``call(method, params)``: the toolstack's way, ``--json`` and stdin."""
    return run_bin
