"""Odd and hostile input to the data pipeline: images of any size and bit depth, decompression bombs,
directory symlink loops, unreadable files in the zip writer, worker errors, exact evaluation with unreadable
validation images and the digits demo set next to your own data."""
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data import DataError, build_dataset, build_loader, build_transform, make_zip_dataset
from data.datasets import decode_image
from test_data import GARBAGE, make_config, make_folder_dataset, write_jpeg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml")
# A tiny model on the demo config, for the tests that need weights.
TINY = ["MODEL.SWIN.EMBED_DIM", "8", "MODEL.SWIN.DEPTHS", "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[1, 2]",
        "DATA.NUM_WORKERS", "0"]


def load_tool(name):
    """A script of tools/ as a module, so its main(argv) runs in this process."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def blank_bilevel_png(path, width: int, height: int) -> None:
    """A real, valid 1-bit PNG of ``width`` x ``height`` white pixels, a few kB on disk whatever its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter type 0, then the packed bits
    compressor = zlib.compressobj(9)
    stream = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b""))


# ----- images of any size -----

@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("is_train", [True, False])
@pytest.mark.parametrize("crop", [True, False])
def test_every_transform_gives_the_configured_size_for_any_image(size, is_train, crop):
    config = make_config("unused", "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", "AUG.REPROB", "0.25",
                         DATA__IMG_SIZE=size, TEST__CROP=crop)
    transform = build_transform(is_train, config)
    rng = np.random.default_rng(0)
    for width, height in [(1, 1), (2, 1), (3, 7), (size, size), (64, 64), (2 * size + 1, size - 1), (5000, 1),
                          (1, 5000)]:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        for _ in range(20 if width * height < 10 else 3):  # tiny images: many random crops
            assert transform(Image.fromarray(pixels)).shape == (3, size, size), (width, height)


def test_images_of_the_configured_size_are_not_resized_at_32_px():
    config = make_config("unused", DATA__IMG_SIZE=32)
    pixels = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None,
                None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(build_transform(False, config)(Image.fromarray(pixels)), expected)


def test_loaders_at_32_px_take_a_1x1_training_image_and_a_64x64_validation_image(tmp_path):
    root = make_folder_dataset(tmp_path)
    write_jpeg(str(tmp_path / "train" / "cat" / "tiny.jpg"), seed=7, size=(1, 1))
    write_jpeg(str(tmp_path / "train" / "dog" / "wide.jpg"), seed=8, size=(300, 2))
    write_jpeg(str(tmp_path / "val" / "dog" / "big.jpg"), seed=9, size=(64, 64))
    loaders = build_loader(make_config(root))
    train_batches = list(loaders.train_loader)
    val_batches = list(loaders.val_loader)
    assert sum(len(labels) for _, labels in train_batches) == 8  # 9 images, full batches of 2
    assert sum(len(labels) for _, labels in val_batches) == 5
    assert all(images.shape[1:] == (3, 32, 32) for images, _ in train_batches + val_batches)


# ----- high bit depth -----

def test_16_bit_png_and_pgm_are_scaled_to_8_bits():
    values = np.array([[0, 257, 40000, 65535]], dtype=np.uint16)
    png = Image.open(io.BytesIO(png_bytes(values)))
    assert png.mode == "I;16"  # what PIL gives; convert("RGB") of it is almost white
    expected = np.array([[0, 1, 156, 255]], dtype=np.uint8)  # round(value * 255 / 65535)
    for data in (png_bytes(values), b"P5\n4 1\n65535\n" + values.astype(">u2").tobytes()):
        image = decode_image(io.BytesIO(data))
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.repeat(expected[..., None], 3, axis=2))
    eight_bit = decode_image(io.BytesIO(png_bytes(expected)))
    np.testing.assert_array_equal(np.asarray(eight_bit)[..., 0], expected)


def tiff_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "TIFF")
    return buffer.getvalue()


