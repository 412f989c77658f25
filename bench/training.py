"""Training (stage 4): images/s of a bootstrapping epoch vs the frozen-backbone forward alone; peak memory.

``transfgu.engine.loop.train_one_epoch`` on synthetic batches (uint8 images at the train size, pseudo-label maps at
token resolution) with a teacher (a bootstrapping epoch: augmentation, frozen backbone on the crops, teacher
decoder, student forward/backward, Adam). Compared in the same run with the same epoch without a teacher and
with the floor: the frozen backbone's forward pass on the same crops (half the train size), which no
training step can avoid. Peak memory: the process's peak RSS (``resource.getrusage``) and, on CUDA,
``torch.cuda.max_memory_allocated`` over the bootstrapping epoch.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import (
    backbone_flops,
    base_parser,
    comparison,
    current_rss_mib,
    finish,
    matmul_peak,
    new_result,
    peak_rss_mib,
    start,
    sync,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transfgu.engine.loop import train_one_epoch
    from transfgu.engine.step import make_optimizer, make_teacher
    from transfgu.losses import EpochPlan
    from transfgu.models.backbone import build_backbone
    from transfgu.models.decoder import MaskTransformerDecoder

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default=None, help="backbone (default vit_small_patch8; quick: vit_test_tiny)")
    p.add_argument("--train-size", type=int, default=None, help="square train size (default 320; quick 64)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 8; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per epoch (default 4; quick 2)")
    p.add_argument("--k", type=int, default=27, help="concepts = decoder classes (thingstuff variant)")
    p.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast dtype of the step")
    args, device, t_start = start(p, argv)
    q = args.quick
    arch = args.arch
    size = args.train_size or (64 if q else 320)
    bsz = args.batch or (4 if q else 8)
    steps = args.steps or (2 if q else 4)
    amp = torch.bfloat16 if args.amp == "bf16" else None

    torch.manual_seed(0)
    bb = build_backbone(arch, "none").to(device)
    d = bb.embed_dim
    student = MaskTransformerDecoder(n_classes=args.k, d_encoder=d, d_model=d, n_heads=max(1, d // 64)).to(
        device
    )
    teacher = make_teacher(student)
    opt = make_optimizer(student, lr=1e-4)
    crop = size // 2
    config = {
        "arch": arch,
        "train_size": size,
        "crop_size": crop,
        "batch": bsz,
        "steps": steps,
        "k": args.k,
        "amp": args.amp,
        "backbone_flops_per_crop": backbone_flops(bb, crop, crop),
    }
    result = new_result("training", args, device, config)
    res = result["results"]

    gen = torch.Generator().manual_seed(0)
    h = size // bb.patch_size
    batches = [
        {
            "image": torch.randint(0, 256, (bsz, 3, size, size), dtype=torch.uint8, generator=gen),
            "pseudo": torch.rand(bsz, args.k, h, h, generator=gen),
        }
        for _ in range(steps)
    ]
    boot = EpochPlan(epoch=2, bootstrapping=True, reboot=False, epoch_iter=0, alpha=0.1)
    plain = EpochPlan(epoch=0, bootstrapping=False, reboot=False, epoch_iter=0, alpha=0.0)

    def run(plan: EpochPlan, with_teacher: bool, data: list, seed: int) -> dict[str, float]:
        return train_one_epoch(student, teacher if with_teacher else None, bb, data, opt, plan, device,
                               generator=torch.Generator().manual_seed(seed), log_every=0, amp_dtype=amp)

    def epoch(plan: EpochPlan, with_teacher: bool) -> dict[str, float]:
        sync(device)
        t0 = time.perf_counter()
        out = run(plan, with_teacher, batches, seed=1)
        sync(device)
        return {**out, "wall_s": time.perf_counter() - t0}

    # warm-up: one step of each kind (allocator, oneDNN kernels)
    for plan, wt in ((boot, True), (plain, False)):
        run(plan, wt, batches[:1], seed=2)
    rss_before = current_rss_mib()
    peak_before = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    b = epoch(boot, True)
    peak_after = peak_rss_mib()
    cuda_peak = torch.cuda.max_memory_allocated(device) / 1024**2 if device.type == "cuda" else None
    pl = epoch(plain, False)

    crops = torch.randn(bsz, 3, crop, crop, generator=gen).to(device)

    def floor() -> None:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None),
        ):
            bb(crops)

    floor()
    f_runs = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        floor()
        sync(device)
        f_runs.append(time.perf_counter() - t0)
    f_s = sum(f_runs)

    # FLOPs of one bootstrapping step, counted by torch (explicit attention so the counter sees it), and this
    # machine's matmul peak: the step's achieved fraction of peak says how much is not matmul work.
    from torch.utils.flop_counter import FlopCounterMode

    fused = [blk.attn.fused_attn for blk in bb.vit.blocks]
    for blk in bb.vit.blocks:
        blk.attn.fused_attn = False
    with FlopCounterMode(display=False) as fc:
        run(boot, True, batches[:1], seed=3)
    for blk, f in zip(bb.vit.blocks, fused):
        blk.attn.fused_attn = f
    step_flops = float(fc.get_total_flops())
    peak = matmul_peak(device, torch.bfloat16 if amp else torch.float32, 1024 if q else 4096)["flops_per_s"]
    achieved = step_flops * steps / b["wall_s"]
    res["flops"] = {
        "per_step": step_flops,
        "per_image": step_flops / bsz,
        "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak,
        "fraction_of_peak": achieved / peak,
    }
    result["comparisons"].append(
        comparison(
            "bootstrapping step achieved / matmul peak",
            "torch.matmul peak",
            "train_one_epoch with teacher",
            achieved / peak,
            "fraction of peak",
            None,
            None,
            step_gflop=step_flops / 1e9,
        )
    )

    n_img = bsz * steps
    res["bootstrapping_epoch"] = {**b, "images_per_s": n_img / b["wall_s"]}
    res["plain_epoch"] = {**pl, "images_per_s": n_img / pl["wall_s"]}
    res["backbone_forward_only"] = {"wall_s": f_s, "runs_s": f_runs, "images_per_s": n_img / f_s}
    res["memory"] = {
        "rss_before_epoch_mib": rss_before,
        "peak_rss_before_epoch_mib": peak_before,
        "peak_rss_after_bootstrapping_epoch_mib": peak_after,
        "cuda_max_allocated_mib": cuda_peak,
    }
    result["comparisons"].append(
        comparison(
            "bootstrapping epoch images/s / backbone-forward-only images/s",
            "frozen backbone forward on the crops",
            "train_one_epoch with teacher",
            (n_img / b["wall_s"]) / (n_img / f_s),
            "fraction of the floor's rate",
            None,
            None,
            images_per_s=n_img / b["wall_s"],
            floor_images_per_s=n_img / f_s,
        )
    )
    result["comparisons"].append(
        comparison(
            "bootstrapping / plain epoch time",
            "train_one_epoch without teacher",
            "train_one_epoch with teacher",
            b["wall_s"] / pl["wall_s"],
            "x time",
            None,
            None,
        )
    )
    result["comparisons"].append(
        comparison(
            "peak RSS of the process",
            "RSS before the epoch",
            "peak RSS after the bootstrapping epoch",
            peak_after,
            "MiB",
            None,
            None,
            rss_before_mib=rss_before,
        )
    )
    if cuda_peak is not None:
        result["comparisons"].append(
            comparison("CUDA max_memory_allocated", "-", "bootstrapping epoch", cuda_peak, "MiB", None, None)
        )
    result["notes"].append(
        f"{steps} steps of {bsz} images per timed epoch, after one warm-up step of each kind"
    )
    return finish(result, args, t_start)


if __name__ == "__main__":
    main()
