"""The core floor is pure torch: neither it nor its tests load a serving or model framework."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import via_sd_ray.core

FORBIDDEN = ("ray", "fastapi", "grpc", "transformers")
CORE_TESTS = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem != "__init__")


def loaded_after_importing(modules: list[str]) -> list[str]:
    """Top-level packages among ``FORBIDDEN`` that a fresh interpreter holds after importing ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))))\n"
    )
    root = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_core_modules_and_their_tests_import_no_framework():
    core = [f"via_sd_ray.core.{m.name}" for m in pkgutil.iter_modules(via_sd_ray.core.__path__)]
    assert {"via_sd_ray.core.engine", "via_sd_ray.core.verify", "via_sd_ray.core.policy"} <= set(core)
    tests = ["tests.conftest"] + [f"tests.core.{name}" for name in CORE_TESTS]
    assert loaded_after_importing(core + tests) == []


def test_the_check_sees_a_framework():
    assert loaded_after_importing(["via_sd_ray.models.tiny", "transformers"]) == ["transformers"]
