"""Images/s of our Swin against timm's Swin of the same architecture, alternated in one run.

For each setting (fp32, bf16 autocast, each eager and under torch.compile) it measures inference and
the full training step (forward, backward, gradient clipping, AdamW step) on the same batch, with the
same weights, and prints the ratio ours/timm (of the median times, with the range of each round's own ratio:
the noise to read it against), peak memory and model FLOP utilisation against a large matmul measured in the
same run. ``--variants`` measures several settings of our model in the same run, each against timm.

    python benchmarks/bench_model.py                         # Swin-T 224, batch 16, CPU
    python benchmarks/bench_model.py --variants default,fused  # our model without and with the fused window op
    python benchmarks/bench_model.py --device cuda --batch 128 --model base --json results.json
    python benchmarks/bench_model.py --model swinv2_tiny_patch4_window8_256    # Swin V2 against timm's V2

``--model`` takes tiny, small or base (V1 at 224 px, window 7) or the name of a V1 or V2 config in configs/swin
or configs/swinv2; the image size follows the config unless --img is given. Swin-MLP has no timm counterpart.
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.state_dict import ours_to_timm  # noqa: E402
from utils import keep_freed_memory  # noqa: E402

ARCHS = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
SETTINGS = ("fp32", "bf16", "fp32-compile", "bf16-compile")


VARIANT_PARTS = {"default": [], "fused": ["FUSED_WINDOW_PROCESS", "True"], "unfused": ["FUSED_WINDOW_PROCESS", "False"],
                 "sdpa": ["ATTN_IMPL", "sdpa"], "explicit": ["ATTN_IMPL", "explicit"]}


def variant_opts(variant: str, section: str) -> List[str]:
    """Config options of one of our variants: "default" (the config's own settings), or parts of VARIANT_PARTS
    joined by "+", such as "fused+explicit"."""
    opts = []
    for part in variant.split("+"):
        if part not in VARIANT_PARTS:
            raise SystemExit(f"--variants: {part!r} is not one of {', '.join(VARIANT_PARTS)}")
        key_value = list(VARIANT_PARTS[part])
        if key_value and key_value[0] == "ATTN_IMPL":
            key_value[0] = f"MODEL.{section}.ATTN_IMPL"
        opts += key_value
    return opts


def model_config(name: str, img_size: int, variant: str = "default"):
    """The frozen config of ``name`` (an ARCHS key or a config file name) for one of our variants, with
    stochastic depth off."""
    opts = ["MODEL.DROP_PATH_RATE", "0.0"]
    if name in ARCHS:
        arch = ARCHS[name]
        path, section = None, "SWIN"
        opts += ["MODEL.SWIN.EMBED_DIM", str(arch["embed_dim"]), "MODEL.SWIN.DEPTHS", str(list(arch["depths"])),
                 "MODEL.SWIN.NUM_HEADS", str(list(arch["num_heads"])), "DATA.IMG_SIZE", str(img_size or 224)]
    else:
        found = [(os.path.join(REPO, "configs", d, name + ".yaml"), d.upper()) for d in ("swin", "swinv2")]
        found = [(p, section) for p, section in found if os.path.exists(p)]
        if not found:
            raise SystemExit(f"--model {name}: not one of {', '.join(ARCHS)} nor a config in configs/swin or "
                             "configs/swinv2")
        path, section = found[0]
        if img_size:
            opts += ["DATA.IMG_SIZE", str(img_size)]
    return load_config(path, opts + variant_opts(variant, section))


def build_timm(config) -> torch.nn.Module:
    """timm's model of the same architecture as ``config``."""
    section = config.MODEL.SWINV2 if config.MODEL.TYPE == "swinv2" else config.MODEL.SWIN
    args = dict(img_size=config.DATA.IMG_SIZE, patch_size=section.PATCH_SIZE, in_chans=section.IN_CHANS,
                num_classes=config.MODEL.NUM_CLASSES, embed_dim=section.EMBED_DIM, depths=tuple(section.DEPTHS),
                num_heads=tuple(section.NUM_HEADS), window_size=section.WINDOW_SIZE, mlp_ratio=section.MLP_RATIO,
                qkv_bias=section.QKV_BIAS, drop_path_rate=0.0)
    if config.MODEL.TYPE == "swinv2":
        return TimmSwinV2(**args, pretrained_window_sizes=tuple(section.PRETRAINED_WINDOW_SIZES))
    return TimmSwin(**args)


def build_models(name: str, img_size: int, variants: List[str]) -> Dict[str, torch.nn.Module]:
    """Our model in each variant and timm's ("timm"), all with the same weights and stochastic depth off (so all
    do the same work)."""
    models = {}
    for variant in variants:
        models[variant] = build_model(model_config(name, img_size, variant))
        models[variant].load_state_dict(models[variants[0]].state_dict())
    models["timm"] = build_timm(model_config(name, img_size))
    models["timm"].load_state_dict(ours_to_timm(models[variants[0]].state_dict()))
    return models


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
              rounds: int) -> Dict[str, List[float]]:
    """Seconds per call of each step in each round, measured in alternating rounds so drift hits all alike. Each round
    takes the steps in a new (seeded) random order: what runs just before a step (a training step frees memory an
    inference step then faults in again) changes its time on a CPU by several percent."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            times[name].append(seconds_per_call(steps[name], device, iterations))
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the ceiling for model FLOP utilisation."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = min(seconds_per_call(lambda: a @ b, device, 3 if device.type == "cpu" else 20) for _ in range(3))
    return 2 * n ** 3 / seconds


def peak_memory_mb(args, which: str, setting: str, mode: str) -> float:
    """Peak memory of one model's step (``which``: one of our variants, or "timm"): CUDA max allocated, or the
    peak RSS, of a child process that runs only that model."""
    command = [sys.executable, os.path.abspath(__file__), "--child", which, "--child-setting", setting,
               "--child-mode", mode, "--model", args.model, "--batch", str(args.batch), "--img", str(args.img),
               "--device", args.device] + (["--system-malloc"] if args.system_malloc else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def run_child(args) -> None:
    """Measures one model's peak memory over a few steps and prints it (MB): CUDA max allocated, or on the
    CPU the process's peak resident set (everything this process holds: torch, the model, activations)."""
    device = torch.device(args.device)
    if args.child == "timm":
        config = model_config(args.model, args.img)
        model = build_timm(config).to(device)
    else:
        config = model_config(args.model, args.img, args.child)
        model = build_model(config).to(device)
    img = config.DATA.IMG_SIZE
    images = torch.randn(args.batch, 3, img, img, device=device)
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
        print(peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident set in MB. Linux's VmHWM belongs to the address space that exec created;
    ru_maxrss is not reset by exec, so a child forked from a large parent would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    parser.add_argument("--model", default="tiny", help=f"{', '.join(ARCHS)} or a config name of configs/swin, "
                        "configs/swinv2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img", type=int, default=0, help="image size (default: 224, or the config's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {SETTINGS}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="default",
                        help="comma-separated variants of our model, each measured against timm: default (the config's "
                        f"settings) or parts joined by '+' of {', '.join(list(VARIANT_PARTS)[1:])}, e.g. "
                        "default,fused,fused+explicit")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--system-malloc", action="store_true",
                        help="on the CPU, leave glibc's malloc as it is instead of keeping freed memory for reuse "
                        "as main.py does (utils.keep_freed_memory); its page faults make every step slower and the "
                        "comparison noisier")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also print the top ROWS operators of each model's step (torch.profiler)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-setting", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu" and not args.system_malloc:
        keep_freed_memory()
    if args.child:
        run_child(args)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    variants = args.variants.split(",")
    models = build_models(args.model, args.img, variants)
    for model in models.values():
        model.to(device)
    ours = models[variants[0]]
    img = ours.patch_embed.patches_resolution[0] * ours.patch_embed.patch_size
    images = torch.randn(args.batch, 3, img, img, device=device)
    targets = torch.randint(0, 1000, (args.batch,), device=device)
    macs = ours.flops()
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = f"Swin-{args.model[0].upper()}" if args.model in ARCHS else args.model
    print(f"{title} {img}px, batch {args.batch}, {name}, torch {torch.__version__}; "
          f"matmul peak fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s")
    results = []
    width = max(len(v) for v in variants) + 1
    print(f"{'setting':<13} {'mode':<10} {'ours':<{width}} {'ours img/s':>10} {'timm img/s':>10} {'ours/timm':>9} "
          f"{'rounds':>11} {'ours MB':>8} {'timm MB':>8} {'ours MFU':>8}")
    for setting in args.settings.split(","):
        dtype, _, compiled = setting.partition("-")
        steps = {}
        for which, model in models.items():
            infer, train = make_steps(model, images, targets, dtype, device, bool(compiled))
            steps[f"{which} inference"], steps[f"{which} training"] = infer, train
        times = alternate(steps, device, args.warmup, args.iterations, args.rounds)
        if args.profile:
            print_profiles(steps, args.profile)
        for mode, flops_per_image in (("inference", 2 * macs), ("training", 6 * macs)):
            timm_times = times[f"timm {mode}"]
            timm_ips = args.batch / statistics.median(timm_times)
            timm_mb = float("nan") if args.no_memory else peak_memory_mb(args, "timm", setting, mode)
            for variant in variants:
                ours_times = times[f"{variant} {mode}"]
                ours_ips = args.batch / statistics.median(ours_times)
                # Each round's own ratio: their spread is the noise the median ratio has to be read against.
                round_ratios = [t / o for o, t in zip(ours_times, timm_times)]
                ours_mb = float("nan") if args.no_memory else peak_memory_mb(args, variant, setting, mode)
                mfu = ours_ips * flops_per_image / peaks[dtype]
                row = {"setting": setting, "mode": mode, "variant": variant, "ours_images_per_second": ours_ips,
                       "timm_images_per_second": timm_ips, "ratio": ours_ips / timm_ips,
                       "round_ratios": round_ratios, "ours_peak_mb": ours_mb, "timm_peak_mb": timm_mb,
                       "ours_mfu": mfu}
                results.append(row)
                spread = f"{min(round_ratios):.2f}-{max(round_ratios):.2f}"
                print(f"{setting:<13} {mode:<10} {variant:<{width}} {ours_ips:>10.1f} {timm_ips:>10.1f} "
                      f"{row['ratio']:>9.2f} {spread:>11} {ours_mb:>8.0f} {timm_mb:>8.0f} {mfu:>8.1%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "model": args.model, "variants": variants, "batch": args.batch, "img": img,
                       "torch": torch.__version__, "matmul_peak_flops": peaks, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
