"""Peak memory per process of DDP and FSDP training (``TRAIN.FSDP``), and a memory model checked against it.

``python benchmarks/bench_fsdp_memory.py`` trains Swin-B and Swin V2-L (AdamW, bf16 autocast, batch 2 at 64 px:
small activations, so the weights, gradients and optimizer states dominate) for a few updates under
``torchrun --nproc_per_node N`` with DDP and with FSDP, and reports each run's peak memory per process: on the
CPU the resident set sampled every 2 ms during the updates, less the process's resident set before the model
was built (the torch runtime); on a GPU ``torch.cuda.max_memory_allocated`` over the updates. The full model each
process builds before it is sharded is not counted (see the README). Then it fits the activation term of the memory
model to saved-tensor counts of single blocks, compares the model with the measurements, and estimates what a
SwinV2-G-shaped model needs at 640 px.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Sequence, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = {
    "swin_b": "configs/swin/swin_base_patch4_window7_224.yaml",
    "swin_l": "configs/swin/swin_large_patch4_window7_224_22k.yaml",
    "swinv2_l": "configs/swinv2/swinv2_large_patch4_window12_192_22k.yaml",
}
GIB = 2 ** 30
MIB = 2 ** 20


# --------------------------------------------------------------------------- measuring (one torchrun process)

def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """The highest resident set seen by a thread that samples it every 2 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def model_opts(args) -> List[str]:
    return ["DATA.IMG_SIZE", str(args.img), "DATA.BATCH_SIZE", str(args.batch), "MODEL.NUM_CLASSES", "1000",
            "MODEL.EMA.ENABLE", "False", "AMP_ENABLE", "True", "AMP_DTYPE", "bfloat16", "TRAIN.WARMUP_EPOCHS", "0",
            "MODEL.DROP_PATH_RATE", "0.0", "TRAIN.USE_CHECKPOINT", str(args.checkpointing)]


def worker(args) -> None:
    from config import load_config
    from engine import EpochState, Precision, TrainParts, train_one_epoch
    from lr_scheduler import build_scheduler
    from main import prepare_model
    from optimizer import build_optimizer
    from utils import exit_process, get_rank, init_distributed, seed_everything, shutdown_distributed

    device = init_distributed()
    base = _rss()
    config = load_config(os.path.join(REPO, MODELS[args.model]),
                         opts=model_opts(args) + ["TRAIN.FSDP", str(args.mode == "fsdp")])
    seed_everything(get_rank())
    model, _, train_model = prepare_model(config, device)
    optimizer = build_optimizer(config, model, device)
    parts = TrainParts(model=train_model, criterion=torch.nn.CrossEntropyLoss(), optimizer=optimizer,
                       lr_scheduler=build_scheduler(config, optimizer, args.steps), clip_grad=5.0)
    batches = [(torch.randn(args.batch, 3, args.img, args.img), torch.randint(0, 1000, (args.batch,)))
               for _ in range(args.steps)]
    after_setup = _rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakSampler() as sampler:
        train_one_epoch(parts, batches, EpochState(0, args.steps), device, Precision(True, torch.bfloat16),
                        print_freq=args.steps, num_batches=args.steps)
    result = {"base": base, "after_setup": after_setup, "peak": sampler.peak,
              "cuda_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
              "params": sum(p.numel() for p in model.parameters())}
    with open(os.path.join(args.out, f"rank{get_rank()}.json"), "w") as f:
        json.dump(result, f)
    shutdown_distributed()
    exit_process(0)


def launch(args, model: str, mode: str, procs: int) -> Dict[str, float]:
    """One torchrun job; the largest per-process figures of its ranks."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                   str(29700 + procs), os.path.abspath(__file__), "--worker", "--model", model, "--mode", mode,
                   "--out", out, "--img", str(args.img), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--checkpointing", str(args.checkpointing)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "WARNING"}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(procs)]
    return {"training": max(r["peak"] - r["base"] for r in ranks), "params": ranks[0]["params"],
            "cuda_peak": max(r["cuda_peak"] or 0 for r in ranks)}


# --------------------------------------------------------------------------- the memory model

def saved_activation_bytes(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (bf16 autocast), each storage once."""
    seen = {}

    def pack(tensor: torch.Tensor):
        if tensor.device.type != "meta" and tensor.untyped_storage().data_ptr():
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        module(*inputs)
    return sum(seen.values())


