"""Label new images with a trained checkpoint: the Python API (:func:`load`, :meth:`Predictor.predict`) and
``transfgu predict``.

The checkpoint is the run's ``model/`` directory (:mod:`transfgu.checkpoint`): ``model.json`` names the backbone
(arch + weights source; the random backbone itself is stored as ``backbone.safetensors``), the decoder shape, the
eval size and, once the run was evaluated, the cluster -> class matching. Nothing else is read.

Prediction follows the authors' evaluation protocol (docs/architecture.md, "Stages"): the image is resized
bilinearly to the eval size and ImageNet-normalised, the frozen backbone and the decoder give patch-resolution
logits, which are upsampled bilinearly (``align_corners=False``) straight to the input's original size, and the
argmax is taken there. Label maps therefore always have the input's size. With ``as_classes=True`` cluster ids
become class ids through the Hungarian matching stored in the checkpoint; clusters left unmatched (over-clustering)
give :data:`UNMATCHED`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from transfgu.checkpoint import DECODER_FILE, load_backbone
from transfgu.cli_args import predict_parser as build_parser
from transfgu.data.io import load_rgb
from transfgu.data.transforms import to_model_input
from transfgu.engine.step import predict_logits
from transfgu.errors import ErrorLog
from transfgu.integrity import PREDICT_MARKER, check_predict_output
from transfgu.leopart.model import load_predictor
from transfgu.logs import Progress, setup_logging
from transfgu.model_meta import MODEL_JSON, CheckpointError, CheckpointMeta, find_checkpoint, read_model_meta
from transfgu.models.backbone import DinoViT
from transfgu.models.decoder import MaskTransformerDecoder
from transfgu.runtime import autocast_dtype, resolve_device
from transfgu.schemas import check_finite
from transfgu.viz import overlay, palette

__all__ = [
    "UNMATCHED",
    "CheckpointError",
    "Predictor",
    "collect_inputs",
    "encode_label_png",
    "find_checkpoint",
    "label_histogram",
    "load",
    "main",
    "preprocess_image",
    "save_label_png",
    "upsampled_argmax",
]

log = logging.getLogger(__name__)
_Src = TypeVar("_Src", Path, str)

#: Class id of pixels whose cluster has no matched class (``as_classes=True`` with over-clustering).
UNMATCHED = -1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _build_decoder(ckpt: Path, meta: dict[str, Any], d_encoder: int) -> MaskTransformerDecoder:
    from safetensors.torch import load_file

    path = ckpt / DECODER_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: decoder weights {DECODER_FILE} are missing")
    dm = meta["decoder"]
    if int(dm["d_encoder"]) != d_encoder:
        raise CheckpointError(
            f"{ckpt}: decoder expects {dm['d_encoder']}-d tokens but the backbone gives {d_encoder}-d"
        )
    d_model = int(dm.get("d_model", d_encoder))
    # Same shape rule as transfgu.training.build_decoder (the checkpoint records what differs from it).
    dec = MaskTransformerDecoder(
        n_classes=int(dm["n_classes"]), d_encoder=d_encoder, d_model=d_model,
        n_layers=int(dm.get("n_layers", 2)), n_heads=int(dm.get("n_heads", max(1, d_model // 64))),
        cls_emb_init=dm.get("cls_emb_init", "orthogonal"),
    )
    state = load_file(str(path))
    check_finite(path, state)  # an all-NaN decoder loads fine and predicts one class
    try:
        dec.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the decoder described in {MODEL_JSON}: {exc}") from exc
    return dec.eval()


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int], max_elements: int = 1 << 26) -> torch.Tensor:
    """``argmax_c`` of the logits ``(C, h, w)`` upsampled bilinearly (align_corners=False) to ``size``.

    Large outputs (more than ``max_elements`` upsampled values, e.g. 171 classes on a 12-megapixel photo) are
    done a few channels at a time with a running maximum, so memory stays bounded (ties keep the lower channel,
    as ``argmax`` does; values can differ from one full-tensor interpolation in the last bit, so only channels
    within float rounding of each other can come out differently).
    """
    c = int(logits.shape[0])
    hw = int(size[0]) * int(size[1])
    if c * hw <= max_elements:
        return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].argmax(dim=0)
    step = max(1, max_elements // max(hw, 1))
    best_val = best_idx = None
    for c0 in range(0, c, step):
        up = F.interpolate(logits[None, c0 : c0 + step], size=size, mode="bilinear", align_corners=False)[0]
        val, idx = up.max(dim=0)
        idx = idx + c0
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    return best_idx


def label_dtype(n_ids: int) -> np.dtype:
    """The label PNG's dtype for ``n_ids`` ids: uint8 below 255 ids, else uint16 (the maximum marks unmatched)."""
    return np.dtype(np.uint8 if n_ids < 255 else np.uint16)


