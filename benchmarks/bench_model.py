"""Images/s of our Swin against timm's Swin of the same architecture, alternated in one run.

Each measurement is a stage: our model in one or more variants and executions (eager, torch.compile, or compiled with
CUDA graphs) and timm's model as the peer, all with the same weights on the same batch, their steps taken in
alternating rounds. It measures inference and the full training step (forward, backward, gradient clipping, AdamW
step) and prints the ratio ours/timm (of the median times, with the range of each round's own ratio: the noise to read
it against), the compile time of compiled entries (their first call minus a steady one, reported apart from the
images/s), peak memory and model FLOP utilisation against a large matmul measured in the same run.

    python benchmarks/bench_model.py                         # Swin-T 224, batch 16, CPU: fp32/bf16, eager/compiled
    python benchmarks/bench_model.py --variants default,fused  # our model without and with the fused window op
    python benchmarks/bench_model.py --device cuda --matrix --batch 128   # the GPU matrix, in about 5 minutes
    python benchmarks/bench_model.py --model swinv2_tiny_patch4_window8_256    # Swin V2 against timm's V2

``--matrix`` measures, in bf16: every attention path (sdpa, explicit, flex, flex_grid) and the fused window kernel
eagerly, against timm eager; then the eager variant fastest in training (and the one fastest in inference, if another)
compiled, and the fastest in training with CUDA graphs, against timm compiled. A Swin-T compile takes about a minute
on a GPU, so compiled entries are dropped, last first, where they would not fit in ``--budget-s``; ``--quick``
measures sdpa, explicit and sdpa+fused eagerly and only the fastest compiled.

``--model`` takes micro, tiny, small or base (V1 at 224 px, window 7; micro at 56 px) or the name of a V1 or V2
config in configs/swin or configs/swinv2; the image size follows the config unless --img is given.
"""
import argparse
import dataclasses
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

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
    "micro": dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), img=56),  # for smoke runs: 14x14 and 7x7 stages
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
PRECISIONS = ("fp32", "bf16")
EXECUTIONS = ("eager", "compile", "cudagraphs")
SETTINGS = ("fp32", "bf16", "fp32-compile", "bf16-compile")  # the default of --settings
VARIANT_PARTS = {"default": [], "fused": ["FUSED_WINDOW_PROCESS", "True"], "unfused": ["FUSED_WINDOW_PROCESS", "False"],
                 "sdpa": ["ATTN_IMPL", "sdpa"], "explicit": ["ATTN_IMPL", "explicit"], "flex": ["ATTN_IMPL", "flex"],
                 "flex_grid": ["ATTN_IMPL", "flex_grid"]}
# --matrix: our variants measured eagerly (the fused kernel runs in eager mode only, so it is not compiled).
MATRIX_EAGER = ("sdpa", "explicit", "flex", "flex_grid", "sdpa+fused", "explicit+fused")
QUICK_EAGER = ("sdpa", "explicit", "sdpa+fused")
# Seconds one compiled entry is expected to take (an inference and a training graph), to keep --matrix in its budget:
# Swin-T forward + backward compiled in 42-62 s per case on an H200 (../shared/reference/GPU_FACTS.md), and the
# inference graph is compiled apart.
COMPILE_ESTIMATE_S = 75.0


@dataclasses.dataclass
class Entry:
    """One model in one execution: ``label`` is one of our variants, or "timm"."""
    label: str
    model: torch.nn.Module
    execution: str = "eager"

    @property
    def name(self) -> str:
        return self.label if self.execution == "eager" else f"{self.label} [{self.execution}]"


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
                 "MODEL.SWIN.NUM_HEADS", str(list(arch["num_heads"])),
                 "DATA.IMG_SIZE", str(img_size or arch.get("img", 224))]
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


def uses_flex(model: torch.nn.Module) -> bool:
    return bool({getattr(m, "attn_impl", None) for m in model.modules()} & {"flex", "flex_grid"})


def trains_on(model: torch.nn.Module, device: torch.device) -> bool:
    """FlexAttention has no backward on the CPU: our flex variants measure inference only there."""
    return device.type != "cpu" or not uses_flex(model)


