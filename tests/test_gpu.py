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
    from transfgu.concepts import kmeans

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(i * 10, 1, (500, 32)) for i in range(4)]).astype(np.float32)
    res = kmeans(x, 4, niter=20, use_gpu=True)
    assert len(set(res.assignments.tolist())) == 4


def test_cuda_label_bank_keeps_every_float32_decision(tmp_path):
    """Issue 12: on CUDA with the default configuration (float32, TF32 off) the stored bank read back has the same
    argmax and gate as the float32 definition at every position (K = 171, the COCO preset's pseudo settings)."""
    from transfgu.config import load_config
    from transfgu.pseudo_labels import concept_map_parts
    from transfgu.stages import build_label_maps, label_bank_rows
    from transfgu.store import read_label_bank, write_parquet_atomic

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
    write_parquet_atomic(label_bank_rows(["a", "b", "c"], lms), tmp_path / "p.parquet")
    back = read_label_bank(tmp_path, dense=False)
    from transfgu.stages import resize_image

    x = torch.stack([resize_image(im, (160, 160), cfg.pseudo.resize_mode) for im in images]).cuda()
    parts, (h, w) = concept_map_parts(bb, x, torch.from_numpy(c).cuda(), cfg.pseudo.grad_scale)
    ref = parts.maps().reshape(3, 171, h, w).cpu().numpy()
    gate = parts.gate.reshape(3, 171, h, w).cpu().numpy()
    torch.backends.cuda.matmul.allow_tf32 = False
    for i, k in enumerate("abc"):
        np.testing.assert_array_equal(back[k].dense().argmax(0), ref[i].argmax(0))
        np.testing.assert_array_equal(back[k].gate, gate[i])
