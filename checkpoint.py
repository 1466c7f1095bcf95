"""Checkpoints: crash-safe writing with a manifest, resuming a run, and loading pretrained weights."""
import json
import logging
import os
import pickle
import shutil
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import yaml

from checksums import Digest, DigestWriter, file_digest, zip_damage
from engine import EpochState
from fsdp import is_sharded, load_full_state_dict
from utils import (barrier, fail_together, gather_rng_states, get_rank, get_world_size, is_main_process,
                   set_rng_state)

logger = logging.getLogger(__name__)

MANIFEST = "checkpoints.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the file and the reason."""


# --------------------------------------------------------------------------- checkpoint files

def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Checks a checkpoint's checksum, then reads it with ``weights_only=True``; every failure is a clear message.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or a pickle that would run code.
    """
    if os.path.isdir(path) and is_sharded_checkpoint(path):
        return load_sharded_state(path)
    if os.path.isdir(path):
        raise CheckpointError(_folder_without_checkpoint(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_checkpoint_file(path)
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


def _folder_without_checkpoint(path: str) -> str:
    """The message for a folder given where a checkpoint was expected."""
    found = resume_candidates(path)
    if found:
        return (f"{path} is a run folder, not a checkpoint: give one of its checkpoint files, e.g. {found[0]} (its "
                f"newest)")
    return (f"{path} is a folder without a checkpoint in it: give a checkpoint file (.pth), or a sharded checkpoint "
            f"folder (one holding .metadata and {SHARDED_STATE})")


def verify_checkpoint_file(path: str) -> None:
    """Checks a checkpoint file before it is loaded: against the size and CRC-32 that its run's manifest recorded
    when it was written, else (a file without a record: a released file, a copy) against the CRC-32 of each record
    of its zip container. Legacy (non-zip) files without a record cannot be checked.

    Raises:
        CheckpointError: the file is not what was written.
    """
    recorded = recorded_digests(path)
    try:
        if recorded:
            digest = file_digest(path)
            if digest not in recorded:
                raise CheckpointError(
                    f"{path} is truncated or corrupt: it has {digest.describe()}, but when it was written {MANIFEST} "
                    f"recorded {recorded[0].describe()}, so bytes were changed or lost since. Use another checkpoint "
                    "(auto-resume falls back to the previous one by itself), or copy the file again from a good copy")
            return
        damage = zip_damage(path)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if damage:
        raise CheckpointError(f"{path} is truncated or corrupt: {damage}. Use another checkpoint, or copy the file "
                              "again from a good copy")


def recorded_digests(path: str) -> List[Digest]:
    """The checksums a manifest recorded for ``path`` (a checkpoint file, ``ckpt_best.pth``, or a file inside a
    sharded checkpoint folder), the current one first; empty when none did."""
    folder, name = os.path.split(os.path.abspath(path))
    manifest = read_manifest_dict(folder, quiet=True)
    for entry in manifest["checkpoints"]:
        if entry.get("file") == name:
            return _record_digests(entry)
    if name == BEST and manifest.get("best"):
        return _record_digests(manifest["best"])
    parent, folder_name = os.path.split(folder)
    for entry in read_manifest_dict(parent, quiet=True)["checkpoints"]:
        if entry.get("file") == folder_name and name in (entry.get("files") or {}):
            return [Digest(*entry["files"][name])]
    return []


def _record_digests(record: Dict[str, Any]) -> List[Digest]:
    if "crc32" not in record:  # written before checksums were recorded
        return []
    return [Digest(record["size"], record["crc32"])] + [Digest(*pending) for pending in record.get("pending", [])]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str, before_replace: Optional[Callable[[Digest], None]] = None) -> Digest:
    """Writes ``obj`` to ``path`` so that a crash at any moment leaves either the old file or the new one.

    Args:
        before_replace: called with the new file's digest once it is on disk, before it takes the final name.

    Returns:
        The size and CRC-32 of the file written (computed while writing).

    Raises:
        CheckpointError: the write failed (disk full, no permission); ``path`` is untouched.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            writer = DigestWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(writer.digest)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except (OSError, RuntimeError) as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not write checkpoint {path}: {error}. The previous checkpoints are intact; "
                              f"free space or fix permissions on {os.path.dirname(os.path.abspath(path))}") from error
    return writer.digest


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


def read_manifest_dict(output_dir: str, quiet: bool = False) -> Dict[str, Any]:
    """A run's manifest: ``checkpoints`` (the valid ones, oldest first; entries: file, epoch, step, complete, acc1,
    size and crc32 or, for a sharded folder, files) and ``best`` (``ckpt_best.pth``: epoch, step, score, acc1, the
    checkpoint it copies, size, crc32), or None. Empty when there is none or it is unreadable."""
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(path):
        return {"checkpoints": [], "best": None}
    try:
        with open(path) as f:
            manifest = json.load(f)
        return {"checkpoints": list(manifest["checkpoints"]), "best": manifest.get("best")}
    except (ValueError, KeyError, TypeError, OSError) as error:
        if not quiet:
            logger.warning("ignoring unreadable checkpoint manifest %s (%s); scanning the folder instead", path,
                           error)
        return {"checkpoints": [], "best": None}


