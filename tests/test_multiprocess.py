"""Multi-process paths as NCCL sees them: host-side agreement on a gloo control group whoever made the default group,
evaluation on uneven shards under DDP and FSDP, SimMIM with FSDP, the digits preparation with a late process, and
a failure on one process ending every process promptly with its message.

NCCL takes device tensors only. On the CPU, ``backend="cuda:gloo"`` gives a default group that refuses CPU tensors
with NCCL's own error, which is how the host-side helpers are checked here; whole runs are checked under
``../shared/tools/trace_collectives.py``, which refuses a CPU tensor on the default group unless it would live on the
device in a GPU run.
"""
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from config import load_config
from tests.test_distributed_health import free_port
from tests.test_resilience import DEMO, REPO, RUN, environment, losses

WORKER = os.path.join(REPO, "tests", "launch_worker.py")
TRACE_TOOL = os.path.join(REPO, "..", "shared", "tools", "trace_collectives.py")
MICRO = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]",
         "DATA.NUM_WORKERS", "0", "DATA.PREPARE_DIGITS", "False", "DATA.BATCH_SIZE", "4", "PRINT_FREQ", "2",
         "TRAIN.WARMUP_EPOCHS", "0"]


def torchrun(*arguments: str, port: int = 0) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(port or free_port()), *arguments]


def run(command: list, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=timeout)


def main_args(data: str, output, *opts: str, flags=()) -> list:
    return ["--cfg", DEMO, "--data-path", data, "--output", str(output), *flags, "--opts", *MICRO, *opts]


def read_log(output, rank: int, run_name: str = RUN) -> str:
    with open(os.path.join(str(output), run_name, f"log_rank{rank}.txt")) as f:
        return f.read()


def assert_no_traceback_of_ours(result: subprocess.CompletedProcess) -> None:
    """No process printed a traceback through the project's code (torchrun's own report of a failed worker is one
    of its own) nor a peer's lost connection."""
    output = result.stdout + result.stderr
    assert f'File "{REPO}' not in output and "Connection closed by peer" not in output, output[-3000:]


# --------------------------------------------------------------------------- host-side agreement, one process


@pytest.fixture
def nccl_like_group():
    """A one-process default group that, like NCCL, refuses CPU tensors, initialised by the caller (as a tool that
    joins a group itself does), not by ``init_distributed``."""
    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.zeros(1))  # what the first NCCL run hit
    yield
    from utils import shutdown_distributed

    shutdown_distributed()


def test_host_side_agreement_works_on_a_group_that_refuses_cpu_tensors(nccl_like_group, tmp_path):
    """The stop flag, barriers, the run lock, RNG states and the failure agreement take the gloo control group."""
    from preemption import StopSignals
    from utils import barrier, fail_together, gather_rng_states, init_distributed, max_over_processes, run_lock

    assert init_distributed().type == "cpu"
    assert max_over_processes(3) == 3
    barrier()
    with StopSignals() as stop:
        assert not stop.stop_now()
        assert not stop.stop_now(current=True)
        stop.received = signal.SIGTERM
        assert stop.stop_now() or stop.stop_now()
    with run_lock(str(tmp_path)):
        pass
    assert len(gather_rng_states()) == 1
    with pytest.raises(OSError, match="disk full"):
        with fail_together("writing"):
            raise OSError("disk full")


def test_the_stop_agreement_runs_about_twice_a_second_and_stops_within_two_intervals(nccl_like_group,
                                                                                     monkeypatch):
    """An agreement costs 0.1-0.8 ms of the host's time (benchmarks/bench_agreement.py), 1-3% of a fast GPU update,
    so the processes agree about every AGREEMENT_INTERVAL seconds; a signal still stops them within two intervals."""
    import preemption
    from utils import init_distributed

    init_distributed()
    started = []
    original = preemption.start_max_over_processes
    monkeypatch.setattr(preemption, "start_max_over_processes", lambda values: started.append(1) or original(values))
    update_seconds = 0.005
    expected_every = preemption.AGREEMENT_INTERVAL / update_seconds  # 100 updates
    with preemption.StopSignals() as stop:
        for _ in range(400):
            time.sleep(update_seconds)
            assert not stop.stop_now()
        assert 0.5 * expected_every <= stop._every <= expected_every
        assert len(started) < 20, "an agreement after every update costs 1-3% of a fast update"
        stop.received = signal.SIGTERM
        updates = 1
        while not stop.stop_now():
            time.sleep(update_seconds)
            updates += 1
        assert updates <= 2 * stop._every + 1


