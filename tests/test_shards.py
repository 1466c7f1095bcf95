"""Tar shards: the writer (three source layouts, bad files, atomic and restartable writes, --verify), the reader
(local and over HTTP, both pipelines), the shard training order, exact mid-epoch resume and exact evaluation with
1 and 2 processes, and bad shards (truncated, corrupt, missing, an index that does not match, a URL failing
mid-read or stalling) with the unreadable-image policy and no process left waiting.

The data: 100 training and 30 validation digits (32x32 JPEGs) in the folder, zip and ImageNet-22K layouts, written
as shards of 8 KB (about 6 samples each, so that an epoch crosses many shards).
"""
import hashlib
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import torch

from config import load_config
from data.build import build_loader
from data.datasets import FolderDataset, unreadable_label
from data.errors import DataError
from data.layout import IMAGENET22K_TRAIN_LIST, IMAGENET22K_VAL_LIST
from data.samplers import ShardOrderSampler
from data.shard_writer import make_shards, open_split, verify_shards
from data.shards import INDEX_NAME, ShardDataset, content_hash, load_index
from data.ziparchive import make_zip_dataset
from engine import Precision, validate
from tests.test_distributed_health import free_port
from tests.test_multiprocess import assert_no_traceback_of_ours, read_log, run
from tests.test_resilience import (DEMO, REPO, RUN, console_tail, final_weights, kill_when_logged, losses, rank_pid,
                                   run_to_end)

sys.path.insert(0, os.path.join(REPO, "tools"))
from serve_shards import RangeRequestHandler, serve_folder  # noqa: E402

SHARD_BYTES = 8 * 1024
MICRO = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]",
         "DATA.PREPARE_DIGITS", "False", "DATA.DATASET", "shards", "TRAIN.WARMUP_EPOCHS", "0"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, digits_root):
    """10 training and 3 validation digits per class in the folder layout, the same as a zip layout, and an
    ImageNet-22K layout (list files) over the same files."""
    root = tmp_path_factory.mktemp("shard_source")
    for split, count in (("train", 10), ("val", 3)):
        for label in sorted(os.listdir(os.path.join(digits_root, split))):
            os.makedirs(root / split / label)
            for name in sorted(os.listdir(os.path.join(digits_root, split, label)))[:count]:
                shutil.copy(os.path.join(digits_root, split, label, name), root / split / label / name)
    make_zip_dataset(str(root), str(root))
    for split, list_name in (("train", IMAGENET22K_TRAIN_LIST), ("val", IMAGENET22K_VAL_LIST)):
        folder = FolderDataset(str(root / split), [str(label) for label in range(10)])
        entries = [[os.path.relpath(folder.image_path(i), root), int(folder.labels[i])] for i in range(len(folder))]
        with open(root / list_name, "w") as f:
            json.dump(entries, f)
    return str(root)


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards") / "digits_shards")
    assert make_shards(source, out, SHARD_BYTES, layout="folder") == []
    return out


def copy_of(shards_root, tmp_path) -> str:
    copy = str(tmp_path / "shards")
    shutil.copytree(shards_root, copy)
    return copy


def contents(dataset) -> list:
    """(hash of the image bytes, label) of every image of a dataset, sorted."""
    return sorted((hashlib.sha256(dataset.open_image(i).read()).hexdigest(), int(dataset.labels[i]))
                  for i in range(len(dataset)))


