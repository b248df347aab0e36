"""The package's shape: the import graph, function-level imports included, has no cycle; the lower stages
never import the upper ones; no module over 400 lines and no function over 60. Read from the source with
`ast`, so nothing is imported and the test takes well under a second."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mobiletune"
LOWER = ("data", "model", "features")  # the stages every other one builds on
UPPER = ("training", "tuning", "ship", "report", "cli", "api")  # what the lower stages must never import
# Every stage in the order the README's Development section lists them: each imports only those before it
STAGES = ("data", "model", "features", "tracking", "report", "evaluation", "audit", "ship", "training", "tuning")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body. `from pkg import name` counts as
    importing `pkg.name` where that is a module, else `pkg`."""
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        deps = graph.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                for alias in node.names:
                    deps.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
        deps.discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_checks_see_a_cycle_and_a_layering_breach():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from mobiletune.training import loop\n")
    modules = {"mobiletune.data.x": tree, "mobiletune.training.loop": ast.parse(""),
               "mobiletune.training": ast.parse("")}
    assert import_graph(modules)["mobiletune.data.x"] == {"mobiletune.training.loop"}


def test_no_import_cycles_counting_function_level_imports():
    graph = import_graph(_modules())
    assert len(graph) > 30 and sum(map(len, graph.values())) > 100  # the scan sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_cycles_between_stages():
    stages: dict[str, set[str]] = {}
    for module, deps in import_graph(_modules()).items():
        stages.setdefault(_stage(module), set()).update(_stage(d) for d in deps if _stage(d) != _stage(module))
    stages.pop("", None)  # the top level (api, cli, config, errors, runfolder) is not a stage
    assert find_cycle({s: {d for d in deps if d} for s, deps in stages.items()}) is None


def test_each_stage_imports_only_the_stages_before_it():
    found = {s.parent.name for s in PACKAGE.glob("*/__init__.py")} - {"cli"}
    assert found == set(STAGES), found ^ set(STAGES)
    breaches = sorted(f"{m} imports {d}" for m, deps in import_graph(_modules()).items() if _stage(m) in STAGES
                      for d in deps if _stage(d) in STAGES and STAGES.index(_stage(d)) > STAGES.index(_stage(m)))
    assert not breaches, breaches
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    block = readme[readme.index("\n```\ndata/"):]
    listed = [line.split("/")[0] for line in block.split("```")[1].strip().splitlines()]
    assert tuple(listed) == STAGES


@pytest.mark.parametrize("lower", LOWER)
def test_lower_stages_never_import_upper_ones(lower):
    graph = import_graph(_modules())
    breaches = sorted(f"{m} imports {d}" for m, deps in graph.items() if _stage(m) == lower
                      for d in deps if _stage(d) in UPPER or d.removeprefix("mobiletune.") in UPPER)
    assert not breaches, breaches


def test_every_subpackage_names_its_one_job():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 20, f"{init.parent.name}/__init__.py has no docstring naming its job"


def test_module_and_function_sizes():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.startswith("# Generated by scripts/"):
            continue  # flatc's output, checked against a fresh generation instead (scripts/generate-metadata-schema)
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if (lines := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, too_long


def test_the_version_is_the_one_pyproject_declares():
    import tomllib

    from mobiletune.version import __version__

    assert __version__ == tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["project"]["version"]


def test_no_submodule_shadows_a_public_name():
    """Importing `mobiletune.x` sets the package's attribute `x` to that module: a subpackage named like a
    public function (`mt.sweep`) would replace it."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    public = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets))
    submodules = {p.stem if p.name != "__init__.py" else p.parent.name for p in PACKAGE.glob("*.py")}
    submodules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert len(public) > 5 and not submodules & set(public), submodules & set(public)
