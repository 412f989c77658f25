"""Names say what they are: a public top-level function or class of ``transfgu/`` has one meaning.

A public name (no leading underscore) defined at the top level of more than one module is allowed only when every
definition is a function with the same signature (arguments with their annotations and defaults, and the return
annotation): one protocol implemented per module, such as every method's ``check_sizes(cfg, p)`` or every command's
``main(argv)``. Two ``train_one_epoch`` or ``save_model`` that take different arguments are two things under one
name, and a reader (or an import) takes one for the other.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from helpers.data import REPO

PACKAGE = REPO / "transfgu"


def public_definitions(package: Path) -> dict[str, list[tuple[str, str]]]:
    """``name -> [(module path, signature), ...]`` of the public top-level functions and classes of ``package``."""
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            if isinstance(node, ast.ClassDef):
                sig = "class"
            else:
                ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
                sig = f"({ast.unparse(node.args)}){ret}"
            found[node.name].append((str(path.relative_to(package.parent)), sig))
    return found


def conflicting_names(package: Path) -> dict[str, list[tuple[str, str]]]:
    """The public names defined in more than one module with more than one signature (or as a class)."""
    out = {}
    for name, defs in public_definitions(package).items():
        modules = {m for m, _ in defs}
        sigs = {s for _, s in defs}
        if len(modules) > 1 and (len(sigs) > 1 or "class" in sigs):
            out[name] = defs
    return out


def test_no_public_name_has_two_meanings_in_the_package():
    conflicts = conflicting_names(PACKAGE)
    lines = [f"{name}: " + "; ".join(f"{m} {s}" for m, s in defs) for name, defs in sorted(conflicts.items())]
    assert not conflicts, "public names defined in several modules with different signatures:\n" + "\n".join(lines)


def test_the_check_finds_a_name_defined_twice(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("def run(ctx: int) -> int:\n    return ctx\n\ndef main(argv=None) -> int:\n    return 0\n"
                              "\nclass Model:\n    pass\n\ndef _private(x):\n    return x\n")
    (pkg / "sub" / "b.py").write_text("def run(ctx: int, ex: int) -> int:\n    return ctx\n\n"
                                      "def main(argv=None) -> int:\n    return 1\n\nclass Model:\n    pass\n\n"
                                      "def _private(y, z):\n    return y\n")
    (pkg / "c.py").write_text("def main(argv=None) -> str:\n    return ''\n")
    conflicts = conflicting_names(pkg)
    # different arguments, a class defined twice, the same arguments with another return type; private names and
    # one-module names are not looked at
    assert sorted(conflicts) == ["Model", "main", "run"]
    assert conflicts["run"] == [("pkg/a.py", "(ctx: int) -> int"), ("pkg/sub/b.py", "(ctx: int, ex: int) -> int")]
    (pkg / "c.py").unlink()
    assert sorted(conflicting_names(pkg)) == ["Model", "run"]  # same-signature mains: one protocol, allowed
