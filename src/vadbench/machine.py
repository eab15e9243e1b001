"""What machine a result came from: CPU model and vendor, read from /proc/cpuinfo where there is one.

Benchmark reports name the CPU with `cpu_model`; `scripts/verify.py` puts `cpu_vendor` into the machine kind its
locks are filed under. No DVC stage depends on this module: what it reports never enters a cached output.
"""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo_field(key: str) -> str | None:
    """The first ``key : value`` of /proc/cpuinfo (Linux), or None where there is no such file or key."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` reports; for benchmark reports."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


_VENDORS = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}


def cpu_vendor() -> str:
    """'Intel', 'AMD', another /proc/cpuinfo vendor_id as spelled there, or 'unknown'. Part of the verify locks'
    machine kind: with the same AVX-512 capability an Intel Xeon and an AMD EPYC pretrain different bytes."""
    vendor = _cpuinfo_field("vendor_id")
    return _VENDORS.get(vendor, vendor) if vendor else "unknown"
