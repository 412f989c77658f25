"""The ``finetune`` stage of ``method: leopart_finetune``: Leopart's dense fine-tuning loop, defined once and run by
either executor (this process, or Ray Train workers in :mod:`transfgu.distributed.finetune_stage`).

Outputs (``<run>/finetune/``):

* ``epoch_<e>/`` -- the resumable training state after epoch ``e`` (:func:`transfgu.checkpoint.save_train_state`:
  student and teacher (backbone + head), Adam moments, the queue, RNG; ``state.json`` written last marks it
  complete and records the stage's input hash). The two latest are kept; a re-run resumes from the latest state of
  the same input hash, a state of other settings is never resumed from.
* ``backbone.safetensors`` -- the fine-tuned ViT (teacher by default) in the timm/DINO key layout: give it to any
  run as ``backbone.weights=<path>``. Its safetensors metadata records the source weights and the fine-tuning
  settings (and keeps the supervised stand-in mark when the source was the stand-in: derived weights still carry
  its labels).
* ``finetune.json`` -- source weights, architecture, the ``finetune`` config, input hash, per-epoch history.

Data-parallel: W ranks are the one-process training (the rule of :mod:`transfgu.ddp`). Every rank takes its
contiguous slice of the one-process global batch with the same per-image crop draws (a pure function of seed, epoch
and image index); Sinkhorn-Knopp's shift, mass and row sums are all-reduced (SwAV's distributed Sinkhorn), the
queue is filled with the global batch's picked embeddings in global order (one draw per global step), the loss is
each rank's share of the global-batch mean and the logged loss and cluster usage are global.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfgu.checkpoint import load_optimizer, load_train_state, read_state_info, restore_rng, save_train_state
from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.ddp import all_reduce_sum, batch_piece, step_generator, step_loader, step_seed, world_info
from transfgu.leopart import finetune_parts as ft
from transfgu.models.backbone import (
    PRIOR_FINETUNED_RANDOM,
    PRIOR_METADATA_KEY,
    PRIOR_RANDOM,
    PRIOR_STANDIN,
    DinoViT,
    normalize,
)
from transfgu.store import atomic_write_json, fix_mode

log = logging.getLogger("transfgu")

STAGES = ("finetune",)
BACKBONE_OUT = "backbone.safetensors"
INFO_FILE = "finetune.json"
PICTURES = "before_after.png"
#: safetensors metadata key of a fine-tuned backbone: JSON with its source and settings.
FINETUNE_METADATA_KEY = "transfgu_finetune"


def crop_spec(cfg: Config) -> ft.CropSpec:
    f = cfg.finetune
    return ft.CropSpec(n_global=f.n_global, n_local=f.n_local, global_size=f.global_size, local_size=f.local_size,
                       global_scale=tuple(f.global_scale), local_scale=tuple(f.local_scale),
                       min_intersection=f.min_intersection, global_overlap=f.global_overlap)


def augmentation(cfg: Config) -> nn.Module:
    """The photometric augmentation of every crop (``finetune.jitter``, ``jitter_p``, ``blur_kernel``)."""
    f = cfg.finetune
    return ft.photometric(f.jitter, f.jitter_p, blur_kernel=f.blur_kernel)


# -- data -----------------------------------------------------------------------------------------------------------
def decode_training_images(cfg: Config, errors: Any) -> tuple[list[np.ndarray], list[str]]:
    """The training split's images, decoded once and shrunk to ``finetune.max_side``; unreadable ones are recorded
    (``errors.jsonl``) and skipped within ``run.error_budget``."""
    from PIL import Image

    from transfgu.data.loaders import split_records
    from transfgu.errors import check_error_budget, decode_images

    records = split_records(cfg, cfg.data.train_split)
    images, ids = [], []
    for rec, im in decode_images(records, errors, "finetune"):
        h, w = im.shape[:2]
        s = cfg.finetune.max_side / max(h, w)
        if s < 1:
            im = np.asarray(Image.fromarray(im).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                       Image.BILINEAR))
        images.append(im)
        ids.append(rec.image_id)
    check_error_budget(len(records) - len(images), len(records), cfg.run.error_budget, "finetune")
    if not images:
        raise RuntimeError("finetune: no training image could be read")
    return images, ids


class MultiCropDataset(torch.utils.data.Dataset):
    """Item ``i``: the global and local crops of image ``i`` (augmented, ImageNet-normalised) and their boxes.

    The crop boxes and the photometric draws are a pure function of ``(seed, epoch, i)``, so every rank and a
    resumed run see the same crops (set :attr:`epoch` before each epoch).
    """

    def __init__(self, images: Sequence[np.ndarray], spec: ft.CropSpec, seed: int,
                 augment: nn.Module | None = None) -> None:
        self.images, self.spec, self.seed = list(images), spec, seed
        self.epoch = 0
        self.augment = augment if augment is not None else ft.photometric()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        img = torch.from_numpy(np.array(self.images[i], dtype=np.uint8, copy=True)).permute(2, 0, 1)  # uint8 (3, H, W)
        h, w = img.shape[-2:]
        g = step_generator(self.seed, self.epoch, i, stream=17)
        boxes = ft.sample_multicrop_boxes(h, w, self.spec, g)
        crops = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(self.seed, self.epoch, i, stream=18))
            for c, b in enumerate(boxes.tolist()):
                size = self.spec.global_size if c < self.spec.n_global else self.spec.local_size
                x0, y0, x1, y1 = (int(v) for v in b)
                crop = F.interpolate(img[None, :, y0:y1, x0:x1].float(), size=(size, size), mode="bilinear",
                                     align_corners=False, antialias=True).round().clamp(0, 255).to(torch.uint8)[0]
                crops.append(normalize(self.augment(crop)))  # no flips: a crop must agree with its box
        ng = self.spec.n_global
        out = {"global": torch.stack(crops[:ng]), "boxes": boxes}
        out["local"] = torch.stack(crops[ng:]) if len(crops) > ng else torch.zeros(0, 3, self.spec.local_size,
                                                                                  self.spec.local_size)
        return out


def make_loader(images: Sequence[np.ndarray], cfg: Config, rank: int = 0, world: int = 1) -> Any:
    ds = MultiCropDataset(images, crop_spec(cfg), cfg.finetune.seed, augmentation(cfg))

    def on_epoch(sampler: Any) -> None:
        ds.epoch = sampler.epoch

    return step_loader(ds, cfg.finetune.batch_size, cfg.finetune.seed, rank, world, on_epoch=on_epoch)


# -- model ----------------------------------------------------------------------------------------------------------
class DenseModel(nn.Module):
    """Backbone + projection head; ``forward(x)`` gives unit embeddings and prototype scores on the patch grid, the
    grid and the last block's CLS attention ``(B, heads, h*w)``."""

    def __init__(self, backbone: DinoViT, head: ft.ProjectionHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int], Tensor]:
        f = self.backbone(x)
        z, s = self.head(f.patch)  # (B, h*w, out), (B, h*w, K)
        return z, s, f.grid, f.attn_cls


