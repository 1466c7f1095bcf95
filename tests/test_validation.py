"""The whole config is checked at start-up, before any data is read: exit 2, one line, no traceback.

Every case points ``--data-path`` at a folder that does not exist (and the demo config would prepare the
digits there): the config error must come first, so the folder must still not exist afterwards.
"""
import os
import re
import subprocess
import sys

import pytest

import main as driver
from config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml")


def start(tmp_path, flags=(), opts=()):
    data = tmp_path / "no_data_here"
    argv = ["--cfg", DEMO, "--data-path", str(data), "--output", str(tmp_path / "out"), *flags]
    return argv + (["--opts", *opts] if opts else []), data


def assert_config_error(argv, data, capsys, message):
    assert driver.cli(argv) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert "\n" not in error, f"not one line: {error!r}"
    assert "Traceback" not in captured.out + captured.err
    assert re.search(message, error), error
    assert not data.exists(), "the data folder was touched before the config was checked"


@pytest.mark.parametrize("flags,opts,message", [
    ((), ["TRAIN.OPTIMIZER.NAME", "bogus"], r"TRAIN\.OPTIMIZER\.NAME .*must be one of adamw, sgd; got 'bogus'"),
    (["--optim", "bogus"], (), r"TRAIN\.OPTIMIZER\.NAME \(--optim\) must be one of adamw, sgd; got 'bogus'"),
    ((), ["TRAIN.LR_SCHEDULER.NAME", "bogus"],
     r"TRAIN\.LR_SCHEDULER\.NAME must be one of cosine, linear, step, multistep; got 'bogus'"),
    ((), ["MODEL.SWIN.DEPTHS", "[2,'a',2]"], r"MODEL\.SWIN\.DEPTHS must be a list of positive integers.*'a'"),
    ((), ["MODEL.SWIN.DEPTHS", "[2,2.5,2]"], r"MODEL\.SWIN\.DEPTHS must be a list of positive integers.*2\.5"),
    ((), ["MODEL.SWIN.NUM_HEADS", "[2,4]"],
     r"MODEL\.SWIN\.DEPTHS \[2, 2, 2\] \(3 stages\) and MODEL\.SWIN\.NUM_HEADS \[2, 4\] \(2 entries\)"),
    ((), ["MODEL.SWIN.NUM_HEADS", "[2,4,7]"], r"MODEL\.SWIN\.NUM_HEADS\[2\] = 7 must divide .* = 256"),
    ((), ["MODEL.TYPE", "vit"], r"MODEL\.TYPE must be one of swin, swin_mlp, swinv2; got 'vit'"),
    ((), ["DATA.IMG_SIZE", "3"], r"DATA\.IMG_SIZE 3 is too small: .*PATCH_SIZE 4 and 3 stages .* at least 16"),
    ((), ["DATA.IMG_SIZE", "15"], r"DATA\.IMG_SIZE 15 is too small"),
    ((), ["TRAIN.EPOCHS", "0"], r"TRAIN\.EPOCHS must be a positive number; got 0"),
    ((), ["TRAIN.EPOCHS", "-3"], r"TRAIN\.EPOCHS must be a positive number; got -3"),
    ((), ["TRAIN.WARMUP_EPOCHS", "-1"], r"TRAIN\.WARMUP_EPOCHS must be 0 or more"),
    ((), ["TRAIN.LR_SCHEDULER.NAME", "step", "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "0"],
     r"TRAIN\.LR_SCHEDULER\.DECAY_EPOCHS must be a positive number"),
    # Values the start-up check let through before it had one entry per key (issue 25).
    ((), ["AUG.MIXUP_MODE", "bogus"], r"AUG\.MIXUP_MODE must be one of batch, pair, elem; got 'bogus'"),
    ((), ["TEST.AMP_ENABLE", "maybe"], r"TEST\.AMP_ENABLE must be True or False or None; got 'maybe'"),
    ((), ["TRAIN.OPTIMIZER.BETAS", "[0.9]"], r"TRAIN\.OPTIMIZER\.BETAS must be a list of 2 numbers; got \[0\.9\]"),
    ((), ["MODEL.DROP_PATH_RATE", "1.5"], r"MODEL\.DROP_PATH_RATE must be at least 0 and below 1; got 1\.5"),
    ((), ["AUG.AUTO_AUGMENT", "garbage"], r"AUG\.AUTO_AUGMENT must be none, or a timm augmentation policy .*'garbage'"),
    ((), ["AUG.REPROB", "2"], r"AUG\.REPROB must be at least 0 and at most 1; got 2\.0"),
    ((), ["TRAIN.EPOCHS", "None"], r"TRAIN\.EPOCHS must be an integer \(not None\); got None"),
    ((), ["TRAIN.OBJECTIVE", "simmim", "DATA.IMG_SIZE", "40", "DATA.MASK_PATCH_SIZE", "8"],
     r"DATA\.IMG_SIZE 40 must be a multiple of 16 for SimMIM: .* e\.g\. --opts DATA\.IMG_SIZE 32 or 48"),
])
def test_bad_value_stops_before_the_data(tmp_path, capsys, flags, opts, message):
    argv, data = start(tmp_path, flags, opts)
    assert_config_error(argv, data, capsys, message)


def test_epochs_do_not_matter_for_eval_and_throughput():
    for mode in ("EVAL_MODE", "THROUGHPUT_MODE"):
        assert load_config(DEMO, opts=["TRAIN.EPOCHS", "0", mode, "True"]).TRAIN.EPOCHS == 0
    with pytest.raises(ConfigError, match="TRAIN.EPOCHS"):
        load_config(DEMO, opts=["TRAIN.EPOCHS", "0"])


def test_optimizer_name_is_case_insensitive_as_in_the_reference():
    assert load_config(DEMO, opts=["TRAIN.OPTIMIZER.NAME", "AdamW"]).TRAIN.OPTIMIZER.NAME == "AdamW"


def test_image_size_at_the_minimum_is_accepted():
    assert load_config(DEMO, opts=["DATA.IMG_SIZE", "16"]).DATA.IMG_SIZE == 16


def test_output_that_is_an_existing_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv, data = start(tmp_path)
    argv[argv.index("--output") + 1] = str(blocker)
    assert_config_error(argv, data, capsys, rf"cannot create or write the run folder {blocker}/\S+: {blocker} is a "
                                            r"file, not a folder\. Give --output")
    assert blocker.read_text() == "not a folder"


def test_output_in_a_place_that_cannot_be_written(tmp_path, capsys):
    # Tests run as root, for whom chmod blocks nothing; /proc refuses new folders to everyone.
    argv, data = start(tmp_path)
    argv[argv.index("--output") + 1] = "/proc/swin_output"
    assert_config_error(argv, data, capsys, r"cannot create or write the run folder /proc/swin_output/\S+: ")


def test_one_line_on_stderr_from_a_real_process(tmp_path):
    argv, data = start(tmp_path, ["--optim", "bogus"])
    result = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: TRAIN.OPTIMIZER.NAME (--optim) must be one of adamw, sgd; got 'bogus'"], result.stderr
    assert "Traceback" not in result.stdout and not data.exists()
