"""Scenarios that run in their own process and Ray cluster (``python -m MODULE OUT.json ARGS``), started
in the background as soon as pytest has collected a test that asks for one, so their ~100 s each (cluster
start, autoscaling delays, replica replacement) overlap the rest of the suite. They keep ~70 % of two
cores busy, so the gain is the part of them that waits, not their whole length.

A test names its scenario with ``@pytest.mark.scenario("tests.serving.tp_scenario", "tiny")`` and takes
the ``scenario`` fixture, which waits (bounded) for that run and returns what it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = pytest.StashKey[dict]()


@dataclass
class Run:
    proc: subprocess.Popen
    out: Path
    log: Path
    started: float

    def wait(self, timeout_s: float) -> tuple[int, dict, str]:
        """(return code, the JSON record or {}, the log's tail) once the process ended."""
        try:
            code = self.proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            stop(self)
            code = -9
        record = json.loads(self.out.read_text()) if self.out.exists() and self.out.stat().st_size else {}
        return code, record, self.log.read_text(errors="replace")[-4000:]


def stop(run: Run) -> None:
    if run.proc.poll() is None:
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait(timeout=30)


def skipped(item: pytest.Item) -> bool:
    return item.get_closest_marker("skip") is not None or \
        any(mark.args and mark.args[0] is True for mark in item.iter_markers("skipif"))


def start(config: pytest.Config, items: list[pytest.Item]) -> None:
    runs: dict[tuple, Run] = {}
    config.stash[KEY] = runs
    if config.option.collectonly or hasattr(config, "workerinput"):
        return  # under pytest-xdist each worker collects every test: the fixture starts its own when asked
    for item in items:
        mark = item.get_closest_marker("scenario")
        if mark is None or skipped(item) or tuple(mark.args) in runs:
            continue
        runs[tuple(mark.args)] = launch(*mark.args)


def launch(module: str, *args: str) -> Run:
    directory = Path(tempfile.mkdtemp(prefix=f"via-sd-{module.rsplit('.', 1)[-1]}-"))
    out, log = directory / "record.json", directory / "log.txt"
    with open(log, "w") as sink:
        # its own session: stop() kills the scenario and every process it started
        proc = subprocess.Popen([sys.executable, "-m", module, str(out), *args], cwd=ROOT, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Run(proc, out, log, time.monotonic())


def stop_all(config: pytest.Config) -> None:
    for run in config.stash.get(KEY, {}).values():
        stop(run)


@pytest.fixture
def scenario(request):
    """Waits for this test's background scenario: (return code, its JSON record, the tail of its log)."""
    mark = request.node.get_closest_marker("scenario")
    runs = request.config.stash[KEY]
    if tuple(mark.args) not in runs:  # not started at collection (pytest-xdist): start it now
        runs[tuple(mark.args)] = launch(*mark.args)
    run = runs[tuple(mark.args)]
    return lambda timeout_s=540: run.wait(timeout_s)
