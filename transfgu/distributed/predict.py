"""Batch prediction on Ray Data: ``transfgu predict --ray`` and ``ray_jobs/predict.py`` (issue 18 item 2).

Two operators, so decoding never waits for the model and the model never waits for decoding::

    records (index, stem, source) ──► decode + preprocess: CPU tasks ──► predict: actor pool (1 GPU each when the
                                      (bytes -> uint8 -> (3, H, W)       cluster has GPUs) -> label PNGs +
                                       float at the eval size)           one Parquet file per batch

The per-image work is :mod:`transfgu.predict`'s (:func:`~transfgu.predict.preprocess_image` in the CPU tasks,
:meth:`~transfgu.predict.Predictor.logits` and :meth:`~transfgu.predict.Predictor.labels_from_logits` in the
actors), so labels equal ``transfgu predict`` image by image.

Inputs: folders (recursive), image files, list files (one path per line), globs (``'imgs/**/*.jpg'``) and URIs
that :mod:`pyarrow.fs` opens (``s3://bucket/prefix/``, ``gs://...``, ``file:///...``). Every image gets a unique
output stem (its path below the folder/prefix, without extension).

Outputs under ``--out``: ``<stem>.png`` label maps (the same files ``transfgu predict`` writes) and
``predictions/part-<key>.parquet`` with one row per image: ``stem``, ``source``, ``label_png`` (relative path, null
without PNG output), ``height``, ``width``, ``pixels`` (list of pixel counts per id), ``unmatched``, ``error``.
Unreadable images get a row with ``error`` set (and are listed in ``errors.jsonl``), never a crash.

Exactly once: the Parquet files are the ledger. A file is written atomically after its PNGs, and its name is a
hash of the stems it holds, so a batch that Ray retries after its actor died replaces its own file instead of adding
rows. A re-run only sends the stems no ledger row covers; at the end every input stem must appear exactly once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transfgu.cli_args import predict_ray_parser as build_parser
from transfgu.config import Config
from transfgu.data.io import decode_rgb
from transfgu.distributed.cluster import configure_data_context, init_ray, map_on_pool, run_pool_with_retries
from transfgu.errors import ErrorLog
from transfgu.integrity import PREDICT_MARKER, check_predict_output
from transfgu.logs import Progress, setup_logging
from transfgu.mlflow_model import resolve_model_dir
from transfgu.model_meta import find_checkpoint, read_model_meta
from transfgu.predict import (
    IMAGE_EXTENSIONS,
    collect_inputs,
    label_histogram,
    load,
    preprocess_image,
    save_label_png,
    unique_stems,
)
from transfgu.store.formats import list_parquet_files, write_parquet_atomic

log = logging.getLogger(__name__)

LEDGER_DIR = "predictions"
SUMMARY_COLUMNS = ("stem", "ok", "error", "file")


# -- inputs --------------------------------------------------------------------------------------------------------
def _is_uri(s: str) -> bool:
    return "://" in s


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _uri_images(uri: str) -> list[tuple[str, str]]:
    """Images under a pyarrow.fs URI (a prefix or one object): ``(uri of the object, stem)``."""
    from pyarrow import fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(uri, Path(path).stem)]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {uri}")
    base = path.rstrip("/")
    out = []
    for f in sorted(filesystem.get_file_info(pafs.FileSelector(base, recursive=True)), key=lambda f: f.path):
        if f.type == pafs.FileType.File and Path(f.path).suffix.lower() in IMAGE_EXTENSIONS:
            rel = f.path[len(base):].lstrip("/")
            out.append((f"{scheme}://{f.path}" if scheme != "file" else f"file://{f.path}",
                        Path(rel).with_suffix("").as_posix()))
    return out


def list_inputs(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """``(source, stem)`` for every image of the inputs, stems unique (see the module docstring)."""
    found: list[tuple[str, str]] = []
    for item in inputs:
        s = str(item)
        if _is_uri(s):
            found.extend(_uri_images(s))
        elif _has_magic(s) and not Path(s).exists():
            parts = Path(s).parts
            fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
            root = Path(*parts[:fixed]) if fixed else Path(".")  # stems are paths below the glob's fixed folder
            hits = sorted(p for p in glob.glob(s, recursive=True)
                          if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS)
            if not hits:
                raise FileNotFoundError(f"no image matches {s}")
            found.extend((str(Path(p).resolve()), Path(p).relative_to(root).with_suffix("").as_posix()) for p in hits)
        else:  # the ledger's `source` is absolute: it names the file wherever the ledger is read from
            found.extend((str(Path(p).resolve()), stem) for p, stem in collect_inputs([s]))
    return unique_stems(found)  # the same rule as the one-process transfgu predict, across all inputs


def read_bytes(source: str) -> bytes:
    """The bytes of a local path or a pyarrow.fs URI."""
    if _is_uri(source):
        from pyarrow import fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(source)
        with filesystem.open_input_stream(path) as fh:
            return fh.read()
    return Path(source).read_bytes()


# -- ledger --------------------------------------------------------------------------------------------------------
def ledger_schema() -> pa.Schema:
    return pa.schema([
        ("stem", pa.string()), ("source", pa.string()), ("label_png", pa.string()), ("height", pa.int32()),
        ("width", pa.int32()), ("pixels", pa.list_(pa.int64())), ("unmatched", pa.int64()), ("error", pa.string()),
    ])


def batch_file(ledger: Path, stems: Sequence[str]) -> Path:
    """The ledger file of a batch: named by its contents, so a retried batch overwrites itself."""
    key = hashlib.sha1("\n".join(sorted(stems)).encode()).hexdigest()[:20]
    return ledger / f"part-{key}.parquet"


def done_stems(out_dir: Path) -> Counter:
    """How many ledger rows each stem has (torn files are removed: their images are predicted again)."""
    counts: Counter = Counter()
    ledger = Path(out_dir) / LEDGER_DIR
    if not ledger.is_dir():
        return counts
    for path in list_parquet_files(ledger):
        try:
            counts.update(pq.read_table(path, columns=["stem"])["stem"].to_pylist())
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s); predicting its images again", path, exc)
            path.unlink()
    return counts


def read_ledger(out_dir: str | Path) -> pa.Table:
    """Every prediction row of an output folder (plain pyarrow)."""
    files = list_parquet_files(Path(out_dir) / LEDGER_DIR)
    if not files:
        return ledger_schema().empty_table()
    return pa.concat_tables([pq.read_table(f, schema=ledger_schema()) for f in files])


# -- the two operators ---------------------------------------------------------------------------------------------
def decode_batch(batch: dict[str, np.ndarray], eval_size: tuple[int, int], max_pixels: int) -> dict[str, np.ndarray]:
    """CPU task: read + decode + preprocess. Failures become rows with ``error`` set (never an exception)."""
    n = len(batch["stem"])
    x = np.zeros((n, 3, *eval_size), dtype=np.float32)
    hw = np.zeros((n, 2), dtype=np.int32)
    err = np.full(n, "", dtype=object)
    for i, src in enumerate(batch["source"]):
        try:
            img = decode_rgb(read_bytes(str(src)), max_pixels=max_pixels, name=str(src))
            x[i] = preprocess_image(img, eval_size).numpy()
            hw[i] = img.shape[:2]
        except (OSError, ValueError) as exc:  # DecodeError is a ValueError
            err[i] = str(exc) or type(exc).__name__
    return {"stem": batch["stem"], "source": batch["source"], "x": x, "hw": hw, "error": err}


class PredictActor:
    """Actor of the prediction pool: one checkpoint per actor, one batch per call, its outputs written here."""

    def __init__(self, checkpoint: str, out_dir: str, as_classes: bool, write_png: bool, device: str,
                 num_cpus: float, precision: str = "auto") -> None:
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))
        self.predictor = load(checkpoint, device=device, precision=precision)
        self.out_dir = Path(out_dir)
        self.ledger = self.out_dir / LEDGER_DIR
        self.ledger.mkdir(parents=True, exist_ok=True)
        self.as_classes = as_classes
        self.write_png = write_png
        self.n_ids = len(self.predictor.class_names) if as_classes else self.predictor.n_clusters

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        stems = [str(s) for s in batch["stem"]]
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        labels: dict[int, np.ndarray] = {}
        if ok.any():
            idx = np.flatnonzero(ok)
            logits = self.predictor.logits(torch.from_numpy(np.ascontiguousarray(batch["x"][idx])))
            sizes = [tuple(int(v) for v in batch["hw"][i]) for i in idx]
            for i, lab in zip(idx, self.predictor.labels_from_logits(logits, sizes, self.as_classes)):
                labels[int(i)] = lab
        rows: dict[str, list[Any]] = {name: [] for name in ledger_schema().names}
        for i, stem in enumerate(stems):
            lab = labels.get(i)
            png = None
            if lab is not None and self.write_png:
                png = f"{stem}.png"
                save_label_png(lab, self.out_dir / png, self.n_ids)
            counts, unmatched = label_histogram(lab, self.n_ids) if lab is not None else (None, None)
            rows["stem"].append(stem)
            rows["source"].append(str(batch["source"][i]))
            rows["label_png"].append(png)
            rows["height"].append(None if lab is None else int(lab.shape[0]))
            rows["width"].append(None if lab is None else int(lab.shape[1]))
            rows["pixels"].append(None if counts is None else counts.tolist())
            rows["unmatched"].append(unmatched)
            rows["error"].append(str(batch["error"][i]) or None)
        path = batch_file(self.ledger, stems)
        # PNGs first, then the ledger file: a crash in between only means the PNGs are written again.
        write_parquet_atomic(pa.table(rows, schema=ledger_schema()), path)
        return {
            "stem": np.asarray(stems, dtype=object),
            "ok": ok,
            "error": np.asarray([str(e) for e in batch["error"]], dtype=object),
            "file": np.asarray([path.name] * len(stems), dtype=object),
        }


# -- driver --------------------------------------------------------------------------------------------------------
def predict_ray(
    checkpoint: str | Path,
    inputs: Sequence[str],
    out_dir: str | Path,
    *,
    as_classes: bool = False,
    write_png: bool = True,
    batch_size: int = 8,
    actors: tuple[int, int] = (1, 4),
    cpus_per_actor: float = 1.0,
    decode_cpus: float = 0.5,
    use_gpu: bool | str = "auto",
    precision: str = "auto",
    max_pixels: int = 80_000_000,
    actor_cls: type = PredictActor,
) -> dict[str, Any]:
    """Label every input image on the Ray cluster this process is connected to; returns a summary.

    ``actor_cls`` exists for fault-injection tests (a subclass that dies mid-run).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ckpt = find_checkpoint(checkpoint).resolve()
    meta = read_model_meta(ckpt)
    if as_classes and meta.get("cluster_to_class") is None:
        raise ValueError("--classes needs a checkpoint with a cluster -> class matching (evaluate the run first)")
    items = list_inputs(inputs)
    if not items:
        raise FileNotFoundError("no images found in the inputs")
    out = Path(out_dir).resolve()
    # the same refusals as the one-process `transfgu predict` (local inputs only: URIs cannot overlap --out)
    check_predict_output(out, [Path(i) for i in inputs if not _is_uri(str(i)) and not _has_magic(str(i))])
    out.mkdir(parents=True, exist_ok=True)
    # Written first: marks the folder as prediction output (a re-run may write into it again, nothing else may).
    if not (out / PREDICT_MARKER).is_file():
        (out / PREDICT_MARKER).write_text(json.dumps({"status": "running"}) + "\n", encoding="utf-8")
    done = done_stems(out)
    todo = [(src, stem) for src, stem in items if stem not in done]
    kept = len(items) - len(todo)
    if kept:
        log.info("[predict] %d of %d images already in the ledger", kept, len(items))
    gpu = float(ray.cluster_resources().get("GPU", 0)) > 0 if use_gpu == "auto" else bool(use_gpu)
    eval_size = (int(meta["eval_size"][0]), int(meta["eval_size"][1]))
    summary: dict[str, list[np.ndarray]] = {k: [] for k in SUMMARY_COLUMNS}
    t0 = time.time()
    if todo:
        ray_bar = configure_data_context(DataContext.get_current())  # Ray Data's bar on a terminal only
        # Under Ray Data's bar only the final count is logged; elsewhere a status line every 10 s, also while the
        # first batches are still running (as the pipeline's per-image stages do)
        prog = Progress("predict", len(items), bar=False, min_interval_s=math.inf if ray_bar else 10.0,
                        heartbeat=not ray_bar)
        lo, hi = actors
        res: dict[str, float] = {"num_gpus": 1, "num_cpus": min(1.0, cpus_per_actor)} if gpu else {
            "num_cpus": cpus_per_actor}

        def attempt() -> None:
            # What to send is planned from the ledger on disk: after an actor died, only the images no ledger file
            # holds go to a new pool (a pool actor is not restarted by Ray: cluster.map_on_pool).
            ledger = done_stems(out)
            sent = {str(s) for part in summary["stem"] for s in part}
            lost = {s for _, s in todo if ledger.get(s) and s not in sent}
            if lost:  # written by an actor that died before reporting them: their rows come from the ledger
                for k, v in _ledger_summary(out, lost).items():
                    summary[k].append(v)
                prog.update(len(lost), "(from the ledger)")
            left = [(src, stem) for src, stem in todo if not ledger.get(stem)]
            if not left:
                return
            # Blocks of one batch each: the batch a ledger file holds is fixed before anything runs.
            tables = [pa.table({"stem": [s for _, s in left[i:i + batch_size]],
                                "source": [src for src, _ in left[i:i + batch_size]]})
                      for i in range(0, len(left), batch_size)]
            n_actors = max(1, min(hi, len(tables)))
            ds = ray.data.from_arrow(tables)
            ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=decode_cpus,
                                fn_kwargs={"eval_size": eval_size, "max_pixels": max_pixels})
            ds = map_on_pool(
                ds, actor_cls, batch_size=batch_size, batch_format="numpy",
                compute=ActorPoolStrategy(min_size=max(1, min(lo, n_actors)), max_size=n_actors),
                fn_constructor_kwargs={"checkpoint": str(ckpt), "out_dir": str(out), "as_classes": as_classes,
                                       "write_png": write_png, "device": "cuda" if gpu else "cpu",
                                       "num_cpus": res["num_cpus"], "precision": precision},
                **res,
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for k in SUMMARY_COLUMNS:
                    summary[k].append(batch[k])
                prog.update(len(batch["stem"]))

        with prog:
            if kept:
                prog.update(kept, "(kept)")
            run_pool_with_retries("predict", attempt)
    got = {k: np.concatenate(v) if v else np.zeros(0, dtype=object) for k, v in summary.items()}
    _check_exactly_once(out, [s for _, s in items], [s for _, s in todo], got)
    (out / "errors.jsonl").unlink(missing_ok=True)  # this run's errors only (the ledger keeps every run's)
    errors = ErrorLog(out / "errors.jsonl")
    n_err = 0
    src_of = dict((stem, src) for src, stem in items)
    for stem, ok, reason in zip(got["stem"], got["ok"], got["error"]):
        if not ok:
            errors.record(src_of[str(stem)], "predict", str(reason))
            n_err += 1
    result = {
        "checkpoint": str(ckpt),
        "ids": "classes" if as_classes else "clusters",
        "names": list(meta.get("class_names") or []) if as_classes
        else [f"cluster {i}" for i in range(int(meta["decoder"]["n_classes"]))],
        "n_inputs": len(items),
        "n_predicted": int(got["ok"].sum()) if len(got["ok"]) else 0,
        "n_errors": n_err,
        "n_kept": kept,
        "png": write_png,
        "ledger": str(out / LEDGER_DIR),
        "seconds": round(time.time() - t0, 2),
        "device": "cuda" if gpu else "cpu",
        "pretrained_backbone": bool(meta["backbone"].get("pretrained", False)),
    }
    (out / "predict.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _ledger_summary(out: Path, stems: set[str]) -> dict[str, np.ndarray]:
    """The summary rows (as the actors return them) of ``stems``, read back from the ledger files."""
    rows: dict[str, list[Any]] = {k: [] for k in SUMMARY_COLUMNS}
    for path in list_parquet_files(out / LEDGER_DIR):
        for r in pq.read_table(path, columns=["stem", "error"]).to_pylist():
            if r["stem"] in stems:
                rows["stem"].append(r["stem"])
                rows["ok"].append(r["error"] is None)
                rows["error"].append(r["error"] or "")
                rows["file"].append(path.name)
    return {"stem": np.asarray(rows["stem"], dtype=object), "ok": np.asarray(rows["ok"], dtype=bool),
            "error": np.asarray(rows["error"], dtype=object), "file": np.asarray(rows["file"], dtype=object)}


def _check_exactly_once(out: Path, all_stems: Sequence[str], todo: Sequence[str], got: dict[str, np.ndarray]) -> None:
    """Every image sent came back once, and the ledger holds every input exactly once."""
    back = Counter(str(s) for s in got["stem"])
    missing = sorted(set(todo) - set(back))
    dup = sorted(s for s, c in back.items() if c != 1)
    if missing or dup:
        raise RuntimeError(f"predict: {len(missing)} images did not come back (e.g. {missing[:3]}), "
                           f"{len(dup)} came back more than once (e.g. {dup[:3]})")
    rows = done_stems(out)
    wrong = sorted(s for s in all_stems if rows.get(s, 0) != 1)
    if wrong:
        raise RuntimeError(f"predict: the ledger in {out / LEDGER_DIR} holds {len(wrong)} images other than exactly "
                           f"once (e.g. {[(s, rows.get(s, 0)) for s in wrong[:3]]})")


# -- command line --------------------------------------------------------------------------------------------------
def summary_line(res: Mapping[str, Any], out: Path) -> str:
    """The closing line of ``transfgu predict --ray``: counts, and the error list only when this run wrote one."""
    errors = Path(out) / "errors.jsonl"
    unreadable = f"{res['n_errors']} unreadable"
    if res["n_errors"] and errors.exists():
        unreadable += f": see {errors.resolve()}"
    return f"{res['n_predicted']} images labelled ({res['n_kept']} already done, {unreadable}); ledger {res['ledger']}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        setup_logging()  # the console format of every transfgu command
    formats = {f.strip() for f in args.format.split(",") if f.strip()}
    if not formats <= {"png", "parquet"} or not formats:
        print(f"error: --format takes png and/or parquet, got {args.format!r}", file=sys.stderr)
        return 2
    if args.overlay or args.weights or args.device:
        print("error: --overlay/--weights/--device are options of the one-process transfgu predict; with --ray use "
              "--gpu and a checkpoint whose backbone is stored or reachable", file=sys.stderr)
        return 2
    try:
        lo, hi = (int(v) for v in args.actors.split(","))
        if lo < 1 or hi < lo or args.batch_size < 1:
            raise ValueError
    except ValueError:
        print("error: --actors takes MIN,MAX with 1 <= MIN <= MAX, and --batch-size must be >= 1", file=sys.stderr)
        return 2

    try:
        ckpt = resolve_model_dir(args.checkpoint, tracking_uri=args.tracking_uri)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = Config.model_validate({"ray": {"address": args.address, "num_cpus": args.num_cpus}})
    init_ray(cfg)
    try:
        res = predict_ray(ckpt, args.inputs, args.out, as_classes=args.classes, write_png="png" in formats,
                          batch_size=args.batch_size, actors=(lo, hi), cpus_per_actor=args.cpus_per_actor,
                          decode_cpus=args.decode_cpus,
                          use_gpu="auto" if args.gpu == "auto" else args.gpu == "true", precision=args.precision)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_line(res, Path(args.out)))
    if not res["pretrained_backbone"]:
        print("warning: the checkpoint's backbone is RANDOM (no pretrained weights): predictions are not the "
              "method's", file=sys.stderr)
    return 0 if res["n_predicted"] + res["n_kept"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
