"""House rules read from the source with `ast` (every import, also those inside functions):
no test file imports another test file or a private name of a module it does not own
(what tests share lives in tests/helpers); the layers import downwards only (zoo imports
neither rewards nor benchmarks, rewards does not import benchmarks); and the modules of zoo
and rewards import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PACKAGES = ("zoo", "rewards", "benchmarks")
"""The project's packages: the code the tests test."""


def module_name(path: Path) -> str:
    """zoo/tiny/flow.py -> zoo.tiny.flow; zoo/__init__.py -> zoo."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages, by name."""
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of `from <level dots><module> import ...` in module `importer`."""
    if not level:
        return module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(path: Path, importer: str = "") -> list[tuple[int, str, str | None]]:
    """(line, module, name) for every import in the file, at any depth: `import a.b` gives
    (line, "a.b", None), `from a import b, c` gives (line, "a", "b") and (line, "a", "c")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node.module, node.level, importer, path.name == "__init__.py")
            found += [(node.lineno, module, alias.name) for alias in node.names]
    return found


def imported_modules(path: Path, importer: str, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module of `modules`) for every import of one in the file: the module named,
    `from a import b` naming a.b where that is a module, and the packages above it, which
    Python imports first."""
    found = []
    for line, module, name in imports(path, importer):
        target = f"{module}.{name}" if name and f"{module}.{name}" in modules else module
        parts = target.split(".")
        found += [(line, ".".join(parts[:i])) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules]
    return found


def files_under_tests() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def private_module_attributes(tree: ast.AST, modules: dict[str, Path]) -> list[tuple[int, str, str, str]]:
    """(line, private name, project module, "reads" or "patches") for each private attribute
    of a project module that the code reads (`benchmarks.cli._x`, `archs._x` after `from
    benchmarks import archs`) or patches (`monkeypatch.setattr(module, "_x", ...)`)."""
    bound: dict[str, str] = {}  # a name an import binds -> the dotted name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def project_module(node: ast.expr) -> str | None:
        """The project module an expression such as `benchmarks.cli` names, if any."""
        if isinstance(node, ast.Name):
            name = bound.get(node.id)
        elif isinstance(node, ast.Attribute):
            name = project_module(node.value)
            name = name and f"{name}.{node.attr}"
        else:
            return None
        return name if name in modules else None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and (module := project_module(node.value)):
            found.append((node.lineno, node.attr, module, "reads"))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
                and len(node.args) >= 2 and (module := project_module(node.args[0]))
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and is_private(node.args[1].value)):
            found.append((node.lineno, node.args[1].value, module, "patches"))
    return found


def test_no_test_imports_another_test_or_a_private_name():
    """Every file under tests/: no import of a test_* module (shared code lives in
    tests/helpers), and no private name (a leading underscore) imported from a module
    outside tests/ or read or patched as an attribute of a project module: a name a test
    needs is made public by the module that owns it."""
    # What tests import from tests/ itself: its modules, its packages (helpers), and the
    # scripts of tests/distributed, which tests/test_distributed.py puts on sys.path.
    local = ({path.stem for folder in (TESTS, TESTS / "distributed") for path in folder.glob("*.py")}
             | {path.parent.name for path in TESTS.glob("*/__init__.py")})
    modules = project_modules()
    problems = []
    for path in files_under_tests():
        where = path.relative_to(REPO)
        for line, module, name in imports(path):
            parts = module.split(".") + ([name] if name else [])
            if any(part.startswith("test_") for part in parts):
                problems.append(f"{where}:{line}: imports the test module {'.'.join(parts)}")
            elif parts[0] == "tests":
                # tests.helpers.x would be a second copy of helpers.x, patched and counted apart.
                problems.append(f"{where}:{line}: imports {module} through the tests package; import it from tests/")
            elif parts[0] not in local and (private := [part for part in parts if is_private(part)]):
                problems.append(f"{where}:{line}: imports the private name {private[0]} of {module}")
        tree = ast.parse(path.read_text(), str(path))
        for line, name, module, how in private_module_attributes(tree, modules):
            problems.append(f"{where}:{line}: {how} the private name {name} of {module}")
    assert not problems, "\n".join(problems)


def test_the_layers_import_downwards_only():
    """zoo (the algorithms and models) imports neither rewards nor benchmarks, and rewards
    does not import benchmarks: each layer runs without the ones above it."""
    forbidden = {"zoo": ("rewards", "benchmarks"), "rewards": ("benchmarks",)}
    problems = []
    for name, path in project_modules().items():
        layer = name.split(".")[0]
        for line, module, _ in imports(path, name):
            if module.split(".")[0] in forbidden.get(layer, ()):
                problems.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {module}")
    assert not problems, "\n".join(problems)


def import_graph(packages: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """module -> {module it imports: the line of the first such import}, over the modules
    of `packages`."""
    modules = {name: path for name, path in project_modules().items() if name.split(".")[0] in packages}
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for line, target in imported_modules(path, name, modules):
            if target != name:
                edges.setdefault(target, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of the graph as the modules along it (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_among_the_modules_of_zoo_and_rewards():
    graph = import_graph(("zoo", "rewards"))
    assert len(graph) > 40  # the walk found the modules
    cycle = find_cycle(graph)
    modules = project_modules()
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} ({modules[a].relative_to(REPO)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])
    ) + f" -> {cycle[-1]}"


def test_the_cycle_finder_finds_a_cycle_and_names_it():
    """The checker itself, on a made-up graph: a -> b -> c -> a, with a tail d -> a."""
    graph = {"d": {"a": 1}, "a": {"b": 2}, "b": {"c": 3}, "c": {"a": 4}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 2, "b": 3}}) is None
