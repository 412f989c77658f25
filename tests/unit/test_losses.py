"""Losses of eq. 13-16 against per-pixel Python-loop oracles, and the bootstrapping schedule of the reference."""

from __future__ import annotations

import math

import pytest
import torch

from transfgu.losses import (
    ALPHA_LIST,
    BootstrapSchedule,
    alpha_schedule,
    diversity_loss,
    parse_intervals,
    peer_loss,
    teacher_interval,
    total_loss,
    uncertainty_loss,
)

torch.set_num_threads(1)
TOL = 1e-5


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def naive_ce(logits: torch.Tensor, target: torch.Tensor, ignore: int) -> float:
    b, c, h, w = logits.shape
    tot, n = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t == ignore:
                    continue
                p = _softmax([float(logits[i, k, y, x]) for k in range(c)])
                tot += -math.log(p[t])
                n += 1
    return tot / n


def naive_unc(logits: torch.Tensor, fg: torch.Tensor | None, skip0: bool) -> float:
    b, c, h, w = logits.shape
    tot, n = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if fg is not None and not bool(fg[i, y, x]):
                    continue
                v = [float(logits[i, k, y, x]) for k in range(1 if skip0 else 0, c)]
                p = sorted(_softmax(v), reverse=True)
                tot += p[0] - p[1]
                n += 1
    return 1.0 - tot / n


def naive_div(e: torch.Tensor) -> float:
    b, k, _ = e.shape
    tot, n = 0.0, 0
    for i in range(b):
        for a in range(k):
            for c in range(a + 1, k):
                u, v = e[i, a].tolist(), e[i, c].tolist()
                dot = sum(x * y for x, y in zip(u, v))
                nu = math.sqrt(sum(x * x for x in u))
                nv = math.sqrt(sum(x * x for x in v))
                tot += 1 + dot / (nu * nv)
                n += 1
    return tot / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_peer_loss_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(5, (2, 3, 4), generator=g)
    y_neg = torch.randint(5, (2, 3, 4), generator=g)
    y[0, 0, 0] = -100  # ignored in both terms
    y_neg[1, 2, 3] = -100
    alpha = 0.07
    got = peer_loss(logits, y, y_neg, alpha, ignore_index=-100).item()
    want = naive_ce(logits, y, -100) - alpha * naive_ce(logits, y_neg, -100)
    assert got == pytest.approx(want, abs=TOL)
    # no negative term: plain CE (eq. 9)
    assert peer_loss(logits, y).item() == pytest.approx(naive_ce(logits, y, -100), abs=TOL)
    assert peer_loss(logits, y, y_neg, 0.0).item() == pytest.approx(naive_ce(logits, y, -100), abs=TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_uncertainty_loss_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64)
    # thingstuff: softmax over all channels (channel 0 is a real class after the d1b057e fix)
    assert uncertainty_loss(logits).item() == pytest.approx(naive_unc(logits, None, False), abs=TOL)
    # things: foreground channels only, mean over F
    fg = torch.rand(2, 4, 5, generator=g) > 0.4
    got = uncertainty_loss(logits, fg_mask=fg, exclude_channel0=True).item()
    assert got == pytest.approx(naive_unc(logits, fg, True), abs=TOL)
    # the two variants differ on these logits, so a mixed-up channel rule would be caught
    assert abs(uncertainty_loss(logits, fg_mask=fg).item() - got) > 1e-3


def test_uncertainty_loss_edge_cases():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    empty = torch.zeros(2, 3, 3, dtype=torch.bool)
    zero = uncertainty_loss(logits, fg_mask=empty, exclude_channel0=True)
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()  # attached to the graph, gradient zero
    assert logits.grad is not None and logits.grad.abs().sum().item() == 0.0
    assert math.isnan(uncertainty_loss(logits, fg_mask=empty, exclude_channel0=True, empty_fg="nan").item())
    # a single foreground class: margin 1, loss 0
    assert uncertainty_loss(torch.randn(1, 2, 3, 3), exclude_channel0=True).item() == 0.0
    # confident predictions -> loss near 0; uniform -> loss 1
    sharp = torch.zeros(1, 3, 2, 2)
    sharp[:, 1] = 50.0
    assert uncertainty_loss(sharp).item() == pytest.approx(0.0, abs=1e-6)
    assert uncertainty_loss(torch.zeros(1, 3, 2, 2)).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_diversity_loss_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    assert diversity_loss(e).item() == pytest.approx(naive_div(e), abs=TOL)
    # unit-norm input (what the decoder gives) is the same
    assert diversity_loss(torch.nn.functional.normalize(e, dim=-1)).item() == pytest.approx(
        naive_div(e), abs=TOL
    )


