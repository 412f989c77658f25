"""Segmenter mask-transformer decoder, TransFGU's student and teacher (paper eq. 2; docs/fidelity.md row 5).

The decoder takes the frozen encoder's final-LayerNorm patch tokens, appends K learned class tokens, runs a
few pre-norm transformer blocks over the joint sequence, and scores every patch against every class by cosine
similarity. A LayerNorm over the class dimension turns the cosine masks into the logits used by every loss.

Class-token initialisation (``cls_emb_init``):

* ``"reference"``: what the authors' code does. ``nn.init.orthogonal_`` on a ``(1, K, D)`` tensor flattens it
  to one ``1 x (K*D)`` row, so the K embeddings are the pieces of a *single* random unit vector (entries
  ~ N(0, 1/(K*D))), not K orthogonal vectors. Use it to reproduce the published numbers.
* ``"orthogonal"`` (default, the fix): ``orthogonal_`` on the ``(K, D)`` view, i.e. K mutually orthogonal unit
  rows when K <= D (for K > D the D columns are orthonormal instead, the best ``orthogonal_`` can do).

Dropout (attention, projection and MLP, p = 0.1 in the reference) takes optional caller-drawn keep-masks
(:mod:`transfgu.models.dropout`): the training loop draws them per sample, so W data-parallel ranks apply the
masks one process would. The blocks are timm's pre-norm ``Block`` (same submodule names, so the same
``state_dict`` keys) with the masks threaded through; without masks they are timm's forward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfgu.models.dropout import MaskedDropout

ClsEmbInit = Literal["reference", "orthogonal"]
MASKS_PER_BLOCK = 4  # attention weights, attention projection, MLP hidden, MLP output


class Attention(nn.Module):
    """Multi-head self-attention (timm ``Attention``: no qkv bias, projection with bias) with maskable dropout.

    Without a mask (or not training) it runs ``scaled_dot_product_attention`` like timm's fused path. With masks
    the attention weights are materialised, ``softmax(q k^T / sqrt(d_h))``, so that the mask can drop them.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = MaskedDropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = MaskedDropout(proj_drop)

    def forward(self, x: Tensor, attn_keep: Tensor | None = None, proj_keep: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_keep is not None and self.attn_drop.active:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn, attn_keep) @ v
        else:
            p = self.attn_drop.p if self.attn_drop.active else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)), proj_keep)


class Mlp(nn.Module):
    """timm ``Mlp``: ``fc2(drop(GELU(fc1(x))))`` followed by dropout, both dropouts maskable."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = MaskedDropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = MaskedDropout(drop)

    def forward(self, x: Tensor, hidden_keep: Tensor | None = None, out_keep: Tensor | None = None) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)), hidden_keep)), out_keep)


class Block(nn.Module):
    """Pre-norm transformer block, ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (timm ``Block``, no drop-path)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def mask_shapes(self, n_tokens: int) -> list[tuple[int, ...]]:
        """Per-sample shapes of the block's keep-masks, in the order :meth:`forward` takes them."""
        d, hidden = self.mlp.fc2.out_features, self.mlp.fc1.out_features
        return [(self.attn.num_heads, n_tokens, n_tokens), (n_tokens, d), (n_tokens, hidden), (n_tokens, d)]

    def forward(self, x: Tensor, keep: Sequence[Tensor] | None = None) -> Tensor:
        a, p, h, o = keep if keep is not None else (None,) * MASKS_PER_BLOCK
        x = x + self.attn(self.norm1(x), a, p)
        return x + self.mlp(self.norm2(x), h, o)


