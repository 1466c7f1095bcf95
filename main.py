"""Train, fine-tune, evaluate or measure a Swin Transformer: ``python main.py --cfg FILE [flags]``.

Runs as one process (one GPU, or the CPU) or under ``torchrun --nproc_per_node N`` with DDP.
"""
import argparse
import inspect
import json
import logging
import math
import os
import signal
import sys
import time

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from yacs.config import CfgNode

import config as cfg_lib
from config import ConfigError
from compilation import compile_model, is_compiled, warm_up
from engine import (EpochState, NonFiniteLossError, Precision, TrainParts, micro_step, throughput, train_one_epoch,
                    validate)
from objectives import build_objective
from logger import setup_logging
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from preemption import StopSignals, TrainingStopped, exit_status
from run_history import set_aside_other_history
from checkpoint import (CheckpointError, checkpoint_name, load_eval_weights, load_pretrained, resume_candidates,
                        resume_training, save_training_checkpoint)
from fsdp import evaluation_model
from utils import (PeerFailure, announce_failure, announced_failure, describe_process_group, exit_process,
                   fail_together, get_rank, get_world_size, init_distributed, is_distributed, is_main_process,
                   keep_freed_memory, run_lock, seed_epoch, seed_everything, shutdown_distributed)

logger = logging.getLogger("main")


def parse_args(argv=None) -> argparse.Namespace:
    """The reference command line, plus --amp-dtype and --compile."""
    parser = argparse.ArgumentParser("Swin Transformer training and evaluation")
    parser.add_argument("--cfg", required=True, metavar="FILE", help="path to a config file")
    parser.add_argument("--opts", nargs="+", default=None, help="KEY VALUE pairs that override the config")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--data-path", type=str, help="dataset root")
    parser.add_argument("--zip", action="store_true", help="read train.zip / val.zip instead of folders")
    parser.add_argument("--cache-mode", choices=["no", "part", "full"], help="zip mode caching")
    parser.add_argument("--pretrained", help="checkpoint to fine-tune from")
    parser.add_argument("--resume", help="training checkpoint to resume")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing to save memory")
    parser.add_argument("--disable_amp", action="store_true", help="train in float32")
    parser.add_argument("--amp-opt-level", choices=["O0", "O1", "O2"], help="deprecated; O0 disables AMP")
    parser.add_argument("--amp-dtype", choices=["float16", "bfloat16"], help="autocast precision")
    parser.add_argument("--output", metavar="PATH", help="root of output folders")
    parser.add_argument("--tag", help="tag of the experiment")
    parser.add_argument("--eval", action="store_true", help="evaluate only")
    parser.add_argument("--throughput", action="store_true", help="measure throughput only")
    parser.add_argument("--fused_window_process", action="store_true", help="fused roll + window partition kernel")
    parser.add_argument("--fused_layernorm", action="store_true", help="accepted; LayerNorm is already fused")
    parser.add_argument("--optim", help="optimizer name (adamw, sgd)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--fsdp", action="store_true", help="shard the model across processes (FSDP2)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help="set by old launchers; read from env")
    return parser.parse_args(argv)


def build_criterion(config: CfgNode, mixup: bool) -> nn.Module:
    """Soft-target loss under Mixup/CutMix (smoothing is in the targets), else label smoothing as configured."""
    if mixup:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def build_precision(config: CfgNode, evaluation: bool = False) -> Precision:
    enabled = config.TEST.AMP_ENABLE if evaluation else config.AMP_ENABLE
    return Precision(enabled=bool(enabled), dtype=getattr(torch, config.AMP_DTYPE))


# Every buffer of these models is derived from shapes (position indices, masks) and the same everywhere, so DDP
# need not broadcast rank 0's buffers before every forward. torch 2.14 renamed the argument (2.11 has the old one).
_NO_BUFFER_SYNC_IN_FORWARD = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})


