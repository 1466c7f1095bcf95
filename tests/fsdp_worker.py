"""One process of the 2-process tests in test_fsdp.py (run under torchrun on gloo).

``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py MODE OUT_DIR [KEY VALUE ...]``.
MODE ``compare``: the same updates (accumulation, clipping, EMA, layer decay) with DDP and with FSDP from the
same start (``KEY VALUE`` pairs apply to the FSDP run only), then a sharded checkpoint of the FSDP run in ``OUT_DIR/run`` and, from rank 0, the full tensors it
should hold in ``OUT_DIR/expected.pth``; each rank writes what it saw to ``OUT_DIR/rank{N}.json``. MODE
``fp16``: float16 updates with the gradient scaler and a gradient that overflows on one process only. MODE
``from_ddp``: a DDP (single-file) training checkpoint resumed by an FSDP run.
"""
import json
import os
import sys

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from config import load_config  # noqa: E402
from engine import EpochState, Precision, TrainParts, train_one_epoch  # noqa: E402
from lr_scheduler import build_scheduler  # noqa: E402
from main import prepare_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from utils import exit_process, get_rank, init_distributed, seed_everything, shutdown_distributed  # noqa: E402

MICRO = ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "10", "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS",
         "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]", "MODEL.SWIN.WINDOW_SIZE", "4", "MODEL.EMA.ENABLE", "True",
         "MODEL.EMA.DECAY", "0.5", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.EPOCHS", "1", "AMP_ENABLE", "False",
         "TRAIN.LAYER_DECAY", "0.9", "TRAIN.CLIP_GRAD", "0.5", "TRAIN.ACCUMULATION_STEPS", "2",
         "MODEL.DROP_PATH_RATE", "0.0"]
UPDATES = 4


