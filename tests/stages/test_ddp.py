"""Data-parallel training is the same training as one process (issue 12 item 5; transfgu/ddp.py).

The pieces are checked against the one-process definition (sampler, augmentation slices, loss shares, RNG state),
then a real 2-rank gloo process group trains on real CamVid images against the one-process run: same batches, same
random decisions (dropout masks at the reference's 0.1 included), same losses and step decisions for every step
across teacher updates, same final weights. A rank whose own loss share is not positive never skips alone (no hang:
the run has a timeout).
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.data import require_shared_data
from helpers.ddp import run_ranks
from PIL import Image

from transfgu.ddp import EpochRows, GlobalBatchSampler, epoch_order, global_split, step_loader, step_seed
from transfgu.engine.augment import apply_augment, augment_batch, draw_step
from transfgu.engine.step import shared_loss
from transfgu.engine.targets import Targets, make_targets
from transfgu.losses import LossWeights, total_loss

N_IMAGES, BATCH, EPOCHS, SEED = 7, 3, 3, 7
DROPOUT = 0.1  # the reference's: a sample's dropout masks are keyed by its global-batch position, not the rank


# -- helpers --------------------------------------------------------------------------------------------------
def camvid_items(n: int = N_IMAGES, hw: tuple[int, int] = (64, 80), patch: int = 8) -> list[dict[str, torch.Tensor]]:
    """Real CamVid images at the train size with pseudo-label-like maps pooled from their ground truth."""
    root = require_shared_data("camvid")
    ids = sorted(p.stem for p in (root / "images" / "train").glob("*.jpg"))[:n]
    items = []
    for i in ids:
        im = Image.open(root / "images" / "train" / f"{i}.jpg").convert("RGB").resize((hw[1], hw[0]), Image.BILINEAR)
        lb = Image.open(root / "labels" / "train" / f"{i}.png").resize((hw[1], hw[0]), Image.NEAREST)
        y = torch.from_numpy(np.asarray(lb).astype(np.int64))
        oh = F.one_hot(y.clamp(0, 10), 11).permute(2, 0, 1).float() * (y < 11)
        items.append({"image": torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1),
                      "pseudo": F.avg_pool2d(oh[None], patch)[0]})
    return items


#: The train size per patch size: multiples of twice the patch (training crops are half of it).
TRAIN_HW = {8: (64, 80), 14: (56, 84), 16: (64, 96)}


def _setup(variant: str, arch: str = "vit_test_tiny"):
    from transfgu.models.backbone import build_backbone
    from transfgu.models.decoder import MaskTransformerDecoder

    torch.manual_seed(0)
    backbone = build_backbone(arch, weights="none").eval()
    items = camvid_items(hw=TRAIN_HW[backbone.patch_size], patch=backbone.patch_size)
    if variant == "things":  # a few "object" concepts, the rest becomes background
        items = [{"image": it["image"], "pseudo": it["pseudo"][5:]} for it in items]
    k = items[0]["pseudo"].shape[0] + (variant == "things")
    torch.manual_seed(1)
    student = MaskTransformerDecoder(k, d_encoder=backbone.embed_dim, d_model=48, n_layers=2, n_heads=2,
                                     dropout=DROPOUT)
    return backbone, student, items


def _train(rank: int, world: int, out: str, opts: dict) -> None:
    """Train EPOCHS epochs (a teacher update at epochs 1 and 2) on ``world`` ranks; write steps and weights."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from transfgu.engine import step as engine_step
    from transfgu.engine.loop import train_one_epoch
    from transfgu.engine.step import make_optimizer, make_teacher, reboot
    from transfgu.losses import BootstrapSchedule, LossTerms

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{opts['init']}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=90))
    local: list[float] = []
    real_share = engine_step.shared_loss
    shift = opts.get("shift")

    def recorded_share(*a, **k) -> LossTerms:
        t = real_share(*a, **k)
        if shift is not None and rank == shift["rank"]:
            # this rank's own share becomes exactly shift["value"]; its gradient stays that of the share
            t = LossTerms(total=t.total - t.total.detach() + shift["value"], peer=t.peer, diversity=t.diversity,
                          uncertainty=t.uncertainty)
        local.append(float(t.total.detach()))
        return t

    engine_step.shared_loss = recorded_share
    try:
        result = {}
        for variant, colour in (("thingstuff", "batch"), ("things", "per_sample")):
            backbone, student, items = _setup(variant, opts.get("arch", "vit_test_tiny"))
            model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
            loader = step_loader(items, BATCH, SEED, rank, world)
            opt = make_optimizer(student, lr=2e-3)
            initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
            sched = BootstrapSchedule(1, start_epoch=1)  # epoch 0 plain CE; teacher updates before epochs 1, 2
            teacher, steps = None, []
            local.clear()
            for epoch in range(opts.get("epochs", EPOCHS)):
                plan = sched.plan(epoch)
                if plan.reboot:
                    teacher = teacher or make_teacher(student)
                    reboot(student, teacher, initial)
                loader.batch_sampler.set_epoch(epoch)
                train_one_epoch(model, teacher if plan.bootstrapping else None, backbone, loader, opt, plan, "cpu",
                                variant=variant, colour_mode=colour, seed=SEED, on_step=steps.append, log_every=0)
            for s, v in zip(steps, local, strict=True):
                s["local"] = v
            result[variant] = steps
            save_file({k: v.contiguous() for k, v in student.state_dict().items()},
                      str(Path(out) / f"{variant}-rank{rank}.safetensors"))
        (Path(out) / f"steps-rank{rank}.json").write_text(json.dumps(result))
    finally:
        engine_step.shared_loss = real_share
        if world > 1:
            dist.destroy_process_group()


