"""``protocol: paper`` (issue 12 item 4): one switch for every reference behaviour, tested switch by switch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.data import REPO

from transfgu.config import ConfigError, load_config
from transfgu.models.backbone import build_backbone, dino_interpolate_pos_embed

CONF = REPO / "conf"


def test_paper_protocol_sets_every_reference_behaviour_and_default_keeps_the_fixes():
    for preset, name in (("coco_stuff27", "coco_stuff"), ("cityscapes27", "cityscapes"), ("lip19", "lip"),
                         ("pascal_voc", "pascal_voc")):
        d = load_config(CONF / f"{preset}.yaml")
        p = load_config(CONF / f"{preset}.yaml", ["protocol=paper"])
        assert (d.train.cls_emb_init, p.train.cls_emb_init) == ("orthogonal", "reference")
        assert (d.backbone.precision, p.backbone.precision) == ("auto", "fp32")
        assert d.pseudo.precision == p.pseudo.precision == "fp32"
        assert (d.backbone.pos_embed, p.backbone.pos_embed) == ("timm", "dino")
        assert (d.train.select, p.train.select) == ("last", "best_val")
        assert d.concepts.algorithm == "faiss"
        assert p.concepts.algorithm == ("minibatch_kmeans" if name in ("cityscapes", "lip") else "faiss")
        assert bool(p.data.options.get("with_instances")) == (name == "coco_stuff")
        assert "with_instances" not in d.data.options


def test_paper_protocol_refuses_an_explicit_conflicting_value():
    with pytest.raises(ConfigError, match="protocol=paper sets train.cls_emb_init"):
        load_config(CONF / "coco_stuff27.yaml", ["protocol=paper", "train.cls_emb_init=orthogonal"])
    # the same value, given explicitly, is fine
    assert load_config(None, ["protocol=paper", "train.select=best_val"]).train.select == "best_val"


def test_paper_protocol_class_embeddings_are_one_random_unit_vector(tmp_path):
    from transfgu.training import build_decoder

    torch.manual_seed(0)
    ref = build_decoder(load_config(None, ["protocol=paper", "concepts.k_per_pool={fg: 12, bg: 15}"]), 48)
    fix = build_decoder(load_config(None, ["concepts.k_per_pool={fg: 12, bg: 15}"]), 48)
    e_ref, e_fix = ref.cls_emb.detach()[0], fix.cls_emb.detach()[0]
    assert float(e_ref.norm()) == pytest.approx(1.0, abs=1e-5)  # the (K*D) row is one unit vector
    assert torch.allclose(e_fix @ e_fix.T, torch.eye(27), atol=1e-5)  # K orthonormal rows


def test_paper_protocol_float32_everywhere():
    from transfgu.runtime import autocast_dtype, pseudo_autocast_dtype

    cuda = torch.device("cuda")  # only the decision is exercised: no CUDA call is made for fp32
    p = load_config(None, ["protocol=paper"])
    assert autocast_dtype(p.backbone.precision, cuda) is None and pseudo_autocast_dtype(p.pseudo) is None


def _bicubic_axis(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """Interpolation matrix (n_out, n_in) of PyTorch-style bicubic (A = -0.75, half-pixel centres, clamped
    borders) with an explicit scale factor: output i samples the input at (i + 0.5) / scale - 0.5."""
    a = -0.75

    def cubic(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        for j, wgt in zip(range(i0 - 1, i0 + 3), (cubic(1 + t), cubic(t), cubic(1 - t), cubic(2 - t))):
            m[i, min(max(j, 0), n_in - 1)] += wgt
    return m


@pytest.mark.parametrize("grid", [(40, 40), (40, 80), (12, 16), (28, 28)])
def test_dino_position_embedding_interpolation_matches_the_formula(grid):
    g = torch.Generator().manual_seed(0)
    side, d = 28, 6
    pos = torch.randn(1, 1 + side * side, d, generator=g)
    got = dino_interpolate_pos_embed(pos, grid)
    if grid == (side, side):
        assert got is pos  # DINO returns the stored embeddings untouched on their own square grid
        return
    h, w = grid
    assert got.shape == (1, 1 + h * w, d)
    assert torch.equal(got[:, 0], pos[:, 0])
    my, mx = _bicubic_axis(side, h, (h + 0.1) / side), _bicubic_axis(side, w, (w + 0.1) / side)
    patch = pos[0, 1:].reshape(side, side, d).double().numpy()
    want = np.einsum("ia,jb,abd->ijd", my, mx, patch).reshape(h * w, d)
    np.testing.assert_allclose(got[0, 1:].double().numpy(), want, atol=2e-5)
    # timm's resampling (sized by the grid, anti-aliased) is a different function: the switch matters
    from timm.layers import resample_abs_pos_embed

    timm_pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side], num_prefix_tokens=1)
    assert (timm_pos - got).abs().max() > 1e-3


def test_backbone_uses_the_configured_position_embeddings(tmp_path):
    from transfgu.layout import RunLayout
    from transfgu.runtime import load_run_backbone

    cfg = load_config(None, ["protocol=paper", "backbone.arch=vit_test_tiny"])
    layout = RunLayout(tmp_path)
    bb = load_run_backbone(cfg.backbone, layout, seed=0)
    assert bb.pos_embed_mode == "dino"
    x = torch.randn(2, 3, 96, 128)
    t, grid = bb.tokens_before_last_block(x)
    vit = bb.vit
    tokens = vit.patch_embed(x).reshape(2, 12 * 16, -1)
    first = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], 1) + dino_interpolate_pos_embed(vit.pos_embed, grid)
    want = vit.blocks[0](vit.norm_pre(first))
    torch.testing.assert_close(t, want, rtol=0, atol=0)  # depth 2: t is the output of block 1
    timm_bb = build_backbone("vit_test_tiny", str(layout.random_backbone))
    assert timm_bb.pos_embed_mode == "timm"
    assert (timm_bb.tokens_before_last_block(x)[0] - t).abs().max() > 1e-4


def test_minibatch_kmeans_is_sklearn_with_the_reference_settings_then_means():
    from sklearn.cluster import MiniBatchKMeans

    from transfgu.concepts import fit_concepts

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 8)) * 5
    x = (centres[rng.integers(0, 5, 3000)] + rng.normal(size=(3000, 8))).astype(np.float32)
    bank = fit_concepts({"all": x}, {"all": 5}, niter=100, seed=0, algorithm="minibatch_kmeans")
    km = MiniBatchKMeans(n_clusters=5, max_iter=100, random_state=0, n_init=3, batch_size=1024,
                         max_no_improvement=10, init="k-means++").fit(x)
    c = km.cluster_centers_
    labels = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1).argmin(1)
    means = np.stack([x[labels == j].astype(np.float64).mean(0) for j in range(5)])
    np.testing.assert_allclose(bank.centroids, means, rtol=1e-5, atol=1e-5)
    assert bank.extra["algorithm"] == "minibatch_kmeans"
    faiss_bank = fit_concepts({"all": x}, {"all": 5}, niter=100, seed=0)
    assert faiss_bank.extra["algorithm"] == "faiss"
