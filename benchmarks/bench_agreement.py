"""What agreeing on the stop flag costs a training update, with 2 and 4 processes (gloo control group).

    python benchmarks/bench_agreement.py                       # 2 and 4 processes, 300 updates of 18.3 ms
    python benchmarks/bench_agreement.py --processes 2 --step-ms 59

Every update of a run ends with ``preemption.StopSignals.stop_now()``, so that all processes stop after the same
update. This runs that call after each of ``--updates`` simulated updates (a sleep of ``--step-ms``: the host
waiting for the device, as in a GPU step, ended by a small all-reduce that keeps the processes in step as the
gradient all-reduce does) under torchrun, and reports the time spent in it per update, as a
share of the step: ``interval``, what the loop does (an agreement about every ``preemption.AGREEMENT_INTERVAL``
seconds, started at one and read at the next), beside ``async each update`` (an agreement started after every
update, read after the next) and ``blocking each update`` (a round trip after every update, what it replaced). 18.3 ms is a Swin-T step at batch 128 and 7,000 img/s (the speed
goal on one H100-class GPU); 59 ms is the measured eager step on the H200 (2,160 img/s, GPU_FACTS.md).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args: argparse.Namespace) -> int:
    sys.path.insert(0, REPO)
    import torch
    import torch.distributed as dist

    from preemption import StopSignals
    from utils import (exit_process, get_rank, init_distributed, max_over_processes, shutdown_distributed,
                       start_max_over_processes)

    init_distributed()
    step = args.step_ms / 1000
    results = {}
    for name in ("interval", "async each update", "blocking each update"):
        stop = StopSignals()
        pending = None
        spent = []
        max_over_processes(0)  # line the processes up before timing
        gradients = torch.zeros(16)
        for _ in range(args.updates):
            time.sleep(step)
            dist.all_reduce(gradients)
            started = time.perf_counter()
            if name == "interval":
                stop.stop_now()
            elif name == "async each update":
                if pending is not None:
                    pending()
                pending = start_max_over_processes([stop.received])
            else:
                max_over_processes(stop.received)
            spent.append(time.perf_counter() - started)
        for left in (stop._pending, pending):
            if left is not None:
                left()
        results[name] = {"mean_us": statistics.mean(spent) * 1e6, "median_us": statistics.median(spent) * 1e6,
                         "p99_us": sorted(spent)[int(0.99 * (len(spent) - 1))] * 1e6}
    if get_rank() == 0:
        with open(args.worker_json, "w") as f:
            json.dump(results, f)
    shutdown_distributed()
    exit_process(0)
    return 0


def run(processes: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "result.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(29700 + processes), os.path.abspath(__file__), "--worker-json", output,
                   "--updates", str(args.updates), "--step-ms", str(args.step_ms)]
        subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL)
        with open(output) as f:
            return json.load(f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="2,4", help="comma-separated process counts")
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--step-ms", type=float, default=18.3, help="simulated update, in milliseconds")
    parser.add_argument("--worker-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_json:
        return worker(args)
    print(f"stop agreement per update, {args.updates} updates of {args.step_ms} ms (rank 0; gloo on this host)")
    print("| processes | agreement | mean µs | median µs | p99 µs | share of the step |")
    print("|---|---|---|---|---|---|")
    for processes in (int(p) for p in args.processes.split(",")):
        for name, figures in run(processes, args).items():
            print(f"| {processes} | {name} | {figures['mean_us']:.0f} | {figures['median_us']:.0f} | "
                  f"{figures['p99_us']:.0f} | {figures['mean_us'] / (args.step_ms * 10):.3f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
