"""Markdown tables of benchmark result files (the figures of BENCHMARKS.md come from this, not by hand).

``python -m bench.report bench/results/cpu`` prints, per ``<bench>.json`` in the directory, the command, the
machine and its load average at start/end, and every comparison with its target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import fmt
from bench.run_all import BENCHES


def section(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"### bench.{r['bench']}",
        "",
        f"`{r['command']}` ({'quick' if r['quick'] else 'full'} mode, {r.get('wall_s', 0):.0f} s wall, "
        f"started {r.get('started_at', '?')})",
        "",
        f"Machine: {m['cpu_model']} ({', '.join(m.get('cpu_flags', []))}), {m['cpus_available']} cpus, "
        f"{m.get('mem_total_gib')} GiB, torch {m['torch']} with {m['torch_threads']} threads, device "
        f"{m['device']}; load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}.",
        "",
        "| comparison | candidate | baseline | value | unit | target | met | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in r["comparisons"]:
        met = "-" if c["target_met"] is None else ("**yes**" if c["target_met"] else "**NO**")
        lines.append(
            f"| {c['name']} | {c['candidate']} | {c['baseline']} | {fmt(c['value'])} | {c['unit']} | "
            f"{c['target'] or '-'} | {met} | {'yes' if c['measured'] else '**no**'} |"
        )
    lines.append("")
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results_dir", type=Path)
    args = p.parse_args(argv)
    for name in BENCHES:
        path = args.results_dir / f"{name}.json"
        if path.is_file():
            print(section(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