def _load(tmp: Path, rank: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    steps = json.loads((tmp / f"steps-rank{rank}.json").read_text())
    return steps, {v: load_file(str(tmp / f"{v}-rank{rank}.safetensors")) for v in steps}


# -- sampler --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n,batch", [(7, 3), (10, 4), (5, 8), (9, 9)])
def test_rank_pieces_make_the_one_process_batches(n, batch, world):
    one = GlobalBatchSampler(n, batch, SEED)
    ranks = [GlobalBatchSampler(n, batch, SEED, r, world) for r in range(world)]
    for epoch in (0, 1, 5):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        # one rank: exactly DataLoader(batch_size=min(batch, n), sampler=<epoch order>, drop_last=False)
        order = epoch_order(n, SEED, epoch)
        b = min(batch, n)
        assert [[k[0] for k in keys] for keys in one] == [order[i : i + b] for i in range(0, n, b)]
        per_rank = [list(s) for s in ranks]
        assert len({len(p) for p in per_rank}) == 1  # every rank runs every step: DDP needs that
        for step, whole in enumerate(one):
            real = [k for p in per_rank for k in p[step] if k[3]]
            assert [k[0] for k in real] == [k[0] for k in whole]  # rank pieces, in rank order, are the batch
            assert [k[1] for k in real] == list(range(len(whole)))
            sizes = [sum(k[3] for k in p[step]) for p in per_rank]
            assert max(sizes) - min(sizes) <= 1
            for p in per_rank:
                if not any(k[3] for k in p[step]):  # empty piece: one placeholder of weight 0
                    assert len(p[step]) == 1


def test_every_epoch_reshuffles_images_across_ranks():
    s = GlobalBatchSampler(40, 8, SEED, rank=0, world_size=2)
    seen = []
    for epoch in range(4):
        s.set_epoch(epoch)
        seen.append(s.rank_indices())
    assert all(len(x) == 20 for x in seen)
    assert len({frozenset(x) for x in seen}) == 4  # a fixed shard per rank would repeat its set


def test_global_split_rejects_a_bad_rank():
    assert global_split(5, 1, 2) == (3, 2)
    with pytest.raises(ValueError, match="rank 2"):
        global_split(5, 2, 2)


def test_step_seed_separates_steps_and_streams():
    seeds = {step_seed(SEED, e, i, s) for e in range(3) for i in range(50) for s in range(4)}
    assert len(seeds) == 600 and all(0 <= x < 2**63 for x in seeds)


def test_epoch_rows_holds_only_the_loaded_rows():
    reads: list[list[str]] = []

    def read(ids):
        reads.append(list(ids))
        return {i: i.upper() for i in ids}

    rows = EpochRows(["a", "b", "c"], read)
    assert "c" in rows and len(rows) == 3
    rows.load(["a", "b"])
    assert rows["a"] == "A" and set(rows.rows) == {"a", "b"}
    rows.load(["b", "c"])  # b is kept, only c is read
    assert reads[-1] == ["c"] and set(rows.rows) == {"b", "c"}
    with pytest.raises(KeyError, match="not loaded"):
        rows["a"]
    with pytest.raises(KeyError, match="not in the store"):
        rows.load(["z"])


# -- draws and loss shares ------------------------------------------------------------------------------------
@pytest.mark.parametrize("colour", ["batch", "per_sample"])
def test_a_slice_of_the_global_draws_augments_like_the_whole_batch(colour):
    items = camvid_items(5)
    images = torch.stack([it["image"] for it in items])
    pseudo = torch.stack([it["pseudo"] for it in items])
    g = torch.Generator().manual_seed(3)
    draws = draw_step(5, (64, 80), g, n_channels=11, colour_mode=colour, p_jitter=1.0, p_gray=0.5, p_blur=0.5)
    whole = apply_augment(images, pseudo, draws)
    for lo, n in ((0, 2), (2, 3), (4, 1)):
        part = apply_augment(images[lo : lo + n], pseudo[lo : lo + n], draws.piece(lo, n))
        torch.testing.assert_close(part[0], whole[0][lo : lo + n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(part[1], whole[1][lo : lo + n], rtol=1e-5, atol=1e-6)
    # the legacy one-generator path draws the same decisions in the same order
    old = augment_batch(images, pseudo, torch.Generator().manual_seed(3), colour, p_jitter=1.0, p_gray=0.5,
                        p_blur=0.5)
    torch.testing.assert_close(old[0], whole[0], rtol=0, atol=0)


@pytest.mark.parametrize("variant,empty_fg", [("thingstuff", "zero"), ("things", "zero"), ("things", "nan")])
@pytest.mark.parametrize("pieces", [(4,), (2, 2), (3, 1), (1, 2, 1)])
def test_loss_shares_sum_to_the_one_process_loss(variant, empty_fg, pieces):
    torch.manual_seed(5)
    b, c, h, w = 4, 6, 4, 5
    pseudo = torch.rand(b, c - (variant == "things"), h, w)
    pseudo[1] = 0.02 * pseudo[1]  # ... with little foreground in image 1 (normalised: still some > T_bg)
    logits = torch.randn(b, c, h, w, requires_grad=True)
    emb = torch.randn(b, c, 8, requires_grad=True)
    perm = torch.randperm(c)
    full = make_targets(pseudo, None, variant, perm=perm)
    if variant == "things":
        full.fg_mask[2:] = False  # images 2 and 3 without foreground: a rank may hold none
        if empty_fg == "nan" and pieces == (4,):
            full.fg_mask[:] = False  # the whole batch without foreground: the definition's NaN
    weights = LossWeights(div=0.7, unc=0.3)
    want = total_loss(logits, full.hard, emb, full.negative, 0.05, full.fg_mask, variant == "things", 0.7, 0.3,
                      empty_fg=empty_fg)
    fg_total = float(full.fg_mask.sum()) if full.fg_mask is not None else None
    got, lo = 0.0, 0
    for n in pieces:
        sl = slice(lo, lo + n)
        t = Targets(full.hard[sl], full.negative[sl], None if full.fg_mask is None else full.fg_mask[sl], full.soft[sl])
        got = got + shared_loss(logits[sl], t, emb[sl], True, 0.05, variant, weights, empty_fg, n / b, fg_total).total
        lo += n
    if math.isnan(float(want.total.detach())):
        assert math.isnan(float(got.detach()))
        return
    torch.testing.assert_close(got, want.total, rtol=1e-6, atol=1e-6)
    g_want = torch.autograd.grad(want.total, (logits, emb))
    g_got = torch.autograd.grad(got, (logits, emb))
    for a, e in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_round_state_saves_and_restores_the_rng(tmp_path):
    from transfgu.checkpoint import load_train_state, restore_rng, save_train_state
    from transfgu.engine.step import make_optimizer

    torch.manual_seed(11)
    dec = torch.nn.Linear(3, 2)
    initial = {k: v.clone() for k, v in dec.state_dict().items()}
    save_train_state(tmp_path, dec, None, initial, make_optimizer(dec, 1e-3), {"epoch": 0})
    want = torch.rand(4)
    torch.manual_seed(99)
    restore_rng(load_train_state(tmp_path)[0]["rng"])
    torch.testing.assert_close(torch.rand(4), want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_round_state_saves_and_restores_the_cuda_rng(tmp_path):
    from transfgu.checkpoint import load_train_state, restore_rng, save_train_state
    from transfgu.engine.step import make_optimizer

    torch.cuda.manual_seed_all(11)
    torch.rand(1, device="cuda")  # CUDA initialised: its state belongs in the checkpoint
    dec = torch.nn.Linear(3, 2)
    initial = {k: v.clone() for k, v in dec.state_dict().items()}
    save_train_state(tmp_path, dec, None, initial, make_optimizer(dec, 1e-3), {"epoch": 0})
    groups = load_train_state(tmp_path)[0]
    assert "cuda.0" in groups["rng"]
    want = torch.rand(8, device="cuda")
    torch.cuda.manual_seed_all(99)
    restore_rng(groups["rng"])
    torch.testing.assert_close(torch.rand(8, device="cuda"), want, rtol=0, atol=0)


# -- two gloo ranks against one process ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("arch", ["vit_test_tiny", "vit_test_tiny_reg4", "vit_test_tiny_dinov3"])
def test_two_gloo_ranks_train_exactly_like_one_process(tmp_path, arch):
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir()
    two_dir.mkdir()
    _train(0, 1, str(one_dir), {"arch": arch})
    run_ranks(_train, two_dir, 2, {"arch": arch})
    one, one_w = _load(one_dir, 0)
    r0, r0_w = _load(two_dir, 0)
    r1, r1_w = _load(two_dir, 1)
    for variant in ("thingstuff", "things"):
        ref, a, b = one[variant], r0[variant], r1[variant]
        assert len(ref) == len(a) == len(b) == EPOCHS * math.ceil(N_IMAGES / BATCH)
        assert sum(s["stepped"] for s in ref) >= 6  # the comparison covers real optimizer steps
        for s, x, y in zip(ref, a, b, strict=True):
            where = f"{variant} epoch {s['epoch']} step {s['step']}"
            assert x["loss"] == y["loss"], where  # one all-reduced loss: both ranks hold the same number
            assert x["stepped"] == y["stepped"] == s["stepped"], where
            for key in ("perm", "colours", "boxes", "flip"):  # one set of decisions per global step
                assert x[key] == y[key] == s[key], (where, key)
            assert x["indices"] + y["indices"] == s["indices"], where  # the pieces make the one-process batch
            assert x["images"] == s["images"], where
            assert x["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-6), where
            assert x["local"] + y["local"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-6), where
        for k, v in one_w[variant].items():
            assert torch.equal(r0_w[variant][k], r1_w[variant][k]), k  # DDP: identical replicas
            torch.testing.assert_close(r0_w[variant][k], v, rtol=1e-4, atol=2e-5, msg=f"{variant} {k}")
        # the steps changed the weights (the equality above is not that of two untouched models)
        _, init_student, _ = _setup(variant, arch)
        moved = max(float((v - init_student.state_dict()[k]).abs().max()) for k, v in one_w[variant].items())
        assert moved > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("shift,expect_step", [(-1e-3, True), (-100.0, False)],
                         ids=["global-positive", "global-nonpositive"])
def test_a_rank_with_a_nonpositive_loss_never_skips_alone(tmp_path, shift, expect_step):
    """Rank 1's own share is made negative. The old per-rank rule would skip there while rank 0 stepped (rank 0
    then waits in the gradient all-reduce for a partner that never comes): here both take the global decision."""
    run_ranks(_train, tmp_path, 2, {"epochs": 1, "shift": {"rank": 1, "value": shift}})
    r0, r0_w = _load(tmp_path, 0)
    r1, r1_w = _load(tmp_path, 1)
    for variant in ("thingstuff", "things"):
        assert r0[variant]
        for x, y in zip(r0[variant], r1[variant], strict=True):
            assert y["local"] == pytest.approx(shift) and x["local"] > 0  # alone, rank 1 would skip and rank 0 step
            assert x["stepped"] == y["stepped"] and x["loss"] == y["loss"]
            assert x["stepped"] is expect_step
        for k, v in r0_w[variant].items():
            assert torch.equal(v, r1_w[variant][k]), k
        _, init_student, _ = _setup(variant)
        same = all(torch.equal(v, init_student.state_dict()[k]) for k, v in r0_w[variant].items())
        assert same is (not expect_step)
