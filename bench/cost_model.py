"""Cost model: per-image FLOPs and bytes of every stage, projected to COCO-Stuff-171 on N H100s (PROJECTIONS).

Nothing here is timed on a GPU: FLOPs come from the analytic ViT/decoder counts, bytes from the storage ratios
measured by ``bench.storage`` (when ``--results-dir`` holds its JSON, else the raw array sizes), and wall time
from ``FLOPs / (N * peak * utilisation)`` with an ASSUMED H100 bf16 dense peak, utilisation and price per
GPU-hour (all flags). The one check against a measurement that this machine allows: the same model, fed this
CPU's measured matmul peak and achieved fraction (``bench.crop_embedding``), predicts the demo pipeline's
extract and label-bank stage times, compared with ``bench.end_to_end``'s measured ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import base_parser, comparison, finish, new_result, start, vit_forward_flops

D = 384  # ViT-S width
DEPTH = 12


def vit(h: int, w: int) -> float:
    return vit_forward_flops(h, w, patch=8, dim=D, depth=DEPTH)["total"]


def decoder_flops(n_patches: int, k: int, d: int = D, layers: int = 2, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of the 2-block Segmenter mask-transformer decoder (the authors' ``MaskTransformer``).

    proj_dec ``2 n D^2``; each block on ``T = n + K`` tokens ``(8 + 4r) T D^2 + 4 T^2 D``; proj_patch
    ``2 n D^2``; proj_classes ``2 K D^2``; masks ``2 n K D``.
    """
    t = n_patches + k
    blocks = layers * ((8 + 4 * mlp_ratio) * t * d * d + 4.0 * t * t * d)
    return (
        2.0 * n_patches * d * d + blocks + 2.0 * n_patches * d * d + 2.0 * k * d * d + 2.0 * n_patches * k * d
    )


