"""The whole method in one process: extract -> concepts -> label bank -> train -> evaluate (-> report).

Writes the run directory of DESIGN.md §3. Every stage is idempotent: it records its input hash in
``_manifest.json`` when it finishes, and a re-run skips stages whose hash matches, so an interrupted run resumes at
the first unfinished stage. Within the feature and label-bank stages, finished Parquet shards are kept as well.
The Ray pipeline (:mod:`transfgu.distributed`) runs the same stage functions from :mod:`transfgu.stages`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from transfgu import stages
from transfgu.checkpoint import load_optimizer, load_train_state, restore_rng, save_model, save_train_state
from transfgu.concepts import ConceptBank, fit_concepts
from transfgu.config import Config, save_config
from transfgu.ddp import step_loader
from transfgu.engine import evaluate, make_optimizer, reboot, train_one_epoch
from transfgu.losses import BootstrapSchedule, LossWeights
from transfgu.models.decoder import MaskTransformerDecoder
from transfgu.store import (
    Manifest,
    atomic_write_json,
    config_hash,
    read_features,
    read_label_bank,
    write_parquet_atomic,
)

log = logging.getLogger("transfgu")

STAGES = ("extract", "concepts", "label_bank", "train", "evaluate")
SHARD_IMAGES = 32


@dataclass
class Progress:
    """One log line per step with counts, rate and ETA."""

    stage: str
    total: int
    done: int = 0
    start: float = field(default_factory=time.time)

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        el = time.time() - self.start
        rate = self.done / el if el > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        log.info(
            "[%s] %d/%d (%.1f%%) %.2f/s eta %s %s",
            self.stage, self.done, self.total, 100.0 * self.done / max(self.total, 1), rate, _fmt(eta), extra,
        )


def _fmt(sec: float) -> str:
    if not math.isfinite(sec):
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(sec))


def stage_hashes(cfg: Config) -> dict[str, str]:
    """Input hash of every stage: its own config sections chained with its upstream stage's hash."""
    d = json.loads(cfg.model_dump_json())
    data = {k: v for k, v in d["data"].items() if k != "max_val_images"}
    # Training/evaluation subsets (curated lists) do not change the crop, concept and label-bank stages.
    subsets = {k: v for k, v in data["options"].items() if k in stages.SUBSET_OPTIONS}
    data["options"] = {k: v for k, v in data["options"].items() if k not in stages.SUBSET_OPTIONS}
    h_ex = config_hash({"data": data, "backbone": d["backbone"], "crops": d["crops"], "seed": d["run"]["seed"]})
    h_co = config_hash({"up": h_ex, "concepts": d["concepts"]})
    h_lb = config_hash({"up": h_co, "pseudo": d["pseudo"]})
    h_tr = config_hash(
        {"up": h_lb, "train": d["train"], "seed": d["run"]["seed"], **({"subsets": subsets} if subsets else {})}
    )
    h_ev = config_hash({"up": h_tr, "eval": d["eval"], "val": d["data"]["val_split"], "n": d["data"]["max_val_images"]})
    return {"extract": h_ex, "concepts": h_co, "label_bank": h_lb, "train": h_tr, "evaluate": h_ev}


