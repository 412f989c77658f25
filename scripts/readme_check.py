#!/usr/bin/env python3
"""Run the README's shell blocks as written, so the documented commands cannot rot.

Every fenced ``bash`` block in README.md carries a marker on the line just above it (an HTML comment, invisible on
GitHub) that says how it is checked:

- ``<!-- check: tests -->``  the README's test command; ``.ci/run`` runs it with ``--only tests``.
- ``<!-- check: ci -->``     cheap; run by ``tests/unit/test_environment.py`` and by ``--level ci``.
- ``<!-- check: slow -->``   minutes (the demo, the cluster example); run in document order by ``--level slow``
  (``.ci/run`` does, after the tests).
- ``<!-- check: skip <why> -->``  cannot run on a machine without the named resource (an AWS account, DINO weights,
  a COCO download); the reason is printed, never silently dropped.

Blocks run with ``bash -euo pipefail``, from the repository root, in the order they appear, so a block may use what an
earlier block wrote (``runs/demo_camvid``), with the project's ``.venv`` active once the quick start has made it (as
in the reader's shell). Only the standard library is used: it runs before any venv exists.

    python3 scripts/readme_check.py --list
    python3 scripts/readme_check.py --only tests
    python3 scripts/readme_check.py --level slow
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("tests", "ci", "slow", "skip")
_MARKER = re.compile(r"<!--\s*check:\s*(\w+)\s*(.*?)\s*-->")
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced shell block of the README and how it is checked."""

    line: int  # 1-based line of the opening fence
    kind: str  # one of KINDS
    reason: str  # for "skip"
    code: str


def parse(text: str) -> list[Block]:
    """Every ``bash``/``sh`` block with its marker; raises ValueError naming the line of an unmarked block."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            raise ValueError(f"README.md:{start + 1}: unclosed code fence")
        if lang in ("bash", "sh", "shell"):
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            mk = _MARKER.search(prev)
            if not mk:
                raise ValueError(f"README.md:{start + 1}: shell block without a '<!-- check: ... -->' marker above it")
            kind, reason = mk.group(1), mk.group(2)
            if kind not in KINDS:
                raise ValueError(f"README.md:{start + 1}: unknown check kind {kind!r} (one of {KINDS})")
            if kind == "skip" and not reason:
                raise ValueError(f"README.md:{start + 1}: 'skip' needs a reason")
            blocks.append(Block(start + 1, kind, reason, "\n".join(lines[start + 1 : j]) + "\n"))
        i = j + 1
    return blocks


def run_block(block: Block, timeout: float, env: dict[str, str] | None = None, cwd: Path = REPO) -> int:
    """Run one block with bash (errexit, pipefail) from ``cwd`` (the README's folder); return its exit status."""
    print(f"--- README.md:{block.line} [{block.kind}]\n{block.code.rstrip()}", flush=True)
    t0 = time.monotonic()
    try:
        rc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, timeout=timeout,
                            env=env).returncode
    except subprocess.TimeoutExpired:
        print(f"--- README.md:{block.line}: timed out after {timeout:.0f} s", flush=True)
        return 124
    print(f"--- README.md:{block.line}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
    return rc


def _shell_env() -> dict[str, str]:
    """The environment of a reader's shell after the quick start: the project's venv active when it exists."""
    env = dict(os.environ)
    venv = REPO / ".venv"
    if (venv / "bin" / "python").exists():
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--list", action="store_true", help="list the blocks and their markers")
    g.add_argument("--only", choices=KINDS[:3], help="run only the blocks of this kind")
    g.add_argument("--level", choices=("ci", "slow"), help="ci: the cheap blocks; slow: cheap and slow, in order")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per block")
    args = ap.parse_args(argv)
    blocks = parse(args.readme.read_text())
    if args.list or not (args.only or args.level):
        for b in blocks:
            print(f"README.md:{b.line:<4} {b.kind:<5} {b.reason or b.code.splitlines()[0][:90]}")
        return 0
    kinds = {args.only} if args.only else ({"ci"} if args.level == "ci" else {"ci", "slow"})
    failed = []
    for b in blocks:
        if b.kind == "skip" and args.level:
            print(f"--- README.md:{b.line}: skipped: {b.reason}", flush=True)
        elif b.kind in kinds and run_block(b, args.timeout, _shell_env(), args.readme.resolve().parent) != 0:
            failed.append(b.line)
            break  # later blocks may depend on this one
    ran = sum(b.kind in kinds for b in blocks)
    print(f"README check: {ran} block(s) of kind {sorted(kinds)}, failed at line(s) {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
