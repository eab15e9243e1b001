"""scripts/verify.py's lock rule: a stage with the recorded inputs must have the recorded outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("verify", ROOT / "scripts" / "verify.py")
verify = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verify)


def _lock(**stages: dict) -> str:
    return yaml.safe_dump({"schema": "2.0", "stages": stages})


def _stage(dep: str, out: str, param: int = 1) -> dict:
    return {
        "cmd": "python stages/x.py",
        "deps": [{"path": "src/x.py", "md5": dep, "size": 1}],
        "params": {"params.yaml": {"x": param}},
        "outs": [{"path": "data/x", "md5": out, "size": 2}],
    }


def test_same_inputs_other_outputs_is_a_problem():
    problems, stale = verify.compare_locks(_lock(fit=_stage("a", "o1")), _lock(fit=_stage("a", "o2")))
    assert problems == ["stage fit: same inputs as recorded, other outputs: data/x"] and stale == []


def test_changed_code_or_params_is_not_comparable_not_failed():
    recorded = _lock(fit=_stage("a", "o1"), score=_stage("s", "p1"), prep=_stage("q", "r"))
    current = _lock(fit=_stage("b", "o2"), score=_stage("s", "p2", param=2), prep=_stage("q", "r"))
    problems, stale = verify.compare_locks(recorded, current)
    assert problems == [] and stale == ["fit", "score"]


def test_added_and_removed_stages_are_listed():
    problems, stale = verify.compare_locks(_lock(old=_stage("a", "o")), _lock(new=_stage("a", "o")))
    assert problems == [] and stale == ["new (only in the current lock)", "old (only in the recorded lock)"]


def test_machine_kind_names_the_cpu_vendor_capability_and_torch():
    import platform

    import torch

    from vadbench.machine import cpu_vendor, machine_kind

    kind = machine_kind()
    assert kind.startswith(f"{platform.machine()}-{cpu_vendor()}-{torch.backends.cpu.get_cpu_capability()}-torch")
    assert "+" not in kind and "/" not in kind and " " not in kind


def test_committed_locks_are_named_by_machine_kind():
    # every committed lock must be reachable: named <arch>-<vendor>-<capability>-torch<version>.lock
    locks = sorted((ROOT / "profiles" / "verify-locks").glob("*.lock"))
    assert locks
    for lock in locks:
        arch, vendor, capability, torch_part = lock.stem.split("-", 3)
        assert arch and vendor and capability.isupper() and torch_part.startswith("torch"), lock.name
