"""Executable code-correctness check: does a raw completion of a function body pass unit tests.

``via-sd bench --check-code`` completes each problem's prompt (a signature and docstring) in every
decoding mode, cuts the completion at the first ``STOP`` string, appends the problem's asserts and
runs the program in a fresh isolated interpreter; a mode's pass rate is the share of exits with 0.
The network guard is best effort (sockets refuse to connect), not a sandbox: run trusted models only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from via_sd_ray.errors import ConfigError

# Seven strings: the in-process engine has no cap (the OpenAI layer takes at most 4 per request).
STOP: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert")

# Runs before the program: no network, then the program itself under its own file name.
_RUNNER = (
    "import socket\n"
    "def _refuse(*args, **kwargs):\n"
    "    raise OSError('network is disabled in the code check')\n"
    "for _name in ('connect', 'connect_ex', 'bind', 'sendto'):\n"
    "    setattr(socket.socket, _name, _refuse)\n"
    "socket.getaddrinfo = socket.create_connection = _refuse\n"
    "with open('solution.py') as _f:\n"
    "    _code = compile(_f.read(), 'solution.py', 'exec')\n"
    "exec(_code, {'__name__': '__main__'})\n"
)


@dataclass(frozen=True)
class Problem:
    """One task: ``prompt`` ends after the docstring, the model writes the indented body."""

    name: str
    prompt: str
    entry_point: str  # the function the tests call
    tests: str  # assert lines run after the completed function
    canonical: str  # a correct body, only for self-tests of the data


def load_problems(path: str | None = None) -> list[Problem]:
    """Problems from ``path`` (default: the packaged ``codecheck_data.json``); ``ConfigError`` if malformed."""
    where = path or "via_sd_ray/codecheck_data.json"
    source = Path(path) if path else resources.files("via_sd_ray").joinpath("codecheck_data.json")
    try:
        raw = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: expected a readable JSON file, received {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected a non-empty list of problems, received {type(raw).__name__}")
    problems: list[Problem] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: problems[{i}]: expected an object, received {item!r:.80}")
        for field in (f.name for f in fields(Problem)):
            value = item.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: problems[{i}].{field}: expected a non-empty string, "
                                  f"received {value!r:.80}")
        problem = Problem(**{f.name: item[f.name] for f in fields(Problem)})
        if f"def {problem.entry_point}(" not in problem.prompt:
            raise ConfigError(f"{where}: problems[{i}].entry_point: expected a function defined in the prompt, "
                              f"received {problem.entry_point!r}")
        if problem.name in {p.name for p in problems}:
            raise ConfigError(f"{where}: problems[{i}].name: expected a unique name, received {problem.name!r} again")
        problems.append(problem)
    return problems


def cut_at_stop(completion: str) -> str:
    """``completion`` up to (not including) the first ``STOP`` string it contains."""
    return completion[:min((i for s in STOP if (i := completion.find(s)) >= 0), default=len(completion))]


def program(problem: Problem, completion: str) -> str:
    """The file that is run: prompt, completion cut at the first stop string, then the tests."""
    return problem.prompt + cut_at_stop(completion) + "\n\n" + problem.tests


def check(problem: Problem, completion: str, timeout_s: float = 10.0) -> bool:
    """True iff the completed program exits with 0 within ``timeout_s`` (a timeout kills it and fails)."""
    with tempfile.TemporaryDirectory(prefix="via-sd-codecheck-") as tmp:
        Path(tmp, "solution.py").write_text(program(problem, completion))
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen([sys.executable, "-I", "-c", _RUNNER], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session: children it forked too
            except (AttributeError, ProcessLookupError):  # no process groups (Windows), or already gone
                proc.kill()
            proc.wait()
            return False


def check_many(problems: list[Problem], completions: list[str], timeout_s: float = 10.0) -> list[bool]:
    """``check`` for each (problem, completion) pair, two at a time; results in input order."""
    if len(problems) != len(completions):
        raise ValueError(f"expected one completion per problem, received {len(completions)} for {len(problems)}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda pc: check(pc[0], pc[1], timeout_s), zip(problems, completions)))


def pass_rate(problems: list[Problem], completions: list[str], timeout_s: float = 10.0) -> dict:
    """Check every completion: {"passed", "total", "pass_rate", "failed": [names]}."""
    results = check_many(problems, completions, timeout_s)
    passed = sum(results)
    return {"passed": passed, "total": len(results), "pass_rate": passed / len(results) if results else 0.0,
            "failed": [p.name for p, ok in zip(problems, results) if not ok]}
