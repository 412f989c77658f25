"""Keyed dropout masks: cost of drawing them and of the masked decoder step, next to the frozen backbone.

Per training step of ``--batch`` crops (``--crop`` px, ViT-S/8 tokens, K = 27 classes, the reference decoder:
2 blocks, width 384, 6 heads, dropout 0.1), median of ``--repeat`` runs, in one process:

* ``draw``: :func:`transfgu.models.dropout.draw_keep_masks` with one key per sample (what ``train_one_epoch`` does),
* ``masked``: student forward + backward with those masks (attention weights materialised),
* ``sdpa_dropout``: the same without masks, dropout inside ``scaled_dot_product_attention`` (the old per-rank path),
* ``backbone``: the frozen ViT-S/8 forward on the crops (the floor every step pays; ``--no-backbone`` skips it).

Run: ``PYTHONPATH=$PWD python -m bench.dropout_masks [--device cuda] [--batch 8] [--crop 160]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def _median_s(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    from transfgu.ddp import step_seed
    from transfgu.models.backbone import build_backbone
    from transfgu.models.decoder import MaskTransformerDecoder
    from transfgu.models.dropout import draw_keep_masks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=160, help="crop side in px (half of the 320 train size)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-backbone", action="store_true")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    n = (a.crop // 8) ** 2
    dec = MaskTransformerDecoder(27, d_encoder=384, d_model=384, n_layers=2, n_heads=6, dropout=0.1).to(dev).train()
    x = torch.randn(a.batch, n, 384, device=dev)
    grid = (a.crop // 8, a.crop // 8)
    shapes = dec.dropout_shapes(n)
    keys = [step_seed(0, 0, 0, 1 + q) for q in range(a.batch)]

    def draw() -> list[torch.Tensor]:
        return draw_keep_masks(shapes, 0.1, a.batch, dev, keys)

    keep = draw()

    def masked() -> None:
        logits, emb = dec(x, grid, keep)
        (logits.square().mean() + emb.sum()).backward()

    def sdpa() -> None:
        logits, emb = dec(x, grid)
        (logits.square().mean() + emb.sum()).backward()

    out = {"draw": _median_s(draw, dev, a.repeat), "masked": _median_s(masked, dev, a.repeat),
           "sdpa_dropout": _median_s(sdpa, dev, a.repeat)}  # fmt: skip
    if not a.no_backbone:
        bb = build_backbone("vit_small_patch8", weights="none").to(dev).eval()
        crops = torch.randn(a.batch, 3, a.crop, a.crop, device=dev)
        with torch.no_grad():
            out["backbone"] = _median_s(lambda: bb(crops), dev, a.repeat)
    mib = sum(m.numel() for m in keep) / 2**20
    print(f"device {dev}, batch {a.batch}, crop {a.crop} ({n} patches + 27 classes), masks {mib:.1f} MiB (bool)")
    for k, v in out.items():
        print(f"  {k:13s} {1e3 * v:9.2f} ms")
    print(f"  draw / masked decoder step      {out['draw'] / out['masked']:.3f}")
    print(f"  masked / sdpa-dropout step      {out['masked'] / out['sdpa_dropout']:.3f}")
    if "backbone" in out:
        step = out["backbone"] + out["masked"]
        print(f"  draw / (backbone + masked step) {out['draw'] / step:.3f}")
    return out


if __name__ == "__main__":
    main()
