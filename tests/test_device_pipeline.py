"""DATA.PIPELINE device: each op against PIL/timm on the same image and parameters, the law of the random draws
against timm's, whole batches against the workers pipeline, independence from batching, decoding fallbacks and
unreadable images, the JPEG header check and the package's one-way imports.

Tolerances, in 8-bit levels (1 level = 1/255 before normalisation):
- point ops (LUTs, enhance blends, posterize, solarize, equalize, autocontrast): exact. They use PIL's own integer
  arithmetic (fixed-point grayscale, truncating blend, float64 tables as PIL computes them in Python).
- affine ops (rotate, shear, translate): at most 1 level on at most 0.5% of the pixels. Same filter as PIL
  (Keys' cubic a = -1, edge-clamped, truncated), computed in float64; PIL sums in another order, so a value that
  lands within rounding error of a whole number can truncate the other way.
- resized crop: at most 1 level on at most 1% of the pixels (bicubic; bilinear upscaling: 2 levels, 5%).
  Torch's antialiased kernels are PIL's filters and we round after each pass as PIL does, but PIL sums with
  22-bit fixed-point weights, which round a few half-way values differently.
"""
import ast
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from scipy import stats
from timm.data import auto_augment as timm_ops
from torchvision.transforms import functional as TF

from config import ConfigError
from data import build_loader, build_transform
from data import device_ops as ops
from data.datasets import seeded_random_streams
from data.decode import jpeg_header
from data.device_transforms import RandAugmentStep, build_device_transform
from data.pipelines import resolve_pipeline
from tests.test_data import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo(height=45, width=61, seed=0) -> Image.Image:
    """A smooth image with grain, like a photo (random noise alone would make every op look the same)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return Image.fromarray((pixels + rng.integers(-20, 21, size=pixels.shape)).clip(0, 255).astype(np.uint8))


def as_batch(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()


def level_diff(result: torch.Tensor, expected: Image.Image):
    """(largest difference in levels, fraction of pixels that differ)."""
    difference = (result[0] - as_batch(expected)[0]).abs()
    return difference.max().item(), (difference > 0).float().mean().item()


# ----- each op against PIL / timm -----

POINT_OPS = [
    ("autocontrast", lambda x: ops.autocontrast(x), ImageOps.autocontrast),
    ("equalize", lambda x: ops.equalize(x), ImageOps.equalize),
    ("invert", lambda x: ops.invert(x), ImageOps.invert),
    ("posterize 0 (black)", lambda x: ops.posterize(x, torch.tensor([0])), lambda im: Image.new("RGB", im.size)),
    ("posterize 3", lambda x: ops.posterize(x, torch.tensor([3])), lambda im: timm_ops.posterize(im, 3)),
    ("posterize 8", lambda x: ops.posterize(x, torch.tensor([8])), lambda im: timm_ops.posterize(im, 8)),
    ("solarize", lambda x: ops.solarize(x, torch.tensor([100])), lambda im: timm_ops.solarize(im, 100)),
    ("solarize_add", lambda x: ops.solarize_add(x, torch.tensor([77])), lambda im: timm_ops.solarize_add(im, 77)),
] + [(f"{name} {factor}", lambda x, fn=fn, f=factor: fn(x, torch.tensor([f])), lambda im, ref=ref, f=factor: ref(im, f))
     for factor in (0.1, 0.63, 1.37, 1.9)
     for name, fn, ref in (("color", ops.adjust_color, timm_ops.color),
                           ("contrast", ops.adjust_contrast, timm_ops.contrast),
                           ("brightness", ops.adjust_brightness, timm_ops.brightness),
                           ("sharpness", ops.adjust_sharpness, timm_ops.sharpness))]


@pytest.mark.parametrize("name,device_op,pil_op", POINT_OPS, ids=[name for name, _, _ in POINT_OPS])
def test_point_ops_equal_pil_exactly(name, device_op, pil_op):
    for seed in range(3):
        image = photo(seed=seed)
        assert level_diff(device_op(as_batch(image)), pil_op(image)) == (0.0, 0.0), name


FILL = (124, 116, 104)  # timm's fill for the ImageNet mean
GEOMETRIC = [("rotate", -27.3), ("rotate", 13.0), ("rotate", 0.0), ("shear_x", -0.27), ("shear_y", 0.19),
             ("translate_x_rel", 0.31), ("translate_y_rel", -0.4)]


@pytest.mark.parametrize("name,arg", GEOMETRIC)
@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR], ids=["bicubic", "bilinear"])
def test_affine_ops_match_pil(name, arg, resample):
    for seed in range(3):
        image = photo(seed=seed)
        width, height = image.size
        matrix = {"rotate": lambda: ops.rotation_matrix(arg, width, height),
                  "shear_x": lambda: (1, arg, 0, 0, 1, 0), "shear_y": lambda: (1, 0, 0, arg, 1, 0),
                  "translate_x_rel": lambda: (1, 0, arg * width, 0, 1, 0),
                  "translate_y_rel": lambda: (1, 0, 0, 0, 1, arg * height)}[name]()
        result = ops.affine(as_batch(image), torch.tensor([matrix], dtype=torch.float64),
                            torch.tensor([resample == Image.Resampling.BICUBIC]), FILL)
        expected = getattr(timm_ops, name)(image, arg, resample=resample, fillcolor=FILL)
        largest, fraction = level_diff(result, expected)
        assert largest <= 1 and fraction <= 0.005, (name, arg, largest, fraction)


@pytest.mark.parametrize("box", [(10, 20, 300, 400), (100, 100, 60, 80), (0, 0, 375, 500), (50, 60, 224, 224),
                                 (3, 5, 150, 120)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resized_crop_matches_pil(box, mode):
    image = photo(375, 500, seed=1)
    interpolation = TF.InterpolationMode.BICUBIC if mode == "bicubic" else TF.InterpolationMode.BILINEAR
    expected = TF.resized_crop(image, *box, [224, 224], interpolation)
    result = ops.resized_crop(as_batch(image)[0], *box, (224, 224), mode)[None]
    largest, fraction = level_diff(result, expected)
    assert largest <= (1 if mode == "bicubic" else 2) and fraction <= (0.01 if mode == "bicubic" else 0.05), \
        (largest, fraction)


def test_eval_transform_matches_pil(tmp_path):
    """Resize the short side (bicubic) and center-crop, on images of several shapes, normalised."""
    config = make_config(tmp_path, DATA__IMG_SIZE=64)
    pil = build_transform(False, config)
    device = build_device_transform(pil)
    for size in ((45, 61), (90, 30), (64, 64), (20, 300)):
        image = photo(*size)
        params = collate_params([device.draw(size)])
        result = device([as_batch(image)[0].to(torch.uint8)], params)
        largest = (result[0] - pil(image)).abs().max().item() * 255 * 0.226  # in levels (std 0.225-0.229)
        assert result.shape == (1, 3, 64, 64) and largest <= 1.01, (size, largest)


def collate_params(params_list):
    return {key: torch.as_tensor(np.asarray([p[key] for p in params_list])) for key in params_list[0]}


def test_normal_noise_law_and_independence():
    seeds = torch.arange(40, dtype=torch.int64) * 7919 + 2 ** 40
    noise = ops.normal_noise(seeds, (3, 16, 16), torch.device("cpu"))
    assert stats.kstest(noise.flatten().double().numpy(), "norm").pvalue > 1e-3
    correlation = np.corrcoef(noise[:20].flatten().numpy(), noise[20:].flatten().numpy())[0, 1]
    assert abs(correlation) < 0.03
    neighbours = np.corrcoef(noise[:, :, :, :-1].flatten().numpy(), noise[:, :, :, 1:].flatten().numpy())[0, 1]
    assert abs(neighbours) < 0.03
    again = ops.normal_noise(seeds[5:6], (3, 16, 16), torch.device("cpu"))
    assert torch.equal(again[0], noise[5])  # a function of the seed alone


# ----- the law of the draws -----

def train_transform(tmp_path, *opts, size=64):
    return build_transform(True, make_config(tmp_path, "AUG.REPROB", "0.25", "AUG.COLOR_JITTER", "0.4",
                                             *opts, DATA__IMG_SIZE=size))


def test_draws_follow_timm_for_the_same_seed(tmp_path):
    """For a sample seed, the device pipeline draws what timm's transform draws from the same streams: the crop
    box, the flip and the RandAugment ops with their magnitudes (checked through timm's own calls)."""
    pil = train_transform(tmp_path)
    device = build_device_transform(pil)
    crop, flip, rand_augment = pil.transforms[0], pil.transforms[1], pil.transforms[2]
    for seed in range(300):
        size = (30 + seed % 200, 40 + (7 * seed) % 300)
        params = draw(device, size, seed)
        with seeded_random_streams(seed):
            box = crop.get_params(torch.empty(()).expand(1, *size), crop.scale, crop.ratio)
            flipped = bool(torch.rand(1) < flip.p)
            chosen = np.random.choice(rand_augment.ops, rand_augment.num_layers)
        assert params["0.box"][:4] == list(box) and params["1.flip"] == flipped
        assert [rand_augment.ops[i].name for i in params["2.op"]] == [op.name for op in chosen]


def draw(device_transform, size, seed):
    with seeded_random_streams(seed):
        return device_transform.draw(size)


def recorded_timm_draws(pil, sizes, seeds):
    """Runs timm's own transform and records the parameters it drew (its functions wrapped, nothing replaced)."""
    crop, rand_augment, erasing = pil.transforms[0], pil.transforms[2], pil.transforms[-1]
    boxes, ops_chosen, applied, erased = [], [], [], []
    original_get_params, original_choice = crop.get_params, np.random.choice

    def get_params(*args):
        boxes.append(original_get_params(*args))
        return boxes[-1]

    def choice(*args, **kwargs):
        result = original_choice(*args, **kwargs)
        ops_chosen.extend(op.name for op in result)
        return result

    crop.get_params = get_params
    original_erase = erasing._erase

    def erase(image, *args):
        before = image.clone()
        original_erase(image, *args)
        erased.append(float((image != before).any(0).float().mean()))

    erasing._erase = erase
    np.random.choice = choice
    try:
        for size, seed in zip(sizes, seeds):
            with seeded_random_streams(seed):
                pil(photo(*size, seed=seed % 7))
    finally:
        np.random.choice = original_choice
    return boxes, ops_chosen, erased


@pytest.mark.slow
def test_law_of_the_draws_matches_timm(tmp_path):
    """Over thousands of samples, the crop scale and aspect ratio, the op frequencies and the erased fraction that
    the device pipeline draws follow the laws of timm's transform run on other seeds (two-sample tests)."""
    pil = train_transform(tmp_path, size=48)
    device = build_device_transform(train_transform(tmp_path, size=48))
    count = 3000
    sizes = [(40 + i % 50, 50 + (3 * i) % 70) for i in range(count)]
    timm_boxes, timm_ops_chosen, timm_erased = recorded_timm_draws(pil, sizes[:1500], range(10 ** 6, 10 ** 6 + 1500))
    ours = [draw(device, size, seed) for size, seed in zip(sizes, range(count))]
    names = [op.name for op in pil.transforms[2].ops]

    def scale_and_ratio(boxes, sizes):
        return (np.array([h * w / (s[0] * s[1]) for (_, _, h, w), s in zip(boxes, sizes)]),
                np.log([w / h for _, _, h, w in boxes]))

    our_scale, our_ratio = scale_and_ratio([p["0.box"][:4] for p in ours], sizes)
    timm_scale, timm_ratio = scale_and_ratio(timm_boxes, sizes[:1500])
    assert stats.ks_2samp(our_scale, timm_scale).pvalue > 1e-3
    assert stats.ks_2samp(our_ratio, timm_ratio).pvalue > 1e-3
    our_counts = np.bincount([i for p in ours for i in p["2.op"]], minlength=len(names))
    timm_counts = np.bincount([names.index(n) for n in timm_ops_chosen], minlength=len(names))
    assert stats.chi2_contingency(np.stack([our_counts, timm_counts])).pvalue > 1e-3
    assert abs(np.mean([on for p in ours for on in p["2.on"]]) - 0.5) < 0.03  # each op applied with p 0.5
    our_erased = np.array([p["5.boxes"][0][2] * p["5.boxes"][0][3] / 48 ** 2 for p in ours])
    assert abs((our_erased > 0).mean() - 0.25) < 0.03
    assert stats.ks_2samp(our_erased[our_erased > 0], np.array(timm_erased)[np.array(timm_erased) > 0]).pvalue > 1e-3


# ----- whole batches -----

def photo_dataset(root, count=12, sizes=((60, 80), (90, 50), (64, 64), (33, 120))):
    for index in range(count):
        folder = os.path.join(root, "train" if index % 4 else "val", f"c{index % 3}")
        os.makedirs(folder, exist_ok=True)
        photo(*sizes[index % len(sizes)], seed=index).save(os.path.join(folder, f"{index}.jpg"), quality=92)
        if index % 4 == 0:  # every class in train/ too
            folder = folder.replace(os.sep + "val" + os.sep, os.sep + "train" + os.sep)
            os.makedirs(folder, exist_ok=True)
            photo(*sizes[index % len(sizes)], seed=index + 100).save(os.path.join(folder, "x.jpg"), quality=92)
    return str(root)


def epoch_batches(root, pipeline, *opts, epoch=2, **keys):
    loaders = build_loader(make_config(root, *opts, DATA__PIPELINE=pipeline, **keys))
    loaders.train_sampler.set_epoch(epoch)
    train = [images for images, _ in loaders.train_loader]
    val = [images for images, _ in loaders.val_loader]
    return torch.cat(train), torch.cat(val)


LEVEL = 1 / 255 / 0.225  # one 8-bit level after normalisation, at most


def test_whole_batch_equals_the_workers_pipeline(tmp_path):
    """The full recipe at 48 px (crop, flip, RandAugment m9; timm leaves colour jitter out with RandAugment), fixed
    seed, against the workers pipeline. A 1-level difference of the resize can grow through later ops (enhance
    factors up to 1.9, autocontrast's stretch, equalize's table, a solarize threshold): at most 0.5% of the values
    may differ by more than 1 level, the mean difference stays under 0.1 level, and none (for these seeds) by more
    than 8 levels. Validation (resize and crop only) is within 1 level everywhere."""
    root = photo_dataset(tmp_path)
    opts = ["AUG.REPROB", "0.0", "DATA.IMG_SIZE", "48", "DATA.BATCH_SIZE", "4"]
    workers_train, workers_val = epoch_batches(root, "workers", *opts)
    device_train, device_val = epoch_batches(root, "device", *opts)
    difference = (device_train - workers_train).abs() / LEVEL
    assert (difference > 1.01).float().mean() < 0.005 and difference.mean() < 0.1 and difference.amax() <= 8
    assert (device_val - workers_val).abs().amax() <= 1.01 * LEVEL


def test_random_erasing_boxes_follow_the_workers_pipeline(tmp_path):
    """The same pixels are erased in both pipelines (the boxes follow timm's draws); the noise in them is standard
    normal but not the same numbers (see ``device_ops.normal_noise``)."""
    root = photo_dataset(tmp_path)
    opts = ["AUG.AUTO_AUGMENT", "none", "DATA.IMG_SIZE", "48", "DATA.BATCH_SIZE", "4"]
    erased = {}
    for pipeline in ("workers", "device"):
        plain, _ = epoch_batches(root, pipeline, *opts, AUG__REPROB=0.0)
        with_erasing, _ = epoch_batches(root, pipeline, *opts, AUG__REPROB=1.0)
        erased[pipeline] = ((with_erasing - plain).abs() > 1e-4).any(1)
        noise = with_erasing.permute(1, 0, 2, 3)[:, erased[pipeline]]
        assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    assert erased["device"].any(dim=(1, 2)).all() and torch.equal(erased["device"], erased["workers"])


def test_samples_do_not_depend_on_batch_or_workers(tmp_path):
    root = photo_dataset(tmp_path)
    opts = ["DATA.IMG_SIZE", "48", "AUG.REPROB", "0.5"]
    reference, _ = epoch_batches(root, "device", *opts, DATA__BATCH_SIZE=4)
    by_two, _ = epoch_batches(root, "device", *opts, DATA__BATCH_SIZE=2, DATA__NUM_WORKERS=2)
    assert torch.equal(by_two, reference)
    other_epoch, _ = epoch_batches(root, "device", *opts, epoch=3, DATA__BATCH_SIZE=4)
    assert not torch.equal(other_epoch, reference)


def test_simmim_batches_equal_the_workers_pipeline(tmp_path):
    root = photo_dataset(tmp_path)
    opts = ["TRAIN.OBJECTIVE", "simmim", "DATA.IMG_SIZE", "32", "DATA.MASK_PATCH_SIZE", "8", "MODEL.TYPE", "swin",
            "DATA.BATCH_SIZE", "4"]
    results = {}
    for pipeline in ("workers", "device"):
        loaders = build_loader(make_config(root, *opts, DATA__PIPELINE=pipeline))
        loaders.train_sampler.set_epoch(1)
        results[pipeline] = [pair for pair, _ in loaders.train_loader] + [pair for pair, _ in loaders.val_loader]
    for (images, masks), (device_images, device_masks) in zip(results["workers"], results["device"]):
        assert torch.equal(masks, device_masks.cpu())
        assert (images - device_images).abs().amax() <= 1.01 * LEVEL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_the_cpu_device_pipeline(tmp_path):
    """nvJPEG, the side stream and every op on CUDA against the same pipeline on the CPU (nvJPEG's colour
    conversion may differ from libjpeg-turbo's by a level or two; chained ops may amplify that as above)."""
    root = photo_dataset(tmp_path)
    opts = ["DATA.IMG_SIZE", "48", "DATA.BATCH_SIZE", "4", "AUG.REPROB", "0.5", "AUG.COLOR_JITTER", "0.4"]
    results = {}
    for device in ("cpu", "cuda"):
        loaders = build_loader(make_config(root, *opts, DATA__PIPELINE="device"), device=torch.device(device))
        loaders.train_sampler.set_epoch(2)
        train = torch.cat([images.cpu() for images, _ in loaders.train_loader])
        val = torch.cat([images.cpu() for images, _ in loaders.val_loader])
        results[device] = train, val
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        difference = (cpu - cuda).abs() / LEVEL
        assert (difference > 3.01).float().mean() < 0.01 and difference.mean() < 0.5


# ----- decoding on the CPU and unreadable images -----

def odd_images(root):
    """Images the device decoder is not given, one of each kind, and a damaged JPEG."""
    cat = os.path.join(root, "train", "cat")
    os.makedirs(cat)
    base = photo(40, 50, seed=3)
    base.save(os.path.join(cat, "0_plain.jpg"), quality=90)
    base.save(os.path.join(cat, "1_image.png"))
    base.convert("CMYK").save(os.path.join(cat, "2_cmyk.jpg"), quality=90)
    base.save(os.path.join(cat, "3_progressive.jpg"), quality=90, progressive=True)
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(os.path.join(cat, "4_sixteen.png"))
    data = bytearray(open(os.path.join(cat, "0_plain.jpg"), "rb").read())
    data[len(data) // 2:] = b"\x00" * (len(data) - len(data) // 2)  # the header is fine, the scan is not
    open(os.path.join(cat, "5_damaged.jpg"), "wb").write(bytes(data[:len(data) * 2 // 3]))
    base.save(os.path.join(cat, "6_plain.jpg"), quality=90)
    os.makedirs(os.path.join(root, "val"))
    os.symlink(cat, os.path.join(root, "val", "cat"))
    return str(root)


def test_jpeg_header_routes_what_the_device_does_not_decode(tmp_path):
    root = odd_images(tmp_path)
    reasons = {}
    for name in sorted(os.listdir(os.path.join(root, "train", "cat"))):
        with open(os.path.join(root, "train", "cat", name), "rb") as file:
            reasons[name] = jpeg_header(file.read()).cpu_reason
    assert reasons == {"0_plain.jpg": "", "1_image.png": "not a JPEG", "2_cmyk.jpg": "CMYK JPEG",
                       "3_progressive.jpg": "progressive JPEG", "4_sixteen.png": "not a JPEG",
                       "5_damaged.jpg": "", "6_plain.jpg": ""}
    assert jpeg_header(b"\xff\xd8\xff\xe0\x00").cpu_reason == "damaged JPEG header"


def test_cpu_fallback_and_unreadable_images_follow_the_workers_policy(tmp_path, caplog):
    root = odd_images(tmp_path)
    opts = ["AUG.AUTO_AUGMENT", "none", "AUG.REPROB", "0.0", "AUG.HFLIP", "0.0", "DATA.BATCH_SIZE", "7",
            "DATA.MAX_BAD_FRACTION", "0.5", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"]
    results = {}
    for pipeline in ("workers", "device"):
        loaders = build_loader(make_config(root, *opts, DATA__PIPELINE=pipeline, num_classes=1))
        loaders.train_sampler.set_epoch(0)
        with caplog.at_level(logging.INFO):
            caplog.clear()
            train = [(images, labels) for images, labels in loaders.train_loader]
            val = [(images, labels) for images, labels in loaders.val_loader]
        results[pipeline] = train, val, caplog.text
    (workers_train, workers_val, _), (device_train, device_val, log) = results["workers"], results["device"]
    assert (device_train[0][0] - workers_train[0][0]).abs().amax() <= 1.01 * LEVEL  # the damaged one replaced
    assert torch.equal(device_val[0][1], workers_val[0][1]) and device_val[0][1].tolist()[5] == -6  # left out
    readable = device_val[0][1] >= 0
    assert (device_val[0][0][readable] - workers_val[0][0][readable]).abs().amax() <= 1.01 * LEVEL
    assert "unreadable image" in log and "5_damaged.jpg" in log
    assert log.count("images were decoded on the CPU") == 2  # once per pass (training, validation)
    assert "1 CMYK JPEG" in log and "1 progressive JPEG" in log and "2 not a JPEG" in log
    assert "1 refused by the device decoder" in log


# ----- choices and structure -----

def test_pipeline_choice_and_errors(tmp_path):
    assert resolve_pipeline("auto", torch.device("cpu")) == "workers"
    assert resolve_pipeline("auto", torch.device("cuda", 0)) == "device"
    assert resolve_pipeline("device", torch.device("cpu")) == "device"
    with pytest.raises(ConfigError, match="DATA.PIPELINE must be one of auto, workers, device"):
        make_config(tmp_path, DATA__PIPELINE="gpu")
    with pytest.raises(ConfigError, match="DATA.PIPELINE device cannot run .*lanczos.*DATA.PIPELINE workers"):
        build_device_transform(build_transform(True, make_config(tmp_path, DATA__IMG_SIZE=64,
                                                                 DATA__INTERPOLATION="lanczos")))


def test_rand_augment_ops_cover_timm_policies(tmp_path):
    for policy in ("rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd0.5", "rand-m9-mstd101"):
        pil = build_transform(True, make_config(tmp_path, DATA__IMG_SIZE=64, AUG__AUTO_AUGMENT=policy))
        step = build_device_transform(pil).steps[2]
        assert isinstance(step, RandAugmentStep) and len(step.names) == 15


def test_data_package_imports_flow_one_way():
    """No circle: the modules in one order (the decoder, sources, transforms, pipelines, build) where none imports
    one that comes after it."""
    order = ["errors", "layout", "decode", "ziparchive", "datasets", "shards", "shard_writer", "digits", "transforms",
             "masking", "simmim", "device_ops", "device_transforms", "samplers", "pipelines", "build"]
    for position, name in enumerate(order):
        with open(os.path.join(REPO, "data", f"{name}.py")) as file:
            tree = ast.parse(file.read())
        imported = {node.module.split(".")[1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("data.")}
        later = imported & set(order[position + 1:])
        assert not later, f"data/{name}.py imports {later}, which come after it"
