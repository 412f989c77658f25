"""Stage throughput against the kernels alone, in the same run (issue 15 item 4; GPU targets of item "Done means").

Every stage is run as the pipeline runs it -- ``local.run_extract`` / ``local.run_label_bank`` on a folder
of JPEG files (decode, resize, model, Arrow table, Parquet write, with the prefetch and writer threads of
``transfgu.throughput``), ``train_one_epoch`` over the run's own loader (``BankDataset`` + ``PrefetchLoader``) --
and compared with its kernel-only rate measured in the same process on tensors already on the device:

==================  ===================================================  ====================================  ======
stage               stage rate                                           kernel-only rate                      target
==================  ===================================================  ====================================  ======
extract             crops/s of ``run_extract`` (prior pass included)     compiled plain timm ViT on the crops  >= 0.9
label bank          images/s of ``run_label_bank``                       ``concept_maps`` on device batches    >= 0.5
bootstrapping       images/s of a bootstrapping ``train_one_epoch``      frozen backbone forward on the crops  >= 0.5
pseudo labels       ``concept_maps`` time (fp32 and bf16)                one backbone forward, same precision  <= 1.0
==================  ===================================================  ====================================  ======

The images are synthetic JPEGs written to a temporary folder (smooth random colour fields, 960x720 like CamVid),
so the bench needs no data set. ``--quick`` (CI, the GPU script's ``--cpu-smoke``) uses the tiny ViT and small
sizes. Partial results are written after every section (``--out``), so a run cut short by a time limit still
leaves what it measured.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    backbone_flops,
    base_parser,
    comparison,
    finish,
    new_result,
    parse,
    quiet_backbone_warnings,
    setup,
    sync,
)


def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``n`` smooth random RGB JPEGs of ``size`` (w, h): compress and decode like photographs, not like noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        p = folder / f"img_{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def _timed(fn: Any, device: torch.device) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def count_syncs(fn: Any, device: torch.device) -> int | None:
    """Host-device synchronisations during ``fn()`` (:func:`~transfgu.throughput.syncs.count_cuda_syncs`), None off
    CUDA."""
    from transfgu.throughput.syncs import count_cuda_syncs

    return count_cuda_syncs(fn) if device.type == "cuda" else None


def _save_partial(result: dict[str, Any], args: Any) -> None:
    if args.out is not None:
        import json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**result, "partial": True}, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transfgu import local, stages
    from transfgu.concepts import ConceptBank
    from transfgu.config import load_config
    from transfgu.crops import extract_crops_batch
    from transfgu.data import loaders
    from transfgu.ddp import step_loader
    from transfgu.engine.loop import train_one_epoch
    from transfgu.engine.step import make_optimizer, make_teacher
    from transfgu.integrity import stamp_json
    from transfgu.losses import EpochPlan
    from transfgu.methods import run_context
    from transfgu.models.backbone import build_backbone
    from transfgu.pseudo_labels import concept_maps
    from transfgu.throughput.compile import compile_forward
    from transfgu.throughput.prefetch import PrefetchLoader

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default=None, help="backbone (default vit_small_patch8; quick: vit_test_tiny)")
    p.add_argument("--images", type=int, default=None, help="JPEGs per stage (default 64; quick 4)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="torch.compile the backbone")
    p.add_argument("--k", type=int, default=None, help="concepts (default 171; quick 4)")
    p.add_argument("--crop-batch", type=int, default=None, help="crops per call (default 256 CUDA, 16 CPU)")
    p.add_argument("--label-batch", type=int, default=None, help="images per pseudo-label call (default 32/8)")
    p.add_argument("--train-batch", type=int, default=None, help="images per step (default 64 CUDA, 8 CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 8; quick 2)")
    p.add_argument("--sections", default="pseudo_labels,label_bank,extract,training", help="which, in this order")
    args = parse(p, argv)
    device = setup(args)
    quiet_backbone_warnings()
    t_start = time.perf_counter()
    q = args.quick
    cuda = device.type == "cuda"
    arch = args.arch or ("vit_test_tiny" if q else "vit_small_patch8")
    n_img = args.images or (4 if q else 64)
    k = args.k or (4 if q else 171)
    crop_batch = args.crop_batch or (8 if q else (256 if cuda else 16))
    label_batch = args.label_batch or (4 if q else (32 if cuda else 8))
    train_batch = args.train_batch or (4 if q else (64 if cuda else 8))
    steps = args.steps or (2 if q else 8)
    stage_size = 128 if q else 640
    crop_size = 32 if q else 320
    label_size = 64 if q else 320
    train_size = 64 if q else 320
    amp = torch.bfloat16 if cuda else None  # precision=auto: bf16 autocast on CUDA
    sections = [n for n in args.sections.split(",") if n]
    config = {
        "arch": arch, "images": n_img, "k": k, "crop_batch": crop_batch, "label_batch": label_batch,
        "train_batch": train_batch, "steps": steps, "stage_size": stage_size, "crop_size": crop_size,
        "label_size": label_size, "train_size": train_size, "compile": args.compile,
        "amp": "bf16" if amp else "fp32", "jpeg_size": [960, 720] if not q else [160, 120],
    }  # fmt: skip
    result = new_result("throughput", args, device, config)
    res = result["results"]
    tmp = Path(tempfile.mkdtemp(prefix="transfgu_bench_throughput_"))
    write_jpegs(tmp / "images", n_img, (960, 720) if not q else (160, 120))

    torch.manual_seed(0)
    bb = build_backbone(arch, "none").to(device)
    compile_forward(bb, mode=args.compile)
    compiled = bool(getattr(bb, "_transfgu_compiled", False))
    res["backbone_compiled"] = compiled

    def cfg_for(name: str, n: int) -> Any:
        over = {
            "data.name": "folder", "data.root": str(tmp / "images"), "data.max_train_images": str(n),
            "backbone.arch": arch, "backbone.weights": "none", "run.root": str(tmp / "runs"), "run.name": name,
            "run.device": device.type, "mlflow.enabled": "false",
            "crops.input_size": f"[{stage_size}, {stage_size}]", "crops.crop_size": str(crop_size),
            "crops.batch_size": str(crop_batch), "crops.betas": "[0.5, 0.4, 0.3, 0.2]" if not q else "[0.5, 0.3]",
            "pseudo.input_size": f"[{label_size}, {label_size}]", "pseudo.batch_size": str(label_batch),
            "concepts.k_per_pool": f"{{fg: {k}}}",
        }  # fmt: skip
        return load_config(None, [f"{a}={b}" for a, b in over.items()])

    def context(name: str, n: int) -> Any:
        ctx = run_context(cfg_for(name, n))
        ctx.backbone = bb
        return ctx

    # -- extract -------------------------------------------------------------------------------------------
    def sec_extract() -> None:
        warm = min(n_img, stages.SHARD_IMAGES)
        local.run_extract(context("warm_extract", warm))  # compile + allocator warm-up, not timed
        info, wall = _timed(lambda: local.run_extract(context("extract", n_img)), device)
        crops_n = int(info["rows"])
        x_img = torch.randn(min(n_img, stages.SHARD_IMAGES), 3, stage_size, stage_size, device=device)
        res["extract_cuda_syncs_per_shard"] = count_syncs(
            lambda: extract_crops_batch(bb, x_img, crop_size=crop_size, batch_size=crop_batch, autocast_dtype=amp),
            device,
        )
        stage_cps = crops_n / wall
        # Kernel only: a plain timm ViT (the same weights, no wrapper, no crops, no I/O) on random crops on the
        # device at the same batch size, compiled when the stage's backbone is, and eager.
        vit = copy.deepcopy(bb.vit).eval()
        x = torch.randn(crop_batch, 3, crop_size, crop_size, device=device)
        n_calls = max(1, round(crops_n / crop_batch))

        def kernel(fn: Any) -> float:
            ac = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
            with torch.inference_mode(), ac:
                fn(x)  # warm-up / compile
                _, s = _timed(lambda: [fn(x) for _ in range(n_calls)], device)
            return n_calls * crop_batch / s

        eager_cps = kernel(vit.forward_features)
        if compiled:  # the compiled forward gives the eager features (within bf16 / kernel-order tolerance)
            ac = torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)
            with torch.inference_mode(), ac:
                a, b = bb(x).cls.float(), bb._transfgu_eager_forward(x).cls.float()
            res["compiled_vs_eager_cls"] = {
                "max_abs_diff": float((a - b).abs().max()), "max_abs": float(b.abs().max()),
                "cosine_min": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()),
                "compile_failed": bool(bb._transfgu_compile_state["failed"]),
            }  # fmt: skip
        compiled_cps = None
        if compiled:
            try:
                compiled_cps = kernel(torch.compile(vit.forward_features))
            except Exception as exc:  # noqa: BLE001 -- recorded, not fatal
                result["notes"].append(f"compiled plain timm failed: {type(exc).__name__}: {exc}")
        ref = compiled_cps or eager_cps
        flops = backbone_flops(bb, crop_size, crop_size)
        res["extract"] = {
            "images": n_img, "crops": crops_n, "wall_s": wall, "stage_crops_per_s": stage_cps,
            "plain_timm_eager_crops_per_s": eager_cps, "plain_timm_compiled_crops_per_s": compiled_cps,
            "flops_per_crop": flops, "stage_tflops": stage_cps * flops / 1e12,
        }  # fmt: skip
        result["comparisons"].append(
            comparison(
                "extract crops/s / plain timm crops/s (" + ("compiled" if compiled_cps else "eager") + ")",
                "plain timm ViT forward_features on device crops" + (" (torch.compile)" if compiled_cps else ""),
                "local.run_extract (decode, prior pass, crops, table, Parquet)",
                stage_cps / ref, "fraction of kernel rate", ">= 0.9 (GPU)", (stage_cps / ref >= 0.9) if cuda else None,
                stage_crops_per_s=stage_cps, kernel_crops_per_s=ref,
            )  # fmt: skip
        )
        _save_partial(result, args)

    # -- label bank ----------------------------------------------------------------------------------------
    def sec_label_bank() -> None:
        dim = bb.embed_dim
        cents = np.random.default_rng(0).normal(size=(k, dim)).astype(np.float32)

        def lb_context(name: str, n: int) -> Any:
            ctx = context(name, n)
            ConceptBank(cents, ["fg"] * k, {"fg": k}, seed=0, niter=1).save(ctx.run_dir / "concepts")
            # stamped as the concepts stage would (the label-bank stage checks what produced its concepts)
            stamp_json(ctx.layout.concepts / ConceptBank.META_FILE, ctx.hashes["concepts"])
            return ctx

        local.run_label_bank(lb_context("warm_label_bank", min(n_img, label_batch)))
        ctx = lb_context("label_bank", n_img)
        info, wall = _timed(lambda: local.run_label_bank(ctx), device)
        stage_ips = int(info["rows"]) / wall
        lb_amp = ctx.amp  # whatever precision the stage used
        x = torch.randn(label_batch, 3, label_size, label_size, device=device)
        c = torch.from_numpy(cents).to(device)
        pcfg = ctx.cfg.pseudo
        n_calls = max(1, round(n_img / label_batch))
        concept_maps(bb, x, c, grad_scale=pcfg.grad_scale, mass=pcfg.mass, autocast_dtype=lb_amp)
        _, s = _timed(
            lambda: [concept_maps(bb, x, c, grad_scale=pcfg.grad_scale, mass=pcfg.mass, autocast_dtype=lb_amp)
                     for _ in range(n_calls)], device,
        )  # fmt: skip
        kernel_ips = n_calls * label_batch / s
        # Compression level by measurement: the stage's own shard rewritten at a few zstd levels (write seconds on
        # one thread, bytes); the writer thread hides the write as long as it is shorter than the model's part.
        import io

        import pyarrow.parquet as pq

        shard = sorted((ctx.run_dir / "label_bank").glob("part-*.parquet"))[0]
        table = pq.read_table(shard)
        levels = {}
        for level in (1, 3, 9):
            buf = io.BytesIO()
            t0 = time.perf_counter()
            pq.write_table(table, buf, compression="zstd", compression_level=level)
            levels[str(level)] = {"write_s": time.perf_counter() - t0, "bytes": buf.tell(), "rows": table.num_rows}
        res["label_bank_zstd_levels"] = levels
        res["label_bank"] = {
            "images": n_img, "k": k, "wall_s": wall, "stage_images_per_s": stage_ips,
            "kernel_images_per_s": kernel_ips, "amp": str(lb_amp),
        }  # fmt: skip
        result["comparisons"].append(
            comparison(
                "label bank images/s / concept_maps-only images/s",
                f"concept_maps on device batches of {label_batch}",
                "local.run_label_bank (decode, resize, maps, float16, table, Parquet)",
                stage_ips / kernel_ips, "fraction of kernel rate", ">= 0.5 (GPU)",
                (stage_ips / kernel_ips >= 0.5) if cuda else None, stage_images_per_s=stage_ips,
                kernel_images_per_s=kernel_ips,
            )  # fmt: skip
        )
        _save_partial(result, args)

    # -- training ------------------------------------------------------------------------------------------
    def sec_training() -> None:
        from transfgu.models.decoder import MaskTransformerDecoder

        n_train = train_batch * steps
        write_jpegs(tmp / "train", n_train, (960, 720) if not q else (160, 120), seed=1)
        cfg = cfg_for("train", n_train)
        cfg.data.root = tmp / "train"
        records = loaders.split_records(cfg, cfg.data.train_split)
        h = train_size // bb.patch_size
        rng = np.random.default_rng(0)
        bank = {r.image_id: rng.random((27, h, h)).astype(np.float16) for r in records}
        ds = loaders.BankDataset(records, bank, (train_size, train_size))
        loader = PrefetchLoader(step_loader(ds, train_batch, seed=0))  # as run_train builds it
        torch.manual_seed(0)
        d = bb.embed_dim
        student = MaskTransformerDecoder(n_classes=27, d_encoder=d, d_model=d, n_heads=max(1, d // 64)).to(device)
        teacher = make_teacher(student)
        opt = make_optimizer(student, lr=1e-4)
        plan = EpochPlan(epoch=2, bootstrapping=True, reboot=False, epoch_iter=0, alpha=0.1)
        gen = torch.Generator().manual_seed(0)

        def epoch() -> dict[str, float]:
            return train_one_epoch(student, teacher, bb, loader, opt, plan, device, generator=gen, log_every=0,
                                   amp_dtype=amp)  # fmt: skip

        _, first = _timed(epoch, device)  # decodes every JPEG (BankDataset then caches them) + warm-up
        _, wall = _timed(epoch, device)
        syncs = count_syncs(epoch, device)  # CUDA only: host synchronisations in one epoch of `steps` steps
        crops = torch.randn(train_batch, 3, train_size // 2, train_size // 2, device=device)

        def floor() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                for _ in range(steps):
                    bb(crops)

        floor()
        _, f_s = _timed(floor, device)
        res["training"] = {
            "images": n_train, "first_epoch_s": first, "epoch_s": wall, "images_per_s": n_train / wall,
            "first_epoch_images_per_s": n_train / first, "backbone_only_images_per_s": n_train / f_s,
            "cuda_syncs_per_epoch": syncs, "steps": steps,
        }  # fmt: skip
        result["comparisons"].append(
            comparison(
                "bootstrapping epoch images/s / frozen-backbone-only images/s",
                "backbone forward on the crops (same batch, precision, compile)",
                "train_one_epoch with teacher over BankDataset + PrefetchLoader (2nd epoch, images cached)",
                f_s / wall, "fraction of kernel rate", ">= 0.5 (GPU)", (f_s / wall >= 0.5) if cuda else None,
                images_per_s=n_train / wall, floor_images_per_s=n_train / f_s,
                first_epoch_images_per_s=n_train / first,
            )  # fmt: skip
        )
        _save_partial(result, args)

    # -- pseudo labels vs one forward ----------------------------------------------------------------------
    def sec_pseudo_labels() -> None:
        b = 8 if not q else 2
        x = torch.randn(b, 3, label_size, label_size, device=device)
        c = torch.randn(k, bb.embed_dim, device=device)
        dtypes = [("fp32", None)] + ([("bf16", torch.bfloat16)] if cuda else [])
        res["pseudo_labels"] = {}
        # Both sides eager (concept_maps does not use the compiled forward), which also saves two compilations.
        eager_fwd = getattr(bb, "_transfgu_eager_forward", bb.forward)
        for name, dt in dtypes:

            def fwd(dt: torch.dtype | None = dt) -> None:
                ac = torch.autocast(device.type, dtype=dt or torch.float32, enabled=dt is not None)
                with torch.inference_mode(), ac:
                    eager_fwd(x)

            def maps(dt: torch.dtype | None = dt) -> None:
                concept_maps(bb, x, c, autocast_dtype=dt)

            fwd(), maps()
            f_runs, m_runs = [], []
            for _ in range(3 if not q else 1):  # interleaved rounds, min reported
                f_runs.append(_timed(fwd, device)[1])
                m_runs.append(_timed(maps, device)[1])
            ratio = min(m_runs) / min(f_runs)
            res["pseudo_labels"][name] = {"forward_s": f_runs, "concept_maps_s": m_runs, "batch": b, "k": k}
            result["comparisons"].append(
                comparison(
                    f"pseudo labels / one forward ({name}, K={k}, B={b})", f"backbone forward ({name})",
                    f"concept_maps ({name})", ratio, "x time", "<= 1.0", ratio <= 1.0,
                )  # fmt: skip
            )
        _save_partial(result, args)

    # Sections in the order asked for: the cheap, compile-free ones first, so that a run cut short by a time limit
    # still has them (each section's result is saved as soon as it is done).
    funcs = {"extract": sec_extract, "label_bank": sec_label_bank, "training": sec_training,
             "pseudo_labels": sec_pseudo_labels}  # fmt: skip
    unknown = [n for n in sections if n not in funcs]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {sorted(funcs)}")
    for name in sections:
        t0 = time.perf_counter()
        funcs[name]()
        res.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        _save_partial(result, args)

    result["notes"].append(
        f"backbone forward {'compiled (torch.compile)' if compiled else 'eager'}; random weights; synthetic JPEGs "
        f"in {tmp} (deleted at exit)"
    )
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return finish(result, args, t_start)


if __name__ == "__main__":
    main()
