"""compilation.py: TRAIN.COMPILE auto/on/off, the on-disk compile cache, and the warm-up before the first epoch."""
import os
import random

import numpy as np
import pytest
import torch

import compilation
import config as cfg_lib
from tests.test_driver import DEMO, SMALL, read_metrics, run_main


@pytest.mark.parametrize("setting, device, expected", [
    (None, "cpu", False), (None, "cuda", compilation.COMPILE_BY_DEFAULT["cuda"]), (True, "cpu", True),
    (True, "cuda", True), (False, "cuda", False)])
def test_compile_setting_resolves_per_device(setting, device, expected):
    assert compilation.compile_enabled(setting, torch.device(device)) is expected


def test_cpu_runs_keep_eager_by_default():
    config = cfg_lib.load_config(DEMO)
    model = torch.nn.Linear(2, 2)
    assert config.TRAIN.COMPILE is None
    assert compilation.compile_model(model, config, torch.device("cpu")) is model


@pytest.mark.parametrize("key, value, message", [
    ("TRAIN.COMPILE", "maybe", r"TRAIN.COMPILE must be True or False or None; got 'maybe' \(None: auto\)"),
    ("TRAIN.COMPILE_MODE", "fast", "TRAIN.COMPILE_MODE must be one of default, reduce-overhead"),
    ("TRAIN.COMPILE_BACKEND", "nvfuser", "TRAIN.COMPILE_BACKEND must be one of .*inductor")])
def test_bad_compile_settings_fail_with_the_key(key, value, message):
    with pytest.raises(cfg_lib.ConfigError, match=message):
        cfg_lib.load_config(None, opts=[key, value])


def test_compile_cache_goes_to_the_configured_folder_unless_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.delenv(compilation.CACHE_ENV, raising=False)
    assert compilation.configure_cache(str(tmp_path / "cache")) == str(tmp_path / "cache")
    assert os.environ[compilation.CACHE_ENV] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "mine"))
    assert compilation.configure_cache(str(tmp_path / "other")) == str(tmp_path / "mine")
    monkeypatch.delenv(compilation.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.configure_cache("") == str(tmp_path / "xdg" / "swin_transformer" / "inductor")


def test_warm_up_runs_the_step_once_and_changes_no_random_state():
    model = torch.compile(torch.nn.Linear(4, 2), backend="eager")
    calls = []

    def step():
        calls.append(1)
        # Draws from every generator a training step may use (dropout, Mixup's NumPy and Python draws).
        model(torch.randn(3, 4)).sum().backward()
        np.random.rand(), random.random()

    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    result = compilation.warm_up(step, lambda: model.zero_grad(set_to_none=True), torch.device("cpu"))
    assert calls == [1] and result["compile_seconds"] > 0
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
    assert all(p.grad is None for p in model.parameters())
    assert compilation.is_compiled(model) and not compilation.is_compiled(torch.nn.Linear(1, 1))


@pytest.mark.slow
def test_compiled_training_warms_up_first_and_trains_exactly_as_eager(digits_root, tmp_path):
    """TRAIN.COMPILE on: the compile happens (and is logged) before the first epoch, and the warm-up changes nothing:
    the compiled run's losses and accuracies are the eager run's. aot_eager traces the model as inductor would but
    runs the same kernels, so the two runs compute the same numbers (inductor's C++ build takes minutes here)."""
    common = ["--data-path", digits_root, "--opts", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"] + SMALL
    run_main(common, tmp_path / "eager")
    run_main(common + ["TRAIN.COMPILE", "True", "TRAIN.COMPILE_BACKEND", "aot_eager", "TRAIN.COMPILE_CACHE_DIR",
                       str(tmp_path / "cache")], tmp_path / "compiled")
    eager = read_metrics(tmp_path / "eager" / "swin_micro_digits" / "default")
    compiled_dir = tmp_path / "compiled" / "swin_micro_digits" / "default"
    compiled = read_metrics(compiled_dir)
    for key in ("train_loss", "val_loss", "val_acc1"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-5), key
    with open(compiled_dir / "log_rank0.txt") as f:
        log = f.read()
    assert "compiled the training step in" in log
    assert log.index("compiled the training step in") < log.index("training from epoch 0")
