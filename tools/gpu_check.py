"""Everything only a GPU can show, in one command, with a Markdown and JSON report.

    python tools/gpu_check.py --out gpu_check                          # on one CUDA GPU: within 7 minutes
    python tools/gpu_check.py --quick --out gpu_check                  # the first look: within 3 minutes
    python tools/gpu_check.py --device cpu --smoke --out /tmp/gpu_check   # the same list at toy sizes on the CPU
    python tools/gpu_check.py --only numerics,demo-bfloat16 --out DIR     # a subset of the steps

Steps, in this order: what only a GPU answers first, so that a run cut short has answered it (each runs as
subprocesses under its own time limit; a failing step is reported with the tail of its output and the run goes
on to the next one):

- ``gpu-tests``: ``python -m pytest -m gpu``;
- ``numerics``: forward and backward of Swin-T for each attention path x fused window kernel x float32 /
  bfloat16 / float16 autocast, eager, and one case under ``torch.compile`` (``--compile-all``: all twelve),
  compared with the float32 explicit eager path;
- ``demo-bfloat16``, ``demo-float16``: the digits demo killed mid-epoch with SIGKILL, auto-resumed to the end
  (the loss must go down), then ``--eval --resume`` of the last checkpoint must reproduce its acc@1 / acc@5;
- ``torchrun``: ``torchrun --nproc_per_node 1 main.py`` with DDP and with ``--fsdp`` (NCCL on a GPU, gloo on the
  CPU; one process takes the path of many), then ``--eval`` of the sharded checkpoint under torchrun;
- ``bench-window-process``, ``throughput-swin-t``, ``throughput-swin-b``, ``bench-model``: the benchmarks, whose
  figures are collected into the report;
- ``emulation-tests``: ``tests/test_gpu_emulation.py`` (CPU emulation of CUDA layouts; last, as CI runs it too).

``--quick`` runs gpu-tests, numerics (eager cases only), demo-bfloat16, torchrun and throughput-swin-t. A whole
run keeps to a time budget (``--budget``; 420 s by default on a GPU, 180 s with ``--quick``): each step's limit is
cut to what is left of it, and a step that would start with less than a minimum left is reported as skipped.

``OUT/report.md``, ``OUT/report.json`` and ``OUT/log.txt`` (every command with its whole output) are written
after each step; the exit status is 1 when a step failed or was skipped.
"""
import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml")
SWIN_T = os.path.join(REPO, "configs", "swin", "swin_tiny_patch4_window7_224.yaml")
SWIN_B = os.path.join(REPO, "configs", "swin", "swin_base_patch4_window7_224.yaml")
DEMO_RUN = os.path.join("swin_micro_digits", "default")
PROGRESS = re.compile(r"Train: \[(\d+)\]\[(\d+)/(\d+)\] .* loss ([0-9.naninf]+) ")
TAIL_LINES = 60

# Tolerances of the numerics step, relative to the largest magnitude of the float32 reference tensor
# (max |case - reference| <= tolerance * max |reference|). float32: the paths differ only in summation order and
# kernel choice (TF32 is switched off), a few 1e-6 through 12 blocks, so 1e-4 leaves a wide margin. bfloat16
# keeps 8 significant bits (rounding 2**-9 = 2e-3 per operation) and float16 11 (2**-12 = 2.4e-4); the errors
# of the operations along the network add up, more in the gradients (the backward is about twice the work).
# Measured with Swin-T at 224 px on the CPU (batch 2): bfloat16 5.8e-3 to 6.9e-3 on the logits and up to 1.5e-2 on
# these gradients, float16 6.8e-4 to 8.2e-4 and up to 1.5e-3; the tolerances leave 7x to 13x of margin for
# other kernels. A wrong layout or mask gives differences of the order of the tensor itself, far above any of these
# (and the float32 cases check every path and the compiled graphs at 1e-4).
TOLERANCES = {
    "float32": {"logits": 1e-4, "grads": 1e-4},
    "bfloat16": {"logits": 5e-2, "grads": 1e-1},
    "float16": {"logits": 1e-2, "grads": 2e-2},
}
NAMED_GRADS = ("patch_embed.proj.weight", "layers.0.blocks.1.attn.relative_position_bias_table",
               "layers.0.blocks.1.attn.qkv.weight", "head.weight")
# The loss is multiplied by this before the backward and the gradients divided by it after, as float16
# training's gradient scaler does, so small float16 gradients are not flushed to zero. A power of two: exact.
LOSS_SCALE = 1024.0

