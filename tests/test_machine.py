"""vadbench.machine: the CPU model of benchmark reports and the vendor of the verify locks' machine kind."""

from __future__ import annotations

from pathlib import Path

import vadbench.machine as machine
from vadbench.machine import cpu_model, cpu_vendor


def test_cpu_model_and_vendor_read_cpuinfo_else_fall_back(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    real_path = Path
    monkeypatch.setattr(machine, "Path", lambda p: fake if p == "/proc/cpuinfo" else real_path(p))
    # "model" and "model name" are different keys; the first processor's values count
    fake.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: Test CPU 9000 @ 1 GHz\n\n"
        "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Other\n"
    )
    assert cpu_model() == "Test CPU 9000 @ 1 GHz" and cpu_vendor() == "AMD"
    fake.write_text("vendor_id\t: GenuineIntel\n")
    assert cpu_vendor() == "Intel"
    fake.write_text("vendor_id\t: HygonGenuine\n")
    assert cpu_vendor() == "HygonGenuine"
    fake.unlink()  # no /proc/cpuinfo (macOS, Windows): what platform reports, never an error
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    assert cpu_model() == machine.platform.machine() and cpu_vendor() == "unknown"
