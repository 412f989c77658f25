"""Where backbone weights come from: the ``backbone.weights`` string parsed once into a typed value.

``backbone.weights`` accepts ``"none"`` (a random ViT: smoke runs only), ``"timm"`` (the timm hub tag of the
architecture), ``"hub:<timm tag>"`` or a path to a DINO/timm ``.pth``/``.pt``/``.safetensors`` file. Every module
that needs to know which one it is, or whether the backbone is pretrained, asks :func:`parse_source` (or
``BackboneConfig.source``) instead of comparing strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SourceKind = Literal["random", "timm", "hub", "file"]


@dataclass(frozen=True)
class BackboneSource:
    """A parsed ``backbone.weights``: its ``kind``, the hub ``tag`` or file ``path``, and whether it is pretrained."""

    kind: SourceKind
    tag: str | None = None
    path: Path | None = None

    @property
    def prior(self) -> str:
        """``random``, ``pretrained`` or ``supervised stand-in`` (a file marked by transfgu.tools.standin_prior)."""
        if self.kind == "random":
            return "random"
        if self.kind == "file" and self.path is not None:
            from transfgu.models.backbone import weights_prior

            return weights_prior(self.path)
        return "pretrained"

    @property
    def pretrained(self) -> bool:
        # The stand-in prior was trained with labels: a test fixture, never recorded as pretrained.
        return self.prior == "pretrained"

    @property
    def spec(self) -> str:
        """Back to the ``backbone.weights`` string (a file as an absolute path)."""
        if self.kind == "random":
            return "none"
        if self.kind == "timm":
            return "timm"
        if self.kind == "hub":
            return f"hub:{self.tag}"
        return str(self.path)


def parse_source(weights: str | Path, base: Path | None = None) -> BackboneSource:
    """Parse ``backbone.weights``; a relative file path is made absolute against ``base`` (default: the cwd)."""
    w = str(weights)
    if w == "none":
        return BackboneSource("random")
    if w == "timm":
        return BackboneSource("timm")
    if w.startswith("hub:"):
        return BackboneSource("hub", tag=w[4:])
    p = Path(w).expanduser()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    return BackboneSource("file", path=p.resolve())
