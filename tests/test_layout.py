"""The package's layout: no import circle between its modules, and the subpackages reachable
after a bare ``import paraseq`` (as ``torch.nn`` is after ``import torch``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "paraseq"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """Edges module -> module of paraseq, from every import statement (deferred ones inside
    functions included: a circle that only a deferred import hides is still a circle)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # `from . import x` names a module when x is one
                targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _is_package_init_edge(a: str, b: str) -> bool:
    # a package's __init__ importing its own submodules (and they importing siblings through
    # the package) is how Python packages work, not a layering circle
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_import_circle():
    graph = _import_graph()
    layered = {a: {b for b in bs if not _is_package_init_edge(a, b)} for a, bs in graph.items()}
    cycle = _find_cycle(layered)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_graph_sees_known_edges():
    # the walker itself must see imports, or the test above could never fail
    graph = _import_graph()
    assert "paraseq.result" in graph["paraseq.solve.api"]
    assert "paraseq.result" in graph["paraseq.cells.newton"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("sub", ["nn", "ssm", "cells", "ode", "scan", "solve"])
def test_subpackages_after_bare_import(sub):
    code = f"import paraseq; m = paraseq.{sub}; print(m.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT.parent, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"paraseq.{sub}"


def test_bare_import_stays_light():
    # the heavy optional parts (nn's modules, the S4 kernels) load only when first touched
    code = ("import sys, paraseq; "
            "print(sorted(m for m in ('paraseq.nn', 'paraseq.ssm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT.parent, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_attribute_is_an_attribute_error():
    import paraseq

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        paraseq.nope  # noqa: B018


def test_compiled_kernels_modules_stay_small():
    # the compiled loops were one 2,031-line file; the package's layout is the map now
    sizes = {p.name: len(p.read_text().splitlines())
             for p in (ROOT / "cells" / "compiled").glob("*.py")}
    assert sizes and max(sizes.values()) <= 600, sizes


def test_compiled_cache_stamp_covers_every_kernel_file():
    """numba keys a cached function on a hash of its own file; the kernels inline code from
    their siblings, so ``_build`` stamps them with a hash of every file they compile: a change
    in cellmath.py must recompile lanes.py's kernels, not leave a stale build running."""
    pytest.importorskip("numba")
    from paraseq.cells import compiled

    graph = _import_graph()
    pkg = "paraseq.cells.compiled"
    stamped = {m.__name__ for m in compiled._KERNEL_MODULES}
    for mod in ("lanes", "rows", "diag"):
        used = {m for m in graph[f"{pkg}.{mod}"] if m.startswith(pkg + ".")}
        assert used <= stamped, f"{mod} compiles code from {used - stamped}, not in the stamp"
    kernels = compiled._build()
    stamp = compiled._source_stamp()
    for name, k in kernels.items():
        assert k._cache._cache_file._source_stamp == stamp, name