def read_manifest(output_dir: str) -> List[Dict[str, Any]]:
    """The valid checkpoints of a run, oldest first (entries: file, epoch, step, complete, acc1, checksums)."""
    return read_manifest_dict(output_dir)["checkpoints"]


def write_manifest(output_dir: str, entries: List[Dict[str, Any]], best: Optional[Dict[str, Any]]) -> None:
    """Replaces the manifest of ``output_dir`` atomically."""
    _atomic_write_text(json.dumps({"checkpoints": entries, "best": best}, indent=1),
                       os.path.join(output_dir, MANIFEST))


def checkpoint_name(epoch: int, step: int, complete: bool, sharded: bool = False) -> str:
    """Reference name ``ckpt_epoch_{epoch}.pth`` at epoch ends; mid-epoch saves add the step. A sharded
    checkpoint (``TRAIN.FSDP``) is a folder of the same name without ``.pth``."""
    name = f"ckpt_epoch_{epoch}" if complete else f"ckpt_epoch_{epoch}_step_{step}"
    return name if sharded else name + ".pth"


BEST = "ckpt_best.pth"
# Where a run folder keeps the files of another history (see run_history.py).
ASIDE_PREFIX = "earlier_run_"


def save_checkpoint(state: Dict[str, Any], output_dir: str, epoch: int, step: int, complete: bool,
                    keep: int, acc1: Optional[float] = None, is_best: bool = False) -> str:
    """Writes a training checkpoint atomically, records it with its checksum in the manifest and applies retention.

    Keeps the newest ``keep`` checkpoints plus the best one (``ckpt_best.pth``, a copy, replaced only by a better
    one; see :func:`save_best`).

    Returns:
        The path written.
    """
    name = checkpoint_name(epoch, step, complete)
    path = os.path.join(output_dir, name)
    digest = atomic_torch_save(state, path, before_replace=_pending_record(output_dir, name))
    best = None
    if is_best:
        best = save_best(state, output_dir, name, epoch, step, state.get("max_accuracy"), acc1)
    _record_checkpoint(output_dir, {"file": name, "epoch": epoch, "step": step, "complete": complete, "acc1": acc1,
                                    "size": digest.size, "crc32": digest.crc32}, keep, best)
    logger.info("saved %s", path)
    return path


def _pending_record(output_dir: str, name: str) -> Callable[[Digest], None]:
    """What :func:`atomic_torch_save` calls before a file takes its final name: when the manifest already records a
    file of that name (ckpt_best.pth, or a position saved again), the new checksum is recorded beside the old one
    first, so that a crash between the rename and the manifest's update leaves a file the manifest accepts."""
    def record(digest: Digest) -> None:
        manifest = read_manifest_dict(output_dir)
        records = [e for e in manifest["checkpoints"] if e.get("file") == name]
        if name == BEST and manifest["best"]:
            records.append(manifest["best"])
        for entry in (r for r in records if "crc32" in r):
            entry["pending"] = [list(digest)]
        if any("pending" in r for r in records):
            write_manifest(output_dir, manifest["checkpoints"], manifest["best"])
    return record


def _describe_score(score: Optional[float], acc1: Optional[float]) -> str:
    if acc1 is not None:
        return f"acc@1 {acc1:.2f}%"
    if score is not None:
        return f"validation loss {-score:.4f}" if score <= 0 else f"score {score:.4f}"
    return "score unknown"


