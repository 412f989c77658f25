"""Shared helpers of the benchmark scripts: arguments, machine description, timing, FLOP counts, JSON + tables.

Every bench module exposes ``main(argv: list[str] | None = None) -> dict`` and is run as
``python -m bench.<name> [--quick] [--device cpu|cuda] [--threads N] [--out results.json]``. ``main`` prints a
human table and returns (and writes with ``--out``) one JSON document of the shape::

    {"bench": str, "quick": bool, "command": str, "machine": {...}, "config": {...},
     "results": {...}, "comparisons": [{"name", "baseline", "candidate", "unit", "value", "target",
                                        "target_met", "measured", ...}], "notes": [...]}

``comparisons`` is what BENCHMARKS.md quotes: two things measured in the same run and their ratio. A figure
that was not measured directly (an extrapolation, an analytic count) says so in ``measured`` / ``notes``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# Arguments and setup
# ----------------------------------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and the tiny model (CI smoke mode)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="compute device")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all cores of the process)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions (median is reported)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Threads and device; CUDA asked for but absent is an error (no silent CPU figures labelled GPU)."""
    # Quick mode is a CI smoke run next to other jobs: one thread avoids OpenMP stalls on a busy machine.
    threads = args.threads or (1 if args.quick else len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    with contextlib.suppress(ImportError, AttributeError):
        import faiss

        faiss.omp_set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch sees no CUDA device")
    torch.manual_seed(0)
    return torch.device(args.device)


def quiet_backbone_warnings() -> None:
    # build_backbone("...", "none") warns loudly about random weights; speed does not depend on the weights.
    import logging

    logging.getLogger("transfgu.models.backbone").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return []


def _mem_total_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell two result files' machines apart."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "mem_total_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(ImportError):
        import numpy

        info["numpy"] = numpy.__version__
    with contextlib.suppress(ImportError):
        import faiss

        info["faiss"] = faiss.__version__
    with contextlib.suppress(ImportError):
        import pyarrow

        info["pyarrow"] = pyarrow.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 1024**3, 1),
            "cuda": torch.version.cuda,
        }
    return info


# ----------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, repeat: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Wall seconds of ``fn()``: median, min, max and every run (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    runs = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs_s": runs}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    with contextlib.suppress(OSError, ValueError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1024**2
    return float("nan")


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeat: int = 3) -> dict[str, Any]:
    """Achieved FLOP/s of one large square ``torch.matmul`` (2 n^3 FLOPs): this machine's practical peak."""
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    t = timeit(lambda: torch.matmul(a, b), device, repeat=repeat, warmup=1)
    flops = 2.0 * n**3
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "flops": flops,
        **t,
        "flops_per_s": flops / t["min_s"],
        "flops_per_s_median": flops / t["median_s"],
    }