# The demo's smaller model and the opts of every short training run (mechanics, not accuracy).
SMALL_MODEL = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]"]
MICRO_NUMERICS = SMALL_MODEL + ["MODEL.SWIN.WINDOW_SIZE", "4", "DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "10"]


class StepFailed(Exception):
    """A check of a step did not hold; the message says which and with what figures."""


@dataclasses.dataclass
class Sizes:
    """What each step runs: full sizes on a GPU, toy sizes for ``--smoke``."""
    numerics_cfg: Optional[str]
    numerics_opts: List[str]
    numerics_batch: int
    numerics_img: int
    numerics_compiled: List[tuple]  # (attn, fused, precision) cases also run under torch.compile (not --quick)
    compile_backend: str  # torch.compile's backend for those
    demo_opts: List[str]
    demo_epochs: int
    demo_kill_at: tuple  # (epoch, batch): SIGKILL once a progress line at or after it is logged
    demo_subset: Optional[tuple]  # (train images, val images) per class, or None for the whole set
    torchrun_opts: List[str]
    bench_window: List[str]
    bench_model: List[str]
    throughput: Dict[str, List[str]]  # step name -> main.py arguments


def all_numerics_cases() -> List[tuple]:
    return [(attn, fused, precision) for attn in ("sdpa", "explicit") for fused in (False, True)
            for precision in ("float32", "bfloat16", "float16")]


def gpu_sizes() -> Sizes:
    # Compiling Swin-T forward + backward took 42-62 s a case on the H200, so the default run compiles one case,
    # CUDA's default path in bfloat16, to stay within its 7 minutes. --compile-all compiles all 12.
    compiled = [("sdpa", False, "bfloat16")]
    return Sizes(
        numerics_cfg=SWIN_T, numerics_opts=["MODEL.DROP_PATH_RATE", "0.0"], numerics_batch=4, numerics_img=224,
        numerics_compiled=compiled, compile_backend="inductor",
        demo_opts=["PRINT_FREQ", "5", "TRAIN.SAVE_ITERS", "5", "TRAIN.EPOCHS", "4"], demo_epochs=4,
        demo_kill_at=(2, 10), demo_subset=None,
        torchrun_opts=["PRINT_FREQ", "5", "TRAIN.SAVE_ITERS", "5", "TRAIN.EPOCHS", "1"],
        bench_window=["--device", "cuda", "--dtypes", "float32", "float16", "bfloat16"],
        # Three eager attention variants against timm eager, then the fastest compiled against timm compiled
        # while the step's time allows (--budget-s is set from it); the whole matrix is a call of its own (README).
        bench_model=["--device", "cuda", "--batch", "128", "--matrix", "--quick", "--warmup", "3", "--iterations",
                     "10"],
        throughput={"throughput-swin-t": ["--cfg", SWIN_T, "--batch-size", "128"],
                    "throughput-swin-b": ["--cfg", SWIN_B, "--batch-size", "128"]})


def smoke_sizes() -> Sizes:
    # Window 2 at 64 px keeps every stage a whole number of windows; the widths are cut to a few channels a head.
    toy = ["DATA.IMG_SIZE", "64", "MODEL.SWIN.WINDOW_SIZE", "2"]
    # The demo model at half width on 40 images a class, batch 16 (25 updates an epoch), no warmup: its loss falls
    # within 2 epochs.
    quick_demo = ["MODEL.SWIN.EMBED_DIM", "32", "DATA.BATCH_SIZE", "16", "DATA.NUM_WORKERS", "0",
                  "DATA.PREPARE_DIGITS", "False", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.BASE_LR", "4e-2",
                  "MODEL.DROP_PATH_RATE", "0.0"]
    return Sizes(
        numerics_cfg=None, numerics_opts=MICRO_NUMERICS + ["MODEL.DROP_PATH_RATE", "0.0"], numerics_batch=2,
        # Inductor's C++ code generation takes minutes on a small CPU; aot_eager still traces the graph with
        # dynamo and AOTAutograd (graph breaks, fake tensors, the custom op's registrations) and runs it eagerly.
        numerics_img=32, numerics_compiled=[("sdpa", True, "bfloat16")], compile_backend="aot_eager",
        demo_opts=quick_demo + ["PRINT_FREQ", "2", "TRAIN.SAVE_ITERS", "10", "TRAIN.EPOCHS", "2"], demo_epochs=2,
        demo_kill_at=(1, 12), demo_subset=(40, 10),
        torchrun_opts=quick_demo + SMALL_MODEL + ["PRINT_FREQ", "5", "TRAIN.SAVE_ITERS", "10", "TRAIN.EPOCHS", "1"],
        bench_window=["--device", "cpu", "--dtypes", "float32", "--batch", "2", "--iters", "1", "--warmup", "1",
                      "--no-compile"],
        bench_model=["--device", "cpu", "--model", "micro", "--batch", "2", "--matrix", "--quick",
                     "--compile-backend", "aot_eager", "--warmup", "1", "--iterations", "1", "--rounds", "1",
                     "--no-memory"],
        throughput={"throughput-swin-t": ["--cfg", SWIN_T, "--batch-size", "2", "--opts"] + toy
                    + ["MODEL.SWIN.EMBED_DIM", "24"],
                    "throughput-swin-b": ["--cfg", SWIN_B, "--batch-size", "2", "--opts"] + toy
                    + ["MODEL.SWIN.EMBED_DIM", "32"]})


# --------------------------------------------------------------------------- running commands

class Shared:
    """What the steps of one run share: the options, the sizes, the scratch folder, the log and the data set."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, work: str, log_path: str):
        self.args = args
        self.sizes = sizes
        self.work = work
        self.log_path = log_path
        self.log_lock = threading.Lock()
        self.prepare_lock = threading.Lock()
        self.digits: Optional[str] = None
        self.run_deadline: Optional[float] = None  # when the run's budget is spent


class Context:
    """Runs one step's commands under the step's deadline and keeps their whole output in ``log.txt``."""

    def __init__(self, shared: Shared, deadline: float):
        self.shared = shared
        self.args, self.sizes, self.work = shared.args, shared.sizes, shared.work
        self.deadline = deadline
        self.output: List[str] = []  # this step's output, for the tail shown when it fails

    def env(self) -> Dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.args.smoke and self.args.device == "cpu":
            # Toy tensors: extra threads only add synchronisation, which on a busy machine costs 10x or more.
            env["OMP_NUM_THREADS"] = "1"
        return env

    def remaining(self) -> float:
        left = self.deadline - time.time()
        if left <= 0:
            raise StepFailed("the step ran out of its time limit")
        return left

    def _record(self, command: Sequence[str], text: str, note: str) -> None:
        self.output.extend(text.splitlines())
        with self.shared.log_lock, open(self.shared.log_path, "a") as log:
            log.write(f"$ {shlex.join(command)}\n{text}\n[{note}]\n\n")

    def run(self, command: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
        """Runs ``command`` in the repository with stdout and stderr together, up to the step's deadline."""
        started = time.time()
        # A session of its own, so that a timeout also ends what it started (torchrun's workers, loader workers).
        process = subprocess.Popen(list(command), cwd=REPO, env=self.env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=self.remaining())
        except (subprocess.TimeoutExpired, StepFailed):
            stop(process)
            try:
                output, _ = process.communicate(timeout=10)
            except subprocess.TimeoutExpired as error:  # an orphan still holds the pipe: keep what came
                output = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else ""
            self._record(command, output, f"killed at the step's time limit after {time.time() - started:.0f} s")
            raise StepFailed(f"timed out after {time.time() - started:.0f} s: {shlex.join(command)}") from None
        self._record(command, output, f"exit status {process.returncode} after {time.time() - started:.1f} s")
        if check and process.returncode != 0:
            raise StepFailed(f"exit status {process.returncode}: {shlex.join(command)}")
        return subprocess.CompletedProcess(list(command), process.returncode, output)

    def run_killed(self, command: Sequence[str], log_file: str, kill_at: tuple) -> None:
        """Starts ``command`` and SIGKILLs it once ``log_file`` shows a progress line at or after (epoch, batch)."""
        with tempfile.TemporaryFile("w+") as sink:
            process = subprocess.Popen(list(command), cwd=REPO, env=self.env(), stdout=sink, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                while True:
                    if progress_reached(log_file, kill_at):
                        os.kill(process.pid, signal.SIGKILL)
                        process.wait()
                        note = f"SIGKILL once epoch {kill_at[0]} batch {kill_at[1]} was logged"
                        break
                    if process.poll() is not None:
                        note = f"exit status {process.returncode} before it could be killed"
                        break
                    if time.time() > self.deadline:
                        note = "killed at the step's time limit"
                        break
                    time.sleep(0.02)
            finally:
                if process.poll() is None:
                    stop(process)
            sink.seek(0)
            self._record(command, sink.read(), note)
        if not note.startswith("SIGKILL"):
            raise StepFailed(f"the run to be killed: {note}")


def stop(process: subprocess.Popen) -> None:
    """Ends ``process`` and its process group: SIGTERM first, which torchrun passes on to its workers (they run in
    sessions of their own), then SIGKILL after 10 s."""
    for signal_number, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def progress_reached(log_file: str, position: tuple) -> bool:
    if not os.path.exists(log_file):
        return False
    with open(log_file) as f:
        for match in PROGRESS.finditer(f.read()):
            if (int(match.group(1)), int(match.group(2))) >= position:
                return True
    return False


def logged_losses(log_file: str) -> Dict[tuple, float]:
    """(epoch, batch) -> loss of every progress line; after a resume the later line for a batch wins."""
    with open(log_file) as f:
        return {(int(m.group(1)), int(m.group(2))): float(m.group(4)) for m in PROGRESS.finditer(f.read())}


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the steps

def pytest_counts(output: str) -> Dict[str, int]:
    """The counts of pytest's summary line ("3 passed, 2 skipped in 4.1s")."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    counts = {}
    if lines:
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", lines[-1]):
            counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    return counts


def run_pytest(ctx: Context, *arguments: str) -> Dict[str, Any]:
    result = ctx.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *arguments], check=False)
    counts = pytest_counts(result.stdout)
    if result.returncode != 0:
        raise StepFailed(f"pytest {' '.join(arguments)}: exit status {result.returncode}, {counts}")
    return {"counts": counts, "summary": ", ".join(f"{v} {k}" for k, v in counts.items())}


def step_gpu_tests(ctx: Context) -> Dict[str, Any]:
    details = run_pytest(ctx, "-m", "gpu")
    if ctx.args.device == "cuda" and not details["counts"].get("passed"):
        raise StepFailed(f"no gpu-marked test ran on the GPU: {details['summary']}", details)
    return details


def step_emulation_tests(ctx: Context) -> Dict[str, Any]:
    return run_pytest(ctx, "tests/test_gpu_emulation.py")


def step_numerics(ctx: Context) -> Dict[str, Any]:
    output = os.path.join(ctx.work, "numerics.json")
    command = [sys.executable, os.path.abspath(__file__), "--worker", "numerics", "--device", ctx.args.device,
               "--worker-json", output, "--tolerance-scale", repr(ctx.args.tolerance_scale)]
    if ctx.args.smoke:
        command.append("--smoke")
    if ctx.args.compile_all:
        command.append("--compile-all")
    if ctx.args.quick:
        command.append("--quick")
    ctx.run(command, check=False)
    if not os.path.exists(output):
        raise StepFailed("the numerics worker wrote no results")
    results = read_json(output)
    failed = [case["case"] for case in results["cases"] if not case["passed"]]
    results["summary"] = f"{len(results['cases']) - len(failed)} of {len(results['cases'])} cases within tolerance"
    if failed:
        raise StepFailed("out of tolerance or failed: " + ", ".join(failed), results)
    return results


def prepare_digits(ctx: Context) -> str:
    """The digits demo set (prepared if missing), or for --smoke a small per-class subset of it; its root."""
    shared = ctx.shared
    with shared.prepare_lock:  # steps running at the same time wait for the one preparation
        if shared.digits is None:
            from data.digits import digits_ready

            root = os.path.abspath(ctx.args.digits)
            if not digits_ready(root):
                ctx.run([sys.executable, "tools/prepare_digits.py", "--root", root])
            if ctx.sizes.demo_subset is not None:
                subset_root = os.path.join(ctx.work, "digits_subset")
                for split, count in zip(("train", "val"), ctx.sizes.demo_subset):
                    for label in sorted(os.listdir(os.path.join(root, split))):
                        source = os.path.join(root, split, label)
                        target = os.path.join(subset_root, split, label)
                        os.makedirs(target, exist_ok=True)
                        for name in sorted(os.listdir(source))[:count]:
                            os.symlink(os.path.join(source, name), os.path.join(target, name))
                root = subset_root
            shared.digits = root
    return shared.digits


def step_demo(ctx: Context, amp_dtype: str) -> Dict[str, Any]:
    """Train killed mid-epoch, auto-resume to the end (loss must fall), then exact --eval of the last checkpoint."""
    sizes = ctx.sizes
    data = prepare_digits(ctx)
    output = os.path.join(ctx.work, f"demo_{amp_dtype}")
    run_dir = os.path.join(output, DEMO_RUN)
    command = [sys.executable, "main.py", "--cfg", DEMO, "--data-path", data, "--output", output, "--amp-dtype",
               amp_dtype, "--opts"] + sizes.demo_opts
    ctx.run_killed(command, os.path.join(run_dir, "log_rank0.txt"), sizes.demo_kill_at)
    resumed = ctx.run(command)
    match = re.search(r"continuing at epoch (\d+), update (\d+)", resumed.stdout)
    if not match:
        raise StepFailed("the rerun after SIGKILL did not resume from a checkpoint")
    resumed_at = (int(match.group(1)), int(match.group(2)))
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    if [r["epoch"] for r in records] != list(range(sizes.demo_epochs)):
        raise StepFailed(f"metrics.jsonl holds epochs {[r['epoch'] for r in records]}, "
                         f"expected 0..{sizes.demo_epochs - 1}")
    last = records[-1]
    losses = logged_losses(os.path.join(run_dir, "log_rank0.txt"))
    details = {"amp_dtype": amp_dtype, "epochs": sizes.demo_epochs, "killed_at": list(sizes.demo_kill_at),
               "resumed_at": list(resumed_at), "train_loss": [r["train_loss"] for r in records],
               "first_logged_loss": losses[min(losses)], "last_logged_loss": losses[max(losses)],
               "val_acc1": [r["val_acc1"] for r in records], "val_acc5": last["val_acc5"]}
    checkpoint = os.path.join(run_dir, f"ckpt_epoch_{sizes.demo_epochs - 1}.pth")
    eval_output = os.path.join(ctx.work, f"demo_{amp_dtype}_eval")
    ctx.run([sys.executable, "main.py", "--cfg", DEMO, "--data-path", data, "--output", eval_output, "--amp-dtype",
             amp_dtype, "--eval", "--resume", checkpoint, "--opts"] + sizes.demo_opts)
    evaluated = read_json(os.path.join(eval_output, DEMO_RUN, "eval.json"))
    details["eval"] = evaluated
    details["summary"] = (f"loss {records[0]['train_loss']:.4f} -> {last['train_loss']:.4f} over "
                          f"{sizes.demo_epochs} epochs, resumed at epoch {resumed_at[0]} update {resumed_at[1]}; "
                          f"acc@1 {last['val_acc1']:.2f}, --eval {evaluated['acc1']:.2f}")
    problems = []
    if resumed_at[1] == 0:
        problems.append(f"resumed at the start of epoch {resumed_at[0]}, not mid-epoch (no mid-epoch checkpoint?)")
    if not last["train_loss"] < records[0]["train_loss"]:
        problems.append(f"the training loss did not go down: {details['train_loss']}")
    if (evaluated["acc1"], evaluated["acc5"]) != (last["val_acc1"], last["val_acc5"]):
        problems.append(f"--eval gave acc@1 {evaluated['acc1']} acc@5 {evaluated['acc5']}, the last epoch "
                        f"{last['val_acc1']} / {last['val_acc5']}")
    if problems:
        raise StepFailed("; ".join(problems), details)
    return details


def step_torchrun(ctx: Context) -> Dict[str, Any]:
    """``torchrun --nproc_per_node 1 main.py``, as a multi-GPU job runs it: DDP, then FSDP, then ``--eval`` of the
    sharded checkpoint under torchrun, which must give the FSDP run's last acc@1 exactly."""
    data = prepare_digits(ctx)
    expected = "nccl" if ctx.args.device == "cuda" else "gloo"
    details: Dict[str, Any] = {"runs": {}}
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        output = os.path.join(ctx.work, f"torchrun_{name}")
        ctx.run(torchrun_main(output, data, flags, ctx.sizes.torchrun_opts))
        backend = logged_backend(os.path.join(output, DEMO_RUN, "log_rank0.txt"))
        records = read_jsonl(os.path.join(output, DEMO_RUN, "metrics.jsonl"))
        details["runs"][name] = {"backend": backend, "train_loss": records[-1]["train_loss"],
                                 "val_acc1": records[-1]["val_acc1"], "val_loss": records[-1]["val_loss"]}
        if backend != expected:
            raise StepFailed(f"{name}: main.py under torchrun ran with {backend}, expected process group: "
                             f"{expected}", details)
    fsdp_checkpoint = os.path.join(ctx.work, "torchrun_fsdp", DEMO_RUN, "ckpt_epoch_0")
    eval_output = os.path.join(ctx.work, "torchrun_fsdp_eval")
    ctx.run(torchrun_main(eval_output, data, ["--fsdp", "--eval", "--resume", fsdp_checkpoint],
                          ctx.sizes.torchrun_opts))
    evaluated = read_json(os.path.join(eval_output, DEMO_RUN, "eval.json"))
    details["eval_acc1"] = evaluated["acc1"]
    details["backend"] = details["runs"]["fsdp"]["backend"]
    details["summary"] = ", ".join(f"{name}: {run['backend']}, loss {run['train_loss']:.4f}, acc@1 {run['val_acc1']:.2f}"
                                   for name, run in details["runs"].items()) + f"; --eval {evaluated['acc1']:.2f}"
    if evaluated["acc1"] != details["runs"]["fsdp"]["val_acc1"]:
        raise StepFailed(f"--eval of the sharded checkpoint gave acc@1 {evaluated['acc1']}, the run "
                         f"{details['runs']['fsdp']['val_acc1']}", details)
    return details


def torchrun_main(output: str, data: str, flags: List[str], opts: List[str]) -> List[str]:
    return ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
             "main.py", "--cfg", DEMO, "--data-path", data, "--output", output] + flags + ["--opts"] + opts)


