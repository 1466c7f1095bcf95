"""tools/gpu_check.py at toy sizes on the CPU, so that the GPU acceptance run cannot rot where CI has no GPU."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "gpu_check.py")
# Every step, in order: a step dropped from the tool or renamed fails here.
STEPS = ["gpu-tests", "numerics", "demo-bfloat16", "demo-float16", "torchrun", "bench-window-process",
         "throughput-swin-t", "throughput-swin-b", "bench-model", "emulation-tests"]


def run_check(out, *args):
    """tools/gpu_check.py --device cpu --smoke --out OUT ARGS; the completed process and the parsed report."""
    result = subprocess.run([sys.executable, TOOL, "--device", "cpu", "--smoke", "--out", str(out), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=1200)
    report_path = os.path.join(out, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else None
    return result, report


def by_name(report):
    return {step["name"]: step for step in report["steps"]}


@pytest.mark.slow
def test_smoke_run_passes_every_step(digits_root, tmp_path):
    result, report = run_check(tmp_path, "--digits", digits_root)
    failed = [(s["name"], s.get("error")) for s in (report or {"steps": []})["steps"] if s["status"] != "passed"]
    assert result.returncode == 0, (failed, result.stdout[-3000:], result.stderr[-3000:])
    assert [step["name"] for step in report["steps"]] == STEPS
    assert all(step["status"] == "passed" for step in report["steps"]) and report["passed"]
    steps = by_name(report)
    numerics = steps["numerics"]["details"]["cases"]
    # 2 attention paths x kernel on/off x 3 precisions eager, plus the compiled case of the smoke sizes.
    assert len(numerics) == 13 and sum(case["compiled"] for case in numerics) == 1
    for dtype in ("bfloat16", "float16"):
        demo = steps[f"demo-{dtype}"]["details"]
        assert demo["resumed_at"][1] > 0, "the rerun must continue from a mid-epoch checkpoint"
        assert demo["train_loss"][-1] < demo["train_loss"][0]
        assert demo["eval"]["acc1"] == demo["val_acc1"][-1]
    torchrun = steps["torchrun"]["details"]
    assert [run["backend"] for run in torchrun["runs"].values()] == ["gloo", "gloo"]  # DDP and FSDP in a group
    assert torchrun["eval_acc1"] == torchrun["runs"]["fsdp"]["val_acc1"]
    assert steps["throughput-swin-b"]["details"]["train_images_per_second"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# GPU check: PASSED")
    assert "| numerics | passed |" in markdown and "bfloat16: logits 0.05, gradients 0.1" in markdown
    assert os.path.getsize(tmp_path / "log.txt") > 0
    assert not (tmp_path / "work").exists(), "the runs' folders are removed unless --keep-work"


@pytest.mark.slow
def test_a_failing_step_makes_the_exit_status_non_zero_and_the_run_goes_on(tmp_path):
    # Tolerances scaled to 0: every case that is not bit-identical to the float32 explicit path fails.
    result, report = run_check(tmp_path, "--only", "numerics,bench-window-process", "--tolerance-scale", "0")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    steps = by_name(report)
    assert steps["numerics"]["status"] == "failed" and not report["passed"]
    assert "out of tolerance or failed: sdpa unfused float32 eager" in steps["numerics"]["error"]
    assert any("FAILED" in line for line in steps["numerics"]["output_tail"])
    assert steps["bench-window-process"]["status"] == "passed"
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# GPU check: FAILED") and "### numerics: end of the output" in markdown


def test_a_spent_budget_skips_the_steps_left_and_the_run_is_incomplete(tmp_path):
    result, report = run_check(tmp_path, "--quick", "--budget", "0.001")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert [step["name"] for step in report["steps"]] == ["gpu-tests", "numerics", "demo-bfloat16", "torchrun",
                                                          "throughput-swin-t"]
    assert all(step["status"] == "skipped" and "budget" in step["error"] for step in report["steps"])
    assert (tmp_path / "report.md").read_text().startswith("# GPU check: INCOMPLETE")


def test_unknown_step_is_refused(tmp_path):
    result, report = run_check(tmp_path, "--only", "numerics,benchmarks")
    assert result.returncode == 2 and report is None
    assert "unknown step(s) benchmarks" in result.stderr and "Traceback" not in result.stderr


def test_cuda_without_a_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run([sys.executable, TOOL, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "no CUDA device is visible" in result.stderr
    assert not (tmp_path / "report.json").exists()
