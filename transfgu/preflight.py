"""Checks of a run's environment and data that need more than the config schema, done before any stage starts.

:func:`transfgu.config.load_config` already rejects unknown keys, wrong types and out-of-range values. What it
cannot see -- the data folder, the weights file, the device, and whether the sizes fit the backbone's patch grid --
is checked here, so a run that would die an hour in (a missing label at evaluation, windows that do not fit the
grid at the first image) fails in a second, with every problem listed and the key to change named. Nothing is
written.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from transfgu.config import Config, ConfigError
from transfgu.data.datasets import DatasetError, dataset_spec, list_records
from transfgu.methods import get_method
from transfgu.models.backbone import ARCHS, WeightsError, build_backbone
from transfgu.models.backbone import patch_size_of as model_patch_size

__all__ = ["PreflightError", "patch_size_of", "preflight"]

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


class PreflightError(ConfigError):
    """The run cannot start; the message lists each problem with the config key to change."""


def patch_size_of(arch: str) -> int:
    """Patch size of a backbone name of :data:`transfgu.models.backbone.ARCHS`, without building the model."""
    if arch == "vit_test_tiny":
        return 8
    m = re.search(r"patch(\d+)", ARCHS.get(arch, "") or arch)
    if m:
        return int(m.group(1))
    return model_patch_size(arch)  # unknown naming: ask the model itself


def _multiple(size: tuple[int, int], step: int) -> list[int]:
    return [max(step, round(s / step) * step) for s in size]


def size_problems(key: str, size: tuple[int, int] | list[int], p: int, arch: str) -> list[tuple[str, str]]:
    """``size`` (an input size a method reads) against the backbone's patch size ``p``: a problem naming ``key``."""
    if size[0] % p or size[1] % p:
        return [(key, f"{list(size)} is not a multiple of the backbone's patch size {p} ({arch}); use e.g. "
                      f"{_multiple(tuple(size), p)}")]
    return []


#: Every option a data set reader accepts (transfgu.data.datasets); a reader rejects the ones not its own.
READER_OPTIONS = ("on_missing_label", "granularity", "curated_list", "curated_list_train", "curated_list_val",
                  "with_instances", "coarse", "label_dir")


def _option_problem(exc: TypeError, name: str) -> tuple[str, str]:
    import re

    m = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
    key = m.group(1) if m else "?"
    return (f"data.options.{key}", f"not an option of the {name!r} reader ({exc})")


def _check_data(cfg: Config) -> tuple[list[tuple[str, str]], dict[str, int]]:
    d = cfg.data
    counts: dict[str, int] = {}
    unknown = sorted(set(d.options) - set(READER_OPTIONS))
    if unknown:  # a free-form map: a typo would otherwise crash a reader (TypeError) or be silently ignored
        known = list(READER_OPTIONS)
        return [(f"data.options.{k}", f"unknown reader option (known: {known})") for k in unknown], counts
    if not Path(d.root).is_dir():
        return [("data.root", f"folder not found: {d.root}; point data.root at the data set's top folder")], counts
    problems: list[tuple[str, str]] = []
    if "curated_list" in d.options and d.val_split is not None:
        # One list filtering both splits leaves val empty (no train id is in val2017), and would also shrink the
        # crop, concept and label-bank stages, which the reference runs on the full train split.
        problems.append(("data.options.curated_list", "filters every split; give curated_list_train and "
                         "curated_list_val (one file per split) instead"))
    try:
        dataset_spec(d.name, d.root, **d.options)
    except DatasetError as exc:
        problems.append(("data.root", str(exc)))
    except TypeError as exc:
        problems.append(_option_problem(exc, d.name))
    splits = [("data.train_split", d.train_split)]
    if d.val_split is not None and d.name != "folder":
        splits.append(("data.val_split", d.val_split))
    for key, split in splits:
        try:
            n = len(list_records(d.name, d.root, split, **d.options))
        except DatasetError as exc:
            problems.append((key, f"{split!r}: {exc}"))
            continue
        except TypeError as exc:  # an option another reader takes, e.g. label_dir for camvid
            problems.append(_option_problem(exc, d.name))
            continue
        except ValueError as exc:  # a bad reader option, e.g. on_missing_label
            problems.append(("data.options", str(exc)))
            continue
        if n == 0:
            problems.append((key, f"no images in split {split!r} under {d.root}"))
        counts[split] = n
    return problems, counts


