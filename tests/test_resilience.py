"""Crash safety: kill-and-resume proofs, non-finite losses, a full disk, and hostile input."""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import main as driver
from checkpoint import CheckpointError, atomic_torch_save, load_checkpoint_file, read_manifest, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml")
RUN = os.path.join("swin_micro_digits", "default")
SMALL = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]",
         "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1", "TRAIN.SAVE_ITERS", "1", "TRAIN.EPOCHS", "2",
         "TRAIN.WARMUP_EPOCHS", "1"]
PROGRESS = re.compile(r"Train: \[(\d+)\]\[(\d+)/\d+\] .* loss ([0-9.naninf]+) ")


def command(output, digits_root, extra=(), launcher=None):
    prefix = launcher or [sys.executable, "main.py"]
    return prefix + ["--cfg", DEMO, "--data-path", digits_root, "--output", str(output), "--opts"] + SMALL + list(extra)


def environment():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def losses(log_path):
    """(epoch, batch) -> loss from a log; after a resume, the later line for a step wins."""
    found = {}
    with open(log_path) as f:
        for line in f:
            match = PROGRESS.search(line)
            if match:
                found[(int(match.group(1)), int(match.group(2)))] = match.group(3)
    return found


def final_weights(run_dir):
    return load_checkpoint_file(os.path.join(run_dir, "ckpt_epoch_1.pth"))["model"]


def run_to_end(cmd):
    result = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def kill_when_logged(cmd, log_path, step, pid_of=None):
    """Starts ``cmd`` and SIGKILLs it (or the process whose pid ``pid_of`` reads) once ``step`` updates are logged.

    What the run prints goes to ``console.txt`` in its ``--output`` folder (see :func:`console_tail`).
    """
    output = cmd[cmd.index("--output") + 1]
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "console.txt"), "w") as console:
        process = subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=console, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    process.console = console.name
    deadline = time.time() + 600
    while time.time() < deadline:
        if os.path.exists(log_path) and len(losses(log_path)) >= step:
            victim = pid_of(log_path) if pid_of else process.pid
            os.kill(victim, signal.SIGKILL)
            break
        if process.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    return process


def console_tail(process) -> str:
    """The end of what a run started by :func:`kill_when_logged` printed, for a failure's message."""
    with open(process.console) as f:
        return f.read()[-4000:]


def assert_same_training(straight_dir, resumed_dir, log_name="log_rank0.txt"):
    expected, resumed = losses(os.path.join(straight_dir, log_name)), losses(os.path.join(resumed_dir, log_name))
    assert expected == resumed
    reference, weights = final_weights(straight_dir), final_weights(resumed_dir)
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_sigkill_at_a_random_step_then_auto_resume_is_exact(digits_root, tmp_path, pipeline):
    # Loader worker processes too: each sample's augmentation must not depend on which worker made it.
    options = ["DATA.NUM_WORKERS", "2", "DATA.PIPELINE", pipeline]
    run_to_end(command(tmp_path / "straight", digits_root, options))
    step = random.Random().randint(3, 40)
    resumed_dir = tmp_path / "killed" / RUN
    process = kill_when_logged(command(tmp_path / "killed", digits_root, options), resumed_dir / "log_rank0.txt",
                               step)
    assert process.wait(timeout=60) == -signal.SIGKILL, console_tail(process)
    result = run_to_end(command(tmp_path / "killed", digits_root, options))
    assert "continuing at epoch" in result.stdout
    assert_same_training(tmp_path / "straight" / RUN, resumed_dir)
    # --eval of the last checkpoint gives the accuracy the run logged for it.
    run_to_end(command(tmp_path / "eval", digits_root, options) + ["--eval", "--resume",
                                                                   str(resumed_dir / "ckpt_epoch_1.pth")])
    with open(resumed_dir / "metrics.jsonl") as f:
        logged = json.loads(f.readlines()[-1])
    with open(tmp_path / "eval" / RUN / "eval.json") as f:
        assert json.load(f)["acc1"] == logged["val_acc1"]


def rank_pid(rank):
    def read(log_path):
        with open(str(log_path).replace("log_rank0", f"log_rank{rank}")) as f:
            return int(re.search(r"\(pid (\d+)\)", f.read()).group(1))
    return read