def test_32_bit_integer_images_are_read_by_their_value_range():
    """A mode I TIFF declares no range: 0..255 values are 8-bit ones (not 16-bit, which would make them black),
    larger ones up to 65535 are 16-bit ones; a 16-bit PGM (also mode I) follows its header."""
    small = np.array([[0, 1, 128, 255]], dtype=np.int32)
    assert Image.open(io.BytesIO(tiff_bytes(small))).mode == "I"
    np.testing.assert_array_equal(np.asarray(decode_image(io.BytesIO(tiff_bytes(small))))[..., 0], small)
    wide = np.array([[0, 257, 40000, 65535]], dtype=np.int32)
    np.testing.assert_array_equal(np.asarray(decode_image(io.BytesIO(tiff_bytes(wide))))[..., 0], [[0, 1, 156, 255]])
    dark_pgm = b"P5\n2 1\n65535\n" + np.array([0, 255], dtype=">u2").tobytes()
    np.testing.assert_array_equal(np.asarray(decode_image(io.BytesIO(dark_pgm)))[..., 0], [[0, 1]])


def test_pixels_without_a_known_range_are_refused_by_path(tmp_path, caplog):
    root = make_folder_dataset(tmp_path)
    floats = tmp_path / "val" / "cat" / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(floats)
    wide_ints = tmp_path / "val" / "dog" / "int32.tif"
    Image.fromarray(np.full((8, 8), 100000, dtype=np.int32)).save(wide_ints)
    dataset = build_dataset(False, make_config(root, DATA__MAX_BAD_FRACTION=1.0))
    with caplog.at_level(logging.WARNING):
        for index in range(len(dataset)):
            dataset[index]
    assert dataset.num_bad == 2
    assert f"unreadable image {floats}" in caplog.text and "mode F" in caplog.text
    assert f"unreadable image {wide_ints}" in caplog.text and "100000..100000" in caplog.text


# ----- decompression bombs -----

def test_an_image_over_the_pixel_limit_is_unreadable_by_path_without_a_pil_warning(tmp_path, caplog, monkeypatch):
    root = make_folder_dataset(tmp_path)
    bomb = tmp_path / "val" / "cat" / "bomb.png"
    bomb.write_bytes(png_bytes(np.zeros((45, 40), dtype=np.uint8)))
    # 1,800 pixels: PIL only warns below twice the limit; the other images have 1,200.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    dataset = build_dataset(False, make_config(root, DATA__MAX_BAD_FRACTION=1.0))
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index in range(len(dataset)):
            dataset[index]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert dataset.num_bad == 1 and dataset.last_bad == str(bomb)
    assert "exceeds limit of 1500 pixels" in caplog.text


def test_predict_refuses_a_12000_px_image_from_its_header(tmp_path, capsys, monkeypatch):
    from PIL import ImageFile

    from config import load_config
    from models import build_model

    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": build_model(load_config(DEMO, TINY)).state_dict()}, checkpoint)
    bomb = tmp_path / "bomb.png"
    blank_bilevel_png(bomb, 12000, 12000)  # 144M pixels, over PIL's limit of 89M; 22 kB on disk
    ok = tmp_path / "ok.png"
    ok.write_bytes(png_bytes(np.zeros((5, 7), dtype=np.uint8)))
    decoded_sizes = []
    load = ImageFile.ImageFile.load

    def load_checked(image):
        decoded_sizes.append(image.size)
        if image.size[0] * image.size[1] > Image.MAX_IMAGE_PIXELS:
            raise AssertionError(f"decoded a {image.size} image")  # stops before gigabytes are taken
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_checked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = load_tool("predict").main(["--cfg", DEMO, "--checkpoint", str(checkpoint), str(bomb), str(ok),
                                            "--opts"] + TINY)
    out, err = capsys.readouterr()
    assert status == 1
    assert f"cannot read {bomb}: Image size (144000000 pixels) exceeds limit" in err
    assert str(ok) in out and decoded_sizes == [(7, 5)]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# ----- folder scanning -----

