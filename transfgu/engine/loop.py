"""The TransFGU decoder's epoch loop and evaluation (as the authors' code; docs/fidelity.md).

* :func:`train_one_epoch`: frozen backbone, teacher on the same crop, eq. 16, the reference step rule (``loss > 0``).
* :func:`evaluate`: bilinear logits at the eval size, one confusion matrix for the split, Hungarian matching.

Randomness comes from an explicit ``torch.Generator`` (CPU), one per step seeded from ``(seed, epoch, step)``
(:mod:`transfgu.ddp`), so a run is reproducible, a resumed run draws what an uninterrupted one would, data-parallel
ranks share every decision, and other users of the global RNG are not disturbed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from transfgu.ddp import all_reduce_sum, batch_piece, step_generator, world_info
from transfgu.engine.augment import ColourMode, apply_augment, draw_step
from transfgu.engine.step import StepKernels, draw_dropout, predict_logits, skips_on_device, step_losses
from transfgu.engine.targets import Variant
from transfgu.losses import EpochPlan, LossTerms, LossWeights
from transfgu.metrics import Overcluster, RunningConfusion
from transfgu.models.backbone import normalize

log = logging.getLogger(__name__)


def train_one_epoch(
    student: nn.Module,
    teacher: nn.Module | None,
    backbone: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    schedule_state: EpochPlan,
    device: torch.device | str,
    loss_weights: LossWeights = LossWeights(),  # noqa: B008 (frozen dataclass)
    variant: Variant = "thingstuff",
    clamp_grad: float | None = 1.0,
    skip_nonpositive: bool = True,
    generator: torch.Generator | None = None,
    log_every: int = 50,
    colour_mode: ColourMode = "batch",
    t_bg: float = 0.1,
    mix: float = 0.5,
    empty_fg: Literal["zero", "nan"] = "zero",
    amp_dtype: torch.dtype | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    kernels: StepKernels | None = None,
) -> dict[str, float]:
    """One epoch of decoder training on frozen patch tokens; data-parallel ranks train as one process.

    Each batch ``{"image": uint8 (B,3,H,W), "pseudo": float (B,K,h,w), ...}`` is augmented
    (:func:`augment_batch`), the frozen backbone embeds the crops under ``no_grad``, the teacher (eval mode,
    when ``schedule_state.bootstrapping``) predicts on the same crops, and the student is trained with eq. 16
    at ``alpha = schedule_state.alpha``.

    Randomness: with ``seed`` every step ``i`` draws its augmentation and class permutation from
    :func:`transfgu.ddp.step_generator` ``(seed, epoch, i)`` and the dropout masks of the sample at global-batch
    position ``q`` from a seed of ``(seed, epoch, i, 1 + q)`` (:func:`draw_dropout`); otherwise everything is drawn
    from ``generator`` (and dropout from the global RNG).

    Data parallelism (a ``torch.distributed`` group of W > 1 ranks; the student wrapped in DDP; ``seed`` required;
    batches from :func:`transfgu.ddp.step_loader`): each rank draws the decisions of the whole global batch and
    uses its slice, computes its share of the global loss (:func:`shared_loss`), and one ``all_reduce`` gives
    every rank the global loss, so all ranks take the same step decision (see :mod:`transfgu.ddp`).

    Step rule: with ``skip_nonpositive`` (reference) the optimizer steps only if the loss is > 0, which
    also skips NaN; without it, only non-finite losses are skipped. Gradients are clamped element-wise to
    ``[-clamp_grad, clamp_grad]`` (value clipping, not norm clipping). Reboots are the caller's job
    (:func:`reboot`). ``on_step`` receives a dict per step (global loss, decision, draws, dataset indices).

    ``kernels``: the step's device functions (:class:`StepKernels`, compiled or not; default: eager). With one
    process, fused Adam and no ``on_step``, a step reads nothing back from the device: the step rule is decided on
    the device, the loss sums stay there, and the host reads them at ``log_every`` and at the end only.

    Returns the means over batches of the global ``loss``, ``peer``, ``diversity``, ``uncertainty`` (finite
    values only), plus ``steps``, ``skipped``, ``batches``, ``alpha``, ``images`` (global) and ``seconds``.
    """
    device = torch.device(device)
    plan = schedule_state
    use_teacher = plan.bootstrapping
    if use_teacher and teacher is None:
        raise ValueError("a teacher is required for a bootstrapping epoch")
    rank, world = world_info()
    if world > 1:
        if seed is None:
            raise ValueError("data-parallel training needs seed= (every rank must draw the same decisions)")
        if not isinstance(student, nn.parallel.DistributedDataParallel):
            raise ValueError("data-parallel training needs the student wrapped in DistributedDataParallel")
    student.train()
    backbone.eval()
    if teacher is not None:
        teacher.eval()
    ps = int(getattr(backbone, "patch_size", 8))
    params = [p for p in student.parameters() if p.requires_grad]
    sums = {"loss": 0.0, "peer": 0.0, "diversity": 0.0, "uncertainty": 0.0}
    n_finite = n_batches = n_steps = n_skipped = n_images = 0
    # One process, no per-step callback, fused Adam: the step rule is decided on the device (found_inf) and the
    # running sums stay there, so a step never waits for the GPU (read back at log_every and at the end only).
    # Data-parallel ranks keep the host decision: it comes with the loss all-reduce every rank must agree on.
    on_device = world == 1 and on_step is None and skips_on_device(optimizer)
    kernels = kernels or StepKernels(device, mode="off")
    dev_sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, peer, diversity, uncertainty (finite)
    dev_counts = torch.zeros(2, dtype=torch.int64, device=device)  # finite losses, steps taken
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            break
        images = batch["image"].to(device, non_blocking=True)
        pseudo = batch["pseudo"].to(device, non_blocking=True).float()
        offset, n_real, global_b = batch_piece(batch, images.shape[0])
        c = pseudo.shape[1] + (variant == "things")  # target channels: the permutation's size
        g = step_generator(seed, plan.epoch, i) if seed is not None else generator
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        draws = draw_step(global_b, hw, g, c, colour_mode)
        mine = draws.piece(offset, images.shape[0]) if n_real else draws.piece(0, images.shape[0])
        if world == 1:
            crops, labels = apply_augment(images, pseudo, mine, patch_size=ps, geometry=kernels.geometry)
        else:
            crops, labels = apply_augment(images, pseudo, mine, patch_size=ps)
        amp_on = amp_dtype is not None
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_on), torch.no_grad():
            feats = backbone(crops)
        keep = draw_dropout(student, feats.grid, seed, plan.epoch, i, offset, images.shape[0], device)
        # The permutation is drawn on the CPU generator; the compiled kernels get it on the step's device, so no
        # graph has an input on another device (an exact copy: argsort of a permutation is the same anywhere).
        perm = mine.perm.to(device, non_blocking=True) if mine.perm is not None else None
        common = dict(variant=variant, t_bg=t_bg, mix=mix, alpha=plan.alpha, weights=loss_weights,
                      empty_fg=empty_fg, amp_dtype=amp_dtype, dropout_keep=keep)  # fmt: skip
        if world == 1:  # the whole batch: no share, no foreground all-reduce (nothing read on the host)
            total, peer_t, div_t, unc_t = kernels.losses(
                student, teacher if use_teacher else None, feats.patch, feats.grid, labels, perm, **common,
                fraction=n_real / global_b,
            )  # fmt: skip
        else:
            total, peer_t, div_t, unc_t = step_losses(
                student, teacher if use_teacher else None, feats.patch, feats.grid, labels, perm, **common,
                fraction=n_real / global_b, placeholder=not n_real,
                fg_total=lambda m: float(all_reduce_sum(m.sum().double().reshape(1), device)[0]),
            )  # fmt: skip
        terms = LossTerms(total=total, peer=peer_t, diversity=div_t, uncertainty=unc_t)
        if on_device:
            loss_t = terms.total.detach()
            finite = torch.isfinite(loss_t)
            ok = (loss_t > 0) if skip_nonpositive else finite  # NaN > 0 is False: NaN is skipped too
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()  # always; a skipped step is dropped inside the fused update
            if clamp_grad is not None:
                torch.nn.utils.clip_grad_value_(params, clamp_grad)
            optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]
            vals = torch.stack([loss_t, terms.peer.detach(), terms.diversity.detach(), terms.uncertainty.detach()])
            dev_sums += torch.where(finite, vals.double(), 0.0)
            dev_counts += torch.stack([finite, ok]).long()
            n_batches += 1
            n_images += n_real
            if log_every and (i + 1) % log_every == 0:
                log.info(
                    "epoch %d step %d loss %.4f (peer %.4f div %.4f unc %.4f) skipped %d",
                    plan.epoch, i + 1, *(float(v) for v in vals), n_batches - int(dev_counts[1]),
                )  # fmt: skip
            continue
        # One all-reduce of the shares: every rank gets the global loss and takes the same decision.
        parts = torch.stack([terms.total, terms.peer, terms.diversity, terms.uncertainty]).detach().double().cpu()
        reduced = all_reduce_sum(torch.cat([parts, torch.tensor([float(n_real)], dtype=torch.float64)]), device)
        loss_value, peer, div, unc, n_global = (float(v) for v in reduced)
        do_step = loss_value > 0 if skip_nonpositive else math.isfinite(loss_value)
        optimizer.zero_grad(set_to_none=True)
        if do_step:
            # DDP averages gradients over ranks: W x the share makes the average the gradient of the sum.
            (terms.total * world if world > 1 else terms.total).backward()
            if clamp_grad is not None:
                torch.nn.utils.clip_grad_value_(params, clamp_grad)
            optimizer.step()
            n_steps += 1
        else:
            n_skipped += 1
        n_batches += 1
        n_images += int(n_global)
        if math.isfinite(loss_value):
            n_finite += 1
            sums["loss"] += loss_value
            sums["peer"] += peer
            sums["diversity"] += div
            sums["uncertainty"] += unc
        if on_step is not None:
            on_step({
                "epoch": plan.epoch, "step": i, "loss": loss_value, "stepped": do_step, "images": int(n_global),
                "perm": draws.perm.tolist() if draws.perm is not None else None,
                "colours": [dataclasses.asdict(d) for d in draws.colours], "boxes": draws.boxes.tolist(),
                "flip": draws.flip.tolist(),
                "indices": [int(x) for x in batch["index"]] if "index" in batch and n_real else [],
                "offset": offset,
            })  # fmt: skip
        if log_every and (i + 1) % log_every == 0:
            log.info(
                "epoch %d step %d loss %.4f (peer %.4f div %.4f unc %.4f) skipped %d",
                plan.epoch, i + 1, loss_value, peer, div, unc, n_skipped,
            )  # fmt: skip
    if on_device:
        fin, taken = (int(c) for c in dev_counts.tolist())
        for k, v in zip(("loss", "peer", "diversity", "uncertainty"), dev_sums.tolist()):
            sums[k] += v
        n_finite, n_steps, n_skipped = n_finite + fin, n_steps + taken, n_skipped + n_batches - taken
    out = {k: (v / n_finite if n_finite else float("nan")) for k, v in sums.items()}
    out.update(
        steps=float(n_steps),
        skipped=float(n_skipped),
        batches=float(n_batches),
        alpha=float(plan.alpha),
        images=float(n_images),
        seconds=time.perf_counter() - t0,
    )
    return out


# -- evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    decoder: nn.Module,
    backbone: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    n_clusters: int,
    n_classes: int,
    device: torch.device | str,
    eval_hw: tuple[int, int] | None = None,
    ignore_index: int | None = -1,
    class_names: Sequence[str] | None = None,
    overcluster: Overcluster = "hungarian",
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Whole-split evaluation (reference): one confusion matrix over all batches, then one cluster-to-class matching.

    Batches are ``{"image": uint8 (B,3,H,W), "label": int64 (B,H,W)}``. With ``eval_hw`` set and different
    from the batch size, images are resized bilinearly and labels with nearest (the reference's protocol);
    metrics are computed at ``eval_hw``. Labels outside ``[0, n_classes)`` or equal to ``ignore_index`` are
    ignored.

    Returns :func:`transfgu.metrics.segmentation_scores` plus ``confusion``, the ``(n_classes, n_clusters)``
    array.
    """
    device = torch.device(device)
    was_training = decoder.training
    decoder.eval()
    backbone.eval()
    running = RunningConfusion(n_classes, n_clusters, ignore_index=ignore_index)
    try:
        for batch in loader:
            images = batch["image"].to(device)
            labels = batch["label"].to(device).long()
            x = normalize(images)
            hw = (int(x.shape[-2]), int(x.shape[-1])) if eval_hw is None else tuple(eval_hw)
            if (x.shape[-2], x.shape[-1]) != hw:
                x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
            if (labels.shape[-2], labels.shape[-1]) != hw:
                labels = F.interpolate(labels[:, None].float(), size=hw, mode="nearest")[:, 0].long()
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
            ):
                logits = predict_logits(decoder, backbone, x, hw)
            if logits.shape[1] != n_clusters:
                raise ValueError(
                    f"decoder gives {logits.shape[1]} channels, expected n_clusters={n_clusters}"
                )
            running.update(labels, logits.argmax(dim=1))
    finally:
        decoder.train(was_training)
    scores = running.scores(class_names=class_names, overcluster=overcluster)
    scores["confusion"] = running.conf.copy()
    return scores
