"""The trainer package's layout rules, checked on its source with ``ast``: imports point one
way (no cycles; no library module imports the command line) and no function is over 80
lines (in ``python/`` and ``qcs_ext/``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "qcs"
MAX_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``qcs`` that module ``name`` imports (anywhere in it, lazily or not;
    annotation-only imports under ``TYPE_CHECKING`` excluded)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, path.name == "__init__.py", node)
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_parser_resolves_relative_and_lazy_imports(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom . import saving\n"
                   "from ..config import X\nif TYPE_CHECKING:\n    from ..cli import main\n"
                   "def f():\n    from ..inference import load_model\n")
    known = {"qcs.training.saving", "qcs.config", "qcs.cli", "qcs.inference", "qcs.training"}
    got = imports_of("qcs.training.step", src, known)
    assert got == {"qcs.training.saving", "qcs.config", "qcs.inference"}


def test_no_import_cycles_in_the_trainer_package():
    graph = import_graph()
    assert len(graph) > 30 and "qcs.training.loop" in graph
    assert cycles(graph) == []


def test_library_modules_never_import_the_cli():
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t == "qcs.cli" or t.startswith("qcs.cli."))
                 for m, targets in graph.items()
                 if not (m == "qcs.cli" or m.startswith("qcs.cli.") or m == "qcs.__main__")}
    assert {m: t for m, t in offenders.items() if t} == {}
    assert "qcs.cli" in graph["qcs.__main__"]  # the checker sees such imports


def long_functions(root: Path) -> list[str]:
    """``path:line name (N lines)`` of every function or method over MAX_LINES lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_long_function_finder_counts_lines(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\ndef short():\n    pass\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert long_functions(tmp_path) == [f"m.py:1 long ({MAX_LINES + 1} lines)"]
    finally:
        ROOT = saved


@pytest.mark.parametrize("folder", ["python", "qcs_ext"])
def test_no_function_over_80_lines(folder):
    assert long_functions(ROOT / folder) == []


def test_config_and_parser_import_without_torch():
    """``qcs config show`` and ``qcs --help`` stay light: the config and the parser import
    neither torch nor the kernels (families import their networks when first built)."""
    import subprocess
    import sys
    code = ("import sys; import qcs.cli, qcs.cli.commands, qcs.cli.use, qcs.config as c; "
            "[c.to_toml(c.load_config(p)) for p in c.PRESETS + c.FAMILY_PRESETS]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'qcs_ext')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
