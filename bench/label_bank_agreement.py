"""Does the stored label bank keep the float32 definition's decisions? And what does it cost on disk?

Runs the label-bank stage code (``transfgu.stages.build_label_maps`` with a preset's ``pseudo`` settings, default
precision unless ``--precision`` says otherwise) on real images, writes the Parquet bank, reads it back with
``store.formats.read_label_bank`` and compares, at every position, the argmax over concepts and the per-concept gate
with the float32 definition (``concept_map_parts`` with autocast off and TF32 off) computed on the same device.
For context it also scores the old float16 storage and the bf16 opt-in (``pseudo.precision=bf16``) the same way,
and, with ``--naive N``, the reference's K-full-backward oracle on the first N images.

Bytes per image: the Parquet bank (zstd) against the reference's float32 pickles (``pickle.dumps`` of the
``(K_pool, h, w)`` float32 arrays, one per pool as the reference stores COCO's fg and bg files; measured in memory,
nothing is pickled to disk), plus alternative encodings measured as advice.

The backbone is ViT-S/8 with random weights unless ``--weights`` names a DINO checkpoint; concepts are CLS tokens
of the images' own crops, perturbed (no crop stage is run), so the numbers are about storage and arithmetic, not
about the method's quality. Prints one JSON object.

    python -m bench.label_bank_agreement --device cuda --images ../shared/data/camvid/images/train --n 32
    python -m bench.label_bank_agreement --device cpu --n 4 --size 96 96   # a quick CPU run
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _args(argv: list[str] | None) -> argparse.Namespace:
    default_images = Path(os.environ.get("TRANSFGU_SHARED_DATA", "../shared/data")) / "camvid" / "images" / "train"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--images", type=Path, default=default_images, help="folder of .jpg/.png images")
    p.add_argument("--n", type=int, default=8, help="number of images")
    p.add_argument("--preset", default="conf/coco_stuff171.yaml", help="preset whose pseudo/concepts settings apply")
    p.add_argument("--k", type=int, nargs="*", default=None, help="K values (default: the preset's K, and 27)")
    p.add_argument("--size", type=int, nargs=2, default=None, help="override pseudo.input_size (H W)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16"), help="override pseudo.precision")
    p.add_argument("--weights", default="none", help="backbone weights (default: random ViT-S/8)")
    p.add_argument("--naive", type=int, default=0, help="also compare the K-backward oracle on this many images")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    return p.parse_args(argv)


def _agree(maps: np.ndarray, ref: np.ndarray, gate: np.ndarray | None, ref_gate: np.ndarray) -> dict[str, float]:
    """Fractions of positions (argmax) and of (concept, position) pairs (gate) that agree; maps are (B, K, h, w)."""
    g = (maps > 0) if gate is None else gate
    return {
        "argmax": float((maps.argmax(1) == ref.argmax(1)).mean()),
        "gate": float((g == ref_gate).mean()),
        "bit_identical_maps": float((maps.view(np.uint32) == ref.view(np.uint32)).mean()),
    }


def _pickle_len(a: np.ndarray) -> int:
    return len(pickle.dumps(np.ascontiguousarray(a, dtype=np.float32), protocol=pickle.HIGHEST_PROTOCOL))


def _alt_tables(ids: list[str], lms: list[Any], maps: np.ndarray) -> dict[str, Any]:
    """Alternative encodings of the same maps (advice only; not what the pipeline writes)."""
    import pyarrow as pa

    from transfgu.store.formats import label_bank_table

    t = label_bank_table(ids, lms)
    bool_gate = pa.array([m.gate.reshape(-1).tolist() for m in lms], type=pa.large_list(pa.bool_()))
    dense16 = pa.array([m.reshape(-1) for m in maps.astype(np.float16)], type=pa.large_list(pa.float16()))
    dense32 = pa.array([m.reshape(-1) for m in maps], type=pa.large_list(pa.float32()))
    bss = {"use_dictionary": False, "column_encoding": {"maps": "BYTE_STREAM_SPLIT"}}
    return {
        "v2_gate_as_list_bool": (t.set_column(t.schema.get_field_index("gate"), "gate", bool_gate), {}),
        "v1_dense_float16 (lossy)": (pa.table({"image_id": ids, "maps": dense16}), {}),
        "dense_float32": (pa.table({"image_id": ids, "maps": dense32}), {}),
        "dense_float32_byte_stream_split": (pa.table({"maps": dense32}), bss),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transfgu.config import load_config
    from transfgu.data.io import load_rgb
    from transfgu.data.transforms import to_model_input
    from transfgu.models.backbone import build_backbone
    from transfgu.pseudo_labels import concept_map_parts, naive_concept_maps
    from transfgu.stages import build_label_maps
    from transfgu.store.formats import label_bank_table, read_label_bank, write_parquet_atomic

    device = torch.device(a.device)
    files = sorted(p for p in a.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: a.n]
    if not files:
        raise SystemExit(f"no images in {a.images}")
    images = [load_rgb(f) for f in files]
    ids = [f.stem for f in files]
    over = [f"pseudo.input_size=[{a.size[0]}, {a.size[1]}]"] if a.size else []
    if a.precision:
        over.append(f"pseudo.precision={a.precision}")
    cfg = load_config(a.preset, over)
    p = cfg.pseudo
    torch.manual_seed(0)
    bb = build_backbone("vit_small_patch8", a.weights).to(device)
    k_pref = cfg.concepts.k
    ks = a.k if a.k else sorted({k_pref, 27})

    # Concepts: CLS tokens of four crops per image, perturbed (as many as the largest K).
    with torch.no_grad():
        x2 = torch.stack([to_model_input(im, (2 * p.input_size[0], 2 * p.input_size[1])) for im in images])
        hh, ww = p.input_size
        mid = x2[:, :, hh // 2 : hh // 2 + hh, ww // 2 : ww // 2 + ww]
        crops = torch.cat([x2[:, :, :hh, :ww], x2[:, :, hh:, ww:], mid, x2[:, :, :hh, ww:]])
        cls = torch.cat([bb(crops[i : i + 8].to(device)).cls.cpu() for i in range(0, len(crops), 8)])
    g = torch.Generator().manual_seed(1)
    base = cls[torch.arange(max(ks)) % cls.shape[0]]
    cents_all = (base + 0.3 * base.std() * torch.randn(base.shape, generator=g)).numpy()

    out: dict[str, Any] = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "images": str(a.images), "n_images": len(images), "preset": a.preset,
        "pseudo": {"input_size": list(p.input_size), "grad_scale": p.grad_scale, "precision": p.precision,
                   "batch_size": p.batch_size, "resize_mode": p.resize_mode},
        "weights": a.weights, "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "by_k": {},
    }
    for k in ks:
        c = cents_all[:k]
        res: dict[str, Any] = {}
        t0 = time.perf_counter()
        lms = build_label_maps(bb, images, c, p, device)  # the stage's code path, cfg as given
        res["stage_seconds"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "part-00000.parquet"
            write_parquet_atomic(label_bank_table(ids, lms), path)
            bank_bytes = path.stat().st_size
            back = read_label_bank(tmp, dense=False)
        stored = np.stack([back[i].dense() for i in ids])
        stored_gate = np.stack([back[i].gate for i in ids])
        # The float32 definition on the same device, batch by batch as the stage groups images.
        ref, ref_gate, bf = [], [], []
        ct = torch.from_numpy(c).to(device)
        for s in range(0, len(images), p.batch_size):
            group = images[s : s + p.batch_size]
            x = torch.stack([to_model_input(im, tuple(p.input_size), p.resize_mode) for im in group]).to(device)
            parts, (h, w) = concept_map_parts(bb, x, ct, p.grad_scale, p.mass)
            ref.append(parts.maps().reshape(len(x), k, h, w).cpu().numpy())
            ref_gate.append(parts.gate.reshape(len(x), k, h, w).cpu().numpy())
            pb, _ = concept_map_parts(bb, x, ct, p.grad_scale, p.mass, autocast_dtype=torch.bfloat16)
            bf.append((pb.maps().reshape(len(x), k, h, w).cpu().numpy(),
                       pb.gate.reshape(len(x), k, h, w).cpu().numpy()))
        ref_a, gate_a = np.concatenate(ref), np.concatenate(ref_gate)
        res["stored_bank_vs_fp32"] = _agree(stored, ref_a, stored_gate, gate_a)
        res["float16_storage_vs_fp32"] = _agree(ref_a.astype(np.float16).astype(np.float32), ref_a, None, gate_a)
        bf_maps, bf_gate = np.concatenate([m for m, _ in bf]), np.concatenate([g_ for _, g_ in bf])
        res["bf16_optin_vs_fp32"] = _agree(bf_maps, ref_a, bf_gate, gate_a)
        srt = np.sort(ref_a, axis=1)
        gap = srt[:, -1] - srt[:, -2]
        res["median_top2_gap"] = float(np.median(gap[gap > 0])) if (gap > 0).any() else 0.0
        res["tied_top2_fraction"] = float((gap == 0).mean())
        if a.naive:
            m = min(a.naive, len(images))
            x = torch.stack([to_model_input(im, tuple(p.input_size), p.resize_mode) for im in images[:m]]).to(device)
            naive = naive_concept_maps(bb, x, ct, p.grad_scale, p.mass).cpu().numpy()
            res["stored_bank_vs_naive_oracle"] = _agree(stored[:m], naive, stored_gate[:m], naive > 0)
        # Bytes per image against the reference's float32 pickles (one per pool, as COCO's fg/bg files).
        pools = list(cfg.concepts.k_per_pool.values()) if k == k_pref else [k]
        splits = np.cumsum(pools)[:-1]
        ref_bytes = sum(_pickle_len(part) for m in ref_a for part in np.split(m, splits, axis=0))
        sizes = {"parquet_v2 (pipeline)": bank_bytes}
        with tempfile.TemporaryDirectory() as tmp:
            for name, (table, kwargs) in _alt_tables(ids, [back[i] for i in ids], ref_a).items():
                pth = Path(tmp) / "alt.parquet"
                write_parquet_atomic(table, pth, **kwargs)
                sizes[name] = pth.stat().st_size
        res["bytes_per_image"] = {
            "reference_float32_pickles": ref_bytes / len(images),
            **{name: b / len(images) for name, b in sizes.items()},
        }
        res["bank_over_reference"] = bank_bytes / ref_bytes
        res["kept_bonus_per_image"] = float(np.mean([back[i].index.size for i in ids]))
        out["by_k"][str(k)] = res
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
