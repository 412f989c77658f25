"""Where backbone weights come from: the ``backbone.weights`` string parsed once into a typed value.

``backbone.weights`` accepts ``"none"`` (a random ViT: smoke runs only), ``"timm"`` (the timm hub tag of the
architecture), ``"hub:<timm tag>"`` or a path to a DINO/DINOv2/DINOv3/timm ``.pth``/``.pt``/``.safetensors`` file.
Every module that needs to know which one it is, or whether the backbone is pretrained, asks :func:`parse_source`
(or ``BackboneConfig.source``) instead of comparing strings.

What a file's weights *are* (:func:`weights_prior`: pretrained, the supervised stand-in, fine-tuned from random) is
read here from the file's safetensors metadata, so this module needs neither torch nor the backbone module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SourceKind = Literal["random", "timm", "hub", "file"]

#: What a backbone's weights are, as recorded in metrics, MLflow and reports (``prior``).
PRIOR_RANDOM = "random"
PRIOR_PRETRAINED = "pretrained"
PRIOR_STANDIN = "supervised stand-in"
#: A backbone that Leopart's dense fine-tuning (transfgu.leopart.finetune_stage) started from random weights: it
#: learned from the user's images only, never from DINO's pretraining, so it is never recorded as ``pretrained``.
PRIOR_FINETUNED_RANDOM = "fine-tuned from random"
#: safetensors metadata key that marks what a weights file is (the stand-in prior, a fine-tuned random init).
PRIOR_METADATA_KEY = "transfgu_prior"
#: Values of :data:`PRIOR_METADATA_KEY` that :func:`weights_prior` reports as they are (anything else: pretrained).
MARKED_PRIORS = (PRIOR_STANDIN, PRIOR_FINETUNED_RANDOM)


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


@dataclass(frozen=True)
class BackboneSource:
    """A parsed ``backbone.weights``: its ``kind``, the hub ``tag`` or file ``path``, and whether it is pretrained."""

    kind: SourceKind
    tag: str | None = None
    path: Path | None = None

    @property
    def prior(self) -> str:
        """``random``, ``pretrained`` or a marked prior of a file (:data:`MARKED_PRIORS`)."""
        if self.kind == "random":
            return PRIOR_RANDOM
        if self.kind == "file" and self.path is not None:
            return weights_prior(self.path)
        return PRIOR_PRETRAINED

    @property
    def pretrained(self) -> bool:
        # The stand-in prior was trained with labels: a test fixture, never recorded as pretrained.
        return self.prior == PRIOR_PRETRAINED

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
