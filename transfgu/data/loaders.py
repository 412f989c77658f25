"""PyTorch datasets and loaders of the training and evaluation stages (one definition for both executors).

* :class:`BankDataset` -- training images at the train size (uint8) with their pseudo labels from a bank held in
  memory (tests, small tools); training itself streams them (:mod:`transfgu.data.train_store`);
* :class:`EvalDataset` -- validation images and labels at the eval size, bad samples recorded and left out;
* :func:`make_train_loader` -- the training loader of one worker: the one-process global batches, or the
  ``rank``-th slice of each of them under Ray Train (:mod:`transfgu.ddp`), streamed in bounded memory;
* :func:`split_records`, :func:`dataset_classes` -- the images of a split and the label space of the data set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from transfgu.config import Config
from transfgu.data.datasets import SUBSET_OPTIONS, DatasetError, ImageRecord, dataset_spec, list_records, load_sample
from transfgu.data.io import load_rgb
from transfgu.data.train_store import (
    StreamingBankDataset,
    open_image_store,
    open_packed_bank,
    resolve_loader_workers,
)
from transfgu.data.transforms import to_label_tensor, to_uint8_chw
from transfgu.ddp import step_loader
from transfgu.errors import ErrorLog, failed_file
from transfgu.store.formats import LabelMaps


def split_records(cfg: Config, split: str, subset: bool = True) -> list[ImageRecord]:
    """The images of one split, limited by ``data.max_*_images``.

    ``subset=False`` ignores the training/evaluation subsets (``curated_list_train``/``curated_list_val``): the crop,
    concept and label-bank stages see the full train split, as the reference's do (docs/fidelity.md row 20).
    """
    opts = {k: v for k, v in cfg.data.options.items() if subset or k not in SUBSET_OPTIONS}
    records = list_records(cfg.data.name, cfg.data.root, split, **opts)
    limit = cfg.data.max_train_images if split == cfg.data.train_split else cfg.data.max_val_images
    return list(records[:limit] if limit else records)


def dataset_classes(cfg: Config) -> tuple[tuple[str, ...], int, object]:
    """``(class names, ignore index, label map)`` of the configured data set."""
    spec = dataset_spec(cfg.data.name, cfg.data.root, **cfg.data.options)
    return spec.class_names, spec.ignore_index, spec.label_map


class BankDataset(torch.utils.data.Dataset):
    """Training images (resized to the train size) with their stored pseudo labels.

    Decoded images are cached in memory when they fit ``cache_bytes``, since the same images are read every epoch.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        bank: Mapping[str, np.ndarray] | Mapping[str, LabelMaps],
        train_size: tuple[int, int],
        repeat: int = 1,
        cache_bytes: int = 2 * 1024**3,
    ) -> None:
        self.records = [r for r in records if r.image_id in bank]
        self.bank = bank
        self.size = tuple(train_size)
        self.repeat = repeat
        need = len(self.records) * 3 * self.size[0] * self.size[1]
        self.cache: dict[int, torch.Tensor] | None = {} if need <= cache_bytes else None

    def __len__(self) -> int:
        return len(self.records) * self.repeat

    def _image(self, i: int) -> torch.Tensor:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        img = to_uint8_chw(load_rgb(self.records[i].image_path), self.size)
        if self.cache is not None:
            self.cache[i] = img
        return img

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        i = idx % len(self.records)
        m = self.bank[self.records[i].image_id]
        # The compact bank (read_label_bank(dense=False)) is expanded one image at a time, bit-exactly.
        pseudo = torch.from_numpy(m.dense() if isinstance(m, LabelMaps) else np.asarray(m, dtype=np.float32))
        return {"image": self._image(i), "pseudo": pseudo}


