"""A run folder keeps every run's files: what a new run would replace or delete is set aside first.

A run continues its folder's history from one position, ``(epoch, update)``: the checkpoint it resumes, or the start
of training. Whatever the folder holds from beyond that position belongs to another history (the run being started
over, or the later part of a run being rolled back to an older checkpoint): checkpoints of later positions, a
``ckpt_best.pth`` of a later epoch, the ``metrics.jsonl`` lines of those epochs. Before the run writes anything,
:func:`set_aside_other_history` moves them into ``earlier_run_N/`` in the folder, with copies of ``config.yaml`` and
``checkpoints.json`` as they were, and logs what went there. A run that continues from a checkpoint of another folder
sets aside everything this folder's earlier run left. Nothing is deleted; the logs (``log_rank*.txt``) stay in place.
"""
import json
import logging
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

from checkpoint import ASIDE_PREFIX, BEST, MANIFEST, CheckpointError, read_manifest_dict, write_manifest

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
_CHECKPOINT_NAME = re.compile(r"ckpt_epoch_(\d+)(?:_step_(\d+))?(?:\.pth)?$")

Position = Tuple[int, int]  # (epoch, optimizer updates done in it)


def checkpoint_position(name: str) -> Optional[Position]:
    """Where training stands after the checkpoint ``name`` (``ckpt_epoch_4.pth``: (5, 0); ``ckpt_epoch_4_step_30``:
    (4, 30)), or None for a name that is not a checkpoint's."""
    match = _CHECKPOINT_NAME.match(name)
    if not match:
        return None
    epoch, step = int(match.group(1)), match.group(2)
    return (epoch + 1, 0) if step is None else (epoch, int(step))


def set_aside_other_history(output_dir: str, resumed_from: Optional[str], position: Position) -> Optional[str]:
    """Moves the files of ``output_dir`` that lie beyond ``position`` (all of them when ``resumed_from`` is in
    another folder) into a new ``earlier_run_N/`` folder, and logs what was moved. Call it on one process, after the
    run has resumed (or decided to start afresh) and before it writes anything.

    Args:
        output_dir: the run folder.
        resumed_from: the checkpoint the run continues (None: it starts from scratch).
        position: the (epoch, update) the run continues from.

    Returns:
        The folder the files went to, or None when nothing lay beyond the position.
    """
    if resumed_from is not None and not _inside(resumed_from, output_dir):
        position = (-1, 0)  # another folder's history continues here: none of this folder's files belong to it
    checkpoints = _checkpoints_beyond(output_dir, position)
    best = _best_beyond(output_dir, position)
    metrics, kept_metrics = _metrics_beyond(output_dir, position[0])
    if not (checkpoints or best or metrics):
        return None
    # Nothing of the earlier history stays: its config, manifest and TensorBoard curves go too, so that the new
    # run's are not mixed with them.
    everything = not _checkpoints_beyond(output_dir, (-1, 0), exclude=checkpoints) and (
        best is not None or not os.path.isfile(os.path.join(output_dir, BEST)))
    if everything:
        metrics, kept_metrics = metrics + kept_metrics, []
    try:
        aside, events = _move_aside(output_dir, checkpoints, best, metrics, kept_metrics, everything)
    except OSError as error:
        raise CheckpointError(f"could not set the earlier run's files of {output_dir} aside ({error}); nothing was "
                              "replaced or deleted. Free space or fix permissions there, or give another --tag") \
            from error
    _log(output_dir, aside, resumed_from, position, checkpoints, best, metrics, events)
    return aside


def _move_aside(output_dir: str, checkpoints: List[str], best: Optional[Dict[str, Any]], metrics: List[str],
                kept_metrics: List[str], everything: bool) -> Tuple[str, List[str]]:
    """Moves the files of another history into a new ``earlier_run_N/``; returns it and the event files moved."""
    aside = _new_aside_folder(output_dir)
    for name in checkpoints + ([BEST] if best else []):
        os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
    _write_lines(os.path.join(aside, METRICS), metrics)
    for name in (CONFIG, MANIFEST):
        if os.path.isfile(os.path.join(output_dir, name)):
            shutil.copy2(os.path.join(output_dir, name), os.path.join(aside, name))
    events = []
    if everything:
        events = sorted(n for n in os.listdir(output_dir) if n.startswith("events.out.tfevents."))
        for name in events:
            os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
        for name in (CONFIG, MANIFEST, METRICS):
            if os.path.isfile(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))  # copied into the aside folder above
    else:
        _forget(output_dir, checkpoints, best is not None)
        _write_lines(os.path.join(output_dir, METRICS), kept_metrics)
    return aside, events


