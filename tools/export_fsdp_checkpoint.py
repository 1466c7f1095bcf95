"""Converts a sharded checkpoint (a ``TRAIN.FSDP`` run's ``ckpt_epoch_N/`` folder) into one released-format file.

``python tools/export_fsdp_checkpoint.py OUTPUT/NAME/TAG/ckpt_epoch_N model.pth [--ema]``

Runs in one process without a process group or GPU: it reads only the model's (or, with ``--ema``, the EMA's)
tensors from the DCP files, whatever number of processes wrote them, and writes ``{"model": state_dict}`` with the
reference's key names, which ``--eval``, ``--pretrained``, ``tools/predict.py`` and the reference's code load.
Epoch-end folders already hold this file as ``model.pth``; this tool also serves mid-epoch checkpoints and the EMA.
"""
import argparse
import os
import sys
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import CheckpointError, atomic_torch_save, is_sharded_checkpoint  # noqa: E402


def read_sharded_weights(path: str, key: str = "model") -> Dict[str, torch.Tensor]:
    """The full tensors stored under ``key`` in the sharded checkpoint ``path`` (no process group needed).

    Raises:
        CheckpointError: not a sharded checkpoint, unreadable, or without ``key``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not os.path.isdir(path) or not is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is not a sharded checkpoint folder (it should hold .metadata and *.distcp)")
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
        prefix = key + "."
        weights = {name[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
                   for name, meta in metadata.state_dict_metadata.items()
                   if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
        if not weights:
            raise CheckpointError(f"{path} holds no '{key}' weights")
        content = {key: weights}
        dcp.load(content, checkpoint_id=path, no_dist=True)
    except CheckpointError:
        raise
    except Exception as error:  # DCP's own exception types
        raise CheckpointError(f"cannot read the sharded checkpoint {path}: {str(error).strip()[:800]}") from error
    return content[key]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="sharded checkpoint folder (ckpt_epoch_N or ckpt_epoch_N_step_S)")
    parser.add_argument("output", help="released-format .pth file to write")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the model's")
    args = parser.parse_args(argv)
    try:
        weights = read_sharded_weights(args.checkpoint, "model_ema" if args.ema else "model")
        atomic_torch_save({"model": weights}, args.output)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(weights)} tensors, "
          f"{sum(v.numel() for v in weights.values()) / 1e6:.2f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
