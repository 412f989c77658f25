"""Export a trained checkpoint (frozen backbone + decoder) as one self-contained file: ``transfgu export``.

Formats:

* ``torchscript`` (default, ``.pt``): ``torch.jit.trace`` at the checkpoint's eval size, wrapped in a small
  scripted module that checks the input size. Loads with ``torch.jit.load`` in Python or in C++ (libtorch) with no
  transfgu code. torch >= 2.9 marks TorchScript as deprecated (its FutureWarnings are silenced here).
* ``export`` (``.pt2``): a ``torch.export`` ExportedProgram with a dynamic batch dimension, the format PyTorch now
  recommends (AOTInductor, ExecuTorch); load with ``torch.export.load(path).module()``.
* ONNX is not offered: neither ``onnx`` nor ``onnxruntime`` is a dependency of the project, and without them an
  ONNX file could not be checked against the eager model.

The exported module takes an ImageNet-normalised float32 ``(B, 3, H, W)`` batch at exactly the eval size
``(H, W)`` (any batch size) and returns, depending on ``output``:

* ``"labels"`` (default): int64 ``(B, H, W)`` cluster ids, or class ids with ``classes=True`` (the evaluation's
  Hungarian matching baked in; -1 = unmatched cluster);
* ``"logits"``: float32 ``(B, C, H, W)``, the decoder logits upsampled bilinearly to the input size.

What a caller needs to prepare inputs (eval size, mean/std, class names, whether the backbone was pretrained) is
stored in the file as the extra file ``transfgu.json``; :func:`load_exported` returns it with the module.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfgu.cli_args import export_parser
from transfgu.models.backbone import IMAGENET_MEAN, IMAGENET_STD
from transfgu.predict import Predictor, load

__all__ = ["ExportedModel", "export_program", "export_torchscript", "load_exported", "main"]

EXTRA_FILE = "transfgu.json"


class ExportedModel(nn.Module):
    """Backbone + decoder as one module: normalised images -> labels or logits at the input size."""

    def __init__(
        self, backbone: nn.Module, decoder: nn.Module, output: str = "labels", mapping: Tensor | None = None
    ) -> None:
        super().__init__()
        if output not in ("labels", "logits"):
            raise ValueError(f"output must be 'labels' or 'logits', got {output!r}")
        self.backbone = backbone
        self.decoder = decoder
        self.output = output
        self.map_classes = mapping is not None
        self.register_buffer("mapping", mapping if mapping is not None else torch.zeros(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        logits, _ = self.decoder(feats.patch, feats.grid)
        logits = F.interpolate(logits.float(), size=(x.shape[-2], x.shape[-1]), mode="bilinear",
                               align_corners=False)
        if self.output == "logits":
            return logits
        labels = logits.argmax(dim=1)
        return self.mapping[labels] if self.map_classes else labels


class _SizeChecked(nn.Module):
    """Scripted guard around the traced graph: a trace is only valid at the size it was traced at."""

    def __init__(self, inner: torch.jit.ScriptModule, height: int, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.height = height
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.height or x.shape[3] != self.width:
            raise RuntimeError(
                "expected a normalised (B, 3, " + str(self.height) + ", " + str(self.width) + ") float batch, got "
                + str(list(x.shape))
            )
        return self.inner(x)


def _prepare(predictor: Predictor, output: str, classes: bool) -> tuple[ExportedModel, dict[str, Any]]:
    if classes and output != "labels":
        raise ValueError("classes=True needs output='labels'")
    mapping = None
    if classes:
        if predictor.cluster_to_class is None:
            raise ValueError("the checkpoint has no cluster -> class matching (evaluate the run first)")
        mapping = torch.as_tensor(predictor.cluster_to_class, dtype=torch.long)
    hh, ww = predictor.eval_size
    ps = predictor.backbone.patch_size
    if hh % ps or ww % ps:
        raise ValueError(f"eval size {hh}x{ww} is not a multiple of the patch size {ps}; export needs one")
    # Copies, so exporting leaves the predictor (maybe on a GPU, maybe in use) as it was.
    backbone = copy.deepcopy(predictor.backbone).to("cpu").float().eval()
    decoder = copy.deepcopy(predictor.decoder).to("cpu").float().eval()
    model = ExportedModel(backbone, decoder, output, mapping).eval()
    info = {
        "format": "transfgu-export/1",
        "input": {"shape": ["B", 3, hh, ww], "dtype": "float32", "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD), "note": "RGB in [0, 1], then (x - mean) / std"},
        "output": output,
        "ids": "classes" if classes else "clusters",
        "class_names": predictor.class_names,
        "cluster_to_class": None if predictor.cluster_to_class is None else predictor.cluster_to_class.tolist(),
        "n_clusters": predictor.n_clusters,
        "backbone": predictor.meta.get("backbone"),
        "pretrained": predictor.pretrained,
    }
    return model, info


def _example(predictor: Predictor, batch: int = 2) -> Tensor:
    hh, ww = predictor.eval_size
    return torch.randn(batch, 3, hh, ww, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.jit is deprecated (FutureWarning); the backbone's Python-side shape checks become trace constants
    (TracerWarning), which is fine because the wrapper re-checks the input size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def export_torchscript(
    predictor: Predictor, path: str | Path, output: str = "labels", classes: bool = False
) -> Path:
    """Trace ``predictor``'s backbone + decoder on CPU in float32 and save it as TorchScript at ``path``.

    Args:
        output: ``"labels"`` or ``"logits"`` (see the module docstring).
        classes: map cluster ids to class ids with the checkpoint's matching (``output="labels"`` only).
    """
    model, info = _prepare(predictor, output, classes)
    hh, ww = predictor.eval_size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a left-over (or planted link) is replaced, never written through
    extra = {EXTRA_FILE: json.dumps({**info, "format_kind": "torchscript"})}
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, _example(predictor), check_trace=False)
        scripted = torch.jit.script(_SizeChecked(traced, hh, ww))
        torch.jit.save(scripted, str(tmp), _extra_files=extra)
    tmp.replace(path)
    return path


def export_program(predictor: Predictor, path: str | Path, output: str = "labels", classes: bool = False) -> Path:
    """``torch.export`` the model (dynamic batch, fixed eval size) and save the ExportedProgram (``.pt2``)."""
    model, info = _prepare(predictor, output, classes)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (_example(predictor),), dynamic_shapes={"x": {0: batch}})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a left-over (or planted link) is replaced, never written through
    torch.export.save(program, str(tmp), extra_files={EXTRA_FILE: json.dumps({**info, "format_kind": "export"})})
    tmp.replace(path)
    return path


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """Load a file written by :func:`export_torchscript` or :func:`export_program` and its ``transfgu.json``.

    Returns a callable module (eval mode) and the description dict. ``.pt2`` files are ExportedPrograms.
    """
    extra: dict[str, Any] = {EXTRA_FILE: ""}
    if Path(path).suffix == ".pt2":
        program = torch.export.load(str(path), extra_files=extra)
        module = program.module().to(device)
    else:
        with _quiet():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra).eval()
    return module, json.loads(extra[EXTRA_FILE] or "{}")


def main(argv: Sequence[str] | None = None) -> int:
    p = export_parser()
    args = p.parse_args(argv)
    if args.format == "onnx":
        print("error: ONNX export is not supported (onnx/onnxruntime are not dependencies of transfgu); use "
              "--format torchscript", file=sys.stderr)
        return 2
    if args.out.is_symlink() or args.out.is_dir():
        print(f"error: --out {args.out} is a {'symbolic link' if args.out.is_symlink() else 'folder'}; give the path "
              "of the file to write (export never writes through a link)", file=sys.stderr)
        return 2
    try:
        predictor = load(args.checkpoint, device="cpu", weights=args.weights, precision="fp32")
        fn = export_torchscript if args.format == "torchscript" else export_program
        path = fn(predictor, args.out, output=args.output, classes=args.classes)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hh, ww = predictor.eval_size
    kind = "TorchScript" if args.format == "torchscript" else "torch.export"
    print(f"{kind} model written to {path.resolve()}: input normalised (B, 3, {hh}, {ww}) float32, "
          f"output {args.output}" + (" (class ids)" if args.classes else ""))
    if not predictor.pretrained:
        print("warning: the checkpoint's backbone is RANDOM (no pretrained weights)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