class EvalDataset(torch.utils.data.Dataset):
    """Validation images resized bilinearly and labels resized with nearest to the eval size (the reference's).

    Every record is decoded once when the dataset is built. A record that cannot be scored -- undecodable image or
    label, missing label file (``on_missing_label=keep``), label size different from the image, label ids outside
    the label map -- is recorded in ``errors`` (file, ``stage``, reason) and left out, so one bad file costs one
    image, not the evaluation. The resized samples are kept in memory when they fit ``cache_bytes`` (4 bytes a
    pixel: RGB plus a uint8 label), so that check costs no second decode; COCO-Stuff's 2,175 curated validation
    images at 320 x 320 take 0.9 GB.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        label_map,
        eval_size: tuple[int, int],
        ignore_index: int,
        errors: ErrorLog | None = None,
        stage: str = "evaluate",
        cache_bytes: int = 2 * 1024**3,
    ) -> None:
        self.label_map = label_map
        self.size = tuple(eval_size)
        self.ignore_index = ignore_index
        errors = errors if errors is not None else ErrorLog(None)
        per_sample = 4 * self.size[0] * self.size[1]  # uint8 RGB + uint8 label
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = (
            {} if len(records) * per_sample <= cache_bytes else None
        )
        self.records: list[ImageRecord] = []
        self.skipped: list[tuple[ImageRecord, str]] = []
        for rec in records:
            try:
                sample = self._load(rec)
            except (OSError, ValueError) as exc:  # DecodeError, DatasetError and LabelMapError are ValueErrors
                errors.record(str(failed_file(rec, exc)), stage, str(exc))
                self.skipped.append((rec, str(exc)))
                continue
            if cache is not None:
                cache[len(self.records)] = (sample[0], _pack_label(sample[1]))
            self.records.append(rec)
        self.cache = cache
        if records and not self.records:
            raise RuntimeError(
                f"{stage}: none of the {len(records)} validation images could be read with its label; "
                "see errors.jsonl"
            )

    def _load(self, rec: ImageRecord) -> tuple[torch.Tensor, torch.Tensor]:
        img, label = load_sample(rec, self.label_map)
        if label is None:
            raise DatasetError(f"no label file for validation image {rec.image_path}")
        lab = to_label_tensor(label, self.size)
        lab[lab == self.ignore_index] = -1
        return to_uint8_chw(img, self.size), lab

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            img, lab = self.cache[idx]
            return {"image": img, "label": _unpack_label(lab)}
        img, lab = self._load(self.records[idx])
        return {"image": img, "label": lab}


def _pack_label(lab: torch.Tensor) -> torch.Tensor:
    """Class ids and -1 (ignore) in uint8 (-1 -> 255) when they fit, else int16."""
    if lab.numel() == 0 or int(lab.max()) < 255:
        return lab.masked_fill(lab < 0, 255).to(torch.uint8)
    return lab.to(torch.int16)


def _unpack_label(lab: torch.Tensor) -> torch.Tensor:
    out = lab.long()
    if lab.dtype == torch.uint8:
        out[out == 255] = -1
    return out


def make_train_loader(
    cfg: Config, bank_dir: Path, bank_hash: str, rank: int = 0, world: int = 1, cpus: float | None = None
) -> torch.utils.data.DataLoader[dict[str, torch.Tensor]]:
    """The training loader of worker ``rank`` of ``world`` (one process: ``rank=0, world=1``; :mod:`transfgu.ddp`).

    Every worker draws the one-process epoch order, cuts it into global batches of ``train.batch_size`` and takes
    its contiguous slice of each. Items stream from the packed label bank and (``train.image_store``) the
    train-size image store (:mod:`transfgu.data.train_store`, written once by :func:`prepare_train_input`): a
    worker's memory does not grow with the number of images and it reads only its batches' bytes.
    ``train.num_workers`` processes (``auto``: from ``cpus``, or this process's CPUs) read and decode items.
    Call ``loader.batch_sampler.set_epoch(e)`` before each epoch.
    """
    ds = prepare_train_input(cfg, bank_dir, bank_hash, cpus)
    if len(ds) == 0:
        raise RuntimeError("train: the label bank has no image of the training split")
    workers = resolve_loader_workers(cfg.train.num_workers, cpus)
    # The global batch is train.batch_size whatever the number of workers; each worker gets its slice of it.
    return step_loader(ds, cfg.train.batch_size, cfg.run.seed, rank, world, workers,
                       persistent_workers=workers > 0)


def prepare_train_input(
    cfg: Config, bank_dir: Path, bank_hash: str, cpus: float | None = None
) -> StreamingBankDataset:
    """The training dataset over the stores of ``bank_dir`` (the label bank of input hash ``bank_hash``), writing them
    first when missing or stale.

    Both executors call this in the driver before training, so Ray Train workers only open what is there.
    """
    records = split_records(cfg, cfg.data.train_split)
    bank = open_packed_bank(Path(bank_dir), bank_hash)
    rows = bank.rows_of([r.image_id for r in records])
    kept = [r for r, row in zip(records, rows) if row >= 0]  # BankDataset's rule: the records the bank holds
    size = (int(cfg.train.train_size[0]), int(cfg.train.train_size[1]))
    images = None
    if cfg.train.image_store and kept:
        images = open_image_store(Path(bank_dir), [str(r.image_path) for r in kept], size, bank_hash,
                                  resolve_loader_workers(cfg.train.num_workers, cpus))
    return StreamingBankDataset(rows[rows >= 0], [str(r.image_path) for r in kept], bank, size, cfg.train.repeat,
                                images)