def full_weights(module: nn.Module) -> dict:
    """Full tensors on every rank, whether ``module`` is sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return {k: v.detach().clone() for k, v in
            get_model_state_dict(module, options=StateDictOptions(full_state_dict=True)).items()}


def train(config, device, batches, criterion=None, precision=Precision(False)):
    """Builds (rank-own seed, as main.py does), wraps and trains; returns the model, EMA, optimizer and the result."""
    seed_everything(config.SEED + get_rank())
    model, model_ema, train_model = prepare_model(config, device)
    optimizer = build_optimizer(config, model, device)
    accum = config.TRAIN.ACCUMULATION_STEPS
    parts = TrainParts(model=train_model, criterion=criterion or nn.CrossEntropyLoss(), optimizer=optimizer,
                       lr_scheduler=build_scheduler(config, optimizer, UPDATES), model_ema=model_ema,
                       clip_grad=config.TRAIN.CLIP_GRAD, accumulation_steps=accum,
                       scaler=torch.amp.GradScaler(device.type) if precision.needs_scaler else None)
    state = EpochState(epoch=0, updates_per_epoch=UPDATES)
    metrics = train_one_epoch(parts, batches, state, device, precision, print_freq=1, num_batches=len(batches))
    return model, model_ema, optimizer, parts, state, metrics


def compare(out_dir: str, extra: list) -> dict:
    device = init_distributed()
    rank = get_rank()
    generator = torch.Generator().manual_seed(100 + rank)  # each process trains on its own data
    batches = [(torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 10, (2,), generator=generator))
               for _ in range(UPDATES * 2)]
    ddp_config = load_config(None, opts=MICRO)  # ``extra`` (e.g. TRAIN.USE_CHECKPOINT True) is for FSDP only
    ddp_model, ddp_ema, _, _, _, ddp_metrics = train(ddp_config, device, batches)
    config = load_config(None, opts=MICRO + extra + ["TRAIN.FSDP", "True", "OUTPUT", os.path.join(out_dir, "run")])
    model, model_ema, optimizer, parts, state, metrics = train(config, device, batches)
    result = {"sharded": type(model).__name__.startswith("FSDP"),
              "local_numel": sum(p.to_local().numel() for p in model.parameters()),
              "numel": sum(p.numel() for p in model.parameters())}
    fsdp_weights, fsdp_ema = full_weights(model), full_weights(model_ema.module)
    reference = ddp_model.state_dict()
    result["max_weight_diff"] = max((fsdp_weights[k] - v).abs().max().item() for k, v in reference.items())
    result["max_ema_diff"] = max((fsdp_ema[k] - v).abs().max().item() for k, v in ddp_ema.module.state_dict().items())
    result["moved"] = max((fsdp_weights[k] - fsdp_ema[k]).abs().max().item() for k in reference)
    result["losses"] = [ddp_metrics["loss"], metrics["loss"]]
    result["grad_norms"] = [ddp_metrics["grad_norm"], metrics["grad_norm"]]
    # A sharded checkpoint of the FSDP run, and what it must hold, gathered, for the 1-process checks.
    from checkpoint import save_training_checkpoint
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    os.makedirs(config.OUTPUT, exist_ok=True)
    state.images = 1024  # what main.train sets before saving: 2 updates x 2 micro-batches x 128 x 2 processes
    save_training_checkpoint(config, model, optimizer, parts.lr_scheduler, None, model_ema, state, complete=False)
    result["checkpoint"] = os.path.join(config.OUTPUT, f"ckpt_epoch_0_step_{state.update}")
    full_optimizer = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        torch.save({"model": fsdp_weights, "model_ema": fsdp_ema, "optimizer": full_optimizer["state"]},
                   os.path.join(out_dir, "expected.pth"))
    return result


def fp16(out_dir: str, extra: list) -> dict:
    """Float16 with a scaler: a gradient that overflows on rank 1 only must make both processes skip."""
    device = init_distributed()
    rank = get_rank()

    class OverflowOnRank1(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, logits, targets):
            loss = nn.functional.cross_entropy(logits.float(), targets)
            self.calls += 1
            return loss * 1e30 if rank == 1 and self.calls in (3, 4) else loss  # the second update's micro-steps

    generator = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 10, (2,), generator=generator))
               for _ in range(UPDATES * 2)]
    config = load_config(None, opts=MICRO + extra + ["TRAIN.FSDP", "True", "AMP_ENABLE", "True", "AMP_DTYPE",
                                                     "float16", "MODEL.EMA.ENABLE", "False"])
    model, _, _, parts, state, metrics = train(config, device, batches, criterion=OverflowOnRank1(),
                                               precision=Precision(True, torch.float16))
    weights = full_weights(model)
    return {"skipped": state.skipped_total, "scale": parts.scaler.get_scale(),
            "finite": all(bool(torch.isfinite(v).all()) for v in weights.values()),
            "checksum": sum(v.double().sum().item() for v in weights.values())}


def from_ddp(out_dir: str, extra: list) -> dict:
    """A single-file (DDP) training checkpoint resumed by an FSDP run: weights, EMA and AdamW moments sharded."""
    from checkpoint import resume_training, save_training_checkpoint
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    device = init_distributed()
    generator = torch.Generator().manual_seed(100 + get_rank())
    batches = [(torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 10, (2,), generator=generator))
               for _ in range(UPDATES * 2)]
    ddp_config = load_config(None, opts=MICRO + extra + ["OUTPUT", os.path.join(out_dir, "ddp")])
    model, model_ema, optimizer, parts, state, _ = train(ddp_config, device, batches)
    os.makedirs(ddp_config.OUTPUT, exist_ok=True)
    save_training_checkpoint(ddp_config, model, optimizer, parts.lr_scheduler, None, model_ema, state, complete=True)
    torch.distributed.barrier()  # rank 0 writes it
    path = os.path.join(ddp_config.OUTPUT, "ckpt_epoch_0.pth")
    config = load_config(None, opts=MICRO + extra + ["TRAIN.FSDP", "True", "MODEL.RESUME", path])
    seed_everything(1000 + get_rank())  # other initial weights: the resume must replace them
    sharded, sharded_ema, _ = prepare_model(config, device)
    sharded_optimizer = build_optimizer(config, sharded, device)
    resume_training(config, sharded, sharded_optimizer, build_scheduler(config, sharded_optimizer, UPDATES), None,
                    sharded_ema, UPDATES, UPDATES * 2)
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {names[id(p)]: optimizer.state[p]["exp_avg"] for p in model.parameters()}
    full = get_optimizer_state_dict(sharded, sharded_optimizer, options=StateDictOptions(full_state_dict=True))
    weights, ema = full_weights(sharded), full_weights(sharded_ema.module)
    return {"sharded": type(sharded).__name__.startswith("FSDP"),
            "weight_diff": max((weights[k] - v).abs().max().item() for k, v in model.state_dict().items()),
            "ema_diff": max((ema[k] - v).abs().max().item() for k, v in model_ema.module.state_dict().items()),
            "moment_diff": max((full["state"][k]["exp_avg"] - v).abs().max().item() for k, v in moments.items())}


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    result = {"compare": compare, "fp16": fp16, "from_ddp": from_ddp}[mode](out, sys.argv[3:])
    with open(os.path.join(out, f"rank{get_rank()}.json"), "w") as f:
        json.dump(result, f)
    shutdown_distributed()
    exit_process(0)  # as main.py ends: without the interpreter's teardown (utils.exit_process)
