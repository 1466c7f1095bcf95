"""The two pipelines from a source of images to training batches (``DATA.PIPELINE``), behind one seam.

A source is an :class:`data.datasets.ImageDataset`: for an index it gives (encoded bytes or a decoded image,
label, the index read), with the unreadable-image policy applied (``ImageDataset.read``). A pipeline turns a
source and its PIL transform into what a loader worker does per sample, how a batch is collated and what
happens to the batch on the training device (:class:`Pipeline`):

- ``workers`` (today's): the workers decode with PIL and run the whole PIL transform; the batch is a float
  tensor that only moves to the device.
- ``device``: the workers read the encoded bytes, check the JPEG header and draw the sample's random
  parameters; the batch holds bytes and parameters; on the device the JPEGs are decoded in one batch and the
  transform runs on the whole batch (``data.device_transforms``). Images the device decoder is not given or
  refuses (PNG, CMYK, progressive, damaged JPEGs) are decoded on the CPU with ``decode_image``, the workers
  pipeline's decoder; their number is logged once per epoch.

Tar shards (``data.shards``) are such a source: sample i is a byte range of one shard. A worker gets a whole batch
of indices at once (``__getitems__``) and lets the source fetch their bytes together (``ImageDataset.prefetch``:
concurrent range requests over a URL) before reading them one by one.
"""
import collections
import io
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from config import ConfigError
from data.datasets import ImageDataset, seeded_random_streams, unreadable_label
from data.decode import UNREADABLE_ERRORS, decode_image, decode_jpegs, jpeg_header
from data.device_transforms import DeviceTransform, build_device_transform

logger = logging.getLogger(__name__)

PIPELINES = ("auto", "workers", "device")


def resolve_pipeline(name: str, device: torch.device) -> str:
    """``workers`` or ``device`` for DATA.PIPELINE ``name`` (``auto``: device on CUDA, workers elsewhere)."""
    if name not in PIPELINES:
        raise ConfigError(f"DATA.PIPELINE must be one of {', '.join(PIPELINES)}; got {name!r}")
    if name == "auto":
        return "device" if device.type == "cuda" else "workers"
    return name


@dataclass
class EncodedJpeg:
    """A JPEG for the device decoder: its bytes and the size its header gives."""
    data: bytes
    height: int
    width: int


def read_for_device(stream) -> Union[EncodedJpeg, Image.Image]:
    """The ``decode`` of the device pipeline's workers: a plain JPEG stays encoded; anything else is decoded here
    by ``decode_image`` (which raises for an unreadable image, so the source's policy applies as in the workers
    pipeline)."""
    data = stream.read()
    header = jpeg_header(data)
    if not header.cpu_reason:
        return EncodedJpeg(data, header.height, header.width)
    image = decode_image(io.BytesIO(data))
    image.info["cpu_reason"] = header.cpu_reason
    return image


@dataclass
class DeviceItem:
    """One sample as a device-pipeline worker leaves it."""
    data: Optional[bytes]  # the JPEG's bytes, or None when decoded already
    pixels: Optional[torch.Tensor]  # uint8 (3, H, W) decoded on the CPU, or None
    cpu_reason: str  # why it was decoded on the CPU ("" for a JPEG left to the device)
    params: Dict[str, Any]  # DeviceTransform.draw's parameters
    index: int  # the image read (after any replacement)
    seed: int  # the augmentation seed (-1: none)


