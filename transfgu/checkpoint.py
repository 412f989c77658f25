"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

* Training state (``<run>/train/round_<r>/state.safetensors`` + ``state.json``): student, teacher and initial decoder
  weights, Adam moments, RNG states (CPU, and CUDA when in use); enough to resume a round exactly where it stopped.
* Model (``<run>/model/decoder.safetensors`` + ``model.json``): what prediction needs and nothing else: the decoder,
  the backbone name and weights source (the random backbone itself when the run had no pretrained weights), the
  number of channels, the sizes, the cluster -> class mapping when one was matched, and the resolved config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from transfgu.model_meta import MODEL_JSON, CheckpointError, read_model_meta
from transfgu.models.backbone import DinoViT, build_backbone
from transfgu.schemas import StateInfo, check_finite, read_json
from transfgu.store.atomic import atomic_write_json, fix_mode, umask_mode

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
DECODER_FILE = "decoder.safetensors"
BACKBONE_FILE = "backbone.safetensors"

log = logging.getLogger(__name__)


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    fix_mode(tmp)  # safetensors writes 0600; the umask decides
    os.replace(tmp, path)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors and JSON-able scalars."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars["state"].setdefault(str(pid), {})[k] = v
    return tensors, scalars


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in scalars["state"].items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def save_train_state(
    directory: Path,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    initial: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    generator: torch.Generator | None = None,
) -> None:
    """Atomically write a resumable training state (tensors first, then the JSON that marks it complete)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
    tensors.update({f"initial.{k}": v for k, v in initial.items()})
    if teacher is not None:
        tensors.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    opt_t, opt_s = optimizer_tensors(optimizer)
    tensors.update(opt_t)
    if generator is not None:
        tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    _save_tensors(tensors, directory / STATE_TENSORS)
    atomic_write_json(directory / STATE_JSON, {**info, "optimizer": opt_s, "has_teacher": teacher is not None})


def restore_rng(rng: dict[str, Tensor]) -> None:
    """Restore the global CPU RNG and, when the state has them and this process sees as many CUDA devices, the
    CUDA RNGs (``rng`` is the ``"rng"`` group of :func:`load_train_state`)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    if not cuda:
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        log.warning("checkpoint holds %d CUDA RNG states but %d CUDA devices are visible; not restored", len(cuda), n)
        return
    torch.cuda.set_rng_state_all(cuda)


def load_train_state(directory: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Read a state written by :func:`save_train_state`: tensors grouped by prefix, and the JSON info."""
    info = read_json(directory / STATE_JSON, StateInfo)
    flat = load_file(str(directory / STATE_TENSORS))
    # the weights a resumed round continues from (optimizer moments and RNG states are checked by their users)
    check_finite(directory / STATE_TENSORS, {k: v for k, v in flat.items()
                                             if k.split(".", 1)[0] in ("student", "teacher", "initial")})
    groups: dict[str, dict[str, Tensor]] = {}
    for key, v in flat.items():
        head, rest = key.split(".", 1)
        groups.setdefault(head, {})[rest] = v
    groups.setdefault("opt", {})
    groups["opt"] = {f"opt.{k}": v for k, v in groups["opt"].items()}
    return groups, info


def install_state_dir(src: Path, target: Path) -> None:
    """Copy the files of ``src`` (e.g. a Ray Train checkpoint's directory) to the state directory ``target``,
    atomically: into a temporary sibling first, then renamed over ``target``, so a reader (or a resume after a
    kill) never sees a half-copied state."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".restore-", dir=target.parent))
    os.chmod(tmp, umask_mode(directory=True))  # mkdtemp makes it 0700; it becomes the state directory
    for f in Path(src).iterdir():
        shutil.copy2(f, tmp / f.name)
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def read_state_info(directory: Path) -> dict[str, Any] | None:
    """The JSON half of a training state (epoch, round, metrics); None when ``directory`` holds no complete state."""
    path = Path(directory) / STATE_JSON
    return read_json(path, StateInfo) if path.is_file() else None


def latest_train_state(train_dir: Path, input_hash: str | None = None) -> Path | None:
    """The most recent complete training state under ``train_dir`` (``state.json`` is written last, so it marks
    completeness).

    With ``input_hash`` only states written under that train hash count: a round trained under other settings is
    never resumed from (docs/reliability.md, "Re-running with a changed config").
    """
    done = [(info["epoch"], p) for p in Path(train_dir).glob("round_*") if (info := read_state_info(p)) is not None
            and (input_hash is None or info.get("input_hash") == input_hash)]
    return max(done, key=lambda t: t[0])[1] if done else None


def last_trained_epoch(train_dir: Path, input_hash: str | None = None) -> int:
    """The last epoch with a saved state under ``train_dir`` (of ``input_hash`` when given); -1 when there is none."""
    latest = latest_train_state(train_dir, input_hash)
    return int(read_state_info(latest)["epoch"]) if latest is not None else -1  # type: ignore[index]


def set_cluster_to_class(directory: Path, mapping: list[int]) -> None:
    """Record the evaluated cluster -> class mapping in ``model.json`` so ``transfgu predict`` can name classes."""
    meta = read_model_meta(directory)
    meta["cluster_to_class"] = [int(x) for x in mapping]
    atomic_write_json(Path(directory) / MODEL_JSON, meta)


def save_model(directory: Path, decoder: torch.nn.Module, meta: dict[str, Any], backbone=None) -> None:
    """Write the self-contained prediction checkpoint. ``backbone`` is stored only when it is not pretrained."""
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(decoder.state_dict(), directory / DECODER_FILE)
    if backbone is not None and not getattr(backbone, "pretrained", True):
        _save_tensors(backbone.vit.state_dict(), directory / BACKBONE_FILE)
        meta = {**meta, "backbone_file": BACKBONE_FILE}
    atomic_write_json(directory / MODEL_JSON, meta)


def load_backbone(ckpt: Path, meta: dict[str, Any], weights: str | None) -> DinoViT:
    """The checkpoint's backbone: the stored random one, else ``weights`` or the source named in ``model.json``."""
    bb = _backbone_weights(ckpt, meta, weights)
    bb.pos_embed_mode = meta["backbone"].get("pos_embed", "timm")  # DINO's interpolation under protocol: paper
    return bb


def _backbone_weights(ckpt: Path, meta: dict[str, Any], weights: str | None) -> DinoViT:
    arch = meta["backbone"]["arch"]
    stored = ckpt / meta.get("backbone_file", BACKBONE_FILE)
    if weights is None and stored.is_file():
        bb = build_backbone(arch, str(stored))
        bb.pretrained = bool(meta["backbone"].get("pretrained", False))
        bb.weights = str(meta["backbone"].get("weights", "none"))
        return bb
    source = str(weights if weights is not None else meta["backbone"].get("weights", "none"))
    if source == "none":
        raise CheckpointError(
            f"{ckpt}: the model was trained on a random backbone but {stored.name} is missing from the "
            "checkpoint, so its backbone cannot be rebuilt"
        )
    if source not in ("timm",) and not source.startswith("hub:") and not Path(source).is_file():
        raise CheckpointError(
            f"{ckpt}: backbone weights file {source!r} named in {MODEL_JSON} was not found; copy it there or "
            "pass weights=<path> (CLI: --weights PATH)"
        )
    return build_backbone(arch, source)
