"""Stage 4's method: bootstrapped decoder training (eq. 10-12) and the trained-model files.

:func:`train_rounds` is the training loop of both executors: the one-process executor calls it once for every
epoch; a Ray Train worker calls it for the epochs of one bootstrapping round, with ``wrap`` = DDP and
``rank``/``world`` from Ray Train. It resumes from the newest saved state (:mod:`transfgu.checkpoint`), so a run
stopped anywhere continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from transfgu.checkpoint import (
    DECODER_FILE,
    MODEL_JSON,
    latest_train_state,
    load_optimizer,
    load_train_state,
    restore_rng,
    save_model,
    save_train_state,
)
from transfgu.config import Config, n_output_channels
from transfgu.context import EpochCallback
from transfgu.data.loaders import dataset_classes
from transfgu.engine.loop import train_one_epoch
from transfgu.engine.step import StepKernels, make_optimizer, reboot
from transfgu.layout import RunLayout
from transfgu.losses import BootstrapSchedule, LossWeights
from transfgu.models.backbone import DinoViT
from transfgu.models.decoder import MaskTransformerDecoder
from transfgu.selection import ValHistory, validate_epoch
from transfgu.store import to_jsonable

log = logging.getLogger(__name__)

def build_decoder(cfg: Config, d_encoder: int) -> MaskTransformerDecoder:
    return MaskTransformerDecoder(
        n_classes=n_output_channels(cfg), d_encoder=d_encoder, d_model=d_encoder,
        n_heads=max(1, d_encoder // 64), cls_emb_init=cfg.train.cls_emb_init, dropout=cfg.train.dropout,
    )


def round_segments(cfg: Config) -> list[tuple[int, int, int]]:
    """``(round, first epoch, stop epoch)`` of every bootstrapping round (train_rounds' round numbering)."""
    t = cfg.train
    schedule = BootstrapSchedule(t.teacher_intervals, t.bootstrap_start)
    segs: list[tuple[int, int, int]] = []
    r, start = 0, 0
    for e in range(t.epochs):
        if schedule.is_reboot(e):
            if e > start:
                segs.append((r, start, e))
            r, start = r + 1, e
    segs.append((r, start, t.epochs))
    return segs


def train_rounds(
    cfg: Config,
    backbone: DinoViT,
    loader: Iterable[dict[str, torch.Tensor]],
    layout: RunLayout,
    device: torch.device,
    amp: torch.dtype | None = None,
    on_epoch: EpochCallback | None = None,
    rank: int = 0,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    stop_epoch: int | None = None,
    input_hash: str | None = None,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Bootstrapped training (eq. 10-12) with one checkpoint directory per round; resumes from the newest state.

    ``wrap`` optionally wraps the student for data parallelism (Ray Train passes DDP); ``on_epoch(metrics)`` is
    called after every epoch (MLflow / Ray reporting). ``stop_epoch`` ends the call before that epoch (the Ray
    executor runs one fit per bootstrapping round); the default trains to ``train.epochs``. ``validate(student)``
    (rank 0 only) scores the student on val after the epochs :func:`transfgu.selection.validation_due` names and
    records ``train/val_history.jsonl`` (and ``train/best/`` for ``train.select=best_val``). Only states stamped
    with ``input_hash`` (the train stage's hash; None: any state, none stamped) are resumed from, and every saved state
    records it.
    """
    t = cfg.train
    torch.manual_seed(cfg.run.seed)
    student = build_decoder(cfg, backbone.embed_dim).to(device)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    optimizer = make_optimizer(student, t.lr, t.weight_decay)
    teacher: nn.Module | None = None
    schedule = BootstrapSchedule(t.teacher_intervals, t.bootstrap_start)
    first_epoch = 0
    state_dir = latest_round_state(layout.train, input_hash)
    if state_dir is not None:
        groups, info = load_train_state(state_dir)
        student.load_state_dict(groups["student"])
        initial = groups["initial"]
        if info["has_teacher"]:
            teacher = copy.deepcopy(student)
            teacher.load_state_dict(groups["teacher"])
            teacher.eval()
        load_optimizer(optimizer, groups["opt"], info["optimizer"])
        restore_rng(groups.get("rng", {}))
        first_epoch = info["epoch"] + 1
        log.info("[train] resuming after epoch %d from %s", info["epoch"], state_dir)
    val_history = ValHistory(layout.train, keep_best=t.select == "best_val") if validate is not None else None
    if val_history is not None:
        val_history.truncate_after(first_epoch - 1)
    model = wrap(student) if wrap is not None else student
    weights = LossWeights(peer=1.0, div=t.w_div, unc=t.w_unc)
    history: list[dict[str, Any]] = []
    round_idx = sum(1 for e in range(first_epoch) if schedule.is_reboot(e))
    last_epoch = t.epochs if stop_epoch is None else min(int(stop_epoch), t.epochs)
    samplers = [s for s in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None))
                if hasattr(s, "set_epoch")]
    kernels = StepKernels(device)  # the step's compiled device functions (TRANSFGU_COMPILE; eager fallback)
    for epoch in range(first_epoch, last_epoch):
        plan = schedule.plan(epoch)
        if plan.reboot:
            if teacher is None:
                teacher = copy.deepcopy(student)
            reboot(student, teacher, initial)
            teacher.eval()
            round_idx += 1
        for sampler in samplers:
            sampler.set_epoch(epoch)
        t0 = time.time()
        metrics = train_one_epoch(
            model, teacher if plan.bootstrapping else None, backbone, loader, optimizer, plan, device,
            loss_weights=weights, variant=t.variant, clamp_grad=t.clamp_grad, skip_nonpositive=t.skip_nonpositive,
            seed=cfg.run.seed, colour_mode=t.colour_aug, t_bg=t.t_bg, mix=t.teacher_mix, empty_fg=t.empty_fg,
            amp_dtype=amp, kernels=kernels,
        )
        metrics = {**metrics, "epoch": epoch, "round": round_idx, "alpha": plan.alpha, "time_s": time.time() - t0}
        history.append(metrics)
        log.info(
            "[train] round %d epoch %d/%d loss %.4f alpha %.2f (%.1fs)",
            round_idx, epoch + 1, t.epochs, float(metrics.get("loss", float("nan"))), plan.alpha, metrics["time_s"],
        )
        if rank == 0:
            save_train_state(
                layout.round_dir(round_idx), student, teacher, initial, optimizer,
                {"epoch": epoch, "round": round_idx, "metrics": to_jsonable(metrics), "input_hash": input_hash},
            )
        if val_history is not None and validate is not None:
            metrics.update(validate_epoch(cfg, val_history, validate, student, epoch, round_idx))
        if on_epoch is not None:
            on_epoch(metrics)
    return student, {"epochs": t.epochs, "rounds": round_idx + 1, "history": to_jsonable(history)}


def latest_round_state(train_dir: Path, input_hash: str | None) -> Path | None:
    """The newest complete training state under ``train_dir`` written under ``input_hash`` (None: any)."""
    return latest_train_state(train_dir, input_hash)


def decoder_model_meta(cfg: Config, pretrained: bool, d_encoder: int) -> dict[str, Any]:
    """``model.json``: what prediction needs to rebuild the model (checkpoint.py owns the files)."""
    names, _, _ = dataset_classes(cfg) if cfg.data.name != "folder" else ((), 255, None)
    return {
        "format": "transfgu-model/1",
        "backbone": {"arch": cfg.backbone.arch, "weights": cfg.backbone.weights, "pretrained": pretrained,
                     "prior": cfg.backbone.source.prior, "pos_embed": cfg.backbone.pos_embed},
        "decoder": {"n_classes": n_output_channels(cfg), "d_encoder": d_encoder,
                    "cls_emb_init": cfg.train.cls_emb_init},
        "variant": cfg.train.variant,
        "k_per_pool": dict(cfg.concepts.k_per_pool),
        "eval_size": list(cfg.eval.eval_size),
        "train_size": list(cfg.train.train_size),
        "class_names": list(names),
        "cluster_to_class": None,
        "config": json.loads(cfg.model_dump_json()),
    }


def write_model(
    cfg: Config, layout: RunLayout, student: nn.Module, backbone: DinoViT, selection: dict[str, Any] | None = None,
    input_hash: str | None = None,
) -> None:
    """The prediction checkpoint ``model/`` (a random backbone is stored with it) with how it was selected,
    stamped with the train hash."""
    meta = decoder_model_meta(cfg, cfg.backbone.source.pretrained, backbone.embed_dim)
    meta.update(selection or {"selection": "last"})
    meta["input_hash"] = input_hash
    save_model(layout.model, student, meta, backbone=backbone)


def load_model_decoder(cfg: Config, layout: RunLayout, d_encoder: int, device: torch.device,
                       input_hash: str | None = None) -> nn.Module:
    """The trained decoder of ``model/`` in eval mode; with ``input_hash``, only a model trained under that hash,
    and never one with non-finite weights."""
    from transfgu import integrity

    if input_hash is not None:
        integrity.check_json_stamp(layout.model / MODEL_JSON, input_hash, "the model", "re-run with --force train")
    dec = build_decoder(cfg, d_encoder).to(device)
    state = load_file(str(layout.model / DECODER_FILE))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise integrity.IntegrityError(f"{layout.model}: non-finite decoder weights in {bad[:3]}; "
                                       "check train.lr and re-run with --force train")
    dec.load_state_dict(state)
    dec.eval()
    return dec


def load_latest_student(cfg: Config, layout: RunLayout, d_encoder: int, device: torch.device,
                        input_hash: str | None = None, state_dir: Path | None = None) -> tuple[nn.Module, dict]:
    """The student of the newest training state (of ``input_hash`` when given), and that state's info.

    ``state_dir`` names the state to read instead (the Ray executor's final ``result.checkpoint``); with
    ``input_hash`` it must record that hash.
    """
    if state_dir is not None:
        from transfgu import integrity

        if input_hash is not None:
            integrity.check_json_stamp(Path(state_dir) / "state.json", input_hash, "the final training checkpoint",
                                       "re-run with --force train")
        latest: Path | None = Path(state_dir)
    else:
        latest = latest_round_state(layout.train, input_hash)
    if latest is None:
        raise RuntimeError(f"train: no training state under {layout.train}")
    groups, info = load_train_state(latest)
    student = build_decoder(cfg, d_encoder).to(device)
    student.load_state_dict(groups["student"])
    return student, info