def save_best(obj: Dict[str, Any], output_dir: str, source: str, epoch: int, step: int, score: Optional[float],
              acc1: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """Writes ``obj`` as ``ckpt_best.pth`` when ``score`` (acc@1, or minus the loss) beats the best the folder
    holds, and logs which checkpoint replaces which.

    Returns:
        The manifest's new ``best`` record, or None when the folder's best was kept.
    """
    held = read_manifest_dict(output_dir)["best"] or _unrecorded_best(output_dir)
    new = f"epoch {epoch} ({_describe_score(score, acc1)})"  # a best is validated at an epoch's end
    if held and held.get("score") is not None and score is not None and score <= held["score"]:
        logger.info("%s kept: it holds epoch %s (%s), at least as good as %s", BEST, held.get("epoch"),
                    _describe_score(held["score"], held.get("acc1")), new)
        return None
    digest = atomic_torch_save(obj, os.path.join(output_dir, BEST), before_replace=_pending_record(output_dir, BEST))
    if held:
        logger.info("%s is now %s from %s, replacing epoch %s (%s)", BEST, new, source, held.get("epoch"),
                    _describe_score(held.get("score"), held.get("acc1")))
    else:
        logger.info("%s is now %s from %s", BEST, new, source)
    return {"file": BEST, "source": source, "epoch": epoch, "step": step, "score": score, "acc1": acc1,
            "size": digest.size, "crc32": digest.crc32}


def _unrecorded_best(output_dir: str) -> Optional[Dict[str, Any]]:
    """The epoch and score of a ``ckpt_best.pth`` that the manifest does not describe (written by an earlier version),
    read without loading its tensors; None when there is none or it is unreadable."""
    path = os.path.join(output_dir, BEST)
    if not os.path.isfile(path):
        return None
    try:
        held = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {"epoch": held.get("epoch"), "score": held.get("max_accuracy"), "acc1": None}
    except Exception:  # an unreadable old best is replaced, as before  # noqa: BLE001
        return None


def _record_checkpoint(output_dir: str, entry: Dict[str, Any], keep: int,
                       best: Optional[Dict[str, Any]] = None) -> None:
    """Lists a written checkpoint (file or sharded folder) in the manifest (with a new ``best`` record, if given) and
    removes those past retention."""
    manifest = read_manifest_dict(output_dir)
    entries = [e for e in manifest["checkpoints"] if e["file"] != entry["file"]]
    entries.append(entry)
    stale = entries[:-keep] if keep > 0 else []
    entries = entries[len(stale):]
    held = best or manifest["best"]
    if held:
        held.pop("pending", None)
    write_manifest(output_dir, entries, held)
    for old in stale:
        stale_path = os.path.join(output_dir, old["file"])
        if os.path.isdir(stale_path):
            shutil.rmtree(stale_path, ignore_errors=True)
        elif os.path.exists(stale_path):
            os.remove(stale_path)


def resume_candidates(output_dir: str) -> List[str]:
    """Checkpoints to try for auto-resume, newest first: the manifest's, else any ``ckpt_*.pth`` by time."""
    entries = read_manifest(output_dir)
    if entries:
        return [os.path.join(output_dir, e["file"]) for e in reversed(entries)]
    if not os.path.isdir(output_dir):
        return []
    files = [os.path.join(output_dir, f) for f in os.listdir(output_dir)
             if f.startswith("ckpt_") and f != BEST
             and (f.endswith(".pth") or is_sharded_checkpoint(os.path.join(output_dir, f)))]
    return sorted(files, key=os.path.getmtime, reverse=True)


def find_resumable(output_dir: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Loads the newest readable checkpoint of a run, falling back past broken ones with a warning.

    Returns:
        ``(path, checkpoint dict)``, or None when the run has none.
    """
    for path in resume_candidates(output_dir):
        try:
            checkpoint = load_checkpoint_file(path)
        except CheckpointError as error:
            logger.warning("cannot resume from %s: %s; trying the previous checkpoint", path, error)
            continue
        return path, checkpoint
    return None


# --------------------------------------------------------------------------- pretrained weights and resuming

MAP_22K_TO_1K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "map22kto1k.txt")


def extract_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a released file (``model``), a training checkpoint, or a plain state dict."""
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(checkpoint.get(key), dict):
            weights = checkpoint[key]
            odd = [(name, value) for name, value in weights.items() if not isinstance(value, torch.Tensor)]
            if odd:
                name, value = odd[0]
                raise CheckpointError(f"its model weights ('{key}') must all be tensors, but {len(odd)} are not, e.g. "
                                      f"{name!r} is a {type(value).__name__}; this is not a checkpoint of a model")
            return weights
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise CheckpointError(f"no model weights found; top-level keys are {sorted(map(str, checkpoint))[:10]}")


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
    if checkpoint.get("sharded_dir"):
        released = os.path.join(path, RELEASED_MODEL)  # written at epoch ends
        if not os.path.isfile(released):
            raise CheckpointError(f"{path} is a mid-epoch sharded checkpoint without {RELEASED_MODEL}: convert it "
                                  f"with python tools/export_fsdp_checkpoint.py {path} OUT.pth, then --pretrained OUT.pth")
        path, checkpoint = released, load_checkpoint_file(released)
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
    if report.class_mapped and head is not None:
        logger.info("the head takes %d rows of the pretrained %d-class head, as listed in %s", len(class_map),
                    head.shape[0], class_map_file)
    logger.info("pretrained weights from %s: %s", path, report.summary())


# Keys that shape the model's weights: a checkpoint trained with other values cannot be continued. Besides
# these, every key of the model family's own section (MODEL.SWIN, MODEL.SWINV2 or MODEL.SWIN_MLP) but ATTN_IMPL,
# which only picks how attention is computed (same weights, same outputs). TRAIN.OBJECTIVE picks a SimMIM model
# or a classifier.
ARCHITECTURE_KEYS = ("MODEL.TYPE", "MODEL.NUM_CLASSES", "TRAIN.OBJECTIVE")
# Keys that decide the optimizer's kind or its parameter groups.
OPTIMIZER_KEYS = ("TRAIN.OPTIMIZER.NAME", "TRAIN.LAYER_DECAY")


def flatten_config(node: Any, prefix: str = "") -> Dict[str, Any]:
    """A config (CfgNode or nested dict) as ``{"TRAIN.EPOCHS": 300, ...}``."""
    flat: Dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def config_changes(saved_yaml: Optional[str], config) -> Dict[str, Tuple[Any, Any]]:
    """Every key whose value differs between a checkpoint's saved config and ``config``: key -> (saved, now).

    A key that one side lacks (a config of another version) counts as changed, with None on that side.
    """
    if not saved_yaml:
        return {}
    try:
        saved = yaml.safe_load(saved_yaml)
    except yaml.YAMLError:
        logger.warning("the checkpoint's saved config is not readable YAML; changes are not checked")
        return {}
    old, new = flatten_config(saved or {}), flatten_config(config)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def _is_architecture_key(key: str, config) -> bool:
    from config import MODEL_SECTIONS

    section = f"MODEL.{MODEL_SECTIONS.get(config.MODEL.TYPE, 'SWIN')}."
    if key.startswith(section):
        return not key.endswith(".ATTN_IMPL")
    return key in ARCHITECTURE_KEYS


def _cannot_continue(path: str, config, key: str, old: Any, new: Any, why: str) -> CheckpointError:
    """The message for a change that a resumed run cannot honour: the key, both values and the ways out."""
    if config.MODEL.RESUME:
        ways = (f"resume with {key} {old!r} as the checkpoint has it, or fine-tune from its weights with "
                f"--pretrained {path} instead of --resume")
    else:
        ways = (f"to train with {key} {new!r}, start a new run with --tag NEW_NAME (or --opts TRAIN.AUTO_RESUME "
                f"False to start over in {config.OUTPUT}, which sets this run's files aside in "
                f"{ASIDE_PREFIX}N/ there); to continue this run, set {key} back to {old!r}")
    return CheckpointError(f"cannot resume from {path}: {key} is {new!r} but the checkpoint was trained with "
                           f"{old!r}, and {why}. To fix: {ways}")


def locate_checkpoint(config) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The checkpoint to continue from: ``MODEL.RESUME`` (a file, or a run folder: its newest valid checkpoint),
    else with ``TRAIN.AUTO_RESUME`` the newest valid checkpoint of this run, else None.

    Raises:
        CheckpointError: ``MODEL.RESUME`` is missing or unreadable, or a folder holding no readable checkpoint.
    """
    path = config.MODEL.RESUME
    if path and os.path.isdir(path) and not is_sharded_checkpoint(path):
        found = find_resumable(path)
        if found is None:
            raise CheckpointError(f"--resume {path} is a folder, and it holds no readable checkpoint "
                                  f"(ckpt_*.pth listed in {MANIFEST}); give a checkpoint file")
        logger.info("--resume %s is a folder: taking its newest valid checkpoint, %s", path, found[0])
        return found
    if path:
        return path, load_checkpoint_file(path)
    if config.TRAIN.AUTO_RESUME:
        return find_resumable(config.OUTPUT)
    return None


def load_model_weights(model: torch.nn.Module, checkpoint: Dict[str, Any], path: str, config) -> None:
    """Loads a checkpoint's weights strictly: a training checkpoint, a released file, a plain or timm-layout
    state dict. An architecture key that differs from the checkpoint's saved config is named first.

    Raises:
        CheckpointError: no weights in the file, or weights of another architecture.
    """
    from models.state_dict import drop_derived_buffers, is_timm_layout, load_state_dict_checked, timm_to_ours

    for key, (old, new) in config_changes(checkpoint.get("config"), config).items():
        if _is_architecture_key(key, config) and old is not None:
            raise _cannot_continue(path, config, key, old, new, "its weights do not fit this model")
    if checkpoint.get("sharded_dir"):
        load_sharded_weights(model, checkpoint["sharded_dir"], "model")
        return
    try:
        state_dict = extract_state_dict(checkpoint)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    if is_timm_layout(state_dict):
        state_dict = timm_to_ours(state_dict)
    try:
        if is_sharded(model):
            load_full_state_dict(model, drop_derived_buffers(state_dict)[0])
            return
        load_state_dict_checked(model, state_dict, source=path)
    except ValueError as error:
        resized = _image_size_change(path, checkpoint, config)
        raise CheckpointError(resized or f"{error}; to fine-tune from these weights instead, use --pretrained "
                                         f"{path}") from error


def stage_windows(config, image_size: int) -> List[int]:
    """The attention window of each stage at ``image_size``: the configured one, or a stage's whole map when that is
    smaller (as the model clips it)."""
    from config import MODEL_SECTIONS

    section = config.MODEL[MODEL_SECTIONS.get(config.MODEL.TYPE, "SWIN")]
    tokens = image_size // section.PATCH_SIZE
    return [min(section.WINDOW_SIZE, tokens // 2 ** stage) for stage in range(len(section.DEPTHS))]


def _image_size_change(path: str, checkpoint: Dict[str, Any], config) -> Optional[str]:
    """The message for weights that do not fit because DATA.IMG_SIZE changed since they were trained (it sets the
    windows of the stages whose map is smaller than the window, and the absolute position embedding), or None."""
    old, new = config_changes(checkpoint.get("config"), config).get("DATA.IMG_SIZE", (None, None))
    if old is None:
        return None
    windows = (stage_windows(config, old), stage_windows(config, new))
    why = (f"the window of each stage is clipped to the stage's map when that is smaller (windows per stage: "
           f"{windows[0]} at {old} px, {windows[1]} at {new} px), so its position-bias tables have other shapes"
           if windows[0] != windows[1] else "the absolute position embedding has one entry per patch")
    return (f"cannot load {path} at DATA.IMG_SIZE {new}: it was trained at DATA.IMG_SIZE {old}, and {why}. Evaluate "
            f"or resume it at --opts DATA.IMG_SIZE {old}, or fine-tune from it at {new} px with --pretrained {path} "
            "(the tables are resized)")


def load_eval_weights(config, model: torch.nn.Module) -> Optional[str]:
    """What ``--eval`` evaluates: ``MODEL.RESUME``, else the ``MODEL.PRETRAINED`` weights (loaded when the model was
    built; a run folder's checkpoints do not override weights named on the command line), else the run's newest
    checkpoint (auto-resume).

    Returns:
        A description of the weights, or None when the model keeps its random initialisation.
    """
    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        return f"pretrained weights {config.MODEL.PRETRAINED}"
    found = locate_checkpoint(config)
    if found is not None:
        path, checkpoint = found
        load_model_weights(model, checkpoint, path, config)
        return f"checkpoint {path}"
    return None


def position_in_images(images: int, batch_size: int, accumulation_steps: int, world_size: int,
                       batches_per_epoch: int) -> Tuple[int, int]:
    """Maps the training images done in an epoch to whole optimizer updates of the current run.

    Args:
        images: images of the epoch done, all processes together (what the checkpoint stores).
        batch_size: images per process per micro-batch now.
        accumulation_steps: micro-batches per update now.
        world_size: processes now.
        batches_per_epoch: micro-batches each process runs in a whole epoch now.

    Returns:
        ``(updates, images)``: the updates done at the current sizes and the images they cover; fewer images
        than given when ``images`` is not a whole number of updates now (those are trained again).
    """
    per_update = batch_size * accumulation_steps * world_size
    updates = min(images // per_update, batches_per_epoch // accumulation_steps)
    return updates, updates * per_update


def _checkpoint_images(checkpoint: Dict[str, Any], saved: Dict[str, Any]) -> int:
    """Images of the epoch done at a mid-epoch checkpoint; older checkpoints only stored updates."""
    if "images" in checkpoint:
        return int(checkpoint["images"])
    world_size = checkpoint.get("world_size") or len(checkpoint.get("rng") or []) or 1
    return (int(checkpoint.get("step", 0)) * int(saved.get("TRAIN.ACCUMULATION_STEPS", 1))
            * int(saved.get("DATA.BATCH_SIZE", 0)) * world_size)


def _restore_optimizer(optimizer: torch.optim.Optimizer, saved: Dict[str, Any], path: str, config,
                       changes: Dict[str, Tuple[Any, Any]], model: Optional[torch.nn.Module] = None) -> None:
    """Loads the optimizer's per-parameter state and keeps the hyperparameters of the current config."""
    for key in OPTIMIZER_KEYS[:1]:
        if key in changes and changes[key][0] is not None:
            old, new = changes[key]
            raise _cannot_continue(path, config, key, old, new, "the optimizer's state (its moments) belongs "
                                   "to the other optimizer")
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:
        why = (f"it splits the parameters into {len(sizes)} optimizer groups where the checkpoint has "
               f"{len(saved_sizes)}, so the optimizer's state cannot be matched to the parameters")
        for key in (k for k in changes if k in OPTIMIZER_KEYS or _is_architecture_key(k, config)):
            raise _cannot_continue(path, config, key, *changes[key], why)
        raise CheckpointError(f"cannot resume from {path}: {why}. Start a new run with --tag NEW_NAME (or "
                              f"--opts TRAIN.AUTO_RESUME False, which sets this run's files aside in {ASIDE_PREFIX}N/)")
    # load_state_dict would also bring back the saved learning rates, weight decay, betas and layer scales;
    # the current config decides those, so they are put back afterwards.
    current = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if saved.get("sharded"):
        load_sharded_optimizer(model, optimizer, path)
    elif model is not None and is_sharded(model):
        load_full_optimizer_state(model, optimizer, saved)
    else:
        optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)


def resume_training(config, model, optimizer, lr_scheduler, scaler=None, model_ema=None,
                    updates_per_epoch: int = 1, batches_per_epoch: int = 1) -> Tuple[EpochState, Optional[str]]:
    """Continues from ``MODEL.RESUME``, else (with ``TRAIN.AUTO_RESUME``) the newest valid checkpoint of the run,
    under the current config.

    The weights, the optimizer's per-parameter state, the gradient scaler, the EMA and every rank's RNG state
    are restored. The schedule is the one ``lr_scheduler`` was built with (the current config); only its position
    is restored, and the learning rates are set for the next update at once. One log line lists the config keys
    that differ from the checkpoint's. A mid-epoch position is kept in images, so a changed batch size, number
    of processes or accumulation continues with the images that were not yet trained on.

    Args:
        updates_per_epoch: optimizer updates per epoch of the current run.
        batches_per_epoch: micro-batches per process per epoch of the current run.

    Returns:
        Where to continue, and the checkpoint's path (None when starting from scratch).

    Raises:
        CheckpointError: an unreadable checkpoint, or a change that cannot be honoured (architecture, optimizer
            name, parameter groups), naming the key and what to do.
    """
    start = EpochState(epoch=config.TRAIN.START_EPOCH, updates_per_epoch=updates_per_epoch)
    found = locate_checkpoint(config)
    if found is None:
        if config.TRAIN.AUTO_RESUME and not config.MODEL.RESUME:
            logger.info("no checkpoint in %s; starting from scratch", config.OUTPUT)
        return start, None
    path, checkpoint = found
    changes = config_changes(checkpoint.get("config"), config)
    load_model_weights(model, checkpoint, path, config)
    logger.info("resumed weights from %s", path)
    if model_ema is not None and checkpoint.get("model_ema") is None:
        # The EMA was copied from the initial weights; without a saved EMA it restarts from the resumed ones.
        model_ema.set(model)
    if "optimizer" not in checkpoint:
        logger.info("%s holds weights only: training starts at epoch %d with a fresh optimizer and schedule",
                    path, start.epoch)
        return start, path
    logger.info("config changes since the checkpoint: %s", ", ".join(
        f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()) or "none")
    _restore_optimizer(optimizer, checkpoint["optimizer"], path, config, changes, model)
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    if model_ema is not None and checkpoint.get("sharded_dir") and checkpoint.get("model_ema"):
        load_sharded_weights(model_ema.module, checkpoint["sharded_dir"], "model_ema")
    elif model_ema is not None and is_sharded(model_ema.module) and checkpoint.get("model_ema"):
        load_full_state_dict(model_ema.module, checkpoint["model_ema"])
    elif model_ema is not None and not checkpoint.get("model_ema"):
        model_ema.set(model)  # an EMA switched on at resume starts from the resumed weights
    elif model_ema is not None:
        model_ema.module.load_state_dict(checkpoint["model_ema"])
    rng = checkpoint.get("rng") or []
    if len(rng) == get_world_size():
        set_rng_state(rng[get_rank()])
    elif rng:
        logger.warning("checkpoint has RNG states of %d processes, this run has %d: random streams are not "
                       "restored, so augmentation differs from an uninterrupted run", len(rng), get_world_size())
    state = EpochState(epoch=checkpoint["epoch"] + 1, updates_per_epoch=updates_per_epoch,
                       max_accuracy=checkpoint.get("max_accuracy", 0.0),
                       skipped_total=int(checkpoint.get("skipped_steps") or 0))
    if not checkpoint.get("complete", True):  # reference checkpoints are written at epoch ends
        state.epoch = checkpoint["epoch"]
        _restore_position(state, checkpoint, config, batches_per_epoch)
        # The epoch's loss so far is known when the epoch continues at the checkpoint's own position.
        if state.update and state.images != checkpoint.get("images"):
            state.loss_sum = None
        elif state.update:
            state.loss_sum = checkpoint.get("loss_sum")
    # The schedule counts updates from the start of training at the current sizes.
    lr_scheduler.step_update(state.epoch * updates_per_epoch + state.update)
    logger.info("continuing at epoch %d, update %d (%d images of the epoch done; max accuracy so far %.2f%%); "
                "learning rate %.6g", state.epoch, state.update, state.images, state.max_accuracy,
                optimizer.param_groups[0]["lr"])
    return state, path


def _restore_position(state: EpochState, checkpoint: Dict[str, Any], config, batches_per_epoch: int) -> None:
    """Sets the update and images done in a mid-epoch checkpoint's epoch at the current sizes."""
    saved = flatten_config(yaml.safe_load(checkpoint["config"]) or {}) if checkpoint.get("config") else {}
    images = _checkpoint_images(checkpoint, saved)
    world_size = get_world_size()
    saved_world = checkpoint.get("world_size") or len(checkpoint.get("rng") or []) or world_size
    if saved_world != world_size and config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == "part":
        logger.warning("the checkpoint was written by %d processes, this run has %d: with DATA.CACHE_MODE part "
                       "each process trains on its own shard, which changes with the number of processes, so "
                       "epoch %d restarts from its first image (%d images of it are trained again)",
                       saved_world, world_size, state.epoch, images)
        return
    state.update, state.images = position_in_images(images, config.DATA.BATCH_SIZE,
                                                    config.TRAIN.ACCUMULATION_STEPS, world_size, batches_per_epoch)
    if state.images != images:
        logger.warning("%d images of epoch %d were done, which is not a whole number of updates of %d images "
                       "(DATA.BATCH_SIZE %d x %d processes x TRAIN.ACCUMULATION_STEPS %d) now: the epoch continues "
                       "after %d images, so %d are trained again", images, state.epoch,
                       config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS, config.DATA.BATCH_SIZE,
                       world_size, config.TRAIN.ACCUMULATION_STEPS, state.images, images - state.images)


def _run_state(config, lr_scheduler, scaler, state: EpochState, complete: bool, rng: List[Any]) -> Dict[str, Any]:
    """What a training checkpoint holds besides the model, optimizer and EMA tensors: schedule, scaler, position,
    best figure, every rank's RNG state and the config."""
    from config import to_yaml

    return {
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "max_accuracy": state.max_accuracy,
        "epoch": state.epoch,
        "step": state.update,
        "complete": complete,
        "images": state.images,
        "loss_sum": state.loss_sum if not complete else None,
        "world_size": get_world_size(),
        "skipped_steps": state.skipped_total,
        "rng": rng,
        "config": to_yaml(config),
    }


def save_training_checkpoint(config, model, optimizer, lr_scheduler, scaler, model_ema, state: EpochState,
                             complete: bool, acc1: Optional[float] = None, is_best: bool = False) -> None:
    """Collective: gathers every rank's RNG state, then rank 0 writes the checkpoint atomically."""
    if config.TRAIN.FSDP:
        save_sharded_training_checkpoint(config, model, optimizer, lr_scheduler, scaler, model_ema, state, complete,
                                         acc1, is_best)
        return
    rng = gather_rng_states()
    with fail_together("saving a checkpoint"):  # only rank 0 writes: a failed write must stop every process
        if is_main_process():
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
                **_run_state(config, lr_scheduler, scaler, state, complete, rng),
            }
            save_checkpoint(checkpoint, config.OUTPUT, state.epoch, state.update, complete,
                            config.TRAIN.KEEP_CHECKPOINTS, acc1, is_best)


# --------------------------------------------------------------------------- sharded checkpoints (TRAIN.FSDP)
#
# A sharded checkpoint is a folder, ``ckpt_epoch_N/`` (``ckpt_epoch_N_step_S/`` mid-epoch), holding:
#   .metadata, __R_0.distcp   torch.distributed.checkpoint (DCP): the model, the optimizer's state and the EMA,
#                             each process writing its own shards in parallel (``__R_0.distcp`` from rank R);
#   state.pth                 the run state, as in a single-file checkpoint without its tensors: epoch, position,
#                             every process's RNG state, gradient scaler, best accuracy, config;
#   model.pth                 at epoch ends only: the released format, ``{"model": state_dict}`` with full tensors
#                             and the reference's key names, for --eval, --pretrained, predict.py, other code.
# It is written as ``NAME.tmp/`` and renamed once every process has finished, so a folder with the final name is
# complete; the manifest and retention treat it like a file. DCP reshards on load, so a checkpoint written by N
# processes resumes on any number of processes, with or without FSDP.

SHARDED_STATE = "state.pth"
RELEASED_MODEL = "model.pth"


def is_sharded_checkpoint(path: str) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (rather than a run folder)."""
    return os.path.isfile(os.path.join(path, SHARDED_STATE)) or os.path.isfile(os.path.join(path, ".metadata"))


def load_sharded_state(path: str) -> Dict[str, Any]:
    """The run state of a sharded checkpoint, with ``sharded_dir`` set to the folder (tensors stay on disk).

    Raises:
        CheckpointError: the folder lacks its DCP metadata or its run state, or the state is unreadable.
    """
    for name in (".metadata", SHARDED_STATE):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"cannot read {path}: the sharded checkpoint has no {name} (incomplete)")
    _check_shard_files(path)
    verify_sharded_files(path)
    state = load_checkpoint_file(os.path.join(path, SHARDED_STATE))
    state["sharded_dir"] = path
    return state


def _check_shard_files(path: str) -> None:
    """Checks, from the DCP metadata and the file sizes alone, that every shard file the checkpoint lists is there
    and long enough for its tensors (a partial copy or a truncated file fails here, before any weight is loaded,
    the same way on every process).

    Raises:
        CheckpointError: the metadata is unreadable, or a shard file is missing or truncated.
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
        ends: Dict[str, int] = {}
        for item in metadata.storage_data.values():
            ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    except Exception as error:  # unpickling a damaged file raises many types
        raise CheckpointError(f"cannot read {path}: its .metadata is truncated or corrupt ({error})") from error
    for name, end in sorted(ends.items()):
        shard = os.path.join(path, name)
        if not os.path.isfile(shard):
            raise CheckpointError(f"cannot read {path}: its shard {name} is missing (copied in part?)")
        if os.path.getsize(shard) < end:
            raise CheckpointError(f"cannot read {path}: its shard {name} is truncated ({os.path.getsize(shard)} "
                                  f"bytes, its tensors need {end})")


def _dcp_load(content: Dict[str, Any], path: str) -> None:
    """Fills ``content`` in place from the DCP files of ``path`` (collective when there are several processes)."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(content, checkpoint_id=path)
    except Exception as error:  # DCP wraps the per-process failures in its own exception types
        raise CheckpointError(f"cannot read the sharded checkpoint {path}: {str(error).strip()[:800]}") from error


def load_sharded_weights(module: torch.nn.Module, path: str, key: str) -> None:
    """Loads ``key`` (``model`` or ``model_ema``) of a sharded checkpoint into ``module``, sharded or not."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state_dict = get_model_state_dict(module)
    content = {key: state_dict}
    _dcp_load(content, path)
    set_model_state_dict(module, content[key])


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Loads the optimizer's per-parameter state of a sharded checkpoint (keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state_dict = get_optimizer_state_dict(model, optimizer)
    content = {"optimizer": state_dict}
    _dcp_load(content, path)
    set_optimizer_state_dict(model, optimizer, content["optimizer"])


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> None:
    """Loads a single-file (DDP) checkpoint's optimizer state, keyed by position, into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    converted = {"state": {order[index]: value for index, value in saved["state"].items()},
                 "param_groups": [{**{k: v for k, v in group.items() if k != "params"},
                                   "params": [order[index] for index in group["params"]]}
                                  for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, converted, options=StateDictOptions(full_state_dict=True))


def full_model_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The full weights on rank 0's CPU (collective for a sharded module; other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_training_checkpoint(config, model, optimizer, lr_scheduler, scaler, model_ema, state: EpochState,
                                     complete: bool, acc1: Optional[float] = None, is_best: bool = False) -> str:
    """Collective: every process writes its shards into ``NAME.tmp/``; rank 0 adds the run state (and, at epoch
    ends, the released-format ``model.pth``), renames the folder once all have finished and updates the manifest.

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: a process could not write (disk full, permissions); earlier checkpoints are intact.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from config import to_yaml

    rng = gather_rng_states()
    name = checkpoint_name(state.epoch, state.update, complete, sharded=True)
    final = os.path.join(config.OUTPUT, name)
    tmp = f"{final}.tmp"
    with fail_together("preparing a sharded checkpoint"):
        if is_main_process() and os.path.exists(tmp):
            shutil.rmtree(tmp)  # left by a crash during an earlier save
    content = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if model_ema is not None:
        content["model_ema"] = get_model_state_dict(model_ema.module)
    try:
        dcp.save(content, checkpoint_id=tmp)
    except Exception as error:  # DCP gathers every process's failure into one exception, raised on all of them
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {str(error).strip()[:800]}. The previous "
                              f"checkpoints are intact; free space or fix permissions on {config.OUTPUT}") from error
    _write_shard_digests(tmp, get_rank())
    released = full_model_state_dict(model) if complete or is_best else None
    barrier()  # every process's shards are on disk
    with fail_together("finishing a sharded checkpoint"):  # only rank 0 writes the rest
        if is_main_process():
            run_state = {
                "optimizer": {"sharded": True, "param_groups": [{"params": list(range(len(group["params"])))}
                                                                for group in optimizer.param_groups]},
                "model_ema": model_ema is not None,
                **_run_state(config, lr_scheduler, scaler, state, complete, rng),
            }
            files = _collect_shard_digests(tmp, get_world_size())
            digests = {}
            if complete:
                digests[RELEASED_MODEL] = atomic_torch_save({"model": released}, os.path.join(tmp, RELEASED_MODEL))
            # Last: its presence marks a whole folder.
            digests[SHARDED_STATE] = atomic_torch_save(run_state, os.path.join(tmp, SHARDED_STATE))
            _fsync_dir(tmp)
            if os.path.exists(final):  # the same position saved again (a resumed run): replace it
                _forget_file_digests(config.OUTPUT, name)
                old = f"{final}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(config.OUTPUT)
            best = None
            if is_best:
                best = save_best({"model": released, "epoch": state.epoch, "max_accuracy": state.max_accuracy,
                                  "config": to_yaml(config)}, config.OUTPUT, name, state.epoch, state.update,
                                 state.max_accuracy, acc1)
            entry = {"file": name, "epoch": state.epoch, "step": state.update, "complete": complete, "acc1": acc1}
            if files is not None:
                entry["files"] = {file: list(digest) for file, digest in sorted({**files, **digests}.items())}
            _record_checkpoint(config.OUTPUT, entry, config.TRAIN.KEEP_CHECKPOINTS, best)
            logger.info("saved %s (sharded over %d processes)", final, get_world_size())
    return final


