"""Throughput plumbing (transfgu.throughput) and the overlap checks of issue 15 item 4.

The overlap checks replace the model by a fixed-latency stand-in (``time.sleep`` inside a fake backbone, or a fake
``concept_maps``) and add a fixed latency to the real JPEG decode, then run the real stage code
(``local.run_extract``, ``local.run_label_bank``, ``train_one_epoch`` over the run's loader). With the overlap
the stage's wall time is close to ``max(model time, data time)``; the same run with the overlap switched off (the
sequential path) takes their sum, which shows the check can fail. Latencies dominate the CPU work, so the checks hold
on a loaded 2-core machine.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers.configs import tiny_config
from torch import nn

from transfgu import errors, integrity, local, stages
from transfgu.concepts import ConceptBank
from transfgu.data import loaders
from transfgu.data.transforms import to_model_input
from transfgu.ddp import step_loader
from transfgu.engine.loop import train_one_epoch
from transfgu.engine.step import make_optimizer, make_teacher
from transfgu.losses import EpochPlan
from transfgu.methods import run_context
from transfgu.models.backbone import ViTFeatures, build_backbone
from transfgu.models.decoder import MaskTransformerDecoder
from transfgu.pseudo_labels import ConceptMapParts
from transfgu.throughput.compile import compile_forward
from transfgu.throughput.prefetch import (
    BackgroundWriter,
    Prefetcher,
    PrefetchLoader,
    default_writer_threads,
    overlapped,
)
from transfgu.throughput.tensors import prepare_images, to_device


# ----------------------------------------------------------------------------------------------------------
# Stand-ins
# ----------------------------------------------------------------------------------------------------------
class SleepViT(nn.Module):
    """Fixed-latency stand-in for the backbone: every call sleeps ``latency`` s, outputs depend on the input."""

    patch_size = 8
    embed_dim = 16
    num_heads = 2
    num_prefix_tokens = 1

    def __init__(self, latency: float) -> None:
        super().__init__()
        self.latency = latency
        self.calls = 0
        self.proj = nn.Parameter(torch.randn(3, self.embed_dim, generator=torch.Generator().manual_seed(0)))
        self.proj.requires_grad_(False)

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // 8, x.shape[-1] // 8

    def forward(self, x: torch.Tensor) -> ViTFeatures:
        self.calls += 1
        time.sleep(self.latency)
        grid = self._grid(x)
        patch = F.avg_pool2d(x.float(), 8).flatten(2).transpose(1, 2) @ self.proj  # (B, h*w, D)
        attn = torch.softmax(patch.sum(-1), dim=-1)[:, None].expand(-1, self.num_heads, -1)
        return ViTFeatures(cls=patch.mean(1), patch=patch, attn_cls=attn, grid=grid)


class Timed:
    """Wraps a function: records the wall time of every call (thread-safe)."""

    def __init__(self, fn, latency: float = 0.0) -> None:
        self.fn, self.latency, self.durations = fn, latency, []
        self._lock = threading.Lock()

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        time.sleep(self.latency)
        out = self.fn(*a, **k)
        with self._lock:
            self.durations.append(time.perf_counter() - t0)
        return out

    @property
    def total(self) -> float:
        return sum(self.durations)


def _assert_overlapped(wall: float, model_s: float, data_s: float, per_item: float) -> None:
    """Wall close to max(model, data) (plus one item to fill the pipeline and CPU slack), far below the sum."""
    both = model_s + data_s
    print(f"overlapped: wall {wall:.2f}s, model {model_s:.2f}s, data {data_s:.2f}s, sum {both:.2f}s")
    hidden = both - wall  # time saved by running the two sides at once; at most min(model, data)
    assert hidden > 0.5 * min(model_s, data_s), f"wall {wall:.2f}s vs sum {both:.2f}s: less than half hidden"
    assert wall < max(model_s, data_s) + per_item + 0.35 * min(model_s, data_s) + 0.5, (
        f"wall {wall:.2f}s far above max(model {model_s:.2f}s, data {data_s:.2f}s)"
    )


def _assert_sequential(wall: float, model_s: float, data_s: float) -> None:
    print(f"sequential: wall {wall:.2f}s, model {model_s:.2f}s, data {data_s:.2f}s, sum {model_s + data_s:.2f}s")
    assert wall > 0.9 * (model_s + data_s), f"sequential wall {wall:.2f}s < model {model_s:.2f} + data {data_s:.2f}"


# ----------------------------------------------------------------------------------------------------------
# Prefetcher, writer, overlapped
# ----------------------------------------------------------------------------------------------------------
def test_prefetcher_keeps_order_and_reraises_where_the_source_failed():
    assert list(Prefetcher(range(20), depth=3)) == list(range(20))

    def source():
        yield 1
        yield 2
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for x in Prefetcher(source(), depth=1):
            seen.append(x)
    assert seen == [1, 2]
    with pytest.raises(ValueError, match="depth"):
        Prefetcher([], depth=0)


def test_prefetcher_runs_ahead_of_the_consumer():
    src = Timed(lambda i: i, latency=0.1)
    t0 = time.perf_counter()
    for _ in Prefetcher((src(i) for i in range(6)), depth=2):
        time.sleep(0.1)  # the consumer's work
    wall = time.perf_counter() - t0
    _assert_overlapped(wall, 0.6, src.total, 0.1)


def test_background_writer_finishes_queued_jobs_and_reports_the_first_error():
    done: list[int] = []
    with BackgroundWriter(max_pending=1) as w:
        for i in range(5):
            w.submit(lambda i=i: (time.sleep(0.01), done.append(i)))
    assert done == [0, 1, 2, 3, 4] and w.completed == 5

    def fail():
        raise OSError("no space left")

    w = BackgroundWriter()
    w.submit(fail)
    with pytest.raises(OSError, match="no space"):
        w.close()
    # The body's own error wins, but what was queued before it is still written.
    done.clear()
    with pytest.raises(KeyError), BackgroundWriter() as w:
        w.submit(lambda: (time.sleep(0.05), done.append(1)))
        raise KeyError("body")
    assert done == [1]


def test_background_writer_threads_run_in_parallel_with_bounded_memory():
    threads, max_pending = 3, 2
    lock = threading.Lock()
    state = {"running": 0, "max_running": 0, "held": 0, "max_held": 0}
    done: list[int] = []

    def job(i: int) -> None:
        with lock:
            state["running"] += 1
            state["max_running"] = max(state["max_running"], state["running"])
        time.sleep(0.05)
        with lock:
            state["running"] -= 1
            state["held"] -= 1
            done.append(i)

    with BackgroundWriter(max_pending=max_pending, threads=threads) as w:
        for i in range(12):
            with lock:
                state["held"] += 1  # a result handed over and not yet written
                state["max_held"] = max(state["max_held"], state["held"])
            w.submit(job, i)
    assert sorted(done) == list(range(12)) and w.completed == 12
    assert state["max_running"] > 1  # the jobs did overlap
    # submit blocks while max_pending jobs wait: at most max_pending queued + threads running + the one submitted
    assert state["max_held"] <= max_pending + threads + 1
    with pytest.raises(ValueError, match="threads"):
        BackgroundWriter(threads=0)


def test_background_writer_threads_report_the_first_error_and_drop_later_jobs():
    done: list[int] = []

    def job(i: int) -> None:
        time.sleep(0.02)
        if i == 3:
            raise OSError(f"disk full at {i}")
        done.append(i)

    w = BackgroundWriter(max_pending=1, threads=3)
    with pytest.raises(OSError, match="disk full at 3"):
        for i in range(40):
            w.submit(job, i)  # raises once the failure is seen
        w.close()
    with pytest.raises(OSError, match="disk full at 3"):
        w.close()  # and again on close: the error is never lost
    assert 3 not in done and len(done) < 39  # jobs queued after the failure were dropped
    assert all(not t.is_alive() for t in w._threads)


def test_default_writer_threads_follow_the_cpus():
    assert [default_writer_threads(c) for c in (1, 2, 3, 9, 64)] == [1, 1, 2, 8, 8]
    assert default_writer_threads() >= 1


def test_run_extract_with_writer_threads_writes_the_same_files(tmp_path, monkeypatch):
    """Several writer threads: same file names, same bytes as the one-thread writer (each shard its own file)."""
    torch.set_num_threads(1)
    monkeypatch.setattr(local, "SHARD_IMAGES", 1)  # 6 one-image shards, so several writes are in flight at once
    writers: set[str] = set()
    real_write = local.write_parquet_atomic

    def slow_write(table, path, **kw):
        writers.add(threading.current_thread().name)
        time.sleep(0.1)  # a slow disk: the threads' writes overlap
        return real_write(table, path, **kw)

    monkeypatch.setattr(local, "write_parquet_atomic", slow_write)
    files = {}
    backbone = None
    for n in (1, 3):
        cfg = tiny_config(tmp_path, f"w{n}", **{"run.write_threads": str(n), "crops.betas": "[0.5]"})
        ctx = run_context(cfg)
        backbone = backbone or ctx.backbone
        ctx.backbone = backbone
        info = local.run_extract(ctx)
        assert info["rows"] > 0
        files[n] = {p.name: p.read_bytes() for p in sorted((cfg.run_dir / "features").glob("*.parquet"))}
    assert len(files[1]) == 6 and files[1] == files[3]
    assert len([w for w in writers if w.startswith("transfgu-writer")]) > 1


def test_overlapped_equals_the_sequential_loop_and_writes_everything():
    items = list(range(7))
    written_a: dict[int, int] = {}
    written_b: dict[int, int] = {}
    a = list(overlapped(items, lambda i: i * 10, lambda i, x: x + i, lambda i, r: written_a.__setitem__(i, r)))
    b = list(overlapped(items, lambda i: i * 10, lambda i, x: x + i, lambda i, r: written_b.__setitem__(i, r), 0))
    assert a == b == [(i, 11 * i) for i in items]
    assert written_a == written_b == {i: 11 * i for i in items}


def test_overlapped_compute_error_still_writes_finished_items():
    written: list[int] = []

    def compute(i, x):
        if i == 3:
            raise RuntimeError("model failed")
        return x

    with pytest.raises(RuntimeError, match="model failed"):
        for _ in overlapped(range(6), lambda i: i, compute, lambda i, r: written.append(r)):
            pass
    assert written == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# Host -> device, batching helpers, compile fallback
# ----------------------------------------------------------------------------------------------------------
def test_prepare_images_equals_per_image_resize(camvid):
    from transfgu.data.io import load_rgb

    ims = [load_rgb(p) for p in sorted((camvid / "images" / "train").glob("*.jpg"))[:2]]
    x = prepare_images(ims, (64, 80), "bilinear")
    ref = torch.stack([to_model_input(im, (64, 80), "bilinear") for im in ims])
    assert torch.equal(x, ref)
    assert torch.equal(to_device(x, "cpu"), x)


def test_compile_forward_is_off_on_cpu_in_auto_mode_and_equal_when_forced():
    torch.manual_seed(0)
    bb = build_backbone("vit_test_tiny", "none")
    x = torch.randn(2, 3, 32, 48)
    ref = bb(x)
    assert compile_forward(bb, mode="auto").forward == bb.forward  # CPU: eager kept, nothing patched
    assert not getattr(bb, "_transfgu_compiled", False)
    compile_forward(bb, mode="on", backend="eager")  # dynamo tracing, no code generation: fast on CPU
    with torch.inference_mode():
        out = bb(x)
    assert not bb._transfgu_compile_state["failed"]
    for name in ("cls", "patch", "attn_cls"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
    assert out.grid == ref.grid
    # embed_crops pads a ragged last chunk for a compiled backbone: same features as the eager, unpadded run
    from transfgu.crops import embed_crops

    crops = torch.randn(5, 3, 32, 32)
    eager = build_backbone("vit_test_tiny", "none")
    eager.load_state_dict(bb.state_dict())
    torch.testing.assert_close(embed_crops(bb, crops, 4), embed_crops(eager, crops, 4), rtol=1e-5, atol=1e-5)


def test_compile_forward_falls_back_to_eager_when_the_compiler_fails(caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    torch.manual_seed(0)
    bb = build_backbone("vit_test_tiny", "none")
    x = torch.randn(1, 3, 32, 32)
    ref = bb(x)
    compile_forward(bb, mode="on", backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="transfgu.throughput"):
        out = bb(x)
        out2 = bb(x)
    assert bb._transfgu_compile_state["failed"]
    assert sum("using eager" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(out.cls, ref.cls) and torch.equal(out2.patch, ref.patch)


# ----------------------------------------------------------------------------------------------------------
# Training: the on-device step rule equals the host-side one
# ----------------------------------------------------------------------------------------------------------
def test_device_side_step_rule_equals_host_side_rule():
    """Fused Adam skipping on the device (found_inf) == the host deciding, across taken and skipped steps."""
    torch.manual_seed(0)
    bb = build_backbone("vit_test_tiny", "none")
    k = 5
    g = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8, generator=g),
         "pseudo": torch.rand(2, k, 8, 10, generator=g)}
        for _ in range(2)
    ]  # fmt: skip
    results = []
    # (fused Adam, per-step callback): (True, None) decides on the device; a callback or a non-fused optimizer
    # makes the host decide (main's path, also the data-parallel one).
    for fused, on_step in ((True, None), (True, lambda d: None), (False, None)):
        torch.manual_seed(1)
        student = MaskTransformerDecoder(n_classes=k, d_encoder=48, d_model=48, n_heads=1)
        teacher = make_teacher(student)
        opt = make_optimizer(student, lr=1e-3)
        if not fused:  # the host-synchronising reference path
            opt = torch.optim.Adam(
                [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups], lr=1e-3
            )
        gen = torch.Generator().manual_seed(3)
        outs = []
        for alpha in (0.1, 50.0, 0.1):  # alpha 50 makes the loss negative: both steps of that epoch are skipped
            plan = EpochPlan(epoch=2, bootstrapping=True, reboot=False, epoch_iter=0, alpha=alpha)
            outs.append(
                train_one_epoch(
                    student, teacher, bb, batches, opt, plan, "cpu", generator=gen, log_every=1, on_step=on_step
                )
            )
        state = {n: p.detach().clone() for n, p in student.named_parameters()}
        results.append((outs, state, opt.state_dict()["state"]))
    a, pa_, sa = results[0]
    for b, pb, sb in results[1:]:
        assert [o["steps"] for o in a] == [o["steps"] for o in b] == [2, 0, 2]
        assert [o["skipped"] for o in a] == [0, 2, 0]
        for oa, ob in zip(a, b):
            assert oa["loss"] == pytest.approx(ob["loss"], rel=1e-5)
        for n in pa_:
            torch.testing.assert_close(pa_[n], pb[n], rtol=1e-5, atol=1e-6)
        assert all(float(sa[i]["step"]) == float(sb[i]["step"]) == 4 for i in sa)


# ----------------------------------------------------------------------------------------------------------
# Overlap checks (issue 15 item 4): extract, label bank, training
# ----------------------------------------------------------------------------------------------------------
# Eight items (one image each) per stage, the stand-in model as long per item as the decode: a pipeline of n equal
# items hides (n - 1) / n of the shorter side, 7/8 here.
DATA_LATENCY = 0.25  # s added to every image decode
MODEL_LATENCY = 0.25  # s per stand-in model call (one call per item)
N_ITEMS = 8


def _slow_decode(monkeypatch) -> Timed:
    timed = Timed(errors.load_rgb, latency=DATA_LATENCY)
    monkeypatch.setattr(errors, "load_rgb", timed)  # the sharded stages decode here
    monkeypatch.setattr(loaders, "load_rgb", timed)  # the training loader decodes here
    return timed


def _sequential(monkeypatch) -> None:
    monkeypatch.setattr(local, "overlapped", functools.partial(overlapped, prefetch=0))


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "sequential"])
def test_extract_stage_wall_is_max_not_sum(tmp_path, monkeypatch, overlap):
    torch.set_num_threads(1)
    # one scale: 12 windows per 96x128 image, one backbone call per one-image shard
    cfg = tiny_config(tmp_path, "ov", **{"data.max_train_images": str(N_ITEMS), "crops.betas": "[0.5]"})
    monkeypatch.setattr(local, "SHARD_IMAGES", 1)
    decode = _slow_decode(monkeypatch)
    if not overlap:
        _sequential(monkeypatch)
    # The model side is everything the compute thread does per shard: the stand-in's latency plus the real
    # crop/resize/table work around it, measured as it happens.
    compute = Timed(stages.extract_features)
    monkeypatch.setattr(stages, "extract_features", compute)
    ctx = run_context(cfg)
    ctx.backbone = SleepViT(MODEL_LATENCY)
    t0 = time.perf_counter()
    info = local.run_extract(ctx)
    wall = time.perf_counter() - t0
    model_s = compute.total
    assert model_s >= ctx.backbone.calls * MODEL_LATENCY
    assert info["rows"] == N_ITEMS * 12 and len(decode.durations) == N_ITEMS and ctx.backbone.calls == N_ITEMS
    assert pq.read_table(cfg.run_dir / "features").num_rows == info["rows"]
    if overlap:
        _assert_overlapped(wall, model_s, decode.total, per_item=DATA_LATENCY)
    else:
        _assert_sequential(wall, model_s, decode.total)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "sequential"])
def test_label_bank_stage_wall_is_max_not_sum(tmp_path, monkeypatch, overlap):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, "lb", **{"data.max_train_images": str(N_ITEMS)})
    monkeypatch.setattr(local, "SHARD_IMAGES", 1)
    k = 4
    ConceptBank(
        centroids=np.random.default_rng(0).normal(size=(k, 16)).astype(np.float32),
        pools=["all"] * k, k_per_pool={"all": k}, seed=0, niter=1,
    ).save(cfg.run_dir / "concepts")  # fmt: skip
    ctx = run_context(cfg)
    integrity.stamp_json(ctx.layout.concepts / ConceptBank.META_FILE, ctx.hashes["concepts"])  # as the stage would
    calls = []

    def fake_concept_map_parts(backbone, x, c, **kw):  # fixed-latency stand-in for the Grad-CAM pass
        calls.append(x.shape[0])
        time.sleep(MODEL_LATENCY)
        h, w = x.shape[-2] // 8, x.shape[-1] // 8
        a = F.avg_pool2d(x, 8).mean(1).reshape(x.shape[0], h * w).sigmoid()
        k = c.shape[0]
        gate = torch.ones(x.shape[0], k, h * w, dtype=torch.bool)
        return ConceptMapParts(a_hat=a, gate=gate, bonus=torch.zeros(x.shape[0], k, h * w)), (h, w)

    monkeypatch.setattr(stages, "concept_map_parts", fake_concept_map_parts)
    compute = Timed(stages.build_label_maps)
    monkeypatch.setattr(stages, "build_label_maps", compute)
    decode = _slow_decode(monkeypatch)
    if not overlap:
        _sequential(monkeypatch)
    ctx.backbone = SleepViT(0.0)
    t0 = time.perf_counter()
    info = local.run_label_bank(ctx)
    wall = time.perf_counter() - t0
    model_s = compute.total
    assert model_s >= len(calls) * MODEL_LATENCY
    bank = pq.read_table(cfg.run_dir / "label_bank")
    assert info["rows"] == bank.num_rows == N_ITEMS and calls == [1] * N_ITEMS
    if overlap:
        _assert_overlapped(wall, model_s, decode.total, per_item=DATA_LATENCY)
    else:
        _assert_sequential(wall, model_s, decode.total)


def test_training_epoch_wall_is_max_not_sum(tmp_path, monkeypatch):
    """The loader of ``run_train`` (BankDataset through ``step_loader``, num_workers=0) with and without
    PrefetchLoader."""
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, "tr", **{"data.max_train_images": str(N_ITEMS)})
    records = loaders.split_records(cfg, cfg.data.train_split)
    k = 4
    rng = np.random.default_rng(0)
    bank = {r.image_id: rng.random((k, 8, 10)).astype(np.float16) for r in records}
    bb = SleepViT(MODEL_LATENCY)
    walls, outs, data = {}, {}, {}
    for mode in ("sequential", "prefetch"):
        decode = _slow_decode(monkeypatch)
        ds = loaders.BankDataset(records, bank, (64, 80))
        loader = step_loader(ds, batch_size=1, seed=0)  # run_train's loader (num_workers=0)
        if mode == "prefetch":
            loader = PrefetchLoader(loader)
        torch.manual_seed(0)
        student = MaskTransformerDecoder(n_classes=k, d_encoder=16, d_model=16, n_heads=1)
        opt = make_optimizer(student, lr=1e-3)
        plan = EpochPlan(epoch=0, bootstrapping=False, reboot=False, epoch_iter=0, alpha=0.0)
        bb.calls = 0
        t0 = time.perf_counter()
        outs[mode] = train_one_epoch(
            student, None, bb, loader, opt, plan, "cpu", generator=torch.Generator().manual_seed(0), log_every=0
        )
        walls[mode] = time.perf_counter() - t0
        data[mode] = decode.total
        assert bb.calls == N_ITEMS
    model_s = N_ITEMS * MODEL_LATENCY
    assert outs["prefetch"]["loss"] == outs["sequential"]["loss"]  # same batches, same order, same result
    _assert_sequential(walls["sequential"], model_s, data["sequential"])
    _assert_overlapped(walls["prefetch"], model_s, data["prefetch"], per_item=DATA_LATENCY)


def test_uncertainty_masked_mean_equals_boolean_indexing():
    """The device-side masked mean of the uncertainty loss equals the plain ``margin[fg_mask].mean()``."""
    from transfgu.losses import uncertainty_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, 7, generator=g, requires_grad=True)
    mask = torch.rand(3, 5, 7, generator=g) > 0.6
    top2 = logits[:, 1:].softmax(dim=1).topk(2, dim=1).values
    ref = 1.0 - (top2[:, 0] - top2[:, 1])[mask].mean()
    out = uncertainty_loss(logits, fg_mask=mask, exclude_channel0=True)
    torch.testing.assert_close(out, ref)
    (ga,) = torch.autograd.grad(out, logits)
    (gb,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ga, gb)
    # an empty mask: 0 with zero (finite) gradients
    empty = uncertainty_loss(logits, fg_mask=torch.zeros_like(mask), exclude_channel0=True)
    (ge,) = torch.autograd.grad(empty, logits)
    assert empty.item() == 0.0 and torch.equal(ge, torch.zeros_like(ge))


# ----------------------------------------------------------------------------------------------------------
# Training step: compiled kernels equal eager; no host read of a device value per step
# ----------------------------------------------------------------------------------------------------------
def _step_setup(variant: str, k: int = 5, n_batches: int = 2, bsz: int = 2):
    g = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randint(0, 256, (bsz, 3, 64, 80), dtype=torch.uint8, generator=g),
         "pseudo": torch.rand(bsz, k, 8, 10, generator=g)}
        for _ in range(n_batches)
    ]  # fmt: skip
    torch.manual_seed(0)
    bb = build_backbone("vit_test_tiny", "none")
    torch.manual_seed(1)
    n_out = k + (variant == "things")
    student = MaskTransformerDecoder(n_classes=n_out, d_encoder=48, d_model=48, n_heads=1)
    teacher = make_teacher(student)
    teacher.load_state_dict({n: v + 0.01 for n, v in teacher.state_dict().items()})  # a different teacher
    return bb, student, teacher, batches


@pytest.mark.parametrize("variant", ["things"])  # the variant with the most kernels (background channel, fg mask)
def test_compiled_step_kernels_equal_eager_losses_and_gradients(variant):
    """The step's device functions through torch.compile (AOTAutograd: forward and backward graphs; the
    ``aot_eager`` backend runs them without code generation, so the test is fast on CPU) give eager's losses,
    gradients and parameters after two bootstrapping epochs (dropout 0.1 included: the same keyed masks, drawn
    outside the compiled function)."""
    from transfgu.engine.step import StepKernels

    results = {}
    for mode in ("off", "on"):
        bb, student, teacher, batches = _step_setup(variant)
        kernels = StepKernels("cpu", mode=mode, backend="aot_eager")
        opt = make_optimizer(student, lr=1e-3)
        grads = []
        outs = []
        for epoch in range(2):
            plan = EpochPlan(epoch=epoch, bootstrapping=True, reboot=False, epoch_iter=epoch, alpha=0.5)
            outs.append(train_one_epoch(student, teacher, bb, batches, opt, plan, "cpu", variant=variant, seed=7,
                                        log_every=0, kernels=kernels))  # fmt: skip
            grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        if mode == "on":
            assert kernels.compiled, "the compiled functions fell back to eager"
        results[mode] = (outs, grads, {n: p.detach().clone() for n, p in student.named_parameters()})
    (oa, ga, pa_), (ob, gb, pb) = results["off"], results["on"]
    for a, b in zip(oa, ob):
        for key in ("loss", "peer", "diversity", "uncertainty", "steps"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(ga, gb):
        assert a.keys() == b.keys() and a
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6)
    for n in pa_:
        torch.testing.assert_close(pa_[n], pb[n], rtol=1e-5, atol=1e-6)


def test_compiled_step_kernels_fall_back_to_eager(caplog):
    from transfgu.engine.step import StepKernels

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    bb, student, teacher, batches = _step_setup("thingstuff", n_batches=1)
    plan = EpochPlan(epoch=0, bootstrapping=False, reboot=False, epoch_iter=0, alpha=0.0)
    kernels = StepKernels("cpu", mode="on", backend=broken_backend)
    torch.manual_seed(5)
    ref = train_one_epoch(student, None, bb, batches, make_optimizer(student, 1e-3), plan, "cpu", seed=1, log_every=0)
    bb, student, teacher, batches = _step_setup("thingstuff", n_batches=1)
    with caplog.at_level(logging.WARNING, logger="transfgu.throughput"):
        out = train_one_epoch(student, None, bb, batches, make_optimizer(student, 1e-3), plan, "cpu", seed=1,
                              log_every=0, kernels=kernels)  # fmt: skip
    assert not kernels.compiled
    assert sum("using eager" in r.getMessage() for r in caplog.records) == 2  # one per function
    assert out["loss"] == ref["loss"]


def _epoch_syncs(variant: str, n_batches: int, log_every: int, on_step=None) -> list[str]:
    """Host reads of device values during one bootstrapping epoch of ``n_batches`` steps."""
    from transfgu.throughput.syncs import HostSyncCounter

    bb, student, teacher, batches = _step_setup(variant, n_batches=n_batches)
    opt = make_optimizer(student, lr=1e-3)
    for m in (bb, student, teacher):
        HostSyncCounter.mark(*m.parameters(), *m.buffers())
    for b in batches:
        HostSyncCounter.mark(b["image"], b["pseudo"])
    plan = EpochPlan(epoch=1, bootstrapping=True, reboot=False, epoch_iter=0, alpha=0.5)
    with HostSyncCounter() as syncs:
        train_one_epoch(student, teacher, bb, batches, opt, plan, "cpu", variant=variant, seed=3, log_every=log_every,
                        on_step=on_step)  # fmt: skip
    return syncs.events


def test_training_step_reads_nothing_back_except_at_log_points():
    """Host reads of device values (item/float/bool/tolist/cpu/nonzero...) in a one-process epoch ("things"
    variant: its foreground count is one more thing a step could read): a constant number at the end of the epoch
    and a constant number per log point, none per step. The host-decision path (a per-step callback reads the loss
    every step) shows the counter catches per-step reads."""
    quiet = {n: _epoch_syncs("things", n, log_every=0) for n in (1, 3)}
    assert len(quiet[1]) == len(quiet[3]), f"reads grow with the steps: {quiet[3]}"
    assert 0 < len(quiet[3]) <= 2, quiet[3]  # the epoch's sums and counts, read once
    logged = _epoch_syncs("things", 3, log_every=1)
    per_log = (len(logged) - len(quiet[3])) / 3
    assert per_log == int(per_log) and 0 < per_log <= 6, logged  # the logged values only
    per_step = _epoch_syncs("things", 3, log_every=0, on_step=lambda d: None)
    assert len(per_step) >= len(quiet[3]) + 3, per_step  # the counter sees a read per step when there is one
