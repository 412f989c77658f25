"""Frozen self-supervised ViT backbones (DINO, DINOv2 with or without registers, DINOv3; all through timm) with the
outputs every method needs, behind one interface (:class:`DinoViT`).

One forward pass gives the final-LayerNorm CLS token (crop features, as in the authors' code), the patch tokens (decoder
input, Leopart's dense features) and the last block's CLS->patch softmax attention per head (foreground prior,
pseudo labels, Leopart's noisy foreground mask).

Two timm model classes are supported, and nothing outside this module knows which one it has:

* ``VisionTransformer``: DINO v1 (one CLS token with a learned absolute position embedding), DINOv2 (the same, with
  layer scale) and DINOv2 with registers (``reg_tokens=4``, ``no_embed_class``: neither CLS nor registers carry a
  position embedding).
* ``Eva``: DINOv3 (rotary position embeddings on the patch tokens only, 4 registers, layer scale ``gamma_1/2``).

Register tokens ride through every block as the model was trained, and are excluded from everything a method reads:
the patch tokens are the tokens after the ``num_prefix_tokens`` (CLS + registers), and the attention map is the CLS
query's softmax over the CLS and patch keys only (the register keys are left out of the normalisation, so a
high-norm register that soaks up attention leaves the map over the patches unchanged; with no registers it is the
plain softmax row, as DINO v1 computes it).

The last block is evaluated by hand from its timm sub-modules so that its CLS-query attention row is an explicit
tensor. That also exposes the pieces the fast pseudo-label path needs (``tokens_before_last_block``,
``last_block_qkv`` and the Grad-CAM hook ``finish_last_block``, which takes the heads' output before the attention's
output projection): the gradient of any function of the final CLS token with respect to that attention row only
involves the CLS path of the last block, not the blocks below it.

Weights: a timm hub tag (``timm`` or ``hub:<tag>``), a local file (``.pth``/``.pt``/``.safetensors``: timm's key
layout, a DINO training checkpoint with ``teacher``/``student`` entries and ``module.``/``backbone.`` prefixes whose
projection head is dropped, or an official DINOv2/DINOv3 release file, converted by timm's own checkpoint filter of
the model class), or ``none`` (random init: logged loudly, and recorded as ``pretrained: false`` by callers).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter
from torch import Tensor, nn

from transfgu.models.source import (  # noqa: F401 -- re-exported: the priors are part of this module's interface
    MARKED_PRIORS,
    PRIOR_FINETUNED_RANDOM,
    PRIOR_METADATA_KEY,
    PRIOR_PRETRAINED,
    PRIOR_RANDOM,
    PRIOR_STANDIN,
    parse_source,
    weights_prior,
)
from transfgu.schemas import FileSchemaError, check_finite
from transfgu.store.atomic import fix_mode

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Architecture names -> timm model names with their pretrained tag (used with ``weights="timm"``).
ARCHS: dict[str, str] = {
    # DINO v1 (the papers' backbones)
    "vit_small_patch8": "vit_small_patch8_224.dino",
    "vit_small_patch16": "vit_small_patch16_224.dino",
    "vit_base_patch8": "vit_base_patch8_224.dino",
    "vit_base_patch16": "vit_base_patch16_224.dino",
    # DINOv2 without and with registers (patch 14)
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "vit_small_patch14_reg4_dinov2": "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit_base_patch14_reg4_dinov2": "vit_base_patch14_reg4_dinov2.lvd142m",
    # DINOv3 (timm's Eva: rotary position embeddings, 4 registers, patch 16)
    "vit_small_patch16_dinov3": "vit_small_patch16_dinov3.lvd1689m",
    "vit_base_patch16_dinov3": "vit_base_patch16_dinov3.lvd1689m",
    # Tiny random models with the structure of each family, for tests and smoke runs only.
    "vit_test_tiny": "",
    "vit_test_tiny_reg4": "",
    "vit_test_tiny_dinov3": "",
    # A small ViT/8 for the supervised stand-in prior (transfgu.tools.standin_prior): tests and development only.
    "vit_standin": "",
}

#: The backbones the papers used (DINO v1): ``protocol: paper`` reproduces results obtained with these.
PAPER_ARCHS = ("vit_small_patch8", "vit_small_patch16", "vit_base_patch8", "vit_base_patch16")
#: Test-only architectures (random tiny models); no warning about the papers' backbones is given for them.
TEST_ARCHS = ("vit_test_tiny", "vit_test_tiny_reg4", "vit_test_tiny_dinov3", "vit_standin")


class WeightsError(RuntimeError):
    """Raised when backbone weights cannot be found, read or matched to the architecture."""


@dataclass
class ViTFeatures:
    """Outputs of one backbone pass on a batch of images (registers excluded everywhere)."""

    cls: Tensor  # (B, D) CLS token after the final LayerNorm (raw, not L2-normalised)
    patch: Tensor  # (B, h*w, D) patch tokens after the final LayerNorm
    attn_cls: Tensor  # (B, heads, h*w) last block softmax attention, CLS query row, patch keys (registers left out)
    grid: tuple[int, int]  # (h, w) patch grid


def normalize(img: Tensor) -> Tensor:
    """uint8 (or [0, 255] float) images ``(B,3,H,W)`` or ``(3,H,W)`` -> float32 ImageNet-normalised."""
    x = img.float() / 255.0
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(shape)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(shape)
    return (x - mean) / std


def dino_interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """DINO's position-embedding interpolation (``interpolate_pos_encoding`` of the DINO and DINOv2 ViTs, which the
    reference uses): the square ``side x side`` patch embeddings are resized bicubically (``align_corners=False``) by
    the *scale factors* ``((h + 0.1) / side, (w + 0.1) / side)``, so the output is ``h x w`` and every output cell
    ``i`` samples the input at ``(i + 0.5) * side / (h + 0.1) - 0.5`` (the "+0.1" avoids a floating-point
    off-by-one in the output size, DINO issue #8). Nothing is resampled when the grid is the stored square one.

    Args:
        pos_embed: ``(1, num_prefix + side**2, D)``, the prefix (CLS) positions first.
        grid: target patch grid ``(h, w)``.
        num_prefix: leading prefix positions kept as they are (1 for DINO's CLS; 0 for a table of patches only).
    """
    n = pos_embed.shape[1] - num_prefix
    h, w = grid
    if n == h * w and h == w:
        return pos_embed
    side = int(math.sqrt(n))
    if side * side != n:
        raise ValueError(f"DINO interpolation needs a square position grid, got {n} patch positions")
    d = pos_embed.shape[-1]
    patch = pos_embed[:, num_prefix:].reshape(1, side, side, d).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                          align_corners=False)
    if patch.shape[-2:] != (h, w):
        raise RuntimeError(f"DINO interpolation gave a {tuple(patch.shape[-2:])} grid, expected {(h, w)}")
    patch = patch.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, d)
    return torch.cat([pos_embed[:, :num_prefix], patch], dim=1)


def _family(vit: nn.Module) -> str:
    """``"vit"`` (timm VisionTransformer) or ``"eva"`` (timm Eva); anything else is refused with the reason."""
    if isinstance(vit, Eva):
        blocks_ok = all(isinstance(b, EvaBlock) and isinstance(b.attn, EvaAttention) for b in vit.blocks)
        if not blocks_ok or getattr(vit, "rope_mixed", False):
            raise ValueError("only Eva models with pre-norm EvaBlocks, EvaAttention and one rotary embedding for all "
                             "blocks (the DINOv3 layout) are supported")
        family = "eva"
    elif isinstance(vit, VisionTransformer):
        if not all(isinstance(b, Block) and isinstance(b.attn, Attention) for b in vit.blocks):
            raise ValueError("only VisionTransformers with timm's standard Block and Attention are supported")
        family = "vit"
    else:
        raise ValueError(f"unsupported backbone class {type(vit).__name__}: use a timm VisionTransformer or Eva")
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("the backbone has no CLS token, which crop features and attention maps are read from")
    if getattr(vit.blocks[-1].attn, "gate", None) is not None:
        raise ValueError("gated attention is not supported (the CLS attention would not be the block's mixing)")
    return family


class DinoViT(nn.Module):
    """A timm ViT or Eva wrapped to return CLS, patch tokens and the last block's CLS attention (module docstring).

    ``pos_embed_mode``: ``"timm"`` (default: timm's ``resample_abs_pos_embed``, bicubic with anti-aliasing, sized by
    the target grid) or ``"dino"`` (:func:`dino_interpolate_pos_embed`, what the reference's DINO ViT does). It only
    concerns learned absolute position tables; a rotary backbone (DINOv3) has none, so both modes are the same there.
    """

    def __init__(self, vit: nn.Module, arch: str, weights: str, pretrained: bool,
                 pos_embed_mode: str = "timm") -> None:
        super().__init__()
        if pos_embed_mode not in ("timm", "dino"):
            raise ValueError(f"pos_embed_mode must be 'timm' or 'dino', got {pos_embed_mode!r}")
        self.family = _family(vit)
        self.pos_embed_mode = pos_embed_mode
        self.vit = vit
        self.arch = arch
        self.weights = weights
        self.pretrained = pretrained
        self.prior = PRIOR_PRETRAINED if pretrained else PRIOR_RANDOM  # build_backbone refines it
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[-1].attn.num_heads)
        #: CLS + register tokens in front of the patch tokens (1 for DINO v1 and DINOv2, 5 with 4 registers).
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        #: Register tokens (carried through the blocks, excluded from every output).
        self.num_registers = self.num_prefix_tokens - 1

    # -- the two halves of a forward pass ----------------------------------------------------------------------
    def tokens_before_last_block(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Embed ``x`` and run blocks 1..L-1. Returns tokens ``(B, prefix + h*w, D)`` and the grid ``(h, w)``."""
        h, w = self._grid(x)
        t = self._embed(x)
        rope = self.rope((h, w))
        for blk in self.vit.blocks[:-1]:
            t = blk(t) if rope is None else blk(t, rope=rope)
        return t, (h, w)

    def _embed(self, x: Tensor) -> Tensor:
        """Patch embedding, prefix tokens, absolute position embeddings (if any) and ``norm_pre``."""
        vit = self.vit
        t = vit.patch_embed(x)
        if self.pos_embed_mode == "dino" and vit.pos_embed is not None:
            t = self._dino_pos_embed(t)
        elif self.family == "eva":
            t, _ = vit._pos_embed(t)  # the rotary embedding is applied inside the blocks (see rope())
        else:
            t = vit._pos_embed(t)
        return vit.norm_pre(t)

    def rope(self, grid: tuple[int, int]) -> Tensor | None:
        """The rotary position embedding of the patch grid (DINOv3), ``None`` for absolute position embeddings."""
        r = getattr(self.vit, "rope", None)
        return None if r is None else r.get_embed(shape=grid)

    def _dino_pos_embed(self, t: Tensor) -> Tensor:
        """Prefix tokens + position embeddings with DINO's interpolation (timm's ``_pos_embed`` otherwise)."""
        vit = self.vit
        if self.family != "vit":
            raise ValueError("pos_embed=dino applies to DINO/DINOv2 position tables, not to this Eva backbone's")
        if t.dim() == 4:  # dynamic_img_size: (B, h, w, D)
            b, h, w, d = t.shape
            t = t.reshape(b, h * w, d)
        else:
            h, w = vit.patch_embed.grid_size
        n_pos_prefix = 0 if vit.no_embed_class else self.num_prefix_tokens
        pos = dino_interpolate_pos_embed(vit.pos_embed, (h, w), num_prefix=n_pos_prefix)
        prefix = [vit.cls_token.expand(t.shape[0], -1, -1)]
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(t.shape[0], -1, -1))
        # DINOv2 with registers: only the patches have positions (the CLS token absorbed its own)
        t = torch.cat([*prefix, t + pos], dim=1) if n_pos_prefix == 0 else torch.cat([*prefix, t], dim=1) + pos
        return vit.pos_drop(t)

    # -- the last block, piece by piece -----------------------------------------------------------------------
    def last_block_qkv(self, t: Tensor, grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values of the last block, each ``(B, heads, T, head_dim)``, as its attention uses them
        (after q/k norms, and the rotary embedding of the patch positions for DINOv3, which needs ``grid``)."""
        blk = self.vit.blocks[-1]
        attn = blk.attn
        b, n, _ = t.shape
        x = blk.norm1(t)
        if self.family == "vit":
            qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            return attn.q_norm(q), attn.k_norm(k), v
        # EvaAttention.forward, up to the softmax
        if attn.qkv is not None:
            if attn.q_bias is None:
                qkv = attn.qkv(x)
            else:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
            q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
            v = attn.v_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if getattr(self.vit, "rope", None) is not None:
            if grid is None:
                raise ValueError("a rotary-embedding backbone needs the patch grid to compute its last block")
            rope = self.rope(grid)
            p = attn.num_prefix_tokens
            half = attn.rotate_half
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
        return q, k, v

    def _qkv(self, t: Tensor, grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return self.last_block_qkv(t, grid)

    def last_block_cls_logits(self, t: Tensor, grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Scaled CLS-query attention logits over all keys ``(B, heads, T)`` (prefix first) and the values."""
        q, k, v = self.last_block_qkv(t, grid)
        scale = self.vit.blocks[-1].attn.scale
        return ((q[:, :, :1] * scale) @ k.transpose(-2, -1))[:, :, 0], v

    def last_block_cls_attention(self, t: Tensor, grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Softmax attention of the CLS query over all keys in the last block, ``(B, heads, T)``, and the values:
        the attention the block really applies (registers included)."""
        logits, v = self.last_block_cls_logits(t, grid)
        return torch.softmax(logits, dim=-1), v

    def patch_attention(self, logits: Tensor) -> Tensor:
        """The CLS->patch attention map ``(B, heads, h*w)`` from the CLS logits ``(B, heads, T)``: a softmax over the
        CLS and patch keys, the register keys left out (with no registers: the block's own softmax row)."""
        p = self.num_prefix_tokens
        if self.num_registers == 0:
            return torch.softmax(logits, dim=-1)[..., p:]
        keep = torch.cat([logits[..., :1], logits[..., p:]], dim=-1)
        return torch.softmax(keep, dim=-1)[..., 1:]

    def finish_last_block(self, t: Tensor, o: Tensor) -> Tensor:
        """The Grad-CAM hook: final-LayerNorm tokens from the last block's input tokens ``t`` (``(..., D)``) and its
        heads' output ``o`` (``(..., heads * head_dim)``: attention-weighted values, before the attention's output
        norm and projection). Every operation after the attention mixing is per token, so ``t``/``o`` may hold any
        subset of the tokens (TransFGU passes only the CLS token's)."""
        blk = self.vit.blocks[-1]
        attn = blk.attn
        y = attn.proj(attn.norm(o))
        if self.family == "vit":
            u = t + blk.ls1(y)
            u = u + blk.ls2(blk.mlp(blk.norm2(u)))
        else:
            u = t + (y if blk.gamma_1 is None else blk.gamma_1 * y)
            m = blk.mlp(blk.norm2(u))
            u = u + (m if blk.gamma_2 is None else blk.gamma_2 * m)
        return self.vit.norm(u)

    def cls_from_attention(self, t: Tensor, a_cls: Tensor, v: Tensor) -> Tensor:
        """Final-LayerNorm CLS token given the last block's input tokens, CLS attention row (all keys) and values.

        Only the CLS row of the last block's attention reaches the CLS output, which is why the gradient of a
        CLS-only objective with respect to the attention matrix lives entirely in that row (docs/fidelity.md row 2).
        """
        o = torch.einsum("bht,bhtd->bhd", a_cls, v).reshape(t.shape[0], -1)
        return self.finish_last_block(t[:, 0], o)

    def forward(self, x: Tensor) -> ViTFeatures:
        t, grid = self.tokens_before_last_block(x)
        blk = self.vit.blocks[-1]
        rope = self.rope(grid)
        out = blk(t) if rope is None else blk(t, rope=rope)
        out = self.vit.norm(out)
        logits, _ = self.last_block_cls_logits(t, grid)
        p = self.num_prefix_tokens
        return ViTFeatures(cls=out[:, 0], patch=out[:, p:], attn_cls=self.patch_attention(logits), grid=grid)

    def _grid(self, x: Tensor) -> tuple[int, int]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        hh, ww = x.shape[-2:]
        ps = self.patch_size
        if hh % ps or ww % ps:
            raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {ps}")
        return hh // ps, ww // ps


def _unit_layer_scale(model: nn.Module) -> nn.Module:
    """Layer scales of a random tiny model set to 1: timm initialises them at 1e-5 (DINOv2/v3's training init),
    which would make every block of a random model a near-identity and its attention maps and gradients vanish."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                p.fill_(1.0)
    return model


#: Random tiny models: timm's own classes at small sizes (depth 2, width 48-96), one per supported family.
_TINY: dict[str, Callable[[], nn.Module]] = {
    "vit_test_tiny": lambda: VisionTransformer(
        img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True),
    "vit_standin": lambda: VisionTransformer(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=0, dynamic_img_size=True),
    # DINOv2 with 4 registers (patch 14, no position embedding on CLS/registers, layer scale)
    "vit_test_tiny_reg4": lambda: _unit_layer_scale(timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=112, embed_dim=64, depth=2, num_heads=2,
        num_classes=0, dynamic_img_size=True)),
    # DINOv3 (Eva: rotary embeddings, 4 registers, layer scale, patch 16)
    "vit_test_tiny_dinov3": lambda: _unit_layer_scale(timm.create_model(
        "vit_small_patch16_dinov3", pretrained=False, img_size=128, embed_dim=64, depth=2, num_heads=2,
        num_classes=0)),
}


def _create_vit(arch: str, pretrained_tag: bool) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; choose one of {sorted(ARCHS)}")
    if arch in _TINY:
        return _TINY[arch]()
    try:
        return timm.create_model(ARCHS[arch], pretrained=pretrained_tag, num_classes=0, dynamic_img_size=True)
    except Exception as exc:  # network errors come in many types
        if not pretrained_tag:
            raise
        raise WeightsError(
            f"could not fetch pretrained weights for timm tag {ARCHS[arch]!r} ({exc}). On an offline machine give "
            "model.weights a local DINO .pth or .safetensors file, or 'none' for a random backbone."
        ) from exc


def patch_size_of(arch: str) -> int:
    """Patch size of ``arch`` without allocating its weights (the model is built on the meta device)."""
    with torch.device("meta"):
        vit = _create_vit(arch, pretrained_tag=False)
    return int(vit.patch_embed.patch_size[0])


def _unwrap_state_dict(obj: object, path: str) -> dict[str, Tensor]:
    """Find the backbone state dict in a DINO-style checkpoint: the ``teacher``/``model`` entry, without the
    ``module.``/``backbone.`` prefixes and the projection head (key layouts are converted by :func:`_load_into`)."""
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

    try:
        check_finite(p, sd)
    except FileSchemaError as exc:  # a WeightsError, as every other problem of a weights file
        raise WeightsError(str(exc)) from None
    return sd


def convert_state_dict(vit: nn.Module, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict in timm's layout for ``vit``, through timm's own checkpoint filter of the model class: official
    DINOv2 files (``register_tokens``, ``mask_token``, the CLS position folded into ``cls_token``) and DINOv3 files
    (``storage_tokens``, ``ls1.gamma``, ``qkv.bias`` split into q/v biases, rope periods dropped) become timm keys;
    a learned position table of another grid is resampled to the model's; timm's own layout passes through."""
    sd = dict(sd)
    # timm's Eva filter prints (not logs) a line when it drops a q/k/v bias the model does not have
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(vit, Eva):
            return eva_checkpoint_filter(sd, vit)
        return vit_checkpoint_filter(sd, vit)


def _load_into(vit: nn.Module, sd: dict[str, Tensor], path: str) -> None:
    """Convert ``sd`` to timm's layout and load it; any key missing, unexpected or of another shape is refused, with
    the keys named (a file of another family or size never loads half-way)."""
    try:
        sd = convert_state_dict(vit, sd)
    except (RuntimeError, ValueError, KeyError) as exc:  # layouts the conversion cannot read (e.g. a bad pos grid)
        raise WeightsError(f"{path}: checkpoint does not match the architecture: {exc}") from exc
    want = vit.state_dict()
    missing = [k for k in want if k not in sd and not k.startswith("head")]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}" for k in sd
              if k in want and sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{path}: checkpoint does not match the architecture: missing {missing[:8]}, unexpected {unexpected[:8]}"
            + (f", shapes (file vs model) {shapes[:4]}" if shapes else "")
            + f" ({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another shape in all)"
        )
    vit.load_state_dict(sd, strict=False)  # strict=False: a classifier head of the model is not in the file


def build_backbone(arch: str = "vit_small_patch8", weights: str = "none", pos_embed: str = "timm") -> DinoViT:
    """Build a frozen backbone in eval mode.

    Args:
        arch: a key of :data:`ARCHS` (ViT-S/8 is the paper's backbone).
        weights: ``"none"`` (random init), ``"timm"`` (the timm hub tag of ``arch``), ``"hub:<timm tag>"``, or a path
            to a ``.pth``/``.pt``/``.safetensors`` file in timm's layout, a DINO checkpoint's, or an official DINOv2
            / DINOv3 release's.
        pos_embed: ``"timm"`` or ``"dino"`` position-embedding resampling (see :class:`DinoViT`).
    """
    weights = str(weights)
    src = parse_source(weights)
    if src.kind == "random":
        vit = _create_vit(arch, pretrained_tag=False)
        # debug: every process that builds the backbone gets here; the run warns once (transfgu.pipeline), and
        # prediction on a random checkpoint says so where it is loaded
        log.debug("backbone %s has RANDOM weights (backbone.weights=none)", arch)
    elif src.kind == "hub":
        try:
            vit = timm.create_model(src.tag, pretrained=True, num_classes=0, dynamic_img_size=True)
        except Exception as exc:
            raise WeightsError(f"could not load timm hub tag {src.tag!r}: {exc}") from exc
    elif src.kind == "timm":
        if not ARCHS.get(arch, "x"):
            raise WeightsError(f"arch {arch!r} is a test model with no pretrained weights; use weights=none")
        vit = _create_vit(arch, pretrained_tag=True)
    else:
        sd = load_state_dict_file(weights)
        vit = _create_vit(arch, pretrained_tag=False)
        _load_into(vit, sd, weights)
    pretrained = src.pretrained
    prior = src.prior
    if prior == PRIOR_STANDIN:
        log.warning("backbone %s uses the SUPERVISED STAND-IN prior %s: a test fixture, not the method", arch, weights)
    try:
        model = DinoViT(vit, arch=arch, weights=weights, pretrained=pretrained, pos_embed_mode=pos_embed)
    except ValueError as exc:
        raise WeightsError(f"backbone {arch!r} ({weights}): {exc}") from exc
    model.prior = prior
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_backbone_weights(model: DinoViT, path: str | os.PathLike[str]) -> None:
    """Save the backbone weights as safetensors in timm's key layout (reloadable with ``weights=<path>``)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.vit.state_dict().items()}
    tmp = Path(str(path) + ".tmp")
    save_file(sd, str(tmp))
    fix_mode(tmp)  # safetensors writes 0600; the umask decides
    os.replace(tmp, path)


def resize_to_multiple(x: Tensor, size: tuple[int, int], patch_size: int, mode: str = "bilinear") -> Tensor:
    """Resize ``(B,3,H,W)`` float images to ``size`` (rounded down to multiples of the patch size)."""
    hh = max(patch_size, size[0] // patch_size * patch_size)
    ww = max(patch_size, size[1] // patch_size * patch_size)
    if mode == "nearest":
        return F.interpolate(x, size=(hh, ww), mode="nearest")
    return F.interpolate(x, size=(hh, ww), mode=mode, align_corners=False)
