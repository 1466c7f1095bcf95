"""One process of the 2-process tests in test_multiprocess.py (run under torchrun on gloo).

``python -m torch.distributed.run --nproc_per_node 2 tests/launch_worker.py MODE OUT_DIR [main.py arguments]``:

- ``digits_late``: rank 1 looks for the digits demo set only after rank 0 has prepared it (``OUT_DIR/digits``),
  then both meet in two more collectives; each rank writes ``OUT_DIR/rank{N}.json``;
- ``fail_save``: ``main.cli`` with rank 0's checkpoint write failing (a full disk);
- ``fail_in_loop``: ``main.cli`` with rank 1 stopping at its third micro-batch with a data error of its own.
"""
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import checkpoint  # noqa: E402
import engine  # noqa: E402
import main as driver  # noqa: E402
from data.build import _prepare_digits_once  # noqa: E402
from data.digits import digits_ready  # noqa: E402
from data.errors import DataError  # noqa: E402
from utils import barrier, exit_process, get_rank, init_distributed, max_over_processes  # noqa: E402

FAILING_STEP = 3
SAVE_FAILURE = "could not write checkpoint (test): [Errno 28] No space left on device"
LOOP_FAILURE = "test: 5 of the 7 images read in this process could not be decoded"


def digits_late(out_dir: str) -> int:
    init_distributed()
    root = os.path.join(out_dir, "digits")
    if get_rank() == 1:
        deadline = time.time() + 300
        while not digits_ready(root) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    _prepare_digits_once(root)
    barrier()
    agreed = max_over_processes(get_rank() + 1)
    with open(os.path.join(out_dir, f"rank{get_rank()}.json"), "w") as f:
        json.dump({"agreed": agreed, "ready": digits_ready(root)}, f)
    return 0


def failing_save(*args, **kwargs):
    raise checkpoint.CheckpointError(SAVE_FAILURE)


def failing_micro_step(original):
    calls = [0]

    def micro_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == FAILING_STEP:
            raise DataError(LOOP_FAILURE)
        return original(*args, **kwargs)

    return micro_step


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    if mode == "digits_late":
        exit_process(digits_late(out))
    if mode == "fail_save" and rank == 0:
        checkpoint.save_checkpoint = failing_save
    if mode == "fail_in_loop" and rank == 1:
        engine.micro_step = failing_micro_step(engine.micro_step)
    exit_process(driver.cli(sys.argv[3:]))
