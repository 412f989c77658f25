"""Segmenter mask-transformer decoder, TransFGU's student and teacher (paper eq. 2, reference_method.md §6).

The decoder takes the frozen encoder's final-LayerNorm patch tokens, appends K learned class tokens, runs a
few pre-norm transformer blocks over the joint sequence, and scores every patch against every class by cosine
similarity. A LayerNorm over the class dimension turns the cosine masks into the logits used by every loss.

Class-token initialisation (``cls_emb_init``):

* ``"reference"``: what the authors' code does. ``nn.init.orthogonal_`` on a ``(1, K, D)`` tensor flattens it
  to one ``1 x (K*D)`` row, so the K embeddings are the pieces of a *single* random unit vector (entries
  ~ N(0, 1/(K*D))), not K orthogonal vectors. Use it to reproduce the published numbers.
* ``"orthogonal"`` (default, the fix): ``orthogonal_`` on the ``(K, D)`` view, i.e. K mutually orthogonal unit
  rows when K <= D (for K > D the D columns are orthonormal instead, the best ``orthogonal_`` can do).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

ClsEmbInit = Literal["reference", "orthogonal"]


class MaskTransformerDecoder(nn.Module):
    """Segmenter ``MaskTransformer`` (reference_method.md §6).

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

        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.cls_emb = nn.Parameter(torch.empty(1, n_classes, d_model))
        norm_layer = partial(nn.LayerNorm, eps=1e-5)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim=d_model,
                    num_heads=n_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=False,
                    proj_drop=dropout,
                    attn_drop=dropout,
                    drop_path=0.0,
                    norm_layer=norm_layer,
                )
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
        """Draw fresh random weights with the reference's init (§6). Uses the global torch RNG.

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
    def forward(self, patch_tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Decode patch tokens into class logits.

        Args:
            patch_tokens: ``(B, h*w, d_encoder)`` encoder patch tokens (CLS dropped).
            grid: ``(h, w)`` patch grid.

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
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, h*w, K), cosine masks (eq. 2)
        logits = masks.transpose(1, 2).reshape(b, self.n_classes, h, w)
        return logits, classes
