"""The dependency rule of ARCHITECTURE.md, enforced on porter's import graph (every import, function-level ones too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "porter"
FOUNDATION = {"errors", "spec", "options", "outputs", "files", "cache", "logging_setup", "imaging", "porter"}
# what each part of porter may import besides itself ("porter" = the package root: __version__)
ALLOWED = {
    "errors": set(), "files": {"errors"}, "options": {"errors"}, "outputs": {"errors"}, "spec": {"errors"},
    "cache": {"errors"}, "logging_setup": set(), "imaging": {"errors", "spec"},
    "graph": {"errors", "spec"},
    "sources": {"errors", "files"},
    "runtime": FOUNDATION | {"graph"},
    "importers": FOUNDATION | {"graph", "sources"},
    "inspection": FOUNDATION | {"graph"},
    "conversion": FOUNDATION | {"graph", "sources", "importers", "runtime"},
    "quantization": FOUNDATION | {"graph", "runtime"},
    "export": FOUNDATION | {"graph", "runtime"},
    "ray": FOUNDATION | {"runtime"},
    "transfer": FOUNDATION | {"graph", "sources", "runtime", "conversion", "quantization", "ray"},
    "cli": FOUNDATION | {"graph", "sources", "runtime", "importers", "conversion", "quantization", "export", "transfer",
            "inspection", "ray"},
    "__main__": {"cli"},
    "porter": {"errors"},  # porter/__init__.py: everything else is imported lazily, on first use
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "porter"


def imports() -> dict[str, set[str]]:
    """part of porter -> the parts its modules import."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = list(path.relative_to(ROOT).with_suffix("").parts)
        module = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target == "porter":  # from . import x / from porter import x: the names are submodules
                    targets = [f"porter.{a.name}" for a in node.names]
                elif target.startswith("porter."):
                    targets = [target]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("porter")]
            for t in targets:
                if _part(t) not in ("__version__",):
                    found.setdefault(_part(module), set()).add(_part(t))
    return found


def test_every_part_imports_only_what_the_dependency_rule_allows():
    bad = {part: sorted(deps - {part} - ALLOWED.get(part, set()))
           for part, deps in imports().items() if deps - {part} - ALLOWED.get(part, set())}
    assert not bad, f"imports against the rule in ARCHITECTURE.md: {bad}"
    assert set(imports()) <= set(ALLOWED), f"parts the rule doesn't know: {set(imports()) - set(ALLOWED)}"


def test_the_scan_sees_function_level_imports():
    deps = imports()
    assert {"transfer", "conversion", "runtime"} <= deps["cli"]  # cli imports these inside its command functions
    assert "runtime" in deps["conversion"]  # rebuild_source's deferred import


def test_the_runtime_never_rebuilds_source_models():
    deps = imports()["runtime"]
    assert not deps & {"importers", "sources", "transfer", "conversion"}


def test_big_modules_are_explained_in_architecture_md():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        if lines > 500:
            rel = str(path.relative_to(ROOT))
            assert re.search(re.escape(rel) + r".*\(over 500 lines:", text), f"{rel} has {lines} lines; say why in ARCHITECTURE.md"
