"""Concept pseudo labels by attention Grad-CAM (paper eq. 5-7; the authors' code, docs/fidelity.md rows 1-2, 18).

For an image with final CLS token ``z`` and concept centroid ``c_k`` the objective is (eq. 5)

    L_k = s * (1 - cos(z, c_k))

and ``g_k`` is the head-averaged gradient of ``L_k`` with respect to the last block's softmax attention, CLS-query
row, patch keys. The map of concept k (eq. 7, as the authors' code computes it) is

    M_k = 1[g_k <= 0] * (a_hat + top_mass(max(-g_k, 0), 0.8))

with ``a_hat`` the head-mean CLS attention divided by its per-image maximum and ``top_mass(r, m)`` keeping the
largest entries of ``r`` that together hold a fraction ``m`` of its mass.

Fix of a reference quirk: the authors back-propagate the *batch mean* of ``L_k``, so the gradient (and through the
bonus term the maps) carries a factor ``1/B`` that depends on the generation batch size. Here each image has its own
objective with an explicit scale ``s`` (``grad_scale``); ``s = 1/8`` reproduces the reference's COCO/VOC batch of 8,
``s = 1/2`` its Cityscapes/LIP batch of 2, whatever batch size is used here.

Speed: only the CLS row of the last block's attention reaches ``z``, so all K gradients come from one pass through
blocks 1..L-1 without autograd, one backward of the K objectives (on K replicated copies of the CLS row) through the CLS
token's path in the last block (projection, MLP, LayerNorms: D-sized work) down to the heads' CLS output ``o``, and
one contraction ``dL/dA[h, 0, j] = <dL/do_h, v_hj>`` with the values. :func:`naive_concept_maps` keeps the
reference's definition (K full backward passes through every block) as a test oracle and benchmark baseline.

Precision: the class decision among concepts that pass the gate hinges on the bonus alone, with a median gap of
~3e-5 between the best and second-best concept (issue 12), so the maps are computed in float32 by default, with TF32
disabled on CUDA for the duration of the pass (:func:`strict_fp32`). bf16 autocast of blocks 1..L-1 is an opt-in
(``pseudo.precision=bf16``) whose agreement with float32 is measured by ``bench/label_bank_agreement.py``.
:func:`concept_map_parts` returns the three pieces of eq. 7 (shared ``a_hat``, per-concept gate, kept bonus), which
the label bank stores losslessly (:class:`transfgu.store.formats.LabelMaps`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypedDict, Unpack

import torch
import torch.nn.functional as F
from torch import Tensor

from transfgu.models.backbone import DinoViT


def top_mass_mask(r: Tensor, mass: float = 0.8) -> Tensor:
    """Boolean mask of the largest entries of non-negative ``r`` (last dim) that hold ``mass`` of its total.

    Mirrors the reference's ``binarize_mask``: sort ascending, normalise by the total, cumulative sum, keep entries
    whose cumulative share exceeds ``1 - mass``. An all-zero row keeps nothing.
    """
    sorted_r, idx = torch.sort(r, dim=-1)
    total = sorted_r.sum(dim=-1, keepdim=True)
    share = torch.cumsum(sorted_r, dim=-1) / total.clamp_min(torch.finfo(r.dtype).tiny)
    keep_sorted = (share > (1.0 - mass)) & (total > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


@dataclass
class ConceptMapParts:
    """The three pieces of eq. 7 for a batch: ``M_k = gate_k * (a_hat + bonus_k)``.

    ``a_hat`` ``(B, N)`` is shared by every concept, ``gate`` ``(B, K, N)`` is ``1[g_k <= 0]`` and ``bonus``
    ``(B, K, N)`` is ``top_mass(max(-g_k, 0))`` (non-zero only where the gate is open, since ``-g_k > 0`` there).
    """

    a_hat: Tensor
    gate: Tensor
    bonus: Tensor

    def maps(self) -> Tensor:
        """``(B, K, N)`` maps, bit-identical to :func:`combine_maps` (same float32 additions, same masking)."""
        maps = self.a_hat[:, None, :] + self.bonus
        return maps.masked_fill(~self.gate, 0.0)


def combine_parts(attn_cls: Tensor, grads: Tensor, mass: float = 0.8) -> ConceptMapParts:
    """Eq. 7's pieces from the last block's CLS attention ``(B, heads, N)`` and the gradients ``(K, B, heads, N)``."""
    a = attn_cls.mean(dim=1)
    a_hat = a / a.amax(dim=-1, keepdim=True)
    g = grads.mean(dim=2).transpose(0, 1)  # (B, K, N), head-averaged
    r = (-g).clamp_min(0)
    bonus = r * top_mass_mask(r, mass)
    return ConceptMapParts(a_hat=a_hat, gate=~(g > 0), bonus=bonus)


def combine_maps(attn_cls: Tensor, grads: Tensor, mass: float = 0.8) -> Tensor:
    """Eq. 7 as the reference computes it.

    Args:
        attn_cls: ``(B, heads, N)`` CLS->patch softmax attention of the last block.
        grads: ``(K, B, heads, N)`` gradients of each concept objective w.r.t. that attention.
        mass: share of the positive-relevance mass kept as the concept-specific bonus.

    Returns:
        ``(B, K, N)`` concept maps.
    """
    return combine_parts(attn_cls, grads, mass).maps()


@contextlib.contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """Disable TF32 (cuBLAS matmuls and cuDNN convolutions) on CUDA for the block, then restore the settings.

    PyTorch lets cuDNN convolutions (the patch embedding) run in TF32 by default, and some code enables it for
    matmuls too; TF32 keeps 10 mantissa bits, far too few for decisions that hinge on gaps of ~3e-5.
    """
    if device.type != "cuda":
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _objective(z: Tensor, centroids: Tensor, grad_scale: float) -> Tensor:
    """Eq. 5 per image and concept: ``s * (1 - cos(z_b, c_k))``, shape ``(B, K)``."""
    return grad_scale * (1.0 - F.normalize(z, dim=-1) @ F.normalize(centroids, dim=-1).T)


class MapOptions(TypedDict, total=False):
    """The optional arguments of :func:`concept_map_parts` (and :func:`concept_maps`), by name."""

    grad_scale: float
    mass: float
    autocast_dtype: torch.dtype | None


def concept_maps(backbone: DinoViT, images: Tensor, centroids: Tensor, **options: Unpack[MapOptions]) -> Tensor:
    """Pseudo-label maps for a batch: ``(B, K, h, w)`` float32 (fast path, see module docstring).

    Same arguments as :func:`concept_map_parts`.
    """
    parts, (h, w) = concept_map_parts(backbone, images, centroids, **options)
    return parts.maps().reshape(images.shape[0], centroids.shape[0], h, w)


def concept_map_parts(
    backbone: DinoViT,
    images: Tensor,
    centroids: Tensor,
    grad_scale: float = 0.125,
    mass: float = 0.8,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[ConceptMapParts, tuple[int, int]]:
    """Eq. 7's pieces for a batch (fast path, see module docstring) and the token grid ``(h, w)``.

    Args:
        backbone: frozen backbone in eval mode.
        images: ``(B, 3, H, W)`` ImageNet-normalised, H and W multiples of the patch size.
        centroids: ``(K, D)`` concept centroids.
        grad_scale: the explicit per-image objective scale ``s`` (eq. 5).
        mass: positive-gradient mass kept as the concept bonus.
        autocast_dtype: optional reduced precision (e.g. ``torch.bfloat16``) for blocks 1..L-1 only; the last block
            and the gradients always run in float32. ``None`` (default): float32 throughout, TF32 off.
    """
    device = images.device
    with strict_fp32(device):
        return _concept_map_parts(backbone, images, centroids, grad_scale, mass, autocast_dtype)


def _concept_map_parts(
    backbone: DinoViT,
    images: Tensor,
    centroids: Tensor,
    grad_scale: float,
    mass: float,
    autocast_dtype: torch.dtype | None,
) -> tuple[ConceptMapParts, tuple[int, int]]:
    device = images.device
    with torch.no_grad():
        if autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                tokens, (h, w) = backbone.tokens_before_last_block(images)
            tokens = tokens.float()
        else:
            tokens, (h, w) = backbone.tokens_before_last_block(images)
        logits, v = backbone.last_block_cls_logits(tokens, (h, w))
        a_full = torch.softmax(logits, dim=-1)  # what the block applies (registers included)
        a_map = backbone.patch_attention(logits)  # the map over the patches (registers left out)
    k = centroids.shape[0]
    b = images.shape[0]
    c = centroids.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        o = torch.einsum("bht,bhtd->bhd", a_full, v).reshape(b, -1)  # CLS output of the heads, pre-projection
    # dL_k/dA[h, 0, j] = <dL_k/do_h, v_hj>: back-propagate the K objectives only as far as o (a D-vector per image,
    # through projection, MLP, layer scales and LayerNorms of the CLS token: the backbone's Grad-CAM hook
    # finish_last_block), then contract with the values once.
    # Each (concept, image) pair gets its own copy of the image's D-wide CLS row, so one ordinary backward gives
    # every dL_k/do at once (a vmapped backward would loop over K in LayerNorm/GELU backward, which have no
    # batching rule).
    with torch.enable_grad():
        oo = o[None].expand(k, b, -1).reshape(k * b, -1).clone().requires_grad_(True)
        z = backbone.finish_last_block(tokens[:, 0][None].expand(k, b, -1).reshape(k * b, -1), oo)
        # Row (k, b) is scored against concept k only: eq. 5 for that pair.
        obj = grad_scale * (1.0 - (F.normalize(z, dim=-1) * F.normalize(c, dim=-1).repeat_interleave(b, 0)).sum(-1))
        (g_o,) = torch.autograd.grad(obj.sum(), oo)
    grads = torch.einsum("kbhd,bhtd->kbht", g_o.reshape(k, b, backbone.num_heads, -1), v)
    p = backbone.num_prefix_tokens  # CLS + registers: only the patch keys make the maps
    return combine_parts(a_map, grads[..., p:], mass), (h, w)


def naive_concept_maps(
    backbone: DinoViT, images: Tensor, centroids: Tensor, grad_scale: float = 0.125, mass: float = 0.8
) -> Tensor:
    """The reference's definition: K full backward passes through every block (test oracle, benchmark baseline).

    The last block's full attention matrix ``A`` (B, heads, T, T) is an explicit tensor of the graph; all backbone
    parameters require grad as in the authors' code; each concept's objective (summed over images, which gives each
    image its own gradient) is back-propagated with a retained graph and ``A.grad`` is read.
    """
    attn = backbone.vit.blocks[-1].attn
    saved = [p.requires_grad for p in backbone.parameters()]
    for p in backbone.parameters():
        p.requires_grad_(True)
    try:
        with torch.enable_grad(), strict_fp32(images.device):
            t, (h, w) = backbone.tokens_before_last_block(images)
            b, n, _ = t.shape
            q, kk, v = backbone.last_block_qkv(t, (h, w))
            big_a = torch.softmax((q * attn.scale) @ kk.transpose(-2, -1), dim=-1)
            big_a.retain_grad()
            o = (big_a @ v).transpose(1, 2).reshape(b, n, -1)
            z = backbone.finish_last_block(t, o)[:, 0]
            obj = _objective(z, centroids.to(z), grad_scale)
            grads = []
            for k in range(centroids.shape[0]):
                big_a.grad = None
                obj[:, k].sum().backward(retain_graph=True)
                grads.append(big_a.grad[:, :, 0].clone())
            a_map = backbone.patch_attention(((q[:, :, :1] * attn.scale) @ kk.transpose(-2, -1))[:, :, 0]).detach()
    finally:
        for p, s in zip(backbone.parameters(), saved):
            p.requires_grad_(s)
            p.grad = None
    pre = backbone.num_prefix_tokens
    maps = combine_maps(a_map, torch.stack(grads)[..., pre:], mass)
    return maps.reshape(images.shape[0], centroids.shape[0], h, w)
