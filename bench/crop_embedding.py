"""Crop embedding (stage 1): crops/s batched vs one at a time, and achieved FLOP/s vs this machine's matmul peak.

``transfgu.crops.embed_crops`` with ``batch_size=B`` against ``batch_size=1`` (the authors embed COCO/VOC crops
one at a time in their code). Achieved FLOP/s uses the analytic ViT count of
:func:`bench.common.vit_forward_flops` (ViT-S/8 on a 320x320 crop: 115.5 GFLOP); the peak is the best of a few
large square ``torch.matmul`` in the same precision, measured in the same run. Target (issue 6): >= 50 % of
that peak on CPU. Also timed: the batched cut-and-resize of all 142 windows of a 640x640 image
(``crop_and_resize``) and one whole ``extract_crops_batch`` call in quick mode.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.common import backbone_flops, base_parser, comparison, finish, matmul_peak, new_result, start, timeit


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transfgu.crops import crop_and_resize, embed_crops, extract_crops_batch, window_layout
    from transfgu.models.backbone import build_backbone

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default=None, help="backbone (default vit_small_patch8; quick: vit_test_tiny)")
    p.add_argument(
        "--small-crop-size", type=int, default=None, help="also compare on small crops (default 64; quick 0)"
    )
    p.add_argument("--crop-size", type=int, default=None, help="crop side in pixels (default 320; quick 64)")
    p.add_argument(
        "--n-crops", type=int, default=None, help="crops in the batched run (default 32; quick 16)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="crops per call, batched (default 16; quick 8)"
    )
    p.add_argument(
        "--n-single", type=int, default=None, help="crops embedded one at a time (default 6; quick 4)"
    )
    p.add_argument(
        "--dtype", default=None, choices=("fp32", "bf16"), help="default fp32 on CPU, bf16 on CUDA"
    )
    p.add_argument(
        "--matmul-n", type=int, default=None, help="side of the peak matmul (default 4096; quick 1024)"
    )
    args, device, t_start = start(p, argv)
    q = args.quick
    arch = args.arch
    size = args.crop_size or (64 if q else 320)
    n_crops = args.n_crops or (16 if q else 32)
    bs = args.batch_size or (8 if q else 16)
    n_single = args.n_single or (4 if q else 6)
    if args.small_crop_size is None:
        args.small_crop_size = 0 if q else 64
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    amp = torch.bfloat16 if dtype_name == "bf16" else None
    mm_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    mm_n = args.matmul_n or (1024 if q else 4096)
    repeat = args.repeat or (2 if q else 3)

    bb = build_backbone(arch, "none").to(device)
    flops = backbone_flops(bb, size, size)
    config = {
        "arch": arch,
        "crop_size": size,
        "n_crops": n_crops,
        "batch_size": bs,
        "n_single": n_single,
        "dtype": dtype_name,
        "matmul_n": mm_n,
        "repeat": repeat,
        "flops_per_crop": flops,
    }
    result = new_result("crop_embedding", args, device, config)
    res = result["results"]

    gen = torch.Generator().manual_seed(0)
    crops = torch.randn(n_crops, 3, size, size, generator=gen).to(device)
    peak_before = matmul_peak(device, mm_dtype, mm_n, repeat=repeat)
    batched = timeit(lambda: embed_crops(bb, crops, bs, autocast_dtype=amp), device, repeat=repeat)
    single = timeit(lambda: embed_crops(bb, crops[:n_single], 1, autocast_dtype=amp), device, repeat=repeat)
    peak_after = matmul_peak(device, mm_dtype, mm_n, repeat=repeat)
    # The peak is the best the machine showed during the run (bracketing the model timings).
    peak = max(peak_before["flops_per_s"], peak_after["flops_per_s"])
    res["matmul_peak"] = {"before": peak_before, "after": peak_after, "flops_per_s": peak}

    b_cps = n_crops / batched["min_s"]
    s_cps = n_single / single["min_s"]
    b_fps, s_fps = b_cps * flops, s_cps * flops
    res["batched"] = {
        **batched,
        "crops_per_s": b_cps,
        "flops_per_s": b_fps,
        "fraction_of_peak": b_fps / peak,
        "crops_per_s_median": n_crops / batched["median_s"],
    }
    res["one_at_a_time"] = {
        **single,
        "crops_per_s": s_cps,
        "flops_per_s": s_fps,
        "fraction_of_peak": s_fps / peak,
        "crops_per_s_median": n_single / single["median_s"],
    }
    result["comparisons"].append(
        comparison(
            "crops/s batched / one at a time",
            "embed_crops batch_size=1",
            f"embed_crops batch_size={bs}",
            b_cps / s_cps,
            "x throughput",
            None,
            None,
            batched_crops_per_s=b_cps,
            single_crops_per_s=s_cps,
        )
    )
    result["comparisons"].append(
        comparison(
            "achieved / matmul peak (batched)",
            f"torch.matmul {mm_n}^2 {dtype_name}",
            f"embed_crops batch_size={bs}",
            b_fps / peak,
            "fraction of peak",
            ">= 0.5",
            b_fps / peak >= 0.5,
            achieved_flops_per_s=b_fps,
            peak_flops_per_s=peak,
        )
    )
    result["comparisons"].append(
        comparison(
            "achieved / matmul peak (one at a time)",
            f"torch.matmul {mm_n}^2 {dtype_name}",
            "embed_crops batch_size=1",
            s_fps / peak,
            "fraction of peak",
            None,
            None,
            achieved_flops_per_s=s_fps,
            peak_flops_per_s=peak,
        )
    )

    # Small crops (the CPU demo's 64 px): few tokens per call, where batching pays even on a CPU.
    if args.small_crop_size:
        sc = args.small_crop_size
        small = torch.randn(64, 3, sc, sc, generator=gen).to(device)
        sb = timeit(lambda: embed_crops(bb, small, 64, autocast_dtype=amp), device, repeat=repeat)
        ss = timeit(lambda: embed_crops(bb, small[:16], 1, autocast_dtype=amp), device, repeat=repeat)
        sf = backbone_flops(bb, sc, sc)
        res["small_crops"] = {
            "crop_size": sc,
            "batched": {**sb, "crops_per_s": 64 / sb["min_s"]},
            "one_at_a_time": {**ss, "crops_per_s": 16 / ss["min_s"]},
            "flops_per_crop": sf,
            "batched_fraction_of_peak": 64 / sb["min_s"] * sf / peak,
        }
        result["comparisons"].append(
            comparison(
                f"crops/s batched / one at a time, {sc} px crops",
                "embed_crops batch_size=1",
                "embed_crops batch_size=64",
                (64 / sb["min_s"]) / (16 / ss["min_s"]),
                "x throughput",
                None,
                None,
                batched_crops_per_s=64 / sb["min_s"],
                single_crops_per_s=16 / ss["min_s"],
            )
        )

    # Cut-and-resize of every window of one stage image: the non-ViT part of stage 1.
    grid = 80 if not q else 16
    img = torch.randn(1, 3, grid * bb.patch_size, grid * bb.patch_size, generator=gen).to(device)
    layout = window_layout(grid, grid, (0.5, 0.4, 0.3, 0.2))
    boxes = [layout.boxes_pixel(bb.patch_size)]
    cut = timeit(lambda: crop_and_resize(img, boxes, size), device, repeat=repeat)
    res["crop_and_resize"] = {
        **cut,
        "image_side": grid * bb.patch_size,
        "n_windows": len(layout),
        "embed_s_same_crops": len(layout) / b_cps,
    }
    result["comparisons"].append(
        comparison(
            "crop_and_resize / embedding, one image",
            f"embed {len(layout)} crops (batched rate)",
            f"crop_and_resize {len(layout)} windows",
            cut["min_s"] / (len(layout) / b_cps),
            "fraction",
            None,
            None,
        )
    )
    if q:
        # The whole stage function once (prior pass + crops + embedding), so the bench exercises it in CI.
        imgs = torch.randn(2, 3, 128, 128, generator=gen).to(device)
        t = timeit(
            lambda: extract_crops_batch(
                bb, imgs, betas=(0.5, 0.3), mode="fg_bg", crop_size=size, batch_size=bs, autocast_dtype=amp
            ),
            device,
            repeat=1,
            warmup=0,
        )
        res["extract_crops_batch_2_images"] = t
    result["notes"].append(
        "FLOPs per crop: analytic ViT count (8 + 4r) N D^2 + 4 N^2 D per block + patch embedding, see "
        "bench/common.py vit_forward_flops; softmax/LayerNorm/GELU not counted"
    )
    return finish(result, args, t_start)


if __name__ == "__main__":
    main()