# ----------------------------------------------------------------------------------------------------------
# Analytic FLOP counts
# ----------------------------------------------------------------------------------------------------------
def vit_forward_flops(
    height: int,
    width: int,
    patch: int = 8,
    dim: int = 384,
    depth: int = 12,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
    prefix_tokens: int = 1,
) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one ViT forward pass on one ``height x width`` image.

    With ``n = h*w`` patches, ``N = n + prefix`` tokens, width ``D``, MLP ratio ``r`` and ``L`` blocks::

        patch embedding   2 * n * (C * p^2) * D
        per block         2 * N * D * 3D        (qkv)
                        + 2 * N * N * D         (q k^T, all heads together)
                        + 2 * N * N * D         (attention @ v)
                        + 2 * N * D * D         (output projection)
                        + 2 * 2 * N * D * rD    (two MLP matmuls)
                        = (8 + 4r) N D^2 + 4 N^2 D
        total             patch embedding + L * per block

    Softmax, LayerNorm, GELU and residual adds are O(N D) and left out (< 1 % at these sizes). ViT-S/8 at
    320x320 (N = 1601): 115.5 GFLOP, i.e. 57.6 GMAC (one multiply-accumulate = 2 FLOP).
    """
    n = (height // patch) * (width // patch)
    tokens = n + prefix_tokens
    embed = 2.0 * n * in_chans * patch * patch * dim
    per_block = (8.0 + 4.0 * mlp_ratio) * tokens * dim * dim + 4.0 * tokens * tokens * dim
    return {
        "tokens": tokens,
        "patch_embed": embed,
        "per_block": per_block,
        "total": embed + depth * per_block,
    }


def backbone_flops(backbone: torch.nn.Module, height: int, width: int) -> float:
    vit = backbone.vit
    blk = vit.blocks[0]
    mlp_ratio = blk.mlp.fc1.out_features / backbone.embed_dim
    return vit_forward_flops(
        height,
        width,
        patch=backbone.patch_size,
        dim=backbone.embed_dim,
        depth=len(vit.blocks),
        mlp_ratio=mlp_ratio,
        prefix_tokens=backbone.num_prefix_tokens,
    )["total"]


# ----------------------------------------------------------------------------------------------------------
# Result documents
# ----------------------------------------------------------------------------------------------------------
def comparison(
    name: str,
    baseline: str,
    candidate: str,
    value: float,
    unit: str,
    target: str | None = None,
    target_met: bool | None = None,
    measured: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """One line of the summary: ``value`` compares ``candidate`` with ``baseline`` (e.g. a speedup)."""
    return {
        "name": name,
        "baseline": baseline,
        "candidate": candidate,
        "value": float(value),
        "unit": unit,
        "target": target,
        "target_met": target_met,
        "measured": measured,
        **extra,
    }


def new_result(
    name: str, args: argparse.Namespace, device: torch.device, config: dict[str, Any]
) -> dict[str, Any]:
    argv = getattr(args, "_argv", None)
    command = "python -m bench." + name + (" " + " ".join(argv) if argv else "")
    return {
        "bench": name,
        "quick": bool(args.quick),
        "command": command,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "config": config,
        "results": {},
        "comparisons": [],
        "notes": [],
    }


def finish(result: dict[str, Any], args: argparse.Namespace, t_start: float) -> dict[str, Any]:
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    if result["quick"]:
        result["notes"].append("quick mode: tiny sizes for CI; targets are only judged on full-size runs")
    print_table(result)
    if args.out is not None:
        write_result(args.out, result)
        print(f"wrote {args.out}")
    return result


def write_result(out: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark's result as indented JSON to ``out`` (its folder made), or nothing when ``out`` is None."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e6:
            return f"{x:.4g}"
        return f"{x:.3e}"
    return str(x)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(h) for h in header]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def print_table(result: dict[str, Any], file: Any = None) -> None:
    file = file or sys.stdout
    m = result["machine"]
    print(
        f"\n== bench.{result['bench']} ({'quick' if result['quick'] else 'full'}) on {m['cpu_model']}, "
        f"{m['cpus_available']} cpus, torch {m['torch']} x{m['torch_threads']} threads, device {m['device']}",
        file=file,
    )
    rows = [
        (
            c["name"],
            c["candidate"],
            c["baseline"],
            c["value"],
            c["unit"],
            c["target"] or "-",
            "-" if c["target_met"] is None else ("yes" if c["target_met"] else "NO"),
            "yes" if c["measured"] else "no",
        )
        for c in result["comparisons"]
    ]
    print(
        table(rows, ["comparison", "candidate", "baseline", "value", "unit", "target", "met", "measured"]),
        file=file,
    )
    for n in result["notes"]:
        print(f"note: {n}", file=file)


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - t0


def start(
    parser: argparse.ArgumentParser, argv: list[str] | None, model: bool = True
) -> tuple[argparse.Namespace, torch.device, float]:
    """The preamble of every bench's ``main``: parse, set threads and device, start the clock.

    ``model=True`` also quiets the random-backbone warning and fills ``args.arch`` (when the bench has ``--arch``)
    with its default: the tiny test ViT in quick mode, ViT-S/8 otherwise.
    """
    args = parse(parser, argv)
    device = setup(args)
    if model:
        quiet_backbone_warnings()
        if hasattr(args, "arch") and not args.arch:
            args.arch = "vit_test_tiny" if args.quick else "vit_small_patch8"
    return args, device, time.perf_counter()


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    return args


def shared_data_dir() -> Path:
    """``../shared/data`` (or ``$TRANSFGU_SHARED_DATA``), the same rule as tests/helpers/data.py."""
    return Path(os.environ.get("TRANSFGU_SHARED_DATA", REPO.parent / "shared" / "data"))
