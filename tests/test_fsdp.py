"""Sharded data parallel (TRAIN.FSDP): equal to DDP, sharded checkpoints across process counts, export, kill-resume.

The 2-process parts run under torchrun on gloo (tests/fsdp_worker.py), on the CPU.
"""
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint_file, read_manifest, resume_training
from config import load_config
from lr_scheduler import build_scheduler
from models import build_model
from models.state_dict import load_state_dict_checked
from optimizer import build_optimizer
from tests.test_distributed_health import free_port
from tests.test_resilience import (REPO, RUN, command, console_tail, environment, kill_when_logged, losses, rank_pid,
                                   run_to_end)

WORKER = os.path.join(REPO, "tests", "fsdp_worker.py")
EXPORT = os.path.join(REPO, "tools", "export_fsdp_checkpoint.py")
sys.path.insert(0, os.path.join(REPO, "tests"))
from fsdp_worker import MICRO  # noqa: E402


def run_worker(mode: str, out_dir, *extra: str) -> list:
    command_line = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), WORKER, mode, str(out_dir), *extra]
    result = subprocess.run(command_line, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(2)]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """DDP and FSDP (with gradient checkpointing) trained alike on 2 processes, and the FSDP run's checkpoint."""
    out = tmp_path_factory.mktemp("fsdp_compare")
    return out, run_worker("compare", out, "TRAIN.USE_CHECKPOINT", "True")


@pytest.mark.slow
def test_fsdp_updates_equal_ddp_updates(compared):
    """Accumulation (no reduction on the first micro-step), clipping at the global norm, layer decay, EMA and
    per-block gradient checkpointing give the weights DDP gives, while each process holds half of them."""
    _, results = compared
    for rank, result in enumerate(results):
        assert result["sharded"], f"rank {rank}: the model was not sharded"
        assert result["local_numel"] < 0.6 * result["numel"], result
        assert result["max_weight_diff"] < 1e-6, result
        assert result["max_ema_diff"] < 1e-6, result
        assert result["moved"] > 1e-5, result  # the EMA lags the weights, so the comparisons are not vacuous
        assert result["losses"][0] == pytest.approx(result["losses"][1], abs=1e-6)
        assert result["grad_norms"][0] == pytest.approx(result["grad_norms"][1], rel=1e-5)
    assert results[0]["grad_norms"] == results[1]["grad_norms"], "the logged norm must be the global one"


