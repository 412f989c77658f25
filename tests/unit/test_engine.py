"""Targets, augmentation alignment, optimiser, reboot, training and evaluation loops (the reference's)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from transfgu.engine.augment import augment_batch, colour_augment, crop_images, crop_labels, sample_crop_boxes
from transfgu.engine.loop import evaluate, train_one_epoch
from transfgu.engine.step import make_optimizer, make_teacher, predict_logits, reboot
from transfgu.engine.targets import make_targets, minmax_normalise
from transfgu.losses import BootstrapSchedule, EpochPlan, LossWeights
from transfgu.metrics import confusion_matrix, segmentation_scores
from transfgu.models.backbone import IMAGENET_MEAN, IMAGENET_STD, build_backbone, normalize
from transfgu.models.decoder import MaskTransformerDecoder

torch.set_num_threads(1)
N_CAMVID = 11  # classes; 11 = void


# -- helpers -------------------------------------------------------------------------------------------------
def load_camvid(root: Path, split: str, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = sorted(p.stem for p in (root / "images" / split).glob("*.jpg"))[:n]
    imgs, labels = [], []
    for i in ids:
        im = (
            Image.open(root / "images" / split / f"{i}.jpg")
            .convert("RGB")
            .resize((size, size), Image.BILINEAR)
        )
        lb = Image.open(root / "labels" / split / f"{i}.png").resize((size, size), Image.NEAREST)
        imgs.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        labels.append(torch.from_numpy(np.asarray(lb).astype(np.int64)))
    return torch.stack(imgs), torch.stack(labels)


def onehot_pooled(labels: torch.Tensor, k: int, cell: int) -> torch.Tensor:
    """Per-cell class fractions: a pseudo-label-like (B, K, H/cell, W/cell) map from GT (void -> zeros)."""
    valid = (labels >= 0) & (labels < k)
    oh = F.one_hot(labels.clamp(0, k - 1), k).permute(0, 3, 1, 2).float() * valid[:, None]
    return F.avg_pool2d(oh, cell)


@pytest.fixture(scope="module")
def camvid_batch(camvid):
    return load_camvid(camvid, "train", 4, 128)


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return build_backbone("vit_test_tiny", weights="none")


def small_decoder(k: int) -> MaskTransformerDecoder:
    return MaskTransformerDecoder(k, d_encoder=48, d_model=48, n_layers=2, n_heads=2)


# -- targets -------------------------------------------------------------------------------------------------
def naive_targets(pseudo, teacher, variant, t_bg=0.1, mix=0.5):
    b, k, h, w = pseudo.shape
    c = k + 1 if variant == "things" else k
    soft = torch.zeros(b, c, h, w, dtype=torch.float64)
    fg = torch.zeros(b, h, w, dtype=torch.bool)
    hard = torch.zeros(b, h, w, dtype=torch.long)
    for i in range(b):
        vals = pseudo[i].flatten().tolist()
        lo, hi = min(vals), max(vals)
        for y in range(h):
            for x in range(w):
                p = [(float(pseudo[i, j, y, x]) - lo) / (hi - lo) for j in range(k)]
                if variant == "things":
                    fg[i, y, x] = max(p) > t_bg
                    p = [max(0.0, t_bg - max(p))] + p
                if teacher is not None:
                    z = [float(teacher[i, j, y, x]) for j in range(c)]
                    m = max(z)
                    e = [math.exp(v - m) for v in z]
                    p = [mix * ei / sum(e) + (1 - mix) * pi for ei, pi in zip(e, p)]
                for j in range(c):
                    soft[i, j, y, x] = p[j]
                hard[i, y, x] = max(range(c), key=lambda j, p=p: (p[j], -j))  # first max wins ties
    return soft, hard, fg


@pytest.mark.parametrize("variant", ["thingstuff", "things"])
@pytest.mark.parametrize("with_teacher", [False, True])
def test_make_targets_matches_loop(variant, with_teacher):
    g = torch.Generator().manual_seed(0)
    pseudo = torch.rand(3, 4, 5, 6, generator=g, dtype=torch.float64) * 3 + 1
    pseudo[1] *= 0.01  # different ranges per sample: normalisation is per sample
    c = 5 if variant == "things" else 4
    teacher = 2 * torch.randn(3, c, 5, 6, generator=g, dtype=torch.float64) if with_teacher else None
    t = make_targets(pseudo, teacher, variant, generator=g)
    soft, hard, fg = naive_targets(pseudo.double(), teacher, variant)
    torch.testing.assert_close(t.soft.double(), soft, atol=1e-5, rtol=0)
    assert torch.equal(t.hard, hard)
    if variant == "things":
        assert torch.equal(t.fg_mask, fg)
    else:
        assert t.fg_mask is None
    # negatives: one batch-wide bijective relabelling of the class axis
    pairs = {(int(a), int(b)) for a, b in zip(t.hard.flatten(), t.negative.flatten())}
    fwd = dict(pairs)
    assert len(fwd) == len(pairs)  # a function of the label
    assert len(set(fwd.values())) == len(fwd)  # injective


def test_negative_is_inverse_permutation_of_argmax():
    # y_neg = argmax of the channel-permuted map (eq. 13), checked with the same permutation draw
    g = torch.Generator().manual_seed(5)
    pseudo = torch.rand(2, 6, 4, 4, generator=g)
    t = make_targets(pseudo, None, "thingstuff", generator=torch.Generator().manual_seed(9))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(9))
    assert torch.equal(t.negative, t.soft[:, perm].argmax(1))


def test_constant_pseudo_map_gives_no_nan():
    pseudo = torch.rand(2, 3, 4, 4)
    pseudo[0] = 0.7  # constant crop: the reference divides 0 by 0
    p = minmax_normalise(pseudo)
    assert torch.isfinite(p).all() and p[0].abs().max() == 0
    t = make_targets(pseudo, None, "things", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(t.soft).all()
    assert (t.hard[0] == 0).all() and not t.fg_mask[0].any()  # all background


def test_things_background_wins_below_half_threshold():
    # bg = relu(0.1 - max) beats a foreground value v only when v < 0.05 (ties -> bg)
    pseudo = torch.tensor([0.0, 0.04, 0.05, 0.06, 1.0]).view(1, 1, 1, 5)
    t = make_targets(pseudo, None, "things", generator=torch.Generator().manual_seed(0))
    assert t.hard.flatten().tolist() == [0, 0, 0, 1, 1]


# -- augmentation --------------------------------------------------------------------------------------------
def _linear_scene(hh: int, ww: int, cell: int):
    ys = torch.arange(hh, dtype=torch.float64) + 0.5
    xs = torch.arange(ww, dtype=torch.float64) + 0.5
    f = 20 + 0.6 * xs[None, :] + 0.7 * ys[:, None]
    img = f.round().clamp(0, 255).to(torch.uint8).expand(3, hh, ww)
    ly = (torch.arange(hh // cell, dtype=torch.float64) + 0.5) * cell  # label cell centres in pixel units
    lx = (torch.arange(ww // cell, dtype=torch.float64) + 0.5) * cell
    pseudo = torch.stack([lx[None, :].expand(len(ly), -1), ly[:, None].expand(-1, len(lx))])
    return img, pseudo.float()


@pytest.mark.parametrize("p_flip", [0.0, 1.0, 0.5])
def test_image_and_label_crops_stay_aligned(p_flip):
    hh, ww, cell = 160, 192, 8
    img, pseudo = _linear_scene(hh, ww, cell)
    b = 8
    images = img.unsqueeze(0).repeat(b, 1, 1, 1)
    pseudos = pseudo.unsqueeze(0).repeat(b, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    crops, labels = augment_batch(
        images, pseudos, g, out_hw=(80, 96), patch_size=8, p_flip=p_flip, p_jitter=0, p_gray=0, p_blur=0
    )
    assert crops.shape == (b, 3, 80, 96) and labels.shape == (b, 2, 10, 12)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pix = ((crops * std + mean) * 255)[:, 0:1].double()
    # each label cell covers an 8x8 block of the crop; both must see the same scene position
    img_cell = F.avg_pool2d(pix, 8)[:, 0]
    lab_x, lab_y = labels[:, 0].double(), labels[:, 1].double()
    from_label = 20 + 0.6 * lab_x + 0.7 * lab_y
    # away from the image border (where RoI-Align and grid_sample clamp differently) they agree exactly
    inside = (lab_x > 2 * cell) & (lab_x < ww - 2 * cell) & (lab_y > 2 * cell) & (lab_y < hh - 2 * cell)
    assert inside.float().mean() > 0.3
    err = (img_cell - from_label).abs()[inside]
    assert err.max().item() < 0.6  # uint8 rounding of the scene
    # flips: the label x coordinate decreases along the row exactly for the flipped samples
    dx = lab_x[:, :, 1:] - lab_x[:, :, :-1]
    flipped = (dx < 0).all(dim=(1, 2))
    assert ((dx > 0).all(dim=(1, 2)) | flipped).all()
    if p_flip == 1.0:
        assert flipped.all()
    elif p_flip == 0.0:
        assert not flipped.any()
    # crop scales from {0.4..0.9}: a label cell spans ~s * W / 12 image px (the crop side is rounded;
    # the median skips border cells, which clamp)
    scale = dx.abs().flatten(1).median(dim=1).values / (ww / 12)
    assert all(any(abs(s - q) < 0.01 for q in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)) for s in scale.tolist())


def test_crop_images_equals_crop_then_resize():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 48, 64, generator=g)
    boxes = sample_crop_boxes(3, (48, 64), (0.5, 0.75), g)
    out = crop_images(images, boxes, (20, 24))
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        ref = F.interpolate(
            images[i : i + 1, :, y0:y1, x0:x1], size=(20, 24), mode="bilinear", align_corners=False
        )
        # identical except the outermost output ring (the crop-then-resize replicates the crop edge)
        torch.testing.assert_close(out[i, :, 1:-1, 1:-1], ref[0, :, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_label_crop_matches_naive_crop_on_camvid(camvid_batch):
    # image path (full-res one-hot, crop+resize, per-cell mean) vs label path (RoI-Align of pooled one-hot)
    _, labels = camvid_batch
    onehot = F.one_hot(labels.clamp(0, N_CAMVID), N_CAMVID + 1).permute(0, 3, 1, 2).float()
    pseudo = F.avg_pool2d(onehot, 8)  # (B, 12, 16, 16) at the token grid of a 128-px image
    g = torch.Generator().manual_seed(3)
    boxes = sample_crop_boxes(4, (128, 128), (0.5, 0.75, 1.0), g)
    lab = crop_labels(pseudo, boxes, (128, 128), (8, 8))
    naive = F.avg_pool2d(crop_images(onehot, boxes, (64, 64)), 8)
    agree = (lab.argmax(1) == naive.argmax(1)).float().mean().item()
    assert agree > 0.9
    assert (lab - naive).abs().mean().item() < 0.02
    # the half-pixel convention matters: aligned=False, or a box off by one cell, fails both bounds
    rois = torch.cat([torch.arange(4.0)[:, None], boxes.float() / 8], 1)
    legacy = roi_align(pseudo, rois, (8, 8), 1.0, -1, aligned=False)
    shifted = crop_labels(
        pseudo, boxes + torch.tensor([8.0, 0.0, 8.0, 0.0], dtype=boxes.dtype), (128, 128), (8, 8)
    )
    for bad in (legacy, shifted):
        assert (bad.argmax(1) == naive.argmax(1)).float().mean().item() < 0.85
        assert (bad - naive).abs().mean().item() > 0.025


def test_colour_modes():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, 16, 16, generator=g).repeat(6, 1, 1, 1)
    kw = {"p_jitter": 1.0, "p_gray": 0.0, "p_blur": 0.0}
    batch = colour_augment(x, torch.Generator().manual_seed(0), "batch", **kw)
    per = colour_augment(x, torch.Generator().manual_seed(0), "per_sample", **kw)
    assert not torch.allclose(batch[0], x[0], atol=1e-3)  # something happened
    assert all(torch.equal(batch[0], batch[i]) for i in range(6))  # one decision for the batch
    assert not any(torch.allclose(per[0], per[i], atol=1e-4) for i in range(1, 6))
    gray = colour_augment(x, g, "batch", p_jitter=0, p_gray=1.0, p_blur=0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    none = colour_augment(x, g, "per_sample", p_jitter=0, p_gray=0, p_blur=0)
    assert torch.equal(none, x)


# -- optimiser and reboot ------------------------------------------------------------------------------------
def test_make_optimizer_decays_only_matrices():
    torch.manual_seed(0)
    dec = small_decoder(5)
    opt = make_optimizer(dec, lr=1e-2, weight_decay=5e-4)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 5e-4 and opt.param_groups[1]["weight_decay"] == 0.0
    for name, p in dec.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name
    assert id(dec.cls_emb) in decayed and id(dec.proj_patch) in decayed and id(dec.proj_classes) in decayed
    before = {n: p.detach().clone() for n, p in dec.named_parameters()}
    for p in dec.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero loss gradient: only coupled L2 moves parameters
    for name, p in dec.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (p.ndim >= 2 and bool(before[name].abs().sum() > 0)), name


def test_reboot_copies_student_and_restores_initial_weights():
    torch.manual_seed(1)
    student = small_decoder(4)
    init = student.initial_state()
    teacher = make_teacher(student)
    opt = make_optimizer(student, lr=1e-2)
    logits, _ = student(torch.randn(2, 4, 48), (2, 2))
    logits.square().mean().backward()
    opt.step()
    trained = {k: v.clone() for k, v in student.state_dict().items()}
    reboot(student, teacher, init)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, trained[k]), k
    for k, v in student.state_dict().items():
        assert torch.equal(v, init[k]), k
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # Adam moments survive and still belong to the student's parameters
    assert len(opt.state) > 0 and all(any(p is q for q in student.parameters()) for p in opt.state)
    student.cls_emb.data.add_(1.0)  # teacher is a copy, not a view
    assert torch.equal(teacher.cls_emb, trained["cls_emb"])


# -- training and evaluation on real images ------------------------------------------------------------------
def test_train_one_epoch_learns_on_camvid(camvid_batch, tiny_backbone):
    images, labels = camvid_batch
    pseudo = onehot_pooled(labels, N_CAMVID, 8)  # (4, 11, 16, 16)
    loader = [{"image": images, "pseudo": pseudo, "label": labels}] * 10
    torch.manual_seed(0)
    student = small_decoder(N_CAMVID)
    init = student.initial_state()
    opt = make_optimizer(student, lr=2e-3)
    bb_before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    sched = BootstrapSchedule(2, start_epoch=3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for epoch in range(3):
        out = train_one_epoch(
            student, None, tiny_backbone, loader, opt, sched.plan(epoch), "cpu", LossWeights(), "thingstuff",
            generator=g, log_every=0,
        )  # fmt: skip
        assert all(math.isfinite(out[k]) for k in ("loss", "peer", "diversity", "uncertainty"))
        assert out["steps"] + out["skipped"] == out["batches"] == 10 and out["images"] == 40
        losses.append(out["peer"])
    assert losses[-1] < losses[0] - 0.05, losses
    # frozen backbone: unchanged, no gradients
    for k, v in tiny_backbone.state_dict().items():
        assert torch.equal(v, bb_before[k]), k
    assert all(p.grad is None for p in tiny_backbone.parameters())
    # bootstrapping epoch: reboot, teacher on the same crops, negative term at alpha 0.03
    plan = sched.plan(3)
    assert plan.reboot and plan.alpha == pytest.approx(0.03)
    teacher = make_teacher(student)
    reboot(student, teacher, init)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = train_one_epoch(
        student, teacher, tiny_backbone, loader[:3], opt, plan, "cpu", generator=g, log_every=0,
        colour_mode="per_sample",
    )  # fmt: skip
    assert math.isfinite(out["loss"]) and out["alpha"] == pytest.approx(0.03) and out["steps"] == 3
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    assert not any(
        torch.equal(v, init[k]) for k, v in student.state_dict().items() if v.dtype.is_floating_point
    )


def test_step_rule_skips_nonpositive_loss(camvid_batch, tiny_backbone):
    images, labels = camvid_batch
    loader = [{"image": images, "pseudo": onehot_pooled(labels, N_CAMVID, 8)}] * 2
    torch.manual_seed(1)
    student = small_decoder(N_CAMVID)
    teacher = make_teacher(student)
    opt = make_optimizer(student, lr=1e-3)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    plan = EpochPlan(epoch=5, bootstrapping=True, reboot=False, epoch_iter=0, alpha=50.0)  # loss < 0
    out = train_one_epoch(student, teacher, tiny_backbone, loader, opt, plan, "cpu", log_every=0)
    assert out["skipped"] == 2 and out["steps"] == 0 and out["loss"] < 0
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    out = train_one_epoch(
        student, teacher, tiny_backbone, loader, opt, plan, "cpu", log_every=0, skip_nonpositive=False
    )
    assert out["steps"] == 2
    # value clamp: after clip_grad_value_ every gradient entry lies in [-c, c]
    for p in student.parameters():
        assert p.grad is None or p.grad.abs().max().item() <= 1.0 + 1e-7


def test_things_variant_trains(camvid_batch, tiny_backbone):
    images, labels = camvid_batch
    pseudo = onehot_pooled(labels, N_CAMVID, 8)[:, 5:]  # a few "object" concepts; the rest becomes background
    torch.manual_seed(2)
    student = small_decoder(pseudo.shape[1] + 1)
    teacher = make_teacher(student)
    opt = make_optimizer(student, lr=1e-3)
    plan = EpochPlan(epoch=0, bootstrapping=True, reboot=True, epoch_iter=0, alpha=0.03)
    out = train_one_epoch(
        student, teacher, tiny_backbone, [{"image": images, "pseudo": pseudo}] * 2, opt, plan, "cpu",
        variant="things", generator=torch.Generator().manual_seed(0), log_every=0,
    )  # fmt: skip
    assert out["steps"] == 2 and math.isfinite(out["uncertainty"])


def test_evaluate_on_camvid(camvid, tiny_backbone):
    images, labels = load_camvid(camvid, "val", 3, 72)
    labels[labels == N_CAMVID] = -1
    torch.manual_seed(3)
    dec = small_decoder(N_CAMVID)
    loader = [{"image": images[:2], "label": labels[:2]}, {"image": images[2:], "label": labels[2:]}]
    scores = evaluate(dec, tiny_backbone, loader, n_clusters=N_CAMVID, n_classes=N_CAMVID, device="cpu",
                      eval_hw=(64, 64))  # fmt: skip
    # oracle: resize as documented, predict, one confusion matrix, score
    x = F.interpolate(normalize(images), size=(64, 64), mode="bilinear", align_corners=False)
    y = F.interpolate(labels[:, None].float(), size=(64, 64), mode="nearest")[:, 0].long()
    dec.eval()
    pred = predict_logits(dec, tiny_backbone, x, (64, 64)).argmax(1)
    conf = confusion_matrix(y, pred, N_CAMVID, N_CAMVID, ignore_index=-1)
    np.testing.assert_array_equal(scores["confusion"], conf)
    want = segmentation_scores(conf)
    assert scores["mIoU"] == pytest.approx(want["mIoU"])
    assert 0.0 <= scores["mIoU"] <= 1.0 and 0.0 <= scores["pixel_accuracy"] <= 1.0
    assert scores["confusion"].sum() == int((y >= 0).sum())
    assert len(scores["per_class_iou"]) == N_CAMVID
    # a "decoder" that returns the (coarse) GT with shuffled channel ids: matching must undo the shuffle

    class Cheat(torch.nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, patch, grid):
            return self.logits, None

    y_small = F.interpolate(labels[:, None].float(), size=(9, 9), mode="nearest")[:, 0].long()
    cheat = F.one_hot(y_small.clamp(min=0), N_CAMVID).permute(0, 3, 1, 2).float() * 10
    batch = [{"image": images, "label": labels}]
    plain = evaluate(Cheat(cheat), tiny_backbone, batch, N_CAMVID, N_CAMVID, "cpu")
    shuffled = evaluate(
        Cheat(cheat[:, torch.randperm(N_CAMVID)]), tiny_backbone, batch, N_CAMVID, N_CAMVID, "cpu"
    )
    assert shuffled["pixel_accuracy"] == pytest.approx(plain["pixel_accuracy"])
    assert shuffled["mIoU"] == pytest.approx(plain["mIoU"])
    # 9x9 cells upsampled to 72 px lose thin structures, but most pixels are right
    assert plain["pixel_accuracy"] > 0.7 and plain["pixel_accuracy"] > scores["pixel_accuracy"]


def test_channel_mismatch_is_reported(camvid_batch, tiny_backbone):
    images, labels = camvid_batch
    pseudo = onehot_pooled(labels, N_CAMVID, 8)
    student = small_decoder(N_CAMVID)  # "things" needs K + 1 channels
    plan = EpochPlan(epoch=0, bootstrapping=False, reboot=False, epoch_iter=0, alpha=0.0)
    with pytest.raises(ValueError, match="K \\+ 1"):
        train_one_epoch(
            student, None, tiny_backbone, [{"image": images, "pseudo": pseudo}],
            make_optimizer(student, 1e-3), plan, "cpu", variant="things", log_every=0,
        )  # fmt: skip