def build_models(cfg: Config, backbone: DinoViT) -> tuple[DenseModel, DenseModel]:
    """Student (trainable, with ``finetune.drop_path`` stochastic depth) and teacher (an EMA copy without it, never
    trained by gradients)."""
    f = cfg.finetune
    torch.manual_seed(f.seed)
    head = ft.ProjectionHead(backbone.embed_dim, f.hidden_dim, f.out_dim, f.n_prototypes)
    backbone.train()
    for p in backbone.parameters():
        p.requires_grad_(True)
    for p in ft.frozen_first_blocks(backbone, f.train_blocks):
        p.requires_grad_(False)
    student = DenseModel(backbone, head)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    if f.drop_path > 0:
        ft.install_drop_path(student.backbone.vit, f.drop_path)  # modules without parameters: the EMA is unchanged
    return student, teacher


def build_source(cfg: Config, backbone: DinoViT) -> DinoViT | None:
    """A frozen copy of the source backbone when ``finetune.fg_attention: source`` (its attention gives the
    foreground all along), else None. Call before training moves the backbone."""
    f = cfg.finetune
    if f.loss_mask != "foreground" or f.fg_attention != "source":
        return None
    src = copy.deepcopy(backbone).eval()
    for p in src.parameters():
        p.requires_grad_(False)
    return src


