"""What the README promises about a run's set-up: pinned dependencies, the absolute output folder, memory figures."""
import os
from importlib.metadata import version

import pytest
import torch
from packaging.requirements import Requirement

import main as driver
from engine import _memory_mb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml")


def requirements() -> dict:
    found = {}
    with open(os.path.join(REPO, "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                requirement = Requirement(line)
                found[requirement.name.lower()] = requirement.specifier
    return found


@pytest.mark.parametrize("name", ["timm", "pillow"])
def test_requirements_pin_the_tested_range(name):
    """A fresh install gets what the suite runs with; data/transforms.py patches a timm 1.0.31 + Pillow 13 clash."""
    specifier = requirements()[name]
    assert any(spec.operator in ("<", "==", "~=") for spec in specifier), f"{name} has no upper bound: {specifier}"
    assert specifier.contains(version(name)), f"installed {name} {version(name)} is outside {specifier}"


def test_torch_pins_are_kept():
    found = requirements()
    assert (str(found["torch"]), str(found["torchvision"])) == ("==2.14.1", "==0.29.1")


def test_cpu_memory_column_is_the_peak_resident_set():
    memory = _memory_mb(torch.device("cpu"))
    if os.path.exists("/proc/self/statm"):
        resident_pages = int(open("/proc/self/statm").read().split()[1])
        assert memory >= resident_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20 * 0.99  # the peak is at least now
    assert 50 < memory < 1e6  # torch alone takes more than 50 MB; megabytes, not kilobytes or bytes


def test_log_names_the_absolute_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the current folder
    assert driver.cli(["--cfg", DEMO, "--output", "relative_out", "--data-path", "nowhere", "--throughput",
                       "--batch-size", "2"]) == 0
    run_dir = tmp_path / "relative_out" / "swin_micro_digits" / "default"
    assert f"output folder {run_dir}\n" in (run_dir / "log_throughput_rank0.txt").read_text()
