"""Samplers: distributed training orders that can resume mid-epoch, and an exact evaluation split.

Training samplers give every rank the same number of indices per epoch (so that all ranks run the
same number of steps) and can skip the first indices of an epoch, so that a run resumed from a
mid-epoch checkpoint sees exactly the images the interrupted run had not yet trained on::

    sampler.set_epoch(epoch)              # a new epoch: new order, nothing skipped
    sampler.skip(steps_done * batch_size) # resume: continue this epoch after the samples already used

The position to save is what the training loop has consumed (completed steps times the batch size),
not how far the sampler has been iterated: DataLoader workers fetch batches ahead of the loop.
"""
import math
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

from data.errors import DataError

# How far ShardOrderSampler moves a sample from its place in the sequence of shards: timm's shuffle buffer for tar
# shards holds as many.
SHUFFLE_WINDOW = 8192


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} and world_size {world_size}")


def _permutation(size: int, seed: int) -> List[int]:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(size, generator=generator).tolist()


class ResumableSampler(Sampler[int]):
    """Base of the training samplers: per-epoch index lists with ``set_epoch`` and ``skip``.

    Subclasses implement :meth:`epoch_indices`, which must return ``num_samples`` indices.
    """

    def __init__(self, num_samples: int):
        self.num_samples = num_samples
        self.epoch = 0
        self.start = 0

    def epoch_indices(self, epoch: int) -> List[int]:
        """This rank's full index list for ``epoch``."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order the next iteration gives. A different epoch clears the skip."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def skip(self, num_samples: int) -> None:
        """Makes the next iteration of this epoch start after its first ``num_samples`` indices (this rank's).

        The count is absolute (not added to an earlier skip) and stays in force until the epoch changes.
        """
        if not 0 <= num_samples <= self.num_samples:
            raise ValueError(f"can skip 0 to {self.num_samples} samples of this epoch, got {num_samples}")
        self.start = num_samples

    def state_dict(self) -> Dict[str, int]:
        """The epoch and the number of samples skipped in it, as plain ints."""
        return {"epoch": self.epoch, "position": self.start}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Restores :meth:`state_dict` output: ``set_epoch(state["epoch"])`` then ``skip(state["position"])``."""
        self.set_epoch(int(state["epoch"]))
        self.skip(int(state["position"]))

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class DistributedTrainSampler(ResumableSampler):
    """All ranks shuffle the whole dataset the same way (seeded by ``seed + epoch``) and rank r takes
    positions r, r + world_size, ... of that order.

    The order is padded by repeating its beginning to a multiple of ``world_size``, exactly as torch's
    ``DistributedSampler(shuffle=True, drop_last=False)`` does; for the same seed the indices are the same.

    Args:
        size: the number of items in the dataset.
        rank: this process's rank.
        world_size: the number of processes.
        seed: the shuffling seed, the same on all ranks.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        _check_rank(rank, world_size)
        if size < 1:
            raise DataError("cannot sample from an empty dataset")
        super().__init__(math.ceil(size / world_size))
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed

    def epoch_indices(self, epoch: int) -> List[int]:
        order = self.epoch_order(epoch)
        total = self.num_samples * self.world_size
        while len(order) < total:
            order += order[:total - len(order)]
        return order[self.rank:total:self.world_size]

    def epoch_order(self, epoch: int) -> List[int]:
        """The whole dataset's order in ``epoch``, the same on every rank."""
        return _permutation(self.size, self.seed + epoch)


class ShardOrderSampler(DistributedTrainSampler):
    """The training order of tar shards: the shards in a new random order each epoch, and each sample moved by
    a random amount of at most ``window`` places in that sequence, so that neighbouring samples mix while the
    reads stay within a few shards at a time (what a shuffle buffer of ``window`` samples does to a stream of
    shards, but a pure function of the seed and the epoch). Rank r takes positions r, r + world_size, ... of the
    order, as :class:`DistributedTrainSampler` does, so that every sample is read once per epoch over all ranks,
    a resumed epoch skips exactly the samples done, also with another number of processes.

    Args:
        shard_sizes: the number of samples of each shard, in index order (shard k holds the samples that follow
            those of shards 0 .. k-1).
        rank: this process's rank.
        world_size: the number of processes.
        seed: the run's seed.
        window: how far a sample may move from its place in the shard sequence.
    """

    def __init__(self, shard_sizes: Sequence[int], rank: int = 0, world_size: int = 1, seed: int = 0,
                 window: int = SHUFFLE_WINDOW):
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        super().__init__(int(self.shard_sizes.sum()), rank, world_size, seed)
        self.window = window

    def epoch_order(self, epoch: int) -> List[int]:
        generator = np.random.default_rng([self.seed % 2 ** 63, epoch])
        starts = np.cumsum(self.shard_sizes) - self.shard_sizes
        shards = generator.permutation(len(self.shard_sizes))
        sequence = np.concatenate([np.arange(starts[k], starts[k] + self.shard_sizes[k]) for k in shards])
        # Sorting positions jittered by up to `window` moves each sample at most that far, in one vectorised step.
        jittered = np.arange(len(sequence)) + generator.uniform(0, self.window, len(sequence))
        return sequence[np.argsort(jittered, kind="stable")].tolist()


class ShardTrainSampler(ResumableSampler):
    """Rank r only ever uses indices r, r + world_size, ... (its shard), shuffled each epoch.

    This is the sampler of zip CACHE_MODE ``part``, where each rank holds only its shard in memory. Shards
    differ in size by at most one; a smaller shard repeats the first index of its order so that all
    ranks take the same number of steps.

    Args:
        size: the number of items in the dataset.
        rank: this process's rank.
        world_size: the number of processes.
        seed: the shuffling seed (``seed + epoch`` each epoch).
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        _check_rank(rank, world_size)
        if size < world_size:
            raise DataError(f"cannot split {size} images into {world_size} shards of at least one image")
        super().__init__(math.ceil(size / world_size))
        self.shard = list(range(rank, size, world_size))
        self.seed = seed

    def epoch_indices(self, epoch: int) -> List[int]:
        order = [self.shard[i] for i in _permutation(len(self.shard), self.seed + epoch)]
        return order + order[:self.num_samples - len(order)]


class ShardedEvalSampler(Sampler[int]):
    """Rank r evaluates indices r, r + world_size, ... with no padding, so that over all ranks every
    image is evaluated exactly once (shards differ in size by at most one).

    Args:
        size: the number of items in the dataset.
        rank: this process's rank.
        world_size: the number of processes.
        shuffle: visit the shard in a seeded random order instead of ascending (counts do not change).
        seed: the shuffling seed.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0):
        _check_rank(rank, world_size)
        self.shard = list(range(rank, size, world_size))
        self.shuffle = shuffle
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(self.shard)
        return iter([self.shard[i] for i in _permutation(len(self.shard), self.seed)])

    def __len__(self) -> int:
        return len(self.shard)