class MaskTransformerDecoder(nn.Module):
    """Segmenter ``MaskTransformer`` (as in the authors' code).

    Args:
        n_classes: output channels K (the "things" variant passes K_fg + 1; channel 0 is background).
        d_encoder: width of the encoder patch tokens (384 for ViT-S).
        d_model: decoder width.
        n_layers: number of pre-norm transformer blocks (2 in the reference).
        n_heads: attention heads per block (6 in the reference).
        mlp_ratio: MLP hidden width / d_model (4 -> 1536 for d_model 384).
        dropout: attention-dropout and projection/MLP dropout (0.1 in the reference); drop-path is 0.
        cls_emb_init: ``"reference"`` or ``"orthogonal"``; see the module docstring.
    """

    def __init__(
        self,
        n_classes: int,
        d_encoder: int = 384,
        d_model: int = 384,
        n_layers: int = 2,
        n_heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        cls_emb_init: ClsEmbInit = "orthogonal",
    ) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if cls_emb_init not in ("reference", "orthogonal"):
            raise ValueError(f"cls_emb_init must be 'reference' or 'orthogonal', got {cls_emb_init!r}")
        self.n_classes = n_classes
        self.d_encoder = d_encoder
        self.d_model = d_model
        self.cls_emb_init = cls_emb_init
        self.dropout = float(dropout)

        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.cls_emb = nn.Parameter(torch.empty(1, n_classes, d_model))
        norm_layer = partial(nn.LayerNorm, eps=1e-5)
        self.blocks = nn.ModuleList(
            [
                Block(dim=d_model, num_heads=n_heads, mlp_ratio=mlp_ratio, qkv_bias=False, drop=dropout, eps=1e-5)
                for _ in range(n_layers)
            ]
        )
        self.decoder_norm = norm_layer(d_model)
        self.proj_patch = nn.Parameter(torch.empty(d_model, d_model))
        self.proj_classes = nn.Parameter(torch.empty(d_model, d_model))
        # LayerNorm over the K cosine scores of a patch: its output is the logit map.
        self.mask_norm = norm_layer(n_classes)
        self.reset_parameters()

    # -- initialisation --------------------------------------------------------------------------------------
    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def reset_parameters(self) -> None:
        """Draw fresh random weights with the reference's init (docs/fidelity.md row 5). Uses the global torch RNG.

        To put the student back to *the same* initial weights at a reboot (paper eq. 10-12), save
        :meth:`initial_state` once at start-up and call :meth:`load_initial_state` instead.
        """
        self.apply(self._init_module)
        scale = self.d_model**-0.5
        with torch.no_grad():
            self.proj_patch.copy_(scale * torch.randn_like(self.proj_patch))
            self.proj_classes.copy_(scale * torch.randn_like(self.proj_classes))
        if self.cls_emb_init == "reference":
            # orthogonal_ flattens trailing dims: a (1, K*D) matrix -> one random unit vector (reference bug).
            nn.init.orthogonal_(self.cls_emb)
        else:
            with torch.no_grad():
                rows = torch.empty(self.n_classes, self.d_model)
                nn.init.orthogonal_(rows)
                self.cls_emb.copy_(rows.unsqueeze(0))

    def initial_state(self) -> dict[str, Tensor]:
        """A detached deep copy of the current weights, to be restored by :meth:`load_initial_state`."""
        return copy.deepcopy({k: v.detach().clone() for k, v in self.state_dict().items()})

    def load_initial_state(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` into the existing parameters in place (optimizer references stay valid)."""
        self.load_state_dict(state, strict=True)

    # -- forward ---------------------------------------------------------------------------------------------
    def dropout_shapes(self, n_patches: int) -> list[tuple[int, ...]]:
        """Per-sample shapes of the keep-masks :meth:`forward` takes for ``n_patches`` patch tokens, in order."""
        return [s for blk in self.blocks for s in blk.mask_shapes(n_patches + self.n_classes)]

    def forward(
        self, patch_tokens: Tensor, grid: tuple[int, int], dropout_keep: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Decode patch tokens into class logits.

        Args:
            patch_tokens: ``(B, h*w, d_encoder)`` encoder patch tokens (CLS dropped).
            grid: ``(h, w)`` patch grid.
            dropout_keep: optional boolean keep-masks ``(B, *shape)`` for :meth:`dropout_shapes`
                (:func:`transfgu.models.dropout.draw_keep_masks`); without them, training-mode dropout draws from
                the global RNG. Ignored in eval mode.

        Returns:
            logits ``(B, K, h, w)`` at patch resolution (after the class-dim LayerNorm), and the class
            embeddings ``(B, K, d_model)`` after the blocks, ``proj_classes`` and L2-normalisation (input of
            eq. 15).
        """
        h, w = grid
        b, n, _ = patch_tokens.shape
        if n != h * w:
            raise ValueError(f"got {n} patch tokens for a {h}x{w} grid")
        x = self.proj_dec(patch_tokens)
        x = torch.cat([x, self.cls_emb.expand(b, -1, -1)], dim=1)
        if dropout_keep is not None and len(dropout_keep) != MASKS_PER_BLOCK * len(self.blocks):
            raise ValueError(f"got {len(dropout_keep)} dropout masks, want {MASKS_PER_BLOCK * len(self.blocks)}")
        m = MASKS_PER_BLOCK
        for j, blk in enumerate(self.blocks):
            x = blk(x, dropout_keep[m * j : m * (j + 1)] if dropout_keep is not None else None)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, h*w, K), cosine masks (eq. 2)
        logits = masks.transpose(1, 2).reshape(b, self.n_classes, h, w)
        return logits, classes