def logged_backend(log_file: str) -> str:
    """The default process group's backend that main.py logged at start-up ("none" without a group)."""
    with open(log_file) as f:
        match = re.search(r"process group: (\w+)", f.read())
    return match.group(1) if match else "none"


def step_bench_window_process(ctx: Context) -> Dict[str, Any]:
    output = os.path.join(ctx.work, "bench_window_process.json")
    ctx.run([sys.executable, "benchmarks/bench_window_process.py", "--json", output] + ctx.sizes.bench_window)
    results = read_json(output)
    speedups = [row["speedup_vs_eager"] for row in results["results"]]
    results["summary"] = (f"{len(speedups)} cases, fused vs eager {min(speedups):.2f}x to {max(speedups):.2f}x "
                          f"on {results['metadata']['device']}")
    return results


def step_bench_model(ctx: Context) -> Dict[str, Any]:
    output = os.path.join(ctx.work, "bench_model.json")
    budget = ["--budget-s", f"{max(ctx.remaining() - 15, 1):.0f}"] if ctx.args.device == "cuda" else []
    ctx.run([sys.executable, "benchmarks/bench_model.py", "--json", output] + ctx.sizes.bench_model + budget)
    results = read_json(output)
    results["summary"] = ", ".join(f"{row['setting']} {row['mode']} {row['variant']} {row.get('execution', '')} "
                                   f"{row['ours_images_per_second']:.1f} img/s ({row['ratio']:.2f}x timm)"
                                   for row in results["results"])
    return results


