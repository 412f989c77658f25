"""Pseudo labels (eq. 5-7, docs/fidelity.md row 2): the fast path against the reference's K-full-backward definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.data import concepts_near_cls as _concepts
from helpers.data import require_shared_data
from PIL import Image

from transfgu.models.backbone import build_backbone, normalize
from transfgu.pseudo_labels import combine_maps, concept_maps, naive_concept_maps, top_mass_mask


def _camvid_batch(n: int, size: tuple[int, int]) -> torch.Tensor:
    paths = sorted((require_shared_data("camvid") / "images" / "train").glob("*.jpg"))[:n]
    arrs = [np.array(Image.open(p).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)) for p in paths]
    return normalize(torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2))


@pytest.mark.parametrize(
    ("arch", "size", "k"),
    [("vit_test_tiny", (96, 128), 7), ("vit_small_patch8", (64, 80), 5)],
)
def test_fast_equals_naive_on_real_images(arch, size, k):
    torch.manual_seed(0)
    bb = build_backbone(arch, "none")
    x = _camvid_batch(3, size)
    c = _concepts(bb, x, k)
    fast = concept_maps(bb, x, c, grad_scale=0.125)
    naive = naive_concept_maps(bb, x, c, grad_scale=0.125)
    assert fast.shape == (3, k, size[0] // 8, size[1] // 8)
    assert (fast - naive).abs().max().item() <= 1e-4
    # Not a trivial agreement: the gate zeroes some positions and keeps others, and concepts differ.
    assert 0.05 < (fast == 0).float().mean().item() < 0.95
    assert (fast[:, 0] - fast[:, 1]).abs().max() > 0


def test_maps_do_not_depend_on_the_batch_size():
    """The reference's batch-mean objective scales maps by 1/B; the per-image objective does not."""
    torch.manual_seed(0)
    bb = build_backbone("vit_test_tiny", "none")
    x = _camvid_batch(4, (64, 64))
    c = _concepts(bb, x, 6)
    together = concept_maps(bb, x, c)
    one_by_one = torch.cat([concept_maps(bb, x[i : i + 1], c) for i in range(4)])
    torch.testing.assert_close(together, one_by_one, atol=1e-6, rtol=1e-5)


def test_grad_scale_reproduces_reference_batch_mean():
    """With s = 1/B, the per-image maps equal the reference's batch-mean objective at batch size B."""
    torch.manual_seed(0)
    bb = build_backbone("vit_test_tiny", "none")
    x = _camvid_batch(2, (64, 64))
    c = _concepts(bb, x, 3)
    ours = concept_maps(bb, x, c, grad_scale=0.5)
    # Reference: gradient of mean_b(1 - cos) w.r.t. the attention, computed by autograd on the explicit graph.
    t, _ = bb.tokens_before_last_block(x)
    a, v = bb.last_block_cls_attention(t)
    a = a.detach().requires_grad_(True)
    with torch.enable_grad():
        z = bb.cls_from_attention(t, a, v)
        grads = []
        for k in range(3):
            obj = (1 - torch.nn.functional.cosine_similarity(z, c[k : k + 1])).mean()
            (g,) = torch.autograd.grad(obj, a, retain_graph=True)
            grads.append(g)
    ref = combine_maps(a.detach()[:, :, 1:], torch.stack(grads)[..., 1:]).reshape(ours.shape)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_top_mass_mask_against_a_loop():
    g = torch.Generator().manual_seed(3)
    r = torch.rand(5, 40, generator=g) ** 3
    r[0] = 0  # all-zero row keeps nothing
    mask = top_mass_mask(r, 0.8)
    for row, m in zip(r, mask):
        order = sorted(range(len(row)), key=lambda i: float(row[i]))
        total = float(row.sum())
        acc, expect = 0.0, set()
        for i in order:
            acc += float(row[i])
            if total > 0 and acc / total > 0.2:
                expect.add(i)
        assert set(torch.nonzero(m).flatten().tolist()) == expect


def test_combine_maps_by_hand():
    attn = torch.tensor([[[0.2, 0.6, 0.2]]])  # (B=1, heads=1, N=3): a_hat = [1/3, 1, 1/3]
    grads = torch.tensor([[[[-0.5, 0.1, 0.0]]], [[[0.0, 0.0, 0.0]]]])  # (K=2, B, heads, N)
    maps = combine_maps(attn, grads, mass=0.8)
    # concept 0: position 1 has g > 0 -> 0; position 0 gets a_hat + 0.5 (all positive mass there); position 2 a_hat
    torch.testing.assert_close(maps[0, 0], torch.tensor([1 / 3 + 0.5, 0.0, 1 / 3]))
    # concept 1: zero gradient everywhere -> plain normalised attention
    torch.testing.assert_close(maps[0, 1], torch.tensor([1 / 3, 1.0, 1 / 3]))
