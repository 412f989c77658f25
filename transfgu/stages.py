"""Stage functions shared by the one-process pipeline and the Ray pipeline.

Each function takes decoded images (or file records) and explicit settings and returns Arrow tables or arrays; none
of them knows about Ray, MLflow or where a run directory lives, so the Ray actors in ``transfgu.distributed`` call
exactly the same code as :mod:`transfgu.pipeline`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from transfgu.config import BackboneConfig, Config, CropConfig, PseudoLabelConfig
from transfgu.crops import extract_crops_batch
from transfgu.data.datasets import (
    SUBSET_OPTIONS,
    DatasetError,
    ImageRecord,
    dataset_spec,
    list_records,
    load_sample,
)
from transfgu.data.io import DecodeError, load_rgb
from transfgu.data.labelmaps import LabelMapError
from transfgu.models.backbone import DinoViT, build_backbone, normalize, save_backbone_weights
from transfgu.pseudo_labels import concept_map_parts
from transfgu.store import LabelMaps, features_table, label_bank_table

log = logging.getLogger(__name__)

RANDOM_BACKBONE_FILE = "backbone_random.safetensors"


# -- environment ---------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present; asking for CUDA on a machine without it is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda was requested but no CUDA device is available; use run.device=cpu or auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it (``precision=auto``), else full precision."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def load_run_backbone(cfg: BackboneConfig, run_dir: Path | None, seed: int) -> DinoViT:
    """Build the backbone of a run. A random backbone is saved once in the run directory and reloaded afterwards,
    so every stage (and every Ray worker) of the run sees the same weights. ``cfg.pos_embed`` picks the
    position-embedding resampling (timm's or DINO's)."""
    bb = _load_run_backbone(cfg, run_dir, seed)
    bb.pos_embed_mode = cfg.pos_embed
    return bb


def _load_run_backbone(cfg: BackboneConfig, run_dir: Path | None, seed: int) -> DinoViT:
    if cfg.weights != "none" or run_dir is None:
        torch.manual_seed(seed)
        return build_backbone(cfg.arch, cfg.weights)
    path = Path(run_dir) / RANDOM_BACKBONE_FILE
    if path.is_file():
        bb = build_backbone(cfg.arch, str(path))
        bb.pretrained = False
        bb.weights = "none"
        return bb
    torch.manual_seed(seed)
    bb = build_backbone(cfg.arch, "none")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_backbone_weights(bb, path)
    log.warning("random backbone weights saved to %s so this run can be reproduced", path)
    return bb


# -- errors --------------------------------------------------------------------------------------------------------
class ErrorBudgetExceeded(RuntimeError):
    """More inputs failed than ``run.error_budget`` allows."""


class ErrorLog:
    """Append-only ``<run>/errors.jsonl``: one JSON line (file, stage, reason) per input that could not be used."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, file: str, stage: str, reason: str) -> None:
        log.warning("skipping %s in stage %s: %s", file, stage, reason)
        if self.path is None:
            return
        line = json.dumps({"file": str(file), "stage": stage, "reason": reason, "time": time.time()})
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def entries(self, stage: str | None = None) -> list[dict]:
        if self.path is None or not self.path.is_file():
            return []
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if stage is None or r["stage"] == stage]

    def count(self, stage: str | None = None) -> int:
        return len({(r["file"], r["stage"]) for r in self.entries(stage)})


def check_error_budget(n_failed: int, n_total: int, budget: float, stage: str) -> None:
    if n_total and n_failed / n_total > budget:
        raise ErrorBudgetExceeded(
            f"stage {stage}: {n_failed} of {n_total} inputs failed ({n_failed / n_total:.1%}), more than "
            f"run.error_budget={budget:.1%}; see errors.jsonl, fix or remove those files, or raise the budget"
        )


# -- data ----------------------------------------------------------------------------------------------------------
def split_records(cfg: Config, split: str, subset: bool = True) -> list[ImageRecord]:
    """The images of one split, limited by ``data.max_*_images``.

    ``subset=False`` ignores the training/evaluation subsets (``curated_list_train``/``curated_list_val``): the crop,
    concept and label-bank stages see the full train split, as the reference's do (reference_method.md §8).
    """
    opts = {k: v for k, v in cfg.data.options.items() if subset or k not in SUBSET_OPTIONS}
    records = list_records(cfg.data.name, cfg.data.root, split, **opts)
    limit = cfg.data.max_train_images if split == cfg.data.train_split else cfg.data.max_val_images
    return list(records[:limit] if limit else records)


