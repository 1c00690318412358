"""The import graph: `import darl_infer` stays light (no exporter, no optional extras) and no module
of the distribution imports itself back through others (a cycle, lazy imports included)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package name, as setup.py's package_dir installs them
PACKAGES = {
    ROOT / "darl_infer": "darl_infer",
    ROOT / "darl_infer" / "backends": "darl_infer.backends",
    ROOT / "kernels": "darl_infer.kernels",
    ROOT / "training": "darl_infer.training",
}


def modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package __init__)."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = (path, path.stem == "__init__")
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {name: set() for name in known}
    for name, (path, is_package) in known.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # function-level imports too
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in known and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert {"darl_infer.scorer", "darl_infer.backends.onnx_export", "darl_infer.training.train"} <= set(graph)
    assert "darl_infer.backends.onnx_format" in graph["darl_infer.scorer"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_darl_infer_does_not_import_the_exporter_or_extras():
    heavy = ["darl_infer.backends.onnx_export", "darl_infer.onnx_export", "onnxruntime", "onnx", "triton",
             "darl_infer.training"]
    code = f"import darl_infer, sys; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
