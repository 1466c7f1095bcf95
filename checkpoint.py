"""Checkpoints: crash-safe writing with a manifest, resuming a run, and loading pretrained weights."""
import json
import logging
import os
import pickle
import zipfile
from typing import Any, Dict, List, Optional

import torch

from engine import EpochState
from utils import gather_rng_states, get_rank, get_world_size, is_main_process, set_rng_state

logger = logging.getLogger(__name__)

MANIFEST = "checkpoints.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the file and the reason."""


# --------------------------------------------------------------------------- checkpoint files

def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Reads a checkpoint with ``weights_only=True`` and turns every failure into a clear message.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or a pickle that would run code.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refused to load {path}: it needs arbitrary code to unpickle, which could run anything on this "
            f"machine. Only tensors, numbers, strings and containers are accepted (torch.load weights_only=True). "
            f"If you trust the file, re-save its state dict with plain tensors. Detail: {error}") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({error})") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict or state dict")
    return checkpoint


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """Writes ``obj`` to ``path`` so that a crash at any moment leaves either the old file or the new one.

    Raises:
        CheckpointError: the write failed (disk full, no permission); ``path`` is untouched.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except (OSError, RuntimeError) as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not write checkpoint {path}: {error}. The previous checkpoints are intact; "
                              f"free space or fix permissions on {os.path.dirname(os.path.abspath(path))}") from error


def _atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not write {path}: {error}") from error


def read_manifest(output_dir: str) -> List[Dict[str, Any]]:
    """The valid checkpoints of a run, oldest first (entries: file, epoch, step, complete, acc1)."""
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            return json.load(f)["checkpoints"]
    except (ValueError, KeyError) as error:
        logger.warning("ignoring unreadable checkpoint manifest %s (%s); scanning the folder instead", path, error)
        return []


def checkpoint_name(epoch: int, step: int, complete: bool) -> str:
    """Reference name ``ckpt_epoch_{epoch}.pth`` at epoch ends; mid-epoch saves add the step."""
    return f"ckpt_epoch_{epoch}.pth" if complete else f"ckpt_epoch_{epoch}_step_{step}.pth"


def save_checkpoint(state: Dict[str, Any], output_dir: str, epoch: int, step: int, complete: bool,
                    keep: int, acc1: Optional[float] = None, is_best: bool = False) -> str:
    """Writes a training checkpoint atomically, records it in the manifest and applies retention.

    Keeps the newest ``keep`` checkpoints plus the best one (``ckpt_best.pth``, a copy).

    Returns:
        The path written.
    """
    name = checkpoint_name(epoch, step, complete)
    path = os.path.join(output_dir, name)
    atomic_torch_save(state, path)
    if is_best:
        atomic_torch_save(state, os.path.join(output_dir, "ckpt_best.pth"))
    entries = [e for e in read_manifest(output_dir) if e["file"] != name]
    entries.append({"file": name, "epoch": epoch, "step": step, "complete": complete, "acc1": acc1})
    stale = entries[:-keep] if keep > 0 else []
    entries = entries[len(stale):]
    _atomic_write_text(json.dumps({"checkpoints": entries}, indent=1), os.path.join(output_dir, MANIFEST))
    for entry in stale:
        stale_path = os.path.join(output_dir, entry["file"])
        if os.path.exists(stale_path):
            os.remove(stale_path)
    logger.info("saved %s", path)
    return path


def resume_candidates(output_dir: str) -> List[str]:
    """Checkpoints to try for auto-resume, newest first: the manifest's, else any ``ckpt_*.pth`` by time."""
    entries = read_manifest(output_dir)
    if entries:
        return [os.path.join(output_dir, e["file"]) for e in reversed(entries)]
    if not os.path.isdir(output_dir):
        return []
    files = [os.path.join(output_dir, f) for f in os.listdir(output_dir)
             if f.startswith("ckpt_") and f.endswith(".pth") and f != "ckpt_best.pth"]
    return sorted(files, key=os.path.getmtime, reverse=True)


def find_resumable(output_dir: str) -> Optional[Dict[str, Any]]:
    """Loads the newest readable checkpoint of a run, falling back past broken ones with a warning.

    Returns:
        The checkpoint dict with its path under ``"path"``, or None when the run has none.
    """
    for path in resume_candidates(output_dir):
        try:
            checkpoint = load_checkpoint_file(path)
        except CheckpointError as error:
            logger.warning("cannot resume from %s: %s; trying the previous checkpoint", path, error)
            continue
        checkpoint["path"] = path
        return checkpoint
    return None


# --------------------------------------------------------------------------- pretrained weights and resuming

MAP_22K_TO_1K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "map22kto1k.txt")


def extract_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a released file (``model``), a training checkpoint, or a plain state dict."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise CheckpointError(f"no model weights found; top-level keys are {sorted(checkpoint)[:10]}")


def read_class_map(path: str) -> List[int]:
    """One integer a line: for each class of the model, the row of the pretrained head."""
    try:
        with open(path) as f:
            return [int(line) for line in f if line.strip()]
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read class map {path}: {error}. Expected one integer per line.") from error


