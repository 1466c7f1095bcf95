"""One run per output folder: a second run stops at once naming the holder; a killed holder frees the folder."""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from config import ConfigError
from utils import RUN_LOCK, run_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml")
RUN = os.path.join("swin_micro_digits", "default")


TRY_LOCK = "import sys\nfrom utils import run_lock\nwith run_lock(sys.argv[1]):\n    print('locked')\n"


def try_lock(folder):
    """Another process's attempt to hold ``folder``: its stdout and stderr."""
    result = subprocess.run([sys.executable, "-c", TRY_LOCK, str(folder)], cwd=REPO, capture_output=True, text=True,
                            env=environment(), timeout=120)
    return result.stdout + result.stderr


def test_a_held_folder_is_refused_naming_the_holder_and_freed_at_the_end(tmp_path):
    with run_lock(str(tmp_path)):
        holder = f"pid {os.getpid()} on host {socket.gethostname()}"
        assert re.search(rf"ConfigError: the output folder {tmp_path} is in use by another run: {holder}, started "
                         r"\S+ \(lock file run.lock\); wait for it to end, or give another --tag or --output",
                         try_lock(tmp_path)), try_lock(tmp_path)
        assert (tmp_path / RUN_LOCK).exists()
    assert not (tmp_path / RUN_LOCK).exists(), "a run that ended left its lock file behind"
    assert try_lock(tmp_path).strip() == "locked"


def test_forked_children_of_a_killed_holder_do_not_keep_the_lock(tmp_path):
    """Loader workers are forked from the run; when the run is killed they live on for a few seconds."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\nfrom utils import run_lock\nwith run_lock(sys.argv[1]):\n"
                               "    child = os.fork()\n    if child == 0:\n        time.sleep(120)\n        os._exit(0)\n"
                               "    print(child, flush=True)\n    time.sleep(120)\n", str(tmp_path)],
        cwd=REPO, env=environment(), stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        assert "in use by another run" in try_lock(tmp_path)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the forked child still lives
        assert try_lock(tmp_path).strip() == "locked"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_only_rank_0_takes_the_lock(tmp_path):
    with run_lock(str(tmp_path), rank=1):  # not distributed here: stands for another rank of a job
        assert try_lock(tmp_path).strip() == "locked"


def driver(output, data, *flags):
    return [sys.executable, "main.py", "--cfg", DEMO, "--output", str(output), "--data-path", str(data), *flags]


def hold(folder) -> subprocess.Popen:
    """Another process that takes the lock main.py takes on ``folder`` and then hangs like a long training run."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom utils import run_lock\nwith run_lock(sys.argv[1]):\n"
                               "    print('locked', flush=True)\n    time.sleep(600)\n", str(folder)],
        cwd=REPO, env=environment(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_a_second_run_stops_naming_the_holder_until_the_holder_is_killed(tmp_path):
    run_dir = tmp_path / "out" / RUN
    run_dir.mkdir(parents=True)
    holder = hold(run_dir)
    try:
        data = tmp_path / "no_data_here"  # the demo config would prepare the digits there: it must not get that far
        second = subprocess.run(driver(tmp_path / "out", data), cwd=REPO, env=environment(), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stdout, second.stderr
        assert re.search(rf"output folder {run_dir} is in use by another run: pid {holder.pid} on host "
                         rf"{re.escape(socket.gethostname())}", lines[0]), lines[0]
        assert not data.exists()
        assert not (run_dir / "log_rank0.txt").exists(), "the refused run wrote into the folder"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (run_dir / RUN_LOCK).exists()  # a killed run cannot clean up; the OS released its lock all the same
    # The next run holds the folder (and stops at the missing data, releasing it again).
    again = subprocess.run(driver(tmp_path / "out", tmp_path / "no_data_here"), cwd=REPO, env=environment(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "no_data_here" in again.stderr and "in use" not in again.stderr, again.stderr
    assert not (run_dir / RUN_LOCK).exists()


def test_throughput_measures_while_a_run_holds_the_folder(tmp_path, capsys):
    """--throughput reads and replaces nothing of a run: it takes no hold on the folder and logs to its own file."""
    import main

    run_dir = tmp_path / "out" / RUN
    run_dir.mkdir(parents=True)
    holder = hold(run_dir)
    try:
        assert main.cli(["--cfg", DEMO, "--output", str(tmp_path / "out"), "--throughput", "--batch-size", "2",
                         "--opts", "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.NUM_HEADS", "[1, 2, 4]"]) == 0
        assert (run_dir / "throughput.json").exists() and (run_dir / "log_throughput_rank0.txt").exists()
        assert not (run_dir / "log_rank0.txt").exists()
        assert "in use" not in capsys.readouterr().err
        assert "started" in (run_dir / RUN_LOCK).read_text()  # still the holder's
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
