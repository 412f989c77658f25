"""Train the *supervised stand-in prior*: a small ViT/8 whose features know something about semantics.

Why: no DINO weights can be downloaded on the development machines, and a random backbone makes every stage of the
method produce noise (CamVid demo: ~8 % mIoU), so no test can tell a working method from a broken one. This tool
trains, with labels, a small timm ``VisionTransformer`` with the structure of the supported backbones (patch 8, CLS
token, pre-norm blocks; the ``vit_standin`` arch of :mod:`transfgu.models.backbone`) on the *training* split of a
labelled stand-in set. Its weights are saved as safetensors in the DINO/timm key layout, so they load through
``backbone.weights=<file>``, and carry the metadata ``transfgu_prior = "supervised stand-in"``: runs that use them
record ``prior: supervised stand-in`` and ``pretrained: false``. It is a test fixture, not the method, and its
numbers are never the method's.

Objective (two heads, dropped when saving):

* CLS head: cross-entropy against the majority ground-truth class of the crop (what the concept stage clusters),
  with logits = minus the squared distance of the CLS to a learnt prototype per class, so that the classes form
  Euclidean clusters of the raw CLS (the concept stage's k-means is L2 on raw features);
* patch head: cross-entropy of every patch token against the ground-truth class at the patch centre (what the
  decoder reads and what the attention Grad-CAM of the pseudo labels localises).

Each step draws a batch of random crops (random scale and aspect, random flip) from the training images resized once
to ``--image-size``, at one of a few output sizes (square crops like the concept stage, wider views like the
pseudo-label and training stages), so the position embedding is trained at the grids the pipeline uses.

Deterministic: a fixed seed drives every draw, and the tool pins ``torch.set_num_threads`` (``--threads``); the same
command on the same software gives the same file.

    python -m transfgu.tools.standin_prior --dataset camvid --root ../shared/data/camvid \\
        --out tests/assets/standin_camvid.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfgu.data.datasets import dataset_spec, list_records, load_sample
from transfgu.models.backbone import PRIOR_METADATA_KEY, PRIOR_STANDIN, _create_vit, normalize
from transfgu.store.atomic import fix_mode

log = logging.getLogger(__name__)

ARCH = "vit_standin"


@dataclass
class StandinSettings:
    """Everything that determines the stand-in's weights (stored in the file's metadata)."""

    dataset: str = "camvid"
    split: str = "train"
    image_size: tuple[int, int] = (192, 256)
    steps: int = 300
    tokens_per_step: int = 2048  # batch size = tokens_per_step // patches per crop (32 crops of 64 x 64)
    lr: float = 2.0e-3
    weight_decay: float = 0.05
    seed: int = 0
    threads: int = 1  # one thread: the same sums in the same order on every machine, and no OpenMP stalls on a busy one
    max_images: int = 0  # 0 = the whole split
    min_area: float = 0.1  # smallest crop, as a share of the image area
    cls_weight: float = 1.0  # weight of the CLS (crop class) loss against the patch loss
    # "prototype": CLS logits = -squared L2 distance to a learnt prototype per class, so the classes become Euclidean
    # clusters of the raw CLS, the geometry the concept stage's k-means sees; "linear": a linear head (linearly
    # separable classes, which k-means does not find: concept purity no better than the random backbone's).
    cls_head: str = "prototype"


#: (height, width) of the crops a step is trained at: crop-stage squares and pseudo-label / training views.
OUT_SIZES: tuple[tuple[int, int], ...] = ((48, 48), (64, 64), (64, 80), (96, 128))


def load_split(dataset: str, root: str | Path, split: str, size: tuple[int, int], max_images: int = 0,
               **options: object) -> tuple[Tensor, Tensor, int, int]:
    """Images ``(N, 3, H, W)`` uint8 and labels ``(N, H, W)`` int64 (-1 = ignore) of a split, resized to ``size``.

    Returns ``(images, labels, n_classes, n_skipped)``; images without a readable label are skipped.
    """
    spec = dataset_spec(dataset, root, **options)
    records = list(list_records(dataset, root, split, **options))
    if max_images:
        records = records[:max_images]
    images, labels, skipped = [], [], 0
    for rec in records:
        try:
            img, lab = load_sample(rec, spec.label_map)
        except (OSError, ValueError) as exc:
            log.warning("stand-in: skipping %s (%s)", rec.image_path, exc)
            skipped += 1
            continue
        if lab is None:
            skipped += 1
            continue
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
        y = torch.from_numpy(np.array(lab)).long()
        y = F.interpolate(y[None, None].float(), size=size, mode="nearest")[0, 0].long()
        y[(y < 0) | (y >= spec.n_classes) | (y == spec.ignore_index)] = -1
        images.append(x.to(torch.uint8))
        labels.append(y)
    if not images:
        raise RuntimeError(f"stand-in: no labelled image in {dataset} split {split!r} at {root}")
    return torch.stack(images), torch.stack(labels), spec.n_classes, skipped


def majority(labels: Tensor, n_classes: int) -> Tensor:
    """Most frequent class of each ``(B, h, w)`` label crop, ignoring -1; -1 when a crop has no labelled pixel."""
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    valid = flat >= 0
    counts = torch.zeros(b, n_classes, dtype=torch.long)
    counts.scatter_add_(1, flat.clamp_min(0), valid.long())
    out = counts.argmax(dim=1)
    out[counts.sum(dim=1) == 0] = -1
    return out


def sample_batch(
    images: Tensor, labels: Tensor, out_hw: tuple[int, int], batch: int, gen: torch.Generator,
    min_area: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Random crops (area ``min_area``-100 % of the image at the output aspect, random flip) resized to ``out_hw``."""
    n, _, hh, ww = images.shape
    idx = torch.randint(n, (batch,), generator=gen)
    aspect = out_hw[1] / out_hw[0]
    xs, ys = [], []
    for i in idx.tolist():
        frac = min_area + (1.0 - min_area) * float(torch.rand((), generator=gen))
        ch = min(hh, max(8, int(round(math.sqrt(frac * hh * ww / aspect)))))
        cw = min(ww, max(8, int(round(ch * aspect))))
        y0 = int(torch.randint(hh - ch + 1, (), generator=gen))
        x0 = int(torch.randint(ww - cw + 1, (), generator=gen))
        x = images[i : i + 1, :, y0 : y0 + ch, x0 : x0 + cw].float()
        y = labels[i : i + 1, None, y0 : y0 + ch, x0 : x0 + cw].float()
        x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=out_hw, mode="nearest")
        if float(torch.rand((), generator=gen)) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)[:, 0].long()