def device_item(payload: Union[EncodedJpeg, Image.Image], index: int, seed: Optional[int],
                transform: DeviceTransform) -> DeviceItem:
    """A read image's item: its bytes or pixels and the random parameters drawn from ``seed`` (as the workers
    pipeline runs the PIL transform, inside the sample's seeded random streams)."""
    if isinstance(payload, EncodedJpeg):
        data, pixels, reason, size = payload.data, None, "", (payload.height, payload.width)
    else:
        pixels = torch.from_numpy(np.array(payload.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        data, reason, size = None, payload.info.get("cpu_reason", "decoded on the CPU"), tuple(pixels.shape[1:])
    return DeviceItem(data, pixels, reason, draw_params(transform, size, seed), index, -1 if seed is None else seed)


def draw_params(transform: DeviceTransform, size: Tuple[int, int], seed: Optional[int]) -> Dict[str, Any]:
    if seed is None:
        return transform.draw(size)
    with seeded_random_streams(seed):
        return transform.draw(size)


class DeviceItems(Dataset):
    """What the device pipeline's loader workers do per sample: read (bytes, label, index) from the source under
    its unreadable-image policy and draw the sample's parameters.

    Args:
        source: the images.
        transform: the device version of the source's transform.
    """

    def __init__(self, source: ImageDataset, transform: DeviceTransform):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Tuple[DeviceItem, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        payload, label, used = self.source.read(index, read_for_device)
        return device_item(payload, used, seed, self.transform), label

    def __getitems__(self, items: Sequence[Union[int, Tuple[int, int]]]) -> List[Tuple[DeviceItem, int]]:
        self.source.prefetch([item[0] if isinstance(item, tuple) else item for item in items])
        return [self[item] for item in items]


@dataclass
class DeviceBatch:
    """A collated batch of :class:`DeviceItem`: the JPEG bytes of the batch in one buffer, the CPU-decoded
    images, and each parameter stacked over the batch."""
    data: torch.Tensor  # uint8, the JPEGs one after the other
    offsets: List[int]  # JPEG i is data[offsets[i]:offsets[i + 1]] (empty for a CPU-decoded image)
    pixels: List[Optional[torch.Tensor]]
    cpu_reasons: List[str]
    params: Dict[str, np.ndarray]  # numpy: small arrays travel from the workers in the pickle, not as shared memory
    indices: List[int]
    seeds: List[int]

    def __len__(self) -> int:
        return len(self.indices)

    def tensor_params(self) -> Dict[str, torch.Tensor]:
        return {key: torch.from_numpy(value) for key, value in self.params.items()}


def collate_device_items(items: Sequence[Tuple[DeviceItem, int]]) -> Tuple[DeviceBatch, torch.Tensor]:
    """The loaders' ``collate_fn`` of the device pipeline: ``(DeviceBatch, labels int64 (B,))``."""
    samples = [sample for sample, _ in items]
    chunks = [sample.data or b"" for sample in samples]
    offsets = np.concatenate([[0], np.cumsum([len(chunk) for chunk in chunks])]).tolist()
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if offsets[-1] else \
        torch.empty(0, dtype=torch.uint8)
    params = {key: np.asarray([sample.params[key] for sample in samples]) for key in samples[0].params}
    batch = DeviceBatch(data, offsets, [sample.pixels for sample in samples], [s.cpu_reason for s in samples],
                        params, [s.index for s in samples], [s.seed for s in samples])
    return batch, torch.tensor([label for _, label in items], dtype=torch.int64)


class DeviceStage:
    """The device half of the device pipeline: decode a :class:`DeviceBatch` and run the transform on it.

    Args:
        source: the images (for the rare image read again here: one the device decoder refused).
        transform: the device transform.
        device: where to decode and augment.
    """

    def __init__(self, source: ImageDataset, transform: DeviceTransform, device: torch.device):
        self.source = source
        self.transform = transform
        self.device = device
        self.cpu_decoded: collections.Counter = collections.Counter()
        self.images = 0

    def __call__(self, batch: DeviceBatch, labels: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        """The batch on the device, transformed, and its labels (still on the host; an image replaced here takes
        its replacement's label, one left out of an evaluation its unreadable label)."""
        jpegs = [i for i, pixels in enumerate(batch.pixels) if pixels is None]
        decoded = decode_jpegs([batch.data[batch.offsets[i]:batch.offsets[i + 1]] for i in jpegs], self.device)
        images: List[Optional[torch.Tensor]] = [None if p is None else p.to(self.device, non_blocking=True)
                                                for p in batch.pixels]
        params = batch.tensor_params()
        self.source.num_read += len(batch)  # each image is decoded in this process
        for i, image in zip(jpegs, decoded):
            if image is None:
                image, labels, params = self._decode_refused(batch, i, labels, params)
            images[i] = image
        self.images += len(batch)
        self.cpu_decoded.update(reason for reason in batch.cpu_reasons if reason)
        return self.transform(images, params), labels

    def _decode_refused(self, batch: DeviceBatch, i: int, labels: torch.Tensor,
                        params: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """A JPEG the device decoder refused: decoded by ``decode_image`` on the CPU; if that fails too, the
        source's policy (the next readable image in training, a black image left out of an evaluation)."""
        index = batch.indices[i]
        data = batch.data[batch.offsets[i]:batch.offsets[i + 1]].numpy().tobytes()
        self.cpu_decoded["refused by the device decoder"] += 1
        try:
            payload, label, used = decode_image(io.BytesIO(data)), int(labels[i]), index
        except UNREADABLE_ERRORS as error:
            self.source.count_bad(index, error)
            if self.source.replace_unreadable:
                payload, label, used = self.source.read((index + 1) % len(self.source))
            else:
                payload, label, used = Image.new("RGB", (1, 1)), unreadable_label(index), index
        item = device_item(payload, used, None if batch.seeds[i] < 0 else batch.seeds[i], self.transform)
        labels = labels.clone()
        labels[i] = label
        params = {key: value.clone() for key, value in params.items()}
        for key, value in item.params.items():
            params[key][i] = torch.as_tensor(np.asarray(value))
        return item.pixels.to(self.device), labels, params

    def log_epoch(self) -> None:
        """Logs how many images of the pass were decoded on the CPU, and why; then starts counting again."""
        if self.cpu_decoded:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.cpu_decoded.most_common())
            logger.info("device pipeline: %d of %d images were decoded on the CPU (%s)",
                        sum(self.cpu_decoded.values()), self.images, reasons)
        self.cpu_decoded.clear()
        self.images = 0


class DeviceLoader:
    """A loader of the device pipeline: iterates the inner DataLoader and yields each batch decoded and transformed
    on the device, labels on the host. Everything else (``len``, ``dataset``, ``batch_sampler``) is the inner
    loader's; ``dataset`` is the source, for messages.

    On CUDA the decoding and the transform run on a side stream that the training stream waits for. Before each
    decode the host waits for that side stream to finish the previous batch: nvJPEG writes its output on a stream
    of its own that is not ordered after ours, so no kernel may still read memory the allocator could hand it
    (pytorch/vision 9606); training kernels allocate from the training stream's pool and are not waited for.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, stage: DeviceStage):
        self.loader = loader
        self.stage = stage
        self.dataset = stage.source

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Tuple[Any, torch.Tensor]]:
        device = self.stage.device
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        for batch, labels in self.loader:
            if side is None:
                yield self.stage(batch, labels)
                continue
            side.synchronize()
            with torch.cuda.stream(side):
                images, labels = self.stage(batch, labels)
            training = torch.cuda.current_stream(device)
            training.wait_stream(side)
            for tensor in images if isinstance(images, tuple) else (images,):
                tensor.record_stream(training)
            yield images, labels
        self.stage.log_epoch()


class Pipeline:
    """The seam: what the loader workers do per sample, how a batch is collated, and the loader the training loop
    iterates.

    Args:
        name: ``workers`` or ``device``.
        device: the training device.
    """

    def __init__(self, name: str, device: torch.device):
        self.name = name
        self.device = device

    def worker_dataset(self, source: ImageDataset) -> Dataset:
        """What the DataLoader indexes (with ``index`` or ``(index, seed)``)."""
        if self.name == "workers":
            return source
        return DeviceItems(source, build_device_transform(source.transform))

    @property
    def collate_fn(self) -> Optional[Callable]:
        return collate_device_items if self.name == "device" else None

    def loader(self, loader: torch.utils.data.DataLoader, source: ImageDataset) -> Any:
        """The loader the training loop iterates: batches ``(images, labels)`` ready for the objective."""
        if self.name == "workers":
            return loader
        return DeviceLoader(loader, DeviceStage(source, loader.dataset.transform, self.device))
