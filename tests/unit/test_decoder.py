"""MaskTransformerDecoder against a hand-written forward pass, init variants and the student-reset helper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from transfgu.models.decoder import MaskTransformerDecoder

torch.set_num_threads(1)


def naive_forward(dec: MaskTransformerDecoder, x: torch.Tensor, grid: tuple[int, int]):
    """Segmenter's mask transformer written out op by op (eval mode: no dropout), as in the authors' code."""
    b, n, _ = x.shape
    k = dec.n_classes
    t = x @ dec.proj_dec.weight.T + dec.proj_dec.bias
    t = torch.cat([t, dec.cls_emb.expand(b, -1, -1)], 1)
    for blk in dec.blocks:
        heads = blk.attn.num_heads
        y = F.layer_norm(t, (t.shape[-1],), blk.norm1.weight, blk.norm1.bias, eps=1e-5)
        qkv = y @ blk.attn.qkv.weight.T  # no bias
        q, kk, v = qkv.chunk(3, dim=-1)
        dh = q.shape[-1] // heads
        outs = []
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            a = torch.softmax(q[..., sl] @ kk[..., sl].transpose(1, 2) / math.sqrt(dh), dim=-1)
            outs.append(a @ v[..., sl])
        t = t + torch.cat(outs, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        y = F.layer_norm(t, (t.shape[-1],), blk.norm2.weight, blk.norm2.bias, eps=1e-5)
        y = F.gelu(y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        t = t + y
    t = F.layer_norm(t, (t.shape[-1],), dec.decoder_norm.weight, dec.decoder_norm.bias, eps=1e-5)
    p = t[:, :n] @ dec.proj_patch
    c = t[:, n:] @ dec.proj_classes
    p = p / p.norm(dim=-1, keepdim=True)
    c = c / c.norm(dim=-1, keepdim=True)
    m = p @ c.transpose(1, 2)
    m = F.layer_norm(m, (k,), dec.mask_norm.weight, dec.mask_norm.bias, eps=1e-5)
    return m.transpose(1, 2).reshape(b, k, *grid), c


def small_decoder(k: int = 5, init: str = "orthogonal") -> MaskTransformerDecoder:
    return MaskTransformerDecoder(k, d_encoder=24, d_model=32, n_layers=2, n_heads=4, cls_emb_init=init)


def test_forward_matches_naive_oracle():
    torch.manual_seed(0)
    dec = small_decoder().eval()
    # non-trivial LayerNorm affine parameters so that they are checked too
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(3, 6 * 4, 24)
    logits, emb = dec(x, (6, 4))
    ref_logits, ref_emb = naive_forward(dec, x, (6, 4))
    assert logits.shape == (3, 5, 6, 4) and emb.shape == (3, 5, 32)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-5)


def test_reference_architecture_settings():
    dec = MaskTransformerDecoder(27)
    assert len(dec.blocks) == 2
    for blk in dec.blocks:
        assert blk.attn.qkv.bias is None
        assert blk.attn.num_heads == 6
        assert blk.mlp.fc1.out_features == 1536
        assert blk.norm1.eps == 1e-5 and blk.norm2.eps == 1e-5
        assert blk.attn.attn_drop.p == pytest.approx(0.1)
        assert blk.attn.proj_drop.p == pytest.approx(0.1)
    assert dec.decoder_norm.eps == 1e-5
    assert dec.mask_norm.normalized_shape == (27,)
    assert dec.proj_patch.shape == (384, 384) and dec.cls_emb.shape == (1, 27, 384)


def test_outputs_unit_embeddings_and_layernormed_logits():
    torch.manual_seed(1)
    dec = small_decoder(k=7).eval()
    logits, emb = dec(torch.randn(2, 12, 24), (3, 4))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 7), atol=1e-5, rtol=0)
    # default mask_norm affine is identity: per pixel the K logits have mean 0, biased variance v/(v+eps) ~ 1
    torch.testing.assert_close(logits.mean(1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        logits.var(1, unbiased=False), torch.ones(2, 3, 4), atol=2e-2, rtol=0
    )  # eps 1e-5


def test_patch_permutation_equivariance():
    # the decoder has no positional encoding: permuting the patch tokens permutes the logits
    torch.manual_seed(2)
    dec = small_decoder().eval()
    x = torch.randn(2, 12, 24)
    perm = torch.randperm(12)
    a, _ = dec(x, (3, 4))
    b, _ = dec(x[:, perm], (3, 4))
    torch.testing.assert_close(a.flatten(2)[:, :, perm], b.flatten(2), atol=1e-5, rtol=1e-5)


def test_cls_emb_init_variants():
    torch.manual_seed(3)
    ref = MaskTransformerDecoder(10, cls_emb_init="reference")
    e = ref.cls_emb.detach()[0]
    # the reference's orthogonal_ on (1, K, D) = one random unit vector of K*D entries
    assert e.flatten().norm().item() == pytest.approx(1.0, abs=1e-5)
    assert e.norm(dim=1).max().item() < 0.6
    fixed = MaskTransformerDecoder(10, cls_emb_init="orthogonal")
    e = fixed.cls_emb.detach()[0]
    torch.testing.assert_close(e @ e.T, torch.eye(10), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        MaskTransformerDecoder(10, cls_emb_init="xavier")  # type: ignore[arg-type]


def test_other_inits():
    torch.manual_seed(4)
    dec = MaskTransformerDecoder(5)
    assert dec.proj_dec.bias.abs().max().item() == 0.0
    assert dec.proj_dec.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert dec.proj_patch.std().item() == pytest.approx(384**-0.5, rel=0.05)
    assert dec.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_initial_state_restores_weights_in_place():
    torch.manual_seed(5)
    dec = small_decoder()
    init = dec.initial_state()
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    logits, emb = dec(torch.randn(2, 12, 24), (3, 4))
    (logits.square().mean() + emb.sum()).backward()
    assert all(p.grad is not None for p in dec.parameters())
    opt.step()
    assert not torch.equal(dec.cls_emb, init["cls_emb"])
    ids = [id(p) for p in dec.parameters()]
    dec.load_initial_state(init)
    for k, v in dec.state_dict().items():
        assert torch.equal(v, init[k]), k
    assert ids == [id(p) for p in dec.parameters()]  # same objects: the optimizer still tracks them
    dec.reset_parameters()
    assert not torch.equal(dec.proj_patch, init["proj_patch"])  # fresh draw, not the saved one
