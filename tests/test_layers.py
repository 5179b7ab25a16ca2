"""The package's layers point one way: a module imports its own unit or a lower layer, at module level (no import
of any package inside a function), and no group of modules imports itself in a circle. The layer order is written
down here once (and in the README's layout section).

A *unit* is a top-level module (``t3d.config``) or sub-package (``t3d.data``) of ``src/t3d``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[set[str]] = [
    {"t3d", "configfile"},  # the package root (__version__) and the YAML / dotted-override reader
    {"config"},  # typed configuration dataclasses
    {"plots", "metrics", "distributed", "checkpoint"},  # leaf utilities: torch / numpy only
    {"data"},  # manifests, readers, preprocessing, cache, crops, grid tiling, labels, synthetic data
    {"text", "models", "losses"},  # frozen text features, encoders / heads / decoder + key mapping, the objective
    {"pretrained"},  # a pre-trained encoder and its specification, from a checkpoint or an export
    {"pretrain"},  # the pre-training loop
    {"evaluate"},  # joint-space evaluation: study embeddings, zero-shot, retrieval
    {"finetune"},  # segmentation and classification fine-tuning
    {"embed", "predict", "export", "demo", "commands"},  # commands built on the layers below, their parsers
    {"cli"},  # the `t3d` entry point (commands are registered by name, imported on use)
    {"__main__"},  # `python -m t3d`
]
RANK = {unit: n for n, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "t3d"


def t3d_imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported t3d module, line, inside a function or class) for every import statement of the file."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, nested) for a in child.names if a.name.split(".")[0] == "t3d")
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").split(".")[0] == "t3d":
                found.append((child.module, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return found


def import_graph() -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(p): t3d_imports(ast.parse(p.read_text(), str(p))) for p in sorted(SRC.rglob("*.py"))}


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in import_graph()}
    assert units <= set(RANK), f"add these to LAYERS (and the README's layout): {sorted(units - set(RANK))}"


def function_level_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement inside a function, of any package."""
    found = []
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    found += [(a.name, node.lineno) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.module or ".", node.lineno))
    return sorted(set(found), key=lambda t: t[1])


def test_no_import_inside_a_function():
    nested = [
        f"{module_name(p)}:{line} imports {target}"
        for p in sorted(SRC.rglob("*.py"))
        for target, line in function_level_imports(ast.parse(p.read_text(), str(p)))
    ]
    assert not nested, "move these imports to module level (a cycle or a slow import is a layering problem):\n" + (
        "\n".join(nested)
    )


def test_imports_point_down():
    upward = []
    for module, edges in import_graph().items():
        for target, line, _ in edges:
            a, b = unit_of(module), unit_of(target)
            if a != b and RANK[b] >= RANK[a]:
                upward.append(f"{module}:{line} imports {target} (layer {RANK[a]} -> {RANK[b]})")
    assert not upward, "imports must point to a lower layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    modules = set(graph)

    def resolve(target: str) -> str | None:
        while target and target not in modules:  # `from t3d.data.cache import X` -> module t3d.data.cache
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: sorted({t for t in (resolve(x) for x, _, _ in e) if t and t != m}) for m, e in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
