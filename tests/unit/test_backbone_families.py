"""Every backbone family behind the one interface: DINOv2 with registers (timm VisionTransformer) and DINOv3 (timm Eva),
as tiny random models of the same timm classes (depth 2, width 64), with DINO v1 alongside where a check applies to all.

Oracles come from timm's own forward (its blocks, its attention module with the softmax made visible), never from the
code under test: outputs and attention maps, the Grad-CAM maps (one backward per concept through timm's full
forward), official key layouts written here from the layout timm's conversion expects.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.data import concepts_near_cls as _concepts
from helpers.data import require_shared_data

from transfgu.models.backbone import (
    WeightsError,
    build_backbone,
    load_state_dict_file,
    save_backbone_weights,
)
from transfgu.pseudo_labels import combine_maps, concept_map_parts, concept_maps, naive_concept_maps

NEW = ["vit_test_tiny_reg4", "vit_test_tiny_dinov3"]
ALL = ["vit_test_tiny", *NEW]


@pytest.fixture(scope="module", params=ALL)
def bb(request):
    torch.manual_seed(0)
    return build_backbone(request.param, "none")


def _images(bb, grid: tuple[int, int], n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = bb.patch_size
    return torch.randn(n, 3, grid[0] * p, grid[1] * p, generator=g)


class _SoftmaxTap:
    """Makes the last block's attention softmax an explicit tensor of timm's own forward: the unfused path, and a hook
    on the attention dropout (an identity in eval mode) that keeps its output with its gradient."""

    def __init__(self, vit) -> None:
        self.attn = vit.blocks[-1].attn
        self.a: torch.Tensor | None = None

    def __enter__(self) -> _SoftmaxTap:
        self.fused, self.attn.fused_attn = self.attn.fused_attn, False

        def hook(_mod, _inp, out):
            if out.requires_grad:
                out.retain_grad()
            self.a = out

        self.handle = self.attn.attn_drop.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.attn.fused_attn = self.fused


def _map_without_registers(row: torch.Tensor, prefix: int) -> torch.Tensor:
    """The oracle map: the CLS row over all keys, register keys dropped, renormalised over CLS + patches."""
    keep = torch.cat([row[..., :1], row[..., prefix:]], dim=-1)
    return (keep / keep.sum(-1, keepdim=True))[..., 1:]


def test_structure_of_each_family():
    reg4, v3, v1 = (build_backbone(a, "none") for a in ("vit_test_tiny_reg4", "vit_test_tiny_dinov3", "vit_test_tiny"))
    assert (reg4.family, reg4.patch_size, reg4.num_prefix_tokens, reg4.num_registers) == ("vit", 14, 5, 4)
    assert (v3.family, v3.patch_size, v3.num_prefix_tokens, v3.num_registers) == ("eva", 16, 5, 4)
    assert (v1.family, v1.num_prefix_tokens, v1.num_registers) == ("vit", 1, 0)
    assert type(reg4.vit).__name__ == "VisionTransformer" and reg4.vit.no_embed_class
    assert type(v3.vit).__name__ == "Eva" and v3.vit.pos_embed is None and v3.vit.rope is not None


@pytest.mark.parametrize("grid", [(3, 5), (4, 2), (6, 6)])
def test_outputs_and_maps_match_timm_forward_at_any_multiple_of_the_patch_size(bb, grid):
    x = _images(bb, grid)
    p = bb.num_prefix_tokens
    out = bb(x)
    with torch.no_grad(), _SoftmaxTap(bb.vit) as tap:
        ref = bb.vit.forward_features(x)
    assert out.grid == grid
    assert out.patch.shape == (2, grid[0] * grid[1], bb.embed_dim)
    assert out.attn_cls.shape == (2, bb.num_heads, grid[0] * grid[1])
    torch.testing.assert_close(out.cls, ref[:, 0])
    torch.testing.assert_close(out.patch, ref[:, p:])  # the registers are not patch tokens
    torch.testing.assert_close(out.attn_cls, _map_without_registers(tap.a[:, :, 0], p), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb(x[..., :-1])


@pytest.mark.parametrize("arch", NEW)
def test_a_planted_high_norm_register_changes_no_map(arch):
    from transfgu.crops import foreground_prior

    torch.manual_seed(0)
    bb = build_backbone(arch, "none")
    x = _images(bb, (5, 4), n=3)
    clean = bb(x)
    t, grid = bb.tokens_before_last_block(x)
    raw_clean, _ = bb.last_block_cls_attention(t, grid)
    # A high-norm register in the last block's attention input (after its LayerNorm, which would scale a planted
    # block input back down), its key lined up with the CLS query of head 0: it takes nearly all of that head's
    # attention, as the artefact tokens of ViTs without registers do.
    q, _, _ = bb.last_block_qkv(t, grid)
    blk = bb.vit.blocks[-1]
    d, hd = bb.embed_dim, bb.embed_dim // bb.num_heads
    w_k = blk.attn.qkv.weight[d : d + hd]
    u = q[:, 0, 0] @ w_k  # (B, D): the direction that raises the register's logit in head 0
    plant = u * (40.0 / (blk.attn.scale * (u * u).sum(-1, keepdim=True)))  # a logit of about +40

    def hook(_mod, _inp, out):
        out = out.clone()
        out[:, 1] = plant if plant.shape[0] == out.shape[0] else plant[0]  # (other images: image 0's plant)
        return out

    handle = blk.norm1.register_forward_hook(hook)
    try:
        planted = bb(x)
        raw_planted, _ = bb.last_block_cls_attention(t, grid)
    finally:
        handle.remove()
    assert raw_planted[:, 0, 1].min() > 0.99 and raw_clean[:, 0, 1].max() < 0.5  # the plant took the attention ...
    assert not torch.equal(planted.cls, clean.cls)  # ... and reaches the CLS token, as a real register does
    assert torch.equal(planted.attn_cls, clean.attn_cls)  # ... but no attention map moves,
    assert torch.equal(foreground_prior(planted.attn_cls, grid), foreground_prior(clean.attn_cls, grid))  # no mask
    from transfgu.leopart.dense import dense_features
    from transfgu.leopart.foreground import attention_mask

    imgs = [np.random.default_rng(i).integers(0, 255, (50, 60, 3), dtype=np.uint8) for i in range(2)]
    size = (5 * bb.patch_size, 4 * bb.patch_size)
    a = dense_features(bb, imgs, size, torch.device("cpu"))
    handle = blk.norm1.register_forward_hook(hook)
    try:
        b = dense_features(bb, imgs, size, torch.device("cpu"))
    finally:
        handle.remove()
    for (_, att_a, g), (_, att_b, _) in zip(a, b):
        assert np.array_equal(att_a, att_b)  # Leopart's attention map and its noisy foreground mask
        assert np.array_equal(attention_mask(att_a, g), attention_mask(att_b, g))


def _brute_force_maps(bb, x: torch.Tensor, c: torch.Tensor, grad_scale: float, mass: float = 0.8) -> torch.Tensor:
    """Eq. 5-7 with one backward per concept through timm's own full forward: the last block's attention softmax is
    the tensor the gradients are read from (CLS query row), the final CLS token is timm's."""
    p = bb.num_prefix_tokens
    xx = x.clone().requires_grad_(True)  # the backbone is frozen: a graph through the input reaches the softmax
    with torch.enable_grad(), _SoftmaxTap(bb.vit) as tap:
        z = bb.vit.forward_features(xx)[:, 0]
        obj = grad_scale * (1 - F.cosine_similarity(z[:, None], c[None], dim=-1))  # (B, K)
        grads = []
        for k in range(c.shape[0]):
            tap.a.grad = None
            obj[:, k].sum().backward(retain_graph=True)
            grads.append(tap.a.grad[:, :, 0].clone())
    a_map = _map_without_registers(tap.a.detach()[:, :, 0], p)
    h, w = x.shape[-2] // bb.patch_size, x.shape[-1] // bb.patch_size
    return combine_maps(a_map, torch.stack(grads)[..., p:], mass).reshape(x.shape[0], c.shape[0], h, w)