class StandinModel(nn.Module):
    """The backbone plus the two linear training heads (CLS -> crop class, patch token -> patch class)."""

    def __init__(self, n_classes: int, cls_head: str = "linear") -> None:
        super().__init__()
        self.vit = _create_vit(ARCH, pretrained_tag=False)
        d = int(self.vit.embed_dim)
        if cls_head not in ("linear", "prototype"):
            raise ValueError(f"cls_head must be 'linear' or 'prototype', got {cls_head!r}")
        self.prototype = cls_head == "prototype"
        self.cls_head = nn.Linear(d, n_classes)  # made in both modes: the seeded draws stay in the same order
        if self.prototype:
            self.prototypes = nn.Parameter(torch.randn(n_classes, d))
        self.patch_head = nn.Linear(d, n_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.vit.forward_features(x)  # (B, 1 + h*w, D) after the final LayerNorm
        p = self.vit.num_prefix_tokens
        if self.prototype:
            # Classes as Euclidean clusters of the raw CLS: the geometry the concept stage's k-means sees.
            cls = -torch.cdist(t[:, 0], self.prototypes).pow(2) / t.shape[-1] ** 0.5
        else:
            cls = self.cls_head(t[:, 0])
        return cls, self.patch_head(t[:, p:])


def train_standin(
    images: Tensor, labels: Tensor, n_classes: int, s: StandinSettings, log_every: int = 25
) -> tuple[nn.Module, dict[str, float]]:
    """Train the stand-in; returns the timm ViT (heads dropped) and the last logged losses/accuracies."""
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    model = StandinModel(n_classes, s.cls_head)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.steps, pct_start=0.1)
    model.train()
    stats = {"loss": float("nan"), "cls_acc": float("nan"), "patch_acc": float("nan")}
    run = {"loss": 0.0, "cls_ok": 0.0, "cls_n": 0.0, "patch_ok": 0.0, "patch_n": 0.0, "n": 0}
    t0 = time.time()
    for step in range(s.steps):
        out_hw = OUT_SIZES[step % len(OUT_SIZES)]
        ps = 8
        # A fixed token budget per step keeps the cost of the large views down (the cost is linear in tokens).
        batch = max(4, s.tokens_per_step // ((out_hw[0] // ps) * (out_hw[1] // ps)))
        x, y = sample_batch(images, labels, out_hw, batch, gen, s.min_area)
        # The class at each patch centre is the patch target (nearest sampling of the label crop).
        y_patch = y[:, ps // 2 :: ps, ps // 2 :: ps].reshape(y.shape[0], -1)
        y_cls = majority(y, n_classes)
        cls_logits, patch_logits = model(normalize(x))
        loss = s.cls_weight * F.cross_entropy(cls_logits, y_cls, ignore_index=-1) + F.cross_entropy(
            patch_logits.reshape(-1, n_classes), y_patch.reshape(-1), ignore_index=-1
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            vc, vp = y_cls >= 0, y_patch >= 0
            run["loss"] += float(loss)
            run["cls_ok"] += float((cls_logits.argmax(1) == y_cls)[vc].sum())
            run["cls_n"] += float(vc.sum())
            run["patch_ok"] += float((patch_logits.argmax(-1) == y_patch)[vp].sum())
            run["patch_n"] += float(vp.sum())
            run["n"] += 1
        if (step + 1) % log_every == 0 or step + 1 == s.steps:
            stats = {
                "loss": run["loss"] / run["n"],
                "cls_acc": run["cls_ok"] / max(run["cls_n"], 1.0),
                "patch_acc": run["patch_ok"] / max(run["patch_n"], 1.0),
            }
            log.info("stand-in step %d/%d loss %.3f cls acc %.3f patch acc %.3f (%.0fs)", step + 1, s.steps,
                     stats["loss"], stats["cls_acc"], stats["patch_acc"], time.time() - t0)
            run = {k: 0.0 for k in run}
    model.eval()
    return model.vit, stats


def save_standin(vit: nn.Module, path: str | Path, settings: StandinSettings, stats: dict[str, float],
                 n_classes: int, n_images: int) -> Path:
    """Write the backbone weights (timm/DINO key layout, no heads) with the stand-in metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    meta = {
        PRIOR_METADATA_KEY: PRIOR_STANDIN,
        "arch": ARCH,
        "settings": json.dumps(asdict(settings), sort_keys=True),
        "train_stats": json.dumps({k: round(v, 4) for k, v in stats.items()}, sort_keys=True),
        "n_classes": str(n_classes),
        "n_images": str(n_images),
        "note": "supervised on the training split of a labelled stand-in set: a test fixture, NOT the method",
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    fix_mode(tmp)  # safetensors writes 0600; the umask decides
    tmp.replace(path)
    return path


def build_standin(root: str | Path, out: str | Path, settings: StandinSettings | None = None,
                  **data_options: object) -> Path:
    """Load the split, train, save: the whole tool as a function (tests call it to build a cached prior)."""
    s = settings or StandinSettings()
    torch.set_num_threads(s.threads)
    images, labels, n_classes, skipped = load_split(
        s.dataset, root, s.split, tuple(s.image_size), s.max_images, **data_options
    )
    log.info("stand-in: %d %s/%s images (%d skipped), %d classes", len(images), s.dataset, s.split, skipped, n_classes)
    vit, stats = train_standin(images, labels, n_classes, s)
    return save_standin(vit, out, s, stats, n_classes, len(images))


def main(argv: Sequence[str] | None = None) -> int:
    d = StandinSettings()
    p = argparse.ArgumentParser(prog="python -m transfgu.tools.standin_prior", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=d.dataset, help="a labelled data set name (camvid, msrc_v2, ccp, ...)")
    p.add_argument("--root", required=True, help="the data set's root folder")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--split", default=d.split, help="the split to train on (never the one you evaluate on)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--tokens-per-step", type=int, default=d.tokens_per_step)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--cls-head", choices=("prototype", "linear"), default=d.cls_head)
    p.add_argument("--min-area", type=float, default=d.min_area, help="smallest crop, share of the image area")
    p.add_argument("--cls-weight", type=float, default=d.cls_weight)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="data set option, e.g. coarse=true for ccp (values parsed as YAML)")
    a = p.parse_args(argv)
    import yaml

    options = {}
    for item in a.option:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    s = StandinSettings(dataset=a.dataset, split=a.split, steps=a.steps, tokens_per_step=a.tokens_per_step, lr=a.lr,
                        seed=a.seed, threads=a.threads, max_images=a.max_images, cls_head=a.cls_head,
                        min_area=a.min_area, cls_weight=a.cls_weight)
    t0 = time.time()
    path = build_standin(a.root, a.out, s, **options)
    log.info("stand-in prior written to %s in %.0fs", path, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
