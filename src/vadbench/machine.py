"""What machine a result came from: CPU model and vendor, read from /proc/cpuinfo where there is one.

Benchmark reports name the CPU with `cpu_model`; `machine_kind` (with `cpu_vendor` in it) is the kind that
`scripts/verify.py` files its locks under and that per-kind recorded hashes are keyed by. No DVC stage depends on this module: what it reports never enters a cached output.
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


def machine_kind() -> str:
    """CPU architecture, vendor, torch's CPU kernel capability and torch version, e.g.
    x86_64-AMD-AVX2-torch2.14.1_cu130: the machines that give the same float bytes (docs/CI.md). The vendor counts:
    an Intel Xeon and an AMD EPYC, both AVX-512, pretrained different fractal-backbone bytes from the same params
    (2026-12-07)."""
    import torch

    kind = f"{platform.machine()}-{cpu_vendor()}-{torch.backends.cpu.get_cpu_capability()}-torch{torch.__version__}"
    return kind.replace("+", "_").replace(" ", "_")
