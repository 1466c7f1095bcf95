"""Images/s of our Swin against timm's Swin of the same architecture, alternated in one run.

For each setting (fp32, bf16 autocast, each eager and under torch.compile) it measures inference and
the full training step (forward, backward, gradient clipping, AdamW step) on the same batch, with the
same weights, and prints the ratio ours/timm, peak memory and model FLOP utilisation against a large
matmul measured in the same run.

    python benchmarks/bench_model.py                         # Swin-T 224, batch 16, CPU
    python benchmarks/bench_model.py --device cuda --batch 128 --model base --json results.json
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer as TimmSwin

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import SwinTransformer  # noqa: E402
from models.state_dict import ours_to_timm  # noqa: E402

ARCHS = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
SETTINGS = ("fp32", "bf16", "fp32-compile", "bf16-compile")


def build_pair(arch: str, img_size: int, fused: bool):
    """Our model and timm's, with identical weights and stochastic depth off (so both do the same work)."""
    args = dict(img_size=img_size, window_size=7, drop_path_rate=0.0, **ARCHS[arch])
    ours = SwinTransformer(**args, fused_window_process=fused)
    timm_model = TimmSwin(**args)
    timm_model.load_state_dict(ours_to_timm(ours.state_dict()))
    return ours, timm_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, dtype, device, compiled: bool):
    """(inference step, training step) closures for one model."""
    runnable = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def infer() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(**autocast):
            runnable(images)

    def train() -> None:
        model.train()
        with torch.autocast(**autocast):
            loss = F.cross_entropy(runnable(images), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return infer, train


def seconds_per_call(fn: Callable[[], None], device: torch.device, iterations: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def alternate(steps: Dict[str, Callable[[], None]], device: torch.device, warmup: int, iterations: int,
              rounds: int) -> Dict[str, float]:
    """Median seconds per call of each step, measured in alternating rounds so drift hits all alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(seconds_per_call(fn, device, iterations))
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the ceiling for model FLOP utilisation."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = min(seconds_per_call(lambda: a @ b, device, 3 if device.type == "cpu" else 20) for _ in range(3))
    return 2 * n ** 3 / seconds


def peak_memory_mb(args, which: str, setting: str, mode: str) -> float:
    """Peak memory of one model's step: CUDA max allocated here, or the peak RSS of a child process on CPU."""
    command = [sys.executable, os.path.abspath(__file__), "--child", which, "--child-setting", setting,
               "--child-mode", mode, "--model", args.model, "--batch", str(args.batch), "--img", str(args.img),
               "--device", args.device] + (["--no-fused"] if args.no_fused else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def run_child(args) -> None:
    """Measures one model's peak memory over a few steps and prints it (MB): CUDA max allocated, or on the
    CPU the process's peak resident set (everything this process holds: torch, the model, activations)."""
    device = torch.device(args.device)
    arch = dict(img_size=args.img, window_size=7, drop_path_rate=0.0, **ARCHS[args.model])
    if args.child == "ours":
        model = SwinTransformer(**arch, fused_window_process=not args.no_fused).to(device)
    else:
        model = TimmSwin(**arch).to(device)
    images = torch.randn(args.batch, 3, args.img, args.img, device=device)
    targets = torch.randint(0, 1000, (args.batch,), device=device)
    dtype, _, compiled = args.child_setting.partition("-")
    infer, train = make_steps(model, images, targets, dtype, device, bool(compiled))
    step = infer if args.child_mode == "inference" else train
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        step()
    if device.type == "cuda":
        print(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def print_profiles(steps: Dict[str, Callable[[], None]], rows: int) -> None:
    """The top operators by self time of one call of each step (torch.profiler), to see where time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, fn in steps.items():
        fn()
        with profile(activities=activities) as prof:
            fn()
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(f"\n== profile: {name} ==")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHS), default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {SETTINGS}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-fused", action="store_true", help="do not use the fused window kernel in our model")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also print the top ROWS operators of each model's step (torch.profiler)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-setting", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours, timm_model = build_pair(args.model, args.img, not args.no_fused)
    ours.to(device), timm_model.to(device)
    images = torch.randn(args.batch, 3, args.img, args.img, device=device)
    targets = torch.randint(0, 1000, (args.batch,), device=device)
    macs = ours.flops()
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Swin-{args.model[0].upper()} {args.img}px, batch {args.batch}, {name}, torch {torch.__version__}; "
          f"matmul peak fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s")
    results = []
    header = (f"{'setting':<13} {'mode':<10} {'ours img/s':>10} {'timm img/s':>10} {'ours/timm':>9} "
              f"{'ours MB':>8} {'timm MB':>8} {'ours MFU':>8}")
    print(header)
    for setting in args.settings.split(","):
        dtype, _, compiled = setting.partition("-")
        steps = {}
        for which, model in (("ours", ours), ("timm", timm_model)):
            infer, train = make_steps(model, images, targets, dtype, device, bool(compiled))
            steps[f"{which} inference"], steps[f"{which} training"] = infer, train
        seconds = alternate(steps, device, args.warmup, args.iterations, args.rounds)
        if args.profile:
            print_profiles(steps, args.profile)
        for mode, flops_per_image in (("inference", 2 * macs), ("training", 6 * macs)):
            ours_ips = args.batch / seconds[f"ours {mode}"]
            timm_ips = args.batch / seconds[f"timm {mode}"]
            memory = {w: float("nan") if args.no_memory else peak_memory_mb(args, w, setting, mode)
                      for w in ("ours", "timm")}
            mfu = ours_ips * flops_per_image / peaks[dtype]
            row = {"setting": setting, "mode": mode, "ours_images_per_second": ours_ips,
                   "timm_images_per_second": timm_ips, "ratio": ours_ips / timm_ips, "ours_peak_mb": memory["ours"],
                   "timm_peak_mb": memory["timm"], "ours_mfu": mfu}
            results.append(row)
            print(f"{setting:<13} {mode:<10} {ours_ips:>10.1f} {timm_ips:>10.1f} {row['ratio']:>9.2f} "
                  f"{memory['ours']:>8.0f} {memory['timm']:>8.0f} {mfu:>8.1%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "model": args.model, "batch": args.batch, "img": args.img,
                       "torch": torch.__version__, "matmul_peak_flops": peaks, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
