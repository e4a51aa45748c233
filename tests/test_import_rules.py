"""The microkernel contract in the import graph (design.md rules 2.7 and 3): the kernel never
imports a driver, a driver imports neither the kernel nor another driver, and the protocol
module stands on its own. Read from the source with ast, so a lazy import inside a
function counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "llmos"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every llmos module `path` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}   # `from llmos.drivers import io`
    return {m for m in out if m == "llmos" or m.startswith("llmos.")}


MODULES = {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def driver_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "drivers" and parts[2] != "runtime" else None


def test_the_graph_was_read():
    assert "llmos.kernel.core" in MODULES and "llmos.drivers.io.server" in MODULES
    assert "llmos.protocol" in MODULES["llmos.kernel.core"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("llmos.kernel")))
def test_the_kernel_imports_no_driver(module):
    bad = sorted(m for m in MODULES[module] if m.startswith("llmos.drivers"))
    assert not bad, f"{module} imports driver code: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("llmos.drivers")))
def test_a_driver_imports_neither_the_kernel_nor_another_driver(module):
    mine = driver_of(module)
    bad = sorted(m for m in MODULES[module]
                 if m.startswith("llmos.kernel") or (driver_of(m) is not None and driver_of(m) != mine))
    assert not bad, f"{module} reaches into {bad}"


def test_the_protocol_imports_nothing_of_llmos_but_its_codec():
    assert MODULES["llmos.protocol"] == {"llmos.wire"} | {f"llmos.wire.{n}" for n in PROTOCOL_REEXPORTS}
    assert MODULES["llmos.wire"] == set()


PROTOCOL_REEXPORTS = ("MAX_ARRAY_DIMS", "PROTOCOL_VERSION", "BadMessage", "Message", "Unencodable", "decode",
                      "encode", "i32", "item", "message", "plain", "registered_messages")