@pytest.mark.parametrize("arch", ALL)
def test_grad_cam_maps_equal_one_backward_per_concept_through_timm(arch):
    torch.manual_seed(0)
    bb = build_backbone(arch, "none")
    x = _images(bb, (4, 5), n=3, seed=3)
    c = _concepts(bb, x, 6)
    fast = concept_maps(bb, x, c, grad_scale=0.125)
    oracle = _brute_force_maps(bb, x, c, grad_scale=0.125)
    assert fast.shape == (3, 6, 4, 5)
    assert (fast - oracle).abs().max().item() <= 1e-4
    assert (naive_concept_maps(bb, x, c) - oracle).abs().max().item() <= 1e-4  # the benchmark baseline too
    # not a trivial agreement: the gate shuts some positions and opens others, and concepts differ
    assert 0.05 < (fast == 0).float().mean().item() < 0.95
    assert (fast[:, 0] - fast[:, 1]).abs().max() > 0


@pytest.mark.parametrize("arch", NEW)
def test_label_bank_reads_back_bit_identical(arch, tmp_path):
    from transfgu.config import PseudoLabelConfig
    from transfgu.data.io import load_rgb
    from transfgu.data.transforms import to_model_input
    from transfgu.stages import build_label_maps
    from transfgu.store.formats import label_bank_table, read_label_bank, write_parquet_atomic

    torch.manual_seed(0)
    bb = build_backbone(arch, "none")
    size = (4 * bb.patch_size, 5 * bb.patch_size)
    files = sorted((require_shared_data("camvid") / "images" / "train").glob("*.jpg"))[:3]
    images = [load_rgb(f) for f in files]
    ids = [f.stem for f in files]
    x = torch.stack([to_model_input(im, size) for im in images])
    c = _concepts(bb, x, 9)
    cfg = PseudoLabelConfig(input_size=size, grad_scale=0.125)
    write_parquet_atomic(label_bank_table(ids, build_label_maps(bb, images, c.numpy(), cfg, torch.device("cpu"))),
                         tmp_path / "part-00000.parquet")
    dense = read_label_bank(tmp_path)
    parts, (h, w) = concept_map_parts(bb, x, c, cfg.grad_scale, cfg.mass)
    ref = parts.maps().reshape(3, 9, h, w).numpy()
    for i, image_id in enumerate(ids):
        got = dense[image_id]
        assert got.shape == (9, h, w) and got.view(np.uint32).tobytes() == ref[i].view(np.uint32).tobytes()


