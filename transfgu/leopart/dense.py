"""Step 1: dense patch features and the last block's CLS attention, one Parquet row per image.

The authors' ``forward_backbone`` returns the patch tokens of the last layer and its CLS self-attention for every
image resized to 448 x 448 (docs/leopart.md, "The method, step by step"). Here one row per image holds::

    image_id    string
    h, w, d     int32                       token grid and feature width
    feats       large_list<float32>         the h*w x d patch tokens (final LayerNorm), C order
    attn        list<float32>               the last block's CLS -> patch attention, mean over heads, h*w

float32 is kept (not float16) because every later step starts from these numbers and the two executors must give
the same maps from them. Plain pyarrow reads the files; nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# torch and the backbone are imported inside the functions that need them: shard actors only read these files

DENSE_FORMAT = "transfgu.leopart.dense/1"

DENSE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("h", pa.int32(), nullable=False),
        pa.field("w", pa.int32(), nullable=False),
        pa.field("d", pa.int32(), nullable=False),
        pa.field("feats", pa.large_list(pa.float32()), nullable=False),
        pa.field("attn", pa.list_(pa.float32()), nullable=False),
    ],
    metadata={"format": DENSE_FORMAT},
)


@dataclass
class DenseImage:
    """The dense outputs of one image."""

    image_id: str
    feats: np.ndarray  # (h*w, d) float32
    attn: np.ndarray  # (h*w,) float32, head mean of the CLS attention over patches
    grid: tuple[int, int]


def preprocess(image: np.ndarray, size: tuple[int, int]) -> Any:
    """uint8 ``(H, W, 3)`` -> ImageNet-normalised float ``(3, *size)``, resized bilinearly."""
    import torch
    import torch.nn.functional as F

    from transfgu.models.backbone import normalize

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {img.dtype} {img.shape}")
    x = torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return normalize(x[0])


def dense_features(
    backbone: Any,
    images: Sequence[np.ndarray],
    size: tuple[int, int],
    device: Any,
    batch_size: int = 8,
    amp: Any = None,
) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """Patch tokens ``(h*w, d)`` and head-mean CLS attention ``(h*w,)`` of every image, float32 on the CPU."""
    import torch

    ps = backbone.patch_size
    if size[0] % ps or size[1] % ps:
        raise ValueError(f"leopart.input_size {tuple(size)} is not a multiple of the patch size {ps}")
    out: list[tuple[np.ndarray, np.ndarray, tuple[int, int]]] = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([preprocess(im, size) for im in images[start : start + batch_size]]).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            f = backbone(x)
        patch = f.patch.float().cpu().numpy()
        attn = f.attn_cls.float().mean(dim=1).cpu().numpy()  # heads averaged, not the best head picked with GT
        out.extend((patch[i], attn[i], f.grid) for i in range(patch.shape[0]))
    return out


def dense_table(
    image_ids: Sequence[str], outputs: Sequence[tuple[np.ndarray, np.ndarray, tuple[int, int]]]
) -> pa.Table:
    """Rows of the dense store for decoded images (see the module docstring)."""
    if len(image_ids) != len(outputs):
        raise ValueError(f"{len(image_ids)} image ids for {len(outputs)} outputs")
    hs = [int(g[0]) for _, _, g in outputs]
    ws = [int(g[1]) for _, _, g in outputs]
    ds = [int(f.shape[1]) if f.ndim == 2 else 0 for f, _, _ in outputs]
    feats = pa.array([np.ascontiguousarray(f, dtype=np.float32).ravel() for f, _, _ in outputs],
                     type=pa.large_list(pa.float32()))
    attn = pa.array([np.ascontiguousarray(a, dtype=np.float32).ravel() for _, a, _ in outputs],
                    type=pa.list_(pa.float32()))
    return pa.Table.from_arrays(
        [pa.array(list(image_ids), pa.string()), pa.array(hs, pa.int32()), pa.array(ws, pa.int32()),
         pa.array(ds, pa.int32()), feats, attn],
        schema=DENSE_SCHEMA,
    )


def read_dense(path: str | Path) -> list[DenseImage]:
    """Every image of one dense shard file, in row order."""
    t = pq.read_table(path)
    missing = {f.name for f in DENSE_SCHEMA} - set(t.column_names)
    if missing:
        raise ValueError(f"{path} is not a Leopart dense-features file (missing columns {sorted(missing)})")
    ids = t["image_id"].to_pylist()
    hs = t["h"].to_numpy()
    ws = t["w"].to_numpy()
    ds = t["d"].to_numpy()
    out: list[DenseImage] = []
    feats = t["feats"].combine_chunks()
    attn = t["attn"].combine_chunks()
    fvals = feats.values.to_numpy(zero_copy_only=False)
    foffs = feats.offsets.to_numpy()
    avals = attn.values.to_numpy(zero_copy_only=False)
    aoffs = attn.offsets.to_numpy()
    for i, image_id in enumerate(ids):
        n = int(hs[i]) * int(ws[i])
        f = fvals[foffs[i] : foffs[i + 1]].reshape(n, int(ds[i]))
        a = avals[aoffs[i] : aoffs[i + 1]]
        out.append(DenseImage(str(image_id), f, a, (int(hs[i]), int(ws[i]))))
    return out
