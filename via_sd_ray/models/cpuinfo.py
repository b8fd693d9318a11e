"""What the first processor of /proc/cpuinfo says (no imports beyond the standard library: read by the
dtype choice, the kernel build and the bench record)."""

from __future__ import annotations


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    return frozenset((cpu_field(("flags", "Features"), cpuinfo) or "").split())


def cpu_field(keys: tuple[str, ...], cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first processor's value of the first of ``keys`` in ``cpuinfo`` (e.g. "model name")."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None