def prepare_model(config: CfgNode, device: torch.device):
    """Model on device (pretrained weights loaded), its EMA, and the compiled/DDP-wrapped training view."""
    model = build_model(config)
    logger.info("model %s: %.2fM parameters, %.3f GFLOPs at %d px", config.MODEL.NAME,
                sum(p.numel() for p in model.parameters()) / 1e6, model.flops() / 1e9, config.DATA.IMG_SIZE)
    with fail_together("loading the pretrained weights"):  # each process reads the file itself
        if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
            load_pretrained(config, model)
    # Under torchrun the model is wrapped for any number of processes, one included, so that one GPU runs the
    # path that eight run; a single process started without torchrun trains the plain model.
    if config.TRAIN.FSDP and is_distributed():
        from fsdp import prepare_sharded
        return prepare_sharded(config, model, device)
    if config.TRAIN.FSDP:
        logger.info("TRAIN.FSDP without torchrun: nothing to shard; the plain model trains, checkpoints are sharded")
    model.to(device)
    train_model = compile_model(model, config, device)
    if is_distributed():
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None,
                                              **_NO_BUFFER_SYNC_IN_FORWARD)
    # Only now: DDP has just broadcast rank 0's weights into `model` (each rank initialised its own from its
    # own seed), so every process's EMA starts from the weights all of them train. The EMA copies the bare
    # module, so it holds plain parameters, not compiled or DDP-wrapped ones.
    model_ema = ModelEmaV3(model, decay=config.MODEL.EMA.DECAY) if config.MODEL.EMA.ENABLE else None
    return model, model_ema, train_model


def synthetic_batch(config: CfgNode, model: nn.Module, device: torch.device):
    """A random batch of the training loader's shapes: (images, targets), images with SimMIM's masks for SimMIM."""
    batch = config.DATA.BATCH_SIZE
    embedding = model.encoder.patch_embed if config.TRAIN.OBJECTIVE == "simmim" else model.patch_embed
    images = torch.randn(batch, embedding.in_chans, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device)
    targets = torch.randint(0, config.MODEL.NUM_CLASSES, (batch,), device=device)
    if config.TRAIN.OBJECTIVE == "simmim":
        from data.masking import build_mask_generator

        generator = build_mask_generator(config)
        images = (images, torch.stack([generator() for _ in range(batch)]).to(device))
    return images, targets


def run_throughput(config: CfgNode, device: torch.device) -> None:
    """Synthetic-data images/s of inference and of the full training step; needs no dataset."""
    model, model_ema, train_model = prepare_model(config, device)
    optimizer = build_optimizer(config, model, device)
    precision = build_precision(config)
    batch = config.DATA.BATCH_SIZE
    images, targets = synthetic_batch(config, model, device)
    parts = TrainParts(model=train_model, criterion=build_criterion(config, mixup=False), optimizer=optimizer,
                       lr_scheduler=build_scheduler(config, optimizer, 1000),
                       scaler=torch.amp.GradScaler(device.type) if precision.needs_scaler else None,
                       model_ema=model_ema, clip_grad=config.TRAIN.CLIP_GRAD,
                       accumulation_steps=config.TRAIN.ACCUMULATION_STEPS,
                       objective=build_objective(config, build_criterion(config, mixup=False)))
    result = throughput(parts, images, targets, device, precision)
    if device.type == "cuda":
        memory = "peak memory: inference %.0f MB, training %.0f MB" % (result["inference_peak_memory_mb"],
                                                                        result["train_peak_memory_mb"])
    else:
        result["process_peak_rss_mb"] = result["train_peak_memory_mb"]  # on the CPU: the process's peak RSS
        memory = "process peak RSS %.0f MB" % result["process_peak_rss_mb"]
    logger.info("throughput on %s, %s, batch %d per process: inference %.1f img/s, training step %.1f img/s; %s",
                device, precision.name, batch, result["inference_images_per_second"],
                result["train_images_per_second"], memory)
    if is_main_process():
        path = os.path.join(config.OUTPUT, "throughput.json")
        with open(f"{path}.{os.getpid()}.tmp", "w") as f:  # whole or absent, also with two measurements at once
            json.dump({**result, "device": str(device), "precision": precision.name}, f, indent=1)
        os.replace(f"{path}.{os.getpid()}.tmp", path)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_distributed()
    rank, world_size = get_rank(), get_world_size()
    config = cfg_lib.load_config(args.cfg, args=args, world_size=world_size)
    cfg_lib.prepare_output_dir(config.OUTPUT)
    if config.THROUGHPUT_MODE:
        # Synthetic data, nothing of a run read or replaced (its own log file and throughput.json): it needs no hold
        # on the folder, and so measures while a run trains there.
        return run(config, device, rank, world_size)
    with run_lock(config.OUTPUT, rank):
        return run(config, device, rank, world_size)