def make_steps(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, precision: str, device,
               execution: str, backend: str = "inductor") -> Tuple[Callable[[], None], Optional[Callable[[], None]]]:
    """(inference step, training step or None where the model cannot train on this device) of one model."""
    if execution == "eager":
        runnable = model
    else:
        mode = "reduce-overhead" if execution == "cudagraphs" else None
        runnable = torch.compile(model, backend=backend, mode=mode if backend == "inductor" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    # CUDA graphs replay into the same output buffers: each step tells the graph tree that the last outputs are done.
    mark_step = torch.compiler.cudagraph_mark_step_begin if execution == "cudagraphs" else (lambda: None)

    def infer() -> None:
        model.eval()
        mark_step()
        with torch.no_grad(), torch.autocast(**autocast):
            runnable(images)

    def train() -> None:
        model.train()
        mark_step()
        with torch.autocast(**autocast):
            loss = F.cross_entropy(runnable(images), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return infer, train if trains_on(model, device) else None


def seconds_per_call(fn: Callable[[], None], device: torch.device, iterations: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def alternate(steps: Dict[str, Callable[[], None]], device: torch.device, warmup: int, iterations: int,
              rounds: int) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    """Seconds per call of each step in each round, measured in alternating rounds so drift hits all alike, and the
    seconds of each step's first call (which compiles a compiled model). Each round takes the steps in a new (seeded)
    random order: what runs just before a step (a training step frees memory an inference step then faults in again)
    changes its time on a CPU by several percent."""
    first_call = {}
    for name, fn in steps.items():
        first_call[name] = seconds_per_call(fn, device, 1)
        for _ in range(warmup - 1):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            times[name].append(seconds_per_call(steps[name], device, iterations))
    return times, first_call


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the ceiling for model FLOP utilisation."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = min(seconds_per_call(lambda: a @ b, device, 3 if device.type == "cpu" else 20) for _ in range(3))
    return 2 * n ** 3 / seconds


def peak_memory_mb(args, label: str, precision: str, execution: str, mode: str) -> float:
    """Peak memory of one model's step on the CPU (``label``: one of our variants, or "timm"): the peak resident set
    of a child process that runs only that model."""
    command = [sys.executable, os.path.abspath(__file__), "--child", label, "--child-setting",
               f"{precision}-{execution}", "--child-mode", mode, "--model", args.model, "--batch", str(args.batch),
               "--img", str(args.img), "--device", args.device, "--compile-backend", args.compile_backend]
    command += ["--system-malloc"] if args.system_malloc else []
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def cuda_step_peak_mb(step: Callable[[], None], model: torch.nn.Module, device: torch.device) -> float:
    """Peak memory of one step of one model on a GPU shared by the other models of the run: what the step allocates
    above what is allocated before it, plus the model's own weights and AdamW state (two tensors a weight)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    resident = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    return (torch.cuda.max_memory_allocated(device) - before + resident) / 2 ** 20


def run_child(args) -> None:
    """Measures one model's peak memory over a few steps and prints it (MB): the process's peak resident set (on the
    CPU: everything this process holds: torch, the model, activations) or CUDA max allocated."""
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
    precision, _, execution = args.child_setting.partition("-")
    infer, train = make_steps(model, images, targets, precision, device, execution or "eager", args.compile_backend)
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


def bytes_written(step: Callable[[], None]) -> Dict[str, int]:
    """Bytes each aten op writes during one call of ``step`` (outputs of every op that returns new memory, and the
    destinations of in-place and copy ops): on a GPU, where these small-window ops are bound by memory traffic, a
    device-independent account of the copies a path makes. Views write nothing and are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    written: Dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.device.type != "meta"}
            name = func.overloadpacket.__name__
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                aliased = t.untyped_storage().data_ptr() in inputs
                if not aliased or name.endswith("_") or "out" in (kwargs or {}):
                    written[name] = written.get(name, 0) + t.numel() * t.element_size()
            return out

    with Count():
        step()
    return written


def run_traffic(args, device: torch.device, images: torch.Tensor, targets: torch.Tensor) -> None:
    """--traffic: MB written per image by each model's inference and training step, with the top operators."""
    variants = args.variants.split(",")
    models = build_models(args.model, args.img, variants)
    for precision in [s.partition("-")[0] for s in args.settings.split(",")]:
        for label, model in models.items():
            if uses_flex(model):
                print(f"{label}: not counted (FlexAttention's fused GPU kernel is not what runs on the CPU)")
                continue
            model.to(device)
            infer, train = make_steps(model, images, targets, precision, device, "eager")
            for mode, step in (("inference", infer), ("training", train)):
                if step is None:
                    continue
                step()  # lazily built state (masks of other sizes, optimizer state) is not the step's traffic
                written = bytes_written(step)
                top = sorted(written.items(), key=lambda item: -item[1])[:args.traffic]
                per_image = {name: count / args.batch / 2 ** 20 for name, count in written.items()}
                print(f"{precision:<5} {mode:<10} {label:<16} {sum(per_image.values()):8.1f} MB/image: "
                      + ", ".join(f"{name} {per_image[name]:.1f}" for name, _ in top), flush=True)


class Bench:
    """The state one run shares: device, batch, the matmul peaks, the printed table and the rows for --json."""

    def __init__(self, args, macs: int, images: torch.Tensor, targets: torch.Tensor):
        self.args = args
        self.device = torch.device(args.device)
        self.macs = macs
        self.images, self.targets = images, targets
        self.peaks = {"fp32": matmul_peak(self.device, torch.float32), "bf16": matmul_peak(self.device, torch.bfloat16)}
        self.rows: List[dict] = []
        self.skipped: List[str] = []
        self.start = time.perf_counter()

    def header(self, title: str, img: int) -> None:
        name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                else f"CPU, {torch.get_num_threads()} threads")
        self.device_name = name
        print(f"{title} {img}px, batch {self.args.batch}, {name}, torch {torch.__version__}; matmul peak fp32 "
              f"{self.peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {self.peaks['bf16'] / 1e12:.2f} TFLOP/s")
        print(f"{'setting':<13} {'mode':<10} {'ours':<28} {'ours img/s':>10} {'timm img/s':>10} {'ours/timm':>9} "
              f"{'rounds':>11} {'compile s':>9} {'ours MB':>8} {'timm MB':>8} {'ours MFU':>8}", flush=True)

    def stage(self, precision: str, ours: List[Entry], peer: Entry) -> List[dict]:
        """Measures our entries and the peer alternated, prints one row per (entry, mode), returns the rows."""
        args, device = self.args, self.device
        steps, trainable = {}, {}
        for entry in ours + [peer]:
            infer, train = make_steps(entry.model, self.images, self.targets, precision, device, entry.execution,
                                      args.compile_backend)
            steps[f"{entry.name} inference"] = infer
            if train is not None:
                steps[f"{entry.name} training"] = train
            trainable[entry.name] = train is not None
        times, first_call = alternate(steps, device, args.warmup, args.iterations, args.rounds)
        if args.profile:
            print_profiles(steps, args.profile)
        rows = []
        setting = precision if peer.execution == "eager" else f"{precision}-{peer.execution}"
        for mode, flops_per_image in (("inference", 2 * self.macs), ("training", 6 * self.macs)):
            peer_key = f"{peer.name} {mode}"
            peer_ips = args.batch / statistics.median(times[peer_key])
            peer_mb = self.memory(peer, precision, mode, steps[peer_key])
            for entry in ours:
                key = f"{entry.name} {mode}"
                if not trainable[entry.name] and mode == "training":
                    self.skipped.append(f"{key} (no FlexAttention backward on {device.type})")
                    continue
                ours_times = times[key]
                ours_ips = args.batch / statistics.median(ours_times)
                # Each round's own ratio: their spread is the noise the median ratio has to be read against.
                round_ratios = [t / o for o, t in zip(ours_times, times[peer_key])]
                compile_s = max(first_call[key] - statistics.median(ours_times), 0.0)
                row = {"setting": setting, "mode": mode, "variant": entry.label, "execution": entry.execution,
                       "peer": peer.name, "ours_images_per_second": ours_ips, "timm_images_per_second": peer_ips,
                       "ratio": ours_ips / peer_ips, "round_ratios": round_ratios,
                       "compile_seconds": compile_s if self.compiles(entry) else None,
                       "timm_compile_seconds": (max(first_call[peer_key] - statistics.median(times[peer_key]), 0.0)
                                                if peer.execution != "eager" else None),
                       "ours_peak_mb": self.memory(entry, precision, mode, steps[key]), "timm_peak_mb": peer_mb,
                       "ours_mfu": ours_ips * flops_per_image / self.peaks[precision]}
                rows.append(row)
                spread = f"{min(round_ratios):.2f}-{max(round_ratios):.2f}"
                compiled = "-" if row["compile_seconds"] is None else f"{row['compile_seconds']:.1f}"
                print(f"{setting:<13} {mode:<10} {entry.name:<28} {ours_ips:>10.1f} {peer_ips:>10.1f} "
                      f"{row['ratio']:>9.2f} {spread:>11} {compiled:>9} {row['ours_peak_mb']:>8.0f} {peer_mb:>8.0f} "
                      f"{row['ours_mfu']:>8.1%}", flush=True)
            if peer.execution != "eager":
                print(f"{'':<13} {mode:<10} {peer.name + ' compile s':<28} "
                      f"{rows[-1]['timm_compile_seconds'] if rows else float('nan'):>10.1f}", flush=True)
        self.rows += rows
        return rows

    def compiles(self, entry: Entry) -> bool:
        """Whether the entry's first call compiles: compiled models, and in an eager model on a GPU our flex paths'
        attention kernels (models/window_flex.py)."""
        return entry.execution != "eager" or ("flex" in entry.label and self.device.type == "cuda")

    def memory(self, entry: Entry, precision: str, mode: str, step: Callable[[], None]) -> float:
        if self.args.no_memory:
            return float("nan")
        if self.device.type == "cuda":
            # A CUDA graph's memory pool is allocated when it is recorded, before this step: not measurable here.
            return float("nan") if entry.execution == "cudagraphs" else cuda_step_peak_mb(step, entry.model,
                                                                                            self.device)
        return peak_memory_mb(self.args, entry.label, precision, entry.execution, mode)

    def fits(self, entries: List[Entry]) -> List[Entry]:
        """The compiled entries that fit in --budget-s (with the peer's compile), dropping the last ones first."""
        if not self.args.budget_s:
            return entries
        elapsed = time.perf_counter() - self.start
        kept = list(entries)
        while kept and elapsed + (len(kept) + 1) * COMPILE_ESTIMATE_S > self.args.budget_s:
            dropped = kept.pop()
            self.skipped.append(f"{dropped.name} (would not fit in --budget-s {self.args.budget_s:.0f}: "
                                f"{elapsed:.0f} s spent, about {COMPILE_ESTIMATE_S:.0f} s a compiled model)")
        return kept


def fastest(rows: List[dict], mode: str) -> Optional[str]:
    """Our variant with the most images/s in ``mode`` among ``rows``."""
    candidates = [row for row in rows if row["mode"] == mode]
    return max(candidates, key=lambda row: row["ours_images_per_second"])["variant"] if candidates else None


def unfused(variant: str) -> str:
    """The variant without "fused": compiled models never use the fused op (models/swin_transformer.py)."""
    parts = [part for part in variant.split("+") if part != "fused"]
    return "+".join(parts) or "default"


def run_matrix(bench: Bench, args) -> None:
    """Eager: every attention path and the fused kernel against timm eager; then the fastest compiled, and with CUDA
    graphs, against timm compiled (see the module docstring)."""
    precision = args.matrix_precision
    eager_variants = list(QUICK_EAGER if args.quick else MATRIX_EAGER)
    models = build_models(args.model, args.img, eager_variants)
    for model in models.values():
        model.to(bench.device)
    eager_rows = bench.stage(precision, [Entry(v, models[v]) for v in eager_variants], Entry("timm", models["timm"]))
    best_training, best_inference = fastest(eager_rows, "training"), fastest(eager_rows, "inference")
    # Most wanted first (fits() drops from the end): the fastest in training compiled, then with CUDA graphs, then
    # the fastest in inference compiled if it is another variant. Every eager variant's unfused form was built.
    compiled = list(dict.fromkeys(unfused(v) for v in (best_training, best_inference) if v is not None))
    entries = [Entry(compiled[0], models[compiled[0]], "compile")]
    if bench.device.type == "cuda" and not args.quick:
        entries.append(Entry(compiled[0], models[compiled[0]], "cudagraphs"))
    else:
        bench.skipped.append("cudagraphs (CUDA graphs need a GPU)" if bench.device.type != "cuda"
                             else "cudagraphs (--quick)")
    if not args.quick:
        entries += [Entry(v, models[v], "compile") for v in compiled[1:]]
    entries = bench.fits(entries)
    if entries:
        bench.stage(precision, entries, Entry("timm", models["timm"], "compile"))


def run_settings(bench: Bench, args) -> None:
    """--settings x --variants: each setting measures every variant against timm in the same execution."""
    variants = args.variants.split(",")
    models = build_models(args.model, args.img, variants)
    for model in models.values():
        model.to(bench.device)
    for setting in args.settings.split(","):
        precision, _, execution = setting.partition("-")
        if precision not in PRECISIONS or (execution or "eager") not in EXECUTIONS:
            raise SystemExit(f"--settings: {setting!r} is not PRECISION[-EXECUTION] with PRECISION in {PRECISIONS} and "
                             f"EXECUTION in {EXECUTIONS[1:]}")
        execution = execution or "eager"
        if execution == "cudagraphs" and bench.device.type != "cuda":
            bench.skipped.append(f"{setting} (CUDA graphs need a GPU)")
            continue
        bench.stage(precision, [Entry(v, models[v], execution) for v in variants],
                    Entry("timm", models["timm"], execution))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help=f"{', '.join(ARCHS)} or a config name of configs/swin, "
                        "configs/swinv2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img", type=int, default=0, help="image size (default: 224, or the config's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated PRECISION[-EXECUTION], PRECISION in {PRECISIONS}, EXECUTION in "
                        f"{EXECUTIONS[1:]} (none: eager)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each step; the first is its compile")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="default",
                        help="comma-separated variants of our model, each measured against timm: default (the config's "
                        f"settings) or parts joined by '+' of {', '.join(list(VARIANT_PARTS)[1:])}, e.g. "
                        "default,fused,fused+explicit")
    parser.add_argument("--matrix", action="store_true", help="the attention x fused x eager/compiled/CUDA graphs "
                        "matrix (see above) instead of --settings x --variants")
    parser.add_argument("--quick", action="store_true", help="--matrix: 3 eager variants and 1 compiled")
    parser.add_argument("--matrix-precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="--matrix: leave out compiled entries that would end the run after this many seconds")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager: traces without generating code, for smoke runs)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--system-malloc", action="store_true",
                        help="on the CPU, leave glibc's malloc as it is instead of keeping freed memory for reuse "
                        "as main.py does (utils.keep_freed_memory); its page faults make every step slower and the "
                        "comparison noisier")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also print the top ROWS operators of each model's step (torch.profiler)")
    parser.add_argument("--traffic", type=int, default=0, metavar="OPS",
                        help="instead of timing: MB each model's step writes per image (--settings' precisions, "
                        "--variants, eager), with the top OPS operators")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-setting", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu" and not args.system_malloc:
        keep_freed_memory()
    if args.child:
        run_child(args)
        return
    torch.manual_seed(0)
    reference = build_model(model_config(args.model, args.img))
    img = reference.patch_embed.patches_resolution[0] * reference.patch_embed.patch_size
    device = torch.device(args.device)
    images = torch.randn(args.batch, 3, img, img, device=device)
    targets = torch.randint(0, 1000, (args.batch,), device=device)
    if args.traffic:
        run_traffic(args, device, images, targets)
        return
    bench = Bench(args, reference.flops(), images, targets)
    del reference
    bench.header(f"Swin-{args.model[0].upper()}" if args.model in ARCHS else args.model, img)
    if args.matrix:
        run_matrix(bench, args)
    else:
        run_settings(bench, args)
    seconds = time.perf_counter() - bench.start
    for skipped in bench.skipped:
        print(f"not measured: {skipped}")
    compile_total = sum(row["compile_seconds"] or 0.0 for row in bench.rows)
    print(f"{seconds:.0f} s in all, of which about {compile_total:.0f} s compiling our models")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": bench.device_name, "model": args.model, "batch": args.batch, "img": img,
                       "torch": torch.__version__, "matmul_peak_flops": bench.peaks, "results": bench.rows,
                       "not_measured": bench.skipped, "seconds": seconds,
                       "variants": sorted({row["variant"] for row in bench.rows})}, f, indent=1)


if __name__ == "__main__":
    main()
