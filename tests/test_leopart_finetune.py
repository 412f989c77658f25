"""Leopart dense fine-tuning (issue 17): the method pieces against naive or hand-computed oracles, the one-process
stage on real CamVid images (loss decreases, the checkpoint loads back as a backbone, resume)."""

from __future__ import annotations

import math

import pytest
import torch

from transfgu.leopart import finetune as ft


# -- Sinkhorn-Knopp ---------------------------------------------------------------------------------------------------
def naive_sinkhorn(scores: list[list[float]], eps: float, n_iters: int) -> list[list[float]]:
    """Element by element, in float64: the textbook alternate row/column scaling of exp(S / eps)^T."""
    n, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][c] / eps) for i in range(n)] for c in range(k)]  # (K, N)
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(n_iters):
        for c in range(k):
            s = sum(q[c])
            q[c] = [v / s / k for v in q[c]]
        for i in range(n):
            s = sum(q[c][i] for c in range(k))
            for c in range(k):
                q[c][i] = q[c][i] / s / n
    return [[q[c][i] * n for c in range(k)] for i in range(n)]


def test_sinkhorn_matches_naive_loop_and_marginals():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(13, 5, generator=g) * 0.3
    got = ft.sinkhorn_knopp(scores, eps=0.1, n_iters=3)
    ref = torch.tensor(naive_sinkhorn(scores.double().tolist(), 0.1, 3), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # columns (samples) end exactly normalised; rows (prototypes) converge to the equal share N / K
    torch.testing.assert_close(got.sum(1), torch.ones(13), rtol=1e-5, atol=1e-5)
    many = ft.sinkhorn_knopp(scores, eps=0.1, n_iters=50)
    torch.testing.assert_close(many.sum(0), torch.full((5,), 13 / 5), rtol=1e-3, atol=1e-3)
    # balancing: a prototype every sample prefers does not take all of them
    biased = scores.clone()
    biased[:, 0] += 1.0
    usage = ft.sinkhorn_knopp(biased, eps=0.1, n_iters=50).argmax(1).bincount(minlength=5)
    assert usage.max() < 13


# -- schedules --------------------------------------------------------------------------------------------------------
def test_ema_momentum_cosine_by_hand():
    assert ft.ema_momentum(0, 100) == pytest.approx(0.9995)
    assert ft.ema_momentum(50, 100) == pytest.approx(0.99975)  # halfway: (0.9995 + 1) / 2
    assert ft.ema_momentum(25, 100) == pytest.approx(1 - 0.0005 * (1 + math.cos(math.pi / 4)) / 2)
    assert ft.ema_momentum(100, 100) == 1.0
    assert ft.cosine_schedule(1e-4, 0.0, 100, 100) == 0.0


def test_ema_update_and_hard_copy():
    s, t = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    w_t = t.weight.detach().clone()
    ft.ema_update(t, s, 0.75)
    torch.testing.assert_close(t.weight, 0.75 * w_t + 0.25 * s.weight)
    ft.ema_update(t, s, 0.0)
    torch.testing.assert_close(t.weight, s.weight)


def test_lr_and_weight_decay_schedules():
    bb, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    opt = torch.optim.Adam(ft.param_groups(bb, head, 1e-5, 1e-4))
    ft.set_schedules(opt, 5, 10, 0.04, 0.4)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone"] == pytest.approx(0.5e-5) and lrs["head"] == pytest.approx(0.5e-4)
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd["backbone"] == pytest.approx(0.22) and wd["backbone_no_decay"] == 0.0


# -- head and queue ---------------------------------------------------------------------------------------------------
def test_projection_head_shapes_and_unit_bottleneck():
    head = ft.ProjectionHead(48, hidden_dim=32, out_dim=16, n_prototypes=10)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [32, 32, 16]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    z, s = head(torch.randn(3, 7, 48))
    assert z.shape == (3, 7, 16) and s.shape == (3, 7, 10)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3, 7))
    torch.testing.assert_close(head.prototypes.weight.norm(dim=1), torch.ones(10))


def test_queue_fifo():
    q = ft.EmbeddingQueue(5, 2)
    q.push(torch.arange(6.0).view(3, 2))
    assert not q.full and q.filled == 3
    q.push(torch.arange(6.0, 12.0).view(3, 2))  # rows 3, 4 fill it, row 5 overwrites row 0
    assert q.full
    assert q.data[:, 0].tolist() == [10.0, 2.0, 4.0, 6.0, 8.0]
    q2 = ft.EmbeddingQueue(5, 2)
    q2.load(q.state())
    assert q2.ptr == q.ptr and torch.equal(q2.data, q.data)


