"""The package's import graph, read from the source (function-level imports included): no
cycles, and the arrows DESIGN.md forbids are absent."""

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpt_neo"

MODEL = "gpt_neo.models"
DATA = (
    "gpt_neo.data.encoders",
    "gpt_neo.data.corpus",
    "gpt_neo.data.tfrecords",
    "gpt_neo.data.pipeline",
    "gpt_neo.data.dataset_config",
)
TRAINING = (
    "gpt_neo.training.loop",
    "gpt_neo.training.optim",
    "gpt_neo.training.checkpoint.checkpointer",
    "gpt_neo.training.metrics",
)
CLI = "gpt_neo.cli"
# (importer prefixes, forbidden imported prefixes, why)
NEVER = [
    ((MODEL,), DATA + TRAINING + (CLI,), "the model never imports data, training or CLI code"),
    (("gpt_neo.config", "gpt_neo.mesh"), (MODEL,), "config and mesh never import the model"),
    (DATA, (MODEL,), "the pipeline never imports the model"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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
    """Package modules `path` imports anywhere in its body."""
    return set().union(*(imported(n, modules) for n in ast.walk(ast.parse(path.read_text()))))


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


def test_the_package_import_graph_has_no_cycle(graph):
    assert len(graph) > 25  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle(graph):
    planted = {**graph, "gpt_neo.config": graph["gpt_neo.config"] | {"gpt_neo.models.gpt"}}
    cycle = find_cycle(planted)
    assert cycle is not None and cycle[0] == cycle[-1] and "gpt_neo.config" in cycle


def within(module: str, packages) -> bool:
    """Whether `module` is one of `packages` or inside one (gpt_neo.interop.mesh_tf is not gpt_neo.mesh)."""
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("importers, forbidden, why", NEVER, ids=[n[2] for n in NEVER])
def test_forbidden_arrows_are_absent(graph, importers, forbidden, why):
    bad = [
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if within(a, importers) and within(b, forbidden)
    ]
    assert not bad, f"{why}: {bad}"


def test_nothing_in_the_library_imports_the_cli(graph):
    bad = [
        (a, b) for a, t in graph.items() for b in t if b.startswith(CLI) and not a.startswith(CLI)
    ]
    assert not bad


def test_config_imports_only_the_errors_module(graph):
    assert graph["gpt_neo.config.schema"] == {"gpt_neo.errors", "gpt_neo.config.moe"}
    assert graph["gpt_neo.config.moe"] == {"gpt_neo.errors"}
    assert graph["gpt_neo.errors"] == set() and graph["gpt_neo.axes"] == set()


def test_function_level_imports_of_the_package_are_only_the_deliberate_ones():
    """A function-level import that dodges a cycle hides a design problem; the allowed ones
    are there so that `import gpt_neo` and the command line start without JAX."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    deliberate = {
        ("gpt_neo", "gpt_neo.config"),  # load_config: mesh imports JAX, loaded on first use
        ("gpt_neo", "gpt_neo.mesh"),
        ("gpt_neo.cli.main", "gpt_neo.cli.commands"),  # after --tpu/--gpu_ids chose a platform
    }
    found = {
        (module_name(p), target)
        for p in PACKAGE.rglob("*.py")
        for target in function_level_imports(p, modules)
    }
    assert found == deliberate


def test_import_gpt_neo_and_its_command_line_start_without_jax_or_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, gpt_neo, gpt_neo.cli.main, gpt_neo.config, gpt_neo.launch.platform;"
        "print(sorted(m for m in ('jax', 'tensorflow', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_forbidden_family_names_real_modules(graph):
    prefixes = set(itertools.chain.from_iterable(imp + forb for imp, forb, _ in NEVER))
    for prefix in prefixes:
        assert any(m.startswith(prefix) for m in graph), prefix
