"""One process of the 2-process tests in test_distributed_health.py (run under torchrun on gloo).

``python -m torch.distributed.run --nproc_per_node 2 tests/dist_health_worker.py MODE OUT_DIR``; MODE is
``ema`` (the EMA of every process starts from, and stays equal to, the weights DDP trains) or ``nan`` (a
non-finite loss on rank 1 only). Each rank writes what it saw to ``OUT_DIR/rank{N}.json``.
"""
import json
import os
import sys

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from config import load_config  # noqa: E402
from engine import EpochState, NonFiniteLossError, Precision, TrainParts, train_one_epoch  # noqa: E402
from lr_scheduler import build_scheduler  # noqa: E402
from main import prepare_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from utils import (exit_process, get_rank, get_world_size, init_distributed, seed_everything,  # noqa: E402
                   shutdown_distributed)

MICRO = ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "10", "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS",
         "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]", "MODEL.SWIN.WINDOW_SIZE", "4", "MODEL.EMA.ENABLE", "True",
         "MODEL.EMA.DECAY", "0.5", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.EPOCHS", "1", "AMP_ENABLE", "False"]
UPDATES = 6
NAN_AT = 2  # micro-batch index whose loss is NaN on rank 1 only


class NanOnRank1(nn.Module):
    """Cross-entropy, except that rank 1's loss at micro-batch ``NAN_AT`` is NaN."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, targets)
        if get_rank() == 1 and self.calls == NAN_AT:
            loss = loss * float("nan")
        self.calls += 1
        return loss


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def spread_across_ranks(vector: torch.Tensor) -> float:
    """Largest difference of ``vector`` between this process and any other."""
    gathered = [torch.empty_like(vector) for _ in range(get_world_size())]
    torch.distributed.all_gather(gathered, vector)
    return max((g - vector).abs().max().item() for g in gathered)


def main(mode: str, out_dir: str) -> None:
    device = init_distributed()
    rank = get_rank()
    config = load_config(None, opts=MICRO)
    seed_everything(config.SEED + rank)  # as main.py: each process initialises its own model
    model, model_ema, train_model = prepare_model(config, device)
    result = {"ema_vs_model_at_start": (flat(model_ema.module) - flat(model)).abs().max().item(),
              "ema_spread_at_start": spread_across_ranks(flat(model_ema.module))}
    optimizer = build_optimizer(config, model, device)
    parts = TrainParts(model=train_model, criterion=NanOnRank1() if mode == "nan" else nn.CrossEntropyLoss(),
                       optimizer=optimizer, lr_scheduler=build_scheduler(config, optimizer, UPDATES),
                       model_ema=model_ema, clip_grad=config.TRAIN.CLIP_GRAD)
    generator = torch.Generator().manual_seed(100 + rank)  # each process trains on its own data
    batches = [(torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 10, (2,), generator=generator))
               for _ in range(UPDATES)]
    state = EpochState(epoch=0, updates_per_epoch=UPDATES)
    try:
        train_one_epoch(parts, batches, state, device, Precision(False), print_freq=3, num_batches=UPDATES)
    except NonFiniteLossError as error:
        result["error"] = str(error)
    result["updates_done"] = state.update
    if mode == "ema":
        result["ema_spread_after"] = spread_across_ranks(flat(model_ema.module))
        result["model_spread_after"] = spread_across_ranks(flat(model))
        result["ema_moved"] = (flat(model_ema.module) - flat(model)).abs().max().item()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_process(0)  # as main.py ends (utils.exit_process)
