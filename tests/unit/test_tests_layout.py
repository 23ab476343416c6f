"""The suite's own layout: no test module imports another test module.

Shared helpers live in tests/kit/ and shared fixtures in a conftest.py (tests/conftest.py,
tests/integration/conftest.py); a test module that imports from tests.unit.* or
tests.integration.* (a helper, or a fixture with ``noqa: F401``) ties one test file to another's
internals and runs that module's import-time code twice. Every file under tests/ is parsed (ast),
so an import inside a function or a relative import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
TEST_PACKAGES = ("tests.unit", "tests.integration")


def module_name(path: Path) -> str:
    rel = path.relative_to(TESTS.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path` (or in `source`, read as if it
    were that file), relative ones resolved."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            # `from tests.integration import test_x` names the module in the alias
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def is_test_module(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in TEST_PACKAGES) and \
        name.rpartition(".")[2] not in ("unit", "integration")


def test_no_test_module_imports_another() -> None:
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 50, files            # the walk found the suite
    offenders = [f"{p.relative_to(TESTS.parent)}:{line}: imports {name}"
                 for p in files for line, name in imported(p)
                 if is_test_module(name) and not name.endswith(".conftest")]
    assert not offenders, ("a test module imports another test module; put shared helpers in "
                           "tests/kit/ and shared fixtures in a conftest.py:\n"
                           + "\n".join(offenders))


def test_the_check_sees_every_spelling() -> None:
    """The parser finds the spellings a test module could use to import another."""
    cases = {
        "from tests.integration.test_relay import delivered\n": True,
        "from tests.unit import test_config\n": True,
        "import tests.unit.test_config\n": True,
        "def f():\n    from tests.integration.test_haproxy import HAProxy\n": True,
        "from .test_relay import delivered\n": True,
        "from ..unit.test_config import check_invalid\n": True,
        "from tests.kit.harness import Ingress\n": False,
        "from tests.kit import harness\n": False,
        "import tests.integration\n": False,
        "from . import conftest\n": False,
    }
    probe = TESTS / "integration" / "probe.py"
    for src, bad in cases.items():
        names = [n for _, n in imported(probe, src)]
        found = any(is_test_module(n) and not n.endswith(".conftest") for n in names)
        assert found == bad, (src, names)