def step_throughput(ctx: Context, name: str) -> Dict[str, Any]:
    output = os.path.join(ctx.work, name)
    arguments = list(ctx.sizes.throughput[name])
    if "--opts" not in arguments:
        arguments.append("--opts")
    arguments += ["DATA.DATA_PATH", os.path.join(ctx.work, "no_data_needed")]
    ctx.run([sys.executable, "main.py", "--throughput", "--output", output] + arguments)
    found = [os.path.join(root, "throughput.json") for root, _, files in os.walk(output) if "throughput.json" in files]
    if not found:
        raise StepFailed("main.py --throughput wrote no throughput.json")
    result = read_json(found[0])
    result["config"] = os.path.relpath(arguments[arguments.index("--cfg") + 1], REPO)
    result["arguments"] = [os.path.relpath(a, REPO) if a.startswith(REPO) else a for a in ctx.sizes.throughput[name]]
    result["summary"] = (f"{result['precision']}, batch {result['batch_size']}: inference "
                         f"{result['inference_images_per_second']:.1f} img/s, training "
                         f"{result['train_images_per_second']:.1f} img/s")
    return result


@dataclasses.dataclass
class Step:
    name: str
    title: str
    run: Callable[[Context], Dict[str, Any]]
    timeout_gpu: int
    timeout_smoke: int
    quick: bool = False


