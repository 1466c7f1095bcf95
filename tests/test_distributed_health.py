"""Multi-process correctness of the training loop (EMA, non-finite stops) and its host syncs."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from engine import EpochState, NonFiniteLossError, Precision, TrainParts, train_one_epoch
from models.swin_transformer import SwinTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "dist_health_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(mode: str, out_dir) -> list:
    """Runs the worker under torchrun with 2 gloo processes; each rank's JSON result."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), WORKER, mode, str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Without agreement, the process that saw no NaN goes on into a collective its peer has left: it errors out
    # or hangs, and the timeout turns a hang into a failure.
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(2)]


ENDING = """
import atexit, sys
sys.path.insert(0, {repo!r})
from utils import exit_process

class InTheLastCollection:
    def __init__(self):
        self.cycle = self  # garbage only the interpreter's teardown collects
    def __del__(self):
        print("teardown ran", flush=True)

atexit.register(lambda: print("exit handlers ran", flush=True))
InTheLastCollection()
print("training done", flush=True)
exit_process(7)
"""


@pytest.mark.parametrize("torchrun", [False, True], ids=["plain", "torchrun"])
def test_a_torchrun_process_ends_without_the_interpreter_teardown(torchrun):
    """main.py's exit: exit handlers run and the status is kept; under torchrun the interpreter's teardown, where
    a gloo thread releasing a finished collective's tensors aborts the process (SIGABRT), is skipped."""
    env = {key: value for key, value in os.environ.items() if key != "LOCAL_RANK"}
    if torchrun:
        env["LOCAL_RANK"] = "0"
    result = subprocess.run([sys.executable, "-c", ENDING.format(repo=REPO)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 7, result.stderr
    expected = ["training done", "exit handlers ran"] + ([] if torchrun else ["teardown ran"])
    assert result.stdout.split("\n")[:-1] == expected


@pytest.mark.slow
def test_ema_is_the_same_on_every_process(tmp_path):
    """From scratch, each process initialises its own weights; DDP trains rank 0's, and the EMA must follow those."""
    results = run_two_processes("ema", tmp_path)
    for rank, result in enumerate(results):
        assert "error" not in result, result
        assert result["ema_vs_model_at_start"] == 0.0, f"rank {rank}: EMA did not start from the DDP weights"
        assert result["ema_spread_at_start"] == 0.0, f"rank {rank}: EMAs differ between processes at start"
        assert result["model_spread_after"] == 0.0
        assert result["ema_spread_after"] == 0.0, f"rank {rank}: EMAs differ between processes after training"
        assert result["ema_moved"] > 0.0  # the EMA lags the trained weights, so the check above is not vacuous


@pytest.mark.slow
def test_nan_on_one_process_stops_all_together(tmp_path):
    results = run_two_processes("nan", tmp_path)
    assert all("error" in r for r in results), results
    assert results[0]["error"] == results[1]["error"]
    assert "non-finite loss in epoch 0, at or before update 3" in results[0]["error"]
    assert results[0]["updates_done"] == results[1]["updates_done"] == 3


class DeviceReads:
    """Counts device-to-host reads (``item``, ``tolist``, ``float``/``int``/``bool`` of a tensor) made by this
    project's code, with the update the loop was at."""

    METHODS = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch, state: EpochState):
        self.reads = []
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name), name, state))

    def _counting(self, original, name, state):
        reads = self.reads

        def method(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            # Ours only: e.g. the CPU AdamW reads its step counter, a CPU tensor even on a GPU run.
            if caller.startswith(REPO) and os.sep + "tests" + os.sep not in caller:
                reads.append((state.update, name, caller))
            return original(tensor, *args, **kwargs)
        return method


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_no_host_sync_between_progress_lines_and_saves(dtype, monkeypatch):
    """Updates that neither print nor save read nothing from the device (float16 included: the skipped-step
    count stays on the device until the next progress line)."""
    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=16, depths=(2, 2),
                            num_heads=(2, 4), window_size=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = CosineLRScheduler(optimizer, t_initial=20, t_in_epochs=False)
    precision = Precision(enabled=dtype != torch.float32, dtype=dtype)
    ema = ModelEmaV3(model, decay=0.9)
    parts = TrainParts(model=model, criterion=nn.CrossEntropyLoss(), optimizer=optimizer, lr_scheduler=scheduler,
                       scaler=torch.amp.GradScaler("cpu") if precision.needs_scaler else None, model_ema=ema,
                       clip_grad=5.0, accumulation_steps=2)
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(16)]
    state = EpochState(epoch=0, updates_per_epoch=8)
    saved = []
    reads = DeviceReads(monkeypatch, state).reads
    train_one_epoch(parts, batches, state, torch.device("cpu"), precision, print_freq=4, num_batches=16,
                    save_due=lambda s: s.update == 6, save=lambda s: saved.append(s.update))
    monkeypatch.undo()
    assert saved == [6]
    sync_updates = {4, 6, 8}  # progress lines at 4 and 8 (the last), a save at 6
    assert reads, "the loop must read its loss at progress lines"
    stray = [r for r in reads if r[0] not in sync_updates]
    assert not stray, f"device reads outside progress lines and saves: {stray}"


def test_skipped_float16_steps_are_counted_and_stop_the_run():
    """With the scale read only at sync points, skipped steps are still counted and the limit still applies."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = CosineLRScheduler(optimizer, t_initial=20, t_in_epochs=False)

    class InfGrad(nn.Module):
        """A finite float32 loss whose float16 gradients overflow, so the scaler skips every step."""

        def forward(self, logits, targets):
            return nn.functional.cross_entropy(logits.float(), targets) * 1e30

    parts = TrainParts(model=model, criterion=InfGrad(), optimizer=optimizer, lr_scheduler=scheduler,
                       scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), max_skipped_steps=3)
    batches = [(torch.randn(2, 4), torch.randint(0, 3, (2,))) for _ in range(8)]
    state = EpochState(epoch=0, updates_per_epoch=8)
    with pytest.raises(NonFiniteLossError, match="float16 steps in a row were skipped"):
        train_one_epoch(parts, batches, state, torch.device("cpu"), Precision(True, torch.float16), print_freq=5,
                        num_batches=8)
    assert state.update == 5 and state.skipped_total == 5
