"""Storage (stages 1 and 3): bytes per image of the features and label-bank Parquet vs the reference's pickles.

The reference stores one pickle of a float32 numpy array per image and type: crop features ``(n_crops, 384)``
(COCO: one file for the fg crops, one for the bg crops) and concept maps ``(K, h, w)`` (COCO: one fg file, one
bg file), as the authors' code pickles them. Here the reference's size is the length of ``pickle.dumps`` of exactly
those arrays (measured in memory only; nothing is pickled to disk), and ours is the size of the Parquet files
the pipeline writes (:mod:`transfgu.store`, zstd). Target (issue 6): <= 25 % of the reference.

Contents are real: crop CLS features from ``extract_crops_batch`` and concept maps from ``concept_maps`` on real
photos (``../shared/data/coco_stuff_samples``, else camvid, else random pixels), with centroids from k-means of
those features, because compression depends on the values. The backbone has random weights (no pretrained
weights on this machine); DINO features may compress differently. Alternative encodings are measured too, as
advice (they are not what the pipeline writes).
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import base_parser, comparison, finish, new_result, shared_data_dir, start


def _pickle_len(a: np.ndarray) -> int:
    return len(pickle.dumps(np.ascontiguousarray(a, dtype=np.float32), protocol=pickle.HIGHEST_PROTOCOL))


def load_images(n: int, size: int) -> tuple[list[np.ndarray], str]:
    """``n`` real photos as uint8 (H, W, 3) (COCO samples, else camvid), else random pixels."""
    from transfgu.data.io import load_rgb

    root = shared_data_dir()
    for sub in ("coco_stuff_samples/images/train2017", "camvid/images/train"):
        files = sorted((root / sub).glob("*.jpg")) if (root / sub).is_dir() else []
        if files:
            return [load_rgb(f) for f in files[:n]], str(root / sub)
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)], "random pixels"


def _parquet_size(table: Any, path: Path, **kwargs: Any) -> int:
    from transfgu.store.formats import write_parquet_atomic

    write_parquet_atomic(table, path, **kwargs)
    return path.stat().st_size


def _centroids(feats: np.ndarray, k: int) -> np.ndarray:
    from transfgu.kmeans import kmeans

    if feats.shape[0] >= k:
        return kmeans(feats, k, niter=10, seed=1, use_gpu=False).centroids
    rng = np.random.default_rng(0)  # too few crops for k clusters: perturbed copies of the features
    rows = feats[rng.integers(0, feats.shape[0], k)]
    return (rows + 0.05 * rng.standard_normal(rows.shape)).astype(np.float32)


#: zstd levels measured by :func:`zstd_levels` (None = pyarrow's default level).
ZSTD_LEVELS: tuple[int | None, ...] = (None, 1, 3, 6, 9, 15)
#: The GPU rates a writer thread must keep up with (issue 15, H200): the label-bank kernels alone ~1,000 images/s,
#: the compiled crop embedding 2,881 crops/s. A level whose write per image takes longer than the model's part
#: would make the (background) write the stage's bottleneck once the GPU part is fast.
H200_LABEL_BANK_IMAGES_PER_S = 1000.0
H200_EXTRACT_CROPS_PER_S = 2881.0


def zstd_levels(table: Any, n_images: int, budget_s_per_image: float, repeats: int = 5) -> dict[str, Any]:
    """Encode ``table`` with the pipeline's writer options (:func:`store.formats.parquet_options`: its encodings)
    at each of :data:`ZSTD_LEVELS` into memory (the file system's fsync is the same for every level): fastest write
    seconds per image of ``repeats`` (one thread, as the writer thread; the minimum, as the machine is shared),
    bytes per image, and the level chosen:
    the smallest output whose write fits ``budget_s_per_image`` (the GPU model's time per image), else the fastest
    level."""
    import io
    import time

    import pyarrow.parquet as pq

    from transfgu.store.formats import parquet_options

    out: dict[str, Any] = {}
    for level in ZSTD_LEVELS:
        opts = parquet_options(table)
        if level is None:
            opts.pop("compression_level", None)
        else:
            opts["compression_level"] = level
        times, size = [], 0
        for _ in range(repeats):
            buf = io.BytesIO()
            t0 = time.perf_counter()
            pq.write_table(table, buf, **opts)
            times.append(time.perf_counter() - t0)
            size = buf.tell()
        out["default" if level is None else str(level)] = {
            "write_s_per_image": min(times) / n_images, "bytes_per_image": size / n_images,
        }  # fmt: skip
    fits = {k: v for k, v in out.items() if k != "default" and v["write_s_per_image"] <= budget_s_per_image}
    pool = fits or {k: v for k, v in out.items() if k != "default"}
    key = (lambda k: pool[k]["bytes_per_image"]) if fits else (lambda k: pool[k]["write_s_per_image"])
    return {"levels": out, "chosen": int(min(pool, key=key)), "budget_s_per_image": budget_s_per_image,
            "within_budget": sorted(fits, key=int)}


def writer_threads(table: Any, n_images: int, threads: Sequence[int] | None = None, shards: int = 8,
                   repeats: int = 3) -> dict[str, Any]:
    """Write ``shards`` copies of one shard ``table`` as the one-process stage does (``store.write_parquet_atomic``
    to ``part-<n>.parquet`` through :class:`transfgu.throughput.prefetch.BackgroundWriter`, at most 2 queued) with each
    number of writer threads, side by side in this process: fastest wall ms per image of ``repeats`` (the runs
    interleaved, as the machine is shared), the speed-up over one thread, and whether every thread count wrote the
    same bytes. ``threads`` defaults to 1, 2, 4, the CPUs and ``default_writer_threads()``."""
    import os
    import time

    from transfgu.store.formats import write_parquet_atomic
    from transfgu.throughput.prefetch import BackgroundWriter, default_writer_threads

    cpus = len(os.sched_getaffinity(0))
    threads = sorted(set(threads or (1, 2, 4, cpus, default_writer_threads())))
    times: dict[int, list[float]] = {t: [] for t in threads}
    contents: dict[int, dict[str, bytes]] = {}
    for _ in range(repeats):
        for t in threads:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                with BackgroundWriter(max_pending=2, threads=t) as w:
                    for i in range(shards):
                        w.submit(write_parquet_atomic, table, Path(tmp) / f"part-{i:05d}.parquet")
                times[t].append(time.perf_counter() - t0)
                contents[t] = {p.name: p.read_bytes() for p in sorted(Path(tmp).glob("*.parquet"))}
    one = min(times[1]) if 1 in times else None
    out = {str(t): {"write_ms_per_image": 1e3 * min(v) / (shards * n_images),
                    "speedup_vs_1": (one / min(v)) if one else None} for t, v in times.items()}  # fmt: skip
    ref = contents[threads[0]]
    return {"threads": out, "shards": shards, "images_per_shard": n_images, "cpus": cpus,
            "default_writer_threads": default_writer_threads(),
            "same_files": all(c == ref for c in contents.values())}


def bytes_ratio(name: str, reference: str, candidate: str, ours: float, ref: float, n_images: int, target: float,
                target_text: str, **extra: object) -> dict:
    """One storage comparison: our bytes / the reference's, per image, against a target fraction."""
    return comparison(name, reference, candidate, ours / ref, "fraction", target_text, ours / ref <= target,
                      ours_bytes_per_image=ours / n_images, reference_bytes_per_image=ref / n_images, **extra)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import pyarrow as pa

    from transfgu.crops import extract_crops_batch
    from transfgu.data.transforms import to_model_input
    from transfgu.models.backbone import build_backbone
    from transfgu.pseudo_labels import concept_map_parts
    from transfgu.store.formats import LabelMaps, features_table, label_bank_table

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default=None, help="backbone (default vit_small_patch8; quick: vit_test_tiny)")
    p.add_argument("--images", type=int, default=None, help="images (default 8; quick 2)")
    p.add_argument(
        "--stage-size", type=int, default=None, help="crop-stage input side (default 256; quick 96)"
    )
    p.add_argument("--crop-size", type=int, default=None, help="crop side (default 64; quick 32)")
    p.add_argument(
        "--pseudo-size", type=int, default=None, help="pseudo-label input side (default 320; quick 64)"
    )
    p.add_argument("--ks", default=None, help="fg/bg concept splits, e.g. 12/15,80/91 (quick 2/2)")
    p.add_argument("--writer-only", action="store_true",
                   help="only the label bank's writer-threads comparison (results.writer_threads)")
    args, device, t_start = start(p, argv)
    q = args.quick
    arch = args.arch
    n_img = args.images or (2 if q else 8)
    stage = args.stage_size or (96 if q else 256)
    crop = args.crop_size or (32 if q else 64)
    psize = args.pseudo_size or (64 if q else 320)
    splits = [
        tuple(int(v) for v in s.split("/")) for s in (args.ks or ("2/2" if q else "12/15,80/91")).split(",")
    ]

    torch.manual_seed(0)
    bb = build_backbone(arch, "none").to(device)
    images, source = load_images(n_img, stage)
    config = {
        "arch": arch,
        "images": len(images),
        "image_source": source,
        "stage_size": stage,
        "crop_size": crop,
        "pseudo_size": psize,
        "k_splits": [list(s) for s in splits],
        "compression": "zstd (store default)",
        "writer_only": args.writer_only,
    }
    result = new_result("storage", args, device, config)
    res = result["results"]
    ids = [f"img{i:04d}" for i in range(len(images))]

    # -- features ------------------------------------------------------------------------------------------------
    x = torch.stack([to_model_input(im, (stage, stage)) for im in images]).to(device)
    betas = (0.5, 0.4, 0.3, 0.2)
    recs = extract_crops_batch(bb, x, betas=betas, mode="fg_bg", crop_size=crop, batch_size=64)
    if sum(len(r) for r in recs) < 4:  # a random prior can drop nearly everything: keep all windows instead
        recs = extract_crops_batch(bb, x, betas=betas, mode="all", crop_size=crop, batch_size=64)
    n_crops = sum(len(r) for r in recs)
    feats = np.concatenate([r.cls for r in recs])
    if not args.writer_only:  # the features storage comparison (skipped by the writer-threads run)
        ref_feat = sum(_pickle_len(r.cls[r.pool == pool]) for r in recs for pool in sorted(set(r.pool.tolist())))
        with tempfile.TemporaryDirectory() as tmp:
            t = features_table(ids, "train", recs)
            ours = _parquet_size(t, Path(tmp) / "f.parquet")
            # pyarrow dictionary-encodes every column by default; on unique floats that adds an index per value
            # until the dictionary page overflows. Variants: dictionaries for the string columns only, plus
            # byte-stream-split (needs dictionaries off for that column), plus float16 features.
            strs = ["image_id", "split", "pool"]
            bss = {"use_dictionary": strs, "use_byte_stream_split": ["cls.list.element"]}
            variants = {
                "no float dictionary": _parquet_size(t, Path(tmp) / "f1.parquet", use_dictionary=strs),
                "no float dictionary + byte_stream_split": _parquet_size(t, Path(tmp) / "f2.parquet", **bss),
            }
            t16 = t.set_column(
                t.schema.get_field_index("cls"),
                pa.field("cls", pa.list_(pa.float16(), bb.embed_dim)),
                pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1).astype(np.float16)), bb.embed_dim),
            )
            variants["float16 cls + no float dictionary + byte_stream_split"] = _parquet_size(
                t16, Path(tmp) / "f3.parquet", **bss
            )
        res["zstd_levels"] = {"features": zstd_levels(features_table(ids, "train", recs), len(images),
                                                      n_crops / len(images) / H200_EXTRACT_CROPS_PER_S)}
        res["features"] = {
            "crops": n_crops,
            "crops_per_image": n_crops / len(images),
            "reference_pickle_bytes_per_image": ref_feat / len(images),
            "parquet_bytes_per_image": ours / len(images),
            "parquet_bytes_per_crop": ours / n_crops,
            "reference_bytes_per_crop": ref_feat / n_crops,
            "ratio": ours / ref_feat,
            "variants_bytes_per_image": {k: v / len(images) for k, v in variants.items()},
            "variants_ratio": {k: v / ref_feat for k, v in variants.items()},
        }
        result["comparisons"].append(bytes_ratio(
            "features bytes/image, Parquet / reference pickles", "pickle float32 (n_crops, D) per image and pool",
            "features/*.parquet (store, zstd)", ours, ref_feat, len(images), 0.25, "<= 0.25",
        ))

    # -- label bank ----------------------------------------------------------------------------------------------
    xp = torch.stack([to_model_input(im, (psize, psize)) for im in images]).to(device)
    res["label_bank"] = {}
    for kfg, kbg in splits:
        k = kfg + kbg
        cents = np.concatenate([_centroids(feats, kfg), _centroids(feats[::-1].copy(), kbg)])
        parts, (gh, gw) = concept_map_parts(bb, xp, torch.from_numpy(cents).to(device), grad_scale=0.125)
        n_img = xp.shape[0]
        maps = parts.maps().reshape(n_img, k, gh, gw).cpu().numpy()
        a_hat = parts.a_hat.reshape(n_img, gh, gw).cpu().numpy()
        gate = parts.gate.reshape(n_img, k, gh, gw).cpu().numpy()
        bonus = parts.bonus.reshape(n_img, k, gh, gw).cpu().numpy()
        lms = [LabelMaps.from_parts(a_hat[i], gate[i], bonus[i], maps[i]) for i in range(n_img)]
        # N writer threads vs one on the pipeline's own shard table (issue 15: one thread cannot keep up at K = 171)
        wt = writer_threads(label_bank_table(ids, lms), len(images))
        res.setdefault("writer_threads", {})[f"label_bank_K{k}"] = wt
        n_max = max(int(t) for t in wt["threads"])
        if n_max > 1:
            result["comparisons"].append(comparison(
                f"label bank K={k} Parquet writes, {n_max} writer threads vs 1", "BackgroundWriter(threads=1)",
                f"BackgroundWriter(threads={n_max})", wt["threads"][str(n_max)]["speedup_vs_1"], "x speed-up",
                "> 1 and same files", wt["threads"][str(n_max)]["speedup_vs_1"] > 1 and wt["same_files"],
                ms_per_image={t: v["write_ms_per_image"] for t, v in wt["threads"].items()},
            ))
        if args.writer_only:
            continue
        m16 = [m.astype(np.float16) for m in maps]
        m32 = list(maps)
        ref = sum(_pickle_len(m[:kfg]) + _pickle_len(m[kfg:]) for m in m32)
        with tempfile.TemporaryDirectory() as tmp:
            # what the pipeline writes: the lossless v2 bank with its encodings (write_parquet_atomic)
            ours = _parquet_size(label_bank_table(ids, lms), Path(tmp) / "l.parquet")
            res["zstd_levels"][f"label_bank_K{k}"] = zstd_levels(label_bank_table(ids, lms), len(images),
                                                                 1.0 / H200_LABEL_BANK_IMAGES_PER_S)
            t = pa.table({"image_id": ids, "maps": pa.array([m.reshape(-1) for m in m16],
                                                            type=pa.large_list(pa.float16()))})
            nodict = _parquet_size(t, Path(tmp) / "l2.parquet", use_dictionary=["image_id"])  # old float16 bank
            bss = _parquet_size(
                pa.table({"maps": pa.array([m.reshape(-1) for m in m32], type=pa.large_list(pa.float32()))}),
                Path(tmp) / "l3.parquet",
                use_dictionary=False,
                use_byte_stream_split=["maps.list.element"],
            )  # dense float32, lossless too
        zero = float(np.mean([np.mean(m == 0) for m in m16]))
        res["label_bank"][f"K{k}"] = {
            "k_fg": kfg,
            "k_bg": kbg,
            "grid": list(maps.shape[-2:]),
            "reference_pickle_bytes_per_image": ref / len(images),
            "parquet_bytes_per_image": ours / len(images),
            "raw_float16_bytes_per_image": float(np.mean([m.nbytes for m in m16])),
            "ratio": ours / ref,
            "zero_fraction": zero,
            "variants_ratio": {
                "old float16 bank (lossy), no float dictionary": nodict / ref,
                "dense float32 (lossless), no dictionary + byte_stream_split": bss / ref,
            },
        }
        result["comparisons"].append(bytes_ratio(
            f"label bank bytes/image K={k}, Parquet / reference pickles", "pickle float32 (K, h, w), fg + bg files",
            "label_bank/*.parquet (lossless v2, zstd)", ours, ref, len(images), 0.5, "<= 0.5 (lossless; issue 12)",
            zero_fraction=zero,
        ))
    result["notes"].append(
        "reference size = len(pickle.dumps(float32 array)) per file in memory; file-system block rounding of "
        "~118k small files per bank is not counted (it only adds to the reference's size)"
    )
    result["notes"].append(
        f"contents from a random-weight {arch} on {source}; DINO features may compress differently"
    )
    return finish(result, args, t_start)


if __name__ == "__main__":
    main()