def shards_config(data_path, *opts):
    return load_config(DEMO, opts=["DATA.DATA_PATH", str(data_path), "DATA.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0",
                                   *MICRO, *opts])


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("layout", ["folder", "zip", "imagenet22K"])
def test_every_layout_is_written_as_webdataset_shards_holding_each_image_once(source, tmp_path, layout):
    out = str(tmp_path / layout)
    assert make_shards(source, out, SHARD_BYTES, layout=layout) == []
    for split in ("train", "val"):
        original, _ = open_split(source, layout, split)
        written = ShardDataset(os.path.join(out, split))
        assert contents(written) == contents(original)
        assert written.class_names == original.class_names
        index = json.load(open(os.path.join(out, split, INDEX_NAME)))
        assert index["num_samples"] == len(original) == sum(shard["samples"] for shard in index["shards"])
        assert sorted(os.listdir(os.path.join(out, split))) == sorted(
            [INDEX_NAME, "samples.npy"] + [shard["name"] for shard in index["shards"]])
        samples_sha = hashlib.sha256(open(os.path.join(out, split, "samples.npy"), "rb").read()).hexdigest()
        assert index["content_hash"] == content_hash(index["classes"], index["shards"], samples_sha)
        for shard in index["shards"]:
            path = os.path.join(out, split, shard["name"])
            assert shard["bytes"] == os.path.getsize(path)
            assert shard["bytes"] <= SHARD_BYTES + 3 * 2048 + 10240  # one sample and tar's end padding past the size
            assert shard["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
            with tarfile.open(path) as archive:  # any tar reader reads them: KEY.<ext> then KEY.cls
                members = archive.getmembers()
                assert len(members) == 2 * shard["samples"]
                for image, label in zip(members[0::2], members[1::2]):
                    key, extension = image.name.split(".", 1)
                    assert extension in ("jpg", "jpeg") and label.name == f"{key}.cls"
                    assert int(archive.extractfile(label).read()) in range(10)
    # A seeded random order: a shard holds a mix of classes.
    first = ShardDataset(os.path.join(out, "train"))
    assert len(set(first.labels[:first.shard_sizes[0]].tolist())) > 1


def source_with_bad_files(source, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(os.path.join(source, "train"), root / "train")
    shutil.copytree(os.path.join(source, "val"), root / "val")
    (root / "train" / "3" / "notanimage.jpg").write_bytes(b"hello")
    os.symlink(str(root / "missing.jpg"), str(root / "train" / "4" / "dangling.jpg"))
    return root, sorted([str(root / "train" / "3" / "notanimage.jpg"), str(root / "train" / "4" / "dangling.jpg")])


def test_bad_files_are_left_out_counted_and_listed(source, tmp_path, caplog):
    root, bad = source_with_bad_files(source, tmp_path)
    with caplog.at_level(logging.WARNING):
        assert sorted(make_shards(str(root), str(tmp_path / "out"), SHARD_BYTES)) == bad
    for path in bad:
        assert f"skipped {path}: it cannot be read as an image" in caplog.text
    assert "left 2 unreadable files of train out of" in caplog.text
    index = load_index(str(tmp_path / "out" / "train"))
    assert sorted(index.skipped) == bad and len(index.samples) == 100


def test_a_killed_writer_leaves_no_whole_looking_shard_and_a_rerun_finishes_the_same_shards(source, shards, tmp_path,
                                                                                         monkeypatch):
    """A run stopped at its 40th image leaves the shards it finished (each with its record), no ``.tmp``, no index;
    a kill between a shard's rename and its record's, or during a write, leaves a shard without a record and a
    ``.tmp``: the rerun writes exactly the missing shards and ends with the bytes of an uninterrupted run."""
    import data.shard_writer as writer

    out = str(tmp_path / "out")
    original, calls = writer.read_image_bytes, [0]

    def stopping(*args):
        calls[0] += 1
        if calls[0] == 40:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(writer, "read_image_bytes", stopping)
    with pytest.raises(KeyboardInterrupt):
        make_shards(source, out, SHARD_BYTES, layout="folder", splits=["train"])
    names = sorted(os.listdir(os.path.join(out, "train")))
    assert INDEX_NAME not in names and not [name for name in names if name.endswith(".tmp")]
    finished = [name for name in names if name.endswith(".tar")]
    assert finished and all(name[:-4] + ".json" in names for name in finished)
    # What a SIGKILL can leave besides: a renamed shard whose record was not written yet, a half-written .tmp.
    os.remove(os.path.join(out, "train", finished[-1][:-4] + ".json"))
    with open(os.path.join(out, "train", "shard-000009.tar.tmp"), "wb") as f:
        f.write(b"half a shard")
    monkeypatch.setattr(writer, "read_image_bytes", original)
    written, write_shard = [], writer.write_shard

    def recording(dataset, folder, number, indices, plan):
        written.append(number)
        return write_shard(dataset, folder, number, indices, plan)

    monkeypatch.setattr(writer, "write_shard", recording)
    make_shards(source, out, SHARD_BYTES, layout="folder", splits=["train"])
    index = json.load(open(os.path.join(out, "train", INDEX_NAME)))
    assert written == list(range(len(finished) - 1, len(index["shards"])))
    assert sorted(os.listdir(os.path.join(out, "train"))) == sorted(os.listdir(os.path.join(shards, "train")))
    for name in os.listdir(os.path.join(out, "train")):
        with open(os.path.join(out, "train", name), "rb") as resumed, \
                open(os.path.join(shards, "train", name), "rb") as unbroken:
            assert resumed.read() == unbroken.read(), name


def test_a_shard_replaced_by_a_run_of_another_plan_is_not_kept_by_its_old_record(source, shards, tmp_path,
                                                                                 monkeypatch):
    """A run with another --shard-bytes renamed its shard 0 over the first run's and was killed before writing its
    record: the first run's record must not vouch for that file."""
    import data.shard_writer as writer

    def stopped(*args):
        raise KeyboardInterrupt

    out = str(tmp_path / "out")
    monkeypatch.setattr(writer, "_write_index", stopped)
    with pytest.raises(KeyboardInterrupt):  # every shard and its record written, no index yet
        make_shards(source, out, SHARD_BYTES, layout="folder", splits=["train"])
    monkeypatch.undo()
    original = writer._write_atomically

    def killed_before_the_record(path, write):
        if path.endswith(".json"):
            raise KeyboardInterrupt
        original(path, write)

    monkeypatch.setattr(writer, "_write_atomically", killed_before_the_record)
    with pytest.raises(KeyboardInterrupt):
        make_shards(source, out, 2 * SHARD_BYTES, layout="folder", splits=["train"])
    monkeypatch.setattr(writer, "_write_atomically", original)
    make_shards(source, out, SHARD_BYTES, layout="folder", splits=["train"])
    assert verify_shards(os.path.join(out, "train")) == []
    assert contents(ShardDataset(os.path.join(out, "train"))) == contents(ShardDataset(os.path.join(shards, "train")))


def test_verify_finds_a_changed_byte(shards, tmp_path):
    copy = copy_of(shards, tmp_path)
    assert verify_shards(os.path.join(copy, "val")) == []
    path = os.path.join(copy, "val", "shard-000001.tar")
    data = bytearray(open(path, "rb").read())
    data[1500] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert verify_shards(os.path.join(copy, "val")) == [f"{path}: its SHA-256 differs from the index's (the bytes "
                                                        "changed)"]
    os.remove(os.path.join(copy, "val", "shard-000002.tar"))
    assert verify_shards(os.path.join(copy, "val"))[1] == f"{os.path.join(copy, 'val', 'shard-000002.tar')}: missing"


@pytest.mark.slow
def test_the_tool_reports_bad_files_verifies_and_fails_in_one_line(source, shards, tmp_path):
    import make_shards as tool

    def tool_run(*arguments):
        return subprocess.run([sys.executable, "tools/make_shards.py", *arguments], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    root, _ = source_with_bad_files(source, tmp_path)
    result = tool_run(str(root), str(tmp_path / "out"), "--shard-bytes", "8K", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "finished; 2 unreadable files were left out" in result.stderr
    assert tool_run("--verify", str(tmp_path / "out")).returncode == 0
    copy = copy_of(shards, tmp_path)
    with open(os.path.join(copy, "val", "shard-000001.tar"), "r+b") as f:
        f.truncate(2048)
    result = tool_run("--verify", copy)
    assert result.returncode == 2 and "shard-000001.tar: 2048 bytes, the index says" in result.stderr
    result = tool_run(str(tmp_path / "nothing"), str(tmp_path / "out2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'nothing'} holds none of train/")
    assert tool.byte_count("8K") == 8000 and tool.byte_count("1GiB") == 2 ** 30
    for bad in ("0", "-1M", "lots"):
        with pytest.raises(Exception, match="size"):
            tool.byte_count(bad)


# --------------------------------------------------------------------------- order


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_order_reads_every_sample_once_a_few_shards_at_a_time(world_size):
    sizes = [7, 5, 9, 6, 8, 4, 7, 6] * 5
    samplers = [ShardOrderSampler(sizes, rank, world_size, seed=3, window=10) for rank in range(world_size)]
    total = sum(sizes)
    for epoch in (0, 1):
        indices = [index for sampler in samplers for index in sampler.epoch_indices(epoch)]
        assert len(indices) == samplers[0].num_samples * world_size
        assert sorted(set(indices)) == list(range(total))  # every sample; only the padding repeats
        assert len(indices) - total < world_size
    order = samplers[0].epoch_order(0)
    assert order == ShardOrderSampler(sizes, 0, world_size, seed=3, window=10).epoch_order(0)  # a pure function
    assert order != samplers[0].epoch_order(1) and order != ShardOrderSampler(sizes, seed=4, window=10).epoch_order(0)
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    for start in range(0, total - 16, 16):  # 16 consecutive samples come from at most 4 shards
        assert len(set(shard_of[order[start:start + 16]].tolist())) <= 4


# --------------------------------------------------------------------------- reading, resuming, evaluating


def epoch_batches(loaders, epoch, skip=0):
    loaders.train_sampler.set_epoch(epoch)
    loaders.train_sampler.skip(skip)
    return [(images.clone(), labels.clone()) for images, labels in loaders.train_loader]


@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_a_resumed_epoch_continues_at_the_same_sample(shards, pipeline):
    config = shards_config(shards, "DATA.NUM_WORKERS", "2", "DATA.PIPELINE", pipeline)
    loaders = build_loader(config, device=torch.device("cpu"))
    assert isinstance(loaders.train_sampler, ShardOrderSampler)
    straight = epoch_batches(loaders, 1)
    assert len(straight) == 100 // 8
    resumed = epoch_batches(build_loader(config, device=torch.device("cpu")), 1, skip=5 * 8)
    assert len(resumed) == len(straight) - 5
    for (images, labels), (expected_images, expected_labels) in zip(resumed, straight[5:]):
        assert torch.equal(labels, expected_labels)
        assert torch.equal(images, expected_images)
    # Another epoch, another order.
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(epoch_batches(loaders, 2), straight))


def test_every_sample_is_read_once_an_epoch_over_processes_and_workers(shards):
    """Two processes with two loader workers each: the images the workers read (the device pipeline's batches carry
    their indices) are every training image once, but for the drop_last remainder."""
    config = shards_config(shards, "DATA.NUM_WORKERS", "2", "DATA.PIPELINE", "device")
    read = []
    for rank in range(2):
        loaders = build_loader(config, rank=rank, world_size=2, device=torch.device("cpu"))
        loaders.train_sampler.set_epoch(3)
        read += [index for batch, _ in loaders.train_loader.loader for index in batch.indices]
    assert len(read) == len(set(read)) == 2 * (50 // 8) * 8  # each process: 50 images, 6 full batches of 8


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_over_http_equal_the_local_ones(shards, workers):
    local = build_loader(shards_config(shards, "DATA.NUM_WORKERS", str(workers)))
    with serve_folder(shards) as url:
        remote = build_loader(shards_config(url, "DATA.NUM_WORKERS", str(workers)))
        assert remote.train_dataset.store.remote and not local.train_dataset.store.remote
        for (images, labels), (expected_images, expected_labels) in zip(epoch_batches(remote, 0),
                                                                        epoch_batches(local, 0)):
            assert torch.equal(labels, expected_labels) and torch.equal(images, expected_images)
        for (images, labels), (expected_images, expected_labels) in zip(remote.val_loader, local.val_loader):
            assert torch.equal(labels, expected_labels) and torch.equal(images, expected_images)


def evaluate(loaders, model=None):
    model = model or torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    torch.manual_seed(0)
    return validate(model, loaders.val_loader, torch.device("cpu"), Precision(False), len(loaders.val_dataset))


def test_evaluation_counts_every_validation_sample_once_in_each_process(shards):
    """Two processes' evaluation samplers over shards: disjoint, together every sample."""
    config = shards_config(shards)
    shards_of = [build_loader(config, rank=rank, world_size=2, eval_only=True).val_loader.batch_sampler.sampler
                 for rank in range(2)]
    assert sorted(list(shards_of[0]) + list(shards_of[1])) == list(range(30))
    assert evaluate(build_loader(config, eval_only=True))["count"] == 30


# --------------------------------------------------------------------------- bad shards


def val_dataset(root):
    dataset = ShardDataset(os.path.join(root, "val"))
    dataset.replace_unreadable = False
    dataset.max_bad_fraction = 1.0
    return dataset


def unreadable(dataset) -> list:
    return [i for i in range(len(dataset)) if dataset.read(i)[1] == unreadable_label(i)]


def test_a_truncated_shard_loses_the_samples_past_its_end_named_once(shards, tmp_path, caplog):
    copy = copy_of(shards, tmp_path)
    dataset = val_dataset(copy)
    shard, name = 1, dataset.shard_name(1)
    first = int(dataset.shard_sizes[0])
    cut = int(dataset._offsets[first + 2]) + 10  # inside the third sample of shard 1
    with open(os.path.join(copy, "val", name), "r+b") as f:
        f.truncate(cut)
    with caplog.at_level(logging.WARNING):
        lost = unreadable(dataset)
    assert lost == list(range(first + 2, first + int(dataset.shard_sizes[shard])))
    text = caplog.text
    assert f"shard {os.path.join(copy, 'val', name)} is {cut} bytes but the index says" in text
    assert text.count("shard truncated: ") == 1 and f"{name} sample 2 is cut off" in text
    # In training the policy replaces them, and stops past DATA.MAX_BAD_FRACTION naming the shard.
    train = ShardDataset(os.path.join(copy, "val"), max_bad_fraction=0.0)
    with pytest.raises(DataError, match=f"{name} sample 2 .*shard truncated"):
        train.read(first + 2)


def test_a_corrupt_shard_names_the_shard_and_sample(shards, tmp_path, caplog):
    copy = copy_of(shards, tmp_path)
    dataset = val_dataset(copy)
    path = os.path.join(copy, "val", dataset.shard_name(0))
    data = bytearray(open(path, "rb").read())
    header = int(dataset._offsets[1]) - 512
    data[header + 124:header + 136] = b"00000000777\0"  # the size field of sample 1's tar header
    assert dataset.shard_sizes[0] >= 3
    image = int(dataset._offsets[2])
    data[image:image + 200] = bytes(200)  # the start of sample 2's JPEG
    open(path, "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert unreadable(dataset) == [1, 2]
    assert f"{dataset.shard_name(0)} sample 1: the tar member there holds 511 bytes, the index says" in caplog.text
    assert f"unreadable image {path} sample 2 (" in caplog.text


def test_a_missing_shard_is_named_once_and_its_samples_follow_the_policy(shards, tmp_path, caplog):
    copy = copy_of(shards, tmp_path)
    dataset = val_dataset(copy)
    os.remove(os.path.join(copy, "val", dataset.shard_name(2)))
    start = int(dataset.shard_sizes[:2].sum())
    with caplog.at_level(logging.WARNING):
        result = evaluate(build_loader(shards_config(copy, "DATA.MAX_BAD_FRACTION", "1.0"), eval_only=True))
    assert result["count"] + result["unreadable"] == 30 and result["unreadable"] == int(dataset.shard_sizes[2])
    assert caplog.text.count("shard missing: ") == 1
    assert f"{dataset.shard_name(2)} sample {0}" in caplog.text and "left out" in caplog.text
    training = ShardDataset(os.path.join(copy, "val"))
    with pytest.raises(DataError, match=f"{dataset.shard_name(2)} sample .* the shard is not there"):
        for index in range(start, 30):
            training.read(index)


def test_an_index_that_does_not_match_its_shards(shards, source, tmp_path):
    copy = copy_of(shards, tmp_path)
    # The shards of another run (another order) under the same names: headers are not where the index says.
    other = str(tmp_path / "other")
    make_shards(source, other, SHARD_BYTES, layout="folder", splits=["val"], seed=1)
    for name in os.listdir(os.path.join(other, "val")):
        if name.endswith(".tar"):
            shutil.copy(os.path.join(other, "val", name), os.path.join(copy, "val", name))
    dataset = val_dataset(copy)
    assert len(unreadable(dataset)) > 15
    # A sample table of another run: refused at start-up.
    shutil.copy(os.path.join(other, "val", "samples.npy"), os.path.join(copy, "val", "samples.npy"))
    with pytest.raises(DataError, match="samples.npy does not match .*index.json"):
        ShardDataset(os.path.join(copy, "val"))
    with open(os.path.join(copy, "val", INDEX_NAME), "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="is not a shard index written by tools/make_shards.py"):
        ShardDataset(os.path.join(copy, "val"))
    with pytest.raises(DataError, match="cannot read the shard index .*nothing.*index.json"):
        ShardDataset(str(tmp_path / "nothing"))


class FlakyHandler(RangeRequestHandler):
    """Fails requests for shard files as ``plan`` says: each entry is consumed by one request."""

    plan: list = []
    lock = threading.Lock()

    def send_body(self, path, start, end):
        with self.lock:
            action = self.plan.pop(0) if self.plan and path.endswith(".tar") else None
        if action == "cut":  # the connection drops half-way through the body
            with open(path, "rb") as file:
                file.seek(start)
                self.wfile.write(file.read((end - start) // 2))
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if action == "stall":
            time.sleep(3)
            return
        super().send_body(path, start, end)

    def _answer(self, body):
        with self.lock:
            fail = bool(self.plan) and self.plan[0] == 503 and self.path.endswith(".tar") and self.command == "GET"
            if fail:
                self.plan.pop(0)
        if fail:
            self.send_error(503, "busy")
            return
        super()._answer(body)


def test_a_url_failing_mid_read_is_retried_then_follows_the_policy(shards, caplog, monkeypatch):
    with serve_folder(shards, FlakyHandler) as url:
        dataset = val_dataset(url)
        dataset.store.retry_delay_s = 0.01
        expected = [ShardDataset(os.path.join(shards, "val")).open_image(i).read() for i in range(8)]
        FlakyHandler.plan = ["cut", 503, "cut"]  # transient: the batch arrives after retries
        with caplog.at_level(logging.WARNING):
            dataset.prefetch(list(range(8)))
            assert [dataset.open_image(i).read() for i in range(8)] == expected
        assert "retry 1 of 4" in caplog.text and FlakyHandler.plan == []
        FlakyHandler.plan = [503] * 5  # the first request and its four retries fail: that sample is lost
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            dataset.prefetch([9])
            assert dataset.read(9)[1] == unreadable_label(9)
        assert f"shard read failed: {url}/val/{dataset.shard_name(dataset.locate(9)[0])} sample" in caplog.text
        assert "503" in caplog.text
        # A server that stops answering: the request times out instead of holding the worker.
        monkeypatch.setattr("data.shards.HTTP_TIMEOUT_S", 0.5)
        stalled = val_dataset(url)
        stalled.store.retries = 1
        FlakyHandler.plan = ["stall", "stall"]
        started = time.time()
        assert stalled.read(4)[1] == unreadable_label(4)
        assert time.time() - started < 10
        FlakyHandler.plan = []


class NoRangeHandler(http.server.SimpleHTTPRequestHandler):
    """Python's own file server: it answers a range request with the whole file."""

    def log_message(self, format, *args):  # noqa: A002
        pass


def test_a_server_without_range_requests_is_named(shards, caplog):
    with serve_folder(shards, NoRangeHandler) as url:
        dataset = val_dataset(url)
        with caplog.at_level(logging.WARNING):
            assert dataset.read(0)[1] == unreadable_label(0)
    assert "a server that does not answer Range requests sends the whole file" in caplog.text


# --------------------------------------------------------------------------- whole runs


def main_command(data, output, *opts, launcher=None):
    return (launcher or [sys.executable, "main.py"]) + [
        "--cfg", DEMO, "--data-path", str(data), "--output", str(output), "--opts", *MICRO, "DATA.BATCH_SIZE", "8",
        "PRINT_FREQ", "1", "TRAIN.SAVE_ITERS", "1", "TRAIN.EPOCHS", "2", "DATA.NUM_WORKERS", "2", *opts]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_trains_exactly_as_an_unbroken_run(shards, tmp_path):
    run_to_end(main_command(shards, tmp_path / "straight"))
    log = tmp_path / "killed" / RUN / "log_rank0.txt"
    process = kill_when_logged(main_command(shards, tmp_path / "killed"), log, 7)  # epoch 0 has 12 updates
    assert process.wait(timeout=60) != 0
    result = run_to_end(main_command(shards, tmp_path / "killed"))
    assert "continuing at epoch 0" in result.stdout
    assert losses(str(log)) == losses(str(tmp_path / "straight" / RUN / "log_rank0.txt"))
    reference, weights = final_weights(tmp_path / "straight" / RUN), final_weights(tmp_path / "killed" / RUN)
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0, msg=key)


def two_processes(*extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), *extra, "main.py"]


def eval_figures(output) -> dict:
    with open(os.path.join(str(output), RUN, "eval.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_two_processes_resume_exactly_and_evaluate_like_one(shards, tmp_path):
    """Under torchrun (gloo): rank 1 killed mid-epoch, the group restarted by torchrun resumes and logs the losses of
    an unbroken run; --eval over the shards counts every validation sample once and gives one process's figures."""
    straight = tmp_path / "straight"
    run_to_end(main_command(shards, straight, launcher=two_processes()))
    log = tmp_path / "killed" / RUN / "log_rank0.txt"
    process = kill_when_logged(main_command(shards, tmp_path / "killed", launcher=two_processes("--max-restarts", "1")),
                               log, 3, pid_of=rank_pid(1))  # an epoch has 6 updates
    assert process.wait(timeout=600) == 0, "torchrun should restart the group and finish:\n" + console_tail(process)
    assert "continuing at epoch 0" in read_log(tmp_path / "killed", 1)
    assert losses(str(log)) == losses(str(straight / RUN / "log_rank0.txt"))
    checkpoint = str(straight / RUN / "ckpt_epoch_1.pth")
    figures = {}
    for name, launcher in (("one", None), ("two", two_processes())):
        output = tmp_path / f"eval_{name}"
        run_to_end(main_command(shards, output, launcher=launcher) + ["--eval", "--resume", checkpoint])
        figures[name] = eval_figures(output)
    assert figures["one"]["count"] == 30 and figures["one"]["unreadable"] == 0
    # Counts and accuracies exactly; the mean loss to rounding (its sum adds the batches in another order).
    assert {key: value for key, value in figures["one"].items() if key != "loss"} == \
        {key: value for key, value in figures["two"].items() if key != "loss"}
    assert figures["one"]["loss"] == pytest.approx(figures["two"]["loss"], rel=1e-6)


@pytest.mark.slow
def test_a_missing_shard_in_a_two_process_run_ends_every_process_naming_it(shards, tmp_path):
    copy = copy_of(shards, tmp_path)
    missing = ShardDataset(os.path.join(copy, "train")).shard_name(4)
    os.remove(os.path.join(copy, "train", missing))
    started = time.time()
    result = run(main_command(copy, tmp_path / "run", "DATA.MAX_BAD_FRACTION", "0.0", launcher=two_processes()),
                 timeout=300)
    assert result.returncode != 0
    assert time.time() - started < 120
    for rank in range(2):
        assert f"{missing} sample" in read_log(tmp_path / "run", rank)
    assert_no_traceback_of_ours(result)


def test_simmim_pretrains_from_shards_with_or_without_a_validation_split(shards, tmp_path):
    config_file = os.path.join(REPO, "configs", "demo", "simmim_pretrain_swin_micro_digits.yaml")
    copy = copy_of(shards, tmp_path)
    for val_images in (30, 100):
        config = load_config(config_file, opts=["DATA.DATA_PATH", copy, "DATA.DATASET", "shards", "DATA.NUM_WORKERS",
                                                "0", "DATA.BATCH_SIZE", "8", "DATA.PREPARE_DIGITS", "False"])
        loaders = build_loader(config)
        assert isinstance(loaders.train_sampler, ShardOrderSampler) and len(loaders.val_dataset) == val_images
        (images, masks), _ = next(iter(loaders.train_loader))
        assert images.shape[0] == 8 and masks.shape[0] == 8
        if os.path.isdir(os.path.join(copy, "val")):
            shutil.rmtree(os.path.join(copy, "val"))  # then validation takes training images
