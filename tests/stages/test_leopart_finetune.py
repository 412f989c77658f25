"""Leopart dense fine-tuning (issue 17): the method pieces against naive or hand-computed oracles, the one-process
stage on real CamVid images (loss decreases, the checkpoint loads back as a backbone, resume)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.configs import FINETUNE_LEARN as LEARN
from helpers.configs import finetune_config
from helpers.oracles import naive_sinkhorn

from transfgu.leopart import finetune_parts as ft


# -- Sinkhorn-Knopp ---------------------------------------------------------------------------------------------------
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
        b = ft.sample_multicrop_boxes(360, 480, spec, g)
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


def test_a_finetuned_backbone_is_pretrained_only_when_its_source_was():
    from transfgu.leopart.finetune_stage import finetuned_prior
    from transfgu.models.backbone import PRIOR_FINETUNED_RANDOM, PRIOR_PRETRAINED, PRIOR_RANDOM, PRIOR_STANDIN

    assert finetuned_prior(PRIOR_RANDOM) == finetuned_prior(PRIOR_FINETUNED_RANDOM) == PRIOR_FINETUNED_RANDOM
    assert finetuned_prior(PRIOR_STANDIN) == PRIOR_STANDIN
    assert finetuned_prior(PRIOR_PRETRAINED) is None  # no mark: weights_prior reads it as pretrained


def test_usage_entropy():
    assert ft.usage_entropy(torch.eye(4)) == pytest.approx(math.log(4))
    assert ft.usage_entropy(torch.tensor([[1.0, 0.0]] * 5)) == pytest.approx(0.0)


# -- the stage on real images -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(1)
    cfg = finetune_config(tmp_path_factory.mktemp("ft"), **LEARN, **{"mlflow.enabled": "true",
                                                                    "mlflow.system_metrics": "false"})
    return cfg, run_pipeline(cfg)


@pytest.mark.slow  # shares the module's MLflow-tracked run (about 45 s on the loaded 2-core VM)
def test_short_run_on_camvid_loss_decreases_and_is_tracked(ft_run):
    import json

    import mlflow

    cfg, manifest = ft_run
    rec = manifest["stages"]["finetune"]
    assert rec["status"] == "done" and rec["rows"] == 6
    info = json.loads((cfg.run_dir / "finetune" / "finetune.json").read_text())
    losses = [h["loss"] for h in info["history"]]
    assert len(losses) == 6 and losses[-1] < losses[1] - 0.1, losses
    assert [h["momentum"] for h in info["history"]] == sorted(h["momentum"] for h in info["history"])
    assert info["source"]["weights"] == "none" and info["finetune"]["queue_length"] == 64
    # MLflow: loss, cluster-usage entropy and EMA momentum per epoch on the stage run
    from transfgu.tracking import resolve_tracking_uri

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.pipeline_stage = 'finetune'")
    assert runs, "no MLflow run of the finetune stage"
    for key in ("finetune/loss", "finetune/usage_entropy", "finetune/momentum"):
        hist = client.get_metric_history(runs[0].info.run_id, key)
        assert len(hist) == 6, key
    # two epoch states are kept
    assert sorted(p.name for p in (cfg.run_dir / "finetune").glob("epoch_*")) == ["epoch_004", "epoch_005"]
    # the report shows the history and the before/after attention and cluster maps
    from transfgu.report import write_report

    assert (cfg.run_dir / "finetune" / "before_after.png").is_file()
    page = write_report(cfg.run_dir).read_text()
    assert "Dense fine-tuning" in page and "cluster-usage entropy" in page and page.count("<img") >= 1


@pytest.mark.slow  # shares the module's MLflow-tracked run (about 45 s on the loaded 2-core VM)
def test_checkpoint_loads_back_as_a_backbone_everywhere(ft_run, tmp_path):
    from safetensors import safe_open

    from transfgu.leopart import finetune_stage as ftt
    from transfgu.models.backbone import build_backbone
    from transfgu.pipeline import run_pipeline

    cfg, _ = ft_run
    path = cfg.run_dir / "finetune" / "backbone.safetensors"
    bb = build_backbone("vit_test_tiny", str(path))
    groups, _ = ftt.load_train_state(cfg.run_dir / "finetune" / "epoch_005")
    # the exported backbone is the student (what the authors evaluate); the teacher is written next to it
    assert cfg.finetune.export == "student"
    other = build_backbone("vit_test_tiny", str(cfg.run_dir / "finetune" / "backbone_teacher.safetensors"))
    for which, net in (("student", bb), ("teacher", other)):
        ref = {k[len("backbone.vit."):]: v for k, v in groups[which].items() if k.startswith("backbone.vit.")}
        for k, v in net.vit.state_dict().items():
            torch.testing.assert_close(v, ref[k])
    assert not torch.equal(bb.vit.blocks[0].attn.qkv.weight, other.vit.blocks[0].attn.qkv.weight)
    rand = build_backbone("vit_test_tiny", str(cfg.run_dir / "backbone_random.safetensors"))
    assert not torch.equal(rand.vit.blocks[0].attn.qkv.weight, bb.vit.blocks[0].attn.qkv.weight)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert '"weights": "none"' in meta[ftt.FINETUNE_METADATA_KEY]
    # fine-tuned from a random init: never recorded as pretrained
    from transfgu.models.backbone import PRIOR_FINETUNED_RANDOM, PRIOR_METADATA_KEY, weights_prior

    assert meta[PRIOR_METADATA_KEY] == PRIOR_FINETUNED_RANDOM == weights_prior(path)
    # TransFGU's extract and Leopart's dense + CBFE + communities accept it as backbone.weights
    from helpers.configs import leopart_config, tiny_config

    tf = tiny_config(tmp_path / "tf", "tf", **{"backbone.weights": str(path), "data.max_train_images": "2"})
    assert tf.backbone.source.prior == PRIOR_FINETUNED_RANDOM and not tf.backbone.source.pretrained
    m = run_pipeline(tf, only=["extract"])
    assert m["stages"]["extract"]["status"] == "done"
    lp = leopart_config(tmp_path / "lp", "lp", **{"backbone.weights": str(path)})
    m = run_pipeline(lp, only=["dense", "pca", "cbfe", "communities"])
    assert all(m["stages"][s]["status"] == "done" for s in ("dense", "pca", "cbfe", "communities"))


@pytest.mark.slow  # shares the module's MLflow-tracked run (about 45 s on the loaded 2-core VM)
def test_interrupted_run_resumes_from_last_epoch_with_the_same_weights(ft_run, tmp_path):
    import shutil

    from transfgu.leopart import finetune_stage as ftt
    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(1)
    ref_cfg, _ = ft_run
    cfg = finetune_config(tmp_path, "ft", **LEARN)
    cfg.run_dir.mkdir(parents=True)
    shutil.copy(ref_cfg.run_dir / "backbone_random.safetensors", cfg.run_dir)

    class Stop(Exception):
        pass

    real = ftt.save_train_state
    calls = []

    def save_then_die(directory, *a, **k):
        real(directory, *a, **k)
        calls.append(directory.name)
        if directory.name == "epoch_002":
            raise Stop

    ftt.save_train_state = save_then_die
    try:
        with pytest.raises(Stop):
            run_pipeline(cfg)
    finally:
        ftt.save_train_state = real
    m = run_pipeline(cfg)
    assert m["stages"]["finetune"]["extra"]["resumed_from_epoch"] == 3
    ref = ftt.load_train_state(ref_cfg.run_dir / "finetune" / "epoch_005")[0]
    got = ftt.load_train_state(cfg.run_dir / "finetune" / "epoch_005")[0]
    for group in ("student", "teacher", "initial"):
        for k in ref[group]:
            torch.testing.assert_close(got[group][k], ref[group][k], rtol=1e-4, atol=1e-5)


def test_bad_settings_are_refused_before_any_work(tmp_path):
    from transfgu.config import ConfigError
    from transfgu.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="finetune.global_size"):
        run_pipeline(finetune_config(tmp_path, **{"finetune.global_size": "60"}))
    with pytest.raises(Exception, match="n_global"):
        finetune_config(tmp_path, **{"finetune.n_global": "0"})


@pytest.mark.slow  # shares the module's MLflow-tracked run (about 45 s on the loaded 2-core VM)
def test_outputs_of_other_settings_are_set_aside_not_resumed(ft_run, tmp_path):
    import json
    import shutil

    from transfgu.pipeline import run_pipeline

    ref_cfg, _ = ft_run
    cfg = finetune_config(tmp_path, "ft", **{**LEARN, "finetune.epochs": "2", "finetune.lr_head": "1e-3"})
    shutil.copytree(ref_cfg.run_dir, cfg.run_dir)
    m = run_pipeline(cfg)
    assert m["stages"]["finetune"]["extra"]["resumed_from_epoch"] == 0  # the other settings' epoch 5 is not used
    info = json.loads((cfg.run_dir / "finetune" / "finetune.json").read_text())
    assert info["input_hash"] != json.loads((ref_cfg.run_dir / "finetune" / "finetune.json").read_text())["input_hash"]
    stale = {p.name for p in (cfg.run_dir / "_stale" / "finetune").glob("*/*")}
    assert {"epoch_004", "epoch_005", "finetune.json", "backbone.safetensors"} <= stale


def test_without_learning_the_loss_does_not_decrease(tmp_path):
    """Control for the loss test: the same run with (almost) no learning rate keeps its loss, so the decrease there
    comes from learning, not from the schedules or the queue."""
    import json

    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(1)
    cfg = finetune_config(tmp_path, "frozen", **{**LEARN, "finetune.lr_head": "1e-12", "finetune.lr_backbone": "0"})
    run_pipeline(cfg)
    losses = [h["loss"] for h in json.loads((cfg.run_dir / "finetune" / "finetune.json").read_text())["history"]]
    assert losses[-1] > losses[1] - 0.1, losses


def test_folder_preset_is_the_appendix_recipe():
    from helpers.data import REPO

    from transfgu.config import load_config

    f = load_config(REPO / "conf" / "leopart_finetune.yaml", []).finetune
    assert (f.epochs, f.global_size, f.local_size, f.min_intersection) == (50, 224, 96, 0.01)
    assert (f.hidden_dim, f.out_dim, f.queue_length, f.temperature, f.align_size) == (2048, 256, 8192, 0.1, 7)
    assert (f.lr_head, f.lr_backbone, f.momentum) == (1e-4, 1e-5, 0.9995)
    for name in ("leopart_finetune_camvid", "leopart_finetune_tiny"):
        assert load_config(REPO / "conf" / f"{name}.yaml", []).method == "leopart_finetune"


# -- the authors' recipe: foreground mask, per-crop queues, AdamW, drop-path, crop overlap -----------------------
def test_attention_foreground_keeps_the_top_mass_by_hand():
    # head mean of [[4, 3, 2, 1], [4, 3, 2, 1]] / 10: top 60 % of the mass = 0.4 + 0.3 (0.7 > 0.6; 0.4 alone < 0.6)
    a = torch.tensor([[[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]]])
    assert ft.attention_foreground(a, 0.6).tolist() == [[True, True, False, False]]
    # uniform attention: cumsum 0.25, 0.5, 0.75, 1.0 > 0.4 keeps the last three in sort order (stable)
    assert ft.attention_foreground(torch.ones(1, 1, 4), 0.6).sum() == 3
    # one patch holds everything: exactly that patch (at least one patch)
    assert ft.attention_foreground(torch.tensor([[[0.0, 0.0, 1.0]]]), 0.01).tolist() == [[False, False, True]]


def _brute_masked_loss(preds, targets, fg, boxes, n_global, tau, out):
    """Per image: the mean over pairs of the mean over the foreground cells (aligned mask >= 0.5, else the highest
    cell) of -sum_k Q log softmax(s / tau), cell by cell in Python."""
    b = boxes.shape[0]
    n_crops = len(preds)
    per_image = []
    for im in range(b):
        pair_losses = []
        for j in range(n_global):
            for i in range(n_crops):
                if i == j:
                    continue
                inter = ft.box_intersection(boxes[im : im + 1, i], boxes[im : im + 1, j])
                s = preds[i][im : im + 1]
                t = targets[j][im : im + 1]
                s_al = ft.align_maps(s / tau, ft.boxes_in_crop(inter, boxes[im : im + 1, i], s.shape[-2:]), out)[0]
                tb = ft.boxes_in_crop(inter, boxes[im : im + 1, j], t.shape[-2:])
                t_al = ft.align_maps(t, tb, out)[0]
                m_al = ft.align_maps(fg[j][im : im + 1], tb, out)[0, 0]
                cells = [(u, v) for u in range(out) for v in range(out) if float(m_al[u, v]) >= 0.5]
                if not cells:
                    flat = m_al.flatten()
                    top = int(flat.argmax())
                    cells = [(top // out, top % out)]
                vals = []
                for u, v in cells:
                    logp = torch.log_softmax(s_al[:, u, v].double(), 0)
                    vals.append(float(-(t_al[:, u, v].double() * logp).sum()))
                pair_losses.append(sum(vals) / len(vals))
        per_image.append(sum(pair_losses) / len(pair_losses))
    return torch.tensor(per_image, dtype=torch.float64)


def test_masked_loss_equals_a_cell_by_cell_brute_force():
    g = torch.Generator().manual_seed(5)
    b, k, n_global = 2, 6, 2
    spec = ft.CropSpec(n_global=2, n_local=1, min_intersection=0.05, global_overlap=0.02)
    boxes = torch.stack([ft.sample_multicrop_boxes(60, 80, spec, g) for _ in range(b)])
    preds = [torch.randn(b, k, 4, 4, generator=g), torch.randn(b, k, 4, 4, generator=g),
             torch.randn(b, k, 2, 2, generator=g)]
    targets = [torch.softmax(torch.randn(b, k, 4, 4, generator=g), 1) for _ in range(2)]
    fg = [(torch.rand(b, 1, 4, 4, generator=g) > 0.5).float() for _ in range(2)]
    fg[1][0] = 0.0
    fg[1][0, 0, 3, 3] = 1.0  # one foreground patch in a corner: some pairs keep only their best cell
    got = ft.cluster_loss(preds, targets, boxes, n_global, 0.1, 3, per_image=True, foreground=fg)
    ref = _brute_masked_loss(preds, targets, fg, boxes, n_global, 0.1, 3)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # the mask matters: the unmasked loss is another number, and an all-foreground mask is the unmasked loss
    plain = ft.cluster_loss(preds, targets, boxes, n_global, 0.1, 3, per_image=True)
    assert not torch.allclose(got, plain, atol=1e-3)
    ones = [torch.ones(b, 1, 4, 4) for _ in range(2)]
    torch.testing.assert_close(ft.cluster_loss(preds, targets, boxes, n_global, 0.1, 3, per_image=True,
                                               foreground=ones), plain)


def test_foreground_queue_pushes_equal_a_brute_force_pick():
    from transfgu.ddp import step_generator
    from transfgu.leopart import finetune_stage as ftt

    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, 2, generator=g)  # 3 images, 5 patches, dim 2
    fg = torch.rand(3, 5, generator=g) > 0.4
    fg[:, 0] = True
    q = ft.EmbeddingQueue(50, 2)
    ftt._push_global(q, z, fg, 0, 3, 4, step_generator(0, 0, 0, 19))
    # brute force: the foreground rows image by image, patch by patch, and the same draw over their number
    rows = [z[i, p] for i in range(3) for p in range(5) if bool(fg[i, p])]
    pick = torch.randperm(len(rows), generator=step_generator(0, 0, 0, 19))[:4]
    assert q.filled == 4
    torch.testing.assert_close(q.data[:4], torch.stack([rows[int(r)] for r in pick]))
    # without a mask every patch is a candidate (the ranks' pieces: tests/stages/test_leopart_finetune_ddp.py)
    q_all = ft.EmbeddingQueue(50, 2)
    ftt._push_global(q_all, z, None, 0, 3, 4, step_generator(0, 0, 0, 19))
    pick = torch.randperm(15, generator=step_generator(0, 0, 0, 19))[:4]
    torch.testing.assert_close(q_all.data[:4], z.reshape(15, 2)[pick])


def test_sinkhorn_runs_per_global_crop_with_its_own_queue():
    from transfgu.leopart import finetune_stage as ftt

    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 2, 3, 4, generator=g) * 0.5  # 2 images, 2 global crops, 3 patches, K = 4
    protos = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    queues = ft.CropQueues(2, 5, 3)
    for j in range(2):
        queues[j].push(torch.nn.functional.normalize(torch.randn(5, 3, generator=g), dim=1))
    got = ftt.sinkhorn_per_crop(scores, queues, protos, 0.1, 3)
    for j in range(2):
        rows = scores[:, j].reshape(-1, 4)
        shared = queues[j].data @ protos.t()
        ref = naive_sinkhorn(torch.cat([rows, shared]).double().tolist(), 0.1, 3)[:6]
        torch.testing.assert_close(got[j].double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # not the joint Sinkhorn over both crops (what the loop did before)
    joint = ft.sinkhorn_knopp(scores.reshape(-1, 4), 0.1, 3).view(2, 2, 3, 4)
    assert not torch.allclose(got[0].view(2, 3, 4), joint[:, 0], atol=1e-4)
    # the queues' state round-trips
    q2 = ft.CropQueues(2, 5, 3)
    q2.load(queues.state())
    assert all(torch.equal(q2[j].data, queues[j].data) for j in range(2))


def test_adamw_decays_what_the_authors_decay():
    from transfgu.leopart import finetune_stage as ftt
    from transfgu.models.backbone import build_backbone

    bb = build_backbone("vit_test_tiny", weights="none").requires_grad_(True)  # built frozen
    head = ft.ProjectionHead(bb.embed_dim, 16, 8, 5)
    groups = ft.param_groups(bb, head, 1e-5, 1e-4)
    names = {id(p): n for n, p in list(bb.named_parameters()) + list(head.named_parameters())}
    decayed = {names[id(p)] for grp in groups if grp["decay"] for p in grp["params"]}
    kept = {names[id(p)] for grp in groups if not grp["decay"] for p in grp["params"]}
    assert {"vit.cls_token", "vit.pos_embed", "vit.patch_embed.proj.weight", "prototypes.weight"} <= decayed
    assert {"vit.patch_embed.proj.bias", "vit.norm.weight", "vit.blocks.0.norm1.weight"} <= kept
    assert not any(n.endswith(".bias") for n in decayed)
    old = {names[id(p)] for grp in ft.param_groups(bb, head, 1e-5, 1e-4, decay_tokens=False) if grp["decay"]
           for p in grp["params"]}
    assert decayed - old == {"vit.cls_token", "vit.pos_embed"}
    # decoupled decay by hand: with a zero gradient AdamW shrinks a decayed weight by exactly (1 - lr * wd)
    # (Adam with L2 would move it by ~lr: the normalised gradient of wd * p)
    cfg = finetune_config("/tmp/unused")
    student, _ = ftt.build_models(cfg, build_backbone("vit_test_tiny", weights="none"))
    opt = ftt.make_finetune_optimizer(cfg, student)
    assert isinstance(opt, torch.optim.AdamW)
    ft.set_schedules(opt, 0, 10, *cfg.finetune.weight_decay)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(student.named_parameters())
    lr = cfg.finetune.lr_backbone
    torch.testing.assert_close(after["backbone.vit.cls_token"], before["backbone.vit.cls_token"] * (1 - lr * 0.04))
    assert torch.equal(after["backbone.vit.norm.weight"], before["backbone.vit.norm.weight"])
    assert cfg.finetune.weight_decay[1] == 0.5 and ft.cosine_schedule(0.04, 0.5, 10, 10) == pytest.approx(0.5)


def test_student_drop_path_rates_and_draws():
    from transfgu.leopart import finetune_stage as ftt
    from transfgu.models.backbone import build_backbone

    cfg = finetune_config("/tmp/unused")
    student, teacher = ftt.build_models(cfg, build_backbone("vit_test_tiny", weights="none"))
    mods = ft.drop_path_modules(student)
    assert [m.rate for m in mods] == pytest.approx([0.0, 0.0, 0.1, 0.1])  # 2 blocks: linear 0 -> 0.1
    assert not ft.drop_path_modules(teacher)
    # a set draw drops exactly the samples whose uniform is below the rate and scales the others
    m = mods[-1]
    m.train()
    ft.set_drop_path_draws([m], torch.tensor([[0.05], [0.5]]))
    x = torch.ones(2, 3, 4)
    y = m(x)
    assert torch.equal(y[0], torch.zeros(3, 4)) and torch.allclose(y[1], torch.full((3, 4), 1 / 0.9))


def test_global_crops_overlap_by_more_than_two_percent():
    """Pixel-counting oracle: two global crops share more than 2 % of the image's pixels, local crops >= 1 %."""
    import numpy as np

    spec = ft.CropSpec(n_global=2, n_local=3, global_scale=(0.1, 0.3), local_scale=(0.02, 0.1),
                       min_intersection=0.01, global_overlap=0.02)
    g = torch.Generator().manual_seed(11)
    h, w = 60, 80
    for _ in range(40):
        b = ft.sample_multicrop_boxes(h, w, spec, g).int().tolist()
        masks = []
        for x0, y0, x1, y1 in b:
            m = np.zeros((h, w), bool)
            m[y0:y1, x0:x1] = True
            masks.append(m)
        assert (masks[0] & masks[1]).sum() > 0.02 * h * w
        for i in range(2, 5):
            for j in range(2):
                assert (masks[i] & masks[j]).sum() >= 0.01 * h * w
    # the rule bites: small global crops drawn without it often overlap by 2 % or less
    loose = ft.CropSpec(n_global=2, n_local=0, global_scale=(0.1, 0.3), min_intersection=0.0)
    small = 0
    for _ in range(40):
        b = ft.sample_multicrop_boxes(h, w, loose, g)
        small += float(ft.box_area(ft.box_intersection(b[0], b[1]))) <= 0.02 * h * w
    assert small > 0


def test_the_authors_recipe_is_the_default():
    f = finetune_config("/tmp/unused").finetune.model_copy()
    from transfgu.config import FinetuneConfig

    d = FinetuneConfig()
    assert (d.loss_mask, d.fg_attention, d.fg_mass, d.queue_push) == ("foreground", "teacher", 0.6, 320)
    assert (d.optimizer, d.weight_decay, d.decay_tokens, d.drop_path) == ("adamw", (0.04, 0.5), True, 0.1)
    assert (d.batch_size, d.global_overlap, d.jitter, d.jitter_p, d.export) == (
        64, 0.02, (0.8, 0.8, 0.8, 0.2), 0.8, "student")
    assert f.loss_mask == "foreground"