@pytest.mark.slow
def test_torchrun_restarts_after_one_rank_is_killed_and_resumes_exactly(digits_root, tmp_path):
    def launcher(port):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
                "--master_port", str(port), "main.py"]

    run_to_end(command(tmp_path / "straight", digits_root, launcher=launcher(29531)))
    step = random.Random().randint(3, 16)
    resumed_dir = tmp_path / "killed" / RUN
    process = kill_when_logged(command(tmp_path / "killed", digits_root, launcher=launcher(29532)),
                               resumed_dir / "log_rank0.txt", step, pid_of=rank_pid(1))
    assert process.wait(timeout=600) == 0, "torchrun should restart the group and finish:\n" + console_tail(process)
    with open(resumed_dir / "log_rank1.txt") as f:
        assert "continuing at epoch" in f.read()
    assert_same_training(tmp_path / "straight" / RUN, resumed_dir)


def snapshot(folder):
    """Hash of every file below ``folder``."""
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith("log_rank"):
                continue  # logs are appended to, by design
            with open(path, "rb") as f:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def trained_template(digits_root, tmp_path_factory):
    output = tmp_path_factory.mktemp("trained")
    assert driver.cli(["--cfg", DEMO, "--data-path", digits_root, "--output", str(output), "--opts"] + SMALL
                      + ["TRAIN.EPOCHS", "1", "TRAIN.SAVE_ITERS", "0"]) == 0
    return output


@pytest.fixture
def trained_run(trained_template, tmp_path):
    """A copy of an output folder holding one finished epoch of the small model, to check that failures
    leave it intact."""
    output = tmp_path / "run"
    shutil.copytree(trained_template, output)
    return output


def fails_with(argv, message, capsys, output=None):
    before = snapshot(output) if output else None
    assert driver.cli(argv) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    if output:
        assert snapshot(output) == before, "a failed start changed the output folder"
    return error


def test_non_finite_loss_stops_with_epoch_step_and_last_good_checkpoint(digits_root, tmp_path, capsys):
    argv = ["--cfg", DEMO, "--data-path", digits_root, "--output", str(tmp_path), "--disable_amp", "--opts"] + SMALL \
        + ["TRAIN.BASE_LR", "1e32", "TRAIN.WARMUP_EPOCHS", "0"]
    error = fails_with(argv, r"non-finite loss in epoch 0, at or before update \d+", capsys)
    match = re.search(r"Last good checkpoint: (\S+);", error)
    assert match, error
    checkpoint = load_checkpoint_file(match.group(1))
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_float16_stops_after_too_many_skipped_steps(digits_root, tmp_path, capsys):
    argv = ["--cfg", DEMO, "--data-path", digits_root, "--output", str(tmp_path), "--amp-dtype", "float16",
            "--opts"] + SMALL + ["TRAIN.BASE_LR", "1e32", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.MAX_SKIPPED_STEPS", "2"]
    fails_with(argv, r"3 float16 steps in a row were skipped", capsys)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint({"epoch": 0, "weights": torch.ones(3)}, str(tmp_path), 0, 0, True, keep=3)
    before = snapshot(tmp_path)
    # Writes through this link hit /dev/full and fail with ENOSPC, as on a full disk.
    os.symlink("/dev/full", tmp_path / "ckpt_epoch_1.pth.tmp")
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*ckpt_epoch_1.pth: .*No space left"):
        save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, str(tmp_path), 1, 0, True, keep=3)
    assert snapshot(tmp_path) == before
    assert [e["file"] for e in read_manifest(str(tmp_path))] == ["ckpt_epoch_0.pth"]