class SeededSampler(Sampler[Tuple[int, int]]):
    """Pairs each index of a training sampler with a seed for that sample's random augmentation.

    The seed depends only on ``seed``, the epoch and the image's index in the dataset: not on which loader
    worker fetches it, the batch it falls in, the number of processes or whether the epoch was resumed half-way,
    so a resumed run augments every image exactly as the uninterrupted run would have, with any number of
    workers or processes, and both pipelines (``DATA.PIPELINE``) make the same draws for it. ``set_epoch``
    and ``skip`` stay on the wrapped sampler.

    Args:
        sampler: the training sampler whose order is followed.
        seed: the run's seed.
    """

    def __init__(self, sampler: ResumableSampler, seed: int):
        self.sampler = sampler
        self.seed = seed

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.sampler.epoch
        for index in self.sampler:
            yield index, sample_seed(self.seed, epoch, index)

    def __len__(self) -> int:
        return len(self.sampler)


class FixedSeedSampler(Sampler[Tuple[int, int]]):
    """Gives each index of ``sampler`` with the seed ``seed + index``: an image's random draws (a SimMIM
    validation mask) are the same in every evaluation, whatever the shard or batch it falls in."""

    def __init__(self, sampler: Sampler[int], seed: int):
        self.sampler = sampler
        self.seed = seed

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((index, self.seed + index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that differs for every (seed, epoch, index)."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + index)
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator))
