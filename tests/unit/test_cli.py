"""The ``transfgu`` command line as a user meets it: ``--version``, and every subcommand's ``--help`` answers fast
(no torch import before the arguments are parsed), documents every option, and cites nothing a user does not have
(issue numbers, the maintainers' reference notes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from helpers.data import REPO

from transfgu import __version__
from transfgu.cli import SUBCOMMANDS

HELPS = [[name] for name in SUBCOMMANDS] + [["predict", "--ray"]]
INTERNAL = re.compile(r"issue\s*\d+|item\s+\d+|reference_method|\.\./shared|field_anchors", re.IGNORECASE)

PROBE = """
import contextlib, io, json, sys
from transfgu.cli import main
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "help": out.getvalue(),
                  "heavy": sorted(m for m in ("torch", "ray", "mlflow", "timm") if m in sys.modules)}))
"""


def _cli(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", HELPS, ids=" ".join)
def test_help_is_fast_complete_and_self_contained(args):
    got = _cli(*args, "--help")
    assert got["code"] == 0
    assert got["heavy"] == [], f"`transfgu {' '.join(args)} --help` imported {got['heavy']}"
    text = got["help"]
    assert text.startswith("usage: transfgu "), text[:200]
    assert not INTERNAL.search(text), INTERNAL.search(text).group(0)
    assert "``" not in text and ":func:" not in text and ":mod:" not in text  # no raw docstring markup
    options = text.split("options:", 1)[1]
    # every option line has a help text (an option alone on its line is followed by its indented help)
    lines = [ln for ln in options.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        m = re.match(r"^  (-[\w-]+(?:[ ,][^ ].*?)?)(?:\s{2,}(.*))?$", ln)
        if m and not m.group(2):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            assert nxt.startswith(" " * 10) and not nxt.strip().startswith("-"), f"no help for {ln.strip()!r}"


@pytest.mark.parametrize("args", [["predict"], ["export"], ["evaluate"], ["import-decoder"]], ids=" ".join)
def test_bad_arguments_are_refused_before_torch_is_imported(args):
    got = _cli(*args, "--no-such-option")
    assert got["code"] == 2 and got["heavy"] == []


def test_options_with_a_default_show_it():
    text = _cli("predict", "--ray", "--help")["help"]
    assert "images per forward pass (default: 8)" in text
    assert re.search(r"CPUs per decoding task \(default: 0\.5\)", text)
    text = _cli("evaluate", "--help")["help"]
    assert "(default: hungarian)" in text


def test_version_and_top_level_help():
    got = _cli("--version")
    assert got["code"] == 0 and got["help"].strip() == f"transfgu {__version__}" and got["heavy"] == []
    got = _cli("--help")
    assert got["code"] == 0 and "--version" in got["help"]
    for name in SUBCOMMANDS:
        assert name in got["help"]
    r = subprocess.run([sys.executable, "-m", "transfgu.cli", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"transfgu {__version__}"


def test_fast_parsers_keep_the_library_constants():
    from transfgu import cli_args
    from transfgu.data.labelmaps import IGNORE_INDEX
    from transfgu.evaluate import RESIZE_POLICIES

    assert cli_args.IGNORE_INDEX == IGNORE_INDEX and cli_args.RESIZE_POLICIES == RESIZE_POLICIES


def test_readme_cites_no_internal_notes():

    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert not re.search(r"issue\s+\d+|reference_method|field_anchors", text, re.IGNORECASE)


def test_readme_cluster_example_is_scoped_to_its_own_head():

    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    cluster = next(b for b in blocks if "ray start --head" in b and "ray job submit" in b)
    commands = [ln.split("#")[0].strip() for ln in cluster.splitlines()]
    assert not any(re.match(r"ray stop\b", c) for c in commands)  # machine-wide: other users' clusters die
    assert "--block" in cluster and re.search(r"kill \$RAY_HEAD_PID", cluster)
    ports = {int(p) for p in re.findall(r"--(?:port|dashboard-port|ray-client-server-port) (\d+)", cluster)}
    assert len(ports) == 3 and not ports & {6379, 8265, 10001}
    assert "127.0.0.1:8265" not in cluster
    # submit only once the head's job API answers (GCS up is not enough), and stop waiting if the head died
    wait = re.search(r"until (ray job list --address (\S+)) .*?\bdone\b", cluster, re.DOTALL)
    submit = re.search(r"ray job submit --address (\S+)", cluster)
    assert wait and submit and wait.group(2) == submit.group(1)
    assert "kill -0 $RAY_HEAD_PID" in wait.group(0)
    assert re.search(r"dashboard.*asks for the same token", text, re.DOTALL)
