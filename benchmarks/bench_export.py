"""Images/s of a model exported to ONNX and run by onnxruntime against the same model in eager PyTorch, alternated in
one run (float32 inference on the CPU, the same threads for both).

    python benchmarks/bench_export.py                          # Swin-T 224, batch 8, fixed size
    python benchmarks/bench_export.py --dynamic-size            # the ONNX model that takes any image size
    python benchmarks/bench_export.py --cfg configs/swinv2/swinv2_tiny_patch4_window8_256.yaml --batch 4

The model has random weights (speed does not depend on them); the ONNX model is written by the same code as
tools/export.py. Each round times every step (eager: ``torch.no_grad`` with the config's attention choice, which
is SDPA for float32 on the CPU; onnxruntime with all graph optimisations) in a new random order; the table gives
the median seconds per batch, images/s, and the ratio of the medians with the range of the rounds' own ratios.
"""
import argparse
import os
import statistics
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from bench_model import alternate  # noqa: E402
from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.export import export_program, output_names, save_onnx  # noqa: E402
from utils import keep_freed_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=os.path.join(REPO, "configs", "swin", "swin_tiny_patch4_window7_224.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dynamic-size", action="store_true", help="export with a dynamic image size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3, help="batches per step and round")
    args = parser.parse_args()
    import onnxruntime

    keep_freed_memory()  # as main.py does on the CPU: no page faults of freed activations in either runtime
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.cfg)
    model = build_model(config).eval()
    size = config.DATA.IMG_SIZE
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        save_onnx(export_program(model, (size, size), dynamic_size=args.dynamic_size), path, output_names(model))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    images = torch.randn(args.batch, 3, size, size)
    feed = {"images": images.numpy()}
    with torch.no_grad():
        difference = (torch.from_numpy(session.run(None, feed)[0]) - model(images)).abs().max().item()

    def eager() -> None:
        with torch.no_grad():
            model(images)

    steps = {"eager": eager, "onnxruntime": lambda: session.run(None, feed)}
    times = alternate(steps, torch.device("cpu"), warmup=2, iterations=args.iterations, rounds=args.rounds)
    ratios = [e / o for e, o in zip(times["eager"], times["onnxruntime"])]
    shape = "any size" if args.dynamic_size else f"{size}x{size}"
    print(f"{config.MODEL.NAME or config.MODEL.TYPE}: batch {args.batch}, {shape} ONNX model run at {size}x{size}, "
          f"{args.threads} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{args.rounds} rounds x {args.iterations} batches; largest |logit difference| {difference:.1e}")
    print("| runtime | s/batch | images/s |")
    print("|---|---|---|")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {seconds:.3f} | {args.batch / seconds:.1f} |")
    speed = statistics.median(times["eager"]) / statistics.median(times["onnxruntime"])
    print(f"onnxruntime / eager speed: {speed:.2f} (of the medians; rounds {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
