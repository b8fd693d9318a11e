"""The code-correctness check: its data is sound and its runner passes, fails, times out and cuts."""

from __future__ import annotations

import json
import time

import pytest

from via_sd_ray.codecheck import STOP, Problem, check, check_many, load_problems, pass_rate, program
from via_sd_ray.errors import ConfigError

PROBLEMS = load_problems()


def test_problems_load_with_unique_names():
    names = [p.name for p in PROBLEMS]
    assert len(names) == 24
    assert len(set(names)) == len(names)
    for p in PROBLEMS:
        assert p.prompt.rstrip(" ").endswith('"""\n'), p.name
        assert f"def {p.entry_point}(" in p.prompt
        assert 3 <= p.tests.count("assert ") <= 6, p.name


def test_every_canonical_body_passes_and_has_no_stop_string():
    assert all(not any(s in p.canonical for s in STOP) for p in PROBLEMS)
    report = pass_rate(PROBLEMS, [p.canonical for p in PROBLEMS])
    assert report == {"passed": 24, "total": 24, "pass_rate": 1.0, "failed": []}


@pytest.mark.parametrize("body", ["    return None\n", "    pass\n"])
def test_a_stub_body_fails_almost_everything(body):
    report = pass_rate(PROBLEMS, [body] * len(PROBLEMS))
    assert report["total"] - report["passed"] >= 22
    assert len(report["failed"]) == report["total"] - report["passed"]


def test_an_infinite_loop_times_out():
    start = time.monotonic()
    assert check(PROBLEMS[0], "    while True:\n        pass\n", timeout_s=2) is False
    assert time.monotonic() - start < 6


def test_text_after_a_stop_string_is_cut():
    one = Problem("one", 'def one() -> int:\n    """Return 1."""\n', "one", "assert one() == 1\n", "    return 1\n")
    completion = "    return 1\n\ndef junk(:"
    assert "junk" not in program(one, completion)
    assert check(one, completion, timeout_s=5) is True
    assert check(one, "    return 2\n", timeout_s=5) is False


def test_a_syntax_error_fails_and_results_keep_order():
    assert check_many(PROBLEMS[:2], ["    return (\n", PROBLEMS[1].canonical], timeout_s=5) == [False, True]


def test_the_network_is_refused():
    one = Problem("net", 'def net() -> bool:\n    """Try to connect."""\n', "net", "assert net()\n", "")
    body = ("    import socket\n    try:\n        socket.create_connection(('127.0.0.1', 9))\n"
            "    except OSError as exc:\n        return 'network is disabled' in str(exc)\n    return False\n")
    assert check(one, body, timeout_s=5) is True


@pytest.mark.parametrize("field", ["name", "prompt", "entry_point", "tests", "canonical"])
def test_a_malformed_file_names_the_field(tmp_path, field):
    raw = json.loads(json.dumps([vars(p) for p in PROBLEMS[:2]]))
    del raw[1][field]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=rf"problems\[1\]\.{field}: expected a non-empty string, received None"):
        load_problems(str(path))


def test_a_duplicate_name_or_bad_json_is_a_config_error(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([vars(PROBLEMS[0])] * 2))
    with pytest.raises(ConfigError, match=r"problems\[1\]\.name: expected a unique name"):
        load_problems(str(path))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="expected a readable JSON file"):
        load_problems(str(path))
