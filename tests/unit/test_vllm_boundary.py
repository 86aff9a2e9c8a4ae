"""Only the vLLM adapter (tandem_vllm/vllm_adapter/) uses vLLM's internals; everything else imports
vLLM's public top level or goes through the adapter. A new ``from vllm.v1...`` elsewhere fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import tandem_vllm

PACKAGE = Path(tandem_vllm.__file__).parent
ADAPTER = PACKAGE / "vllm_adapter"
PUBLIC = {"vllm", "vllm.inputs", "vllm.exceptions", "vllm.sampling_params"}


def vllm_imports(source: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of a vllm module in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "vllm"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
            found.append((node.lineno, node.module or "", [a.name for a in node.names]))
    return found


def violations(source: str) -> list[str]:
    bad = []
    for line, module, names in vllm_imports(source):
        if module not in PUBLIC:
            bad.append(f"line {line}: {module} is vLLM-internal")
        bad += [f"line {line}: {module}.{n} is private" for n in names if n.startswith("_")]
    return bad


def test_the_rule_catches_internal_and_private_imports():
    assert violations("from vllm.v1.metrics.reader import Counter") == ["line 1: vllm.v1.metrics.reader is vLLM-internal"]
    assert violations("import vllm.envs as e") == ["line 1: vllm.envs is vLLM-internal"]
    assert violations("def f():\n    from vllm import _custom_ops") == ["line 2: vllm._custom_ops is private"]
    assert violations("from vllm import LLM, SamplingParams\nimport vllm\nfrom vllm.inputs import TokensPrompt") == []
    assert violations("from vllm_like import x\nfrom .vllm import y") == []


def test_no_module_outside_the_adapter_imports_vllm_internals():
    modules = [p for p in PACKAGE.rglob("*.py") if ADAPTER not in p.parents]
    assert len(modules) > 20 and not any(ADAPTER in p.parents for p in modules)
    bad = {str(p.relative_to(PACKAGE)): v for p in modules if (v := violations(p.read_text()))}
    assert not bad, f"vLLM internals outside tandem_vllm/vllm_adapter/ (move the use into the adapter): {bad}"


def test_the_adapter_does_not_import_the_benchmarks():
    """bench imports the adapter (the profiler, engine construction), never the reverse."""
    for p in ADAPTER.rglob("*.py"):
        tree = ast.parse(p.read_text())
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in modules if m.startswith(("tandem_vllm.bench", "tandem_vllm.serve"))], p.name