# -- weights: official release layouts, timm's, and refusals ---------------------------------------------------------
def _dinov2_reg_layout(vit) -> dict[str, torch.Tensor]:
    """A ``dinov2_vit*14_reg4_pretrain.pth`` state dict: the CLS position embedding is a row of ``pos_embed`` (added
    to ``cls_token`` by the model), the registers are ``register_tokens``, and ``mask_token`` is there (timm's
    conversion folds the CLS position into ``cls_token`` and renames the registers)."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    pos_cls = 0.02 * torch.randn(1, 1, sd["cls_token"].shape[-1], generator=g)
    out = {"cls_token": sd.pop("cls_token") - pos_cls, "register_tokens": sd.pop("reg_token"),
           "pos_embed": torch.cat([pos_cls, sd.pop("pos_embed")], dim=1),
           "mask_token": torch.zeros(1, vit.embed_dim)}
    return out | sd


def _dinov3_layout(vit) -> dict[str, torch.Tensor]:
    """A ``dinov3_vit*16_pretrain_*.pth`` state dict: ``storage_tokens``, ``ls1.gamma``/``ls2.gamma``, a fused
    ``qkv.bias`` with its ``bias_mask`` (all zero for the bias-free S/B models), ``mask_token`` and the rotary
    ``rope_embed.periods``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in vit.state_dict().items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone()
        if k.endswith("attn.qkv.weight"):
            out[k.replace("weight", "bias")] = torch.zeros(v.shape[0])
            out[k.replace("weight", "bias_mask")] = torch.ones(v.shape[0])
    hd = vit.embed_dim // vit.blocks[0].attn.num_heads
    return out | {"mask_token": torch.zeros(1, vit.embed_dim), "rope_embed.periods": torch.ones(hd // 4)}


LAYOUTS = {"vit_test_tiny_reg4": _dinov2_reg_layout, "vit_test_tiny_dinov3": _dinov3_layout}


@pytest.mark.parametrize("arch", NEW)
def test_official_layout_file_loads_and_gives_the_same_features(arch, tmp_path):
    torch.manual_seed(1)
    src = build_backbone(arch, "none")
    sd = LAYOUTS[arch](src.vit)
    assert not set(sd) <= set(src.vit.state_dict())  # really another layout
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    torch.manual_seed(2)  # another random init underneath: everything must come from the file
    bb = build_backbone(arch, str(path))
    assert bb.pretrained
    x = _images(bb, (3, 4))
    a, b = bb(x), src(x)
    torch.testing.assert_close(a.cls, b.cls, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.patch, b.patch, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.attn_cls, b.attn_cls, atol=1e-6, rtol=1e-5)
    # ... and in a DINO training checkpoint's wrapping (teacher, backbone. prefix, projection head)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"head.mlp.0.weight": torch.ones(2)}},
               tmp_path / "train_ckpt.pth")
    torch.testing.assert_close(build_backbone(arch, str(tmp_path / "train_ckpt.pth"))(x).cls, b.cls)


@pytest.mark.parametrize("arch", NEW)
def test_saved_weights_load_back_for_the_same_arch(arch, tmp_path):
    """What runs and Leopart's fine-tuning save (timm's layout, safetensors) loads back bit for bit."""
    torch.manual_seed(3)
    src = build_backbone(arch, "none")
    save_backbone_weights(src, tmp_path / "w.safetensors")
    bb = build_backbone(arch, str(tmp_path / "w.safetensors"))
    x = _images(bb, (2, 3))
    a, b = bb(x), src(x)
    assert torch.equal(a.cls, b.cls) and torch.equal(a.patch, b.patch) and torch.equal(a.attn_cls, b.attn_cls)


@pytest.mark.parametrize(("arch", "other", "named"), [
    ("vit_test_tiny_reg4", "vit_test_tiny_dinov3", "storage_tokens"),
    ("vit_test_tiny_dinov3", "vit_test_tiny_reg4", "register_tokens"),
    ("vit_test_tiny_dinov3", "vit_test_tiny", "pos_embed"),
])
def test_a_file_of_another_layout_is_refused_with_the_keys_named(arch, other, named, tmp_path):
    torch.manual_seed(0)
    src = build_backbone(other, "none")
    sd = LAYOUTS[other](src.vit) if other in LAYOUTS else dict(src.vit.state_dict())
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="does not match the architecture") as err:
        build_backbone(arch, str(tmp_path / "w.pth"))
    assert named in str(err.value) and "missing" in str(err.value) and "unexpected" in str(err.value)