def _load(results_dir: Path | None, name: str) -> dict[str, Any] | None:
    if results_dir is None:
        return None
    p = results_dir / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def per_image_model(a: Any, storage: dict[str, Any] | None, pseudo: dict[str, Any] | None) -> dict[str, Any]:
    """FLOPs and bytes per training image of every stage for the configuration in ``a``."""
    k = a.k_fg + a.k_bg
    f320 = vit(a.pseudo_size, a.pseudo_size)
    crop_f = vit(a.crop_size, a.crop_size)
    prior_f = vit(a.stage_size, a.stage_size)
    grid = (a.pseudo_size // 8) ** 2
    train_crop = a.train_size // 2
    n_train_patches = (train_crop // 8) ** 2
    fdec = decoder_flops(n_train_patches, k)

    feat_ratio = storage["results"]["features"]["ratio"] if storage else 1.0
    lb = (storage or {}).get("results", {}).get("label_bank", {}).get(f"K{k}")
    lb_ratio = lb["ratio"] if lb else 0.5
    fast_ratio = 1.0
    if pseudo:
        # the measured ratio at the largest batch (the production setting: 8 images per call)
        cmp = [c for c in pseudo["comparisons"] if c["name"].startswith(f"fast / one forward, K={k},")]
        cmp.sort(key=lambda c: int(c["name"].rsplit("B=", 1)[1]))
        fast_ratio = cmp[-1]["value"] if cmp else 1.0

    feat_bytes_ref = a.crops * D * 4
    maps_bytes_ref = k * grid * 4
    kmeans_flops = 2.0 * D * a.crops * max(a.k_fg, a.k_bg) * a.kmeans_iters
    stages = {
        "extract": {
            "flops": prior_f + a.crops * crop_f,
            "bytes_read": a.jpeg_bytes,
            "bytes_written": feat_bytes_ref * feat_ratio,
            "formula": "F(640^2) prior pass + crops x F(320^2)",
        },
        "concepts": {
            "flops": kmeans_flops,
            "bytes_read": feat_bytes_ref * feat_ratio * a.kmeans_iters,
            "bytes_written": 0.0,
            "formula": "2 D crops K_max per Lloyd iteration x iterations; shards re-read every iteration",
        },
        "label_bank_fast": {
            "flops": fast_ratio * f320,
            "bytes_read": a.jpeg_bytes,
            "bytes_written": maps_bytes_ref * lb_ratio,
            "formula": f"{fast_ratio:.3g} x F(320^2) (measured ratio to one forward on CPU)",
        },
        "label_bank_naive": {
            "flops": (1 + 2 * k) * f320,
            "bytes_read": a.jpeg_bytes,
            "bytes_written": maps_bytes_ref,
            "formula": "F(320^2) + K full backward passes of ~2 F(320^2) each (reference)",
        },
        "train": {
            "flops": a.epochs * (vit(train_crop, train_crop) + 4 * fdec),
            "bytes_read": a.epochs * (a.jpeg_bytes + maps_bytes_ref * lb_ratio),
            "bytes_written": 0.0,
            "formula": "epochs x (F(160^2) backbone + teacher fwd + student fwd/bwd = 4 x decoder fwd)",
        },
        "evaluate": {
            "flops": (a.val_images / a.images) * (f320 + decoder_flops(grid, k)),
            "bytes_read": (a.val_images / a.images) * a.jpeg_bytes,
            "bytes_written": 0.0,
            "formula": "val/train images x (F(320^2) + decoder), amortised per training image",
        },
    }
    return stages


#: JPEG decodes per training image of each stage (training decodes every image every epoch).
def _decodes(name: str, a: Any) -> float:
    return {
        "extract": 1.0,
        "label_bank_fast": 1.0,
        "label_bank_naive": 1.0,
        "train": float(a.epochs),
        "evaluate": a.val_images / a.images,
    }.get(name, 0.0)


def project(stages: dict[str, Any], a: Any, gpus: list[int]) -> list[dict[str, Any]]:
    """Wall time = max(GPU compute at the assumed utilisation, JPEG decoding on the GPU's CPU cores) / N."""
    peak = a.peak_tflops * 1e12
    rows = []
    for name, s in stages.items():
        total = s["flops"] * a.images
        util = a.util_train if name == "train" else a.util
        gpu_s = total / (peak * util)
        decode_s = _decodes(name, a) * a.images * a.decode_ms / 1000.0 / a.cpu_cores_per_gpu
        per_gpu_s = max(gpu_s, decode_s)
        row = {
            "stage": name,
            "flops_total": total,
            "gpu_compute_hours": gpu_s / 3600,
            "decode_hours_per_gpu": decode_s / 3600,
            "bound": "decode" if decode_s > gpu_s else "compute",
            "gpu_hours": per_gpu_s / 3600,
            "cost_usd": per_gpu_s / 3600 * a.price,
        }
        for n in gpus:
            row[f"wall_h_{n}gpu"] = per_gpu_s / n / 3600
        rows.append(row)
    return rows


def cpu_check(a: Any, results_dir: Path | None) -> dict[str, Any] | None:
    """Predict the demo's extract and label-bank seconds on this CPU from its measured FLOP rate."""
    crop = _load(results_dir, "crop_embedding")
    e2e = _load(results_dir, "end_to_end")
    if not crop or not e2e or e2e.get("quick") or crop.get("quick"):
        return None
    from transfgu.crops import window_layout

    cfg = e2e["config"]["config"]
    n_img = e2e["results"]["train_images"]
    rate = crop["results"]["batched"]["flops_per_s"]
    hh, ww = cfg["crops"]["input_size"]
    layout = window_layout(hh // 8, ww // 8, cfg["crops"]["betas"])
    cs = cfg["crops"]["crop_size"]
    ex_flops = len(layout) * vit(cs, cs)
    ph, pw = cfg["pseudo"]["input_size"]
    lb_flops = vit(ph, pw)
    st = e2e["results"]["stages"]
    out = {"achieved_flops_per_s_used": rate}
    for name, fl in (("extract", ex_flops), ("label_bank", lb_flops)):
        pred = fl / rate
        meas = st[name]["seconds"] / n_img
        out[name] = {
            "flops_per_image": fl,
            "predicted_s_per_image": pred,
            "measured_s_per_image": meas,
            "measured_over_predicted": meas / pred,
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--results-dir", type=Path, default=None, help="measured JSONs to calibrate bytes and check"
    )
    p.add_argument("--images", type=int, default=117_266, help="COCO-Stuff train images")
    p.add_argument("--val-images", type=int, default=4_952)
    p.add_argument("--crops", type=int, default=142, help="crops per image (all 142 windows: upper bound)")
    p.add_argument("--k-fg", type=int, default=80)
    p.add_argument("--k-bg", type=int, default=91)
    p.add_argument("--stage-size", type=int, default=640)
    p.add_argument("--crop-size", type=int, default=320)
    p.add_argument("--pseudo-size", type=int, default=320)
    p.add_argument("--train-size", type=int, default=320)
    p.add_argument(
        "--epochs", type=int, default=200, help="training epochs (reference: 91.6k iterations x 256)"
    )
    p.add_argument("--kmeans-iters", type=int, default=100)
    p.add_argument("--jpeg-bytes", type=float, default=160e3, help="ASSUMED mean COCO JPEG size")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="ASSUMED H100 SXM bf16 dense peak, TFLOP/s"
    )
    p.add_argument("--util", type=float, default=0.4, help="ASSUMED fraction of peak for backbone passes")
    p.add_argument("--util-train", type=float, default=0.3, help="ASSUMED fraction of peak for training")
    p.add_argument("--price", type=float, default=3.0, help="ASSUMED USD per H100-hour")
    p.add_argument(
        "--decode-ms", type=float, default=5.0, help="ASSUMED ms per COCO JPEG decode+resize, 1 core"
    )
    p.add_argument("--cpu-cores-per-gpu", type=int, default=16, help="ASSUMED data-loading cores per GPU")
    p.add_argument("--gpus", default="1,8,64")
    args, device, t_start = start(p, argv, model=False)
    if args.quick:  # same model, smaller data set: the arithmetic is what CI checks
        args.images, args.val_images = 1000, 100
    gpus = [int(g) for g in args.gpus.split(",")]
    storage = _load(args.results_dir, "storage")
    pseudo = _load(args.results_dir, "pseudo_labels")
    assumptions = {
        k: getattr(args, k)
        for k in (
            "images",
            "val_images",
            "crops",
            "k_fg",
            "k_bg",
            "stage_size",
            "crop_size",
            "pseudo_size",
            "train_size",
            "epochs",
            "kmeans_iters",
            "jpeg_bytes",
            "peak_tflops",
            "util",
            "util_train",
            "price",
            "decode_ms",
            "cpu_cores_per_gpu",
        )
    }
    assumptions["gpus"] = gpus
    assumptions["calibrated_from"] = {"storage": bool(storage), "pseudo_labels": bool(pseudo)}
    result = new_result("cost_model", args, device, assumptions)
    stages = per_image_model(args, storage, pseudo)
    rows = project(stages, args, gpus)
    result["results"] = {
        "per_image": stages,
        "projection": rows,
        "cpu_check": cpu_check(args, args.results_dir),
        "gpu_measured": None,
    }
    by = {r["stage"]: r for r in rows}
    result["comparisons"].append(
        comparison(
            "label bank FLOPs, naive / fast (analytic)",
            "label_bank_naive",
            "label_bank_fast",
            stages["label_bank_naive"]["flops"] / stages["label_bank_fast"]["flops"],
            "x FLOPs",
            None,
            None,
            measured=False,
        )
    )
    pipeline_fast = sum(by[s]["gpu_hours"] for s in by if s != "label_bank_naive")
    pipeline_naive = sum(by[s]["gpu_hours"] for s in by if s != "label_bank_fast")
    result["comparisons"].append(
        comparison(
            "projected H100-hours, whole pipeline, naive / fast labels",
            "reference pseudo labels",
            "fast pseudo labels",
            pipeline_naive / pipeline_fast,
            "x GPU-hours",
            None,
            None,
            measured=False,
            fast_gpu_hours=pipeline_fast,
            naive_gpu_hours=pipeline_naive,
            fast_cost_usd=pipeline_fast * args.price,
            naive_cost_usd=pipeline_naive * args.price,
        )
    )
    chk = result["results"]["cpu_check"]
    if chk:
        for name in ("extract", "label_bank"):
            result["comparisons"].append(
                comparison(
                    f"CPU check {name}: measured / predicted s per image",
                    "model at the measured CPU FLOP rate",
                    "bench.end_to_end measured",
                    chk[name]["measured_over_predicted"],
                    "x",
                    None,
                    None,
                    measured=False,
                )
            )
    result["notes"].append("PROJECTIONS, not measurements: no GPU was available; GPU figures are missing")
    result["notes"].append(
        f"assumed H100 bf16 dense peak {args.peak_tflops:g} TFLOP/s, utilisation {args.util:g} (backbone passes) / "
        f"{args.util_train:g} (training), ${args.price:g} per GPU-hour, JPEG decode {args.decode_ms:g} ms/core on "
        f"{args.cpu_cores_per_gpu} cores per GPU; perfect scaling over N GPUs"
    )
    print(
        "\n| stage | GFLOP/img | MB read/img | MB written/img | bound | GPU-h | $ | "
        + " | ".join(f"wall h, {n} GPU" for n in gpus)
        + " |"
    )
    print("|---" * (7 + len(gpus)) + "|")
    for r in rows:
        s = stages[r["stage"]]
        print(
            f"| {r['stage']} | {s['flops'] / 1e9:,.1f} | {s['bytes_read'] / 1e6:.3f} | "
            f"{s['bytes_written'] / 1e6:.3f} | {r['bound']} | {r['gpu_hours']:.2f} | {r['cost_usd']:.1f} | "
            + " | ".join(f"{r[f'wall_h_{n}gpu']:.3f}" for n in gpus)
            + " |"
        )
    return finish(result, args, t_start)


if __name__ == "__main__":
    main()
