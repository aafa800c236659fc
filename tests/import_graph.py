"""The project's import graph read from source (``ast``), function-local imports included.

Each ``.py`` file under the four package folders becomes a module name (``solar_edge.X``,
``solar_edge.exporters.X``, ...); every ``import``/``from ... import`` statement anywhere in
it, and every ``importlib.import_module("literal")`` call, is an edge. Relative imports are
resolved against the module's package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"solar_edge": "solar_edge", "exporters": "solar_edge.exporters",
           "runtime": "solar_edge.runtime", "devices": "solar_edge.devices"}


def module_files() -> Iterator[tuple[str, Path]]:
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports (absolute names), wherever the statement sits."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            found.add(node.args[0].value)
    return found


def graph() -> dict[str, set[str]]:
    return {name: imports_of(path.read_text(encoding="utf-8"), name,
                             path.name == "__init__.py")
            for name, path in module_files()}


def violations(edges: dict[str, set[str]], importer: str, forbidden: tuple[str, ...],
               exempt: tuple[str, ...] = ()) -> list[str]:
    """``module -> import`` pairs where a module under ``importer`` imports a forbidden one."""
    def under(name: str, roots: tuple[str, ...]) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    return sorted(f"{mod} -> {imp}" for mod, imps in edges.items()
                  if under(mod, (importer,)) and not under(mod, exempt)
                  for imp in imps if under(imp, forbidden))