def test_timm_weights_of_a_test_arch_are_refused():
    with pytest.raises(WeightsError, match="no pretrained weights"):
        build_backbone("vit_test_tiny_dinov3", "timm")


@pytest.mark.parametrize("arch", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"])
def test_the_named_architectures_build_with_their_shapes(arch):
    bb = build_backbone(arch, "none")
    p = bb.patch_size
    out = bb(torch.randn(1, 3, 3 * p, 2 * p))
    assert (p, bb.num_registers) == ({"vit_small_patch14_reg4_dinov2": 14, "vit_small_patch16_dinov3": 16}[arch], 4)
    assert out.cls.shape == (1, 384) and out.patch.shape == (1, 6, 384) and out.attn_cls.shape == (1, 6, 6)


def test_dino_position_interpolation_for_registers_and_rope(tmp_path):
    """``pos_embed=dino`` resamples DINOv2's patch table with DINO's '+0.1' rule (the CLS position is folded into the
    CLS token); DINOv3 has no position table, so both modes are the same model there."""
    from transfgu.models.backbone import dino_interpolate_pos_embed

    torch.manual_seed(0)
    reg = build_backbone("vit_test_tiny_reg4", "none")
    save_backbone_weights(reg, tmp_path / "r.safetensors")
    dino = build_backbone("vit_test_tiny_reg4", str(tmp_path / "r.safetensors"), pos_embed="dino")
    x = _images(reg, (5, 7))
    t, _ = dino.tokens_before_last_block(x)
    vit = dino.vit
    patches = vit.patch_embed(x).reshape(2, 35, -1) + dino_interpolate_pos_embed(vit.pos_embed, (5, 7), num_prefix=0)
    first = torch.cat([vit.cls_token.expand(2, -1, -1), vit.reg_token.expand(2, -1, -1), patches], 1)
    torch.testing.assert_close(t, vit.blocks[0](vit.norm_pre(first)), rtol=0, atol=0)
    assert (reg.tokens_before_last_block(x)[0] - t).abs().max() > 1e-4  # timm's resampling differs
    v3 = build_backbone("vit_test_tiny_dinov3", "none")
    x3 = _images(v3, (3, 5))
    ref = v3(x3)
    v3.pos_embed_mode = "dino"
    assert torch.equal(v3(x3).patch, ref.patch)


def test_official_file_round_trip_keeps_what_timm_layout_needs(tmp_path):
    """The unwrapping step keeps every key the conversion needs (mask_token is what identifies DINOv2's layout)."""
    torch.manual_seed(0)
    src = build_backbone("vit_test_tiny_reg4", "none")
    torch.save(_dinov2_reg_layout(src.vit), tmp_path / "o.pth")
    sd = load_state_dict_file(tmp_path / "o.pth")
    assert {"mask_token", "register_tokens", "pos_embed", "cls_token"} <= set(sd)


NEW_PRESETS = ["demo_camvid", "coco_stuff27", "pascal_voc", "leopart_pvoc"]


@pytest.mark.parametrize("family", ["dinov2_reg", "dinov3"])
@pytest.mark.parametrize("base", NEW_PRESETS)
def test_presets_fit_their_patch_size_and_keep_the_base_setting(base, family):
    from helpers.data import REPO

    from transfgu.config import load_config
    from transfgu.methods import get_method
    from transfgu.models.backbone import patch_size_of
    from transfgu.preflight import patch_size_of as preflight_patch_size

    cfg = load_config(REPO / "conf" / f"{base}_{family}.yaml")
    ref = load_config(REPO / "conf" / f"{base}.yaml")
    p = patch_size_of(cfg.backbone.arch)
    assert p == {"dinov2_reg": 14, "dinov3": 16}[family] == preflight_patch_size(cfg.backbone.arch)
    assert get_method(cfg.method).check_sizes(cfg, p) == []
    # only the backbone, the sizes and the run name differ from the DINO v1 preset
    keep = {k: v for k, v in cfg.flat().items() if not k.startswith(("backbone.", "run.name")) and "size" not in k}
    assert keep == {k: v for k, v in ref.flat().items() if k in keep}
    assert set(keep) == {k for k in ref.flat() if not k.startswith(("backbone.", "run.name")) and "size" not in k}


def test_paper_protocol_on_another_backbone_says_so(caplog):
    from transfgu.config import load_config

    with caplog.at_level("WARNING", logger="transfgu"):
        load_config(None, ["protocol=paper", "backbone.arch=vit_small_patch16_dinov3"])
    assert "used DINO v1" in caplog.text and "vit_small_patch16_dinov3" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="transfgu"):
        load_config(None, ["method=leopart", "leopart.protocol=paper", "backbone.arch=vit_small_patch14_reg4_dinov2"])
        assert "used DINO v1" in caplog.text
        caplog.clear()
        load_config(None, ["method=leopart", "leopart.protocol=paper", "backbone.arch=vit_small_patch16"])
        load_config(None, ["backbone.arch=vit_small_patch16_dinov3"])
    assert "used DINO v1" not in caplog.text
