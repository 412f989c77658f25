"""Keyed dropout masks (transfgu/models/dropout.py) and the decoder blocks that apply them.

The masks are checked against a naive per-sample draw and against ``nn.Dropout``'s statistics; the decoder with
masks against a naive per-sample forward pass and against timm's ``Block`` (same state_dict keys, same initial
weights under a seed, same outputs); the training loop's masks of a sample against its global-batch position.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfgu.ddp import step_seed
from transfgu.engine.step import draw_dropout
from transfgu.models import decoder as decoder_mod
from transfgu.models.decoder import MaskTransformerDecoder
from transfgu.models.dropout import MaskedDropout, draw_keep_masks

torch.set_num_threads(1)

SHAPES = [(2, 5, 5), (5, 4), (5, 16), (5, 4)]


def naive_keep(shapes, p, keys):
    """One CPU generator per sample, seeded with its key; one uniform vector split in the order of ``shapes``."""
    sizes = [math.prod(s) for s in shapes]
    per_sample = []
    for key in keys:
        u = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(key))
        per_sample.append([(piece < 1 - p).reshape(s) for piece, s in zip(u.split(sizes), shapes)])
    return [torch.stack([ms[j] for ms in per_sample]) for j in range(len(shapes))]


def test_keyed_masks_equal_a_naive_per_sample_draw():
    keys = [step_seed(7, 1, 3, 1 + q) for q in range(5)]
    got = draw_keep_masks(SHAPES, 0.1, 5, "cpu", keys)
    want = naive_keep(SHAPES, 0.1, keys)
    for g, w, s in zip(got, want, SHAPES, strict=True):
        assert g.dtype == torch.bool and g.shape == (5, *s)
        assert torch.equal(g, w)
    # a sample's masks do not depend on the batch it is drawn in (what a rank's slice needs)
    part = draw_keep_masks(SHAPES, 0.1, 2, "cpu", keys[2:4])
    for g, w in zip(part, got, strict=True):
        assert torch.equal(g, w[2:4])
    with pytest.raises(ValueError, match="2 keys for a batch of 3"):
        draw_keep_masks(SHAPES, 0.1, 3, "cpu", keys[:2])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masked_dropout_has_nn_dropout_statistics(p):
    """Keep rate 1 - p, kept values scaled by 1/(1 - p) (unbiased), independent elements: like ``nn.Dropout``."""
    n_samples, shape = 64, (8, 40, 40)
    keys = [step_seed(3, 0, 0, 1 + q) for q in range(n_samples)]
    (keep,) = draw_keep_masks([shape], p, n_samples, "cpu", keys)
    x = torch.ones(n_samples, *shape)
    ours = MaskedDropout(p).train()(x, keep)
    torch.manual_seed(0)
    ref = nn.Dropout(p).train()(x)
    n = x.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    for out in (ours, ref):
        assert out.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])
        rate = float((out > 0).float().mean())
        assert abs(rate - (1 - p)) < 5 * sigma, rate
        assert abs(float(out.mean()) - 1.0) < 5 * sigma / (1 - p)
    assert abs(float((ours > 0).float().mean()) - float((ref > 0).float().mean())) < 5 * math.sqrt(2) * sigma
    # independence: neighbouring elements and neighbouring samples (consecutive keys) keep jointly at (1 - p)^2
    k = keep.flatten(1).float()
    for a, b in ((k[:, :-1], k[:, 1:]), (k[:-1], k[1:])):
        joint = float((a * b).mean())
        assert abs(joint - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / a.numel()), joint
    # every sample has its own mask
    assert len({tuple(row.nonzero().flatten()[:50].tolist()) for row in keep.flatten(1)}) == n_samples


def test_masked_dropout_is_the_identity_in_eval_and_at_p0():
    x = torch.randn(3, 4)
    keep = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.equal(MaskedDropout(0.3).eval()(x, keep), x)
    assert torch.equal(MaskedDropout(0.0).train()(x, keep), x)
    torch.testing.assert_close(MaskedDropout(0.5).train()(x, ~keep), 2 * x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MaskedDropout(1.0)


# -- the decoder with masks ----------------------------------------------------------------------------------
def small_decoder(p: float = 0.1) -> MaskTransformerDecoder:
    dec = MaskTransformerDecoder(4, d_encoder=24, d_model=32, n_layers=2, n_heads=4, mlp_ratio=2.0, dropout=p)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters so that they are checked too
        for m in dec.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return dec


def naive_masked_forward(dec: MaskTransformerDecoder, x: torch.Tensor, grid, keep) -> torch.Tensor:
    """The decoder written out op by op, one sample at a time, each dropout ``y * mask / (1 - p)``."""
    scale = 1.0 / (1.0 - dec.dropout)
    out = []
    for b in range(x.shape[0]):
        t = torch.cat([x[b] @ dec.proj_dec.weight.T + dec.proj_dec.bias, dec.cls_emb[0]], 0)
        for j, blk in enumerate(dec.blocks):
            m_att, m_proj, m_hid, m_out = (m[b] for m in keep[4 * j : 4 * j + 4])
            heads = blk.attn.num_heads
            y = F.layer_norm(t, (t.shape[-1],), blk.norm1.weight, blk.norm1.bias, eps=1e-5)
            q, kk, v = (y @ blk.attn.qkv.weight.T).chunk(3, dim=-1)
            dh = q.shape[-1] // heads
            heads_out = []
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                a = torch.softmax(q[:, sl] @ kk[:, sl].T / math.sqrt(dh), dim=-1)
                heads_out.append((a * m_att[h] * scale) @ v[:, sl])
            t = t + (torch.cat(heads_out, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias) * m_proj * scale
            y = F.layer_norm(t, (t.shape[-1],), blk.norm2.weight, blk.norm2.bias, eps=1e-5)
            y = F.gelu(y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) * m_hid * scale
            t = t + (y @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias) * m_out * scale
        t = F.layer_norm(t, (t.shape[-1],), dec.decoder_norm.weight, dec.decoder_norm.bias, eps=1e-5)
        n = x.shape[1]
        pp = F.normalize(t[:n] @ dec.proj_patch, dim=-1)
        cc = F.normalize(t[n:] @ dec.proj_classes, dim=-1)
        m = F.layer_norm(pp @ cc.T, (dec.n_classes,), dec.mask_norm.weight, dec.mask_norm.bias, eps=1e-5)
        out.append(m.T.reshape(dec.n_classes, *grid))
    return torch.stack(out)


def test_masked_decoder_equals_a_naive_per_sample_forward():
    torch.manual_seed(0)
    dec = small_decoder().train()
    grid = (3, 4)
    x = torch.randn(5, 12, 24)
    shapes = dec.dropout_shapes(12)
    assert shapes[0] == (4, 16, 16) and shapes[2] == (16, 64) and len(shapes) == 8  # 12 patches + 4 classes
    keep = draw_keep_masks(shapes, dec.dropout, 5, "cpu", [step_seed(1, 0, 0, 1 + q) for q in range(5)])
    got, _ = dec(x, grid, keep)
    torch.testing.assert_close(got, naive_masked_forward(dec, x, grid, keep), rtol=1e-4, atol=1e-5)
    # a slice of the batch with the slice of the masks: the same logits (what a data-parallel rank computes)
    part, _ = dec(x[1:3], grid, [m[1:3] for m in keep])
    torch.testing.assert_close(part, got[1:3], rtol=1e-5, atol=1e-6)
    # the masks matter: all-kept masks give another result, and eval mode ignores them
    ones = [torch.ones_like(m) for m in keep]
    assert not torch.allclose(dec(x, grid, ones)[0], got, atol=1e-3)
    dec.eval()
    torch.testing.assert_close(dec(x, grid, keep)[0], dec(x, grid)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="got 4 dropout masks, want 8"):
        dec.train()(x, grid, keep[:4])


class _Replay(nn.Module):
    """A dropout layer of timm's ``Block`` that applies the next given mask (``nn.Dropout``'s formula)."""

    def __init__(self, p: float, masks: list[torch.Tensor]) -> None:
        super().__init__()
        self.p, self.masks = p, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.masks.pop(0) / (1 - self.p)


def test_blocks_are_timm_blocks_same_keys_init_outputs_and_masked_training(monkeypatch):
    """The old decoder (timm ``Block``): same state_dict keys (checkpoints load both ways), same initial weights
    under a seed, same eval outputs; in training, timm's unfused block replaying our masks gives our output."""
    from timm.models.vision_transformer import Block as TimmBlock

    def timm_block(dim, num_heads, mlp_ratio, qkv_bias, drop, eps):
        return TimmBlock(
            dim=dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=drop,
            attn_drop=drop,
            drop_path=0.0,
            norm_layer=partial(nn.LayerNorm, eps=eps),
        )

    torch.manual_seed(5)
    new = MaskTransformerDecoder(6, d_encoder=24, d_model=32, n_layers=2, n_heads=4)
    with monkeypatch.context() as m:
        m.setattr(decoder_mod, "Block", timm_block)
        torch.manual_seed(5)
        old = MaskTransformerDecoder(6, d_encoder=24, d_model=32, n_layers=2, n_heads=4)
    assert isinstance(old.blocks[0], TimmBlock) and not isinstance(new.blocks[0], TimmBlock)
    sd_old, sd_new = old.state_dict(), new.state_dict()
    assert list(sd_old) == list(sd_new)
    for k in sd_old:
        assert torch.equal(sd_old[k], sd_new[k]), k  # seeded runs initialise as before
    with torch.no_grad():  # "trained" weights: every parameter moved
        for prm in old.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    new.load_state_dict(old.state_dict(), strict=True)  # an old checkpoint loads into the new decoder, and back
    old.load_state_dict(new.state_dict(), strict=True)
    x = torch.randn(3, 12, 24)
    torch.testing.assert_close(new.eval()(x, (3, 4))[0], old.eval()(x, (3, 4))[0], rtol=0, atol=0)
    # training mode: timm's unfused attention with its four dropout layers replaying our masks, in block order
    new.train()
    old.train()
    keep = draw_keep_masks(new.dropout_shapes(12), 0.1, 3, "cpu", [11, 12, 13])
    queue = list(keep)
    for blk in old.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop, blk.attn.proj_drop = _Replay(0.1, queue), _Replay(0.1, queue)
        blk.mlp.drop1, blk.mlp.drop2 = _Replay(0.1, queue), _Replay(0.1, queue)
    torch.testing.assert_close(new(x, (3, 4), keep)[0], old(x, (3, 4))[0], rtol=1e-5, atol=1e-6)
    assert not queue  # every mask was used once


def test_training_masks_follow_the_global_batch_position():
    """``draw_dropout`` (the training loop's masks): the sample at global position q gets the masks of key
    ``step_seed(seed, epoch, step, 1 + q)``, whichever piece of the batch a rank draws; none without dropout."""
    dec = small_decoder().train()
    whole = draw_dropout(dec, (3, 4), 7, 2, 5, offset=0, count=5, device=torch.device("cpu"))
    piece = draw_dropout(dec, (3, 4), 7, 2, 5, offset=3, count=2, device=torch.device("cpu"))
    want = naive_keep(dec.dropout_shapes(12), 0.1, [step_seed(7, 2, 5, 1 + q) for q in range(5)])
    for w, p, n in zip(whole, piece, want, strict=True):
        assert torch.equal(w, n) and torch.equal(p, n[3:5])
    other_step = draw_dropout(dec, (3, 4), 7, 2, 6, offset=0, count=5, device=torch.device("cpu"))
    assert not torch.equal(other_step[0], whole[0])
    assert draw_dropout(dec.eval(), (3, 4), 7, 2, 5, 0, 5, torch.device("cpu")) is None
    assert draw_dropout(small_decoder(0.0).train(), (3, 4), 7, 2, 5, 0, 5, torch.device("cpu")) is None
