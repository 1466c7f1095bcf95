"""benchmarks/bench_model.py: the --matrix run at toy size on the CPU (the GPU runs the same code at Swin-T size), and
how it plans the compiled entries."""
import json
import math
import os
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_model  # noqa: E402


@pytest.mark.slow
def test_matrix_smoke_run_on_the_cpu(tmp_path):
    # About 25 s on a 2-core CPU: the micro model, 1 call a step; aot_eager traces the compiled entries as inductor
    # would without generating C++ (which takes minutes here).
    output = tmp_path / "matrix.json"
    command = [sys.executable, "benchmarks/bench_model.py", "--device", "cpu", "--model", "micro", "--batch", "2",
               "--matrix", "--compile-backend", "aot_eager", "--warmup", "1", "--iterations", "1", "--rounds", "1",
               "--no-memory", "--json", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    rows = report["results"]
    eager = {(row["variant"], row["mode"]) for row in rows if row["execution"] == "eager"}
    for variant in bench_model.MATRIX_EAGER:
        assert (variant, "inference") in eager, variant
        # FlexAttention has no CPU backward: its training cells are listed as not measured instead.
        assert ((variant, "training") in eager) != ("flex" in variant), variant
    assert any("flex training" in line for line in report["not_measured"])
    assert any("cudagraphs" in line for line in report["not_measured"])
    compiled = [row for row in rows if row["execution"] == "compile"]
    assert {row["mode"] for row in compiled} == {"inference", "training"}
    for row in rows:
        assert row["ours_images_per_second"] > 0 and math.isfinite(row["ratio"]) and 0 < row["ours_mfu"] < 1
    for row in compiled:
        assert row["peer"] == "timm [compile]" and row["compile_seconds"] is not None
        assert row["timm_compile_seconds"] is not None
    assert "s in all, of which about" in result.stdout


def entries(*names):
    return [bench_model.Entry(name, model=None, execution="compile") for name in names]


def test_compiled_entries_are_dropped_last_first_to_fit_the_budget(monkeypatch):
    # 100 s spent, and room for two more compiled models: one of ours and timm's.
    budget = 100.0 + 2.5 * bench_model.COMPILE_ESTIMATE_S
    bench = types.SimpleNamespace(args=types.SimpleNamespace(budget_s=budget), start=0.0, skipped=[])
    monkeypatch.setattr(bench_model.time, "perf_counter", lambda: 100.0)
    kept = bench_model.Bench.fits(bench, entries("a", "b", "c"))
    assert [entry.label for entry in kept] == ["a"] and len(bench.skipped) == 2 and "c" in bench.skipped[0]
    bench.args.budget_s = 0.0  # no budget: everything
    assert len(bench_model.Bench.fits(bench, entries("a", "b", "c"))) == 3


def test_the_fastest_eager_variant_is_compiled_without_the_fused_op():
    rows = [{"mode": "training", "variant": "sdpa+fused", "ours_images_per_second": 3.0},
            {"mode": "training", "variant": "explicit", "ours_images_per_second": 2.0},
            {"mode": "inference", "variant": "explicit", "ours_images_per_second": 9.0}]
    assert bench_model.fastest(rows, "training") == "sdpa+fused"
    assert bench_model.unfused("sdpa+fused") == "sdpa" and bench_model.unfused("fused") == "default"
    assert bench_model.fastest(rows, "inference") == "explicit"