def block_shapes(config, img: int) -> List[Tuple[int, int, int, int]]:
    """(tokens per image, channels, tokens per window, heads) of every block of a config's model."""
    swin = config.MODEL.SWINV2 if config.MODEL.TYPE == "swinv2" else config.MODEL.SWIN
    shapes = []
    side = img // swin.PATCH_SIZE
    for stage, depth in enumerate(swin.DEPTHS):
        window = min(swin.WINDOW_SIZE, side)
        padded = -(-side // window) * window
        shapes += [(padded * padded, swin.EMBED_DIM * 2 ** stage, window * window, swin.NUM_HEADS[stage])] * depth
        side //= 2
    return shapes


def fit_activations() -> Tuple[float, float]:
    """Saved bytes of a V2 block per image ~ tokens x (a x channels + b x window tokens x heads): a, b fitted to
    counts of real blocks (explicit attention, which stores the attention maps; bf16 autocast)."""
    from models.swin_transformer_v2 import SwinTransformerV2

    rows, targets = [], []
    for dim, window, heads in ((64, 4, 2), (128, 4, 4), (64, 8, 2), (96, 8, 6), (128, 8, 8)):
        model = SwinTransformerV2(img_size=window * 4 * 2, patch_size=4, embed_dim=dim, depths=(2,), num_heads=(heads,),
                                  window_size=window, num_classes=10, attn_impl="explicit")
        block = model.layers[0].blocks[1]  # shifted: the mask too
        side = window * 2
        x = torch.randn(1, side, side, dim, requires_grad=True)
        mask = model.layers[0].masks(side, side, x.device, x.dtype)[1]
        count = saved_activation_bytes(block, (x, mask))
        tokens = side * side
        rows.append([tokens * dim, tokens * window * window * heads])
        targets.append(count)
    rows, targets = torch.tensor(rows, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)[:, None]
    solution = torch.linalg.lstsq(rows, targets).solution
    worst = ((rows @ solution - targets).abs() / targets).max().item()
    print(f"activation fit over {len(targets)} blocks: largest relative error {worst:.1%}")
    return float(solution[0]), float(solution[1])


def largest_unit(config) -> int:
    """Parameters of the largest block (a last-stage block): about 12 C^2 for the attention and MLP."""
    swin = config.MODEL.SWINV2 if config.MODEL.TYPE == "swinv2" else config.MODEL.SWIN
    width = swin.EMBED_DIM * 2 ** (len(swin.DEPTHS) - 1)
    return 12 * width * width


def estimate(params: int, unit: int, shapes, batch: int, procs: int, mode: str, checkpointing: bool,
             fit: Tuple[float, float], attention_maps: bool = True) -> Dict[str, float]:
    """Bytes per process, by part.

    states: float32 weights, gradients and AdamW's two moments, 16 B a parameter, all divided by the processes under
    FSDP; DDP adds its float32 gradient buckets (4 B) and autocast's bf16 weight copies (2 B). working: FSDP's
    gathered bf16 weights and gradients of two units at once (the current and the prefetched one) plus the float32
    reduce-scatter input, about 12 B a parameter of the largest unit. activations: per block tokens x (a C + b N h)
    for every image; with checkpointing only each block's float32 input is kept, plus one block's activations
    during its recomputation.
    """
    a, b = fit
    per_block = [t * (a * c + (b * n * h if attention_maps else 0.0)) for t, c, n, h in shapes]
    if checkpointing:
        activations = batch * (sum(4 * t * c for t, c, _, _ in shapes) + max(per_block))
    else:
        activations = batch * sum(per_block)
    if mode == "fsdp":
        states, working = 16 * params / procs, 12 * unit
    else:
        states, working = 22 * params, 0
    return {"states": states, "working": working, "activations": activations,
            "total": states + working + activations}


def v2_giant_table(fit) -> List[str]:
    """The estimate for a SwinV2-G-shaped model at 640 px (window 40, as the V2 paper fine-tunes it)."""
    from config import load_config

    config = load_config(None, opts=["MODEL.TYPE", "swinv2", "MODEL.SWINV2.EMBED_DIM", "512", "MODEL.SWINV2.DEPTHS",
                                     "[2, 2, 42, 2]", "MODEL.SWINV2.NUM_HEADS", "[16, 32, 64, 128]",
                                     "MODEL.SWINV2.WINDOW_SIZE", "40", "DATA.IMG_SIZE", "640"])
    from models import build_model

    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(config).parameters())
    shapes, unit = block_shapes(config, 640), largest_unit(config)
    lines = [f"SwinV2-G shape: {params / 1e9:.2f}B parameters; largest block {unit / 1e6:.0f}M; per GPU, GiB "
             "(ESTIMATE from the model above):",
             "| GPUs | mode | checkpointing | attention maps stored | batch 1 | batch 2 | fits 40 GB at batch 1 | fits 80 GB at batch 1 |",
             "|---|---|---|---|---|---|---|---|"]
    for procs in (1, 8, 16, 32, 64):
        for mode in (("ddp",) if procs == 1 else ("fsdp",)):
            for checkpointing in (False, True):
                for maps in (True, False):
                    totals = [estimate(params, unit, shapes, batch, procs, mode, checkpointing, fit, maps)["total"]
                              / GIB for batch in (1, 2)]
                    lines.append(f"| {procs} | {mode} | {'yes' if checkpointing else 'no'} | "
                                 f"{'yes (explicit)' if maps else 'no (fused SDPA)'} | {totals[0]:.1f} | "
                                 f"{totals[1]:.1f} | {'yes' if totals[0] < 40 * 1e9 / GIB else 'no'} | "
                                 f"{'yes' if totals[0] < 80 * 1e9 / GIB else 'no'} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="swin_b", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["swin_b", "swinv2_l"], choices=sorted(MODELS))
    parser.add_argument("--procs", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--skip", nargs="*", default=[], metavar="MODEL:MODE:PROCS",
                        help="runs to leave out, e.g. swinv2_l:ddp:4 where memory is short")
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", type=lambda s: s == "True", default=False)
    parser.add_argument("--estimate-only", action="store_true", help="only the fit and the SwinV2-G estimate")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    from config import load_config

    start = time.time()
    fit = fit_activations()
    print(f"activation fit (bf16 autocast, explicit attention): {fit[0]:.2f} B per token-channel, "
          f"{fit[1]:.2f} B per token x window token x head")
    if not args.estimate_only:
        print("| model | parameters | processes | mode | measured peak, MiB | model, MiB (states + working + "
              "activations) | model / measured |")
        print("|---|---|---|---|---|---|---|")
        for name in args.models:
            config = load_config(os.path.join(REPO, MODELS[name]), opts=model_opts(args))
            shapes, unit = block_shapes(config, args.img), largest_unit(config)
            for procs in args.procs:
                for mode in ("ddp", "fsdp"):
                    if f"{name}:{mode}:{procs}" in args.skip:
                        print(f"| {name} | | {procs} | {mode} | not run (--skip) | | |")
                        continue
                    measured = launch(args, name, mode, procs)
                    peak = measured["cuda_peak"] or measured["training"]
                    model = estimate(measured["params"], unit, shapes, args.batch, procs, mode, args.checkpointing,
                                     fit)
                    print(f"| {name} | {measured['params'] / 1e6:.1f}M | {procs} | {mode} | {peak / MIB:.0f} | "
                          f"{model['total'] / MIB:.0f} ({model['states'] / MIB:.0f} + {model['working'] / MIB:.0f} "
                          f"+ {model['activations'] / MIB:.0f}) | {model['total'] / peak:.2f} |", flush=True)
    print()
    print("\n".join(v2_giant_table(fit)))
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
