"""Benchmark of the fused window-process ops against the unfused PyTorch path, eager and compiled.

For each Swin-T stage shape and dtype, times forward + backward of the op pair used by a shifted-window block
(roll + partition, then merge + roll, then the gradient of both) and reports the achieved bandwidth next to a plain
``y.copy_(x)`` of the same tensor measured in the same run, the practical ceiling of a permutation.

    python benchmarks/bench_window_process.py --device cpu
    python benchmarks/bench_window_process.py --device cuda --json bench_window_process_cuda.json
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.window_process import (  # noqa: E402  (the repository root is put on the path just above)
    is_available,
    reference_roll_and_window_partition,
    reference_window_merge_and_roll,
    roll_and_window_partition,
    window_merge_and_roll,
)

# (H, W, C) of the four stages at 224x224 input.
STAGES = {"swin-t": [(56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768)],
          "swin-b": [(56, 56, 128), (28, 28, 256), (14, 14, 512), (7, 7, 1024)]}
WINDOW = 7
SHIFT = 3
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Forward partition + forward merge + backward of each: four full permutations, each reading and writing the tensor.
PERMUTATIONS_PER_STEP = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--shapes", nargs="+", choices=list(STAGES), default=["swin-t"],
                        help="stage shapes of these models (each case compiles the unfused path: a few s on a GPU)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: 3 on cpu, 50 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 1 on cpu, 10 on cuda)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd unfused path")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    return parser.parse_args()


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` over ``iters`` individually timed calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) / 1000.0 for start, end in events)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_step(x: torch.Tensor, grad: torch.Tensor, partition: Callable, merge: Callable) -> Callable[[], torch.Tensor]:
    """One forward + backward of partition then merge, returning the input gradient."""
    batch, height, width, _ = x.shape

    def step() -> torch.Tensor:
        windows = partition(x, SHIFT, WINDOW)
        out = merge(windows, batch, height, width, SHIFT, WINDOW)
        (grad_x,) = torch.autograd.grad(out, x, grad)
        return grad_x

    return step


def bench_case(args: argparse.Namespace, device: torch.device, shape: tuple, dtype: torch.dtype) -> dict:
    """Times every implementation on one (stage shape, dtype) and returns the figures."""
    height, width, channels = shape
    x = torch.randn(args.batch, height, width, channels, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    tensor_bytes = x.numel() * x.element_size()
    step_bytes = PERMUTATIONS_PER_STEP * 2 * tensor_bytes

    implementations = {
        "fused": (roll_and_window_partition, window_merge_and_roll),
        "eager": (reference_roll_and_window_partition, reference_window_merge_and_roll),
    }
    if not args.no_compile:
        # Partition and merge are compiled separately, as in a model where attention sits between them; one fresh
        # cache per case keeps the recompilation limit out of the way and every graph specialised to its shape.
        torch.compiler.reset()
        implementations["compiled"] = (
            torch.compile(reference_roll_and_window_partition, dynamic=False),
            torch.compile(reference_window_merge_and_roll, dynamic=False),
        )

    fused_step = make_step(x, grad, *implementations["fused"])
    eager_step = make_step(x, grad, *implementations["eager"])
    if not torch.equal(fused_step(), eager_step()):
        raise RuntimeError(f"fused and eager gradients differ for shape {shape} and dtype {dtype}")

    result = {"shape": f"{height}x{width}x{channels}", "dtype": str(dtype).replace("torch.", "")}
    result["MB"] = tensor_bytes / 1e6
    for name, (partition, merge) in implementations.items():
        seconds = median_seconds(make_step(x, grad, partition, merge), device, args.warmup, args.iters)
        result[f"{name}_ms"] = seconds * 1e3
        result[f"{name}_GBps"] = step_bytes / seconds / 1e9

    source = x.detach()
    destination = torch.empty_like(source)
    copy_seconds = median_seconds(lambda: destination.copy_(source), device, args.warmup, args.iters)
    result["copy_GBps"] = 2 * tensor_bytes / copy_seconds / 1e9
    # Like the ops, clone() allocates its output: on CPU the page faults of a fresh allocation can cost more than the
    # copy itself, so this is the ceiling of an op that returns a new tensor.
    clone_seconds = median_seconds(source.clone, device, args.warmup, args.iters)
    result["clone_GBps"] = 2 * tensor_bytes / clone_seconds / 1e9
    result["speedup_vs_eager"] = result["eager_ms"] / result["fused_ms"]
    if "compiled_ms" in result:
        result["speedup_vs_compiled"] = result["compiled_ms"] / result["fused_ms"]
    result["fused_pct_of_copy"] = 100.0 * result["fused_GBps"] / result["copy_GBps"]
    result["fused_pct_of_clone"] = 100.0 * result["fused_GBps"] / result["clone_GBps"]
    return result


def format_table(results: list) -> str:
    columns = [
        ("shape", "shape", "{}"),
        ("dtype", "dtype", "{}"),
        ("MB", "MB", "{:.1f}"),
        ("fused_ms", "fused ms", "{:.2f}"),
        ("eager_ms", "eager ms", "{:.2f}"),
        ("compiled_ms", "compiled ms", "{:.2f}"),
        ("fused_GBps", "fused GB/s", "{:.1f}"),
        ("eager_GBps", "eager GB/s", "{:.1f}"),
        ("compiled_GBps", "compiled GB/s", "{:.1f}"),
        ("copy_GBps", "copy GB/s", "{:.1f}"),
        ("clone_GBps", "clone GB/s", "{:.1f}"),
        ("speedup_vs_eager", "fused/eager x", "{:.2f}"),
        ("speedup_vs_compiled", "fused/compiled x", "{:.2f}"),
        ("fused_pct_of_copy", "fused % copy", "{:.0f}"),
        ("fused_pct_of_clone", "fused % clone", "{:.0f}"),
    ]
    columns = [column for column in columns if any(column[0] in result for result in results)]
    rows = [[title for _, title, _ in columns]]
    for result in results:
        rows.append([fmt.format(result[key]) if key in result else "-" for key, _, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [" | ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.iters is None:
        args.iters = 3 if device.type == "cpu" else 50
    if args.warmup is None:
        args.warmup = 1 if device.type == "cpu" else 10
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not is_available(device):
        raise SystemExit(f"The fused window-process ops are not available on {device}; see the warning above")

    results = []
    for dtype_name in args.dtypes:
        for shape in [shape for model in args.shapes for shape in STAGES[model]]:
            results.append(bench_case(args, device, shape, DTYPES[dtype_name]))
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"Window process fwd+bwd (partition + merge and their gradients), B={args.batch}, window={WINDOW}, "
        f"shift={SHIFT}, {device_name}, torch {torch.__version__}, median of {args.iters} after {args.warmup} warm-up"
    )
    print(
        f"GB/s counts {PERMUTATIONS_PER_STEP} permutations x (read + write) of the tensor; copy = y.copy_(x) into a "
        "preallocated y; clone = x.clone()"
    )
    if device.type == "cpu" and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        print("Tip: THP_MEM_ALLOC_ENABLE=1 backs large CPU tensors with huge pages, which cuts the page-fault cost")
    print(format_table(results))
    if args.json:
        metadata = {"device": device_name, "torch": torch.__version__, "batch": args.batch, "iters": args.iters}
        with open(args.json, "w") as file:
            json.dump({"metadata": metadata, "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
