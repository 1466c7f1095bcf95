"""Data pipeline: the three layouts, class counts, samplers, unreadable images, layout errors, the digits
demo set, the zip writer, transforms and Mixup."""
import json
import logging
import os
import pickle
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import AugmentOp
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

from config import ConfigError, load_config
from data import (DataError, DistributedTrainSampler, ShardedEvalSampler, ShardTrainSampler, build_dataset,
                  build_loader, build_mixup, build_transform, make_zip_dataset, prepare_digits)
from data.datasets import MIN_BAD_TO_STOP, too_many_bad
from data.digits import COMPLETE_MARKER

GARBAGE = b"this is not an image" * 10


def write_jpeg(path, seed: int, size=(40, 30)) -> None:
    """A small real JPEG whose content depends on ``seed``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_folder_dataset(root, train=None, val=None) -> str:
    """``root/train/<class>/<i>.jpg`` and ``root/val/...`` with the given images per class."""
    train = train or {"cat": 3, "dog": 2, "emu": 2}
    val = val or {"cat": 1, "dog": 2, "emu": 1}
    seed = 0
    for split, counts in (("train", train), ("val", val)):
        for name, count in counts.items():
            for i in range(count):
                seed += 1
                write_jpeg(os.path.join(root, split, name, f"{i}.jpg"), seed)
    return str(root)


def make_config(data_path, *opts, num_classes=3, **keys):
    """A frozen config for tiny images and fast tests; ``keys`` like DATA__ZIP_MODE=True add overrides."""
    pairs = ["DATA.DATA_PATH", str(data_path), "MODEL.NUM_CLASSES", str(num_classes), "DATA.IMG_SIZE", "32",
             "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0"]
    for key, value in keys.items():
        pairs += [key.replace("__", "."), str(value)]
    return load_config(None, pairs + list(opts))


def eval_tensors(dataset):
    return [dataset[i] for i in range(len(dataset))]


# ----- formats -----

def test_folder_dataset_classes_and_items(tmp_path):
    root = make_folder_dataset(tmp_path, train={"b": 2, "a": 1, "café": 2}, val={"a": 1, "café": 1})
    config = make_config(root, DATA__IMG_SIZE=48)
    train = build_dataset(True, config)
    val = build_dataset(False, config)
    assert train.class_names == ["a", "b", "café"]
    assert val.class_names == train.class_names
    assert train.targets == [0, 1, 1, 2, 2]
    assert val.targets == [0, 2]  # labels follow train/ even though val/ lacks class b
    image, label = train[4]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and label == 2
    assert train.image_path(4).endswith(os.path.join("train", "café", "1.jpg"))


def test_build_loader_batches_and_eval_only(tmp_path):
    root = make_folder_dataset(tmp_path)
    config = make_config(root)
    loaders = build_loader(config)
    assert loaders.class_names == ["cat", "dog", "emu"]
    assert len(loaders.train_loader) == 3  # 7 images, batches of 2, the last partial one dropped
    images, targets = next(iter(loaders.train_loader))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.int64
    assert isinstance(loaders.mixup_fn, Mixup)
    assert sum(len(t) for _, t in loaders.val_loader) == len(loaders.val_dataset) == 4
    assert not loaders.train_loader.pin_memory or torch.cuda.is_available()

    only_val = build_loader(config, eval_only=True)
    assert only_val.train_loader is None and only_val.train_dataset is None and only_val.train_sampler is None
    assert only_val.mixup_fn is None and len(only_val.val_dataset) == 4


@pytest.mark.parametrize("cache_mode", ["no", "part", "full"])
def test_zip_mode_gives_the_folder_images(tmp_path, cache_mode):
    root = make_folder_dataset(tmp_path)
    make_zip_dataset(root, root)
    folder = build_dataset(False, make_config(root))
    zipped = build_dataset(False, make_config(root, DATA__ZIP_MODE=True, DATA__CACHE_MODE=cache_mode))
    assert zipped.class_names == ["0", "1", "2"]
    assert len(zipped) == len(folder)
    for (zip_image, zip_label), (folder_image, folder_label) in zip(eval_tensors(zipped), eval_tensors(folder)):
        assert zip_label == folder_label
        assert torch.equal(zip_image, folder_image)


def test_zip_part_cache_holds_only_this_rank_shard(tmp_path):
    root = make_folder_dataset(tmp_path)
    make_zip_dataset(root, root)
    config = make_config(root, DATA__ZIP_MODE=True, DATA__CACHE_MODE="part")
    dataset = build_dataset(True, config, rank=1, world_size=2)
    cached = np.flatnonzero(dataset._cache.starts >= 0).tolist()
    assert cached == list(range(1, len(dataset), 2))
    assert dataset[0][1] == 0  # an index outside the shard is still read, from the zip
    loaders = build_loader(make_config(root, DATA__ZIP_MODE=True, DATA__CACHE_MODE="part", DATA__BATCH_SIZE=1,
                                       AUG__MIXUP=0.0, AUG__CUTMIX=0.0), rank=1, world_size=2)
    assert isinstance(loaders.train_sampler, ShardTrainSampler)
    assert set(loaders.train_sampler) <= set(cached)


def test_zip_deflated_members_extra_fields_and_pickling(tmp_path):
    write_jpeg(str(tmp_path / "img.jpg"), seed=1)
    with zipfile.ZipFile(tmp_path / "val.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo("sub/img.jpg")
        info.extra = struct.pack("<HH", 0xCAFE, 4) + b"abcd"  # an extra field moves the data, as zip tools do
        archive.writestr(info, (tmp_path / "img.jpg").read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("sub/bad.jpg", GARBAGE)
    (tmp_path / "val_map.txt").write_text("/sub/img.jpg\t1\nsub/bad.jpg\t0\n")  # a leading / is allowed
    dataset = build_dataset(False, make_config(tmp_path, DATA__ZIP_MODE=True, DATA__CACHE_MODE="no"))
    with Image.open(tmp_path / "img.jpg") as image:
        assert torch.equal(dataset[0][0], dataset.transform(image.convert("RGB"))) and dataset[0][1] == 1
    assert dataset[1][1] == -2 and dataset.num_bad == 1  # the garbage member is left out (unreadable_label(1))
    copy = pickle.loads(pickle.dumps(dataset))  # what spawned workers get; the open handle is not copied
    assert torch.equal(copy[0][0], dataset[0][0])


def test_zip_loader_with_worker_processes(tmp_path):
    root = make_folder_dataset(tmp_path)
    make_zip_dataset(root, root)
    config = make_config(root, DATA__ZIP_MODE=True, DATA__CACHE_MODE="no", DATA__NUM_WORKERS=2)
    dataset = build_dataset(False, config)
    dataset[0]  # opens the zip in this process first: the workers must open their own handle
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    labels = [int(t) for _, t in loader]
    assert labels == dataset.targets


def test_imagenet22k_json_lists(tmp_path):
    entries = [["n01/a.jpg", 5], ["n02/b.jpg", 21840], ["n01/c.jpg", 5]]
    for i, (path, _) in enumerate(entries):
        write_jpeg(str(tmp_path / path), seed=i)
    (tmp_path / "ILSVRC2011fall_whole_map_train.txt").write_text(json.dumps(entries))
    (tmp_path / "ILSVRC2011fall_whole_map_val.txt").write_text(json.dumps(entries[:1]))
    config = load_config(None, ["DATA.DATA_PATH", str(tmp_path), "DATA.DATASET", "imagenet22K", "DATA.IMG_SIZE", "32"])
    assert config.MODEL.NUM_CLASSES == 21841
    train = build_dataset(True, config)
    assert train.targets == [5, 21840, 5] and len(train.class_names) == 21841
    assert train[1][1] == 21840 and train[1][0].shape == (3, 32, 32)
    assert len(build_dataset(False, config)) == 1

    wrong = load_config(None, ["DATA.DATA_PATH", str(tmp_path), "DATA.DATASET", "imagenet22K",
                               "MODEL.NUM_CLASSES", "500"])
    with pytest.raises(DataError, match="21841.*MODEL.NUM_CLASSES 21841"):
        build_dataset(True, wrong)


def test_custom_folder_dataset_any_class_count(tmp_path):
    root = make_folder_dataset(tmp_path, train={"x": 1, "y": 1, "z": 1, "w": 1, "v": 1}, val={"x": 1})
    dataset = build_dataset(True, make_config(root, num_classes=5, DATA__DATASET="folder"))
    assert len(dataset.class_names) == 5


# ----- class counts -----

def test_folder_class_count_mismatch_names_both_numbers(tmp_path):
    root = make_folder_dataset(tmp_path)
    with pytest.raises(DataError) as error:
        build_dataset(True, make_config(root, num_classes=1000))
    message = str(error.value)
    assert "MODEL.NUM_CLASSES is 1000" in message and "3 classes" in message
    assert "--opts MODEL.NUM_CLASSES 3" in message


def test_zip_class_count_mismatch(tmp_path):
    root = make_folder_dataset(tmp_path)
    make_zip_dataset(root, root)
    with pytest.raises(DataError, match="MODEL.NUM_CLASSES is 5 .*--opts MODEL.NUM_CLASSES 3"):
        build_dataset(True, make_config(root, num_classes=5, DATA__ZIP_MODE=True))
    with pytest.raises(DataError, match="MODEL.NUM_CLASSES is 2 .*--opts MODEL.NUM_CLASSES 3"):
        build_dataset(False, make_config(root, num_classes=2, DATA__ZIP_MODE=True))
    # A validation split may use fewer labels than the model has classes.
    (tmp_path / "val_map.txt").write_text("cat/0.jpg\t0\n")
    assert len(build_dataset(False, make_config(root, num_classes=3, DATA__ZIP_MODE=True))) == 1


# ----- samplers -----

@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_eval_shards_cover_every_index_once(world_size, shuffle):
    size = 7
    shards = [list(ShardedEvalSampler(size, rank, world_size, shuffle=shuffle, seed=3)) for rank in range(world_size)]
    everything = [index for shard in shards for index in shard]
    assert sorted(everything) == list(range(size))
    assert [len(ShardedEvalSampler(size, rank, world_size)) for rank in range(world_size)] == \
        [len(shard) for shard in shards]
    assert all(index % world_size == rank for rank, shard in enumerate(shards) for index in shard)


def test_train_sampler_order_per_epoch_matches_torch():
    size, world_size = 10, 3
    samplers = [DistributedTrainSampler(size, rank, world_size, seed=7) for rank in range(world_size)]
    first = [list(s) for s in samplers]
    assert all(len(order) == 4 for order in first)  # padded like DistributedSampler: 12 slots for 10 items
    assert set(i for order in first for i in order) == set(range(size))
    assert [list(s) for s in samplers] == first  # deterministic
    for rank, sampler in enumerate(samplers):
        reference = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=7)
        for epoch in (0, 1):
            reference.set_epoch(epoch)
            sampler.set_epoch(epoch)
            assert list(sampler) == list(reference)
    assert [list(s) for s in samplers] != first  # epoch 1 reshuffles


@pytest.mark.parametrize("sampler_class", [DistributedTrainSampler, ShardTrainSampler])
def test_skip_resumes_the_rest_of_the_epoch(sampler_class):
    sampler = sampler_class(11, rank=1, world_size=2, seed=0)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.skip(4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    sampler.set_epoch(4)  # the same epoch keeps the skip
    assert len(sampler) == len(full) - 4
    state = sampler.state_dict()
    assert state == {"epoch": 4, "position": 4} and all(type(v) is int for v in state.values())
    restored = sampler_class(11, rank=1, world_size=2, seed=0)
    restored.load_state_dict(state)
    assert list(restored) == full[4:]
    sampler.set_epoch(5)  # a new epoch starts from its beginning
    assert len(sampler) == len(full) and list(sampler) != full
    with pytest.raises(ValueError):
        sampler.skip(len(full) + 1)


def test_skip_through_the_data_loader(tmp_path):
    root = make_folder_dataset(tmp_path, train={"cat": 5, "dog": 6, "emu": 5})
    loaders = build_loader(make_config(root, DATA__BATCH_SIZE=4), rank=0, world_size=2)
    loaders.train_sampler.set_epoch(2)
    full = list(loaders.train_loader.batch_sampler)
    assert len(full) == len(loaders.train_loader) == 2  # 8 images for this rank
    loaders.train_sampler.skip(1 * 4)
    assert list(loaders.train_loader.batch_sampler) == full[1:] and len(loaders.train_loader) == 1


def test_shard_sampler_stays_in_its_shard_with_equal_lengths():
    samplers = [ShardTrainSampler(10, rank, 3, seed=1) for rank in range(3)]
    assert [len(s) for s in samplers] == [4, 4, 4]
    for rank, sampler in enumerate(samplers):
        epoch0 = list(sampler)
        assert all(index % 3 == rank for index in epoch0)
        assert set(epoch0) == set(range(rank, 10, 3))
        sampler.set_epoch(1)
        assert sorted(set(sampler)) == sorted(set(epoch0))
    orders = [ShardTrainSampler(100, 0, 2, seed=1) for _ in range(2)]
    orders[1].set_epoch(1)
    assert list(orders[0]) != list(orders[1])


# ----- unreadable images -----

def test_corrupt_image_is_replaced_counted_and_logged(tmp_path, caplog):
    root = make_folder_dataset(tmp_path)
    bad = tmp_path / "val" / "cat" / "0.jpg"
    bad.write_bytes(GARBAGE)
    dataset = build_dataset(False, make_config(root))  # the eval transform is deterministic
    dataset.replace_unreadable = True  # as for training; evaluation leaves unreadable images out
    with caplog.at_level(logging.WARNING):
        image, label = dataset[0]
    replacement, replacement_label = dataset[1]
    assert torch.equal(image, replacement) and label == replacement_label == 1  # the label follows the image
    assert dataset.num_bad == 1 and dataset.num_read == 3 and dataset.last_bad == str(bad)
    assert str(bad) in caplog.text


def test_too_many_corrupt_images_raise(tmp_path):
    root = make_folder_dataset(tmp_path, train={"cat": 10, "dog": 2, "emu": 1})
    for i in range(2, 10):
        (tmp_path / "train" / "cat" / f"{i}.jpg").write_bytes(GARBAGE)
    dataset = build_dataset(True, make_config(root))
    with pytest.raises(DataError, match=r"MAX_BAD_FRACTION = 0.01.*cat.*--opts DATA.MAX_BAD_FRACTION"):
        for i in range(len(dataset)):
            dataset[i]
    assert dataset.num_bad == MIN_BAD_TO_STOP
    with pytest.raises(DataError, match="MAX_BAD_FRACTION"):  # what the training loop sees from a worker
        list(DataLoader(build_dataset(True, make_config(root)), batch_size=4, num_workers=1))

    strict = build_dataset(True, make_config(root, DATA__MAX_BAD_FRACTION=0.0))
    with pytest.raises(DataError):
        strict[2]


def test_bad_image_stopping_rule():
    assert not too_many_bad(MIN_BAD_TO_STOP - 1, MIN_BAD_TO_STOP - 1, 0.01)  # a handful never stops a run
    assert too_many_bad(MIN_BAD_TO_STOP, 100, 0.01)
    assert not too_many_bad(MIN_BAD_TO_STOP, 1000, 0.01)
    assert too_many_bad(1, 1000, 0.0)
    assert not too_many_bad(0, 10, 0.0)


# ----- layout errors -----

def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match="(?s)DATA.DATA_PATH .*--data-path.*Expected layout.*train/<class name>"):
        build_dataset(True, make_config(tmp_path / "nowhere"))


def test_missing_val_folder(tmp_path):
    root = make_folder_dataset(tmp_path)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match="(?s)val not found.*Expected layout"):
        build_loader(make_config(root))


def test_empty_class_folder(tmp_path):
    root = make_folder_dataset(tmp_path)
    os.makedirs(tmp_path / "train" / "fox")
    with pytest.raises(DataError, match="fox holds no image"):
        build_dataset(True, make_config(root, num_classes=4))


def test_folder_without_class_folders_or_images(tmp_path):
    os.makedirs(tmp_path / "train")
    write_jpeg(str(tmp_path / "train" / "loose.jpg"), seed=0)
    with pytest.raises(DataError, match="(?s)no class folders.*Expected layout"):
        build_dataset(True, make_config(tmp_path))
    os.makedirs(tmp_path / "train" / "cat")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no image"):
        build_dataset(True, make_config(tmp_path, num_classes=1))


def test_zip_layout_errors(tmp_path):
    root = make_folder_dataset(tmp_path)
    with pytest.raises(DataError, match="(?s)train.zip not found.*leave out --zip.*train_map.txt"):
        build_dataset(True, make_config(root, DATA__ZIP_MODE=True))
    make_zip_dataset(root, root)
    os.remove(tmp_path / "train_map.txt")
    with pytest.raises(DataError, match="map file not found"):
        build_dataset(True, make_config(root, DATA__ZIP_MODE=True))
    (tmp_path / "train_map.txt").write_text("cat/0.jpg 0\n")
    with pytest.raises(DataError, match="train_map.txt:1: expected"):
        build_dataset(True, make_config(root, DATA__ZIP_MODE=True))


def test_too_few_images_for_one_batch(tmp_path):
    root = make_folder_dataset(tmp_path)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(make_config(root, DATA__BATCH_SIZE=8))


# ----- digits demo set -----

def test_digits_dataset(digits_root):
    config = make_config(digits_root, num_classes=10)
    train, val = build_dataset(True, config), build_dataset(False, config)
    assert (len(train), len(val)) == (1497, 300)
    assert train.class_names == [str(d) for d in range(10)]
    assert all(29 <= count <= 31 for count in np.bincount(val.labels)) and len(np.unique(train.labels)) == 10
    with Image.open(train.image_path(0)) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    zipped = build_dataset(False, make_config(digits_root, num_classes=10, DATA__ZIP_MODE=True,
                                              DATA__CACHE_MODE="full"))
    assert len(zipped) == 300 and zipped.targets == val.targets
    assert torch.equal(zipped[7][0], val[7][0])


def test_digits_preparation_is_idempotent(digits_root):
    marker = os.path.join(digits_root, COMPLETE_MARKER)
    before = os.stat(marker).st_mtime_ns, os.stat(os.path.join(digits_root, "train.zip")).st_mtime_ns
    prepare_digits(digits_root)
    assert (os.stat(marker).st_mtime_ns, os.stat(os.path.join(digits_root, "train.zip")).st_mtime_ns) == before


def test_build_loader_prepares_digits_after_an_interrupted_preparation(tmp_path):
    root = tmp_path / "digits"
    staging = tmp_path / ".digits.staging"  # what an interrupted preparation leaves behind, marked as its own
    os.makedirs(staging / "train" / "3")
    (staging / ".digits-staging").write_bytes(b"")
    (staging / "train" / "3" / "junk.jpg").write_bytes(GARBAGE)
    loaders = build_loader(make_config(root, num_classes=10, DATA__PREPARE_DIGITS=True), eval_only=True)
    assert len(loaders.val_dataset) == 300
    assert not os.path.exists(staging) and not os.path.exists(root / ".digits-staging")
    os.makedirs(tmp_path / ".again.staging")  # a folder of that name not made by the preparation is left alone
    with pytest.raises(DataError, match=r"\.again\.staging exists and was not made by the digits preparation"):
        prepare_digits(str(tmp_path / "again"))
    assert os.path.isdir(tmp_path / ".again.staging")
    os.makedirs(tmp_path / "other" / "x")
    with pytest.raises(DataError, match="not empty"):
        prepare_digits(str(tmp_path / "other"))


# ----- zip writer -----

def test_zip_writer_replaces_stale_tmp_and_skips_finished_splits(tmp_path):
    src = make_folder_dataset(tmp_path / "src")
    dst = tmp_path / "dst"
    os.makedirs(dst)
    (dst / "train.zip.tmp").write_bytes(b"half-written")
    make_zip_dataset(src, str(dst), splits=["train"])
    assert not (dst / "train.zip.tmp").exists()
    with zipfile.ZipFile(dst / "train.zip") as archive:
        assert sorted(archive.namelist()) == ["cat/0.jpg", "cat/1.jpg", "cat/2.jpg", "dog/0.jpg", "dog/1.jpg",
                                              "emu/0.jpg", "emu/1.jpg"]
    assert (dst / "train_map.txt").read_text().splitlines()[3] == "dog/0.jpg\t1"

    (dst / "train_map.txt").write_text("cat/0.jpg\t0\n")  # a finished split is not touched again
    progress = []
    make_zip_dataset(src, str(dst), progress=lambda split, done, total: progress.append((split, done, total)))
    assert (dst / "train_map.txt").read_text() == "cat/0.jpg\t0\n"
    assert progress[-1] == ("val", 4, 4) and all(split == "val" for split, _, _ in progress)
    assert (dst / "val.zip").exists() and not (dst / "val.zip.tmp").exists()


# ----- transforms and mixup -----

def test_train_transform_follows_the_recipe(tmp_path):
    config = load_config(None, [])
    steps = build_transform(True, config).transforms
    assert isinstance(steps[0], RandomResizedCropAndInterpolation) and steps[0].size == (224, 224)
    assert "bicubic" in repr(steps[0])
    assert any(type(step).__name__ == "RandAugment" for step in steps)
    assert type(steps[-1]).__name__ == "RandomErasing" and steps[-1].probability == 0.25
    plain = build_transform(True, load_config(None, ["AUG.AUTO_AUGMENT", "none", "AUG.COLOR_JITTER", "0.0",
                                                     "AUG.REPROB", "0.0"])).transforms
    assert [type(step).__name__ for step in plain] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip",
                                                       "MaybeToTensor", "Normalize"]
    small = build_transform(True, load_config(None, ["DATA.IMG_SIZE", "32", "AUG.HFLIP", "0.0"])).transforms
    assert type(small[0]).__name__ == "ResizeIfNeeded"  # only for images of another size
    assert isinstance(small[1], transforms.RandomCrop) and small[1].padding == 4
    assert not any(isinstance(step, transforms.RandomHorizontalFlip) for step in small)
    assert steps[1].p == 0.5
    image = Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8))
    assert build_transform(True, config)(image).shape == (3, 224, 224)


def test_eval_transform_follows_the_recipe():
    crop = build_transform(False, load_config(None, [])).transforms[1:]  # after LimitAspectRatio
    assert isinstance(crop[0], transforms.Resize) and crop[0].size == 256
    assert crop[0].interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(crop[1], transforms.CenterCrop) and crop[1].size == (224, 224)
    big = build_transform(False, load_config(None, ["DATA.IMG_SIZE", "384"])).transforms
    assert big[1].size == 438
    no_crop = build_transform(False, load_config(None, ["DATA.IMG_SIZE", "384", "TEST.CROP", "False"])).transforms
    assert no_crop[0].size == (384, 384) and not any(isinstance(s, transforms.CenterCrop) for s in no_crop)
    small = build_transform(False, load_config(None, ["DATA.IMG_SIZE", "32"])).transforms
    assert not any(isinstance(s, (transforms.Resize, transforms.CenterCrop)) for s in small)
    with pytest.raises(ConfigError, match="DATA.INTERPOLATION"):
        build_transform(False, load_config(None, ["DATA.INTERPOLATION", "cubic"]))


def test_posterize_at_full_magnitude_gives_a_black_image():
    steps = build_transform(True, load_config(None, [])).transforms
    rand_augment = next(step for step in steps if type(step).__name__ == "RandAugment")
    op = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    assert isinstance(op, AugmentOp)
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # keeps 0 bits, which Pillow 13 refuses
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(op(image)).max() == 0


def test_build_mixup():
    config = load_config(None, ["MODEL.NUM_CLASSES", "10", "DATA.BATCH_SIZE", "4"])
    mixup = build_mixup(config)
    assert isinstance(mixup, Mixup) and mixup.num_classes == 10 and mixup.label_smoothing == 0.1
    images, targets = mixup(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, 10) and torch.allclose(targets.sum(1), torch.ones(4))
    assert build_mixup(load_config(None, ["AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"])) is None
    assert build_mixup(load_config(None, ["AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0",
                                          "AUG.CUTMIX_MINMAX", "[0.2, 0.8]"])) is not None
    with pytest.raises(ConfigError, match="even DATA.BATCH_SIZE"):
        build_mixup(load_config(None, ["DATA.BATCH_SIZE", "3"]))


@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_resumed_epoch_repeats_the_augmentation_with_any_number_of_workers(tmp_path, pipeline):
    root = make_folder_dataset(tmp_path)
    opts = ["DATA.BATCH_SIZE", "2", "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", "AUG.REPROB", "0.5",
            "DATA.IMG_SIZE", "40", "DATA.PIPELINE", pipeline]

    def batches(workers, skip):
        loaders = build_loader(make_config(root, *opts, "DATA.NUM_WORKERS", str(workers)))
        loaders.train_sampler.set_epoch(3)
        loaders.train_sampler.skip(skip)
        return [images for images, _ in loaders.train_loader]

    straight = batches(0, 0)
    assert len(straight) >= 3
    for workers in (0, 2):
        resumed = batches(workers, 2)
        assert len(resumed) == len(straight) - 1
        for expected, got in zip(straight[1:], resumed):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