def _inside(path: str, folder: str) -> bool:
    """Whether checkpoint ``path`` lies in ``folder`` (a file in it, or a sharded checkpoint folder in it)."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(folder)


def _checkpoints_beyond(output_dir: str, position: Position, exclude: List[str] = ()) -> List[str]:
    """The checkpoint files and sharded folders of ``output_dir`` that stand past ``position``, oldest first."""
    found = []
    for name in os.listdir(output_dir):
        where = checkpoint_position(name)
        if where is not None and where > position and name not in exclude:
            found.append((where, name))
    return [name for _, name in sorted(found)]


def _best_beyond(output_dir: str, position: Position) -> Optional[Dict[str, Any]]:
    """The manifest's record of ``ckpt_best.pth`` when that file stands past ``position`` (or its epoch is unknown),
    else None. Best checkpoints are written at epoch ends."""
    if not os.path.isfile(os.path.join(output_dir, BEST)):
        return None
    record = read_manifest_dict(output_dir)["best"] or {}
    epoch = record.get("epoch")
    if epoch is not None and (epoch + 1, 0) <= position:
        return None
    return record or {"epoch": None}


def _metrics_beyond(output_dir: str, epoch: int) -> Tuple[List[str], List[str]]:
    """The lines of ``metrics.jsonl`` of epochs from ``epoch`` on, and the others."""
    path = os.path.join(output_dir, METRICS)
    if not os.path.isfile(path):
        return [], []
    beyond, kept = [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                line_epoch = json.loads(line).get("epoch", epoch)
            except ValueError:
                line_epoch = epoch  # an unreadable line is kept with the earlier history, not lost
            (beyond if line_epoch >= epoch else kept).append(line if line.endswith("\n") else line + "\n")
    return beyond, kept


def _new_aside_folder(output_dir: str) -> str:
    taken = [int(n[len(ASIDE_PREFIX):]) for n in os.listdir(output_dir)
             if n.startswith(ASIDE_PREFIX) and n[len(ASIDE_PREFIX):].isdigit()]
    path = os.path.join(output_dir, f"{ASIDE_PREFIX}{max(taken, default=0) + 1}")
    os.makedirs(path)
    return path


def _write_lines(path: str, lines: List[str]) -> None:
    if not lines and not os.path.exists(path):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def _forget(output_dir: str, moved: List[str], best_moved: bool) -> None:
    """Drops the moved checkpoints (and the best) from the folder's manifest."""
    manifest = read_manifest_dict(output_dir)
    entries = [e for e in manifest["checkpoints"] if e.get("file") not in moved]
    write_manifest(output_dir, entries, None if best_moved else manifest["best"])


def _log(output_dir: str, aside: str, resumed_from: Optional[str], position: Position, checkpoints: List[str],
         best: Optional[Dict[str, Any]], metrics: List[str], events: List[str]) -> None:
    if resumed_from is None:
        start = "starts from scratch"
    elif position == (-1, 0):
        start = f"continues {resumed_from}, a checkpoint of another folder"
    else:
        start = f"continues from epoch {position[0]} update {position[1]} ({resumed_from})"
    moved = list(checkpoints)
    if best is not None:
        acc = f", acc@1 {best['acc1']:.2f}%" if best.get("acc1") is not None else ""
        moved.append(f"{BEST} (epoch {best.get('epoch', '?')}{acc})")
    if metrics:
        moved.append(f"{len(metrics)} lines of {METRICS}")
    if events:
        moved.append(f"{len(events)} TensorBoard event files")
    logger.warning("this run %s; what %s held from beyond that point is of another history (a run started over, "
                   "the later part of one rolled back, or epochs redone after an interruption), so it is set aside in "
                   "%s, not replaced: %s; %s and %s as they were are copied there", start, output_dir, aside,
                   ", ".join(moved), CONFIG, MANIFEST)