def run(config: CfgNode, device: torch.device, rank: int, world_size: int) -> int:
    """Everything after the config: logging, then throughput, evaluation or training, holding the run folder."""
    setup_logging(config.OUTPUT, rank, name="log_throughput" if config.THROUGHPUT_MODE else "log")
    logger.info("process %d of %d (pid %d) on %s, %s; output folder %s", rank, world_size, os.getpid(), device,
                describe_process_group(), os.path.abspath(config.OUTPUT))
    logger.info("global batch %d (%d per process x %d processes x %d accumulation steps); effective lr %.3g, "
                "warmup lr %.3g, min lr %.3g", config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS,
                config.DATA.BATCH_SIZE, world_size, config.TRAIN.ACCUMULATION_STEPS, config.TRAIN.BASE_LR,
                config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR)
    if config.FUSED_LAYERNORM:
        logger.info("FUSED_LAYERNORM: torch's LayerNorm is already a single fused kernel; nothing to switch")
    if device.type == "cpu" and keep_freed_memory():
        logger.info("CPU run: malloc keeps freed memory for reuse (no page faults on every step; README, Performance)")
    seed_everything(config.SEED + rank)
    if config.THROUGHPUT_MODE:
        run_throughput(config, device)
        return 0
    from data import build_loader
    with fail_together("reading the data"):
        loaders = build_loader(config, rank=rank, world_size=world_size, eval_only=config.EVAL_MODE, device=device)
    model, model_ema, train_model = prepare_model(config, device)
    if config.EVAL_MODE:
        return evaluate_only(config, model, loaders, device)
    with StopSignals() as stop:
        return train(config, model, model_ema, train_model, loaders, device, stop)


def evaluate_only(config: CfgNode, model: nn.Module, loaders, device: torch.device) -> int:
    # As in the reference, --eval evaluates --resume, else the newest checkpoint of the run (auto-resume),
    # else the --pretrained weights.
    weights = load_eval_weights(config, model)
    if weights is None:
        logger.warning("evaluating randomly initialised weights: give --resume or --pretrained")
    else:
        logger.info("evaluating %s", weights)
    objective = build_objective(config)
    with evaluation_model(model, device) as evaluated:
        metrics = validate(evaluated, loaders.val_loader, device, build_precision(config, evaluation=True),
                           len(loaders.val_dataset), config.PRINT_FREQ, objective=objective)
    if objective.name == "classification":
        logger.info("accuracy of the network on the %d test images: acc@1 %.3f%% acc@5 %.3f%% loss %.4f",
                    metrics["count"], metrics["acc1"], metrics["acc5"], metrics["loss"])
    with fail_together("writing eval.json"):
        if is_main_process():
            with open(os.path.join(config.OUTPUT, "eval.json"), "w") as f:
                json.dump(metrics, f, indent=1)
    return 0


