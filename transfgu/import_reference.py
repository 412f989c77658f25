"""Import the authors' released TransFGU decoder checkpoints (issue 12 item 6; the authors' README and code).

The authors released, per data set, a checkpoint holding the **decoder only** (the Segmenter ``MaskTransformer``);
the frozen DINO ViT-S/8 is loaded separately. Their decoder's parameter names are Segmenter's:

    cls_emb (1, K, D)                       proj_dec.{weight,bias}
    blocks.<i>.norm1 / norm2.{weight,bias}  blocks.<i>.attn.qkv.weight (no bias)   blocks.<i>.attn.proj.{weight,bias}
    blocks.<i>.mlp.fc1 / fc2.{weight,bias}  decoder_norm.{weight,bias}             proj_patch (D, D)
    proj_classes (D, D)                     mask_norm.{weight,bias} (K)

:class:`transfgu.models.decoder.MaskTransformerDecoder` uses the same names, so the import is: find the state dict
in the file (top level, or under ``model``/``state_dict``/``decoder``/``student``), strip wrapper prefixes
(``module.``, ``model.``, ``decoder.``, ``student.``, ``segmenter.``), drop encoder/teacher entries, check that every
decoder tensor is there with a consistent shape, read ``n_cls`` (K) and the widths from the tensors, and write a
prediction checkpoint (``model/`` layout of :mod:`transfgu.checkpoint`) for a preset whose number of decoder channels
(K, or K + 1 for the "things" variant) equals ``n_cls``. The head count is not stored in the weights: it follows
the project's rule ``d_model // 64`` (6 for ViT-S, as the reference). ``transfgu predict`` and, with ``--evaluate``,
the preset's validation split then run it with a DINO backbone (``--weights``).

The file is read with ``torch.load(weights_only=True)`` (tensors and plain containers only; no code is run); the
output is safetensors + JSON, no pickle.

    transfgu import-decoder cocostuff27.pt --config conf/coco_stuff27.yaml --weights dino_deitsmall8_pretrain.pth \\
        --out runs/authors_coco27/model --evaluate
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transfgu.checkpoint import save_model
from transfgu.cli_args import import_decoder_parser
from transfgu.config import Config, ConfigError, load_config
from transfgu.evaluate_stage import evaluate_decoder, write_eval
from transfgu.models.backbone import build_backbone
from transfgu.models.decoder import MaskTransformerDecoder
from transfgu.runtime import autocast_dtype, resolve_device
from transfgu.store.atomic import atomic_write_json
from transfgu.training import decoder_model_meta, n_output_channels

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "decoder", "student", "model_state_dict")
PREFIXES = ("module.", "model.", "student.", "segmenter.", "decoder.")
SKIP_PREFIXES = ("encoder.", "teacher", "backbone.")
TOP_LEVEL = ("cls_emb", "proj_dec.weight", "proj_dec.bias", "decoder_norm.weight", "decoder_norm.bias", "proj_patch",
             "proj_classes", "mask_norm.weight", "mask_norm.bias")
BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
              "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


class ReferenceCheckpointError(ValueError):
    """The file is not a decoder checkpoint in the authors' layout, or does not fit the chosen preset."""


def _find_state(obj: Any, path: str) -> Mapping[str, Tensor]:
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ReferenceCheckpointError(f"{path}: no state dict of tensors found (top-level keys {list(obj)[:8]})")
    return obj


def reference_decoder_state(obj: Any, path: str = "checkpoint") -> dict[str, Tensor]:
    """The decoder state dict in this project's names, from a loaded authors' checkpoint object."""
    out: dict[str, Tensor] = {}
    for key, value in _find_state(obj, path).items():
        if not isinstance(value, Tensor):
            continue
        k = str(key)
        changed = True
        while changed:  # strip stacked wrappers: module.model.decoder.xxx
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        if k.startswith(SKIP_PREFIXES):
            continue
        out[k] = value.detach().float().contiguous()
    missing = [k for k in TOP_LEVEL if k not in out]
    if missing:
        raise ReferenceCheckpointError(f"{path}: not a TransFGU decoder checkpoint, missing {missing}")
    return out


def decoder_shape(sd: Mapping[str, Tensor], path: str = "checkpoint") -> dict[str, int]:
    """``n_cls``, ``d_model``, ``d_encoder`` and ``n_layers`` read from the tensors (checked for consistency)."""
    emb = sd["cls_emb"]
    if emb.dim() != 3 or emb.shape[0] != 1:
        raise ReferenceCheckpointError(f"{path}: cls_emb has shape {tuple(emb.shape)}, expected (1, K, D)")
    n_cls, d_model = int(emb.shape[1]), int(emb.shape[2])
    d_encoder = int(sd["proj_dec.weight"].shape[1])
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ReferenceCheckpointError(f"{path}: decoder blocks {blocks} are not 0..n-1")
    missing = [f"blocks.{i}.{k}" for i in blocks for k in BLOCK_KEYS if f"blocks.{i}.{k}" not in sd]
    if missing:
        raise ReferenceCheckpointError(f"{path}: missing {missing[:6]}")
    if tuple(sd["mask_norm.weight"].shape) != (n_cls,):
        raise ReferenceCheckpointError(f"{path}: mask_norm has {tuple(sd['mask_norm.weight'].shape)} for K={n_cls}")
    return {"n_cls": n_cls, "d_model": d_model, "d_encoder": d_encoder, "n_layers": len(blocks)}