def test_under_a_process_group_of_one_the_model_takes_the_multi_process_path(nccl_like_group, monkeypatch):
    """torchrun --nproc_per_node 1 runs what eight processes run (DDP), and DDP broadcasts no buffers in its forward:
    all of them are derived from shapes."""
    from torch.nn.parallel import DistributedDataParallel

    import main as driver

    dist.destroy_process_group()  # a CPU model under DDP needs a default group that takes CPU tensors
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    config = load_config(DEMO, opts=MICRO)
    model, _, train_model = driver.prepare_model(config, torch.device("cpu"))
    assert isinstance(train_model, DistributedDataParallel)
    broadcasts = []
    monkeypatch.setattr(dist, "_broadcast_coalesced", lambda *args, **kwargs: broadcasts.append(args))
    train_model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert broadcasts == []


# --------------------------------------------------------------------------- whole runs, two processes


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory, digits_root):
    """80 training digits and 17 validation digits (9 on rank 0, 8 on rank 1: three and two batches of 4), the
    first of rank 1's batches (validation images 1, 3, 5, 7) unreadable."""
    root = tmp_path_factory.mktemp("uneven") / "digits"
    for split, per_class in (("train", 8), ("val", None)):
        for label in sorted(os.listdir(os.path.join(digits_root, split))):
            os.makedirs(root / split / label)
            count = per_class or (2 if int(label) < 7 else 1)
            for name in sorted(os.listdir(os.path.join(digits_root, split, label)))[:count]:
                shutil.copy(os.path.join(digits_root, split, label, name), root / split / label / name)
    val = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root / "val") for name in names)
    assert len(val) == 17
    for index in (1, 3, 5, 7):
        with open(val[index], "wb") as f:
            f.write(b"not a jpeg")
    return str(root)