def one_process_config(checkpoint: str, fsdp: bool):
    return load_config(None, opts=MICRO + ["MODEL.RESUME", checkpoint, "TRAIN.FSDP", str(fsdp),
                                           "TRAIN.USE_CHECKPOINT", "True"])


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp_flag", "plain"])
def test_two_process_sharded_checkpoint_resumes_on_one_process(compared, fsdp):
    out, results = compared
    checkpoint = results[0]["checkpoint"]
    assert sorted(os.listdir(checkpoint)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pth"]
    expected = torch.load(os.path.join(out, "expected.pth"), weights_only=True)
    config = one_process_config(checkpoint, fsdp)
    model = build_model(config)
    from timm.utils import ModelEmaV3
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = build_optimizer(config, model, torch.device("cpu"))
    scheduler = build_scheduler(config, optimizer, 100)
    state, path = resume_training(config, model, optimizer, scheduler, None, ema, updates_per_epoch=100,
                                  batches_per_epoch=200)
    assert path == checkpoint
    # 1024 images done by 2 processes x 2 micro-batches x 128; one process now: 4 updates of 256 images.
    assert (state.epoch, state.update, state.images) == (0, 4, 1024)
    for key, value in expected["model"].items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for key, value in expected["model_ema"].items():
        torch.testing.assert_close(ema.module.state_dict()[key], value, rtol=0, atol=0, msg=key)
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    moments = optimizer.state_dict()["state"]
    for index, name in enumerate(order):
        torch.testing.assert_close(moments[index]["exp_avg"], expected["optimizer"][name]["exp_avg"], rtol=0, atol=0)


@pytest.mark.slow
def test_exported_file_loads_into_the_plain_model_with_the_same_logits(compared, tmp_path):
    out, results = compared
    exported = tmp_path / "exported.pth"
    result = subprocess.run([sys.executable, EXPORT, results[0]["checkpoint"], str(exported)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    weights = load_checkpoint_file(str(exported))
    assert list(weights) == ["model"]
    config = load_config(None, opts=MICRO)
    model, reference = build_model(config).eval(), build_model(config).eval()
    load_state_dict_checked(model, weights["model"])  # strict: every reference key, no others
    reference.load_state_dict(torch.load(os.path.join(out, "expected.pth"), weights_only=True)["model"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)


def test_export_refuses_a_folder_that_is_not_a_sharded_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, EXPORT, str(tmp_path), str(tmp_path / "x.pth")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not a sharded checkpoint folder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_float16_overflow_on_one_process_is_skipped_by_all(tmp_path):
    """The scaler's non-finite check on sharded gradients is agreed: both processes skip the same steps and keep
    identical weights (a process that stepped alone would diverge from its peer)."""
    results = run_worker("fp16", tmp_path)
    assert results[0]["skipped"] == results[1]["skipped"] >= 1, results
    assert results[0]["scale"] == results[1]["scale"]
    assert results[0]["checksum"] == results[1]["checksum"] and results[0]["finite"], results


@pytest.mark.slow
def test_fsdp_kill_mid_epoch_and_auto_resume_gives_the_same_losses(digits_root, tmp_path):
    """2 processes with --fsdp: rank 1 killed mid-epoch, torchrun restarts the group, which resumes from the
    sharded checkpoint on 2 processes; losses match an uninterrupted run step for step, and so do the weights."""
    def launcher():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
                "--master_port", str(free_port()), "main.py", "--fsdp"]

    extra = ["MODEL.EMA.ENABLE", "True"]
    run_to_end(command(tmp_path / "straight", digits_root, extra, launcher=launcher()))
    resumed_dir = tmp_path / "killed" / RUN
    process = kill_when_logged(command(tmp_path / "killed", digits_root, extra, launcher=launcher()),
                               resumed_dir / "log_rank0.txt", random.Random().randint(3, 16), pid_of=rank_pid(1))
    assert process.wait(timeout=600) == 0, "torchrun should restart the group and finish:\n" + console_tail(process)
    with open(resumed_dir / "log_rank1.txt") as f:
        # A kill at the first update of an epoch, before its checkpoint, resumes from the previous epoch's end.
        assert re.search(r"resumed weights from .*ckpt_epoch_\d+(_step_\d+)?\n", f.read())
    straight_dir = tmp_path / "straight" / RUN
    expected, resumed = losses(straight_dir / "log_rank0.txt"), losses(resumed_dir / "log_rank0.txt")
    assert expected == resumed
    assert [e["file"] for e in read_manifest(str(resumed_dir))][-1] == "ckpt_epoch_1"
    reference = load_checkpoint_file(str(straight_dir / "ckpt_epoch_1" / "model.pth"))["model"]
    weights = load_checkpoint_file(str(resumed_dir / "ckpt_epoch_1" / "model.pth"))["model"]
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_fsdp_run_resumes_a_ddp_single_file_checkpoint(tmp_path):
    """Switching a run from DDP to FSDP: the single file's weights, EMA and AdamW moments land in the shards."""
    for rank, result in enumerate(run_worker("from_ddp", tmp_path)):
        assert result["sharded"], rank
        assert result["weight_diff"] == result["ema_diff"] == result["moment_diff"] == 0.0, (rank, result)


@pytest.mark.parametrize("damage", ["truncated", "missing", "metadata", "flipped"])
def test_auto_resume_falls_back_past_a_sharded_checkpoint_with_a_damaged_file(tmp_path, caplog, damage):
    """A shard file copied in part, lost, a damaged DCP metadata, or bytes changed inside a shard (its length kept):
    the newest folder is passed over (the same way on every process, from the metadata, the file sizes and the
    checksums the manifest recorded) and the run resumes from the previous one."""
    from engine import EpochState
    from checkpoint import save_training_checkpoint

    config = load_config(None, opts=MICRO + ["TRAIN.FSDP", "True", "OUTPUT", str(tmp_path)])
    model = build_model(config)
    optimizer = build_optimizer(config, model, torch.device("cpu"))
    scheduler = build_scheduler(config, optimizer, 10)
    saved = []
    for update in (1, 2):
        with torch.no_grad():
            model.head.bias.fill_(update)
        save_training_checkpoint(config, model, optimizer, scheduler, None, None, EpochState(0, 10, update=update),
                                 complete=False)
        saved.append(os.path.join(config.OUTPUT, f"ckpt_epoch_0_step_{update}"))
    newest = saved[1]
    shard = os.path.join(newest, "__0_0.distcp")
    if damage == "truncated":
        os.truncate(shard, os.path.getsize(shard) // 2)
    elif damage == "missing":
        os.remove(shard)
    elif damage == "flipped":
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        with open(os.path.join(newest, ".metadata"), "wb") as f:
            f.write(b"\x80\x04 not a whole pickle")

    resumed = build_model(config)
    resumed_optimizer = build_optimizer(config, resumed, torch.device("cpu"))
    state, path = resume_training(config, resumed, resumed_optimizer, build_scheduler(config, resumed_optimizer, 10),
                                  updates_per_epoch=10, batches_per_epoch=20)
    assert path == saved[0] and state.epoch == 0
    assert torch.equal(resumed.head.bias, torch.full_like(resumed.head.bias, 1.0))
    assert f"cannot resume from {newest}" in caplog.text
    assert {"truncated": "is truncated", "missing": "is missing", "metadata": ".metadata is truncated or corrupt",
            "flipped": "is truncated or corrupt: its file __0_0.distcp has"}[damage] in caplog.text
