"""Data-parallel training that is the same training as one process (issue 12 item 5).

W ranks of a ``torch.distributed`` group train one model together. What makes W ranks equal to one process:

* **One global batch per step.** :class:`GlobalBatchSampler` draws the one-process epoch order (a pure function of
  ``seed`` and ``epoch``, reshuffled every epoch: ``DistributedSampler.set_epoch`` semantics), cuts it into global
  batches of ``batch_size`` and gives rank ``r`` the ``r``-th contiguous piece of each (:func:`global_split`). The
  union of the pieces is the one-process batch whatever W is; when ``batch_size`` does not divide by W the pieces
  differ by one image, and a rank whose piece is empty (a last batch smaller than W) gets one *placeholder* image
  with weight 0 so that it still joins every collective.
* **One set of random decisions per global step.** Every rank builds the same generator from
  :func:`step_seed` ``(seed, epoch, step)``, draws the decisions of the *whole* global batch (colour decision, crop
  boxes, flips, the class permutation) and uses its own slice (:mod:`transfgu.engine`). Dropout masks are keyed
  per sample by its position in the global batch (``step_seed(seed, epoch, step, 1 + q)``), so a rank draws for its
  samples the masks one process draws for them.
* **One loss, one decision.** Each rank computes its *share* of the global loss (its per-image means weighted by
  its fraction of the global batch, and of the foreground pixels for the uncertainty term), so the shares sum to
  the one-process loss; one ``all_reduce`` gives every rank that sum, and every rank takes the same ``loss > 0``
  decision from it. DDP averages gradients over ranks, so each rank back-propagates ``W x`` its share.

This module knows nothing of Ray; it uses ``torch.distributed`` only when a process group is initialised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, epoch: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed that is a pure function of ``(seed, epoch, step, stream)`` (SplitMix64 chain).

    ``stream`` separates independent uses of one step (0: the shared augmentation/permutation draws; ``1 + q``: the
    dropout masks of the sample at position ``q`` of the global batch, :func:`transfgu.engine.step.draw_dropout`).
    """
    h = 0
    for v in (seed, epoch, step, stream):
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def step_generator(seed: int, epoch: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded with :func:`step_seed`; every rank that asks for the same step gets the same one."""
    return torch.Generator().manual_seed(step_seed(seed, epoch, step, stream))


def world_info() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Sum of ``t`` over all ranks, in place (the identity without a process group of more than one rank).

    NCCL reduces only CUDA tensors: there ``t`` travels through ``device`` (default: the current CUDA device).
    """
    return _all_reduce(t, "sum", device)


def all_reduce_max(t: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Element-wise maximum of ``t`` over all ranks, in place (as :func:`all_reduce_sum`)."""
    return _all_reduce(t, "max", device)


def _all_reduce(t: torch.Tensor, op: str, device: torch.device | str | None) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        on_gpu = t.to(dev)
        dist.all_reduce(on_gpu, op=red)
        t.copy_(on_gpu.cpu())
        return t
    dist.all_reduce(t, op=red)
    return t


def global_split(size: int, rank: int, world: int) -> tuple[int, int]:
    """``(offset, count)`` of rank ``rank``'s contiguous piece of a global batch of ``size`` images.

    Pieces differ by at most one image (the first ``size % world`` ranks get one more); a piece may be empty when
    ``size < world``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    base, extra = divmod(size, world)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The one-process shuffle of epoch ``epoch``: a pure function of ``(seed, epoch)``, so a resumed run and every
    rank see the same order."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class GlobalBatchSampler(torch.utils.data.Sampler[list[tuple[int, int, int, bool]]]):
    """Batch sampler of one rank: its piece of every global batch of the one-process epoch order.

    Yields lists of keys ``(dataset index, position in the global batch, global batch size, real)`` for
    :class:`StepDataset`; ``real=False`` marks the placeholder of an empty piece. With ``world_size=1`` the
    batches are exactly ``DataLoader(batch_size=batch_size, sampler=<epoch_order>, drop_last=False)``'s.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        on_epoch: Callable[[GlobalBatchSampler], None] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("GlobalBatchSampler needs at least one sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        global_split(0, rank, world_size)  # validates rank / world
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.rank, self.world_size = rank, world_size
        self.on_epoch = on_epoch
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle; ``on_epoch(self)`` then prepares what the rank reads (e.g. its bank rows).

        Called before the loader's iterator is made, so DataLoader worker processes get the prepared dataset.
        """
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(self)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def global_batches(self) -> list[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch)
        return [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]

    def rank_indices(self) -> set[int]:
        """Dataset indices this rank reads in the current epoch (placeholders included)."""
        return {k[0] for keys in self for k in keys}

    def __iter__(self) -> Iterator[list[tuple[int, int, int, bool]]]:
        for batch in self.global_batches():
            lo, cnt = global_split(len(batch), self.rank, self.world_size)
            if cnt == 0:
                yield [(batch[0], 0, len(batch), False)]
            else:
                yield [(batch[lo + j], lo + j, len(batch), True) for j in range(cnt)]


class StepDataset(torch.utils.data.Dataset):
    """Wraps a training dataset for :class:`GlobalBatchSampler`: item ``key`` is ``dataset[key[0]]`` plus
    ``index``, ``gpos`` (position in the global batch), ``gsize`` (global batch size) and ``real``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int, bool]) -> dict[str, Any]:
        idx, pos, size, real = key
        item = dict(self.dataset[idx])
        item.update(index=idx, gpos=pos, gsize=size, real=real)
        return item


class EpochRows(Mapping[str, Any]):
    """``{image id: row}`` over all ``ids`` that holds in memory only the rows :meth:`load` was last asked for.

    A rank's images change every epoch (the reshuffle across ranks), so a rank reads its epoch's rows of a
    large store (the label bank) at :meth:`GlobalBatchSampler.set_epoch` instead of holding all of them.
    """

    def __init__(self, ids: Iterable[str], read: Callable[[list[str]], dict[str, Any]]) -> None:
        self.ids = frozenset(ids)
        self.read = read
        self.rows: dict[str, Any] = {}

    def load(self, ids: Iterable[str]) -> None:
        want = sorted(set(ids))
        missing = [i for i in want if i not in self.ids]
        if missing:
            raise KeyError(f"{len(missing)} ids are not in the store, e.g. {missing[:5]}")
        keep = {i: self.rows[i] for i in want if i in self.rows}
        new = [i for i in want if i not in keep]
        self.rows = {**keep, **(self.read(new) if new else {})}

    def __contains__(self, key: object) -> bool:
        return key in self.ids

    def __getitem__(self, key: str) -> Any:
        if key not in self.rows:
            raise KeyError(f"{key!r} was not loaded for this epoch (EpochRows.load)")
        return self.rows[key]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


def step_loader(
    dataset: Any,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    on_epoch: Callable[[GlobalBatchSampler], None] | None = None,
    **loader_kwargs: Any,
) -> torch.utils.data.DataLoader:
    """The training loader of one rank (``world_size=1``: the one-process loader). Call
    ``loader.batch_sampler.set_epoch(e)`` before each epoch; ``loader_kwargs`` go to the ``DataLoader``."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, seed, rank, world_size, on_epoch)
    return torch.utils.data.DataLoader(StepDataset(dataset), batch_sampler=sampler, num_workers=num_workers,
                                       **loader_kwargs)


def batch_piece(batch: dict[str, Any], n_local: int) -> tuple[int, int, int]:
    """``(offset in the global batch, real images here, global batch size)`` of a loader batch.

    Batches without the :class:`StepDataset` keys (plain loaders, tests) are a whole global batch.
    """
    if "gsize" not in batch:
        return 0, n_local, n_local
    real = torch.as_tensor(batch["real"])
    return int(torch.as_tensor(batch["gpos"])[0]), int(real.sum()), int(torch.as_tensor(batch["gsize"])[0])
