"""SIGTERM / SIGUSR1 (preemption) and Ctrl-C: stop after the current update, save the exact position, exit with
128 + the signal number, and resume exactly."""
import os
import signal
import subprocess
import time

import pytest

from tests.test_resilience import RUN, REPO, assert_same_training, command, environment, losses, run_to_end

# Checkpoints at epoch ends only: the position a stop leaves must come from the stop itself.
NO_PERIODIC_SAVES = ["TRAIN.SAVE_ITERS", "0", "DATA.NUM_WORKERS", "2"]


def signal_when_logged(cmd, log_path, step, signum):
    """Starts ``cmd`` in a session of its own and, once ``step`` updates are logged, sends ``signum`` to its
    whole process group (loader workers included), as a terminal's Ctrl-C or a scheduler does."""
    process = subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if os.path.exists(log_path) and len(losses(log_path)) >= step:
            os.killpg(process.pid, signum)
            break
        if process.poll() is not None:
            pytest.fail("the run ended before the signal was sent")
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_the_position_and_the_rerun_matches_an_uninterrupted_run(digits_root, tmp_path):
    run_to_end(command(tmp_path / "straight", digits_root, NO_PERIODIC_SAVES))
    run_dir = tmp_path / "stopped" / RUN
    status, stdout, stderr = signal_when_logged(command(tmp_path / "stopped", digits_root, NO_PERIODIC_SAVES),
                                                run_dir / "log_rank0.txt", 7, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr, stderr
    stop_lines = [line for line in stdout.splitlines() if "stopped by SIGTERM at epoch 0 update" in line]
    assert len(stop_lines) == 1, stdout[-3000:]
    assert "Run the same command again to resume" in stop_lines[0]
    saved = [f for f in os.listdir(run_dir) if f.startswith("ckpt_epoch_0_step_")]
    assert len(saved) == 1 and saved[0] in stop_lines[0]
    result = run_to_end(command(tmp_path / "stopped", digits_root, NO_PERIODIC_SAVES))
    assert "continuing at epoch 0, update" in result.stdout
    assert_same_training(tmp_path / "straight" / RUN, run_dir)


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_exit_status_130_and_no_traceback(digits_root, tmp_path):
    run_dir = tmp_path / RUN
    status, stdout, stderr = signal_when_logged(command(tmp_path, digits_root, NO_PERIODIC_SAVES),
                                                run_dir / "log_rank0.txt", 5, signal.SIGINT)
    assert status == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert len([line for line in stdout.splitlines() if "stopped by SIGINT at epoch 0 update" in line]) == 1
    assert any(f.startswith("ckpt_epoch_0_step_") for f in os.listdir(run_dir))
