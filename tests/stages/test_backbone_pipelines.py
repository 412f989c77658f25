"""The tiny whole-method runs on each new backbone family (DINOv2 with registers, DINOv3), in one process and on Ray.

TransFGU: crops, concepts, label bank, training, evaluation, then the trained checkpoint through predict, TorchScript
export and the MLflow pyfunc model. Leopart: dense features, CBFE, communities, evaluation; and the dense fine-tuning,
whose weights load back as a backbone of the same architecture. Sizes are the tiny presets' grids at each family's
patch size (14 for DINOv2, 16 for DINOv3). Ray runs must equal the one-process runs of the same configuration.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.configs import tiny_config
from helpers.data import require_shared_data

FAMILIES = ["vit_test_tiny_reg4", "vit_test_tiny_dinov3"]

#: conf/tiny.yaml's grids at each family's patch size (training sizes: multiples of twice the patch size).
TINY_SIZES = {
    "vit_test_tiny_reg4": {"crops.input_size": "[112, 168]", "crops.crop_size": "56",
                           "pseudo.input_size": "[56, 112]", "train.train_size": "[56, 112]",
                           "eval.eval_size": "[56, 112]"},
    "vit_test_tiny_dinov3": {"crops.input_size": "[128, 192]", "crops.crop_size": "64",
                             "pseudo.input_size": "[64, 96]", "train.train_size": "[64, 96]",
                             "eval.eval_size": "[64, 96]"},
}


def transfgu_config(arch: str, root, name: str, **over: str):
    return tiny_config(root, name, **{"backbone.arch": arch, **TINY_SIZES[arch], **over})


def leopart_family_config(arch: str, root, name: str, **over: str):
    from helpers.configs import leopart_config

    side = 8 * (14 if "reg4" in arch else 16)  # the 8 x 8 patch grid of the tiny Leopart test
    return leopart_config(root, name, **{"backbone.arch": arch, "leopart.input_size": f"[{side}, {side}]", **over})


#: Ray-only settings of the Leopart runs (the one-process run ignores them; the Ray run of the same config uses them).
LEOPART_RAY = {"ray.cpus_per_actor": "0.5", "ray.extract_actors": "[1, 2]", "ray.kmeans_shards": "2"}


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """``get(arch, method)``: the finished one-process run (config, manifest) of the tiny TransFGU or Leopart config
    on ``arch``, made once per module and read-only for the tests: the end-to-end checks and the Ray-equality
    checks share it instead of running the same configuration twice."""
    from transfgu.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("one_process")
    done: dict = {}

    def get(arch: str, method: str):
        if (arch, method) not in done:
            torch.set_num_threads(2)
            if method == "transfgu":
                cfg = transfgu_config(arch, root / arch / "one", "tf")
            else:
                cfg = leopart_family_config(arch, root / arch, "lp_one", **LEOPART_RAY)
            done[arch, method] = (cfg, run_pipeline(cfg))
        return done[arch, method]

    return get


@pytest.mark.slow  # about a minute per family on the loaded 2-core VM
@pytest.mark.parametrize("arch", FAMILIES)
def test_transfgu_end_to_end_then_predict_export_and_mlflow_model(arch, one_process_runs, tmp_path):
    from transfgu.data.io import load_rgb
    from transfgu.data.transforms import to_model_input
    from transfgu.engine.step import predict_logits
    from transfgu.export import export_torchscript, load_exported
    from transfgu.mlflow_model import load_pyfunc, save_mlflow_model
    from transfgu.predict import load
    from transfgu.store.formats import read_label_bank

    torch.set_num_threads(2)
    cfg, manifest = one_process_runs(arch, "transfgu")
    assert all(rec["status"] == "done" for rec in manifest["stages"].values())
    run = cfg.run_dir
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["pretrained"] is False
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["backbone"]["arch"] == arch
    bank = read_label_bank(run / "label_bank")
    p = 14 if "reg4" in arch else 16
    grid = (cfg.pseudo.input_size[0] // p, cfg.pseudo.input_size[1] // p)
    assert bank and all(m.shape == (cfg.concepts.k, *grid) for m in bank.values())  # maps over patches only

    pred = load(run, device="cpu", precision="fp32")
    assert pred.backbone.arch == arch and pred.backbone.num_registers == 4
    val = sorted((require_shared_data("camvid") / "images" / "val").glob("*.jpg"))[:2]
    images = [load_rgb(v) for v in val]
    labels = pred.predict(images)
    assert [lab.shape for lab in labels] == [im.shape[:2] for im in images]

    module, info = load_exported(export_torchscript(pred, tmp_path / "model.pt"))
    x = torch.stack([to_model_input(im, pred.eval_size) for im in images])
    with torch.no_grad():
        eager = predict_logits(pred.decoder, pred.backbone, x).argmax(dim=1)
    assert info["backbone"]["arch"] == arch
    torch.testing.assert_close(module(x), eager, rtol=0, atol=0)

    import pandas as pd

    from transfgu.mlflow_model import decode_label_png

    model = load_pyfunc(str(save_mlflow_model(run, tmp_path / "mlflow_model")))
    out = model.predict(pd.DataFrame({"image": [v.read_bytes() for v in val]}))
    for got, want in zip(out["label_png"], labels):
        np.testing.assert_array_equal(decode_label_png(got), want)


@pytest.mark.slow  # about a minute per family on the loaded 2-core VM
@pytest.mark.parametrize("arch", FAMILIES)
def test_leopart_end_to_end(arch, one_process_runs):
    from transfgu.leopart.pipeline import STAGES, read_segments

    torch.set_num_threads(2)
    cfg, manifest = one_process_runs(arch, "leopart")
    assert [s for s in STAGES if manifest["stages"][s]["status"] == "done"] == list(STAGES)
    metrics = json.loads((cfg.run_dir / "eval" / "metrics.json").read_text())
    assert metrics["method"] == "leopart" and 0.0 <= metrics["mIoU"] <= 1.0
    segs = read_segments(cfg.run_dir, "val")
    assert len(segs) == 8 and all(s.shape == (8, 8) for s in segs.values())  # the patch grid, registers excluded


@pytest.mark.slow  # about 30 s per family on the loaded 2-core VM
@pytest.mark.parametrize("arch", FAMILIES)
def test_leopart_finetuning_and_its_weights_load_back(arch, tmp_path):
    from helpers.configs import finetune_config

    from transfgu.models.backbone import build_backbone
    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(2)
    p = 14 if "reg4" in arch else 16
    cfg = finetune_config(tmp_path, "ft", **{"backbone.arch": arch, "finetune.global_size": str(4 * p),
                                             "finetune.local_size": str(2 * p), "mlflow.enabled": "false"})
    run_pipeline(cfg)
    path = cfg.run_dir / "finetune" / "backbone.safetensors"
    bb = build_backbone(arch, str(path))
    rand = build_backbone(arch, str(cfg.run_dir / "backbone_random.safetensors"))
    assert bb.num_registers == 4
    qkv = "blocks.1.attn.qkv.weight"
    assert not torch.equal(rand.vit.state_dict()[qkv], bb.vit.state_dict()[qkv])  # it learned
    x = torch.randn(1, 3, 3 * p, 5 * p)
    assert bb(x).patch.shape == (1, 15, 64)
    # ... and it runs a Leopart stage as the backbone of another run
    lp = leopart_family_config(arch, tmp_path, "lp_ft", **{"backbone.weights": str(path),
                                                           "data.max_train_images": "6"})
    manifest = run_pipeline(lp, only=["dense"])
    assert manifest["stages"]["dense"]["status"] == "done"


# -- on Ray ------------------------------------------------------------------------------------------------------------
RAY = {"ray.cpus_per_actor": "0.5", "ray.cpus_per_worker": "0.5", "ray.extract_actors": "[1, 2]",
       "ray.kmeans_shards": "2", "ray.num_workers": "1", "ray.fit_per_round": "false"}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("arch", FAMILIES)
def test_ray_runs_equal_the_one_process_runs(arch, ray_local, one_process_runs, tmp_path):
    from transfgu.concepts import ConceptBank
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.leopart.pipeline import read_segments
    from transfgu.store.formats import read_features, read_label_bank

    torch.set_num_threads(2)
    one, _ = one_process_runs(arch, "transfgu")
    dist = transfgu_config(arch, tmp_path / "ray", "tf", **RAY)
    manifest = run_pipeline_ray(dist)
    assert all(rec["status"] == "done" for rec in manifest["stages"].values())
    ma, fa = read_features(one.run_dir / "features")
    mb, fb = read_features(dist.run_dir / "features")
    assert ma.equals(mb)
    # DINOv3: bit for bit. DINOv2 with registers: the Ray actors' features differ from the driver's in the last
    # float32 bits (measured <= 2e-6; not from threads or batch composition, tested) and that rounding reaches the
    # training metrics (measured 1.4e-5 mIoU); exact equality there is an open point (docs/backbones.md)
    exact = arch == "vit_test_tiny_dinov3"
    np.testing.assert_allclose(fa, fb, rtol=0, atol=0 if exact else 1e-5)
    np.testing.assert_allclose(ConceptBank.load(dist.run_dir / "concepts").centroids,
                               ConceptBank.load(one.run_dir / "concepts").centroids, atol=1e-5)
    bank_a, bank_b = read_label_bank(one.run_dir / "label_bank"), read_label_bank(dist.run_dir / "label_bank")
    assert bank_a.keys() == bank_b.keys()
    for k in bank_a:
        np.testing.assert_allclose(bank_a[k], bank_b[k], atol=1e-3)
    m1 = json.loads((one.run_dir / "eval" / "metrics.json").read_text())
    m2 = json.loads((dist.run_dir / "eval" / "metrics.json").read_text())
    assert m2["mIoU"] == pytest.approx(m1["mIoU"], abs=1e-6 if exact else 1e-4)

    lp_one, _ = one_process_runs(arch, "leopart")
    lp_dist = leopart_family_config(arch, tmp_path, "lp_ray", **LEOPART_RAY)
    run_pipeline_ray(lp_dist)
    a, b = read_segments(lp_one.run_dir, "val"), read_segments(lp_dist.run_dir, "val")
    assert a.keys() == b.keys()
    if exact:
        for rel in ("pca/pca.safetensors", "cbfe/cbfe.safetensors", "model/leopart.safetensors"):
            assert (lp_one.run_dir / rel).read_bytes() == (lp_dist.run_dir / rel).read_bytes(), rel
        assert all(np.array_equal(a[k], b[k]) for k in a)
    else:  # the last-bit feature differences above may move a few patches between clusters
        agree = np.mean([np.mean(a[k] == b[k]) for k in a])
        assert agree >= 0.9, agree
