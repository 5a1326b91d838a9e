"""The layers of DESIGN.md hold: no module of infeng imports a layer above its own (at the top of
a file or inside a function), no CLI module imports another, and imports inside functions are
there for an optional dependency, not to dodge a cycle.

Order, top to bottom (a layer may import any layer below it, and modules of its own layer):

    cli > bench > evals > runtime > model > quant > converters > format > kernels

bench sits above evals: the llama.cpp KLD comparison reduces its figures with the eval code
(``evals.perplexity``), so both engines are measured by the same lines; evals never import bench.
telemetry and errors are imported by every layer and import nothing of infeng.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "infeng"
ORDER = ["cli", "bench", "evals", "runtime", "model", "quant", "converters", "format", "kernels"]
BASE = {"telemetry", "errors"}
# files whose function-level infeng imports are other engineers' to move (issue 16 parts 1, 2
# and the `generate --batch` rework); everything else imports at the top
FUNCTION_IMPORTS_PENDING = {
    "cli/generate.py",
}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path, root: Path) -> list[tuple[str, int, bool]]:
    """(imported infeng module, line, inside a function) for every import in the file."""
    module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    tree = ast.parse(path.read_text(), str(path))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            # `from infeng import format` names a module of the package
            if names == ["infeng"]:
                names = [f"infeng.{a.name}" for a in node.names]
        else:
            continue
        out += [(n, node.lineno, id(node) in in_function) for n in names if n == "infeng" or n.startswith("infeng.")]
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        own = path.relative_to(root).parts[0] if path.parent != root else path.stem
        own = own.removesuffix(".py")
        for target, line, in_fn in imports(path, root):
            to = layer(target)
            where = f"infeng/{rel}:{line} imports {target}"
            if own in BASE and to and to not in BASE:
                bad.append(f"{where}: {own} imports nothing of infeng")
            elif own in ORDER and to in ORDER and ORDER.index(to) < ORDER.index(own):
                bad.append(f"{where}: {to} is above {own}")
            elif own == "cli" and to == "cli" and target != "infeng.cli" and rel != "cli/main.py":
                bad.append(f"{where}: a CLI module imports another (only main.py registers them)")
            if in_fn and rel not in FUNCTION_IMPORTS_PENDING:
                bad.append(f"{where} inside a function (import at the top; a cycle means a layer is crossed)")
    return bad


def test_no_module_imports_a_layer_above_it():
    bad = violations()
    assert not bad, "\n".join(bad)


def test_every_package_has_a_layer():
    """A new top-level package must be placed in ORDER (or BASE) before anything can import it."""
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert packages | modules <= set(ORDER) | BASE


@pytest.mark.parametrize("code, message", [
    ("from infeng.bench.synthetic import cache_dir\n", "bench is above converters"),
    ("def f():\n    from infeng.format import BLOCKS\n", "inside a function"),
])
def test_a_crossing_is_caught(tmp_path, code, message):
    """The check itself fails on a violating import (a converter importing bench; an import
    dodging a cycle inside a function)."""
    root = tmp_path / "infeng"
    (root / "converters").mkdir(parents=True)
    (root / "converters" / "__init__.py").write_text("")
    (root / "converters" / "bad.py").write_text(code)
    found = violations(root)
    assert len(found) == 1 and found[0].startswith("infeng/converters/bad.py:") and message in found[0]
