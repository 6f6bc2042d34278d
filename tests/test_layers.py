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