def eval_json(output) -> dict:
    with open(os.path.join(str(output), RUN, "eval.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_fsdp_and_ddp_evaluate_uneven_shards_alike_in_float32(uneven_data, tmp_path):
    """Under FSDP every forward of the sharded model was a collective, so 9 images on one process and 8 on the other,
    or a batch of unreadable images, hung it; and it evaluated bfloat16-gathered weights with TEST.AMP_ENABLE False.
    Now the figures of FSDP and DDP are the same exactly."""
    trained = tmp_path / "fsdp"
    result = run(torchrun("main.py", *main_args(uneven_data, trained, "TRAIN.EPOCHS", "1", flags=["--fsdp"])))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint_dir = str(trained / RUN / "ckpt_epoch_0")
    figures = {}
    for name, flags in (("fsdp", ["--fsdp"]), ("ddp", [])):
        output = tmp_path / f"eval_{name}"
        result = run(torchrun("main.py", *main_args(uneven_data, output, "TEST.AMP_ENABLE", "False",
                                                    flags=flags + ["--eval", "--resume", checkpoint_dir])))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        figures[name] = eval_json(output)
    assert figures["fsdp"]["count"] == 13 and figures["fsdp"]["unreadable"] == 4
    assert figures["fsdp"] == figures["ddp"]


@pytest.mark.slow
def test_simmim_pretraining_with_fsdp_draws_its_reconstructions(uneven_data, tmp_path):
    """Only rank 0 draws the reconstruction picture; on the sharded model that was a collective the others missed."""
    config = os.path.join(REPO, "configs", "demo", "simmim_pretrain_swin_micro_digits.yaml")
    output = tmp_path / "simmim"
    result = run(torchrun("main_simmim_pt.py", "--cfg", config, "--data-path", uneven_data, "--output", str(output),
                          "--fsdp", "--opts", "DATA.NUM_WORKERS", "0", "DATA.PREPARE_DIGITS", "False",
                          "DATA.BATCH_SIZE", "8", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = output / "simmim_pretrain_swin_micro_digits" / "default"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    assert "val/reconstruction" in events.Tags()["images"]


@pytest.mark.slow
def test_digits_preparation_with_a_late_process(tmp_path):
    """Each process decided on its own view of the disk whether to wait for the preparation: one that looked after
    rank 0 had finished skipped the barrier rank 0 was waiting in."""
    result = run(torchrun(WORKER, "digits_late", str(tmp_path)), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            assert json.load(f) == {"agreed": 2, "ready": True}


@pytest.mark.slow
def test_a_failed_checkpoint_write_on_rank_0_stops_every_process_with_its_message(uneven_data, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from launch_worker import SAVE_FAILURE

    started = time.time()
    result = run(torchrun(WORKER, "fail_save", "none", *main_args(uneven_data, tmp_path, "TRAIN.EPOCHS", "2",
                                                                  "TRAIN.SAVE_ITERS", "2")))
    assert result.returncode != 0
    assert time.time() - started < 120
    assert SAVE_FAILURE in read_log(tmp_path, 0)
    assert f"process 0 failed while saving a checkpoint: {SAVE_FAILURE}" in read_log(tmp_path, 1)
    assert_no_traceback_of_ours(result)
    assert losses(os.path.join(tmp_path, RUN, "log_rank0.txt")) == {(0, 2): losses(
        os.path.join(tmp_path, RUN, "log_rank0.txt"))[(0, 2)]}, "no process may train past the failed save"


@pytest.mark.slow
def test_a_data_error_on_one_process_in_the_loop_stops_the_others_with_its_message(uneven_data, tmp_path):
    """Rank 1 stops at its third batch while rank 0 goes on into the gradient all-reduce; under NCCL rank 0 would
    wait there for DIST_TIMEOUT (10 minutes). Rank 1 announces its failure, and rank 0 ends at once with it."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from launch_worker import LOOP_FAILURE

    started = time.time()
    result = run(torchrun(WORKER, "fail_in_loop", "none", *main_args(uneven_data, tmp_path, "TRAIN.EPOCHS", "1")))
    assert result.returncode != 0
    assert time.time() - started < 120
    assert LOOP_FAILURE in read_log(tmp_path, 1)
    assert f"process 1: {LOOP_FAILURE}" in read_log(tmp_path, 0)
    assert_no_traceback_of_ours(result)


# --------------------------------------------------------------------------- whole runs under NCCL's rule


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TRACE_TOOL), reason="../shared/tools/trace_collectives.py not beside the checkout")
@pytest.mark.parametrize("flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_under_nccl_rules_train_validate_stop_and_resume(uneven_data, tmp_path, flags):
    """Every collective of a run (training, uneven validation, checkpoints, a SIGTERM stop and the resumed run) is
    recorded, and one with a CPU tensor on the default group fails as under NCCL."""
    env = {**environment(), "TRACE_TAG": "1", "TRACE_EMULATE": "1", "TRACE_DIR": str(tmp_path / "trace")}
    # The unreadable validation images count again at every validation (up to 7 of 11 read on rank 1).
    arguments = main_args(uneven_data, tmp_path / "run", "TRAIN.EPOCHS", "2", "TRAIN.SAVE_ITERS", "50",
                          "DATA.MAX_BAD_FRACTION", "1.0", flags=flags)
    command = torchrun(TRACE_TOOL, "main", *arguments)
    log = tmp_path / "run" / RUN / "log_rank0.txt"
    with open(tmp_path / "console.txt", "w") as console:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.time() + 300
        while not (log.exists() and len(losses(str(log))) >= 2) and time.time() < deadline:
            assert process.poll() is None, open(tmp_path / "console.txt").read()[-3000:]
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)  # what a scheduler sends to every process of the job
        process.wait(timeout=300)
    text = read_log(tmp_path / "run", 0)
    # The processes agree about twice a second: in an epoch this short the stop may come at its end.
    assert re.search(r"stopped by SIGTERM at (epoch 0 update \d+|the end of epoch 0)", text), \
        open(tmp_path / "console.txt").read()[-3000:]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"continuing at epoch [01]", read_log(tmp_path / "run", 0))
    with open(tmp_path / "run" / RUN / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]