# -- crops and alignment ----------------------------------------------------------------------------------------------
def test_crop_boxes_intersect_every_global_crop():
    spec = ft.CropSpec(n_global=2, n_local=4, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25),
                       min_intersection=0.01)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        b = ft.sample_crop_boxes(360, 480, spec, g)
        assert b.shape == (6, 4)
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 480).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 360).all()
        for i, j in ft.crop_pairs(2, 6):
            assert float(ft.box_area(ft.box_intersection(b[i], b[j]))) >= 0.01 * 360 * 480
    # local crops are small, global crops large
    areas = ft.box_area(b) / (360 * 480)
    assert (areas[:2] >= 0.2).all() and (areas[2:] <= 0.3).all()


def test_crop_pairs_follow_figure_1():
    # 2 global + 3 local: each global crop has N - 1 = 4 boxes (targets for all other crops); each local crop 2
    pairs = ft.crop_pairs(2, 5)
    assert len(pairs) == 2 * 4
    assert sorted(i for i, j in pairs if i >= 2) == [2, 2, 3, 3, 4, 4]
    assert (0, 0) not in pairs and (1, 1) not in pairs


def test_box_alignment_by_hand():
    # Crop A = image pixels [0, 100) x [0, 100), crop B = [50, 150) x [50, 150); both give 28 x 28 patch grids.
    # Their intersection [50, 100)^2 is cells [14, 28) of A and [0, 14) of B.
    a = torch.tensor([0.0, 0.0, 100.0, 100.0])
    b = torch.tensor([50.0, 50.0, 150.0, 150.0])
    inter = ft.box_intersection(a, b)
    assert inter.tolist() == [50.0, 50.0, 100.0, 100.0]
    assert ft.boxes_in_crop(inter, a, (28, 28)).tolist() == [14.0, 14.0, 28.0, 28.0]
    assert ft.boxes_in_crop(inter, b, (28, 28)).tolist() == [0.0, 0.0, 14.0, 14.0]

    def x_map(crop: torch.Tensor, n: int) -> torch.Tensor:  # every cell holds the image x of its centre
        xs = crop[0] + (torch.arange(n) + 0.5) * (crop[2] - crop[0]) / n
        return xs.view(1, 1, 1, n).expand(1, 1, n, n).clone()

    out_a = ft.align_maps(x_map(a, 28), ft.boxes_in_crop(inter, a, (28, 28))[None])
    out_b = ft.align_maps(x_map(b, 28), ft.boxes_in_crop(inter, b, (28, 28))[None])
    centres = 50 + (torch.arange(7) + 0.5) * 50 / 7  # image x of the 7 bin centres of the intersection
    torch.testing.assert_close(out_a[0, 0, 3], centres)
    torch.testing.assert_close(out_b[0, 0, 3], centres)
    # a different crop size (a local crop at half resolution) samples the same image points
    out_b14 = ft.align_maps(x_map(b, 14), ft.boxes_in_crop(inter, b, (14, 14))[None])
    torch.testing.assert_close(out_b14[0, 0, 0], centres, rtol=0, atol=50 / 14 / 2 + 1e-4)


def test_cluster_loss_lowest_when_student_predicts_aligned_teacher():
    # A student whose scores are tau * log(Q) predicts Q exactly (the loss is then the entropy of Q);
    # a student predicting other clusters has a higher loss.
    torch.manual_seed(0)
    boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 64.0, 64.0]]])
    q = torch.softmax(torch.randn(1, 4, 8, 8) * 3, dim=1)
    good = ft.cluster_loss([q.log() * 0.1, q.log() * 0.1], [q, q], boxes, n_global=2, temperature=0.1)
    bad = ft.cluster_loss([q.flip(1).log() * 0.1] * 2, [q, q], boxes, n_global=2, temperature=0.1)
    assert float(bad) > float(good) + 0.1


def test_usage_entropy():
    assert ft.usage_entropy(torch.eye(4)) == pytest.approx(math.log(4))
    assert ft.usage_entropy(torch.tensor([[1.0, 0.0]] * 5)) == pytest.approx(0.0)
