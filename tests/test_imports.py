"""The import graph of bench/ (package `diffbench`) and tasks/ (`diffbench.tasks`), read from the
source with `ast`: acyclic, function-level imports included, and no module reaches into another
module's private (underscore) names."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pyproject.toml's [tool.setuptools] package-dir: the folder each top package installs from.
PACKAGE_DIRS = {"diffbench.tasks": ROOT / "tasks", "diffbench": ROOT / "bench"}


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every .py file under the package folders."""
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            out.setdefault(name, path)  # bench/ holds no tasks/ folder, so none is shadowed
    return out


MODULES = module_files()


def package_of(module: str) -> str:
    """The package a module's relative imports start from."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_nodes(tree: ast.AST, typing_only: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements at any depth (inside functions too); those under `if TYPE_CHECKING:`
    only when `typing_only` (they never run, so they cannot close a cycle at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if typing_only:
                yield from import_nodes(node, typing_only)
            else:
                for child in node.orelse:
                    yield from import_nodes(ast.Module(body=[child], type_ignores=[]), False)
        else:
            yield from import_nodes(node, typing_only)


def imports(module: str, typing_only: bool = False) -> Iterator[tuple[str, str | None, int]]:
    """(imported diffbench module, name taken from it or None, line) of every import statement in
    `module` that runs (at any depth), and with `typing_only` those for type checkers too."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    for node in import_nodes(tree, typing_only):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(module).split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if not source.startswith("diffbench"):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:  # `from diffbench import x`: the module diffbench.x
                    yield sub, None, node.lineno
                elif source in MODULES:
                    yield source, alias.name, node.lineno


def module_aliases(module: str) -> dict[str, str]:
    """Local name -> diffbench module for imports that bind a module (`from diffbench import
    x`, `import diffbench.x as x`)."""
    tree = ast.parse(MODULES[module].read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    out[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in MODULES:
                    out[alias.asname or alias.name] = sub
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the diffbench modules it imports (itself excluded)."""
    return {m: {dep for dep, _, _ in imports(m) if dep != m} for m in MODULES}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_source_tree_maps_onto_the_installed_package_layout():
    assert MODULES["diffbench"] == ROOT / "bench" / "__init__.py"
    assert MODULES["diffbench.tasks.niah"] == ROOT / "tasks" / "niah.py"
    assert MODULES["diffbench.backends.vllm.backend"] == ROOT / "bench/backends/vllm/backend.py"
    # Function-level imports count: the plan imports the registry, the CLI imports lazily.
    edges = graph()
    assert "diffbench.registry" in edges["diffbench.plan"]
    assert "diffbench.models" in edges["diffbench.lm_eval"]  # inside DiffbenchLM.__init__
    # A type checker's import never runs: api names ModelSpec for Backend.check's signature only.
    assert "diffbench.models" not in edges["diffbench.api"]
    typed = {(d, n) for d, n, _ in imports("diffbench.api", typing_only=True)}
    assert ("diffbench.models", "ModelSpec") in typed


def test_the_package_has_no_import_cycle_even_through_function_level_imports():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_another_modules_private_names():
    found = []
    for module in MODULES:
        where = MODULES[module].relative_to(ROOT)
        for dep, name, line in imports(module, typing_only=True):
            if name and dep != module and is_private(name):
                found.append(f"{where}:{line}: from {dep} import {name}")
        aliases = module_aliases(module)
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != module
                and is_private(node.attr)
            ):
                found.append(f"{where}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_checks_see_a_cycle_and_a_private_import_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert is_private("_fingerprint") and not is_private("__version__")
