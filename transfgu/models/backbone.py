"""Frozen self-supervised ViT backbones (DINO / DINOv2 through timm) with the outputs TransFGU needs.

One forward pass gives the final-LayerNorm CLS token (crop features, reference_method.md §3), the patch tokens (decoder
input, §6) and the last block's CLS->patch softmax attention (foreground prior §2.2, pseudo labels §5).

The last block is evaluated by hand from its timm sub-modules so that its CLS-query attention row is an explicit
tensor. That also exposes the two halves the fast pseudo-label path needs (``tokens_before_last_block`` and
``cls_from_attention``): the gradient of any function of the final CLS token with respect to that attention row only
involves the CLS path of the last block, not the 11 blocks below it.

Weights: a timm hub tag (``timm`` or ``hub:<tag>``), a local DINO ``.pth`` (plain state dict, or a full training
checkpoint with ``teacher``/``student`` entries and ``module.``/``backbone.`` prefixes; the projection head is dropped),
a ``.safetensors`` file, or ``none`` (random init: logged loudly, and recorded as ``pretrained: false`` by callers).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from transfgu.models.source import parse_source

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Short architecture names -> timm model names (the pretrained tag used with ``weights="timm"``).
ARCHS: dict[str, str] = {
    "vit_small_patch8": "vit_small_patch8_224.dino",
    "vit_small_patch16": "vit_small_patch16_224.dino",
    "vit_base_patch8": "vit_base_patch8_224.dino",
    "vit_base_patch16": "vit_base_patch16_224.dino",
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    # A tiny random ViT with the same structure, for tests and smoke runs only.
    "vit_test_tiny": "",
    # A small ViT/8 for the supervised stand-in prior (transfgu.tools.standin_prior): tests and development only.
    "vit_standin": "",
}

#: What a backbone's weights are, as recorded in metrics, MLflow and reports (``prior``).
PRIOR_RANDOM = "random"
PRIOR_PRETRAINED = "pretrained"
PRIOR_STANDIN = "supervised stand-in"
#: A backbone that Leopart's dense fine-tuning (transfgu.leopart.finetune_train) started from random weights: it
#: learned from the user's images only, never from DINO's pretraining, so it is never recorded as ``pretrained``.
PRIOR_FINETUNED_RANDOM = "fine-tuned from random"
#: safetensors metadata key that marks what a weights file is (the stand-in prior, a fine-tuned random init).
PRIOR_METADATA_KEY = "transfgu_prior"
#: Values of :data:`PRIOR_METADATA_KEY` that :func:`weights_prior` reports as they are (anything else: pretrained).
MARKED_PRIORS = (PRIOR_STANDIN, PRIOR_FINETUNED_RANDOM)


class WeightsError(RuntimeError):
    """Raised when backbone weights cannot be found, read or matched to the architecture."""


@dataclass
class ViTFeatures:
    """Outputs of one backbone pass on a batch of images."""

    cls: Tensor  # (B, D) CLS token after the final LayerNorm (raw, not L2-normalised)
    patch: Tensor  # (B, h*w, D) patch tokens after the final LayerNorm
    attn_cls: Tensor  # (B, heads, h*w) last block softmax attention, CLS query row, patch keys
    grid: tuple[int, int]  # (h, w) patch grid


def normalize(img: Tensor) -> Tensor:
    """uint8 (or [0, 255] float) images ``(B,3,H,W)`` or ``(3,H,W)`` -> float32 ImageNet-normalised."""
    x = img.float() / 255.0
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(shape)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(shape)
    return (x - mean) / std


def dino_interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """DINO's position-embedding interpolation (``interpolate_pos_encoding`` of the DINO ViT, which the reference
    uses): the square ``side x side`` patch embeddings are resized bicubically (``align_corners=False``) by the
    *scale factors* ``((h + 0.1) / side, (w + 0.1) / side)``, so the output is ``h x w`` and every output cell
    ``i`` samples the input at ``(i + 0.5) * side / (h + 0.1) - 0.5`` (the "+0.1" avoids a floating-point
    off-by-one in the output size, DINO issue #8). Nothing is resampled when the grid is the stored square one.

    Args:
        pos_embed: ``(1, 1 + side**2, D)``, the CLS position first.
        grid: target patch grid ``(h, w)``.
    """
    n = pos_embed.shape[1] - 1
    h, w = grid
    if n == h * w and h == w:
        return pos_embed
    side = int(math.sqrt(n))
    if side * side != n:
        raise ValueError(f"DINO interpolation needs a square position grid, got {n} patch positions")
    d = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, side, side, d).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                          align_corners=False)
    if patch.shape[-2:] != (h, w):
        raise RuntimeError(f"DINO interpolation gave a {tuple(patch.shape[-2:])} grid, expected {(h, w)}")
    patch = patch.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, d)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


class DinoViT(nn.Module):
    """A timm ViT wrapped to return CLS, patch tokens and the last block's CLS attention (see module docstring).

    ``pos_embed_mode``: ``"timm"`` (default: timm's ``resample_abs_pos_embed``, bicubic with anti-aliasing, sized by
    the target grid) or ``"dino"`` (:func:`dino_interpolate_pos_embed`, what the reference's DINO ViT does).
    """

    def __init__(self, vit: VisionTransformer, arch: str, weights: str, pretrained: bool,
                 pos_embed_mode: str = "timm") -> None:
        super().__init__()
        if pos_embed_mode not in ("timm", "dino"):
            raise ValueError(f"pos_embed_mode must be 'timm' or 'dino', got {pos_embed_mode!r}")
        self.pos_embed_mode = pos_embed_mode
        if getattr(vit, "reg_token", None) is not None:
            raise ValueError("ViTs with register tokens are not supported (their attention maps differ)")
        self.vit = vit
        self.arch = arch
        self.weights = weights
        self.pretrained = pretrained
        self.prior = PRIOR_PRETRAINED if pretrained else PRIOR_RANDOM  # build_backbone refines it
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[-1].attn.num_heads)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)

    # -- the two halves of a forward pass ----------------------------------------------------------------------
    def tokens_before_last_block(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Embed ``x`` and run blocks 1..L-1. Returns tokens ``(B, 1+h*w, D)`` and the grid."""
        h, w = self._grid(x)
        t = self.vit.patch_embed(x)
        t = self._dino_pos_embed(t) if self.pos_embed_mode == "dino" else self.vit._pos_embed(t)
        t = self.vit.norm_pre(t)
        for blk in self.vit.blocks[:-1]:
            t = blk(t)
        return t, (h, w)

    def _dino_pos_embed(self, t: Tensor) -> Tensor:
        """CLS token + position embeddings with DINO's interpolation (timm's ``_pos_embed`` otherwise)."""
        vit = self.vit
        if vit.no_embed_class or self.num_prefix_tokens != 1 or vit.cls_token is None:
            raise ValueError("pos_embed=dino needs a ViT with one CLS token that has a position embedding")
        if t.dim() == 4:  # dynamic_img_size: (B, h, w, D)
            b, h, w, d = t.shape
            t = t.reshape(b, h * w, d)
        else:
            h, w = vit.patch_embed.grid_size
        pos = dino_interpolate_pos_embed(vit.pos_embed, (h, w))
        t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + pos
        return vit.pos_drop(t)

    def _qkv(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        blk = self.vit.blocks[-1]
        attn = blk.attn
        b, n, _ = t.shape
        qkv = attn.qkv(blk.norm1(t)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def last_block_cls_attention(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax attention of the CLS query over all keys in the last block, ``(B, heads, 1+h*w)``, and values."""
        q, k, v = self._qkv(t)
        scale = self.vit.blocks[-1].attn.scale
        a = torch.softmax((q[:, :, :1] * scale) @ k.transpose(-2, -1), dim=-1)[:, :, 0]
        return a, v

    def cls_from_attention(self, t: Tensor, a_cls: Tensor, v: Tensor) -> Tensor:
        """Final-LayerNorm CLS token given the last block's input tokens, CLS attention row and values.

        Only the CLS row of the last block's attention reaches the CLS output, which is why the gradient of a
        CLS-only objective with respect to the attention matrix lives entirely in that row (reference_method §5).
        """
        blk = self.vit.blocks[-1]
        attn = blk.attn
        o = torch.einsum("bht,bhtd->bhd", a_cls, v).reshape(t.shape[0], 1, -1)
        if hasattr(attn, "norm"):
            o = attn.norm(o)
        o = attn.proj(o)
        u = t[:, :1] + blk.ls1(o)
        u = u + blk.ls2(blk.mlp(blk.norm2(u)))
        return self.vit.norm(u)[:, 0]

    def forward(self, x: Tensor) -> ViTFeatures:
        t, grid = self.tokens_before_last_block(x)
        blk = self.vit.blocks[-1]
        out = blk(t)
        out = self.vit.norm(out)
        a_cls, _ = self.last_block_cls_attention(t)
        p = self.num_prefix_tokens
        return ViTFeatures(cls=out[:, 0], patch=out[:, p:], attn_cls=a_cls[:, :, p:], grid=grid)

    def _grid(self, x: Tensor) -> tuple[int, int]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        hh, ww = x.shape[-2:]
        ps = self.patch_size
        if hh % ps or ww % ps:
            raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {ps}")
        return hh // ps, ww // ps


def _create_vit(arch: str, pretrained_tag: bool) -> VisionTransformer:
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of {sorted(ARCHS)}")
    if arch == "vit_test_tiny":
        return VisionTransformer(
            img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True
        )
    if arch == "vit_standin":
        return VisionTransformer(
            img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=0, dynamic_img_size=True
        )
    try:
        return timm.create_model(ARCHS[arch], pretrained=pretrained_tag, num_classes=0, dynamic_img_size=True)
    except Exception as exc:  # network errors come in many types
        if not pretrained_tag:
            raise
        raise WeightsError(
            f"could not fetch pretrained weights for timm tag {ARCHS[arch]!r} ({exc}). On an offline machine give "
            "model.weights a local DINO .pth or .safetensors file, or 'none' for a random backbone."
        ) from exc


def _unwrap_state_dict(obj: object, path: str) -> dict[str, Tensor]:
    """Find the backbone state dict in a DINO-style checkpoint and give it timm's key layout."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    for key in ("teacher", "student", "model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd: dict[str, Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            continue
        for prefix in ("module.", "backbone.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k.startswith("head.") or k.startswith("head_") or k == "head":
            continue  # DINO projection head or classifier: not part of the backbone
        sd[k] = v
    if not sd:
        raise WeightsError(f"{path}: no tensors found in the checkpoint")
    return sd


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file as a backbone state dict."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(p))
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"{p}: cannot read as a weights-only torch checkpoint ({exc})") from exc
    sd = _unwrap_state_dict(obj, str(p))
    from transfgu.schemas import FileSchemaError, check_finite

    try:
        check_finite(p, sd)
    except FileSchemaError as exc:  # a WeightsError, as every other problem of a weights file
        raise WeightsError(str(exc)) from None
    return sd


def weights_prior(weights: str | os.PathLike[str]) -> str:
    """What ``backbone.weights`` gives: :data:`PRIOR_RANDOM` for ``none``; for a safetensors file whose metadata marks
    it, the mark (:data:`MARKED_PRIORS`: the supervised stand-in prior, a fine-tuned random init); else
    :data:`PRIOR_PRETRAINED`.

    The stand-in is a test fixture trained with labels, so runs that use it must never claim ``pretrained: true``.
    """
    weights = str(weights)
    if weights == "none":
        return PRIOR_RANDOM
    p = Path(weights)
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
        except Exception:  # unreadable files are reported by load_state_dict_file with a clear message
            meta = {}
        if meta.get(PRIOR_METADATA_KEY) in MARKED_PRIORS:
            return meta[PRIOR_METADATA_KEY]
    return PRIOR_PRETRAINED


def _load_into(vit: VisionTransformer, sd: dict[str, Tensor], path: str) -> None:
    if "pos_embed" in sd and sd["pos_embed"].shape != vit.pos_embed.shape:
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        old_n = sd["pos_embed"].shape[1] - n_prefix
        old = int(round(old_n**0.5))
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"], new_size=list(vit.patch_embed.grid_size), old_size=[old, old], num_prefix_tokens=n_prefix
        )
    try:
        missing, unexpected = vit.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"{path}: checkpoint does not match the architecture: {exc}") from exc
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: checkpoint does not match the architecture: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


def build_backbone(arch: str = "vit_small_patch8", weights: str = "none", pos_embed: str = "timm") -> DinoViT:
    """Build a frozen backbone in eval mode.

    Args:
        arch: a key of :data:`ARCHS` (ViT-S/8 is the paper's backbone).
        weights: ``"none"`` (random init), ``"timm"`` (the timm hub tag of ``arch``), ``"hub:<timm tag>"``, or a path
            to a ``.pth``/``.pt``/``.safetensors`` file in DINO's or timm's key layout.
        pos_embed: ``"timm"`` or ``"dino"`` position-embedding resampling (see :class:`DinoViT`).
    """
    weights = str(weights)
    src = parse_source(weights)
    if src.kind == "random":
        vit = _create_vit(arch, pretrained_tag=False)
        log.warning(
            "backbone %s has RANDOM weights (weights=none): features, pseudo labels and metrics are NOT those of "
            "the method; give model.weights a DINO checkpoint for real results",
            arch,
        )
    elif src.kind == "hub":
        try:
            vit = timm.create_model(src.tag, pretrained=True, num_classes=0, dynamic_img_size=True)
        except Exception as exc:
            raise WeightsError(f"could not load timm hub tag {src.tag!r}: {exc}") from exc
    elif src.kind == "timm":
        vit = _create_vit(arch, pretrained_tag=True)
    else:
        sd = load_state_dict_file(weights)
        vit = _create_vit(arch, pretrained_tag=False)
        _load_into(vit, sd, weights)
    pretrained = src.pretrained
    prior = src.prior
    if prior == PRIOR_STANDIN:
        log.warning("backbone %s uses the SUPERVISED STAND-IN prior %s: a test fixture, not the method", arch, weights)
    model = DinoViT(vit, arch=arch, weights=weights, pretrained=pretrained, pos_embed_mode=pos_embed)
    model.prior = prior
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_backbone_weights(model: DinoViT, path: str | os.PathLike[str]) -> None:
    """Save the backbone weights as safetensors in timm/DINO key layout (reloadable with ``weights=<path>``)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.vit.state_dict().items()}
    tmp = Path(str(path) + ".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)


def resize_to_multiple(x: Tensor, size: tuple[int, int], patch_size: int, mode: str = "bilinear") -> Tensor:
    """Resize ``(B,3,H,W)`` float images to ``size`` (rounded down to multiples of the patch size)."""
    hh = max(patch_size, size[0] // patch_size * patch_size)
    ww = max(patch_size, size[1] // patch_size * patch_size)
    if mode == "nearest":
        return F.interpolate(x, size=(hh, ww), mode="nearest")
    return F.interpolate(x, size=(hh, ww), mode=mode, align_corners=False)