# Time limits in seconds: on a GPU what each step is expected to need, with room (the expected times, from the
# H200 run of GPU_FACTS.md where a step ran there, sum to about 6 minutes for the default list and 2.5 for --quick;
# the run's budget caps the total either way), and for --smoke on the CPU a guard against hangs (each smoke step
# takes 5 to 30 s of one core on a quiet machine, several times that on a busy one). ``quick``: in --quick runs.
STEPS = [
    Step("gpu-tests", "the gpu-marked tests (python -m pytest -m gpu)", step_gpu_tests, 120, 180, quick=True),
    Step("numerics", "forward and backward of each path against float32 explicit eager", step_numerics, 150, 180,
         quick=True),
    Step("demo-bfloat16", "the demo in bfloat16: kill, auto-resume, exact --eval",
         lambda ctx: step_demo(ctx, "bfloat16"), 90, 240, quick=True),
    Step("demo-float16", "the demo in float16: kill, auto-resume, exact --eval",
         lambda ctx: step_demo(ctx, "float16"), 90, 240),
    Step("torchrun", "torchrun --nproc_per_node 1 main.py with DDP and FSDP, --eval of the sharded checkpoint",
         step_torchrun, 120, 240, quick=True),
    Step("bench-window-process", "benchmarks/bench_window_process.py", step_bench_window_process, 60, 180),
    Step("throughput-swin-t", "main.py --throughput, Swin-T", lambda ctx: step_throughput(ctx, "throughput-swin-t"),
         60, 180, quick=True),
    Step("throughput-swin-b", "main.py --throughput, Swin-B", lambda ctx: step_throughput(ctx, "throughput-swin-b"),
         60, 180),
    Step("bench-model", "benchmarks/bench_model.py --matrix --quick: ours against timm", step_bench_model, 240, 180),
    Step("emulation-tests", "tests/test_gpu_emulation.py", step_emulation_tests, 120, 180),
]
# The whole run's time budget on a GPU (seconds), and the least a step is started with.
BUDGET_GPU, BUDGET_QUICK, MIN_STEP_SECONDS = 420, 180, 20


# --------------------------------------------------------------------------- workers (run as subprocesses)