def label_image(logits: torch.Tensor, size: tuple[int, int], lut: np.ndarray,
                max_elements: int = 1 << 22) -> np.ndarray:
    """The label PNG's array (``lut[argmax]``, :func:`label_dtype`) at ``size`` from patch logits ``(C, h, w)``,
    in memory bounded by ``max_elements`` upsampled values whatever ``size`` is.

    Outputs of at most ``max_elements`` values are :func:`upsampled_argmax` itself (the labels ``transfgu predict``
    gives). Larger ones are computed in bands of output rows: the bilinear interpolation (align_corners=False) is
    separable, so the logits are interpolated along the width once (``(C, h, W)``, small) and each band along the
    height, from the two source rows of each output row with the same weights ``src = (i + 0.5) h / H - 0.5``.
    The band's values agree with one full interpolation to float rounding (~1e-5), so only near-ties can differ.
    """
    lut_t = torch.as_tensor(lut)
    c, h, w = (int(v) for v in logits.shape)
    big_h, big_w = int(size[0]), int(size[1])
    if c * big_h * big_w <= max_elements:
        return lut_t[upsampled_argmax(logits, (big_h, big_w))].numpy()
    logits = logits.float()
    rows_w = F.interpolate(logits[None], size=(h, big_w), mode="bilinear", align_corners=False)[0]  # (C, h, W)
    out = np.empty((big_h, big_w), dtype=lut.dtype)
    band = max(1, max_elements // max(1, c * big_w))
    scale = np.float32(h) / np.float32(big_h)
    for r0 in range(0, big_h, band):
        i = torch.arange(r0, min(big_h, r0 + band), dtype=torch.float32)
        src = (float(scale) * (i + 0.5) - 0.5).clamp(min=0)
        i0 = src.long().clamp(max=h - 1)
        i1 = (i0 + 1).clamp(max=h - 1)
        lam = (src - i0.float())[None, :, None]
        vals = (1 - lam) * rows_w[:, i0] + lam * rows_w[:, i1]
        out[r0 : r0 + len(i)] = lut_t[vals.argmax(dim=0)].numpy()
    return out


def preprocess_image(image: np.ndarray, eval_size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> ImageNet-normalised float ``(3, *eval_size)`` (bilinear, as in evaluation).

    A free function so that a decoding step running ahead of the model (Ray Data CPU tasks, a web server thread)
    prepares exactly the tensor :meth:`Predictor.predict` would.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {img.dtype} {img.shape}")
    return to_model_input(img, eval_size)


@dataclass
class Predictor(CheckpointMeta):
    """A loaded checkpoint: frozen backbone + decoder on one device, and what ``model.json`` says about them."""

    backbone: DinoViT
    decoder: MaskTransformerDecoder
    meta: dict[str, Any]
    device: torch.device
    amp_dtype: torch.dtype | None = None
    batch_size: int = 8

    @property
    def eval_size(self) -> tuple[int, int]:
        return int(self.meta["eval_size"][0]), int(self.meta["eval_size"][1])

    @property
    def n_clusters(self) -> int:
        return int(self.meta["decoder"]["n_classes"])

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``(H, W, 3)`` -> ImageNet-normalised float ``(3, *eval_size)`` (:func:`preprocess_image`)."""
        return preprocess_image(image, self.eval_size)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-resolution logits ``(B, C, h, w)`` (float32) of normalised ``(B, 3, H, W)`` images."""
        ps = self.backbone.patch_size
        grid = (int(x.shape[-2]) // ps, int(x.shape[-1]) // ps)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            out = predict_logits(self.decoder, self.backbone, x.to(self.device), grid)
        return out.float()

    def _to_classes(self, labels: torch.Tensor) -> torch.Tensor:
        mapping = self.cluster_to_class
        if mapping is None:
            raise ValueError(
                "this checkpoint has no cluster -> class matching (the run was not evaluated on labelled data); "
                "predict cluster ids instead (as_classes=False)"
            )
        return torch.as_tensor(mapping, device=labels.device)[labels]

    @torch.no_grad()
    def predict(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        as_classes: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Label map(s) at each input's original size.

        Args:
            images: one uint8 ``(H, W, 3)`` RGB image, a uint8 ``(B, H, W, 3)`` array, or a list of images of
                any sizes.
            as_classes: return matched class ids (``UNMATCHED`` = -1 for unmatched clusters) instead of cluster ids.
            batch_size: images per forward pass (default ``self.batch_size``).

        Returns:
            int64 ``(H, W)`` for one image, ``(B, H, W)`` for an array batch, else a list of ``(H_i, W_i)``.
        """
        single = isinstance(images, np.ndarray) and images.ndim == 3
        stacked = isinstance(images, np.ndarray) and images.ndim == 4
        items = [images] if single else list(images)
        bs = batch_size or self.batch_size
        out: list[np.ndarray] = []
        for start in range(0, len(items), bs):
            group = items[start : start + bs]
            x = torch.stack([self.preprocess(im) for im in group])
            out.extend(self.labels_from_logits(self.logits(x), [im.shape[:2] for im in group], as_classes))
        if single:
            return out[0]
        if stacked:
            return np.stack(out) if out else np.zeros((0, 0, 0), dtype=np.int64)
        return out


    def label_lut(self, as_classes: bool = False) -> tuple[np.ndarray, int]:
        """``(lut, n_ids)``: cluster id -> the label PNG's value (:func:`label_image`): the cluster itself, or its
        matched class with the dtype's maximum for unmatched clusters."""
        if as_classes:
            mapping = self.cluster_to_class
            if mapping is None:
                self._to_classes(torch.zeros(1, dtype=torch.long))  # the error message of predict(as_classes=True)
            n_ids = len(self.class_names)
            dt = label_dtype(n_ids)
            return np.where(mapping < 0, np.iinfo(dt).max, mapping).astype(dt), n_ids
        n_ids = self.n_clusters
        return np.arange(n_ids).astype(label_dtype(n_ids)), n_ids

    def labels_from_logits(
        self, logits: torch.Tensor, sizes: Sequence[tuple[int, int]], as_classes: bool = False
    ) -> list[np.ndarray]:
        """int64 label maps at the given original ``(H, W)`` sizes from patch logits ``(B, C, h, w)``."""
        out: list[np.ndarray] = []
        for lg, (h, w) in zip(logits, sizes):
            lab = upsampled_argmax(lg, (int(h), int(w)))
            if as_classes:
                lab = self._to_classes(lab)
            out.append(lab.cpu().numpy().astype(np.int64))
        return out


def load(
    checkpoint_dir: str | Path,
    device: str | torch.device | None = None,
    weights: str | None = None,
    precision: str = "auto",
    batch_size: int = 8,
) -> Predictor:
    """Load a prediction checkpoint (a run's ``model/`` directory, or the run directory itself).

    Args:
        device: ``None``/``"auto"`` = CUDA when present, else CPU.
        weights: override the backbone weights source recorded in ``model.json`` (a path or timm tag), e.g.
            when the DINO file lives elsewhere on this machine.
        precision: ``"auto"`` (bf16 autocast on CUDA devices that support it), ``"fp32"`` or ``"bf16"``.
    """
    ckpt = find_checkpoint(checkpoint_dir)
    meta = read_model_meta(ckpt)
    dev = resolve_device("auto" if device is None else str(device))
    if str(meta.get("format", "")).startswith("leopart-model"):  # a CBFE + CD checkpoint (transfgu.leopart)

        return load_predictor(ckpt, meta, dev, weights, autocast_dtype(precision, dev), batch_size)  # type: ignore
    backbone = load_backbone(ckpt, meta, weights).to(dev).eval()
    decoder = _build_decoder(ckpt, meta, backbone.embed_dim).to(dev)
    if not meta["backbone"].get("pretrained", False):
        log.info("checkpoint %s uses a RANDOM backbone: its predictions are not the method's", ckpt)
    return Predictor(backbone, decoder, meta, dev, autocast_dtype(precision, dev), batch_size)


# -- files ---------------------------------------------------------------------------------------------------------
def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """``(image path, output stem)`` for every input, in order.

    A folder gives every image below it (recursive, sorted) with its path relative to the folder as the stem;
    a file with an image extension is one image (stem = its name); any other file is a list of image paths, one
    per line (blank lines and ``#`` comments skipped; relative paths are relative to the list's folder; the
    stem is the path as written). Stems that would collide keep their extension (``a_jpg``), then get a counter.
    """
    found: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            # a sub-folder holding predict.json is an earlier prediction output: its label maps are not inputs
            outputs = [d.parent for d in p.rglob(PREDICT_MARKER)]
            for f in sorted(q for q in p.rglob("*") if q.is_file() and _is_image(q)
                            and not any(d in q.parents for d in outputs)):
                found.append((f, f.relative_to(p).with_suffix("").as_posix()))
        elif p.is_file() and _is_image(p):
            found.append((p, p.stem))
        elif p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                q = Path(line)
                path = q if q.is_absolute() else p.parent / q
                rel = q.with_suffix("")
                stem = rel.as_posix() if not q.is_absolute() and ".." not in q.parts else q.stem
                found.append((path, stem))
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return unique_stems(found)


def unique_stems(found: Sequence[tuple[_Src, str]]) -> list[tuple[_Src, str]]:
    """Make output stems unique: a stem shared by several sources gets the source's extension (``a_jpg``,
    ``a_png``), and any remaining clash a counter (``a_1``). Order is kept, so the same inputs give the same names."""
    counts: dict[str, int] = {}
    for _, stem in found:
        counts[stem] = counts.get(stem, 0) + 1
    out: list[tuple[_Src, str]] = []
    used: set[str] = set()
    for src, stem in found:
        suffix = Path(str(src)).suffix
        if counts[stem] > 1 and suffix:
            stem = f"{stem}_{suffix.lstrip('.').lower()}"
        base, n = stem, 1
        while stem in used:
            stem, n = f"{base}_{n}", n + 1
        used.add(stem)
        out.append((src, stem))
    return out


def _label_image(label: np.ndarray, n_ids: int):
    from PIL import Image

    dtype = label_dtype(n_ids)
    top = np.iinfo(dtype).max
    # already the PNG's array (label_image): no copy
    arr = label if label.dtype == dtype else np.where(label < 0, top, label).astype(dtype)
    return Image.fromarray(arr, mode="L") if dtype == np.uint8 else Image.fromarray(arr)


def save_label_png(label: np.ndarray, path: Path, n_ids: int) -> None:
    """Write an id map as a single-channel PNG: uint8 when ``n_ids < 255``, else uint16.

    Negative ids (:data:`UNMATCHED`) are written as the dtype's maximum (255 or 65535).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    _label_image(label, n_ids).save(tmp, format="PNG")
    tmp.replace(path)


def encode_label_png(label: np.ndarray, n_ids: int) -> bytes:
    """The bytes :func:`save_label_png` would write (for HTTP responses and MLflow model outputs)."""
    import io

    buf = io.BytesIO()
    _label_image(label, n_ids).save(buf, format="PNG")
    return buf.getvalue()


def label_histogram(label: np.ndarray, n_ids: int) -> tuple[np.ndarray, int]:
    """Pixels per id ``0..n_ids-1`` (int64) and the number of pixels with a negative id (:data:`UNMATCHED`)."""
    lab = np.asarray(label).ravel()
    neg = lab < 0
    counts = np.bincount(lab[~neg], minlength=n_ids)
    if counts.shape[0] > n_ids:
        raise ValueError(f"label ids up to {counts.shape[0] - 1} exceed the {n_ids} ids of the model")
    return counts.astype(np.int64), int(neg.sum())


def _decode_stream(
    items: Sequence[tuple[Path, str]], batch_size: int, errors: ErrorLog
) -> Iterator[list[tuple[Path, str, np.ndarray]]]:
    """Batches of decoded images. Decoding runs in threads (PIL releases the GIL), one batch ahead of the model,
    so at most two batches are in memory whatever the number of inputs."""

    def decode(item: tuple[Path, str]) -> tuple[Path, str, np.ndarray | Exception]:
        try:
            return item[0], item[1], load_rgb(item[0])
        except (OSError, ValueError) as exc:
            return item[0], item[1], exc

    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        ahead = [pool.submit(decode, it) for it in batches[0]] if batches else []
        for i in range(len(batches)):
            current = ahead
            ahead = [pool.submit(decode, it) for it in batches[i + 1]] if i + 1 < len(batches) else []
            good = []
            for path, stem, img in (f.result() for f in current):
                if isinstance(img, Exception):
                    errors.record(str(path), "predict", str(img))
                else:
                    good.append((path, stem, img))
            yield good


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ray" in argv:  # the Ray executor of the same per-image functions (imported only when asked for)
        import importlib

        return int(importlib.import_module("transfgu.distributed.predict").main(argv))
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        setup_logging()  # the console format of every transfgu command
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        check_predict_output(args.out, [Path(i) for i in args.inputs])
        items = collect_inputs(args.inputs)
        predictor = load(args.checkpoint, device=args.device, weights=args.weights, precision=args.precision,
                         batch_size=args.batch_size)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.classes and predictor.cluster_to_class is None:
        print("error: --classes needs a checkpoint with a cluster -> class matching (evaluate the run first)",
              file=sys.stderr)
        return 2
    if not items:
        print("error: no images found in the inputs", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Written first: marks the folder as prediction output (a re-run may write into it again, nothing else may).
    (out / PREDICT_MARKER).write_text(json.dumps({"status": "running"}) + "\n", encoding="utf-8")
    err_path = out / "errors.jsonl"
    err_path.unlink(missing_ok=True)  # this run's errors only
    errors = ErrorLog(err_path)
    n_ids = len(predictor.class_names) if args.classes else predictor.n_clusters
    if args.overlay:
        colours = palette(n_ids)
    done = 0
    prog = Progress("predict", len(items))  # a bar on a terminal, a line every 10 s elsewhere
    for batch in _decode_stream(items, args.batch_size, errors):
        if not batch:
            continue
        labels = predictor.predict([img for _, _, img in batch], as_classes=args.classes)
        for (_, stem, img), lab in zip(batch, labels):
            save_label_png(lab, out / f"{stem}.png", n_ids)
            if args.overlay:
                from PIL import Image

                path = out / "overlay" / f"{stem}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(overlay(img, lab, colours)).save(path, quality=90)
        done += len(batch)
        prog.update(len(batch))
    prog.close()
    n_err = errors.count()
    summary = {
        "checkpoint": str(find_checkpoint(args.checkpoint).resolve()),
        "ids": "classes" if args.classes else "clusters",
        "names": predictor.class_names if args.classes else [f"cluster {i}" for i in range(n_ids)],
        "unmatched_value": (255 if n_ids < 255 else 65535) if args.classes else None,
        "n_images": done,
        "n_errors": n_err,
        "pretrained_backbone": predictor.pretrained,
        "device": str(predictor.device),
    }
    (out / "predict.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"{done} label maps written to {out.resolve()}" + (f"; {n_err} unreadable (see {err_path})" if n_err
                                                               else ""))
    if not predictor.pretrained:
        print("warning: the checkpoint's backbone is RANDOM (no pretrained weights): predictions are not the "
              "method's", file=sys.stderr)
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