def train(config: CfgNode, model: nn.Module, model_ema, train_model: nn.Module, loaders, device: torch.device,
          stop: StopSignals) -> int:
    """Trains to TRAIN.EPOCHS from where the run stands; ``stop`` ends it cleanly on a signal (see preemption.py)."""
    optimizer = build_optimizer(config, model, device)
    accum = config.TRAIN.ACCUMULATION_STEPS
    batches_per_epoch = len(loaders.train_loader)
    updates_per_epoch = math.ceil(batches_per_epoch / accum)
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch)
    precision = build_precision(config)
    criterion = build_criterion(config, loaders.mixup_fn is not None)
    objective = build_objective(config, criterion, loaders.mixup_fn)
    parts = TrainParts(model=train_model, criterion=criterion, objective=objective,
                       optimizer=optimizer, lr_scheduler=lr_scheduler,
                       scaler=torch.amp.GradScaler(device.type) if precision.needs_scaler else None,
                       model_ema=model_ema, mixup_fn=loaders.mixup_fn, clip_grad=config.TRAIN.CLIP_GRAD,
                       accumulation_steps=accum, max_skipped_steps=config.TRAIN.MAX_SKIPPED_STEPS)
    state, resumed_from = resume_training(config, model, optimizer, lr_scheduler, parts.scaler, model_ema,
                                          updates_per_epoch, batches_per_epoch)
    if resumed_from is None and not objective.higher_is_better:
        state.max_accuracy = -math.inf  # a best loss is kept negated; any first validation is the best so far
    if resumed_from is not None and state.epoch >= config.TRAIN.EPOCHS:
        logger.info("already finished at epoch %d (checkpoint %s); nothing to do. To train longer, raise "
                    "TRAIN.EPOCHS (now %d); for a new run, give --tag NEW_NAME", state.epoch, resumed_from,
                    config.TRAIN.EPOCHS)
        return 0
    with fail_together("writing config.yaml"):
        if is_main_process():
            # What another run left beyond this run's starting point is moved aside, never replaced (run_history.py).
            set_aside_other_history(config.OUTPUT, resumed_from, (state.epoch, state.update))
            # Written only once everything has started, so a failed start leaves the folder as it was.
            with open(os.path.join(config.OUTPUT, "config.yaml"), "w") as f:
                f.write(cfg_lib.to_yaml(config))
        writer = SummaryWriter(config.OUTPUT) if is_main_process() else None

    def log_scalar(tag: str, value: float, step: int) -> None:
        if writer is not None:
            writer.add_scalar(tag, value, step)

    eval_precision = build_precision(config, evaluation=True)
    if is_compiled(train_model):
        warm_up(lambda: micro_step(parts, *synthetic_batch(config, model, device), device, precision, accum, True),
                lambda: optimizer.zero_grad(set_to_none=True), device)
    logger.info("training from epoch %d update %d to epoch %d (%d updates per epoch)", state.epoch,
                state.update, config.TRAIN.EPOCHS, updates_per_epoch)
    start = time.time()
    for epoch in range(state.epoch, config.TRAIN.EPOCHS):
        if epoch != state.epoch:
            state.epoch, state.update, state.images, state.loss_sum = epoch, 0, 0, 0.0
        if state.update == 0:  # within an epoch, a resumed run has its checkpoint's streams back
            seed_epoch(config.SEED, get_rank(), epoch)
        loaders.train_sampler.set_epoch(epoch)
        if state.update:
            loaders.train_sampler.skip(state.update * accum * config.DATA.BATCH_SIZE)

        def save(current: EpochState, complete: bool, acc1=None, is_best=False) -> None:
            batches_done = min(current.update * accum, batches_per_epoch)
            current.images = batches_done * config.DATA.BATCH_SIZE * get_world_size()
            save_training_checkpoint(config, model, optimizer, lr_scheduler, parts.scaler, model_ema, current, complete,
                                     acc1, is_best)

        def save_due(current: EpochState) -> bool:
            if current.update == updates_per_epoch:
                return False  # the epoch-end checkpoint follows (a stop request is honoured there)
            # Asked on every process after every update, so the stop request is agreed at the same update.
            return stop.stop_now() or (bool(config.TRAIN.SAVE_ITERS) and current.update % config.TRAIN.SAVE_ITERS == 0)

        def save_mid_epoch(current: EpochState) -> None:
            save(current, complete=False)
            if stop.agreed:
                raise stop.stopped(f"epoch {current.epoch} update {current.update} of {updates_per_epoch}",
                                   os.path.join(config.OUTPUT, checkpoint_name(current.epoch, current.update, False, config.TRAIN.FSDP)))

        try:
            train_metrics = train_one_epoch(parts, loaders.train_loader, state, device, precision, config.PRINT_FREQ,
                                            len(loaders.train_loader), save_due, save_mid_epoch, log_scalar)
        except NonFiniteLossError as error:
            newest = resume_candidates(config.OUTPUT)
            if newest:
                advice = (f"Last good checkpoint: {newest[0]}; it is intact: rerun (with the changes above, which "
                          "a resumed run honours) to resume from it.")
            else:
                advice = ("No checkpoint was saved yet: rerun (with the changes above) to start again from the "
                          "beginning.")
            raise NonFiniteLossError(f"{error} {advice}") from error
        with evaluation_model(model, device) as evaluated:
            metrics = validate(evaluated, loaders.val_loader, device, eval_precision, len(loaders.val_dataset),
                               objective=objective)
            with fail_together("drawing the validation images"):
                if writer is not None:
                    objective.log_images(evaluated, loaders.val_dataset, writer, (epoch + 1) * updates_per_epoch)
        # The best figure is kept as "max accuracy"; for SimMIM it is minus the reconstruction loss.
        score = objective.score(metrics)
        is_best = score > state.max_accuracy
        state.max_accuracy = max(state.max_accuracy, score)
        last = epoch == config.TRAIN.EPOCHS - 1
        stopping = not last and stop.stop_now(current=True)
        if epoch % config.SAVE_FREQ == 0 or last or is_best or stopping:
            save(state, complete=True, acc1=metrics.get("acc1"), is_best=is_best)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_metrics.items()},
                  **{f"val_{k}": v for k, v in metrics.items()},
                  **({"max_acc1": state.max_accuracy} if objective.higher_is_better
                     else {"best_loss": -state.max_accuracy})}
        if model_ema is not None:
            with evaluation_model(model_ema.module, device) as evaluated:
                ema_metrics = validate(evaluated, loaders.val_loader, device, eval_precision,
                                       len(loaders.val_dataset), objective=objective)
            record.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        logger.info("%s", objective.summary(metrics, state.max_accuracy))
        with fail_together("writing the epoch's metrics"):
            for key in [k for k in ("acc1", "acc5", "loss") if k in metrics]:
                log_scalar(f"val/{key}", metrics[key], (epoch + 1) * updates_per_epoch)
            if is_main_process():
                with open(os.path.join(config.OUTPUT, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
        if stopping:
            raise stop.stopped(f"the end of epoch {epoch}",
                               os.path.join(config.OUTPUT, checkpoint_name(epoch, updates_per_epoch, True, config.TRAIN.FSDP)))
    if writer is not None:
        writer.close()
    logger.info("training time %s", time.strftime("%H:%M:%S", time.gmtime(time.time() - start)))
    return 0


def cli(argv=None) -> int:
    """Runs :func:`main`; a failure the user can fix ends with its message and exit code 2, no traceback.

    Under torchrun a failure of this process alone is announced to the others, which then end at once with its
    message (``utils.announce_failure``) instead of waiting for this one in a collective; an error that only
    follows a peer's announced failure (its connection closed) is reported as that failure.
    """
    from data import DataError

    clean = False  # every process ends at this same point: leaving the process group cannot wait for a peer
    try:
        status = main(argv)
        clean = True
        return status
    except TrainingStopped as stopped:
        clean = True
        logger.warning("%s", stopped)
        if not logging.getLogger().handlers:
            print(stopped, file=sys.stderr)
        return stopped.exit_status
    except KeyboardInterrupt:
        message = "interrupted by Ctrl-C; nothing saved since the last checkpoint (exit status 130)"
        if logging.getLogger().handlers:
            logger.warning("%s", message)
        else:
            print(message, file=sys.stderr)
        return exit_status(signal.SIGINT)
    except (ConfigError, CheckpointError, NonFiniteLossError, DataError, PeerFailure) as error:
        announce_failure(error)
        _report_error(str(error))
        return 2
    except Exception as error:
        peer = announced_failure()
        if peer is None:
            announce_failure(error)
            raise
        _report_error(f"stopped because {peer}")
        return 2
    finally:
        if clean:
            # A process group left open at exit can hang the interpreter's shutdown.
            shutdown_distributed()


def _report_error(message: str) -> None:
    if logging.getLogger().handlers:  # without handlers, logging's last resort would repeat it on stderr
        logger.error("%s", message)
    print(f"error: {message}", file=sys.stderr)


if __name__ == "__main__":
    exit_process(cli())
