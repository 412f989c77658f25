"""One training step of the TransFGU decoder (docs/fidelity.md): the model helpers and the step's work.

* :func:`make_optimizer`, :func:`make_teacher`, :func:`reboot` (teacher <- student, student <- its saved initial
  weights, eq. 10-12), :func:`predict_logits`;
* :func:`draw_dropout`, :func:`step_losses` (teacher + student decoder, targets, eq. 16), :func:`shared_loss` (the
  data-parallel share of the loss);
* :class:`StepKernels`: the step's device work, compiled or eager.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfgu.ddp import step_seed
from transfgu.engine.augment import augment_geometry
from transfgu.engine.targets import Targets, Variant, make_targets
from transfgu.losses import LossTerms, LossWeights, diversity_loss, peer_loss, uncertainty_loss
from transfgu.models.backbone import resize_to_multiple
from transfgu.models.decoder import MaskTransformerDecoder
from transfgu.models.dropout import draw_keep_masks
from transfgu.throughput.compile import CompileMode, compile_function


def make_optimizer(decoder: nn.Module, lr: float, weight_decay: float = 5e-4) -> torch.optim.Adam:
    """Adam with coupled L2 (``weight_decay``) on tensors with ndim >= 2 only, as the reference; no LR schedule."""
    decay, no_decay = [], []
    for p in decoder.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    # fused=True: one kernel for the whole update, and it honours ``found_inf`` (see train_one_epoch), which lets
    # the step rule skip a step on the device instead of reading the loss back on the host every step.
    return torch.optim.Adam(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        fused=True,
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose ``step`` honours a ``found_inf`` tensor (fused Adam/AdamW): the step is then
    skipped on the device, parameters, moments and step count untouched, as when it is not called at all."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups
    )


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy of ``student``."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def reboot(student: nn.Module, teacher: nn.Module, initial_state: Mapping[str, Tensor]) -> None:
    """New round (eq. 10-12): teacher <- copy of the student, student <- the saved initial weights.

    Weights are copied in place, so the optimizer keeps tracking the student's parameters; its Adam moments
    are NOT reset, as in the reference.
    """
    with torch.no_grad():
        teacher.load_state_dict(copy.deepcopy(student.state_dict()))
        student.load_state_dict(initial_state)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


def _decode(decoder: nn.Module, backbone: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        feats = backbone(x)
    return decoder(feats.patch, feats.grid)


@torch.no_grad()
def predict_logits(
    decoder: nn.Module, backbone: nn.Module, images: Tensor, out_hw: tuple[int, int] | None = None
) -> Tensor:
    """Logits ``(B, C, *out_hw)``: decoder on the patch tokens, upsampled bilinearly (align_corners=False).

    ``images`` are ImageNet-normalised; sizes that are not a multiple of the patch size are resized down to
    one first. ``out_hw`` defaults to the input size.
    """
    out_hw = out_hw if out_hw is not None else (int(images.shape[-2]), int(images.shape[-1]))
    ps = int(getattr(backbone, "patch_size", 8))
    if images.shape[-2] % ps or images.shape[-1] % ps:
        images = resize_to_multiple(images, (images.shape[-2], images.shape[-1]), ps)
    logits, _ = _decode(decoder, backbone, images)
    return F.interpolate(logits.float(), size=out_hw, mode="bilinear", align_corners=False)


def draw_dropout(
    student: nn.Module,
    grid: tuple[int, int],
    seed: int | None,
    epoch: int,
    step: int,
    offset: int,
    count: int,
    device: torch.device,
) -> list[Tensor] | None:
    """The student's dropout keep-masks for ``count`` samples at ``offset..`` of step ``step``'s global batch.

    With ``seed`` the masks of the sample at global-batch position ``q`` are drawn from a generator seeded with
    ``step_seed(seed, epoch, step, 1 + q)``: whichever rank holds the sample draws the same masks, so W ranks
    apply the masks one process would, and a resumed run draws those of an uninterrupted one. Without ``seed``
    they come from the global RNG. ``None`` when the student has no active dropout (eval, ``p = 0``) or takes no
    masks.
    """
    dec = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    if not isinstance(dec, MaskTransformerDecoder) or not dec.training or dec.dropout <= 0.0:
        return None
    keys = None if seed is None else [step_seed(seed, epoch, step, 1 + offset + j) for j in range(count)]
    return draw_keep_masks(dec.dropout_shapes(grid[0] * grid[1]), dec.dropout, count, device, keys)


def shared_loss(
    logits: Tensor,
    targets: Targets,
    class_emb: Tensor,
    negative: bool,
    alpha: float,
    variant: Variant,
    weights: LossWeights,
    empty_fg: Literal["zero", "nan"],
    fraction: float,
    fg_total: float | None,
) -> LossTerms:
    """This rank's share of eq. 16 over a global batch; the shares of all ranks sum to :func:`total_loss` of the
    whole batch.

    Every term of eq. 16 is a mean over images (diversity) or over equally sized images' pixels (peer; uncertainty
    in the "thingstuff" variant), so the global mean is ``sum_r fraction_r * mean_r`` with ``fraction_r`` = the
    rank's images / the global batch. The "things" uncertainty is a mean over foreground pixels: its weight is the
    rank's foreground pixels / all of them (``fg_total``, all-reduced by the caller). When the global batch has no
    foreground pixel the term is the definition's (0, or NaN with ``empty_fg="nan"``). With one process,
    ``fraction = 1`` and this is exactly :func:`total_loss`.
    """
    lp = peer_loss(logits, targets.hard, targets.negative if negative else None, alpha)
    ld = diversity_loss(class_emb)
    if targets.fg_mask is None or fg_total is None:
        lu = uncertainty_loss(logits, targets.fg_mask, exclude_channel0=variant == "things", empty_fg=empty_fg)
        w_u = fraction
    elif fg_total > 0:
        lu = uncertainty_loss(logits, targets.fg_mask, exclude_channel0=variant == "things", empty_fg="zero")
        w_u = float(targets.fg_mask.sum()) / fg_total
    else:
        lu = uncertainty_loss(logits, targets.fg_mask, exclude_channel0=variant == "things", empty_fg=empty_fg)
        w_u = fraction
    sp, sd, su = fraction * lp, fraction * ld, w_u * lu
    return LossTerms(total=weights.peer * sp + weights.div * sd + weights.unc * su, peer=sp, diversity=sd,
                     uncertainty=su)


def step_losses(
    student: nn.Module,
    teacher: nn.Module | None,
    patch: Tensor,
    grid: tuple[int, int],
    labels: Tensor,
    perm: Tensor | None,
    variant: Variant,
    t_bg: float,
    mix: float,
    alpha: float,
    weights: LossWeights,
    empty_fg: Literal["zero", "nan"],
    amp_dtype: torch.dtype | None,
    fraction: float = 1.0,
    fg_total: Callable[[Tensor], float] | None = None,
    placeholder: bool = False,
    dropout_keep: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The step's decoder and loss kernels: teacher (no grad) and student on the frozen patch tokens, the targets
    (eq. 12) and eq. 16; returns ``(total, peer, diversity, uncertainty)`` attached to the student's graph.

    One process: ``fraction=1``, ``fg_total=None`` (exactly :func:`total_loss`, nothing read on the host), and
    :class:`StepKernels` may compile it. Data-parallel ranks pass their share and ``fg_total`` (the all-reduced
    foreground count of the "things" variant, :func:`shared_loss`), eagerly. ``dropout_keep``: the student's
    dropout masks (:func:`draw_dropout`), drawn outside so that a compiled graph holds no generator.
    """
    use_teacher = teacher is not None
    with torch.autocast(patch.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        with torch.no_grad():
            teacher_logits = teacher(patch, grid)[0].float() if use_teacher else None
        logits, class_emb = student(patch, grid) if dropout_keep is None else student(patch, grid, dropout_keep)
    targets = make_targets(labels, teacher_logits, variant, t_bg=t_bg, mix=mix, perm=perm)
    if logits.shape[1] != targets.soft.shape[1]:
        raise ValueError(
            f"student has {logits.shape[1]} channels, {variant!r} targets {targets.soft.shape[1]}"
            " (the 'things' variant needs K + 1 decoder channels, channel 0 = background)"
        )
    total_fg = None
    if fg_total is not None and targets.fg_mask is not None:
        if placeholder:  # a data-parallel placeholder image: no foreground of the global batch
            targets.fg_mask = torch.zeros_like(targets.fg_mask)
        total_fg = fg_total(targets.fg_mask)
    terms = shared_loss(
        logits.float(), targets, class_emb.float(), negative=use_teacher, alpha=alpha if use_teacher else 0.0,
        variant=variant, weights=weights, empty_fg=empty_fg, fraction=fraction, fg_total=total_fg,
    )  # fmt: skip
    return terms.total, terms.peer, terms.diversity, terms.uncertainty


class StepKernels:
    """The training step's device work as two functions, compiled (``torch.compile``) or eager.

    * ``geometry`` = :func:`augment_geometry` (normalisation, crop resampling, RoI-Align, flips), and
    * ``losses`` = :func:`step_losses` (teacher + student decoder, targets, eq. 16; the backward of the compiled
      graph is compiled with it).

    The frozen backbone between them is compiled by :func:`transfgu.throughput.compile.compile_forward`; the colour
    augmentation stays eager (host-drawn factors). ``mode`` as ``TRANSFGU_COMPILE`` (default ``auto``: compile on
    CUDA only); a failed compilation logs one warning and runs eagerly from then on. Build one per training run
    (the compiled graphs are cached on it; the alpha schedule adds one graph per distinct alpha).
    Only the one-process step uses them; data-parallel ranks run the eager functions (their loss share needs an
    all-reduce inside the step).
    """

    def __init__(self, device: torch.device | str, mode: CompileMode | None = None,
                 backend: str | Callable[..., Any] | None = None) -> None:
        on_cuda = torch.device(device).type == "cuda"
        self.geometry = compile_function(augment_geometry, mode, on_cuda, backend, "the augmentation geometry")
        self.losses = compile_function(step_losses, mode, on_cuda, backend, "the decoder and losses")

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.geometry, "compiled", False) or getattr(self.losses, "compiled", False))
