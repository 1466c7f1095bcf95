"""Corrupt checkpoints are caught before loading: bytes changed inside a tensor (the file's length kept) are refused
by --resume, --eval and --pretrained with one line, and auto-resume falls back past them."""
import json
import os
import re
import shutil
import zipfile
import zlib

import pytest
import torch

import main as driver
from checkpoint import CheckpointError, load_checkpoint_file, read_manifest_dict, save_checkpoint
from checksums import DigestWriter, file_digest, zip_damage
from tests.test_resilience import DEMO, RUN, snapshot
from tests.test_run_history import TWO_EPOCHS


def flip_inside_largest_tensor(path) -> None:
    """Inverts one byte in the middle of the largest tensor record of a torch zip file; its length is unchanged."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_length + extra_length + info.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


@pytest.fixture
def run_copy(two_epoch_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(two_epoch_run, output)
    return output


def argv(digits_root, output, flags=(), opts=()):
    return ["--cfg", DEMO, "--data-path", digits_root, "--output", str(output), *flags, "--opts", *TWO_EPOCHS, *opts]


def test_the_manifest_records_each_checkpoint_and_the_best_with_its_checksum(two_epoch_run):
    run_dir = os.path.join(two_epoch_run, RUN)
    manifest = read_manifest_dict(run_dir)
    for record in manifest["checkpoints"] + [manifest["best"]]:
        assert tuple(file_digest(os.path.join(run_dir, record["file"]))) == (record["size"], record["crc32"])
    assert manifest["best"]["source"] in {e["file"] for e in manifest["checkpoints"]}


@pytest.mark.parametrize("flags", [["--resume"], ["--eval", "--resume"], ["--pretrained"], ["--eval", "--pretrained"]],
                         ids=["resume", "eval", "pretrained", "eval_pretrained"])
def test_bytes_changed_inside_a_tensor_are_refused_in_one_line(digits_root, run_copy, tmp_path, capsys, flags):
    checkpoint = os.path.join(run_copy, RUN, "ckpt_epoch_1.pth")
    flip_inside_largest_tensor(checkpoint)
    before = snapshot(run_copy)
    output = tmp_path / "elsewhere"
    assert driver.cli(argv(digits_root, output, flags + [checkpoint])) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert re.search(rf"{re.escape(checkpoint)} is truncated or corrupt: it has \d+ bytes, CRC-32 [0-9a-f]{{8}}, but "
                     r"when it was written checkpoints.json recorded \d+ bytes, CRC-32 [0-9a-f]{8}", error), error
    assert snapshot(run_copy) == before


def test_a_copy_without_its_manifest_is_checked_through_its_zip_records(run_copy, tmp_path):
    copy = tmp_path / "copied.pth"
    shutil.copy(os.path.join(run_copy, RUN, "ckpt_best.pth"), copy)
    assert load_checkpoint_file(str(copy))["epoch"] in (0, 1)
    flip_inside_largest_tensor(copy)
    with pytest.raises(CheckpointError, match=r"copied.pth is truncated or corrupt: its zip records do not read back "
                                              r"as written \(Bad CRC-32"):
        load_checkpoint_file(str(copy))


def test_auto_resume_falls_back_past_a_corrupt_newest_checkpoint(digits_root, run_copy):
    run_dir = os.path.join(run_copy, RUN)
    flip_inside_largest_tensor(os.path.join(run_dir, "ckpt_epoch_1.pth"))
    assert driver.cli(argv(digits_root, run_copy, opts=["TRAIN.EPOCHS", "2"])) == 0
    with open(os.path.join(run_dir, "log_rank0.txt")) as f:
        log = f.read().split("output folder")[-1]
    assert re.search(r"cannot resume from \S+ckpt_epoch_1.pth: \S+ is truncated or corrupt", log), log
    assert f"resumed weights from {os.path.join(run_dir, 'ckpt_epoch_0.pth')}" in log
    assert "continuing at epoch 1, update 0" in log


def test_a_best_rewritten_but_not_yet_recorded_is_accepted(tmp_path):
    """A crash between renaming a new ckpt_best.pth into place and updating the manifest: the manifest listed the
    new checksum as pending before the rename, so the file still loads."""
    save_checkpoint({"max_accuracy": 1.0, "w": torch.zeros(4)}, str(tmp_path), 0, 0, True, keep=3, acc1=1.0,
                    is_best=True)
    manifest = read_manifest_dict(str(tmp_path))
    best_path = tmp_path / "ckpt_best.pth"
    with open(best_path.with_suffix(".new"), "wb") as f:
        torch.save({"max_accuracy": 2.0, "w": torch.ones(4)}, DigestWriter(f))
    digest = file_digest(str(best_path.with_suffix(".new")))
    manifest["best"]["pending"] = [list(digest)]  # what save_best records before the rename
    with open(tmp_path / "checkpoints.json", "w") as f:
        json.dump(manifest, f)
    os.replace(best_path.with_suffix(".new"), best_path)  # and the process dies here
    assert load_checkpoint_file(str(best_path))["max_accuracy"] == 2.0


def test_checksum_helpers_agree_with_zlib(tmp_path):
    data = os.urandom(3 * 2 ** 20 + 5)
    (tmp_path / "f").write_bytes(data)
    assert tuple(file_digest(str(tmp_path / "f"))) == (len(data), zlib.crc32(data))
    assert zip_damage(str(tmp_path / "f")) is None  # not a zip: nothing to check
