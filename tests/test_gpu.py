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