def setup_logging(run_dir: Path | None = None, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_transfgu", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        h._transfgu = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)
    if run_dir is not None:
        path = Path(run_dir) / "pipeline.log"
        if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in root.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(fh)


# -- stages --------------------------------------------------------------------------------------------------------
class Context:
    """What the stages of one run share: config, run dir, manifest, device, backbone (built lazily)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest.load(self.run_dir)
        self.hashes = stage_hashes(cfg)
        self.device = stages.resolve_device(cfg.run.device)
        self.amp = stages.autocast_dtype(cfg.backbone.precision, self.device)
        self.errors = stages.ErrorLog(self.run_dir / "errors.jsonl")
        self._backbone = None
        # Set by run_pipeline around each stage: the stage's MLflow child run and an on_epoch(metrics) callback.
        self.tracker: Any = None
        self.stage_run_id: str | None = None
        self.on_epoch: Callable[[dict[str, Any]], None] | None = None

    @property
    def backbone(self):
        if self._backbone is None:
            bb = stages.load_run_backbone(self.cfg.backbone, self.run_dir, self.cfg.run.seed)
            self._backbone = bb.to(self.device)
        return self._backbone

    @property
    def pretrained(self) -> bool:
        return self.cfg.backbone.weights != "none"


def _kept_rows(path: Path, stage: str) -> int | None:
    """Rows of a finished shard file; None when there is none or it is unreadable (then it is removed and redone)."""
    if not path.is_file():
        return None
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError: a torn or foreign file
        log.warning("[%s] %s is unreadable (%s); computing it again", stage, path, exc)
        path.unlink()
        return None


def _run_sharded(ctx: Context, stage: str, out_name: str, make_table: Any) -> tuple[int, int, int]:
    """Run ``make_table(decoded images, image ids) -> pa.Table`` over the training split in shards of
    ``SHARD_IMAGES`` images, one ``part-<s>.parquet`` each; readable finished shards are kept (resume).

    Returns ``(rows written or kept, images listed, images that failed to decode)``.
    """
    out_dir = ctx.run_dir / out_name
    out_dir.mkdir(parents=True, exist_ok=True)
    records = stages.split_records(ctx.cfg, ctx.cfg.data.train_split, subset=False)  # full split, as the reference
    prog = Progress(stage, len(records))
    rows = 0
    for si in range(0, len(records), SHARD_IMAGES):
        shard = records[si : si + SHARD_IMAGES]
        path = out_dir / f"part-{si // SHARD_IMAGES:05d}.parquet"
        kept = _kept_rows(path, stage)
        if kept is not None:
            rows += kept
            prog.update(len(shard), "(kept)")
            continue
        decoded = list(stages.decode_images(shard, ctx.errors, stage))
        table = make_table([im for _, im in decoded], [r.image_id for r, _ in decoded])
        write_parquet_atomic(table, path)
        rows += table.num_rows
        prog.update(len(shard), f"rows={rows}")
    n_err = ctx.errors.count(stage)
    stages.check_error_budget(n_err, len(records), ctx.cfg.run.error_budget, stage)
    return rows, len(records), n_err


def run_extract(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg

    def table(images: list[np.ndarray], ids: list[str]) -> Any:
        return stages.extract_features(
            ctx.backbone, images, ids, cfg.data.train_split, cfg.crops, ctx.device, ctx.amp
        )

    rows, n_images, n_err = _run_sharded(ctx, "extract", "features", table)
    if rows == 0:
        raise RuntimeError("extract: no crops were produced (no readable images, or no window passed the fg/bg test)")
    return {"rows": rows, "images": n_images - n_err, "errors": n_err}


def run_concepts(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    pools: dict[str, np.ndarray] = {}
    for pool in cfg.concepts.k_per_pool:
        _, cls = read_features(ctx.run_dir / "features", pools=[pool])
        pools[pool] = cls
        log.info("[concepts] pool %s: %d crop features", pool, len(cls))
    bank = fit_concepts(pools, dict(cfg.concepts.k_per_pool), niter=cfg.concepts.niter, seed=cfg.concepts.seed,
                        algorithm=cfg.concepts.algorithm)
    bank.save(ctx.run_dir / "concepts")
    return {"rows": int(bank.centroids.shape[0]), "k": int(bank.centroids.shape[0])}


def run_label_bank(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    bank = ConceptBank.load(ctx.run_dir / "concepts")

    def table(images: list[np.ndarray], ids: list[str]) -> Any:
        maps = stages.build_label_maps(ctx.backbone, images, bank.centroids, cfg.pseudo, ctx.device)
        return stages.label_bank_rows(ids, maps)

    rows, _, n_err = _run_sharded(ctx, "label_bank", "label_bank", table)
    return {"rows": rows, "errors": n_err}


def latest_round_state(train_dir: Path) -> Path | None:
    """The most recent complete training state (``state.json`` is written last, so it marks completeness)."""
    done = [p for p in train_dir.glob("round_*") if (p / "state.json").is_file()]
    if not done:
        return None
    return max(done, key=lambda p: json.loads((p / "state.json").read_text())["epoch"])


def build_decoder(cfg: Config, d_encoder: int) -> MaskTransformerDecoder:
    return MaskTransformerDecoder(
        n_classes=stages.n_output_channels(cfg), d_encoder=d_encoder, d_model=d_encoder,
        n_heads=max(1, d_encoder // 64), cls_emb_init=cfg.train.cls_emb_init, dropout=cfg.train.dropout,
    )


def train_rounds(
    cfg: Config,
    backbone: torch.nn.Module,
    loader: Any,
    train_dir: Path,
    device: torch.device,
    amp: torch.dtype | None = None,
    on_epoch: Any = None,
    rank: int = 0,
    wrap: Any = None,
    stop_epoch: int | None = None,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Bootstrapped training (eq. 10-12) with one checkpoint directory per round; resumes from the newest state.

    ``wrap`` optionally wraps the student for data parallelism (Ray Train passes DDP); ``on_epoch(metrics)`` is
    called after every epoch (MLflow / Ray reporting). ``stop_epoch`` ends the call before that epoch (the Ray
    pipeline runs one fit per bootstrapping round); the default trains to ``train.epochs``. ``validate(student)``
    (rank 0 only) scores the student on val after the epochs :func:`transfgu.selection.validation_due` names and
    records ``train/val_history.jsonl`` (and ``train/best/`` for ``train.select=best_val``).
    """
    from transfgu.selection import ValHistory, validate_epoch

    t = cfg.train
    torch.manual_seed(cfg.run.seed)
    student = build_decoder(cfg, backbone.embed_dim).to(device)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    optimizer = make_optimizer(student, t.lr, t.weight_decay)
    teacher: torch.nn.Module | None = None
    schedule = BootstrapSchedule(t.teacher_intervals, t.bootstrap_start)
    first_epoch = 0
    state_dir = latest_round_state(train_dir)
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
    val_history = ValHistory(train_dir, keep_best=t.select == "best_val") if validate is not None else None
    if val_history is not None:
        val_history.truncate_after(first_epoch - 1)
    model = wrap(student) if wrap is not None else student
    weights = LossWeights(peer=1.0, div=t.w_div, unc=t.w_unc)
    history: list[dict[str, Any]] = []
    round_idx = sum(1 for e in range(first_epoch) if schedule.is_reboot(e))
    last_epoch = t.epochs if stop_epoch is None else min(int(stop_epoch), t.epochs)
    for epoch in range(first_epoch, last_epoch):
        plan = schedule.plan(epoch)
        if plan.reboot:
            if teacher is None:
                teacher = copy.deepcopy(student)
            reboot(student, teacher, initial)
            teacher.eval()
            round_idx += 1
        for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        t0 = time.time()
        metrics = train_one_epoch(
            model, teacher if plan.bootstrapping else None, backbone, loader, optimizer, plan, device,
            loss_weights=weights, variant=t.variant, clamp_grad=t.clamp_grad, skip_nonpositive=t.skip_nonpositive,
            seed=cfg.run.seed, colour_mode=t.colour_aug, t_bg=t.t_bg, mix=t.teacher_mix, empty_fg=t.empty_fg,
            amp_dtype=amp,
        )
        metrics = {**metrics, "epoch": epoch, "round": round_idx, "alpha": plan.alpha, "time_s": time.time() - t0}
        history.append(metrics)
        log.info(
            "[train] round %d epoch %d/%d loss %.4f alpha %.2f (%.1fs)",
            round_idx, epoch + 1, t.epochs, float(metrics.get("loss", float("nan"))), plan.alpha, metrics["time_s"],
        )
        if rank == 0:
            save_train_state(
                train_dir / f"round_{round_idx:03d}", student, teacher, initial, optimizer,
                {"epoch": epoch, "round": round_idx, "metrics": _jsonable(metrics)},
            )
        if val_history is not None and validate is not None:
            metrics.update(validate_epoch(cfg, val_history, validate, student, epoch, round_idx))
        if on_epoch is not None:
            on_epoch(metrics)
    return student, {"epochs": t.epochs, "rounds": round_idx + 1, "history": _jsonable(history)}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def run_train(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    bank = read_label_bank(ctx.run_dir / "label_bank", dense=False)
    records = stages.split_records(cfg, cfg.data.train_split)
    ds = stages.BankDataset(records, bank, tuple(cfg.train.train_size), repeat=cfg.train.repeat)
    if len(ds) == 0:
        raise RuntimeError("train: the label bank has no image of the training split")
    loader = step_loader(ds, cfg.train.batch_size, cfg.run.seed, num_workers=cfg.train.num_workers)
    train_dir = ctx.run_dir / "train"
    from transfgu.selection import Validator, select_student, validation_wanted

    validate = Validator(cfg, ctx.backbone, ctx.device, ctx.amp) if validation_wanted(cfg) else None
    student, info = train_rounds(
        cfg, ctx.backbone, loader, train_dir, ctx.device, ctx.amp, on_epoch=ctx.on_epoch, validate=validate
    )
    selection = select_student(cfg, train_dir, student)
    write_model(ctx, student, selection)
    return {"rows": len(ds), **{k: v for k, v in info.items() if k != "history"}, "final_loss": _last_loss(info),
            **selection}


def _last_loss(info: dict[str, Any]) -> float | None:
    hist = info.get("history") or []
    return float(hist[-1]["loss"]) if hist and "loss" in hist[-1] else None


def model_meta(cfg: Config, pretrained: bool, d_encoder: int) -> dict[str, Any]:
    names, ignore, _ = stages.dataset_classes(cfg) if cfg.data.name != "folder" else ((), 255, None)
    return {
        "format": "transfgu-model/1",
        "backbone": {"arch": cfg.backbone.arch, "weights": cfg.backbone.weights, "pretrained": pretrained,
                     "pos_embed": cfg.backbone.pos_embed},
        "decoder": {"n_classes": stages.n_output_channels(cfg), "d_encoder": d_encoder,
                    "cls_emb_init": cfg.train.cls_emb_init},
        "variant": cfg.train.variant,
        "k_per_pool": dict(cfg.concepts.k_per_pool),
        "eval_size": list(cfg.eval.eval_size),
        "train_size": list(cfg.train.train_size),
        "class_names": list(names),
        "cluster_to_class": None,
        "config": json.loads(cfg.model_dump_json()),
    }


def write_model(ctx: Context, student: torch.nn.Module, selection: dict[str, Any] | None = None) -> None:
    meta = model_meta(ctx.cfg, ctx.pretrained, ctx.backbone.embed_dim)
    meta.update(selection or {"selection": "last"})
    save_model(ctx.run_dir / "model", student, meta, backbone=ctx.backbone)


def load_student(ctx: Context) -> MaskTransformerDecoder:
    from safetensors.torch import load_file

    dec = build_decoder(ctx.cfg, ctx.backbone.embed_dim).to(ctx.device)
    dec.load_state_dict(load_file(str(ctx.run_dir / "model" / "decoder.safetensors")))
    dec.eval()
    return dec


def has_labelled_val(cfg: Config) -> bool:
    return cfg.data.val_split is not None and cfg.data.name != "folder"


def evaluate_decoder(
    cfg: Config, backbone: torch.nn.Module, dec: torch.nn.Module, device: torch.device, amp: torch.dtype | None = None,
    errors: stages.ErrorLog | None = None,
) -> tuple[dict[str, Any], tuple[str, ...], int]:
    """Scores of a decoder on the labelled validation split: ``(scores, class names, number of images)``.

    Unusable validation samples are recorded in ``errors`` and left out (``scores["skipped"]`` counts them); more
    than ``run.error_budget`` of them fail the evaluation.
    """
    names, ignore, label_map = stages.dataset_classes(cfg)
    records = stages.split_records(cfg, cfg.data.val_split)
    ds = stages.EvalDataset(records, label_map, tuple(cfg.eval.eval_size), ignore, errors=errors)
    stages.check_error_budget(len(ds.skipped), len(records), cfg.run.error_budget, "evaluate")
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.eval.batch_size, shuffle=False)
    scores = evaluate(
        dec, backbone, loader, n_clusters=stages.n_output_channels(cfg), n_classes=len(names), device=device,
        eval_hw=tuple(cfg.eval.eval_size), ignore_index=-1, class_names=names, overcluster=cfg.eval.overcluster,
        amp_dtype=amp,
    )
    scores["skipped"] = len(ds.skipped)
    return scores, names, len(ds)


def run_evaluate(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    if not has_labelled_val(cfg):
        log.info("[evaluate] no labelled validation split configured; skipping")
        return {"rows": 0, "skipped": "no labels"}
    dec = load_student(ctx)
    scores, names, n_images = evaluate_decoder(cfg, ctx.backbone, dec, ctx.device, ctx.amp, errors=ctx.errors)
    meta_path = ctx.run_dir / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    selection = {k: v for k, v in meta.items() if k.startswith("select")}
    write_eval(ctx.run_dir / "eval", scores, names, pretrained=ctx.pretrained, n_images=n_images, selection=selection)
    # The prediction checkpoint learns which cluster is which class, so `transfgu predict` can name them.
    meta["cluster_to_class"] = [int(x) for x in np.asarray(scores["mapping"]).tolist()]
    atomic_write_json(meta_path, meta)
    return {"rows": n_images, "errors": scores["skipped"], "mIoU": float(scores["mIoU"]),
            "pixel_accuracy": float(scores["pixel_accuracy"]), **selection}


def write_eval(
    eval_dir: Path, scores: dict[str, Any], names: Sequence[str], pretrained: bool, n_images: int,
    selection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """metrics.json, per_class_iou.csv and confusion.csv; every file says whether the backbone was pretrained
    and how the model was selected (``best_val`` says loudly that validation labels were used)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    conf = np.asarray(scores.get("confusion", scores.get("conf", [])))
    metrics = {
        "mIoU": float(scores["mIoU"]),
        "pixel_accuracy": float(scores["pixel_accuracy"]),
        "per_class_iou": _jsonable(scores["per_class_iou"]),
        "mapping": [int(x) for x in np.asarray(scores["mapping"]).tolist()],
        "n_images": n_images,
        "n_clusters": int(scores.get("n_clusters", 0)),
        "pretrained": pretrained,
    }
    if not pretrained:
        metrics["warning"] = "random backbone (no pretrained weights): these numbers are not the method's"
    metrics.update(selection or {})
    atomic_write_json(eval_dir / "metrics.json", metrics)
    lines = ["class,iou"] + [f"{k},{v}" for k, v in metrics["per_class_iou"].items()]
    (eval_dir / "per_class_iou.csv").write_text("\n".join(lines) + "\n")
    if conf.size:
        np.savetxt(eval_dir / "confusion.csv", conf, fmt="%d", delimiter=",")
    return metrics


RUNNERS = {
    "extract": run_extract,
    "concepts": run_concepts,
    "label_bank": run_label_bank,
    "train": run_train,
    "evaluate": run_evaluate,
}


def run_pipeline(
    cfg: Config,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
    runners: Mapping[str, Callable[[Context], dict[str, Any]]] | None = None,
    kind: str = "pipeline",
    tracking_parent: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns the manifest as a dict.

    ``runners`` replaces stage implementations by name (the Ray pipeline passes its distributed stages; skip-if-done,
    the manifest, MLflow and the report stay here). With ``mlflow.enabled`` the run is tracked as one parent MLflow
    run with a child per stage and per bootstrapping round (:mod:`transfgu.tracking`), itself a child of
    ``tracking_parent`` when given (a Tune trial under its sweep).
    """
    from transfgu.preflight import preflight
    from transfgu.tracking import PipelineTracker

    images = preflight(cfg)  # data, weights, device, window layout: fail before any stage writes anything
    ctx = Context(cfg)
    setup_logging(ctx.run_dir)
    log.info("preflight: images per split %s", images)
    save_config(cfg, ctx.run_dir / "config.yaml")
    stages.seed_everything(cfg.run.seed)
    if not ctx.pretrained:
        log.warning("RUN WITHOUT PRETRAINED WEIGHTS: backbone %s is random; metrics are not the method's",
                    cfg.backbone.arch)
    log.info("run directory %s on %s", ctx.run_dir, ctx.device)
    impl = {**RUNNERS, **(runners or {})}
    tracker = PipelineTracker.from_config(cfg, kind=kind, parent_id=tracking_parent)
    ctx.tracker = tracker
    tracker.start()
    try:
        for name in STAGES:
            if only is not None and name not in only:
                continue
            h = ctx.hashes[name]
            if name not in force and ctx.manifest.is_done(name, h):
                log.info("[%s] already done (input %s); skipping", name, h[:12])
                tracker.stage_run(name, skipped=True, info=ctx.manifest.stage(name).get("extra", {}))
                continue
            ctx.manifest.mark_running(name, input_hash=h)
            ctx.stage_run_id = tracker.stage_run(name)
            epoch_log = tracker.epoch_logger(ctx.stage_run_id) if name == "train" else None
            ctx.on_epoch = epoch_log
            t0 = time.time()
            try:
                info = impl[name](ctx)
            except BaseException as exc:
                ctx.manifest.mark_failed(name, error=f"{type(exc).__name__}: {exc}")
                status = _run_status(exc)
                if epoch_log is not None:
                    epoch_log.close(status)
                tracker.end_stage(ctx.stage_run_id, {}, status=status)
                raise
            finally:
                ctx.on_epoch = None
            if epoch_log is not None:
                epoch_log.close()
            info = {**info, "seconds": round(time.time() - t0, 2), "pretrained": ctx.pretrained}
            ctx.manifest.mark_done(name, input_hash=h, **info)
            tracker.end_stage(ctx.stage_run_id, info)
            ctx.stage_run_id = None
            log.info("[%s] done in %.1fs: %s", name, info["seconds"], {k: v for k, v in info.items() if k != "history"})
        if cfg.run.report and (only is None or "report" in only):
            try:
                from transfgu.report import write_report

                write_report(ctx.run_dir)
            except ImportError:
                pass
    except BaseException as exc:
        tracker.finish(ctx.run_dir, status=_run_status(exc))
        raise
    tracker.finish(ctx.run_dir)
    return ctx.manifest.to_dict()


def _run_status(exc: BaseException) -> str:
    """MLflow status of an interrupted run: KILLED when stopped from outside (Ctrl-C, a Tune early stop)."""
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
