"""Exports a trained Swin Transformer (any family) with torch.export, as an ExportedProgram or as ONNX, and checks
the result against the PyTorch model.

    python tools/export.py --cfg CONFIG --resume CKPT --format exported|onnx --out FILE [--features] \\
        [--dynamic-size] [--no-check] [--opts KEY VALUE ...]

The config describes the model as for ``main.py --eval``; the checkpoint may be a released file, a training
checkpoint of this project (its ``model`` weights), a plain or a timm Swin state dict, and must fit the model
exactly. The classifier maps (B, C, H, W) images to (B, classes) logits; with ``--features`` the backbone
(``models.build_backbone``) maps them to the list of stage maps (B, C_i, H / s_i, W / s_i), and a SimMIM
pretraining checkpoint gives its encoder. The batch is dynamic; the image size is DATA.IMG_SIZE, or any size from
one patch up with ``--dynamic-size``. Exporting takes the model's plain path: with FUSED_WINDOW_PROCESS the fused
kernel stays out of the graph.

``--format exported`` writes ``torch.export.save``'s file, FILE.pt2 (run ``torch.export.load(FILE).module()``);
``--format onnx`` writes an ONNX model (opset 20) with input ``images`` and outputs ``logits`` or ``stage{i}``,
whose dynamic dimensions are named batch, height and width. Unless ``--no-check``, the written file is loaded
(the ONNX one by onnxruntime on the CPU) and run on random images of batch 1 and 3, at the configured size and,
with ``--dynamic-size``, at a second one; each output must be within 1e-4 of the PyTorch model's (float32).
Exit status: 0 when written (and checked), 1 when the check failed, 2 for a model, checkpoint or option that
cannot be exported (one line on stderr saying what to do).
"""
import argparse
import logging
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import (RELEASED_MODEL, CheckpointError, extract_state_dict, is_sharded_checkpoint,  # noqa: E402
                        load_checkpoint_file, load_model_weights)
from config import ConfigError, load_config  # noqa: E402
from models import build_backbone, build_model  # noqa: E402
from models.export import ExportError, export_program, output_names, require_onnx, save_onnx  # noqa: E402
from models.simmim import is_simmim_state_dict, simmim_to_encoder  # noqa: E402

FORMATS = ("exported", "onnx")
# float32 outputs of the written file against the PyTorch model's (the bound; measured 1e-7 to 1e-6).
TOLERANCE = 1e-4


def build(config, features: bool) -> nn.Module:
    """The classifier of ``config``, or its backbone with every stage (``MODEL.PRETRAINED`` is not loaded here).

    Raises:
        ExportError: a SimMIM pretraining model as a classifier, or a family without the backbone API.
    """
    if features:
        try:
            return build_backbone(_without_pretrained(config))  # the weights come from --resume
        except ValueError as error:
            raise ExportError(f"--features: {error}") from error
    if config.TRAIN.OBJECTIVE == "simmim":
        raise ExportError("the config describes SimMIM pretraining (TRAIN.OBJECTIVE simmim), whose forward takes a "
                          "mask and returns a loss; export its encoder with --features, or fine-tune a classifier "
                          "first (main_simmim_ft.py) and export that")
    return build_model(config)


def _without_pretrained(config):
    """A copy of ``config`` without ``MODEL.PRETRAINED``."""
    config = config.clone()
    config.defrost()
    config.MODEL.PRETRAINED = ""
    config.freeze()
    return config


def load_weights(model: nn.Module, path: str, config, features: bool) -> None:
    """Loads the checkpoint strictly, as ``main.py --eval --resume`` does; a SimMIM checkpoint only into a backbone.

    Raises:
        ExportError: a sharded (FSDP) checkpoint folder, or a SimMIM checkpoint for a classifier.
        CheckpointError: an unreadable checkpoint, or weights that do not fit the model.
    """
    if os.path.isdir(path) and is_sharded_checkpoint(path):
        released = os.path.join(path, RELEASED_MODEL)
        hint = f"export {released} (written at epoch ends) or " if os.path.isfile(released) else ""
        raise ExportError(f"{path} is a sharded (FSDP) checkpoint folder; {hint}convert it to one file first: "
                          f"python tools/export_fsdp_checkpoint.py {path} model.pth [--ema], then --resume model.pth")
    checkpoint = load_checkpoint_file(path)
    state_dict = extract_state_dict(checkpoint)
    if is_simmim_state_dict(state_dict):
        if not features:
            raise ExportError(f"{path} is a SimMIM pretraining checkpoint (encoder and pixel decoder), not a "
                              "classifier; export its encoder with --features, or fine-tune it first "
                              "(main_simmim_ft.py --pretrained) and export the fine-tuned checkpoint")
        checkpoint = {"model": simmim_to_encoder(state_dict)[0]}
    load_model_weights(model, checkpoint, path, config)


