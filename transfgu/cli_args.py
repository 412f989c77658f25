"""The argument parsers of the ``transfgu`` subcommands whose modules import torch.

They live here, in a module that imports only the standard library, so that ``transfgu <command> --help`` and a
mistyped option answer at once: :func:`transfgu.cli.main` parses a command's arguments with these parsers before it
imports the module that does the work (which then parses them again with the same parser).
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Ground-truth value that is not scored (the label maps' ignore index; kept equal by tests/unit/test_cli.py).
IGNORE_INDEX = 255
#: How ``transfgu evaluate`` treats a prediction of another size than its ground truth.
RESIZE_POLICIES = ("nearest-pred-to-gt", "error")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (paragraphs kept) and every option's default, unless its help already says it or the
    default is empty (``None``, ``False``, ``()``, ``[]``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or text == argparse.SUPPRESS:
            return text
        if action.default in (None, False, (), [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the project's help layout."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def prediction_parser(prog: str, description: str, checkpoint_help: str, inputs_help: str) -> argparse.ArgumentParser:
    """A parser with the arguments both executors of ``transfgu predict`` take (each adds its own)."""
    p = parser(prog, description)
    p.add_argument("checkpoint", help=checkpoint_help)
    p.add_argument("inputs", nargs="+", help=inputs_help)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--classes", action="store_true",
                   help="write matched class ids (255 = cluster without a class) instead of cluster ids")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="numeric precision of the forward pass; auto: bf16 on a GPU that supports it, else fp32")
    return p


def predict_parser() -> argparse.ArgumentParser:
    """``transfgu predict`` (the one-process executor)."""
    p = prediction_parser(
        "transfgu predict",
        "Label images with a trained checkpoint. Writes <out>/<stem>.png (cluster ids, or class ids with --classes; "
        "uint8, uint16 when there are more than 254 ids) and, with --overlay, <out>/overlay/<stem>.jpg. Unreadable "
        "images are skipped and listed in <out>/errors.jsonl.",
        "a run directory or its model/ checkpoint directory",
        "image files, folders (searched recursively) or text files listing image paths",
    )
    p.add_argument("--overlay", action="store_true", help="also write colour overlays as JPEG")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--weights", default=None, help="override the backbone weights source of the checkpoint")
    p.add_argument("--ray", action="store_true",
                   help="run on Ray Data instead (CPU decoding ahead of GPU actors, Parquet ledger, resumable; "
                   "globs and s3:// prefixes as inputs): see `transfgu predict --ray --help`")
    return p


def predict_ray_parser() -> argparse.ArgumentParser:
    """``transfgu predict --ray`` (the Ray Data executor)."""
    p = prediction_parser(
        "transfgu predict --ray",
        "Label images on Ray Data: CPU decoding tasks ahead of an actor pool (one GPU per actor when the cluster has "
        "GPUs). Writes <out>/<stem>.png and a Parquet ledger <out>/predictions/*.parquet (stem, source, label_png, "
        "height, width, pixels per id, unmatched, error); a re-run only does what the ledger lacks.",
        "a run directory, its model/ folder, or an MLflow model URI (runs:/<id>/model, models:/<name>/<version>)",
        "folders, image files, list files, globs, or URIs (s3://bucket/prefix/)",
    )
    p.add_argument("--ray", action="store_true", help="(accepted: this is the Ray executor)")
    p.add_argument("--format", default="png,parquet",
                   help="png,parquet (default) or parquet: the Parquet ledger is always written")
    p.add_argument("--actors", default="1,4", help="min,max actors of the prediction pool (default 1,4)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved by each prediction actor")
    p.add_argument("--decode-cpus", type=float, default=0.5, help="CPUs per decoding task")
    p.add_argument("--gpu", choices=("auto", "true", "false"), default="auto",
                   help="one GPU per actor; auto: when the cluster has GPUs")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started here (default: all)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for runs:/ and models:/ checkpoints (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--overlay", action="store_true", help=argparse.SUPPRESS)
    return p


def export_parser() -> argparse.ArgumentParser:
    """``transfgu export``."""
    p = parser("transfgu export",
               "Export backbone + decoder of a trained checkpoint as one TorchScript file taking normalised "
               "(B, 3, H, W) images at the eval size.")
    p.add_argument("checkpoint", help="a run directory or its model/ checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="output file, e.g. model.pt")
    p.add_argument("--format", choices=("torchscript", "export", "onnx"), default="torchscript",
                   help="torchscript (.pt, default) or export (torch.export ExportedProgram, .pt2); onnx is not "
                   "supported")
    p.add_argument("--output", choices=("labels", "logits"), default="labels",
                   help="what the exported module returns: per-pixel labels, or the decoder's logits")
    p.add_argument("--classes", action="store_true", help="labels are matched class ids instead of cluster ids")
    p.add_argument("--weights", default=None, help="override the backbone weights source of the checkpoint")
    return p


def import_decoder_parser() -> argparse.ArgumentParser:
    """``transfgu import-decoder``."""
    p = parser("transfgu import-decoder",
               "Make a prediction checkpoint from a decoder checkpoint released by the TransFGU authors (the decoder "
               "only; the frozen DINO ViT-S/8 is given with --weights). See docs/architecture.md.\n\n"
               "example:\n  transfgu import-decoder cocostuff27.pt --config conf/coco_stuff27.yaml "
               "--weights dino_deitsmall8_pretrain.pth --out runs/authors_coco27/model --evaluate")
    p.add_argument("checkpoint", help="the authors' decoder checkpoint (.pt/.pth)")
    p.add_argument("--config", "-c", required=True, help="preset of the data set it was trained on (conf/*.yaml)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--weights", default=None, help="DINO ViT-S/8 weights (default: the preset's backbone.weights)")
    p.add_argument("--evaluate", action="store_true", help="score it on the preset's validation split")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (e.g. data.root=...)")
    return p


def evaluate_parser() -> argparse.ArgumentParser:
    """``transfgu evaluate``."""
    p = parser("transfgu evaluate",
               "Score predicted cluster-id PNGs against ground truth: one confusion matrix over the whole split, "
               "cluster->class matching, mIoU and pixel accuracy. Predictions of another size than the ground truth "
               "are resized to it with nearest neighbour.")
    p.add_argument("pred_dir", type=Path, help="folder of predicted cluster-id PNGs (matched by file stem)")
    src = p.add_argument_group("ground truth (give --gt-dir, or --dataset with --split and --root)")
    src.add_argument("--gt-dir", type=Path, help="folder of ground-truth class-id PNGs")
    src.add_argument("--dataset", help="data set name, e.g. coco_stuff, pascal_voc, cityscapes, lip, camvid, folder")
    src.add_argument("--split", help="split of --dataset, e.g. val")
    src.add_argument("--root", type=Path, help="root folder of --dataset")
    src.add_argument("--granularity", type=int, help="COCO 27/171/80 or LIP 19/16/5")
    src.add_argument("--coarse", action="store_true", help="ccp: the 15 coarse classes")
    src.add_argument("--curated-list", type=Path, help="coco_stuff: file of image ids to keep")
    p.add_argument("--n-classes", type=int, help="number of GT classes (default: from names / data set / GT)")
    p.add_argument("--class-names", help="classes.txt file or comma-separated names")
    p.add_argument("--n-clusters", type=int, help="number of predicted clusters (default: max id + 1)")
    p.add_argument("--ignore-index", type=int, default=IGNORE_INDEX, help="GT value not scored (default 255)")
    p.add_argument("--overcluster", choices=("hungarian", "majority"), default="hungarian",
                   help="cluster->class matching when there are more clusters than classes: one-to-one "
                   "(Hungarian) or each cluster to its majority class")
    p.add_argument("--resize", choices=RESIZE_POLICIES, default="nearest-pred-to-gt",
                   help="a prediction of another size than its ground truth: resize it (nearest) or refuse")
    p.add_argument("--allow-missing", action="store_true", help="leave out GT images without a prediction")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    return p


def report_parser() -> argparse.ArgumentParser:
    """``transfgu report``."""
    p = parser("transfgu report", "Write <RUN_DIR>/report/index.html (self-contained) and its PNGs.")
    p.add_argument("run_dir", type=Path, help="a run directory (runs/<name>)")
    p.add_argument("--per-concept", type=int, default=8, help="crops per concept in the galleries")
    p.add_argument("--cam-images", type=int, default=3, help="images with CAM panels")
    p.add_argument("--pred-images", type=int, default=4,
                   help="validation images with predictions: the best, the worst and ranks between")
    p.add_argument("--pred-candidates", type=int, default=16,
                   help="images spread over the split that are scored to choose them")
    p.add_argument("--device", default=None, help="device for the prediction panels (default: CUDA when present)")
    return p
