"""Issue 11: imports go strictly downward, cli → daemon → gateway → frontend → backends →
codec. Read from the source (every ``import`` outside ``if TYPE_CHECKING:``): a module
of a layer imports nothing of a layer above it, and the codec nothing with I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import p11gate

SRC = Path(p11gate.__file__).parent
#: top-level module or package → its layer (higher imports lower, never the reverse)
LAYERS = {"codec": 0, "backends": 1, "frontend": 2, "gateway": 3, "daemon": 4, "cli": 5}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "p11gate" else None


def _runtime_imports(path: Path) -> list[str]:
    """Absolute names of what ``path`` imports when it runs (TYPE_CHECKING blocks skipped)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1])  # a module and a package's __init__ alike
    tree = ast.parse(path.read_text())
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.extend(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                mod = ".".join([*base, child.module] if child.module else base)
                out.append(mod)
                out.extend(f"{mod}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return out


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        own = _layer("p11gate." + ".".join(path.relative_to(SRC).with_suffix("").parts))
        if own is None:
            continue
        for name in _runtime_imports(path):
            other = _layer(name)
            if other is not None and other > own:
                upward.append(f"{path.relative_to(SRC)} imports {name}")
    assert upward == []


def test_codec_does_no_io() -> None:
    io_modules = {"asyncio", "socket", "subprocess", "os", "threading", "logging"}
    found = [f"{p.name}: {n}" for p in sorted((SRC / "codec").glob("*.py"))
             for n in _runtime_imports(p) if n.split(".")[0] in io_modules]
    assert found == []


def test_pool_is_a_back_end_and_gateway_is_the_root() -> None:
    assert (SRC / "backends" / "pool" / "pool.py").exists()
    assert not (SRC / "pools").exists() and not (SRC / "frontend" / "server.py").exists()
    assert "p11gate.gateway" not in {n for p in (SRC / "frontend").glob("*.py")
                                     for n in _runtime_imports(p)}
