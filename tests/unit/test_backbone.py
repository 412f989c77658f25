"""Backbone: outputs against timm's own forward, and every weight-loading path on checkpoints written here."""

from __future__ import annotations

import pickle

import pytest
import torch

from transfgu.models.backbone import (
    WeightsError,
    build_backbone,
    load_state_dict_file,
    normalize,
    save_backbone_weights,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_backbone("vit_test_tiny", "none")


def test_outputs_match_timm_forward_and_attention_definition(tiny):
    x = torch.randn(2, 3, 48, 40)
    out = tiny(x)
    ref = tiny.vit.forward_features(x)
    assert out.grid == (6, 5)
    torch.testing.assert_close(out.cls, ref[:, 0])
    torch.testing.assert_close(out.patch, ref[:, 1:])
    # Naive attention of the last block from its weights: softmax(q k^T * scale), CLS row, patch keys.
    t, _ = tiny.tokens_before_last_block(x)
    blk = tiny.vit.blocks[-1]
    qkv = blk.attn.qkv(blk.norm1(t)).reshape(2, t.shape[1], 3, 2, -1).permute(2, 0, 3, 1, 4)
    att = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * blk.attn.scale, dim=-1)
    torch.testing.assert_close(out.attn_cls, att[:, :, 0, 1:])


@pytest.mark.parametrize("arch", ["vit_small_patch8", "dinov2_vits14"])
def test_paper_shaped_backbones(arch):
    bb = build_backbone(arch, "none")
    ps = bb.patch_size
    out = bb(torch.randn(1, 3, 4 * ps, 3 * ps))
    assert out.cls.shape == (1, 384) and out.patch.shape == (1, 12, 384) and out.attn_cls.shape == (1, 6, 12)
    assert not bb.pretrained and not any(p.requires_grad for p in bb.parameters())


def test_bad_input_sizes_and_arch(tiny):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="unknown backbone arch"):
        build_backbone("resnet50", "none")


def _dino_layout(tiny) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny.vit.state_dict().items()}


@pytest.mark.parametrize("wrapping", ["plain", "teacher_prefixed", "module_prefixed_with_head"])
def test_load_dino_pth_layouts(tmp_path, tiny, wrapping):
    sd = _dino_layout(tiny)
    if wrapping == "teacher_prefixed":
        obj = {"teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"head.mlp.0.weight": torch.zeros(3, 3)},
               "student": {}, "epoch": 100}
    elif wrapping == "module_prefixed_with_head":
        obj = {f"module.backbone.{k}": v for k, v in sd.items()} | {"module.head.last_layer.weight": torch.ones(2)}
    else:
        obj = sd
    path = tmp_path / "dino.pth"
    torch.save(obj, path)
    bb = build_backbone("vit_test_tiny", str(path))
    assert bb.pretrained
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(bb(x).cls, tiny(x).cls)


def test_safetensors_round_trip_and_pos_embed_resampling(tmp_path, tiny):
    path = tmp_path / "w.safetensors"
    save_backbone_weights(tiny, path)
    bb = build_backbone("vit_test_tiny", str(path))
    x = torch.randn(1, 3, 40, 40)
    torch.testing.assert_close(bb(x).patch, tiny(x).patch)
    # A checkpoint trained at another resolution (4x4 grid instead of 8x8) is resampled, not rejected.
    sd = load_state_dict_file(path)
    cls_pe, grid_pe = sd["pos_embed"][:, :1], sd["pos_embed"][:, 1:].reshape(1, 8, 8, -1)
    small = torch.nn.functional.avg_pool2d(grid_pe.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(1, 16, -1)
    sd["pos_embed"] = torch.cat([cls_pe, small], dim=1)
    torch.save(sd, tmp_path / "small.pth")
    assert build_backbone("vit_test_tiny", str(tmp_path / "small.pth")).vit.pos_embed.shape == (1, 65, 48)


def test_weight_errors_name_the_problem(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("vit_test_tiny", str(tmp_path / "missing.pth"))
    bad = tmp_path / "other.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(7, 7)}, bad)
    with pytest.raises(WeightsError, match="does not match"):
        build_backbone("vit_test_tiny", str(bad))
    # A pickle that is not plain tensors (here: a class object) is refused by weights_only loading.
    pickled = tmp_path / "pickled.pth"
    pickled.write_bytes(pickle.dumps({"x": complex}))
    with pytest.raises(WeightsError, match="weights-only"):
        build_backbone("vit_test_tiny", str(pickled))


def test_hub_tag_offline_gives_a_clear_error(monkeypatch):
    # Offline mode makes the hub client fail at once instead of waiting on network time-outs.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="local DINO"):
        build_backbone("vit_small_patch16", "timm")


def test_normalize_matches_imagenet_stats():
    img = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    x = normalize(img)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[:, 0, 0], expected)