def make_finetune_optimizer(cfg: Config, student: DenseModel) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, the authors' code) or Adam (L2 in the gradient) over :func:`ft.param_groups`
    (the schedule sets every group's lr and the decayed groups' weight decay each step)."""
    f = cfg.finetune
    groups = ft.param_groups(student.backbone, student.head, f.lr_backbone, f.lr_head, f.decay_tokens)
    return torch.optim.AdamW(groups) if f.optimizer == "adamw" else torch.optim.Adam(groups)


def make_queues(cfg: Config) -> ft.CropQueues:
    f = cfg.finetune
    return ft.CropQueues(f.n_global, f.queue_length, f.out_dim)


def _maps(s: Tensor, grid: tuple[int, int], n: int) -> list[Tensor]:
    """``(n*B, h*w, K)`` scores of ``n`` crops per image -> ``n`` maps ``(B, K, h, w)``."""
    h, w = grid
    k = s.shape[-1]
    s = s.view(-1, n, h, w, k).permute(1, 0, 4, 2, 3)
    return list(s.unbind(0))


def _forward_crops(model: nn.Module, crops: Tensor) -> tuple[Tensor, Tensor, tuple[int, int], Tensor]:
    """All crops of one size of a batch ``(B, n, 3, S, S)`` in one pass, crop-major within each image."""
    return model(crops.flatten(0, 1))


def finetune_one_epoch(
    student: nn.Module, teacher: DenseModel, head: ft.ProjectionHead, optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader[dict[str, Tensor]], queues: ft.CropQueues, cfg: Config, epoch: int,
    steps_per_epoch: int, device: torch.device,
    on_step: Callable[[dict[str, float]], None] | None = None, source: nn.Module | None = None,
) -> dict[str, float]:
    """One epoch of Leopart's loss; returns the epoch means of loss, cluster-usage entropy, momentum and lr.

    ``student`` may be the DDP-wrapped :class:`DenseModel`; ``head`` is its (unwrapped) projection head. Per global
    crop ``j``: Sinkhorn-Knopp over the teacher's scores of crop ``j`` and queue ``j`` (scored with the student's
    prototypes); with ``loss_mask: foreground`` the foreground patches of crop ``j`` (the teacher's -- or
    ``source``'s -- CLS attention, top ``fg_mass``) mask the loss of every pair targeting ``j`` and are the only
    rows pushed to queue ``j`` (``queue_push`` per step, picked over the global batch).

    With a process group the W ranks are the one-process training (:mod:`transfgu.ddp`): each rank holds its
    contiguous piece of the global batch, Sinkhorn-Knopp runs over the global batch (row sums all-reduced), each
    queue gets the global batch's picked embeddings in global order (so every rank holds the one-process queues),
    the student's drop-path decisions are drawn for the global batch from the step's seed, and the loss is each
    rank's share of the global-batch mean (DDP's gradient average then gives one process's gradient).
    ``on_step`` gets ``epoch``, ``step``, ``loss`` (global) and ``usage_entropy`` (global) of every step.
    """
    f = cfg.finetune
    total = f.epochs * steps_per_epoch
    _, world = world_info()
    sums: dict[str, float] = {"loss": 0.0, "usage_entropy": 0.0, "momentum": 0.0, "lr_head": 0.0}
    n = 0
    masked = f.loss_mask == "foreground"
    drops = ft.drop_path_modules(student)
    loader.batch_sampler.set_epoch(epoch)
    for it, batch in enumerate(loader):
        step = epoch * steps_per_epoch + it
        ft.set_schedules(optimizer, step, total, f.weight_decay[0], f.weight_decay[1])
        head.normalize_prototypes()
        glob = batch["global"].to(device)
        loc = batch["local"].to(device)
        boxes = batch["boxes"].to(device)
        bsz, ng = glob.shape[0], glob.shape[1]
        # offset of this piece in the global batch, its real images (0: a placeholder that only joins the
        # collectives, weight 0), the global batch size
        offset, real, gsize = batch_piece(batch, bsz)
        weight = (torch.as_tensor(batch["real"]).float() if "real" in batch else torch.ones(bsz)).to(device)
        with torch.no_grad():
            z_t, s_t, grid_t, a_t = _forward_crops(teacher, glob)
            n_p, k = s_t.shape[1], s_t.shape[-1]
            fg = None
            if masked:
                attn = source(glob.flatten(0, 1)).attn_cls if source is not None else a_t
                fg = ft.attention_foreground(attn, f.fg_mass).view(bsz, ng, n_p)
            z_t = z_t.view(bsz, ng, n_p, -1)
            s_t = s_t.view(bsz, ng, n_p, k)
            protos = head.prototypes.weight.detach()  # the student's (unit) prototypes score the queues
            assigned = sinkhorn_per_crop(s_t[:real], queues, protos, f.sinkhorn_eps, f.sinkhorn_iters)
            targets, counts = [], s_t.new_zeros(k)
            for j in range(ng):
                qj, q = queues[j], assigned[j]
                q_all = s_t.new_zeros(bsz * n_p, k)
                q_all[: q.shape[0]] = q
                targets.append(q_all.view(bsz, *grid_t, k).permute(0, 3, 1, 2))
                if q.shape[0]:
                    counts = counts + ft.usage_counts(q)
                _push_global(qj, z_t[:real, j], None if fg is None else fg[:real, j], offset, gsize, f.queue_push,
                             step_generator(f.seed, epoch, it, 19 + j))
            counts = all_reduce_sum(counts)
            fg_maps = None if fg is None else [fg[:, j].view(bsz, 1, *grid_t).float() for j in range(ng)]
        u = _drop_path_draws(drops, f.seed, epoch, it, offset, bsz, gsize, ng + loc.shape[1])
        ft.set_drop_path_draws(drops, None if u is None else u[:, :ng].reshape(bsz * ng, -1))
        _, s_g, grid_g, _ = _forward_crops(student, glob)
        preds = _maps(s_g, grid_g, f.n_global)
        if f.n_local > 0:
            ft.set_drop_path_draws(drops, None if u is None else u[:, ng:].reshape(-1, len(drops)))
            _, s_l, grid_l, _ = _forward_crops(student, loc)
            preds += _maps(s_l, grid_l, f.n_local)
        ft.set_drop_path_draws(drops, None)
        each = ft.cluster_loss(preds, targets, boxes, f.n_global, f.temperature, f.align_size, per_image=True,
                               foreground=fg_maps)
        share = (each * weight).sum() / gsize  # this rank's part of the global-batch mean
        optimizer.zero_grad(set_to_none=True)
        (share * world).backward()  # DDP averages over the W ranks: the gradient of the sum of the shares
        optimizer.step()
        m = ft.ema_momentum(step, total, f.momentum)
        ft.ema_update(teacher, student.module if hasattr(student, "module") else student, m)
        loss = float(all_reduce_sum(share.detach().clone()))
        usage = ft.entropy_of_counts(counts)
        if on_step is not None:
            on_step({"epoch": epoch, "step": it, "loss": loss, "usage_entropy": usage})
        sums["loss"] += loss
        sums["usage_entropy"] += usage
        sums["momentum"] += m
        sums["lr_head"] += max(g["lr"] for g in optimizer.param_groups if g["name"].startswith("head"))
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def sinkhorn_per_crop(scores: Tensor, queues: ft.CropQueues, prototypes: Tensor, eps: float,
                      n_iters: int) -> list[Tensor]:
    """Sinkhorn-Knopp run separately for each global crop (the authors' code): crop ``j``'s batch is the teacher's
    scores of crop ``j`` (``scores`` ``(B, n_global, n, K)``, every image and patch of this rank, all-reduced over
    the ranks) plus queue ``j`` scored with ``prototypes`` (once it is full). Returns ``(B * n, K)`` per crop."""
    k = scores.shape[-1]
    out = []
    for j in range(scores.shape[1]):
        qj = queues[j]
        shared = qj.data.to(scores.device) @ prototypes.t() if qj.full else None
        out.append(ft.sinkhorn_knopp(scores[:, j].reshape(-1, k), eps, n_iters, shared=shared, distributed=True))
    return out


def _drop_path_draws(drops: Sequence[nn.Module], seed: int, epoch: int, it: int, offset: int, bsz: int, gsize: int,
                     n_crops: int) -> Tensor | None:
    """Uniforms ``(bsz, n_crops, len(drops))`` of this piece's images: one draw per global step over the global
    batch (so every rank's student drops what one process's drops), sliced at the piece's offset."""
    if not drops:
        return None
    u = torch.rand(gsize, n_crops, len(drops), generator=step_generator(seed, epoch, it, 23))
    piece = u[offset : offset + bsz]
    if piece.shape[0] < bsz:  # a placeholder image (weight 0): keep everything
        piece = torch.cat([piece, torch.ones(bsz - piece.shape[0], n_crops, len(drops))])
    return piece


@torch.no_grad()
def _push_global(queue: ft.EmbeddingQueue, z: Tensor, fg: Tensor | None, offset: int, gsize: int, n_push: int,
                 g: torch.Generator) -> None:
    """Push ``n_push`` of the *global* batch's rows of one global crop -- its foreground patches' teacher embeddings
    (``fg`` ``(real, n)`` bool; ``None``: every patch) -- picked by one draw of ``g`` over the global rows (image
    by image in global order, patches in grid order), in that order.

    This rank's images are ``offset .. offset + real`` of the global batch (``z``: ``(real, n, d)``). The rows per
    image are summed over the ranks (one slot per global image) to place this rank's rows among the global ones;
    each rank fills the picked rows it holds, the others stay 0, and one all-reduce sum assembles them exactly
    (``x + 0 = x``). Every rank then pushes the rows one process pushes."""
    real, n = z.shape[0], z.shape[1]
    mine_rows = z[fg] if fg is not None else z.reshape(-1, z.shape[-1])  # (count, d), image-major
    per_image = torch.zeros(gsize + 1, dtype=torch.float64)
    per_image[offset : offset + real] = (fg.sum(dim=1) if fg is not None else torch.full((real,), n)).double().cpu()
    per_image = all_reduce_sum(per_image, device=z.device)[:gsize]
    starts = torch.cumsum(per_image, 0) - per_image
    total_rows = int(per_image.sum())
    lo = int(starts[offset]) if offset < gsize and real else 0
    pick = torch.randperm(total_rows, generator=g)[:n_push].to(z.device)
    mine = (pick >= lo) & (pick < lo + mine_rows.shape[0])
    rows = z.new_zeros(pick.shape[0], z.shape[-1])
    rows[mine] = mine_rows[pick[mine] - lo]
    queue.push(all_reduce_sum(rows).cpu())


# -- checkpoints ----------------------------------------------------------------------------------------------------
def state_dir(out: Path, epoch: int) -> Path:
    return out / f"epoch_{epoch:03d}"


def latest_state(out: Path, input_hash: str) -> Path | None:
    """The latest complete training state of ``input_hash`` under ``<run>/finetune`` (None when none)."""
    done = [(info["epoch"], p) for p in Path(out).glob("epoch_*") if (info := read_state_info(p)) is not None
            and info.get("input_hash") == input_hash]
    return max(done, key=lambda t: t[0])[1] if done else None


def _prune(out: Path, input_hash: str, keep: int = 2) -> None:
    """Drop all but the ``keep`` latest states of ``input_hash`` (states of other settings are left alone)."""
    dirs = sorted(p for p in out.glob("epoch_*") if (info := read_state_info(p)) is not None
                  and info.get("input_hash") == input_hash)
    for p in dirs[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def set_aside_other_settings(out: Path, input_hash: str) -> list[Path]:
    """Move epoch states and outputs written under another input hash to ``<run>/_stale/finetune/<hash12>/``
    (never deleted, never resumed from, never read as this run's result)."""
    from transfgu import integrity

    moved = []
    for p in sorted(out.glob("epoch_*")):
        info = read_state_info(p)
        h = info.get("input_hash") if info else None
        if h != input_hash:
            moved.append(integrity.set_aside(p, out.parent, "finetune", h, "state of other settings"))
    if (out / INFO_FILE).is_file():
        h = integrity.read_json_stamp(out / INFO_FILE)
        if h != input_hash:
            for name in (INFO_FILE, BACKBONE_OUT, other_backbone_file("teacher"), other_backbone_file("student"),
                         PICTURES):
                if (out / name).exists():
                    moved.append(integrity.set_aside(out / name, out.parent, "finetune", h, "output of other settings"))
    return moved


def finetuned_prior(source_prior: str | None) -> str | None:
    """The prior mark of a fine-tuned backbone: the stand-in stays the stand-in, a random init becomes
    ``fine-tuned from random`` (never ``pretrained``), a pretrained source needs no mark."""
    if source_prior in (PRIOR_RANDOM, PRIOR_FINETUNED_RANDOM):
        return PRIOR_FINETUNED_RANDOM
    if source_prior == PRIOR_STANDIN:
        return PRIOR_STANDIN
    return None


def save_finetuned_backbone(model: DenseModel, path: Path, meta: dict[str, Any], prior: str | None) -> None:
    """The backbone's state dict in timm/DINO key layout, with the fine-tuning record (and the prior mark of
    :func:`finetuned_prior`) in the file's metadata."""
    import os

    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.backbone.vit.state_dict().items()}
    md = {FINETUNE_METADATA_KEY: json.dumps(meta, sort_keys=True)}
    if prior is not None:
        md[PRIOR_METADATA_KEY] = prior
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=md)
    fix_mode(tmp)  # safetensors writes 0600; the umask decides
    os.replace(tmp, path)


def other_backbone_file(export: str) -> str:
    """File name of the network not exported as ``backbone.safetensors``: ``backbone_<teacher|student>``."""
    return f"backbone_{'student' if export == 'teacher' else 'teacher'}.safetensors"


def backbone_from_state(state: Path, which: str = "student") -> dict[str, Tensor]:
    """The ``student`` or ``teacher`` ViT of an epoch state, in timm/DINO key layout."""
    groups, _ = load_train_state(Path(state))
    pre = "backbone.vit."
    return {k[len(pre):]: v for k, v in groups[which].items() if k.startswith(pre)}


def finetune(
    cfg: Config, backbone: DinoViT, images: Sequence[np.ndarray], out: Path, input_hash: str, device: torch.device,
    rank: int = 0, world: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None, source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume) every epoch; rank 0 writes the epoch states and, at the end, the backbone file.

    ``wrap`` makes the DDP model (Ray Train's ``prepare_model``); ``on_epoch(metrics)`` gets every epoch's metrics
    (``epoch``, ``loss``, ``usage_entropy``, ``momentum``, ``lr_head``) after its state is on disk.
    """
    f = cfg.finetune
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        set_aside_other_settings(out, input_hash)
    source_model = build_source(cfg, backbone)
    if source_model is not None:
        source_model.to(device)
    student, teacher = build_models(cfg, backbone)
    student.to(device)
    teacher.to(device)
    optimizer = make_finetune_optimizer(cfg, student)
    queue = make_queues(cfg)
    history: list[dict[str, float]] = []
    start = 0
    latest = latest_state(out, input_hash)
    if latest is not None:
        groups, info = load_train_state(latest)
        student.load_state_dict(groups["student"])
        teacher.load_state_dict(groups["teacher"])
        load_optimizer(optimizer, groups["opt"], info["optimizer"])
        queue.load(groups["initial"])
        restore_rng(groups.get("rng", {}))
        history = list(info.get("history", []))
        start = int(info["epoch"]) + 1
        log.info("[finetune] resuming at epoch %d from %s", start + 1, latest)
    loader = make_loader(images, cfg, rank, world)
    steps = len(loader)
    model = wrap(student) if wrap is not None else student
    for epoch in range(start, f.epochs):
        model.train()
        metrics = finetune_one_epoch(model, teacher, student.head, optimizer, loader, queue, cfg, epoch, steps, device,
                                  source=source_model)
        metrics = {"epoch": epoch, **{k: round(v, 6) for k, v in metrics.items()}}
        history.append(metrics)
        log.info("[finetune] epoch %d/%d loss %.4f usage entropy %.3f momentum %.6f", epoch + 1, f.epochs,
                 metrics["loss"], metrics["usage_entropy"], metrics["momentum"])
        if rank == 0:
            save_train_state(state_dir(out, epoch), student, teacher, queue.state(), optimizer,
                             {"epoch": epoch, "round": 0, "input_hash": input_hash, "history": history})
            _prune(out, input_hash)
        if on_epoch is not None:
            on_epoch(metrics)
    final = teacher if f.export == "teacher" else student
    other = "student" if f.export == "teacher" else "teacher"
    meta = {"source": source or {}, "finetune": json.loads(f.model_dump_json()), "input_hash": input_hash,
            "epochs": f.epochs, "exported": f.export}
    if rank == 0:
        prior = finetuned_prior((source or {}).get("prior"))
        save_finetuned_backbone(final, out / BACKBONE_OUT, meta, prior)
        # the other network stays available as a backbone file too (the authors evaluate the student)
        save_finetuned_backbone(teacher if other == "teacher" else student, out / other_backbone_file(f.export),
                                {**meta, "exported": other}, prior)
        write_pictures(cfg, images, out, final.backbone)
        atomic_write_json(out / INFO_FILE, {**meta, "arch": cfg.backbone.arch, "history": history,
                                            "backbone_file": BACKBONE_OUT,
                                            "other_backbone_file": other_backbone_file(f.export),
                                            "images": len(images),
                                            "start_epoch": start, "workers": world})
    return {"history": history, "start_epoch": start}


def write_pictures(cfg: Config, images: Sequence[np.ndarray], out: Path, after: DinoViT, n: int = 4,
                   k: int = 8) -> None:
    """``<run>/finetune/before_after.png``: attention and cluster maps of ``n`` training images spread over the split
    (consecutive frames of a video look alike) with the source backbone and the fine-tuned one (best effort: a
    picture never fails the stage)."""
    from transfgu.layout import RunLayout
    from transfgu.leopart.viz import finetune_pictures_png
    from transfgu.runtime import load_run_backbone

    try:
        before = load_run_backbone(cfg.backbone, RunLayout(out.parent), cfg.run.seed)
        after_cpu = copy.deepcopy(after).cpu()
        pick = np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int))
        finetune_pictures_png([images[i] for i in pick], {"before": before, "after": after_cpu},
                              cfg.finetune.global_size, k, out / PICTURES)
    except Exception as exc:  # matplotlib missing, odd images: the backbone file matters, the picture does not
        log.warning("[finetune] no before/after picture: %s", exc)


def source_record(cfg: Config) -> dict[str, Any]:
    src = cfg.backbone.source
    return {"arch": cfg.backbone.arch, "weights": cfg.backbone.weights, "prior": src.prior,
            "pretrained": src.pretrained}


def finish_info(out: Path) -> dict[str, Any]:
    """The stage's manifest info, from ``finetune.json`` (written by rank 0 at the end of training)."""
    info = json.loads((out / INFO_FILE).read_text())
    hist = info["history"]
    return {"rows": info["images"], "epochs": len(hist), "resumed_from_epoch": info["start_epoch"],
            "backbone": str(out / BACKBONE_OUT),
            "first_loss": hist[0]["loss"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None,
            "last_usage_entropy": hist[-1]["usage_entropy"] if hist else None}


# -- the one-process executor ---------------------------------------------------------------------------------------
def run_finetune(ctx: RunContext) -> dict[str, Any]:
    """The stage in this process (``ctx.on_epoch`` logs each epoch to MLflow)."""
    cfg = ctx.cfg
    images, _ = decode_training_images(cfg, ctx.errors)
    from transfgu.runtime import load_run_backbone

    backbone = load_run_backbone(cfg.backbone, ctx.layout, cfg.run.seed).to(ctx.device)
    out = ctx.run_dir / "finetune"
    finetune(cfg, backbone, images, out, ctx.hashes["finetune"], ctx.device, on_epoch=ctx.on_epoch,
             source=source_record(cfg))
    return finish_info(out)

