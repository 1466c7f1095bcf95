"""Shows what a SimMIM model learned: a PNG grid of input / masked input / reconstruction for validation images.

    python tools/simmim_visualize.py --cfg configs/demo/simmim_pretrain_swin_micro_digits.yaml \\
        --resume output/simmim_pretrain_swin_micro_digits/default/ckpt_epoch_99.pth --out grid.png --count 8

One row per image: the input, the input with its masked squares blanked, and the input with the masked squares
filled by the model's reconstruction. The images and masks are those of validation (fixed per image), so grids
of two checkpoints of a run compare like with like. Training writes the same grid to TensorBoard after each
validation (``val/reconstruction``).
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch import nn  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from data.datasets import ImageDataset  # noqa: E402
from objectives import DEFAULT_GRID_COUNT, reconstruction_grid  # noqa: E402

def save_reconstruction_grid(model: nn.Module, dataset: ImageDataset, path, count: int = DEFAULT_GRID_COUNT) -> str:
    """Writes :func:`reconstruction_grid` as a PNG; returns the path."""
    save_image(reconstruction_grid(model, dataset, count), str(path))
    return str(path)


def main(argv: Optional[List[str]] = None) -> int:
    from checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file
    from config import ConfigError, load_config
    from data import DataError
    from data.simmim import build_simmim_datasets
    from models import build_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the pretraining config")
    parser.add_argument("--resume", required=True, help="a SimMIM checkpoint of that config")
    parser.add_argument("--data-path", help="image folder (default: the config's DATA.DATA_PATH)")
    parser.add_argument("--out", default="simmim_reconstruction.png", help="PNG to write")
    parser.add_argument("--count", type=int, default=DEFAULT_GRID_COUNT, help="validation images shown")
    parser.add_argument("--opts", nargs="+", default=[], help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    try:
        opts = ["TRAIN.OBJECTIVE", "simmim"] + (["DATA.DATA_PATH", args.data_path] if args.data_path else [])
        config = load_config(args.cfg, opts=opts + args.opts)
        model = build_model(config)
        checkpoint = load_checkpoint_file(args.resume)
        model.load_state_dict(extract_state_dict(checkpoint))
        _, val = build_simmim_datasets(config)
        path = save_reconstruction_grid(model, val, args.out, args.count)
    except (ConfigError, CheckpointError, DataError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}: rows of input / masked input / reconstruction for {min(args.count, len(val))} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