def _check_weights(cfg: Config) -> list[tuple[str, str]]:
    src = cfg.backbone.source
    if src.path is None:
        return []
    p = src.path
    if not p.is_file():
        return [("backbone.weights", f"file not found: {p}; give a DINO .pth/.safetensors file, or 'none' for a "
                                     "random backbone (smoke runs only)")]
    if p.suffix not in WEIGHT_SUFFIXES:
        return [("backbone.weights", f"{p} is not a {'/'.join(WEIGHT_SUFFIXES)} file")]
    if p.stat().st_size == 0:
        return [("backbone.weights", f"{p} is empty")]
    # Read it now (weights-only) and match it to the architecture: a file that is not a checkpoint of this ViT
    # must be refused before the run directory exists, not by the first stage that builds the backbone.
    try:
        build_backbone(cfg.backbone.arch, str(p))
    except WeightsError as exc:
        return [("backbone.weights", " ".join(str(exc).split()))]
    return []


def _check_device(cfg: Config) -> list[tuple[str, str]]:
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        return [("run.device", "cuda was requested but no CUDA device is visible (torch.cuda.is_available() is "
                               "False); set run.device=cpu, or auto to use a GPU only when there is one")]
    return []


def _check_run_root(cfg: Config) -> list[tuple[str, str]]:
    path = Path(cfg.run.root).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        return [("run.root", f"cannot create the run directory under {cfg.run.root} ({path} is not writable)")]
    return []


#: Hard bounds on the sizes that drive memory, whatever the machine: far above the paper's settings (sides of 320 to
#: 640, K <= 171, 2 decoder layers), low enough that no configuration asks the allocator for the impossible.
MAX_SIDE = 8192
MAX_K = 4096
MAX_BATCH = 65536
#: The embedding width of each backbone (a width is all the estimate needs; unknown names count as ViT-B).
EMBED_DIMS = {"vit_test_tiny": 48, "vit_standin": 192, "small": 384, "vits": 384, "base": 768, "large": 1024}
#: Bytes per token and channel live at once in one ViT block at inference (fp32): the residual stream, q/k/v, the
#: attention output and the 4x MLP hidden layer, with slack for the allocator (~10 copies of 4 bytes).
BYTES_PER_TOKEN_CHANNEL = 40
#: Bytes per pixel and output channel of the full-resolution maps (upsampled logits, soft pseudo labels: fp32,
#: with one temporary copy).
BYTES_PER_PIXEL_CHANNEL = 8


def _embed_dim(arch: str) -> int:
    if arch in EMBED_DIMS:
        return EMBED_DIMS[arch]
    return next((d for k, d in EMBED_DIMS.items() if k in arch), 768)


def pass_memory(size: tuple[int, int], batch: int, patch: int, dim: int, channels: int) -> int:
    """Estimated peak bytes of one forward pass of ``batch`` images of ``size`` through the backbone with
    ``channels`` full-resolution output maps: the fp32 input, one block's activations (flash attention keeps the
    attention matrix out of it) and the output maps."""
    h, w = int(size[0]), int(size[1])
    tokens = max(1, h // patch) * max(1, w // patch)
    return batch * (3 * h * w * 4 + BYTES_PER_TOKEN_CHANNEL * tokens * dim + BYTES_PER_PIXEL_CHANNEL * channels * h * w)


def memory_passes(cfg: Config) -> list[tuple[str, str, tuple[int, int], int, int]]:
    """``(size key, batch key, pass size, batch, output channels)`` of every backbone pass the run's method makes
    (its plug-in's ``memory_passes``)."""
    return get_method(cfg.method).memory_passes(cfg)


def _memory_budget(cfg: Config) -> tuple[int, str]:
    """Bytes one pass may use: the GPU's memory for a CUDA run, else the machine's physical memory."""
    if cfg.run.device in ("cuda", "auto") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), "the GPU"
    import psutil

    return int(psutil.virtual_memory().total), "this machine"


