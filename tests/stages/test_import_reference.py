"""Import of the authors' released decoder checkpoints (issue 12 item 6), with a checkpoint written in their layout."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.configs import tiny_config

from transfgu.import_reference import ReferenceCheckpointError, import_reference_decoder, main
from transfgu.models.decoder import MaskTransformerDecoder


def _authors_file(path, n_cls=4, d=48, prefix="module.decoder.", wrap="model"):
    """A decoder checkpoint as the authors' code saves one: Segmenter names under wrapper prefixes, plus entries
    that are not the decoder (an encoder tensor, an epoch counter)."""
    torch.manual_seed(3)
    dec = MaskTransformerDecoder(n_classes=n_cls, d_encoder=d, d_model=d, n_heads=max(1, d // 64),
                                 cls_emb_init="reference")
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the init: a "trained" decoder
    sd = {f"{prefix}{k}": v.clone() for k, v in dec.state_dict().items()}
    sd["module.encoder.blocks.0.norm1.weight"] = torch.ones(d)
    torch.save({wrap: sd, "epoch": 17}, path)
    return dec.eval()


def test_imported_checkpoint_predicts_like_the_original(tmp_path):
    from transfgu.predict import load as load_predictor

    ckpt = tmp_path / "cocostuff27.pt"
    original = _authors_file(ckpt)
    cfg = tiny_config(tmp_path)  # camvid stand-in, K = 4, thingstuff: 4 decoder channels
    meta = import_reference_decoder(ckpt, cfg, tmp_path / "model", evaluate=True)
    assert meta["decoder"]["n_classes"] == 4 and meta["variant"] == "thingstuff"
    assert "authors" in meta["selection"]
    pred = load_predictor(tmp_path / "model", device="cpu", precision="fp32")
    for k, v in original.state_dict().items():
        assert torch.equal(pred.decoder.state_dict()[k], v), k
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        feats = pred.backbone(x)
        want = original(feats.patch, feats.grid)[0]
    torch.testing.assert_close(pred.logits(x), want, rtol=0, atol=0)
    metrics = json.loads((tmp_path / "model" / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 1 and metrics["n_images"] == 4
    assert json.loads((tmp_path / "model" / "model.json").read_text())["cluster_to_class"] is not None


@pytest.mark.parametrize(("prefix", "wrap"), [("", "state_dict"), ("decoder.", "model"), ("model.decoder.", "x")])
def test_wrapper_layouts_are_recognised(tmp_path, prefix, wrap):
    ckpt = tmp_path / "c.pt"
    original = _authors_file(ckpt, prefix=prefix, wrap=wrap)
    if wrap == "x":  # a bare state dict at top level
        obj = torch.load(ckpt, weights_only=True)["x"]
        torch.save(obj, ckpt)
    from transfgu.import_reference import load_reference_decoder

    dec, shape = load_reference_decoder(ckpt)
    assert shape == {"n_cls": 4, "d_model": 48, "d_encoder": 48, "n_layers": 2, "n_heads": 1}
    assert all(torch.equal(dec.state_dict()[k], v) for k, v in original.state_dict().items())


def test_wrong_preset_or_broken_file_is_a_clear_error(tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    _authors_file(ckpt, n_cls=27)
    with pytest.raises(ReferenceCheckpointError, match="27 channels but the preset gives 4"):
        import_reference_decoder(ckpt, tiny_config(tmp_path), tmp_path / "m")
    obj = torch.load(ckpt, weights_only=True)
    del obj["model"]["module.decoder.proj_patch"]
    torch.save(obj, ckpt)
    with pytest.raises(ReferenceCheckpointError, match="proj_patch"):
        import_reference_decoder(ckpt, tiny_config(tmp_path), tmp_path / "m")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pt"), "--config", "conf/demo_camvid.yaml",
                 "--out", str(tmp_path / "m")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "m" / "decoder.safetensors").exists()  # nothing written for a refused file
