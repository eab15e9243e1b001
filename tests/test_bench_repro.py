"""benchmarks/bench_repro.py: the report of a run spread over several invocations, and the resume guard."""

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _bench():
    import bench_repro

    return importlib.reload(bench_repro)  # monkeypatched attributes never leak between tests


def _run(utc: str, **extra) -> dict:
    return {"kind": "run", "utc": utc, "commit": "abc1234", "load1": 1.0, **extra}


def _stage(name: str, seconds: float) -> dict:
    return {"kind": "stage", "stage": name, "seconds": seconds}


def test_incomplete_report_counts_each_stage_once(tmp_path):
    bench = _bench()
    log = [_run("2026-01-01 00:00"), _stage("check", 2.0), _stage("fit@a", 100.0)]
    log += [_run("2026-01-01 01:00"), _stage("check", 3.0), _stage("fit@b", 50.0)]
    text = bench.report(tmp_path, "full", log, n_stages=10, finished=False)
    assert "Incomplete: 3 of 10 stages" in text and "(153 s)" in text  # check counted once, its latest time
    assert "| check | 3.0 |" in text and "| check | 2.0 |" not in text
    assert "Run in 2 invocations" in text and "started 2026-01-01 00:00" in text
    assert "## Cells" not in text  # no summary.json before `aggregate`


def test_finished_report_knows_cpu_only_when_no_invocation_was_interrupted(tmp_path, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "cell_rows", lambda project: ["| cell row |"])
    whole = [_run("2026-01-01 00:00", cpu_seconds=80.0, load1_end=1.5), _stage("check", 2.0), _stage("fit", 40.0)]
    text = bench.report(tmp_path, None, whole, n_stages=2, finished=True)
    assert "**Total: 0.7 min (42 s)** for 2 of 2 stages; the run used 80 CPU-seconds" in text
    assert "| cell row |" in text and "invocations" not in text
    resumed = [_run("2026-01-01 00:00"), _stage("check", 2.0), *whole]
    assert "CPU-seconds not known" in bench.report(tmp_path, None, resumed, n_stages=2, finished=True)


def test_resume_refuses_a_clone_of_another_profile(tmp_path, monkeypatch):
    bench = _bench()
    clone = tmp_path / "clone"
    (clone / "profiles").mkdir(parents=True)
    (clone / "dvc.yaml").write_text("stages: {}\n")
    (clone / "params.yaml").write_text("seed: 0\n")
    (clone / "profiles" / "full.yaml").write_text("seed: 1\n")
    monkeypatch.setattr(sys, "argv", ["bench_repro.py", "--profile", "full", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="params.yaml is not profiles/full.yaml"):
        bench.main()
    assert (clone / "params.yaml").read_text() == "seed: 0\n"  # nothing touched