def numerics_worker(args: argparse.Namespace) -> int:
    """Forward and backward of every case; writes the comparisons with the float32 explicit eager path."""
    import torch
    import torch.nn.functional as F

    from config import load_config
    from kernels.window_process import is_available
    from models import build_model

    device = torch.device(args.device)
    # float32 must mean float32: TF32 matrix products and convolutions would add errors of about 1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sizes = smoke_sizes() if args.smoke else gpu_sizes()
    compiled = all_numerics_cases() if args.compile_all else [] if args.quick else sizes.numerics_compiled

    def build(attn: str, fused: bool) -> torch.nn.Module:
        config = load_config(sizes.numerics_cfg, opts=sizes.numerics_opts + [
            "MODEL.SWIN.ATTN_IMPL", attn, "FUSED_WINDOW_PROCESS", str(fused)])
        return build_model(config)

    def forward_backward(model: torch.nn.Module, runnable: Callable, precision: str):
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=getattr(torch, precision), enabled=precision != "float32"):
            logits = runnable(images)
        (F.cross_entropy(logits.float(), targets) * LOSS_SCALE).backward()
        parameters = dict(model.named_parameters())
        grads = {name: parameters[name].grad.float() / LOSS_SCALE for name in NAMED_GRADS}
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        return logits.detach().float(), grads, finite

    torch.manual_seed(0)
    reference_model = build("explicit", False).to(device)
    state = reference_model.state_dict()
    num_classes = reference_model.head.out_features
    images = torch.randn(sizes.numerics_batch, 3, sizes.numerics_img, sizes.numerics_img, device=device)
    targets = torch.randint(0, num_classes, (sizes.numerics_batch,), device=device)
    ref_logits, ref_grads, _ = forward_backward(reference_model, reference_model, "float32")
    del reference_model

    cases = [(attn, fused, precision, False) for attn, fused, precision in all_numerics_cases()]
    cases += [(attn, fused, precision, True) for attn, fused, precision in compiled]
    results = []
    for attn, fused, precision, use_compile in cases:
        name = f"{attn} {'fused' if fused else 'unfused'} {precision} {'compiled' if use_compile else 'eager'}"
        tolerance = {key: value * args.tolerance_scale for key, value in TOLERANCES[precision].items()}
        record: Dict[str, Any] = {"case": name, "attn": attn, "fused": fused, "precision": precision,
                                  "compiled": use_compile, "tolerance": tolerance}
        started = time.time()
        try:
            if fused and not is_available(device):
                raise RuntimeError(f"the fused window kernel is not available on {device} (see the warning above)")
            torch.compiler.reset()
            model = build(attn, fused).to(device)
            model.load_state_dict(state)
            runnable = torch.compile(model, backend=sizes.compile_backend) if use_compile else model
            logits, grads, finite = forward_backward(model, runnable, precision)
            diffs = {"logits": compare(logits, ref_logits, tolerance["logits"])}
            diffs.update({name: compare(grads[name], ref_grads[name], tolerance["grads"]) for name in NAMED_GRADS})
            record.update(diffs=diffs, finite=finite,
                          passed=finite and all(d["passed"] for d in diffs.values()))
        except Exception as error:  # noqa: BLE001  (any failure of one case is reported, the others still run)
            record.update(passed=False, error=f"{type(error).__name__}: {error}"[:2000])
        record["seconds"] = time.time() - started
        results.append(record)
        print(f"{name}: {'ok' if record['passed'] else 'FAILED'} ({record['seconds']:.1f} s)"
              + (f" {record['error']}" if "error" in record else ""), flush=True)
    model = os.path.relpath(sizes.numerics_cfg, REPO) if sizes.numerics_cfg else "micro model"
    with open(args.worker_json, "w") as f:
        json.dump({"device": device_name(device), "batch": sizes.numerics_batch, "img": sizes.numerics_img,
                   "model": model + " with " + " ".join(sizes.numerics_opts), "compile_backend": sizes.compile_backend,
                   "loss_scale": LOSS_SCALE, "named_grads": list(NAMED_GRADS), "tolerances": TOLERANCES,
                   "tolerance_scale": args.tolerance_scale, "cases": results}, f, indent=1)
    return 0


def compare(value, reference, tolerance: float) -> Dict[str, Any]:
    scale = float(reference.abs().max())
    difference = float((value - reference).abs().max())
    return {"max_abs_diff": difference, "reference_max_abs": scale, "relative": difference / max(scale, 1e-30),
            "passed": difference <= tolerance * scale}


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, threads: {torch.get_num_threads()})"


# --------------------------------------------------------------------------- the report

