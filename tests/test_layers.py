"""The import structure: layers read from the file tree, no circles, no private names across files.

Every module of the project is parsed (``ast``, nothing imported) and each of its imports of
another project module, at the top or inside a function, is an arrow. The layers, bottom to top
(a module may import its own layer and the ones below, never above):

1. ``rep_medsam_jax.models``, ``rep_medsam_jax.losses``
2. ``rep_medsam_jax.io``, ``rep_medsam_jax.preprocess``, ``rep_medsam_jax.postprocess``
3. ``rep_medsam_jax.predictor``, ``.convert``, ``.metrics``, ``.model_dir``, ``.model_store``,
   ``.mesh``
4. ``input_pipeline``
5. ``rep_medsam_jax.training``, ``rep_medsam_jax.export``
6. entry points: ``rep_medsam_jax.cli``, ``rep_medsam_jax.demo``, ``train``, ``export``
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rep_medsam_jax", "input_pipeline")
ENTRY_SCRIPTS = ("train.py", "export.py")

# Longest prefix wins: a module belongs to the layer of the most specific entry naming it.
LAYERS: dict[str, int] = {
    # The package root is its own entry (not a prefix): it imports nothing when loaded and names
    # the interactive Segmenter lazily, on first access, as the public facade on top.
    "rep_medsam_jax": 6,
    "rep_medsam_jax.models": 1,
    "rep_medsam_jax.losses": 1,
    "rep_medsam_jax.io": 2,
    "rep_medsam_jax.preprocess": 2,
    "rep_medsam_jax.postprocess": 2,
    "rep_medsam_jax.predictor": 3,
    "rep_medsam_jax.convert": 3,
    "rep_medsam_jax.metrics": 3,
    "rep_medsam_jax.model_dir": 3,
    "rep_medsam_jax.model_store": 3,
    "rep_medsam_jax.mesh": 3,
    "input_pipeline": 4,
    "rep_medsam_jax.training": 5,
    "rep_medsam_jax.export": 5,
    "rep_medsam_jax.app": 5,
    "rep_medsam_jax.cli": 6,
    "rep_medsam_jax.demo": 6,
    "train": 6,
    "export": 6,
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every project module (packages and entry scripts)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    for script in ENTRY_SCRIPTS:
        modules[Path(script).stem] = root / script
    return modules


ROOTS = ("rep_medsam_jax",)         # layer entries that name one module, never a prefix


def layer_of(module: str) -> int:
    best = max((prefix for prefix in LAYERS
                if module == prefix or (module.startswith(prefix + ".") and prefix not in ROOTS)),
               key=len, default=None)
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)")
    return LAYERS[best]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]
               ) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in the file.

    ``from package import name`` where ``package.name`` is a module counts as importing that
    module (and no name).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _project_module(alias.name, modules)
                if target:
                    found.append((target, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            target = _project_module(source, modules)
            if not target:
                continue
            names = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, [], node.lineno))
                else:
                    names.append(alias.name)
            if names:
                found.append((target, names, node.lineno))
    return found


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (itself or its closest enclosing package)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, list[str], int]]]:
    modules = module_files(root)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def upward_imports(graph) -> list[str]:
    problems = []
    for module, edges in graph.items():
        for target, _, line in edges:
            if layer_of(target) > layer_of(module):
                problems.append(f"{module}:{line} imports {target} (layer {layer_of(module)} -> "
                                f"{layer_of(target)})")
    return problems


def private_imports(graph) -> list[str]:
    problems = []
    for module, edges in graph.items():
        for target, names, line in edges:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                problems.append(f"{module}:{line} imports private {private} from {target}")
    return problems


def circles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    edges = {m: sorted({t for t, _, _ in e if t != m and t in graph}) for m, e in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in edges[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(components)


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    missing = [m for m in graph if not _has_layer(m)]
    assert not missing, f"modules in no layer: {missing}"


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return False
    return True


def test_no_import_circles(graph):
    assert circles(graph) == []


def test_no_upward_imports(graph):
    assert upward_imports(graph) == []


def test_no_private_names_imported_across_files(graph):
    assert private_imports(graph) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """A made-up tree with one of each fault: the checks must report exactly those."""
    package = tmp_path / "rep_medsam_jax"
    (package / "io").mkdir(parents=True)
    (tmp_path / "input_pipeline").mkdir()
    files = {
        "rep_medsam_jax/__init__.py": "",
        "rep_medsam_jax/io/__init__.py": "from rep_medsam_jax.io.a import thing\n",
        "rep_medsam_jax/io/a.py": "def f():\n    from rep_medsam_jax.io import b\n",
        "rep_medsam_jax/io/b.py": "from rep_medsam_jax.io.a import _helper\n",
        "rep_medsam_jax/preprocess.py": "from rep_medsam_jax.metrics import dice\n",
        "rep_medsam_jax/metrics.py": "from .io import a\n",
        "input_pipeline/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for script in ENTRY_SCRIPTS:
        (tmp_path / script).write_text("import rep_medsam_jax.cli\n" if script == "train.py"
                                       else "")
    (package / "cli.py").write_text("")
    fake = import_graph(tmp_path)
    assert circles(fake) == [["rep_medsam_jax.io.a", "rep_medsam_jax.io.b"]]
    assert upward_imports(fake) == [
        "rep_medsam_jax.preprocess:1 imports rep_medsam_jax.metrics (layer 2 -> 3)"]
    assert private_imports(fake) == [
        "rep_medsam_jax.io.b:1 imports private ['_helper'] from rep_medsam_jax.io.a"]
    assert ("rep_medsam_jax.io", ["a"], 1) not in fake["rep_medsam_jax.metrics"]
    assert ("rep_medsam_jax.io.a", [], 1) in fake["rep_medsam_jax.metrics"]
