"""Loader speed: decode + the full training transform, ours against torchvision's ImageFolder, from folders, zip
files and tar shards (local, and over HTTP from a local server).

    python benchmarks/bench_data.py [--num-images 320] [--workers 0 2] [--repeats 5] [--read-only] [--json out.json]
    python benchmarks/bench_data.py --pipeline device [--device cuda] [--workers 1 2]
    python benchmarks/bench_data.py --write [--num-images 2000] [--workers 1 2]

``--pipeline workers`` (the default) times the loaders whose workers decode and transform with PIL (timm's
transform), ours and torchvision's ImageFolder. ``--pipeline device`` times DATA.PIPELINE device on the same
images side by side with the workers pipeline: what the workers deliver alone (bytes and parameters: images/s per
worker), the whole pipeline with decoding and the transform on ``--device`` (images/s), the CPU seconds each image
costs (workers plus main process, from /proc) and the device time per batch (CUDA events on a GPU, wall time on
the CPU). ``--write`` times the writers instead: the zip layout, and shards with each ``--workers`` processes.

Writes full-size JPEGs (500x375, smooth random content plus grain, quality 90) into a temporary folder dataset,
also converts it to the zip layout and to tar shards (``tools/make_shards.py``; also read over HTTP from
``tools/serve_shards.py`` in a process of its own, on this machine), and times one pass over all images per loader
with the reference training transform at 224 px (RandomResizedCrop bicubic, flip, RandAugment m9, random
erasing, normalisation). Every variant uses the same images, order and augmentation seeds; the variants
are interleaved and each figure is the median over the repeats. Files are read from the page cache
after the warm-up pass, so this measures CPU cost, not disk speed. Every process uses one torch thread.
"""
import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from typing import Dict, Iterator, List

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from config import load_config  # noqa: E402
from data import Pipeline, build_dataset, build_transform, make_zip_dataset  # noqa: E402
from data.pipelines import DeviceLoader  # noqa: E402
from data.samplers import DistributedTrainSampler, SeededSampler, ShardOrderSampler  # noqa: E402
from data.shards import ShardDataset  # noqa: E402
from data.shard_writer import make_shards  # noqa: E402

NUM_CLASSES = 10
SHARD_BYTES = 8 * 10 ** 6


def write_images(root: str, num_images: int, seed: int = 0) -> None:
    """``root/train/<class>/<i>.jpg`` (and a one-image-per-class val/), 500x375 JPEGs."""
    rng = np.random.default_rng(seed)
    for index in range(num_images):
        label = index % NUM_CLASSES
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int16)
        image = (image + rng.integers(-12, 13, size=image.shape)).clip(0, 255).astype(np.uint8)
        for split in ("train",) + (("val",) if index < NUM_CLASSES else ()):
            folder = os.path.join(root, split, f"class{label:02d}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.jpg"), quality=90)


def write_sources(root: str, num_images: int) -> None:
    """The benchmark images in the folder layout (``root/train``), the zip layout and as shards (``root/shards``)."""
    write_images(root, num_images)
    make_zip_dataset(root, root)
    make_shards(root, os.path.join(root, "shards"), SHARD_BYTES, layout="folder")


@contextlib.contextmanager
def shard_server(root: str, num_images: int) -> Iterator[str]:
    """Writes the sources (:func:`write_sources`) and serves ``root`` over HTTP with byte ranges from
    tools/serve_shards.py, in a process of its own; yields its URL."""
    write_sources(root, num_images)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "serve_shards.py"), root, "--port",
                               str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/shards/train/index.json", timeout=5).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait()


def source_datasets(root: str, url: str, opts: List[str], zip_cache_modes=("no", "full")) -> Dict[str, Dataset]:
    """Our training datasets over the same images: folder, zip (each cache mode), shards, shards over HTTP."""
    datasets: Dict[str, Dataset] = {"ours, folder": build_dataset(True, load_config(None, opts))}
    for cache_mode in zip_cache_modes:
        zip_opts = ["DATA.ZIP_MODE", "True", "DATA.CACHE_MODE", cache_mode]
        datasets[f"ours, zip (cache {cache_mode})"] = build_dataset(True, load_config(None, opts + zip_opts))
    for name, path in (("ours, shards", os.path.join(root, "shards")), ("ours, shards over HTTP", f"{url}/shards")):
        shard_opts = ["DATA.DATASET", "shards", "DATA.DATA_PATH", path]
        datasets[name] = build_dataset(True, load_config(None, opts + shard_opts))
    return datasets


