"""serving.niceness: every thread of a process set, and nothing done outside a Ray actor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from via_sd_ray.config import ServingConfig
from via_sd_ray.serving.priority import apply_niceness, in_ray_actor, set_niceness

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux procfs")

THREADED_CHILD = ("import threading, time\n"
                  "for _ in range(2): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
                  "print('up', flush=True); time.sleep(60)\n")


def thread_niceness(pid: int) -> dict[int, int]:
    """Each live thread's nice value, from /proc (field 19 of stat, after the parenthesised name); a thread
    that ends between the listing and the read (a replica's short-lived workers) has none."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue
        out[int(tid)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


def test_every_thread_of_a_process_takes_the_niceness():
    child = subprocess.Popen([sys.executable, "-c", THREADED_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        assert set(thread_niceness(child.pid).values()) == {os.nice(0)}
        target = min(os.nice(0) + 7, 19)  # raising niceness needs no privilege
        assert set_niceness(target, child.pid) == len(thread_niceness(child.pid)) >= 3
        assert set(thread_niceness(child.pid).values()) == {target}
        assert set_niceness(target, child.pid) == 0  # already there
        assert set_niceness(None, child.pid) == 0
    finally:
        child.kill()
        child.wait()


def test_outside_a_ray_actor_nothing_changes():
    before = thread_niceness(os.getpid())
    assert not in_ray_actor()
    apply_niceness(min(os.nice(0) + 5, 19))
    assert thread_niceness(os.getpid()) == before


def test_the_config_defaults_to_0_and_takes_null():
    assert ServingConfig().niceness == 0
    assert ServingConfig(niceness=None).niceness is None
    with pytest.raises(ValueError, match="niceness"):
        ServingConfig(niceness=25)
