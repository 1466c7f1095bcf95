"""Converts Swin Transformer weights between this project's layout (that of the reference release) and timm's.

    python tools/convert_checkpoint.py --to timm swin_tiny_patch4_window7_224.pth swin_tiny_timm.pth
    python tools/convert_checkpoint.py --to ours swin_tiny_timm.pth swin_tiny_patch4_window7_224.pth

The input may be a released file ({"model": state dict}), a training checkpoint of this project (its "model"
weights are taken; optimizer and schedule state are left out), a plain state dict or a timm Swin state dict; it
is read with torch.load(weights_only=True), so a file that needs code to unpickle is refused. The two layouts
differ in two names: patch merging is ``layers.{i}.downsample`` (end of stage i) here and
``layers.{i+1}.downsample`` (start of the next stage) in timm, and the classifier is ``head`` here and
``head.fc`` in timm. Swin V2 (timm's ``swinv2_*`` models) converts the same way. timm has no Swin-MLP and no SimMIM
model: such checkpoints are refused with a message (exit status 2). The derived buffers that
released files carry (``relative_position_index``, ``attn_mask``, V2's ``relative_coords_table``) are dropped. ``--to ours`` writes {"model": state dict} like the released files; ``--to timm``
writes a plain state dict, which timm's ``load_checkpoint`` and ``create_model(pretrained_cfg_overlay=...)``
read. The output is written atomically: a crash leaves the old file or the new one, never half of one.
"""
import argparse
import os
import sys
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.simmim import is_simmim_state_dict  # noqa: E402
from models.state_dict import drop_derived_buffers, is_timm_layout, ours_to_timm, timm_to_ours  # noqa: E402
from checkpoint import CheckpointError, atomic_torch_save, extract_state_dict, load_checkpoint_file  # noqa: E402

LAYOUTS = ("timm", "ours")


def convert(state_dict: Dict[str, torch.Tensor], to: str) -> Dict[str, torch.Tensor]:
    """The learned tensors of ``state_dict`` (either layout) renamed to the ``to`` layout ("timm" or "ours").

    Raises:
        ValueError: an unknown target layout, or a model with an absolute position embedding sent to timm.
    """
    if to not in LAYOUTS:
        raise ValueError(f"unknown layout {to!r}; choose one of {', '.join(LAYOUTS)}")
    if is_simmim_state_dict(state_dict):
        raise ValueError("this is a SimMIM pretraining checkpoint (an encoder.* and a decoder.*): timm has no SimMIM "
                         "model, and both layouts are the same for it. Fine-tune from it with --pretrained (which "
                         "takes its encoder), then convert the fine-tuned checkpoint")
    if to == "timm" and any(".spatial_mlp." in key for key in state_dict):
        raise ValueError("this is a Swin-MLP checkpoint (spatial_mlp layers): timm has no Swin-MLP model, so there is "
                         "no timm layout to convert it to; use it with this project's MODEL.TYPE swin_mlp as it is")
    state_dict, _ = drop_derived_buffers(state_dict)
    if is_timm_layout(state_dict):
        return state_dict if to == "timm" else timm_to_ours(state_dict)
    return ours_to_timm(state_dict) if to == "timm" else dict(state_dict)


def _left_out(checkpoint: Dict, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Top-level entries of a checkpoint wrapper that are not the converted weights."""
    if checkpoint is state_dict:
        return []
    return sorted(k for k, v in checkpoint.items() if v is not state_dict and v is not None)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", required=True, choices=LAYOUTS, help="layout to write")
    parser.add_argument("input", help="checkpoint to read")
    parser.add_argument("output", help="file to write")
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint_file(args.input)
        state_dict = extract_state_dict(checkpoint)
        source = "timm" if is_timm_layout(state_dict) else "ours"
        learned, derived = drop_derived_buffers(state_dict)
        converted = convert(state_dict, args.to)
        atomic_torch_save({"model": converted} if args.to == "ours" else converted, args.output)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {args.input}: {error}", file=sys.stderr)
        return 2
    # The renaming keeps the order of the keys, so old and new names pair up.
    renamed = sum(old != new for old, new in zip(learned, converted))
    print(f"read {args.input}: {len(state_dict)} tensors in {source} layout")
    left_out = _left_out(checkpoint, state_dict)
    if left_out:
        print(f"  took the model weights; left out the other entries: {', '.join(left_out)}")
    if derived:
        names = sorted({key.rsplit(".", 1)[-1] for key in derived})
        print(f"  dropped {len(derived)} derived buffers ({', '.join(names)})")
    if source == args.to:
        print(f"  already in {args.to} layout: no key renamed")
    else:
        print(f"  renamed {renamed} keys (ours layers.{{i}}.downsample <-> timm layers.{{i+1}}.downsample, "
              f"ours head <-> timm head.fc)")
    container = '{"model": state dict}' if args.to == "ours" else "plain state dict"
    print(f"wrote {args.output}: {len(converted)} tensors in {args.to} layout ({container})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