def test_a_directory_link_loop_is_followed_once_and_reported(tmp_path, caplog):
    root = make_folder_dataset(tmp_path)
    os.symlink(".", tmp_path / "train" / "cat" / "loopdir")  # `ln -s . train/cat/loopdir`
    os.makedirs(tmp_path / "train" / "dog" / "more")
    write_jpeg(str(tmp_path / "train" / "dog" / "more" / "x.jpg"), seed=3)
    os.symlink(os.path.join("..", "emu"), tmp_path / "train" / "dog" / "emu_link")  # into another class
    with caplog.at_level(logging.WARNING):
        train = build_dataset(True, make_config(root))
    assert train.targets == [0, 0, 0, 1, 1, 1, 2, 2]
    assert train.image_path(5).endswith(os.path.join("dog", "more", "x.jpg"))
    assert f"skipped folder {tmp_path / 'train' / 'cat' / 'loopdir'}" in caplog.text
    assert f"skipped folder {tmp_path / 'train' / 'dog' / 'emu_link'}" in caplog.text
    make_zip_dataset(root, str(tmp_path / "zip"), splits=["train"])
    assert (tmp_path / "zip" / "train_map.txt").read_text().count("\n") == 8


# ----- zip writer -----

def test_zip_writer_leaves_out_unreadable_files_and_reports_them(tmp_path, caplog):
    src = make_folder_dataset(tmp_path / "src")
    dangling = tmp_path / "src" / "train" / "cat" / "dangling.jpg"
    os.symlink(tmp_path / "nowhere.jpg", dangling)
    garbage = tmp_path / "src" / "val" / "dog" / "garbage.jpg"
    garbage.write_bytes(GARBAGE)
    dst = tmp_path / "dst"
    with caplog.at_level(logging.WARNING):
        skipped = make_zip_dataset(src, str(dst))
    assert skipped == [str(dangling), str(garbage)]
    assert f"skipped {dangling}" in caplog.text and f"skipped {garbage}" in caplog.text
    for split, count in (("train", 7), ("val", 4)):
        with zipfile.ZipFile(dst / f"{split}.zip") as archive:
            names = archive.namelist()
        assert len(names) == count and "cat/dangling.jpg" not in names and "dog/garbage.jpg" not in names
        assert [line.split("\t")[0] for line in (dst / f"{split}_map.txt").read_text().splitlines()] == names
    assert sorted(os.listdir(dst)) == ["train.zip", "train_map.txt", "val.zip", "val_map.txt"]


def write_zip(path, members, map_lines):
    """A stored zip of ``(name, bytes)`` members, duplicates allowed, and its map file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name and writes it anyway
        with zipfile.ZipFile(path / "train.zip", "w") as archive:
            for name, data in members:
                archive.writestr(name, data)
    (path / "train_map.txt").write_text("".join(f"{name}\t{label}\n" for name, label in map_lines))
    return str(path / "train.zip")


def jpeg_bytes(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_zip_with_two_members_of_one_name_is_refused(tmp_path):
    from data.ziparchive import ZipMembers

    zip_path = write_zip(tmp_path, [("a.jpg", jpeg_bytes(0)), ("b.jpg", jpeg_bytes(1)), ("a.jpg", jpeg_bytes(2))],
                         [("a.jpg", 0), ("b.jpg", 1), ("a.jpg", 2)])
    with pytest.raises(DataError, match=r"train.zip holds 1 names twice or more \(two members under one name, e.g. "
                                        r"\['a.jpg'\]\): the map file cannot say which member it means"):
        ZipMembers(zip_path, ["a.jpg", "b.jpg", "a.jpg"])
    single = write_zip(tmp_path, [("a.jpg", jpeg_bytes(0)), ("b.jpg", jpeg_bytes(1))], [])
    with pytest.raises(DataError, match=r"lists 1 members more than once, e.g. \['a.jpg'\]"):
        ZipMembers(single, ["a.jpg", "b.jpg", "a.jpg"])


def test_a_zip_directory_declaring_huge_sizes_is_refused_before_caching(tmp_path):
    """Every member's uncompressed size in the central directory set to 4 GiB (80 GiB for 20 images)."""
    root = tmp_path / "data"
    root.mkdir()
    members = [(f"{i}.jpg", jpeg_bytes(i)) for i in range(20)]
    zip_path = write_zip(root, members, [(name, i % 2) for i, (name, _) in enumerate(members)])
    (root / "val_map.txt").write_text((root / "train_map.txt").read_text())
    shutil.copy(zip_path, root / "val.zip")
    with open(zip_path, "r+b") as f:
        data = bytearray(f.read())
        at = data.find(b"PK\x01\x02")
        while at >= 0:  # uncompressed size: offset 24 of each central directory record
            data[at + 24:at + 28] = struct.pack("<I", 0xFFFFFFF0)
            at = data.find(b"PK\x01\x02", at + 4)
        f.seek(0)
        f.write(data)
    config = make_config(root, num_classes=2, DATA__ZIP_MODE=True, DATA__CACHE_MODE="full")
    with pytest.raises(DataError, match=r"member 0.jpg declares \d+ bytes stored expanding to 4294967280, which its "
                                        r"data cannot hold .* the zip's directory is damaged"):
        build_dataset(True, config)