def _config_size(cfg: Config, key: str) -> tuple[int, int]:
    section, name = key.split(".")
    v = getattr(getattr(cfg, section), name)
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def check_memory(cfg: Config, p: int) -> list[tuple[str, str]]:
    """Every size that drives memory, bounded outright and by an estimate of the memory it implies (before the run
    directory exists: a 20000 x 20000 input is refused here, not by the allocator an hour in)."""
    problems: list[tuple[str, str]] = []
    budget, where = _memory_budget(cfg)
    dim = _embed_dim(cfg.backbone.arch)
    for size_key, batch_key, size, batch, channels in memory_passes(cfg):
        shown = _config_size(cfg, size_key)
        if max(shown) > MAX_SIDE:
            problems.append((size_key, f"{list(shown)}: each side at most {MAX_SIDE}"))
            continue
        if channels > MAX_K + 1:  # the K output maps (+ background) of the method's passes
            problems.append(("concepts.k_per_pool", f"K = {channels - 1} concepts; at most {MAX_K}"))
            continue
        if batch > MAX_BATCH:
            problems.append((batch_key, f"{batch}: at most {MAX_BATCH}"))
            continue
        need = pass_memory(size, batch, p, dim, channels)
        if need > budget:
            problems.append((size_key, f"{list(shown)} with {batch_key}={batch} needs about {_gib(need)} per pass "
                                       f"(estimate) but {where} has {_gib(budget)}; lower the size or the batch"))
    return problems


SERVICE_TIMEOUT_S = 5.0


def _tcp_problem(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout`` seconds, else why it did not."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def check_mlflow_uri(cfg: Config, timeout: float = SERVICE_TIMEOUT_S) -> list[tuple[str, str]]:
    """An http(s) MLflow tracking server must answer within ``timeout`` s (MLflow's own retries take minutes)."""
    from urllib.parse import urlsplit

    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not cfg.mlflow.enabled or not uri:
        return []
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return []
    port = parts.port or (443 if parts.scheme == "https" else 80)
    why = _tcp_problem(parts.hostname, port, timeout)
    if why is None:
        return []
    return [("mlflow.tracking_uri", f"cannot reach the tracking server {uri} within {timeout:g}s ({why}); start it, "
                                    "fix the URI, or set mlflow.enabled=false")]


def check_ray_address(cfg: Config, timeout: float = SERVICE_TIMEOUT_S) -> list[tuple[str, str]]:
    """A remote Ray address (``host:port`` or ``ray://host:port``) must accept a connection within ``timeout`` s."""
    addr = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not addr or addr in ("auto", "local"):
        return []
    rest = addr.split("://", 1)[1] if "://" in addr else addr
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return [("ray.address", f"{addr!r} is not host:port, ray://host:port, 'auto' or 'local'")]
    why = _tcp_problem(host.strip("[]"), int(port), timeout)
    if why is None:
        return []
    return [("ray.address", f"cannot reach the Ray cluster at {addr} within {timeout:g}s ({why}); start it, fix "
                            "the address, or leave ray.address unset for a local Ray")]


def raise_problems(problems: list[tuple[str, str]]) -> None:
    problems = list(dict.fromkeys(problems))  # the same problem found for two splits is listed once
    if problems:
        # One line (a refusal is one line on stderr): "key: what to change" per problem, separated by "; ".
        text = "; ".join(f"{key}: {' '.join(str(msg).split())}" for key, msg in problems)
        raise PreflightError(f"the run cannot start ({len(problems)} problem(s); nothing was run): {text}")


def preflight(cfg: Config) -> dict[str, int]:
    """Check data, weights, device, output folder and the window layout before any work; returns images per split.

    Raises :class:`PreflightError` listing every problem found (not just the first), each with the key to change.
    """
    problems: list[tuple[str, str]] = []
    problems += _check_weights(cfg)
    problems += _check_device(cfg)
    problems += _check_run_root(cfg)
    method = get_method(cfg.method)
    try:
        problems += method.check_sizes(cfg, patch_size_of(cfg.backbone.arch))
        problems += check_memory(cfg, patch_size_of(cfg.backbone.arch))
    except Exception as exc:  # noqa: BLE001 - an unbuildable backbone is reported, not raised half way
        problems.append(("backbone.arch", f"cannot determine the patch size of {cfg.backbone.arch!r}: {exc}"))
    data_problems, counts = _check_data(cfg)
    problems += data_problems
    if not data_problems:
        with contextlib.suppress(Exception):  # an unknown arch or bad size is already reported above
            problems += method.check_fit(cfg, counts.get(cfg.data.train_split, 0), patch_size_of(cfg.backbone.arch))
    problems += check_mlflow_uri(cfg)
    raise_problems(problems)
    return counts
