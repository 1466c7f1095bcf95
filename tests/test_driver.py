"""main.py end to end on the digits demo: training, exact evaluation, resume, DDP on CPU, throughput."""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml")
# A smaller model than the demo's, for the tests that check mechanics rather than accuracy.
SMALL = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]",
         "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "5"]


def run_main(args, output, cwd=REPO, launcher=(), check=True):
    command = [*launcher] if launcher else [sys.executable, "main.py"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if launcher else os.environ.get(
        "OMP_NUM_THREADS", "2")}
    result = subprocess.run(command + ["--cfg", DEMO, "--output", str(output)] + args, cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"main.py failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, digits_root):
    """The README's main command, once: the full demo recipe on the real digits images."""
    output = tmp_path_factory.mktemp("demo")
    run_main(["--data-path", digits_root], output)
    return os.path.join(output, "swin_micro_digits", "default")


@pytest.mark.slow
def test_demo_trains_to_high_accuracy(demo_run):
    records = read_metrics(demo_run)
    assert len(records) == 30
    assert records[-1]["val_acc1"] >= 95.0, records[-1]
    files = os.listdir(demo_run)
    assert "ckpt_epoch_29.pth" in files and "ckpt_best.pth" in files and "config.yaml" in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    with open(os.path.join(demo_run, "log_rank0.txt")) as f:
        assert " * Acc@1 " in f.read()


@pytest.mark.slow
def test_eval_of_the_checkpoint_is_exact(demo_run, digits_root, tmp_path):
    run_main(["--data-path", digits_root, "--eval", "--resume", os.path.join(demo_run, "ckpt_epoch_29.pth")],
             tmp_path)
    with open(tmp_path / "swin_micro_digits" / "default" / "eval.json") as f:
        metrics = json.load(f)
    last = read_metrics(demo_run)[-1]
    assert metrics["count"] == 300
    assert metrics["acc1"] == last["val_acc1"] and metrics["acc5"] == last["val_acc5"]
    assert metrics["loss"] == pytest.approx(last["val_loss"], rel=1e-6)


def test_throughput_mode_needs_no_data(tmp_path):
    run_main(["--throughput", "--batch-size", "8", "--opts", "DATA.DATA_PATH", str(tmp_path / "nowhere")]
             + SMALL, tmp_path)
    with open(tmp_path / "swin_micro_digits" / "default" / "throughput.json") as f:
        result = json.load(f)
    assert result["batch_size"] == 8 and result["device"] == "cpu"
    assert result["inference_images_per_second"] > 0 and result["train_images_per_second"] > 0


@pytest.mark.slow
def test_resume_continues_at_the_right_epoch_and_learning_rate(digits_root, tmp_path):
    common = ["--data-path", digits_root, "--opts", "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.EPOCHS", "3"] + SMALL
    run_main(common, tmp_path / "straight")
    straight_dir = tmp_path / "straight" / "swin_micro_digits" / "default"
    # The same run as if it had stopped after epoch 1: its last checkpoint and log lines removed.
    resumed_dir = tmp_path / "resumed" / "swin_micro_digits" / "default"
    shutil.copytree(straight_dir, resumed_dir)
    os.remove(resumed_dir / "ckpt_epoch_2.pth")
    with open(resumed_dir / "checkpoints.json") as f:
        manifest = json.load(f)
    manifest["checkpoints"] = [e for e in manifest["checkpoints"] if e["file"] != "ckpt_epoch_2.pth"]
    with open(resumed_dir / "checkpoints.json", "w") as f:
        json.dump(manifest, f)
    with open(resumed_dir / "metrics.jsonl") as f:
        lines = f.readlines()[:2]
    with open(resumed_dir / "metrics.jsonl", "w") as f:
        f.writelines(lines)
    result = run_main(common, tmp_path / "resumed")
    assert "continuing at epoch 2, update 0" in result.stdout
    straight, resumed = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    assert resumed[-1]["train_lr"] == straight[-1]["train_lr"]
    assert resumed[-1]["val_acc1"] == straight[-1]["val_acc1"] and resumed[-1]["val_loss"] == straight[-1]["val_loss"]


@pytest.mark.slow
def test_torchrun_two_processes_matches_single_process_eval(digits_root, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "main.py"]
    common = ["--data-path", digits_root, "--opts", "TRAIN.EPOCHS", "1"] + SMALL
    run_main(common, tmp_path / "ddp", launcher=launcher)
    run_dir = tmp_path / "ddp" / "swin_micro_digits" / "default"
    ddp_metrics = read_metrics(run_dir)[-1]
    assert os.path.exists(run_dir / "log_rank1.txt")
    run_main(["--data-path", digits_root, "--eval", "--resume", str(run_dir / "ckpt_epoch_0.pth"), "--opts"]
             + SMALL, tmp_path / "single")
    with open(tmp_path / "single" / "swin_micro_digits" / "default" / "eval.json") as f:
        single = json.load(f)
    assert single["count"] == ddp_metrics["val_count"] == 300
    assert single["acc1"] == ddp_metrics["val_acc1"] and single["acc5"] == ddp_metrics["val_acc5"]
    assert single["loss"] == pytest.approx(ddp_metrics["val_loss"], rel=1e-5)


def test_bad_config_key_fails_cleanly(tmp_path):
    result = run_main(["--opts", "TRAIN.EPOCHZ", "3"], tmp_path, check=False)
    assert result.returncode == 2
    assert "unknown config key TRAIN.EPOCHZ" in result.stderr
    assert "Traceback" not in result.stderr
