"""The whiteboard, as a test: which package may import which, read from the source (every
import statement, function-level ones included). One table holds every allowed edge; any other
edge fails, and so does a cycle, argparse outside `cli/`, or JAX on `import gpt_neo`.

Imports under `if TYPE_CHECKING:` are left out: they never run (a module may name, in its
annotations, a type defined by a module that imports it).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpt_neo"

# Modules that import nothing of ours.
LEAVES = {
    "gpt_neo.errors",
    "gpt_neo.storage",
    "gpt_neo.axes",
    "gpt_neo.hardware",
    "gpt_neo.compilation_cache",
}
BASE = {"gpt_neo.config", "gpt_neo.mesh", *LEAVES}
MODEL_AND_DATA = {"gpt_neo.models", "gpt_neo.data", *BASE}
BELOW_INTEROP = {"gpt_neo.training", "gpt_neo.inference", *MODEL_AND_DATA}
# Each unit (a package, a flat module) and the units it may import besides itself.
ALLOWED: dict[str, set[str]] = {
    **{leaf: set() for leaf in LEAVES},
    "gpt_neo.config": {"gpt_neo.errors"},
    "gpt_neo.mesh": {"gpt_neo.config", *LEAVES},
    "gpt_neo.models": BASE,
    "gpt_neo.data": {"gpt_neo.config", *LEAVES},
    "gpt_neo.training": MODEL_AND_DATA,
    "gpt_neo.inference": MODEL_AND_DATA,
    "gpt_neo.interop": BELOW_INTEROP,
    "gpt_neo.planning": BELOW_INTEROP,
    "gpt_neo.launch": {"gpt_neo.interop", "gpt_neo.planning", *BELOW_INTEROP},
    "gpt_neo.cli": {
        "gpt_neo",
        "gpt_neo.launch",
        "gpt_neo.interop",
        "gpt_neo.planning",
        *BELOW_INTEROP,
    },
    # the facade: `import gpt_neo` stays light; its other names load by importlib on first use
    "gpt_neo": BASE,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The table's unit a module belongs to: the longest entry it is or lies inside."""
    inside = [u for u in ALLOWED if module == u or module.startswith(u + ".")]
    return max(inside, key=len) if module != "gpt_neo" else "gpt_neo"


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def imported(node: ast.AST, modules: set[str]) -> set[str]:
    """The package modules an import statement depends on."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from gpt_neo import axes` depends on gpt_neo.axes, not on the package facade
        names = [f"{node.module}.{alias.name}" for alias in node.names]
        if not all(name in modules for name in names):
            names.append(node.module)
    else:
        return set()
    return {name for name in names if name in modules}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Package modules `path` imports anywhere in its body (at run time)."""
    tree = ast.parse(path.read_text())
    return set().union(*(imported(n, modules) for n in runtime_nodes(tree)))


def function_level_imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules imported inside a function body."""
    functions = [
        f
        for f in ast.walk(ast.parse(path.read_text()))
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    return set().union(*(imported(n, modules) for f in functions for n in ast.walk(f)))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    """Every import the table does not allow, as `a -> b (unit a may not import unit b)`."""
    bad = []
    for module, targets in sorted(graph.items()):
        unit = unit_of(module)
        for target in sorted(targets):
            other = unit_of(target)
            if other != unit and other not in ALLOWED[unit]:
                bad.append(f"{module} -> {target} ({unit} may not import {other})")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(node):
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            if cycle := visit(target):
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node):
            return cycle
    return None


def test_every_module_is_in_a_unit_of_the_table(graph):
    assert len(graph) > 60  # the walk found the package
    assert all(unit_of(module) in ALLOWED for module in graph)
    assert {unit_of(m) for m in graph} == set(ALLOWED)  # and no entry of the table is stale


def test_every_import_is_one_the_table_allows(graph):
    assert forbidden_edges(graph) == []


def test_a_planted_edge_is_caught(graph):
    """Sampling from the training loop (the knot the loop's hooks untied) fails the table."""
    planted = {**graph, "gpt_neo.training.loop": graph["gpt_neo.training.loop"] | {
        "gpt_neo.inference.predict"
    }}  # fmt: skip
    assert forbidden_edges(planted) == [
        "gpt_neo.training.loop -> gpt_neo.inference.predict "
        "(gpt_neo.training may not import gpt_neo.inference)"
    ]


def test_the_import_graph_has_no_cycle(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    planted = {**graph, "gpt_neo.config.schema": graph["gpt_neo.config.schema"] | {
        "gpt_neo.models.gpt"
    }}  # fmt: skip
    cycle = find_cycle(planted)
    assert cycle is not None and cycle[0] == cycle[-1] and "gpt_neo.config.schema" in cycle


def test_argparse_is_imported_under_cli_only():
    users = sorted(
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if any(
            isinstance(node, ast.Import | ast.ImportFrom)
            and "argparse" in {getattr(node, "module", None), *(a.name for a in node.names)}
            for node in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert users and all(name.startswith("gpt_neo.cli") for name in users), users


def test_function_level_imports_of_the_package_are_only_the_deliberate_ones():
    """A function-level import that dodges a cycle hides a design problem; the allowed ones
    are there so that `import gpt_neo` and every `--help` start without JAX: the facade's lazy
    names, and each command of `cli/` importing the library it drives when it runs."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    deliberate = {
        ("gpt_neo", "gpt_neo.config"),  # load_config: mesh imports JAX, loaded on first use
        ("gpt_neo", "gpt_neo.mesh"),
        ("gpt_neo.cli.run", "gpt_neo.cli.commands"),  # after --tpu/--gpu_ids chose a platform
    }
    found = {
        (module_name(p), target)
        for p in PACKAGE.rglob("*.py")
        for target in function_level_imports(p, modules)
    }
    in_commands = {
        (source, target)
        for source, target in found
        if source.startswith("gpt_neo.cli.") and not target.startswith("gpt_neo.cli")
    }
    assert in_commands, "the commands import the library when they run (the parsers, never)"
    assert found - in_commands == deliberate


@pytest.mark.process
def test_import_gpt_neo_and_its_command_line_start_without_jax_or_tensorflow():
    code = (
        "import sys, gpt_neo, gpt_neo.cli.main, gpt_neo.config, gpt_neo.launch.platform;"
        "print(sorted(m for m in ('jax', 'tensorflow', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