class RawBytes(Dataset):
    """What reading a source costs, nothing decoded: each item is (the number of encoded bytes read, label); a batch
    is fetched as the training loader fetches it (``prefetch``: concurrent requests over a URL)."""

    def __init__(self, source: Dataset):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        if isinstance(self.source, ImageFolder):
            path, label = self.source.samples[index]
            with open(path, "rb") as file:
                return len(file.read()), label
        with self.source.open_image(index) as stream:
            return len(stream.read()), int(self.source.labels[index])

    def __getitems__(self, indices: List[int]):
        if hasattr(self.source, "prefetch"):
            self.source.prefetch(indices)
        return [self[index] for index in indices]


class Timer:
    """One loader per variant and worker count, kept alive (persistent workers) across the timed passes."""

    def __init__(self, dataset: Dataset, workers: int, batch_size: int):
        generator = torch.Generator()
        generator.manual_seed(0)  # the same worker seeds, hence the same augmentations, for every variant
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                 persistent_workers=workers > 0, generator=generator)
        self.size = len(dataset)
        self.seconds: List[float] = []
        self.cpu_seconds: List[float] = []
        self.run(seed=0)  # warm-up: starts the workers, fills the page cache
        self.seconds.clear()
        self.cpu_seconds.clear()

    def run(self, seed: int) -> None:
        """Times one pass over the dataset, in wall time and in CPU time of the workers (of the main process when
        it loads alone): the CPU time hardly changes with what other processes do on the machine."""
        random.seed(seed)  # the augmentation state of the main process (num_workers 0)
        np.random.seed(seed)
        torch.manual_seed(seed)
        iter(self.loader)  # starts the persistent workers on the first pass
        iterator = getattr(self.loader, "_iterator", None)
        pids = [w.pid for w in getattr(iterator, "_workers", [])] if iterator is not None else []
        pids = pids or [os.getpid()]
        cpu, start = cpu_seconds(pids), time.perf_counter()
        count = sum(len(labels) for _, labels in self.loader)
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(cpu_seconds(pids) - cpu)
        assert count == self.size