def load_pretrained(config, model: torch.nn.Module) -> None:
    """Loads ``MODEL.PRETRAINED`` for fine-tuning: windows, resolution and head adapted, all reported.

    The 21841 -> 1000 head uses the shipped ImageNet-22K -> 1K class map; ``MODEL.PRETRAINED_CLASS_MAP``
    gives a map for any other pair of class sets.
    """
    from config import IMAGENET22K_NUM_CLASSES
    from models.state_dict import adapt_state_dict

    path = config.MODEL.PRETRAINED
    checkpoint = load_checkpoint_file(path)
    try:
        state_dict = extract_state_dict(checkpoint)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    head = state_dict.get("head.weight", state_dict.get("head.fc.weight"))
    class_map_file = None
    if config.MODEL.PRETRAINED_CLASS_MAP:
        class_map_file = config.MODEL.PRETRAINED_CLASS_MAP
    elif head is not None and head.shape[0] == IMAGENET22K_NUM_CLASSES and config.MODEL.NUM_CLASSES == 1000:
        class_map_file = MAP_22K_TO_1K
    class_map = read_class_map(class_map_file) if class_map_file else None
    try:
        adapted, report = adapt_state_dict(state_dict, model, class_map)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from error
    model.load_state_dict(adapted, strict=False)
    if class_map is not None and head is not None:
        logger.info("the head takes %d rows of the pretrained %d-class head, as listed in %s", len(class_map),
                    head.shape[0], class_map_file)
    logger.info("pretrained weights from %s: %s", path, report.summary())


def resume_training(config, model, optimizer=None, lr_scheduler=None, scaler=None, model_ema=None,
                    updates_per_epoch: int = 0) -> EpochState:
    """Restores ``MODEL.RESUME``, else (with ``TRAIN.AUTO_RESUME``) the newest valid checkpoint of the run.

    Optimizer, schedule, scaler and EMA are restored when given (evaluation passes None and takes the
    weights only); RNG states are restored per rank. The driver skips the sampler to the restored position.

    Raises:
        CheckpointError: ``MODEL.RESUME`` is missing, unreadable or of another architecture.
    """
    from models.state_dict import load_state_dict_checked

    if config.MODEL.RESUME:
        checkpoint = load_checkpoint_file(config.MODEL.RESUME)
        checkpoint["path"] = config.MODEL.RESUME
    elif config.TRAIN.AUTO_RESUME:
        checkpoint = find_resumable(config.OUTPUT)
        if checkpoint is None:
            logger.info("no checkpoint in %s; starting from scratch", config.OUTPUT)
            return EpochState(epoch=config.TRAIN.START_EPOCH, updates_per_epoch=updates_per_epoch)
    else:
        return EpochState(epoch=config.TRAIN.START_EPOCH, updates_per_epoch=updates_per_epoch)
    path = checkpoint["path"]
    try:
        load_state_dict_checked(model, extract_state_dict(checkpoint), source=path)
    except ValueError as error:
        raise CheckpointError(str(error)) from error
    logger.info("resumed weights from %s", path)
    if optimizer is None or "optimizer" not in checkpoint:
        return EpochState(epoch=config.TRAIN.START_EPOCH, updates_per_epoch=updates_per_epoch)
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    if model_ema is not None and checkpoint.get("model_ema") is not None:
        model_ema.module.load_state_dict(checkpoint["model_ema"])
    rng = checkpoint.get("rng") or []
    if len(rng) == get_world_size():
        set_rng_state(rng[get_rank()])
    elif rng:
        logger.warning("checkpoint has RNG states of %d processes, this run has %d: random streams are not "
                       "restored, so augmentation differs from an uninterrupted run", len(rng), get_world_size())
    epoch = checkpoint["epoch"]
    complete = checkpoint.get("complete", True)  # reference checkpoints are written at epoch ends
    progress = EpochState(epoch=epoch + 1 if complete else epoch, updates_per_epoch=updates_per_epoch,
                          update=0 if complete else checkpoint.get("step", 0),
                          max_accuracy=checkpoint.get("max_accuracy", 0.0))
    logger.info("continuing at epoch %d, update %d (max accuracy so far %.2f%%)", progress.epoch, progress.update,
                progress.max_accuracy)
    return progress


def save_training_checkpoint(config, model, optimizer, lr_scheduler, scaler, model_ema, state: EpochState,
                             complete: bool, acc1: Optional[float] = None, is_best: bool = False) -> None:
    """Collective: gathers every rank's RNG state, then rank 0 writes the checkpoint atomically."""
    from config import to_yaml

    rng = gather_rng_states()
    if not is_main_process():
        return
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "max_accuracy": state.max_accuracy,
        "epoch": state.epoch,
        "step": state.update,
        "complete": complete,
        "images": state.images,
        "world_size": get_world_size(),
        "skipped_steps": state.skipped_total,
        "rng": rng,
        "config": to_yaml(config),
    }
    save_checkpoint(checkpoint, config.OUTPUT, state.epoch, state.update, complete, config.TRAIN.KEEP_CHECKPOINTS,
                    acc1, is_best)
