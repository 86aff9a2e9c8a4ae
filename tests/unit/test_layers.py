"""The package's layers point down: a module imports only its own layer or layers below (imports inside
functions count), and no modules import each other in a cycle. The checker is shown failing on a planted
upward import and a planted cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "tandem_vllm"
# lowest first; a module belongs to the layer of its top-level name under tandem_vllm
LAYERS = (
    ("errors", "progress", "prompts", "report", "speculation", "config", "evalsets"),  # core: no torch model, no vLLM
    ("modeling",),
    ("decoding",),
    ("vllm_adapter",),  # the only code touching vLLM internals (test_vllm_boundary.py)
    ("train",),
    ("quality",),
    ("demo",),  # the demo pairs: model sources the Serve app falls back to
    ("serve",),
    ("bench",),  # measures everything below, the Serve app included
    ("cli", "cli_fields", "commands", "plugin", "__init__"),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, root: Path = PKG) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """module -> the tandem_vllm modules it imports anywhere in its file (generated stubs left out)."""
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        if "pb" in path.relative_to(root).parts:
            continue
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == root.name:
                subs = {f"{node.module}.{a.name}" for a in node.names
                        if (root.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                        or (root.parent / f"{node.module}.{a.name}".replace(".", "/")).is_dir()}
                # `from tandem_vllm import report` reaches the submodule, not what the package itself defines
                if len(subs) < len(node.names):
                    deps.add(node.module)
                deps.update(subs)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == root.name)
        graph[module_name(path, root)] = deps
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    return RANK[parts[1] if len(parts) > 1 else "__init__"]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer(d) > layer(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Module-level cycles (a package importing its own submodules aside), by depth-first search."""
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph or m.startswith(d + ".") or d.startswith(m + "."):
                continue  # a package and its own modules
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if m.split(".")[-1] != "tandem_vllm" and
            (m.split(".")[1] if "." in m else "__init__") not in RANK] == []


def test_layers_point_down():
    assert upward_imports(import_graph()) == []


def test_no_modules_import_each_other():
    assert cycles(import_graph()) == []


def test_the_checks_catch_a_planted_upward_import_and_a_cycle(tmp_path):
    root = tmp_path / "tandem_vllm"
    for rel, text in {"config.py": "from tandem_vllm.serve import app\n",  # core reaching up into serving
                      "serve/__init__.py": "", "serve/app.py": "from tandem_vllm.config import X\n",
                      "bench/__init__.py": "", "bench/a.py": "def f():\n    from tandem_vllm.bench import b\n",
                      "bench/b.py": "from tandem_vllm.bench.a import f\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    graph = import_graph(root)
    assert upward_imports(graph) == ["tandem_vllm.config -> tandem_vllm.serve.app"]
    found = cycles(graph)
    assert ["tandem_vllm.bench.a", "tandem_vllm.bench.b", "tandem_vllm.bench.a"] in found
    assert any("tandem_vllm.config" in c and "tandem_vllm.serve.app" in c for c in found)