def load_reference_decoder(path: str | Path, n_heads: int | None = None) -> tuple[MaskTransformerDecoder, dict]:
    """Read an authors' decoder checkpoint into :class:`MaskTransformerDecoder` (eval mode); returns it and its
    shape (``n_cls``, ``d_model``, ``d_encoder``, ``n_layers``, ``n_heads``)."""
    p = Path(path)
    if not p.is_file():
        raise ReferenceCheckpointError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one that needs code to unpickle
        raise ReferenceCheckpointError(f"{p}: cannot read as a weights-only torch checkpoint ({exc})") from exc
    sd = reference_decoder_state(obj, str(p))
    shape = decoder_shape(sd, str(p))
    heads = int(n_heads or max(1, shape["d_model"] // 64))
    dec = MaskTransformerDecoder(n_classes=shape["n_cls"], d_encoder=shape["d_encoder"], d_model=shape["d_model"],
                                 n_layers=shape["n_layers"], n_heads=heads, cls_emb_init="reference")
    expected = set(dec.state_dict())
    extra = sorted(set(sd) - expected)
    if extra:
        log.warning("%s: ignoring %d tensors that are not part of the decoder, e.g. %s", p, len(extra), extra[:4])
    try:
        dec.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=True)
    except RuntimeError as exc:
        raise ReferenceCheckpointError(f"{p}: tensors do not fit the decoder: {exc}") from exc
    return dec.eval(), {**shape, "n_heads": heads}


def import_reference_decoder(
    path: str | Path, cfg: Config, out_dir: str | Path, weights: str | None = None, evaluate: bool = False,
) -> dict[str, Any]:
    """Write a prediction checkpoint in ``out_dir`` from an authors' decoder file and the preset ``cfg``.

    ``weights`` overrides ``cfg.backbone.weights`` (the DINO ViT-S/8 file). With ``evaluate`` the model is scored on
    the preset's labelled validation split and ``metrics.json`` is written next to the checkpoint (``out_dir/eval``).
    Returns the model metadata written.
    """
    dec, shape = load_reference_decoder(path)
    want = n_output_channels(cfg)
    if shape["n_cls"] != want:
        raise ReferenceCheckpointError(
            f"{path}: the decoder has {shape['n_cls']} channels but the preset gives {want} (K = {cfg.concepts.k}, "
            f"variant {cfg.train.variant!r}); choose the preset of the data set the checkpoint was trained on"
        )
    w = str(weights if weights is not None else cfg.backbone.weights)
    backbone = build_backbone(cfg.backbone.arch, w, pos_embed=cfg.backbone.pos_embed)
    if backbone.embed_dim != shape["d_encoder"]:
        raise ReferenceCheckpointError(
            f"{path}: the decoder reads {shape['d_encoder']}-d tokens, backbone {cfg.backbone.arch} gives "
            f"{backbone.embed_dim}-d"
        )
    cfg = cfg.model_copy(update={"backbone": cfg.backbone.model_copy(update={"weights": w})})
    meta = decoder_model_meta(cfg, backbone.pretrained, backbone.embed_dim)
    meta["decoder"].update(d_model=shape["d_model"], n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                           cls_emb_init="reference")
    meta["imported_from"] = {"file": str(Path(path).resolve()), "layout": "TransFGU authors' decoder checkpoint"}
    meta["selection"] = "authors' checkpoint (best epoch on val, the paper's protocol)"
    out = Path(out_dir)
    save_model(out, dec, meta, backbone=backbone)
    if evaluate:
        device = resolve_device(cfg.run.device)
        amp = autocast_dtype(cfg.backbone.precision, device)
        scores, names, n = evaluate_decoder(cfg, backbone.to(device), dec.to(device), device, amp)
        write_eval(out / "eval", scores, names, pretrained=backbone.pretrained, n_images=n,
                   selection={"selection": meta["selection"]})
        meta["cluster_to_class"] = [int(x) for x in scores["mapping"]]
        atomic_write_json(out / "model.json", meta)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = import_decoder_parser()
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        meta = import_reference_decoder(args.checkpoint, cfg, args.out, args.weights, args.evaluate)
    except (ConfigError, ReferenceCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"model": str(Path(args.out).resolve()), "n_classes": meta["decoder"]["n_classes"],
                      "variant": meta["variant"]}, indent=2))
    return 0
