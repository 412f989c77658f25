"""GPU code paths (CUDA, bf16 autocast, faiss-gpu). Skipped on machines without CUDA; run them where one is lent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfgu.models.backbone import build_backbone
from transfgu.pseudo_labels import concept_maps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_pseudo_labels_cuda_match_cpu():
    torch.manual_seed(0)
    bb = build_backbone("vit_small_patch8", "none")
    x = torch.randn(2, 3, 96, 96)
    c = torch.randn(9, 384)
    cpu = concept_maps(bb, x, c)
    gpu = concept_maps(bb.cuda(), x.cuda(), c.cuda()).cpu()
    assert (cpu - gpu).abs().max().item() < 1e-3


def test_bf16_autocast_pseudo_labels_close_to_fp32():
    torch.manual_seed(0)
    bb = build_backbone("vit_small_patch8", "none").cuda()
    x = torch.randn(2, 3, 96, 96, device="cuda")
    c = torch.randn(9, 384, device="cuda")
    ref = concept_maps(bb, x, c)
    low = concept_maps(bb, x, c, autocast_dtype=torch.bfloat16)
    # The gate (sign of the gradient) can flip where the gradient is ~0; compare the bulk of the map.
    assert (ref - low).abs().median().item() < 1e-2


def test_faiss_gpu_kmeans_if_available():
    faiss = pytest.importorskip("faiss")
    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss was built without GPU support (install the gpu extra)")
    from transfgu.kmeans import kmeans

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(i * 10, 1, (500, 32)) for i in range(4)]).astype(np.float32)
    res = kmeans(x, 4, niter=20, use_gpu=True)
    assert len(set(res.assignments.tolist())) == 4


def _count_syncs(fn) -> int:
    from transfgu.throughput.syncs import count_cuda_syncs

    return count_cuda_syncs(fn)


def test_training_epoch_does_not_synchronise_every_step():
    from transfgu.engine.loop import train_one_epoch
    from transfgu.engine.step import make_optimizer, make_teacher
    from transfgu.losses import EpochPlan
    from transfgu.models.decoder import MaskTransformerDecoder

    torch.manual_seed(0)
    bb = build_backbone("vit_test_tiny", "none").cuda()
    student = MaskTransformerDecoder(n_classes=5, d_encoder=48, d_model=48, n_heads=1).cuda()
    teacher = make_teacher(student)
    opt = make_optimizer(student, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    steps = 8
    batches = [
        {"image": torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8, generator=g).pin_memory(),
         "pseudo": torch.rand(2, 5, 8, 10, generator=g).pin_memory()}
        for _ in range(steps)
    ]  # fmt: skip
    plan = EpochPlan(epoch=2, bootstrapping=True, reboot=False, epoch_iter=0, alpha=0.1)

    def epoch():
        return train_one_epoch(student, teacher, bb, batches, opt, plan, "cuda", log_every=0,
                               amp_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))  # fmt: skip

    epoch()  # warm-up
    n = _count_syncs(epoch)
    assert n < steps, f"{n} host synchronisations in {steps} steps"


def test_compiled_forward_matches_eager_on_cuda():
    from transfgu.crops import embed_crops
    from transfgu.throughput.compile import compile_forward

    torch.manual_seed(0)
    ref = build_backbone("vit_test_tiny", "none").cuda()
    bb = build_backbone("vit_test_tiny", "none").cuda()
    bb.load_state_dict(ref.state_dict())
    compile_forward(bb, mode="auto")  # auto compiles on CUDA
    assert bb._transfgu_compiled
    crops = torch.randn(11, 3, 32, 32, device="cuda")
    a = embed_crops(bb, crops, 4)
    b = embed_crops(ref, crops, 4)
    assert not bb._transfgu_compile_state["failed"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cuda_label_bank_keeps_every_float32_decision(tmp_path):
    """Issue 12: on CUDA with the default configuration (float32, TF32 off) the stored bank read back has the same
    argmax and gate as the float32 definition at every position (K = 171, the COCO preset's pseudo settings)."""
    from transfgu.config import load_config
    from transfgu.pseudo_labels import concept_map_parts
    from transfgu.stages import build_label_maps
    from transfgu.store.formats import label_bank_table, read_label_bank, write_parquet_atomic

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True  # a caller that enabled TF32 must not change the bank
    bb = build_backbone("vit_small_patch8", "none").cuda()
    cfg = load_config("conf/coco_stuff171.yaml", ["pseudo.input_size=[160, 160]"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(3)]
    with torch.no_grad():
        cls = bb(torch.randn(8, 3, 64, 64, device="cuda")).cls.cpu()
    c = (cls[torch.arange(171) % 8] + 0.3 * cls.std() * torch.randn(171, 384)).numpy()
    lms = build_label_maps(bb, images, c, cfg.pseudo, torch.device("cuda"))
    write_parquet_atomic(label_bank_table(["a", "b", "c"], lms), tmp_path / "p.parquet")
    back = read_label_bank(tmp_path, dense=False)
    from transfgu.data.transforms import to_model_input

    x = torch.stack([to_model_input(im, (160, 160), cfg.pseudo.resize_mode) for im in images]).cuda()
    parts, (h, w) = concept_map_parts(bb, x, torch.from_numpy(c).cuda(), cfg.pseudo.grad_scale)
    ref = parts.maps().reshape(3, 171, h, w).cpu().numpy()
    gate = parts.gate.reshape(3, 171, h, w).cpu().numpy()
    torch.backends.cuda.matmul.allow_tf32 = False
    for i, k in enumerate("abc"):
        np.testing.assert_array_equal(back[k].dense().argmax(0), ref[i].argmax(0))
        np.testing.assert_array_equal(back[k].gate, gate[i])