def random_images(batch: int, size: Tuple[int, int], in_chans: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, in_chans, *size, generator=torch.Generator().manual_seed(seed))


def check_sizes(image_size: Tuple[int, int], dynamic_size: bool, stride: int) -> List[Tuple[int, int]]:
    """The configured size and, for a dynamic one, a second size that pads every stage differently."""
    sizes = [image_size]
    if dynamic_size:
        sizes.append((image_size[0] + stride + 3, image_size[1] + 2 * stride - 5))
    return sizes


def onnx_runner(path: str) -> Callable[[torch.Tensor], List[torch.Tensor]]:
    """Runs the ONNX file with onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images: [torch.from_numpy(out) for out in session.run(None, {"images": images.numpy()})]


def exported_runner(path: str) -> Callable[[torch.Tensor], List[torch.Tensor]]:
    """Runs the saved ExportedProgram."""
    module = torch.export.load(path).module()

    def run(images: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad():
            out = module(images)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    return run


def check(model: nn.Module, run: Callable[[torch.Tensor], List[torch.Tensor]], sizes: Sequence[Tuple[int, int]],
          in_chans: int) -> List[Tuple[int, Tuple[int, int], float]]:
    """(batch, size, largest |difference| over all outputs) for batches 1 and 3 at each size."""
    results = []
    for size in sizes:
        for batch in (1, 3):
            images = random_images(batch, size, in_chans, seed=batch)
            with torch.no_grad():
                expected = model(images)
            expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
            actual = run(images)
            if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
                raise RuntimeError(f"the exported model returns shapes {[tuple(a.shape) for a in actual]}, the "
                                   f"PyTorch model {[tuple(e.shape) for e in expected]}")
            error = max((a - e).abs().max().item() for a, e in zip(actual, expected))
            results.append((batch, size, error))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, metavar="FILE", help="config file of the model")
    parser.add_argument("--resume", required=True, metavar="CKPT", help="weights: released file, training "
                        "checkpoint, plain or timm state dict (a SimMIM checkpoint with --features)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="exported: torch.export.save; onnx: ONNX")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--features", action="store_true", help="export the backbone: the list of stage maps")
    parser.add_argument("--dynamic-size", action="store_true", help="any image size, not only DATA.IMG_SIZE")
    parser.add_argument("--no-check", action="store_true", help="do not compare the written file with PyTorch")
    parser.add_argument("--opts", nargs="+", default=[], help="KEY VALUE pairs that override the config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.format == "exported" and not args.out.endswith(".pt2"):
        parser.error(f"--out {args.out}: torch.export.load reads only files named *.pt2; end the name in .pt2")
    try:
        if args.format == "onnx":
            require_onnx()  # before minutes of work
        config = load_config(args.cfg, args.opts)
        model = build(config, args.features)
        load_weights(model, args.resume, config, args.features)
        size = (config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
        in_chans = model.patch_embed.in_chans
        program = export_program(model, size, in_chans, args.dynamic_size)
        if args.format == "onnx":
            save_onnx(program, args.out, output_names(model))
        else:
            torch.export.save(program, args.out)
    except (ConfigError, CheckpointError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kind = "backbone (stage maps)" if args.features else "classifier"
    shape = "any size" if args.dynamic_size else f"{size[0]}x{size[1]}"
    print(f"wrote {args.out}: {kind} of {config.MODEL.TYPE}, {args.format}, batch dynamic, images {shape}")
    if args.no_check:
        return 0
    run = onnx_runner(args.out) if args.format == "onnx" else exported_runner(args.out)
    stride = model.feature_info[-1]["reduction"]
    failed = False
    for batch, (height, width), error in check(model, run, check_sizes(size, args.dynamic_size, stride), in_chans):
        verdict = "ok" if error <= TOLERANCE else f"FAILED (more than {TOLERANCE:g})"
        failed |= error > TOLERANCE
        print(f"  check: batch {batch}, {height}x{width}: largest |difference| from PyTorch {error:.2e} {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
