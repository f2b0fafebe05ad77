"""bench/gpu_check.py in its fast CPU form: the checks a CPU can run pass, the GPU-only ones say so."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_cpu_mode_writes_figures_and_pass_lines(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "check.json"
    report = gpu_check.main(["--mode", "cpu", "--quick", "--out", str(out), "--work", str(tmp_path / "work")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    checks = report["checks"]
    assert report["passed"], {name: check.get("error") or check.get("failed") for name, check in checks.items()}
    (run,) = checks["train_presets"]["runs"]
    assert run["evaluate_equals_metrics"] and run["decode_precision"] == "fp32"
    assert checks["resume"]["step_devices"] == ["cpu"] and checks["resume"]["metrics_equal_uninterrupted"]
    for gpu_only in ("train_fp16", "stage1_cpu_vs_gpu", "full_stack", "precision_step"):
        assert checks[gpu_only]["status"] == "skip" and "GPU" in checks[gpu_only]["why"]
    assert report["lines"][0] == "PASS train_presets" and "SKIP full_stack" in report["lines"]