def environment(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    info = {"device": args.device, "smoke": args.smoke, "python": platform.python_version(),
            "torch": torch.__version__, "host": platform.node(), "command": shlex.join(sys.argv),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def render_markdown(report: Dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {verdict(report)}", "",
             f"`{env['command']}` on {env.get('gpu', 'CPU')} ({'smoke sizes' if env['smoke'] else 'full sizes'}), "
             f"torch {env['torch']}, commit {env.get('commit', '?')}, started {env['started']}, "
             f"{report.get('seconds', 0):.0f} s in all.", "",
             "| step | status | seconds | result |", "|---|---|---|---|"]
    for step in report["steps"]:
        summary = step.get("error") or step.get("details", {}).get("summary", "")
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.0f} | {summary} |")
    for step in report["steps"]:
        details = step.get("details") or {}
        section = RENDERERS.get(step["name"].split("-")[0] if step["name"].startswith(("demo", "throughput"))
                                else step["name"])
        if section and details:
            lines += ["", f"## {step['name']}: {step['title']}", ""] + section(details)
        if step["status"] == "failed" and step.get("output_tail"):
            lines += ["", f"### {step['name']}: end of the output", "", "```"] + step["output_tail"] + ["```"]
    return "\n".join(lines) + "\n"


def verdict(report: Dict[str, Any]) -> str:
    """PASSED, FAILED (a step failed) or INCOMPLETE (none failed, but the budget ran out before some)."""
    if report["passed"]:
        return "PASSED"
    return "FAILED" if any(step["status"] == "failed" for step in report["steps"]) else "INCOMPLETE"


def render_numerics(details: Dict[str, Any]) -> List[str]:
    lines = [f"Model {details['model']}, batch {details['batch']}, {details['img']} px, on {details['device']}. "
             "Reference: the float32 explicit-attention eager path with the same weights and input. Each cell is "
             "max |case - reference| / max |reference| of the logits or of a gradient (loss x "
             f"{details['loss_scale']:g} before the backward, gradients divided back). TF32 is off; torch.compile "
             f"uses the {details['compile_backend']} backend.", "",
             "Tolerances (relative to max |reference|" + (f", scaled by {details['tolerance_scale']:g}"
                                                          if details["tolerance_scale"] != 1 else "") + "):"]
    for precision, tolerance in details["tolerances"].items():
        lines.append(f"- {precision}: logits {tolerance['logits']:g}, gradients {tolerance['grads']:g}")
    lines += ["", "float32 differs from the reference only in summation order and kernels (a few 1e-6), so 1e-4 "
              "keeps a wide margin; bfloat16 rounds at 2^-9 and float16 at 2^-12 per operation, and the errors add up "
              "through the network, more in the backward; a wrong layout or mask shows as a difference of order 1.",
              "", "| case | logits | " + " | ".join(details["named_grads"]) + " | seconds | status |",
              "|---" * (len(details["named_grads"]) + 4) + "|"]
    for case in details["cases"]:
        if "error" in case:
            cells = [case["error"].splitlines()[0][:200]] + [""] * len(details["named_grads"])
        else:
            cells = [f"{case['diffs'][key]['relative']:.2e}" for key in ["logits"] + details["named_grads"]]
        status = "ok" if case["passed"] else "**FAILED**"
        lines.append(f"| {case['case']} | " + " | ".join(cells) + f" | {case['seconds']:.1f} | {status} |")
    return lines


def render_demo(details: Dict[str, Any]) -> List[str]:
    train_loss = ", ".join(f"{v:.4f}" for v in details["train_loss"])
    acc1 = ", ".join(f"{v:.2f}" for v in details["val_acc1"])
    lines = [f"- {details['amp_dtype']} autocast, {details['epochs']} epochs; training loss per epoch: {train_loss}",
             f"- validation acc@1 per epoch: {acc1}; last acc@5 {details['val_acc5']:.2f}",
             f"- SIGKILL at the first progress line at or after epoch {details['killed_at'][0]} batch "
             f"{details['killed_at'][1]}; the rerun resumed at epoch {details['resumed_at'][0]} update "
             f"{details['resumed_at'][1]}"]
    if "eval" in details:
        lines.append(f"- `--eval --resume` of the last checkpoint: acc@1 {details['eval']['acc1']:.3f}, acc@5 "
                     f"{details['eval']['acc5']:.3f}, loss {details['eval']['loss']:.5f} on {details['eval']['count']}"
                     " images")
    return lines


def render_torchrun(details: Dict[str, Any]) -> List[str]:
    lines = [f"- `torchrun --nproc_per_node 1 main.py` {'with --fsdp' if name == 'fsdp' else 'with DDP'}: process group "
             f"{run['backend']}, training loss {run['train_loss']:.4f}, acc@1 {run['val_acc1']:.2f}"
             for name, run in details["runs"].items()]
    if "eval_acc1" in details:
        lines.append(f"- `--fsdp --eval` of the sharded checkpoint under torchrun: acc@1 {details['eval_acc1']:.2f}")
    return lines


def render_bench_window(details: Dict[str, Any]) -> List[str]:
    meta = details["metadata"]
    lines = [f"{meta['device']}, torch {meta['torch']}, batch {meta['batch']}, median of {meta['iters']}", "",
             "| shape | dtype | fused ms | eager ms | compiled ms | fused / eager | fused GB/s | copy GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in details["results"]:
        compiled = f"{row['compiled_ms']:.3f}" if "compiled_ms" in row else "-"
        lines.append(f"| {row['shape']} | {row['dtype']} | {row['fused_ms']:.3f} | {row['eager_ms']:.3f} | "
                     f"{compiled} | {row['speedup_vs_eager']:.2f}x | {row['fused_GBps']:.1f} | "
                     f"{row['copy_GBps']:.1f} |")
    return lines


def render_bench_model(details: Dict[str, Any]) -> List[str]:
    peaks = details["matmul_peak_flops"]
    lines = [f"Swin-{details['model']} {details['img']} px, batch {details['batch']}, {details['device']}, torch "
             f"{details['torch']}; matmul peak fp32 {peaks['fp32'] / 1e12:.1f}, bf16 {peaks['bf16'] / 1e12:.1f} "
             "TFLOP/s", "",
             "| setting | mode | ours | execution | ours img/s | peer | peer img/s | ours / peer | ours MFU | compile s "
             "ours / peer | peak MB ours / peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in details["results"]:
        lines.append(f"| {row['setting']} | {row['mode']} | {row['variant']} | {row.get('execution', 'eager')} | "
                     f"{row['ours_images_per_second']:.1f} | {row.get('peer', 'timm')} | "
                     f"{row['timm_images_per_second']:.1f} | {row['ratio']:.2f} | {row['ours_mfu']:.1%} | "
                     f"{seconds(row.get('compile_seconds'))} / {seconds(row.get('timm_compile_seconds'))} | "
                     f"{megabytes(row['ours_peak_mb'])} / {megabytes(row['timm_peak_mb'])} |")
    lines += [f"- not measured: {line}" for line in details.get("not_measured", [])]
    return lines


def seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


def megabytes(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"  # NaN: not measured (--no-memory)


def render_throughput(details: Dict[str, Any]) -> List[str]:
    memory = (f"peak memory inference {details['inference_peak_memory_mb']:.0f} MB, training "
              f"{details['train_peak_memory_mb']:.0f} MB" if details["device"].startswith("cuda")
              else f"process peak RSS {details.get('process_peak_rss_mb', 0):.0f} MB")
    return [f"- `main.py --throughput {' '.join(details['arguments'])}`",
            f"- `{details['config']}` on {details['device']}, {details['precision']}, batch {details['batch_size']}: "
            f"inference {details['inference_images_per_second']:.1f} img/s, training step "
            f"{details['train_images_per_second']:.1f} img/s; {memory}"]


RENDERERS = {"numerics": render_numerics, "demo": render_demo, "torchrun": render_torchrun,
             "bench-window-process": render_bench_window, "bench-model": render_bench_model,
             "throughput": render_throughput}


def write_report(out: str, report: Dict[str, Any]) -> None:
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_markdown(report))


# --------------------------------------------------------------------------- the driver

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (CPU: under 2 minutes)")
    parser.add_argument("--quick", action="store_true",
                        help="the first look: " + ", ".join(s.name for s in STEPS if s.quick)
                        + " (numerics eager only), within 3 minutes")
    parser.add_argument("--budget", type=float,
                        help=f"seconds for the whole run (default on a GPU {BUDGET_GPU}, with --quick {BUDGET_QUICK}; "
                        "none for --smoke)")
    parser.add_argument("--out", default="gpu_check", help="folder for report.md, report.json and log.txt")
    parser.add_argument("--only", help="comma-separated steps to run, of: " + ", ".join(s.name for s in STEPS))
    parser.add_argument("--digits", default=os.path.join(REPO, "datasets", "digits"),
                        help="the digits demo set (prepared there if missing)")
    parser.add_argument("--compile-all", action="store_true", help="numerics: compile all 12 cases, not 1")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's time limit")
    parser.add_argument("--jobs", type=int, default=0,
                        help="steps run at the same time (default: 2 for --device cpu --smoke, else 1, so that "
                        "the benchmarks have the GPU to themselves)")
    parser.add_argument("--keep-work", action="store_true", help="keep the runs' folders (OUT/work)")
    # Multiplies the numerics tolerances: 0 makes every inexact case fail (tests use it to check failure reporting).
    parser.add_argument("--tolerance-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["numerics"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_step(step: Step, shared: Shared) -> Dict[str, Any]:
    """Runs one step under its time limit; returns its report entry, never raises."""
    args = shared.args
    started = time.time()
    limit = (step.timeout_smoke if args.smoke else step.timeout_gpu) * args.timeout_scale
    entry: Dict[str, Any] = {"name": step.name, "title": step.title}
    if shared.run_deadline is not None:
        left = shared.run_deadline - started
        if left < MIN_STEP_SECONDS:
            entry.update(status="skipped", seconds=0.0, limit_s=0.0,
                         error=f"skipped: {max(left, 0):.0f} s of the run's budget of {args.budget:.0f} s left")
            print(f"[gpu_check] {step.name}: {entry['error']}", flush=True)
            return entry
        limit = min(limit, left)
    entry["limit_s"] = limit
    print(f"[gpu_check] {step.name}: {step.title} (limit {limit:.0f} s)", flush=True)
    ctx = Context(shared, started + limit)
    try:
        entry["details"] = step.run(ctx)
        entry["status"] = "passed"
    except StepFailed as error:
        entry.update(status="failed", error=str(error.args[0]), details=error.args[1] if len(error.args) > 1 else {})
    except Exception as error:  # noqa: BLE001  (a broken step must not stop the others)
        entry.update(status="failed", error=f"{type(error).__name__}: {error}")
    entry["seconds"] = time.time() - started
    if entry["status"] == "failed":
        entry["output_tail"] = ctx.output[-TAIL_LINES:]
    print(f"[gpu_check] {step.name}: {entry['status']} in {entry['seconds']:.0f} s"
          + (f": {entry['error']}" if "error" in entry else ""), flush=True)
    return entry


def run_steps(args: argparse.Namespace) -> int:
    names = [s.name for s in STEPS]
    selected = args.only.split(",") if args.only else names
    unknown = [name for name in selected if name not in names]
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(names)}", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device is visible; on a machine without a GPU run --device cpu --smoke",
              file=sys.stderr)
        return 2
    jobs = args.jobs or (2 if args.smoke and args.device == "cpu" else 1)
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(os.path.abspath(args.out), "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log_path = os.path.join(args.out, "log.txt")
    open(log_path, "w").close()
    shared = Shared(args, smoke_sizes() if args.smoke else gpu_sizes(), work, log_path)
    if args.budget is None and not args.smoke:
        args.budget = BUDGET_QUICK if args.quick else BUDGET_GPU
    shared.run_deadline = time.time() + args.budget if args.budget else None
    steps = [s for s in STEPS if s.name in selected and (s.quick or not args.quick or args.only)]
    report: Dict[str, Any] = {"environment": {**environment(args), "jobs": jobs}, "steps": [], "passed": True}
    entries: Dict[str, Dict[str, Any]] = {}
    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_step, step, shared): step.name for step in steps}
        for future in concurrent.futures.as_completed(futures):
            entries[futures[future]] = future.result()
            # The report so far, in the order of the steps, rewritten as each one ends.
            report["steps"] = [entries[s.name] for s in steps if s.name in entries]
            report["passed"] = all(entry["status"] == "passed" for entry in report["steps"])
            report["seconds"] = time.time() - started
            write_report(args.out, report)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[gpu_check] {verdict(report)} in {report['seconds']:.0f} s; report in "
          f"{os.path.join(args.out, 'report.md')}", flush=True)
    return 0 if report["passed"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, main_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parse_args(own)
    sys.path.insert(0, REPO)
    if args.worker == "numerics":
        return numerics_worker(args)
    return run_steps(args)


if __name__ == "__main__":
    status = main()
    if "LOCAL_RANK" in os.environ:  # the torchrun worker ends as main.py's processes do (utils.exit_process);
        from utils import exit_process  # the report run imports no project module, so it can report a bad install
        exit_process(status)
    sys.exit(status)