def test_a_cache_larger_than_the_free_memory_is_refused(tmp_path, monkeypatch):
    import data.ziparchive

    root = make_folder_dataset(tmp_path)
    make_zip_dataset(root, root)
    monkeypatch.setattr(data.ziparchive, "available_memory", lambda: 1000)
    with pytest.raises(DataError, match=r"caching 4 images of \S+val.zip in memory needs 0.0 GB, more than the 0.0 GB "
                                        r"this machine has available. Use --cache-mode part"):
        build_dataset(False, make_config(root, DATA__ZIP_MODE=True, DATA__CACHE_MODE="full"))


def test_zip_writer_removes_its_tmp_files_after_a_failure_and_restarts(tmp_path, monkeypatch):
    src = make_folder_dataset(tmp_path / "src")
    dst = tmp_path / "dst"
    writestr = zipfile.ZipFile.writestr
    written = []

    def full_disk_after_two(archive, info, data, **kwargs):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(info)
        return writestr(archive, info, data, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full_disk_after_two)
    with pytest.raises(OSError, match="No space left"):
        make_zip_dataset(src, str(dst))
    assert os.listdir(dst) == []
    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)
    assert make_zip_dataset(src, str(dst)) == []
    assert sorted(os.listdir(dst)) == ["train.zip", "train_map.txt", "val.zip", "val_map.txt"]


def test_zip_tool_progress_never_mixes_into_a_log_line(tmp_path):
    """stderr to a pipe: progress comes as whole lines; the warning about a skipped file is a line of its own."""
    src = make_folder_dataset(tmp_path / "src", train={"cat": 30, "dog": 2, "emu": 2})
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "src" / "train" / "cat" / "15_dangling.jpg")
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_zip_dataset.py"), src,
                             str(tmp_path / "dst")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr and "\033" not in result.stderr
    progress = [line for line in lines if re.fullmatch(r"(train|val): \d+/\d+ images \(\d+%\)", line)]
    assert progress[-1] == "val: 4/4 images (100%)" and "train: 35/35 images (100%)" in progress
    skipped = [line for line in lines if "skipped" in line and "15_dangling.jpg" in line]
    assert len(skipped) == 1 and skipped[0].startswith("skipped "), lines


def test_zip_tool_progress_on_a_terminal_is_cleared_before_each_log_line():
    tool = load_tool("make_zip_dataset")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = tool.ProgressLine(terminal, interval_s=0)
    logger = logging.getLogger("test_zip_progress")
    logger.propagate = False
    logger.addHandler(progress.handler())
    progress("train", 1, 4)
    logger.warning("skipped a file")
    progress("train", 4, 4)
    assert terminal.getvalue() == ("\rtrain: 1/4 images (25%)\r\033[Kskipped a file\n\rtrain: 1/4 images (25%)"
                                   "\r\033[K\rtrain: 4/4 images (100%)\n")


