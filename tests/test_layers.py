"""The house's floors: `safeprompt` at the bottom, the three tools beside each other above it.

Read from the source with `ast` (every import statement, at any depth, including the ones inside
functions), so a lazy import cannot cross a floor unseen either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"safeprompt", "gateway", "trainer", "evaluation", "stack"}
# package -> the project packages it may import besides itself
ALLOWED = {
    "safeprompt": set(),
    "gateway": {"safeprompt"},
    "trainer": {"safeprompt"},
    "evaluation": {"safeprompt"},
    "stack": {"safeprompt", "gateway"},  # it starts the gateway (and vLLM)
}


def project_imports(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in PROJECT}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_floors_below_it(package: str) -> None:
    crossings = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                 for path in sorted((ROOT / package).rglob("*.py"))
                 for target, line in sorted(project_imports(path))
                 if target != package and target not in ALLOWED[package]]
    assert not crossings, "\n".join(crossings)


def test_the_rule_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from gateway.app import create_app\n    import trainer.fit\n")
    assert project_imports(module) == {("gateway", 2), ("trainer", 3)}


# What the gateway's image does not carry (pyproject's `train` extra): no module the gateway
# imports, directly or through safeprompt, may import these, lazily or not. httpx is the offline
# client's (safeprompt/client.py); the gateway's path to vLLM is aiohttp (gateway/upstream.py).
TRAINING_ONLY = {"torch", "numpy", "safetensors", "transformers", "sklearn", "accelerate", "gguf", "matplotlib",
                 "httpx"}


def module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names (for `from X import Y`: X, and X.Y when a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}") is not None}
    return found


def gateway_closure() -> dict[Path, set[str]]:
    """The gateway's files and every project file they reach, each with the modules it imports."""
    todo = sorted((ROOT / "gateway").rglob("*.py"))
    seen: dict[Path, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = imported_modules(path)
        for name in seen[path]:
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
                target = module_file(".".join(parts[:depth])) if parts[0] in PROJECT else None
                if target is not None and target not in seen:
                    todo.append(target)
    return seen


def test_the_gateway_imports_no_training_dependency() -> None:
    closure = gateway_closure()
    assert ROOT / "safeprompt" / "artifact.py" in closure and ROOT / "safeprompt" / "payload.py" in closure
    heavy = [f"{path.relative_to(ROOT)} imports {name}" for path, names in sorted(closure.items())
             for name in sorted(names) if name.split(".")[0] in TRAINING_ONLY]
    assert not heavy, "\n".join(heavy)


def test_the_closure_rule_sees_torch_behind_safeprompt() -> None:
    """The rule follows imports into safeprompt: the writer module imports torch and is caught."""
    names = imported_modules(ROOT / "safeprompt" / "artifact_write.py")
    assert "torch" in names and "safeprompt.artifact" in names
