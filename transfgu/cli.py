"""The ``transfgu`` command: ``run``, ``evaluate``, ``predict``, ``report``, ``export``, ``clean``.

``transfgu run`` runs every stage in this process (the one-process executor); ``transfgu run --ray`` runs the same
stages on a Ray cluster (joined at ``ray.address`` / ``RAY_ADDRESS``, else a private local one). The scripts in
``ray_jobs/`` are the same command for ``ray job submit`` (docs/architecture.md).

Subcommands import their module lazily so ``transfgu --help`` stays fast and a missing optional piece only affects
its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transfgu import __version__
from transfgu.cli_args import HelpFormatter
from transfgu.config import Config, ConfigError, load_config
from transfgu.layout import RunLayout
from transfgu.logs import setup_logging
from transfgu.tracking import resolve_tracking_uri, ui_lines

SUBCOMMANDS = {
    "run": ("transfgu.cli", "run_main", "run every stage of the method (--ray: on a Ray cluster)"),
    "evaluate": ("transfgu.evaluate", "main", "score predicted label PNGs against ground truth"),
    "predict": ("transfgu.predict", "main", "label new images with a trained checkpoint"),
    "report": ("transfgu.report", "main", "write the visual HTML report of a run directory"),
    "export": ("transfgu.export", "main", "export a trained model (backbone + decoder) for deployment"),
    "import-decoder": ("transfgu.import_reference", "main", "make a model from an authors' decoder checkpoint"),
    "clean": ("transfgu.clean", "main", "list (--yes: delete) the outputs a run set aside under _stale/"),
}

#: Parsers (in :mod:`transfgu.cli_args`, standard library only) of the subcommands whose module imports torch: the
#: arguments are checked, and ``--help`` answered, before that import.
FAST_PARSERS = {"predict": "predict_parser", "export": "export_parser", "import-decoder": "import_decoder_parser",
                "evaluate": "evaluate_parser", "report": "report_parser"}


def run_parser(prog: str, description: str | None, ray_flag: bool = True) -> argparse.ArgumentParser:
    """The arguments of ``transfgu run`` and of the ``ray_jobs/`` scripts."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--config", "-c", default=None, help="YAML preset (see conf/); default: the built-in defaults")
    if ray_flag:
        p.add_argument("--ray", action="store_true", help="run the stages on a Ray cluster (the Ray executor)")
        p.add_argument("--only", nargs="*", default=None, metavar="STAGE",
                       help="run only these stages (default: every stage that is not done)")
    p.add_argument("--force", nargs="*", default=(), metavar="STAGE",
                   help="re-run these stages even if done (default: none)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show every library's log lines (faiss, Ray, MLflow); quiet by default")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=2 ray.num_workers=2")
    return p


def parse_run_args(
    argv: Sequence[str] | None, prog: str, description: str | None, ray_flag: bool = True,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Config, argparse.Namespace]:
    """Parse the arguments and load the config; a bad key or value raises :class:`ConfigError` before any work."""
    p = run_parser(prog, description, ray_flag)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    _split_overrides(args)
    cfg = load_config(args.config, args.overrides)
    check_stage_names(cfg, getattr(args, "only", None), "--only")
    check_stage_names(cfg, args.force, "--force")
    setup_logging(verbose=args.verbose)
    return cfg, args


def _split_overrides(args: argparse.Namespace) -> None:
    """Move ``key=value`` words that argparse gave to ``--only``/``--force`` (both take any number of words) back to
    the overrides: a stage name never contains ``=``, so ``--only extract run.name=a`` overrides ``run.name``."""
    for flag in ("only", "force"):
        words = getattr(args, flag, None)
        if words:
            setattr(args, flag, [w for w in words if "=" not in w])
            args.overrides = [*args.overrides, *(w for w in words if "=" in w)]