def cpu_seconds(pids: List[int]) -> float:
    """User + system CPU seconds used so far by the processes ``pids`` (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


class PipelineTimer:
    """One DATA.PIPELINE loader (persistent workers) over a dataset, with per-sample seeds as in training."""

    def __init__(self, dataset, pipeline: str, workers: int, batch_size: int, device: torch.device):
        self.pipeline = Pipeline(pipeline, device)
        self.device = device
        sampler = (ShardOrderSampler(dataset.shard_sizes) if isinstance(dataset, ShardDataset)
                   else DistributedTrainSampler(len(dataset), seed=0))
        loader = DataLoader(self.pipeline.worker_dataset(dataset), batch_size=batch_size,
                            sampler=SeededSampler(sampler, seed=0), num_workers=workers,
                            collate_fn=self.pipeline.collate_fn, persistent_workers=workers > 0,
                            pin_memory=device.type == "cuda" and pipeline == "workers")
        self.inner = loader
        self.loader = self.pipeline.loader(loader, dataset)
        self.size = len(dataset)
        self.results: Dict[str, List[float]] = {"read": [], "worker_cpu": [], "total": [], "cpu": [], "device_ms": []}
        self.run()  # warm-up: starts the workers, fills the page cache
        for values in self.results.values():
            values.clear()

    def pids(self) -> List[int]:
        iterator = getattr(self.inner, "_iterator", None)
        workers = [w.pid for w in getattr(iterator, "_workers", [])] if iterator is not None else []
        return [os.getpid()] + workers

    def run(self) -> None:
        iter(self.inner)  # starts the persistent workers on the first pass
        workers = self.pids()[1:] or self.pids()
        worker_cpu, start = cpu_seconds(workers), time.perf_counter()
        count = sum(len(labels) for _, labels in self.inner)  # the workers alone
        self.results["read"].append(time.perf_counter() - start)
        self.results["worker_cpu"].append(cpu_seconds(workers) - worker_cpu)
        assert count == self.size
        cpu_before, start = cpu_seconds(self.pids()), time.perf_counter()
        device_seconds = []
        if isinstance(self.loader, DeviceLoader):
            stage = self.loader.stage
            for batch, labels in self.inner:
                batch_start = time.perf_counter()
                if self.device.type == "cuda":
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    stage(batch, labels)
                    end.record()
                    end.synchronize()
                    device_seconds.append(begin.elapsed_time(end) / 1000)
                else:
                    stage(batch, labels)
                    device_seconds.append(time.perf_counter() - batch_start)
            stage.log_epoch()
        else:
            for images, _ in self.loader:
                images.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.results["total"].append(time.perf_counter() - start)
        self.results["cpu"].append(cpu_seconds(self.pids()) - cpu_before)
        if device_seconds:
            self.results["device_ms"].append(1000 * statistics.mean(device_seconds))


def pipelines_main(args: argparse.Namespace) -> int:
    """``--pipeline device``: the device pipeline against the workers pipeline on the same images."""
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as root, shard_server(root, args.num_images) as url:
        opts = ["DATA.DATA_PATH", root, "MODEL.NUM_CLASSES", str(NUM_CLASSES), "DATA.IMG_SIZE", "224"]
        datasets = {name.replace("ours, ", ""): dataset
                    for name, dataset in source_datasets(root, url, opts, zip_cache_modes=("full",)).items()}
        timers = {(name, pipeline, workers): PipelineTimer(dataset, pipeline, workers, args.batch_size, device)
                  for name, dataset in datasets.items() for pipeline in ("workers", "device")
                  for workers in args.workers}
        for _ in range(args.repeats):
            for timer in timers.values():  # interleaved, so that load from elsewhere hits all variants alike
                timer.run()
        results = []
        for (name, pipeline, workers), timer in timers.items():
            median = {key: statistics.median(values) for key, values in timer.results.items() if values}
            results.append({"source": name, "pipeline": pipeline, "num_workers": workers,
                            "worker_images_per_s": round(args.num_images / median["read"], 1),
                            "worker_images_per_s_per_worker": round(args.num_images / median["read"] / max(workers, 1),
                                                                    1),
                            "worker_cpu_ms_per_image": round(1000 * median["worker_cpu"] / args.num_images, 3),
                            "images_per_s": round(args.num_images / median["total"], 1),
                            "cpu_ms_per_image": round(1000 * median["cpu"] / args.num_images, 3),
                            "device_ms_per_batch": round(median.get("device_ms", 0.0), 2)})
        del timers
    print(f"{args.num_images} JPEGs 500x375, training transform at 224 px, batch {args.batch_size}, device {device}, "
          f"median of {args.repeats}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print("workers img/s: the loader workers alone (reading, and for the device pipeline drawing parameters);")
    print("worker CPU: their CPU time per image; total: through decoding and the transform on the device; CPU: "
          "workers plus main process per image")
    print(f"{'source':<18}{'pipeline':>9}{'workers':>8}{'workers img/s':>15}{'per worker':>12}{'worker CPU ms':>15}"
          f"{'total img/s':>13}{'CPU ms/img':>12}{'device ms/batch':>17}")
    for r in results:
        print(f"{r['source']:<18}{r['pipeline']:>9}{r['num_workers']:>8}{r['worker_images_per_s']:>15.1f}"
              f"{r['worker_images_per_s_per_worker']:>12.1f}{r['worker_cpu_ms_per_image']:>15.3f}"
              f"{r['images_per_s']:>13.1f}{r['cpu_ms_per_image']:>12.3f}{r['device_ms_per_batch']:>17.2f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"num_images": args.num_images, "batch_size": args.batch_size, "device": str(device),
                       "repeats": args.repeats, "torch": torch.__version__, "results": results}, file, indent=1)
    return 0


def write_main(args: argparse.Namespace) -> int:
    """``--write``: how long writing the zip layout and the shards takes, per image and per MB of images."""
    with tempfile.TemporaryDirectory(prefix="bench_write_") as root:
        write_images(os.path.join(root, "source"), args.num_images)
        source = os.path.join(root, "source")
        megabytes = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in
                        os.walk(os.path.join(source, "train")) for name in names) / 1e6
        writers = {"zip (make_zip_dataset.py)": lambda out: make_zip_dataset(source, out, splits=["train"])}
        for workers in args.workers:
            writers[f"shards, {max(workers, 1)} process(es)"] = partial(_write_shards, source, workers=max(workers, 1))
        seconds: Dict[str, List[float]] = {name: [] for name in writers}
        for repeat in range(args.repeats):
            for name, write in writers.items():  # interleaved
                out = os.path.join(root, f"out{repeat}_{len(seconds[name])}_{name[:3]}")
                start = time.perf_counter()
                write(out)
                seconds[name].append(time.perf_counter() - start)
                shutil.rmtree(out)
    print(f"writing {args.num_images} JPEGs 500x375 ({megabytes:.1f} MB, {1e3 * megabytes / args.num_images:.0f} KB "
          f"each) from the page cache, median of {args.repeats}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print(f"{'writer':<30}{'seconds':>9}{'images/s':>10}{'MB/s':>8}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<30}{median:>9.2f}{args.num_images / median:>10.1f}{megabytes / median:>8.1f}")
    return 0


def _write_shards(source: str, out: str, workers: int) -> None:
    make_shards(source, out, SHARD_BYTES, layout="folder", splits=["train"], workers=workers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=320)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--pipeline", choices=["workers", "device"], default="workers",
                        help="workers: PIL loaders against ImageFolder; device: DATA.PIPELINE device against workers")
    parser.add_argument("--device", default="cpu", help="where the device pipeline decodes and augments (cuda)")
    parser.add_argument("--read-only", action="store_true", help="time reading the encoded bytes (no decoding)")
    parser.add_argument("--write", action="store_true", help="time the zip and shard writers instead (--workers: "
                                                             "processes writing shards)")
    args = parser.parse_args()
    # DataLoader workers run with one torch thread; the main process does too, so that every row measures
    # what one core does (two threads on a busy 2-core machine made small tensor ops ten times slower).
    torch.set_num_threads(1)
    if args.write:
        return write_main(args)
    if args.pipeline == "device":
        return pipelines_main(args)

    with tempfile.TemporaryDirectory(prefix="bench_data_") as root, shard_server(root, args.num_images) as url:
        opts = ["DATA.DATA_PATH", root, "MODEL.NUM_CLASSES", str(NUM_CLASSES), "DATA.IMG_SIZE", "224"]
        transform = build_transform(True, load_config(None, opts))
        datasets: Dict[str, Dataset] = {
            "torchvision ImageFolder": ImageFolder(os.path.join(root, "train"), transform=transform),
            **source_datasets(root, url, opts),
        }
        if args.read_only:
            datasets = {name: RawBytes(dataset) for name, dataset in datasets.items()}
        timers = {(name, workers): Timer(dataset, workers, args.batch_size)
                  for name, dataset in datasets.items() for workers in args.workers}
        for repeat in range(1, args.repeats + 1):
            for timer in timers.values():  # interleaved, so that load from elsewhere hits all variants alike
                timer.run(seed=repeat)
        timers_seconds = {key: timer.seconds for key, timer in timers.items()}
        timers_cpu = {key: timer.cpu_seconds for key, timer in timers.items()}
        del timers  # stops the workers before the folder is removed

    results = []
    for name in datasets:
        for workers in args.workers:
            median = statistics.median(timers_seconds[(name, workers)])
            rate = args.num_images / median
            cpu_ms = 1000 * statistics.median(timers_cpu[(name, workers)]) / args.num_images
            results.append({"loader": name, "num_workers": workers, "images_per_s": round(rate, 1),
                            "images_per_s_per_worker": round(rate / max(workers, 1), 1),
                            "cpu_ms_per_image": round(cpu_ms, 4)})
    reference = {r["num_workers"]: r["images_per_s"] for r in results if r["loader"] == "torchvision ImageFolder"}
    what = "reading the encoded bytes only" if args.read_only else "training transform at 224 px"
    print(f"{args.num_images} JPEGs 500x375, {what}, batch {args.batch_size}, "
          f"median of {args.repeats}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    ours = {r["num_workers"]: r["images_per_s"] for r in results if r["loader"] == "ours, folder"}
    print("CPU ms/img: CPU time of the loader workers per image (of the main process with 0 workers)")
    print(f"{'loader':<26}{'workers':>8}{'images/s':>10}{'per worker':>12}{'vs ImageFolder':>16}{'vs our folder':>15}"
          f"{'CPU ms/img':>12}")
    for r in results:
        ratio, to_ours = r["images_per_s"] / reference[r["num_workers"]], r["images_per_s"] / ours[r["num_workers"]]
        print(f"{r['loader']:<26}{r['num_workers']:>8}{r['images_per_s']:>10.1f}"
              f"{r['images_per_s_per_worker']:>12.1f}{ratio:>15.2f}x{to_ours:>14.2f}x{r['cpu_ms_per_image']:>12.4f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"num_images": args.num_images, "batch_size": args.batch_size, "repeats": args.repeats,
                       "torch": torch.__version__, "cpus": os.cpu_count(), "results": results}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