def _write_shard_digests(folder: str, rank: int) -> None:
    """Writes the checksums of the files this process wrote into a sharded checkpoint folder (its ``__RANK_*.distcp``
    shards; rank 0 also ``.metadata``) beside them, for rank 0 to record in the manifest. A file that cannot be
    read back is left out, so the checkpoint gets no checksum record (nothing else changes)."""
    names = [n for n in os.listdir(folder) if n.startswith(f"__{rank}_") and n.endswith(".distcp")]
    if rank == 0:
        names.append(".metadata")
    try:
        digests = {name: list(file_digest(os.path.join(folder, name))) for name in names}
        _atomic_write_text(json.dumps(digests), os.path.join(folder, f".digests_{rank}.json"))
    except (OSError, CheckpointError) as error:
        logger.warning("no checksums for the shards of process %d in %s: %s", rank, folder, error)


def _collect_shard_digests(folder: str, world_size: int) -> Optional[Dict[str, Digest]]:
    """Every process's shard checksums of a sharded checkpoint folder (the side files removed), or None when one
    process's are missing."""
    digests: Dict[str, Digest] = {}
    complete = True
    for rank in range(world_size):
        path = os.path.join(folder, f".digests_{rank}.json")
        try:
            with open(path) as f:
                digests.update({name: Digest(*value) for name, value in json.load(f).items()})
            os.remove(path)
        except (OSError, ValueError, TypeError):
            complete = False
    return digests if complete else None


