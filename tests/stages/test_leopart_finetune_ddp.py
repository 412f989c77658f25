"""Leopart's dense fine-tuning on W data-parallel ranks is the one-process fine-tuning (the rule of transfgu/ddp.py).

Two real gloo ranks (spawned processes, CPU) against one process: the distributed Sinkhorn-Knopp equals the one
on the concatenated batch (and the naive loop), and a short fine-tuning on real CamVid images -- uneven pieces
(a global batch of 3 split 2 + 1) and a placeholder rank (a last global batch of 1) -- gives the same per-step
losses and cluster usage, the same queues and the same final student and teacher weights -- with the authors' recipe
(foreground-masked loss, foreground-only pushes to one queue per global crop, AdamW, student drop-path).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers.configs import finetune_config
from helpers.ddp import run_ranks
from helpers.oracles import naive_sinkhorn

from transfgu.leopart import finetune_parts as ft

N_IMAGES, BATCH, EPOCHS = 4, 3, 2  # global batches of 3 (pieces 2 + 1) and 1 (rank 1: a placeholder)
# conf/leopart_finetune_tiny.yaml made smaller still: 4 x 4 patch grids of global crops, queue full after 2 steps
SMALL = {"finetune.epochs": str(EPOCHS), "finetune.batch_size": str(BATCH), "finetune.global_size": "32",
         "finetune.local_size": "16", "finetune.max_side": "96", "finetune.queue_length": "48",
         "finetune.queue_push": "24", "data.max_train_images": str(N_IMAGES)}


def _init(rank: int, world: int, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))




# -- distributed Sinkhorn ---------------------------------------------------------------------------------------------
def _sinkhorn_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(11, 6, generator=g) * 0.4  # the global batch
    queue = torch.randn(5, 6, generator=g) * 0.4  # shared rows, the same on every rank
    return scores, queue


SPLITS = {"uneven": [(0, 7), (7, 11)], "empty": [(0, 11), (11, 11)]}  # rank r holds rows lo..hi


def _sinkhorn_rank(rank: int, world: int, out: str, opts: dict) -> None:
    import torch.distributed as dist

    _init(rank, world, opts["init"])
    try:
        scores, queue = _sinkhorn_data()
        got = {}
        for name, split in SPLITS.items():
            lo, hi = split[rank]
            for shared in ("queue", "none"):
                for distributed in (True, False):
                    got[f"{name}-{shared}-{distributed}"] = ft.sinkhorn_knopp(
                        scores[lo:hi], 0.1, 3, queue if shared == "queue" else None, distributed=distributed)
        torch.save(got, Path(out) / f"sinkhorn-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_distributed_sinkhorn_is_the_sinkhorn_of_the_concatenated_batch(tmp_path):
    """Each rank holds a piece of the batch (uneven, or empty on rank 1). ``distributed=False`` is the old per-rank
    Sinkhorn (SwAV without its all-reduce) and must fail the same check."""
    run_ranks(_sinkhorn_rank, tmp_path, 2, {})
    scores, queue = _sinkhorn_data()
    ref = {"queue": ft.sinkhorn_knopp(scores, 0.1, 3, shared=queue), "none": ft.sinkhorn_knopp(scores, 0.1, 3)}
    # the one-process result is the textbook loop over all rows (the queue's rows are dropped from the output)
    naive = torch.tensor(naive_sinkhorn(torch.cat([scores, queue]).double().tolist(), 0.1, 3), dtype=torch.float64)
    torch.testing.assert_close(ref["queue"].double(), naive[:11], rtol=1e-5, atol=1e-6)
    parts = [torch.load(tmp_path / f"sinkhorn-rank{r}.pt") for r in range(2)]
    mismatches = set()
    for name in SPLITS:
        for shared in ("queue", "none"):
            for distributed in (True, False):
                key = f"{name}-{shared}-{distributed}"
                got = torch.cat([p[key] for p in parts])
                assert got.shape == ref[shared].shape, key
                # float32; only the summation order differs from one process (per-rank partial sums, all-reduce)
                if not torch.allclose(got, ref[shared], rtol=1e-5, atol=1e-6):
                    mismatches.add(key)
    # all-reduced: every split equals one process; per rank: wrong whenever both ranks hold rows
    assert mismatches == {"uneven-queue-False", "uneven-none-False"}


# -- the fine-tuning loop ---------------------------------------------------------------------------------------------
def _finetune(rank: int, world: int, out: str, opts: dict) -> None:
    """``EPOCHS`` epochs of the fine-tuning loop on ``world`` ranks; writes per-step records, weights and queue."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from transfgu.errors import CollectedErrors
    from transfgu.leopart import finetune_stage as ftt
    from transfgu.models.backbone import build_backbone

    torch.set_num_threads(1)
    if world > 1:
        _init(rank, world, opts["init"])
    try:
        cfg = finetune_config(Path(opts["root"]), **SMALL)
        f = cfg.finetune
        images, _ = ftt.decode_training_images(cfg, CollectedErrors())
        torch.manual_seed(0)
        backbone = build_backbone("vit_test_tiny", weights="none")
        student, teacher = ftt.build_models(cfg, backbone)
        opt = ftt.make_finetune_optimizer(cfg, student)  # AdamW, the authors' decay groups
        queue = ftt.make_queues(cfg)  # one queue per global crop
        loader = ftt.make_loader(images[:N_IMAGES], cfg, rank, world)
        model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
        init = {f"init.{k}": v.detach().clone() for k, v in student.state_dict().items()}
        steps: list[dict] = []
        for epoch in range(f.epochs):
            model.train()
            ftt.finetune_one_epoch(model, teacher, student.head, opt, loader, queue, cfg, epoch, len(loader),
                                torch.device("cpu"), on_step=steps.append)
        weights = {f"student.{k}": v for k, v in student.state_dict().items()}
        weights.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
        weights.update(queue.state())
        weights.update(init)
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(Path(out) / f"rank{rank}.safetensors"))
        (Path(out) / f"steps-rank{rank}.json").write_text(json.dumps(steps))
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.slow  # three processes: about 30 s on the 2-core VM at load 7 (44 s at load 9)
@pytest.mark.timeout(180)
def test_two_gloo_ranks_finetune_like_one_process(tmp_path):
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _finetune(0, 1, str(one), {"root": str(tmp_path / "runs")})
    run_ranks(_finetune, two, 2, {"root": str(tmp_path / "runs")})
    ref = json.loads((one / "steps-rank0.json").read_text())
    r0, r1 = (json.loads((two / f"steps-rank{r}.json").read_text()) for r in range(2))
    assert len(ref) == EPOCHS * 2
    for s, x, y in zip(ref, r0, r1, strict=True):
        where = f"epoch {s['epoch']} step {s['step']}"
        assert x == y, where  # one all-reduced loss and usage: both ranks hold the same numbers
        # float32: the ranks' forward passes see smaller batches and their sums run in another order than one
        # process's, so equality holds to float rounding (~1e-7 relative), not bit for bit
        assert x["loss"] == pytest.approx(s["loss"], rel=1e-5), where
        assert x["usage_entropy"] == pytest.approx(s["usage_entropy"], rel=1e-5), where
    w1 = load_file(str(one / "rank0.safetensors"))
    wa, wb = (load_file(str(two / f"rank{r}.safetensors")) for r in range(2))
    # both per-crop queues filled with foreground rows (and were used from the second step on)
    assert bool(wa["queue_0"].abs().sum() > 0) and bool(wa["queue_1"].abs().sum() > 0)
    assert not torch.equal(wa["queue_0"], wa["queue_1"])
    for k, v in w1.items():
        assert torch.equal(wa[k], wb[k]), k  # identical replicas, identical queues
        # Adam divides by sqrt(v): rounding-level gradient differences move a weight by up to ~lr * 1e-3
        torch.testing.assert_close(wa[k], v, rtol=1e-4, atol=2e-5, msg=k)
    # the comparison is of trained weights, not of two untouched copies
    moved = max(float((w1[k] - w1[f"init.{k[len('student.'):]}"]).abs().max()) for k in w1 if k.startswith("student."))
    assert moved > 1e-4
