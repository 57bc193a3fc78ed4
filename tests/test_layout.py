"""The package layout: the library imports no tooling, has no import cycle, and no script edits
sys.path (a module-level import graph read with ast, so nothing is imported to check it)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "seesaw_ecm"


def _module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, module_level_only=True):
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            # `from . import x` / `from .pkg import mod`: the submodule, when it is one
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: sorted(n for n in _imports(path) if n in modules and n != name)
            for name, path in modules.items()}


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_library_has_no_module_level_import_cycle():
    graph = _graph()
    assert len(graph) > 40 and graph["seesaw_ecm.modeling.roi_heads"]  # the graph was read
    assert _cycles(graph) == []


def test_library_imports_no_tooling():
    """Nothing in seesaw_ecm imports the repository's scripts (also inside functions)."""
    tooling = ("benchmarks", "tools", "tests", "train_net")
    bad = {str(p.relative_to(REPO)): names for p in PACKAGE.rglob("*.py")
           if (names := [n for n in _imports(p, module_level_only=False)
                         if n.split(".")[0] in tooling])}
    assert bad == {}


def test_no_script_or_test_edits_sys_path():
    offenders = []
    for folder in ("seesaw_ecm", "benchmarks", "tools", "tests", "datasets"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and node.attr == "path"
                        and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                    offenders.append(str(path.relative_to(REPO)))
    offenders += [p for p in ("train_net.py",) if "sys.path" in (REPO / p).read_text()]
    assert offenders == []