def _forget_file_digests(output_dir: str, name: str) -> None:
    """Drops the file checksums of the manifest entry ``name`` before its sharded folder is replaced, so that a crash
    during the replacement leaves no record that the new files would contradict."""
    manifest = read_manifest_dict(output_dir)
    entries = manifest["checkpoints"]
    if any(e.get("file") == name and "files" in e for e in entries):
        for entry in entries:
            if entry.get("file") == name:
                entry.pop("files", None)
        write_manifest(output_dir, entries, manifest["best"])


def verify_sharded_files(path: str) -> None:
    """Checks every file of a sharded checkpoint folder against the checksums its run's manifest recorded (each
    process checks all of them, so all reach the same verdict); nothing when the manifest records none.

    Raises:
        CheckpointError: a recorded file is missing, or its size or CRC-32 differs.
    """
    parent, name = os.path.split(os.path.abspath(path))
    entry = next((e for e in read_manifest_dict(parent, quiet=True)["checkpoints"] if e.get("file") == name), None)
    for file, recorded in sorted(((entry or {}).get("files") or {}).items()):
        recorded = Digest(*recorded)
        try:
            digest = file_digest(os.path.join(path, file))
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: its file {file} is unreadable ({error})") from error
        if digest != recorded:
            raise CheckpointError(f"{path} is truncated or corrupt: its file {file} has {digest.describe()}, but when "
                                  f"it was written {MANIFEST} recorded {recorded.describe()}. Use another checkpoint "
                                  "(auto-resume falls back to the previous one by itself)")