def check_stage_names(cfg: Config, names: Sequence[str] | None, flag: str) -> None:
    """Refuse stage names that ``cfg.method`` does not have (a typo would otherwise run nothing, or everything)."""
    if names is None:
        return
    from transfgu.methods import get_method  # the method's modules: only once the arguments parsed

    valid = [*get_method(cfg.method).stage_names, *(("report",) if flag == "--only" else ())]
    if flag == "--only" and not names:
        raise ConfigError(f"--only needs at least one stage name (valid for method {cfg.method}: {', '.join(valid)})")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(f"{flag}: unknown stage {', '.join(map(repr, unknown))} for method {cfg.method}; "
                          f"valid stages: {', '.join(valid)}")


def refusal_types() -> tuple[type[BaseException], ...]:
    """The errors that refuse a run (bad config, data, weights, paths, a locked or inconsistent run directory), as
    opposed to a bug: the CLI prints them as one line and exits 2 (:func:`refuse`)."""
    from transfgu.data.datasets import DatasetError
    from transfgu.errors import ErrorBudgetExceeded
    from transfgu.integrity import IntegrityError
    from transfgu.models.backbone import WeightsError
    from transfgu.paths import PathEscapeError
    from transfgu.schemas import FileSchemaError

    return (ConfigError, DatasetError, ErrorBudgetExceeded, FileSchemaError, IntegrityError, PathEscapeError,
            WeightsError)


def refuse(exc: BaseException, verbose: bool = False) -> int:
    """Print a refusal as one ``error:`` line on stderr (the traceback first with ``--verbose``); returns 2."""
    if verbose:
        import traceback

        traceback.print_exception(exc)
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    return 2


def execute(cfg: Config, ray: bool, only: Sequence[str] | None = None, force: Sequence[str] = (),
            verbose: bool = False) -> int:
    """Run the pipeline with the chosen executor, then print a short summary; 2 (one line on stderr) when the run
    is refused: by preflight before any work, or by a stage that finds its inputs unusable."""
    try:
        if ray:
            from transfgu.distributed.pipeline import run_pipeline_ray

            manifest: dict[str, Any] = run_pipeline_ray(cfg, only=only, force=force)
        else:
            from transfgu.pipeline import run_pipeline

            manifest = run_pipeline(cfg, only=only, force=force)
    except refusal_types() as exc:  # preflight (data, weights, device, window layout), the run lock, integrity
        return refuse(exc, verbose)
    for name, rec in manifest["stages"].items():
        extra = rec.get("extra", {})
        print(f"{name:12} {rec.get('status', '?'):8} rows={rec.get('rows')} seconds={extra.get('seconds')}")
    print_outputs(cfg)
    return 0


def run_main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg, args = parse_run_args(argv, "transfgu run", SUBCOMMANDS["run"][2])
    except ConfigError as exc:
        return refuse(exc, verbose="--verbose" in (argv or sys.argv) or "-v" in (argv or sys.argv))
    return execute(cfg, ray=args.ray, only=args.only, force=args.force, verbose=args.verbose)


def print_outputs(cfg: Config) -> None:
    """Where the run's metrics, report, model, manifest and MLflow store are."""
    layout = RunLayout(Path(cfg.run_dir).resolve())
    print(f"run directory:  {layout.root}")
    for label, path in (("metrics:", layout.metrics), ("report:", layout.report / "index.html"),
                        ("model:", layout.model), ("manifest:", layout.manifest)):
        if path.exists():
            print(f"{label:15} {path}")
    if cfg.mlflow.enabled:
        uri = resolve_tracking_uri(cfg)
        print(f"{'mlflow store:':15} {uri}")
        for label, text in ui_lines(cfg):
            print(f"{label:15} {text}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"transfgu {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: transfgu [--version] {" + ",".join(SUBCOMMANDS) + "} ...\n")
        for name, (_, _, doc) in SUBCOMMANDS.items():
            print(f"  {name:14} {doc}")
        print("\n`transfgu <command> --help` describes each command.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    if name in FAST_PARSERS:  # --help and bad arguments answered before the module (and torch) is imported
        from transfgu import cli_args

        builder = "predict_ray_parser" if name == "predict" and "--ray" in rest else FAST_PARSERS[name]
        getattr(cli_args, builder)().parse_args(rest)
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