def resize_image(img: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ImageNet-normalised ``(3, h, w)``.

    Bilinear resizing commutes with the per-channel normalisation, so resizing before normalising equals the
    reference's normalise-then-resize for VOC/Cityscapes/LIP; ``nearest`` is the reference's COCO behaviour.
    """
    x = torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    if mode == "nearest":
        x = F.interpolate(x, size=size, mode="nearest")
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return normalize(x[0])


def resize_uint8(img: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> uint8 ``(3, h, w)`` resized bilinearly (the train loader of §7.1)."""
    x = torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    x = torch.from_numpy(np.require(label, requirements=["C", "W"])).long()[None, None].float()
    return F.interpolate(x, size=size, mode="nearest")[0, 0].long()


def decode_images(
    records: Sequence[ImageRecord], errors: ErrorLog, stage: str
) -> Iterator[tuple[ImageRecord, np.ndarray]]:
    """Decode images one by one, recording (not raising) the ones that cannot be read."""
    for rec in records:
        try:
            yield rec, load_rgb(rec.image_path)
        except (OSError, ValueError) as exc:
            errors.record(str(rec.image_path), stage, str(exc))


# -- stage 1: crops + CLS features ---------------------------------------------------------------------------------
def extract_features(
    backbone: DinoViT,
    images: Sequence[np.ndarray],
    image_ids: Sequence[str],
    split: str,
    crops: CropConfig,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> pa.Table:
    """Crop + embed a group of decoded images into rows of the features table (DESIGN.md §3)."""
    if not images:
        return features_table([], split, [], dim=backbone.embed_dim)
    x = torch.stack([resize_image(im, tuple(crops.input_size), crops.resize_mode) for im in images]).to(device)
    recs = extract_crops_batch(
        backbone,
        x,
        betas=crops.betas,
        mode=crops.selection,
        th_fg=crops.th_fg,
        th_bg=crops.th_bg,
        crop_size=crops.crop_size,
        batch_size=crops.batch_size,
        autocast_dtype=amp,
        trim_last_pixel=crops.trim_last_pixel,
    )
    return features_table(list(image_ids), split, recs)


# -- stage 3: pseudo-label bank ------------------------------------------------------------------------------------
def pseudo_autocast_dtype(pseudo: PseudoLabelConfig) -> torch.dtype | None:
    """The pseudo-label pass runs in float32 on every device unless ``pseudo.precision=bf16`` opts in (issue 12)."""
    return torch.bfloat16 if pseudo.precision == "bf16" else None


def build_label_maps(
    backbone: DinoViT,
    images: Sequence[np.ndarray],
    centroids: np.ndarray,
    pseudo: PseudoLabelConfig,
    device: torch.device,
) -> list[LabelMaps]:
    """Concept maps of a group of decoded images (eq. 5-7) in the lossless label-bank layout.

    Precision comes from ``pseudo.precision`` (float32 by default, also on CUDA), not from ``backbone.precision``:
    the concept decision hinges on gaps far below bf16's resolution.
    """
    out: list[LabelMaps] = []
    amp = pseudo_autocast_dtype(pseudo)
    c = torch.from_numpy(np.asarray(centroids, dtype=np.float32)).to(device)
    for start in range(0, len(images), pseudo.batch_size):
        group = images[start : start + pseudo.batch_size]
        x = torch.stack([resize_image(im, tuple(pseudo.input_size), pseudo.resize_mode) for im in group]).to(device)
        parts, (h, w) = concept_map_parts(
            backbone, x, c, grad_scale=pseudo.grad_scale, mass=pseudo.mass, autocast_dtype=amp
        )
        k = c.shape[0]
        maps = parts.maps().reshape(len(group), k, h, w).cpu().numpy()
        a_hat = parts.a_hat.reshape(len(group), h, w).cpu().numpy()
        gate = parts.gate.reshape(len(group), k, h, w).cpu().numpy()
        bonus = parts.bonus.reshape(len(group), k, h, w).cpu().numpy()
        out.extend(LabelMaps.from_parts(a_hat[i], gate[i], bonus[i], maps[i]) for i in range(len(group)))
    return out


def label_bank_rows(image_ids: Sequence[str], maps: Sequence[np.ndarray]) -> pa.Table:
    return label_bank_table(list(image_ids), list(maps))


# -- training data -------------------------------------------------------------------------------------------------
@dataclass
class TrainSample:
    image: torch.Tensor  # uint8 (3, H, W) at the train size
    pseudo: torch.Tensor  # float32 (K, h, w)


class BankDataset(torch.utils.data.Dataset):
    """Training images (resized to the train size, §7.1) with their stored pseudo labels.

    Decoded images are cached in memory when they fit ``cache_bytes``, since the same images are read every epoch.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        bank: dict[str, np.ndarray] | dict[str, LabelMaps],
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
        img = resize_uint8(load_rgb(self.records[i].image_path), self.size)
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
    """Validation images resized bilinearly and labels resized with nearest to the eval size (§8).

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
                errors.record(str(_failed_file(rec, exc)), stage, str(exc))
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
        lab = resize_label(label, self.size)
        lab[lab == self.ignore_index] = -1
        return resize_uint8(img, self.size), lab

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


def _failed_file(rec: ImageRecord, exc: BaseException) -> Path:
    """The file to blame in errors.jsonl: the undecodable one, else the label (size, ids, missing), else the image."""
    if isinstance(exc, DecodeError):
        return exc.path
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return Path(exc.filename)
    if rec.label_path is not None and isinstance(exc, (LabelMapError, DatasetError)):
        return rec.label_path
    return rec.image_path


def dataset_classes(cfg: Config) -> tuple[tuple[str, ...], int, object]:
    spec = dataset_spec(cfg.data.name, cfg.data.root, **cfg.data.options)
    return spec.class_names, spec.ignore_index, spec.label_map


def n_output_channels(cfg: Config) -> int:
    """Decoder channels: K concepts, plus the background channel 0 in the "things" variant (eq. 8)."""
    return cfg.concepts.k + (1 if cfg.train.variant == "things" else 0)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