def test_unwritable_output_path_names_the_path(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(CheckpointError, match="not_a_folder"):
        atomic_torch_save({"x": 1}, str(blocker / "ckpt.pth"))


def base_argv(digits_root, output):
    return ["--cfg", DEMO, "--data-path", digits_root, "--output", str(output)]


def test_unknown_key_in_a_config_file(tmp_path, capsys, digits_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"BASE: ['{DEMO}']\nTRAIN:\n  EPOCHZ: 3\n")
    fails_with(["--cfg", str(bad), "--output", str(tmp_path)], r"bad.yaml: unknown config key TRAIN.EPOCHZ", capsys)


def test_wrong_value_type(trained_run, capsys, digits_root):
    fails_with(base_argv(digits_root, trained_run) + ["--opts", "TRAIN.EPOCHS", "many"],
               r"TRAIN.EPOCHS must be of type int", capsys, trained_run)


def test_missing_base_file(tmp_path, capsys):
    bad = tmp_path / "child.yaml"
    bad.write_text("BASE: ['parent.yaml']\n")
    fails_with(["--cfg", str(bad)], r"config file not found: .*parent.yaml \(listed in BASE of", capsys)


def test_missing_data_folder(trained_run, capsys, tmp_path):
    fails_with(base_argv(str(tmp_path / "nowhere"), trained_run) + ["--opts", "DATA.PREPARE_DIGITS", "False"]
               + SMALL, r"nowhere", capsys, trained_run)


def copy_digits(digits_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(os.path.join(digits_root, "train"), root / "train")
    shutil.copytree(os.path.join(digits_root, "val"), root / "val")
    return root


def test_empty_class_folder(trained_run, capsys, tmp_path, digits_root):
    root = copy_digits(digits_root, tmp_path)
    for image in (root / "train" / "3").iterdir():
        image.unlink()
    fails_with(base_argv(str(root), trained_run) + ["--opts", "DATA.PREPARE_DIGITS", "False"] + SMALL,
               r"3", capsys, trained_run)


def test_class_count_mismatch(trained_run, capsys, digits_root):
    fails_with(base_argv(digits_root, trained_run) + ["--opts", "MODEL.NUM_CLASSES", "12"] + SMALL,
               r"12.*10|10.*12", capsys, trained_run)


@pytest.mark.parametrize("batch", ["0", "-8"])
def test_non_positive_batch_size(trained_run, capsys, digits_root, batch):
    fails_with(base_argv(digits_root, trained_run) + ["--batch-size", batch] + ["--opts"] + SMALL,
               r"DATA.BATCH_SIZE must be a positive number", capsys, trained_run)


def test_resume_from_a_missing_path(trained_run, capsys, digits_root):
    fails_with(base_argv(digits_root, trained_run) + ["--resume", "/nowhere/ckpt.pth", "--opts"] + SMALL,
               r"checkpoint not found: /nowhere/ckpt.pth", capsys, trained_run)


def test_resume_from_a_truncated_checkpoint(trained_run, capsys, digits_root, tmp_path):
    source = os.path.join(trained_run, RUN, "ckpt_epoch_0.pth")
    truncated = tmp_path / "truncated.pth"
    with open(source, "rb") as f:
        truncated.write_bytes(f.read()[:5000])
    fails_with(base_argv(digits_root, trained_run) + ["--resume", str(truncated), "--opts"] + SMALL,
               r"truncated or corrupt", capsys, trained_run)


def test_resume_from_another_architecture(trained_run, capsys, digits_root):
    source = os.path.join(trained_run, RUN, "ckpt_epoch_0.pth")
    fails_with(base_argv(digits_root, trained_run) + ["--resume", source, "--opts"] + SMALL
               + ["MODEL.SWIN.EMBED_DIM", "24"], r"MODEL.SWIN.EMBED_DIM is 24 but the checkpoint was trained with 16, "
               r"and its weights do not fit this model", capsys, trained_run)


def test_resume_from_a_pickle_that_runs_code(trained_run, capsys, digits_root, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned > /tmp/owned_by_pickle",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    fails_with(base_argv(digits_root, trained_run) + ["--resume", str(evil), "--opts"] + SMALL,
               r"arbitrary code", capsys, trained_run)
    assert not os.path.exists("/tmp/owned_by_pickle")


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(trained_run, digits_root):
    run_dir = os.path.join(trained_run, RUN)
    valid = os.path.join(run_dir, "ckpt_epoch_0.pth")
    newest = save_checkpoint(load_checkpoint_file(valid), run_dir, 0, 5, False, keep=5)
    with open(newest, "rb") as f:
        data = f.read()
    with open(newest, "wb") as f:
        f.write(data[:4000])
    assert driver.cli(base_argv(digits_root, trained_run) + ["--opts"] + SMALL + ["TRAIN.EPOCHS", "1"]) == 0
    with open(os.path.join(run_dir, "log_rank0.txt")) as f:
        log = f.read()
    assert re.search(r"cannot resume from .*ckpt_epoch_0_step_5.pth: .*truncated or corrupt", log)
    assert f"resumed weights from {valid}" in log