def test_diversity_loss_hand_cases():
    eye = torch.eye(4).unsqueeze(0)  # orthogonal classes: 1 + 0
    assert diversity_loss(eye).item() == pytest.approx(1.0)
    same = torch.ones(1, 3, 4)  # collapsed classes: 1 + 1
    assert diversity_loss(same).item() == pytest.approx(2.0)
    assert diversity_loss(torch.randn(2, 1, 4)).item() == 0.0


def test_total_loss_combination():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(4, (2, 3, 3), generator=g)
    yn = torch.randint(4, (2, 3, 3), generator=g)
    emb = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    fg = torch.rand(2, 3, 3, generator=g) > 0.3
    t = total_loss(logits, y, emb, yn, 0.05, fg_mask=fg, exclude_channel0=True, w_div=1.0, w_unc=0.3)
    want = (
        naive_ce(logits, y, -100)
        - 0.05 * naive_ce(logits, yn, -100)
        + 1.0 * naive_div(emb)
        + 0.3 * naive_unc(logits, fg, True)
    )
    assert t.total.item() == pytest.approx(want, abs=TOL)
    assert t.peer.item() + t.diversity.item() + 0.3 * t.uncertainty.item() == pytest.approx(want, abs=TOL)


def test_alpha_and_interval():
    assert ALPHA_LIST[0] == 0.03 and ALPHA_LIST[-1] == 0.10 and len(ALPHA_LIST) == 8
    assert [alpha_schedule(i) for i in range(10)] == pytest.approx(
        [0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.10, 0.10]
    )
    iv = parse_intervals("5,5,5,5,4,4,4,4,4,3")
    assert teacher_interval(0, iv) == 5 and teacher_interval(39, iv) == 5 and teacher_interval(40, iv) == 4
    assert teacher_interval(95, iv) == 3 and teacher_interval(500, iv) == 3
    assert teacher_interval(7, 2) == 2
    assert parse_intervals(2) == (2,) and parse_intervals([3, 2]) == (3, 2)
    with pytest.raises(ValueError):
        parse_intervals("3,0")


def test_schedule_coco_default():
    s = BootstrapSchedule("3,3,3,2", start_epoch=3)
    want = list(range(3, 30, 3)) + list(range(30, 200, 2))
    assert s.reboot_epochs(200) == want
    plans = [s.plan(e) for e in range(200)]
    assert all(not p.bootstrapping and p.alpha == 0.0 for p in plans[:3])
    assert all(p.bootstrapping for p in plans[3:])
    used = sorted({round(p.alpha, 2) for p in plans[3:]})
    assert used == [0.03, 0.04, 0.05]  # the reference's alpha list never exceeds 0.05
    assert [(p.epoch_iter, p.reboot) for p in plans[3:9]] == [(0, True), (1, False), (2, False)] * 2
    assert plans[29].epoch_iter == 2 and plans[30].reboot and plans[31].epoch_iter == 1


def test_schedule_voc():
    s = BootstrapSchedule("5,5,5,5,4,4,4,4,4,3", start_epoch=5)
    want = list(range(5, 40, 5)) + list(range(40, 90, 4)) + [90, 93, 96, 99]
    assert s.reboot_epochs(100) == want
    assert want[:8] == [5, 10, 15, 20, 25, 30, 35, 40] and want[-6:] == [84, 88, 90, 93, 96, 99]
    used = sorted({round(s.plan(e).alpha, 2) for e in range(5, 100)})
    assert used == [0.03, 0.04, 0.05, 0.06, 0.07]


def test_schedule_every_epoch_and_every_two():
    s = BootstrapSchedule(1, start_epoch=1)  # COCO curated, Cityscapes
    assert s.reboot_epochs(50) == list(range(1, 50))
    assert {s.plan(e).alpha for e in range(1, 50)} == {0.03}
    s = BootstrapSchedule(2, start_epoch=2)  # COCO-27 command, LIP-5/16
    assert s.reboot_epochs(20) == list(range(2, 20, 2))
    assert sorted({round(s.plan(e).alpha, 2) for e in range(2, 100)}) == [0.03, 0.04]


def test_schedule_start_not_multiple_of_interval_still_gets_a_teacher():
    s = BootstrapSchedule(3, start_epoch=4)
    assert s.reboot_epochs(10) == [4, 6, 9]
    assert s.plan(5).epoch_iter == 1 and s.plan(5).alpha == pytest.approx(0.04)