def test_zip_tool_reports_an_unusable_output_in_one_line(tmp_path, capsys, monkeypatch):
    src = make_folder_dataset(tmp_path / "src")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("in the way")
    monkeypatch.setattr(sys, "argv", ["make_zip_dataset.py", src, str(not_a_folder)])
    assert load_tool("make_zip_dataset").main() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(not_a_folder) in err and len(err.strip().splitlines()) == 1


# ----- errors from loader workers -----

def run_main(args, cwd=REPO):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(REPO, "main.py")] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)  # a hang at exit fails fast


@pytest.mark.slow
def test_too_many_unreadable_images_in_a_worker_stop_with_one_line(tmp_path):
    root = make_folder_dataset(tmp_path / "data", train={"cat": 10, "dog": 2, "emu": 2})
    for i in range(2, 10):
        (tmp_path / "data" / "train" / "cat" / f"{i}.jpg").write_bytes(GARBAGE)
    result = run_main(["--cfg", DEMO, "--data-path", root, "--output", str(tmp_path / "out"), "--batch-size", "2",
                       "--opts", "MODEL.NUM_CLASSES", "3", "DATA.PREPARE_DIGITS", "False"] + TINY[:-2]
                      + ["DATA.NUM_WORKERS", "1"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "could not be decoded, more than DATA.MAX_BAD_FRACTION" in lines[0]
    assert "Caught DataError" not in result.stderr + result.stdout and "Traceback" not in result.stdout


def test_data_error_from_a_worker_keeps_its_own_message(tmp_path):
    root = make_folder_dataset(tmp_path, train={"cat": 10, "dog": 2, "emu": 1})
    for i in range(2, 10):
        (tmp_path / "train" / "cat" / f"{i}.jpg").write_bytes(GARBAGE)
    with pytest.raises(DataError) as caught:
        list(DataLoader(build_dataset(True, make_config(root)), batch_size=4, num_workers=1))
    assert str(caught.value).startswith("5 of the 7 images read in this process")
    assert "in DataLoader worker process 0" in caught.value.worker_traceback
    assert str(DataError("plain")) == "plain" and DataError("plain").worker_traceback == ""


# ----- exact evaluation with unreadable validation images -----

def linear_model(num_classes=3, size=32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, num_classes))


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_leaves_unreadable_images_out_and_names_them(tmp_path, caplog, workers):
    from engine import Precision, validate

    root = make_folder_dataset(tmp_path, val={"cat": 2, "dog": 3, "emu": 2})
    bad = [tmp_path / "val" / "cat" / "1.jpg", tmp_path / "val" / "emu" / "0.jpg"]
    for path in bad:
        path.write_bytes(GARBAGE)
    loaders = build_loader(make_config(root, DATA__NUM_WORKERS=workers), eval_only=True)
    model = linear_model()
    with caplog.at_level(logging.WARNING):
        metrics = validate(model, loaders.val_loader, torch.device("cpu"), Precision(False), 7)
    readable = [i for i in range(7) if loaders.val_dataset.image_path(i) not in map(str, bad)]
    images = torch.stack([loaders.val_dataset[i][0] for i in readable])
    labels = torch.tensor([loaders.val_dataset.labels[i] for i in readable])
    with torch.no_grad():
        logits = model(images)
    assert metrics["count"] == 5 and metrics["unreadable"] == 2
    assert metrics["acc1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert f"evaluated 5 of 7 validation images; 2 unreadable images were left out: {bad[0]}, {bad[1]}" \
        in caplog.text


@pytest.mark.slow
def test_evaluation_with_unreadable_images_is_the_same_with_1_and_2_processes(tmp_path):
    from config import load_config
    from models import build_model

    root = make_folder_dataset(tmp_path / "data", val={"cat": 3, "dog": 4, "emu": 3})
    # Images 0, 3 and 7: in the shards of rank 0, 1 and 1 with 2 processes.
    bad = [tmp_path / "data" / "val" / "cat" / "0.jpg", tmp_path / "data" / "val" / "dog" / "0.jpg",
           tmp_path / "data" / "val" / "emu" / "0.jpg"]
    for path in bad:
        path.write_bytes(GARBAGE)
    opts = ["MODEL.NUM_CLASSES", "3", "DATA.PREPARE_DIGITS", "False"] + TINY
    weights = tmp_path / "weights.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model(load_config(DEMO, opts)).state_dict()}, weights)
    common = ["--cfg", DEMO, "--data-path", root, "--eval", "--pretrained", str(weights), "--batch-size", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    results = {}
    for processes in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", "29533"] if processes > 1 else [sys.executable]
        output = tmp_path / f"out{processes}"
        result = subprocess.run(launcher + [os.path.join(REPO, "main.py")] + common + ["--output", str(output),
                                "--opts"] + opts, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "evaluated 7 of 10 validation images; 3 unreadable images were left out: " + ", ".join(map(str, bad)) \
            in result.stdout
        with open(output / "swin_micro_digits" / "default" / "eval.json") as f:
            results[processes] = json.load(f)
    one, two = results[1], results[2]
    assert one["count"] == two["count"] == 7 and one["unreadable"] == two["unreadable"] == 3
    assert one["acc1"] == two["acc1"] and one["acc5"] == two["acc5"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)


# ----- the digits demo set and your own data -----

def test_demo_config_on_your_own_folder_uses_it_as_it_is(tmp_path, caplog):
    root = make_folder_dataset(tmp_path / "mine")
    before = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)
    with caplog.at_level(logging.INFO):
        loaders = build_loader(make_config(root, DATA__PREPARE_DIGITS=True))
    assert len(loaders.train_dataset) == 7 and loaders.class_names == ["cat", "dog", "emu"]
    assert sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files) == before
    assert "holds other data than the digits demo set; using it as it is" in caplog.text
    assert not os.path.exists(f"{root}.tmp")


@pytest.mark.slow
def test_two_first_time_preparations_at_once_both_succeed(tmp_path):
    root = tmp_path / "datasets" / "digits"
    script = f"import sys; sys.path.insert(0, {REPO!r}); from data.digits import prepare_digits; " \
             f"prepare_digits({str(root)!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    config = make_config(root, num_classes=10)
    assert (len(build_dataset(True, config)), len(build_dataset(False, config))) == (1497, 300)
    assert sorted(os.listdir(tmp_path / "datasets")) == ["digits"]  # no staging folder, no lock file left


@pytest.mark.slow
def test_demo_command_trains_on_your_own_folder(tmp_path):
    root = make_folder_dataset(tmp_path / "mine", train={"cat": 4, "dog": 4, "emu": 4})
    result = run_main(["--cfg", DEMO, "--data-path", root, "--output", str(tmp_path / "out"), "--batch-size", "4",
                       "--opts", "MODEL.NUM_CLASSES", "3", "TRAIN.EPOCHS", "1"] + TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "out" / "swin_micro_digits" / "default" / "metrics.jsonl") as f:
        assert json.loads(f.readline())["val_count"] == 4
    assert sorted(os.listdir(root)) == ["train", "val"]


def test_demo_config_pointed_at_a_missing_folder_does_not_write_digits_there(tmp_path, capsys):
    """A mistyped --data-path with the demo config stops naming the folder; no digits are written into it."""
    import main as driver

    missing = tmp_path / "my_flowers_typo"
    code = driver.cli(["--cfg", os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml"), "--data-path",
                       str(missing), "--output", str(tmp_path / "out"), "--opts", "MODEL.NUM_CLASSES", "3"])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()
