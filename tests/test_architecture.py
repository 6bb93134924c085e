"""Imports go downward only: a module may import from its own layer or lower ones, never from a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "ultra_adaptive_kv_cache_engine"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

LAYERS: dict[str, int] = {
    "types": 0, "config": 0, "config_sources": 0, "metrics": 0, "lazy": 0,
    "memory": 1, "prefix": 1, "policies": 1, "compression": 1,
    "tiers": 2, "kernels": 2,
    "cache": 3, "model": 3,
    "engine": 4,
    "server": 5, "router": 5, "cli": 5, "__main__": 5,
}


def _component(module_parts: list[str]) -> str | None:
    """The top-level component ('memory', 'config', ...) of a module path inside the package."""
    return module_parts[0] if module_parts else None


def _imports(path: Path) -> list[tuple[list[str], str]]:
    """(module path inside the package, imported name) for every import of a package module in `path`; a plain
    `import pkg.a.b` gives (['a', 'b'], '')."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package_parts = list(rel[:-1])
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[list[str], str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(parts[1:], "") for parts in (a.name.split(".") for a in node.names) if parts[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".") if node.module else []
            if node.level == 0:
                if not mod or mod[0] != PACKAGE:
                    continue
                base = mod[1:]
            else:
                base = package_parts[: len(package_parts) - (node.level - 1)] + mod
            found += [(base, a.name) for a in node.names]
    return found


def _imported_components(path: Path) -> set[str]:
    found: set[str] = set()
    for base, name in _imports(path):
        comp = _component(base if base else [name])
        if comp is not None:
            found.add(comp)
    return found


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py")


def test_every_component_has_a_layer():
    comps = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in _modules()}
    assert comps <= set(LAYERS), f"components without a layer: {sorted(comps - set(LAYERS))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_import(path: Path):
    own = LAYERS[path.relative_to(ROOT).parts[0].removesuffix(".py")]
    upward = {c: LAYERS[c] for c in _imported_components(path) if c in LAYERS and LAYERS[c] > own}
    assert not upward, f"{path.relative_to(ROOT)} (layer {own}) imports upward: {upward}"


def test_detector_catches_an_upward_import(tmp_path: Path):
    # The checker itself must fail on a known-bad module.
    bad = ROOT / "memory" / "_probe_upward.py"
    bad.write_text("from ..engine import engine\n")
    try:
        assert "engine" in _imported_components(bad)
    finally:
        bad.unlink()


# The engine and the model adapters reach the pool and the tiers only through the cache manager (cache/).
# From memory/ and tiers/ they may import value types of the interface (specs, errors, usage reports), never
# the pool, the index, a tier or the store.
FACADE_ONLY = ("engine", "model")
INTERFACE_NAMES = {"KVSpec", "LAYOUT_VERSION", "OutOfBlocksError", "TierUsage"}


def _internal_imports(path: Path) -> list[str]:
    """'memory.X' / 'tiers.X' names imported by `path` that are not interface value types."""
    return [
        ".".join(base) + (f".{name}" if name else "")
        for base, name in _imports(path)
        if base and base[0] in ("memory", "tiers") and name not in INTERFACE_NAMES
    ]


@pytest.mark.parametrize(
    "path", [p for p in _modules() if p.relative_to(ROOT).parts[0] in FACADE_ONLY], ids=lambda p: str(p.relative_to(ROOT))
)
def test_engine_and_model_use_only_the_cache_facade(path: Path):
    assert not _internal_imports(path), f"{path.relative_to(ROOT)} reaches around the cache manager"


def test_facade_detector_catches_a_reach_around():
    bad = ROOT / "engine" / "_probe_reach.py"
    bad.write_text("from ..memory import BlockPool\nfrom ..tiers.cpu import CPUTier\nfrom ..memory import KVSpec\n")
    try:
        assert _internal_imports(bad) == ["memory.BlockPool", "tiers.cpu.CPUTier"]
    finally:
        bad.unlink()
