"""The house's import rules: no cycles among module-level imports, every module imports on its
own in a fresh interpreter, and the data layer and the model registry load no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("milbench", "preprocessing")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def module_level_imports(name: str, path: Path, modules: dict[str, Path],
                         tree: ast.Module | None = None) -> set[str]:
    """Project modules imported when ``name`` is imported: module-level statements (a
    ``TYPE_CHECKING`` block excepted), each with the packages above it."""
    tree = tree or ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for statement in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
            if isinstance(statement, ast.Import):
                targets.update(alias.name for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom):
                base = statement.module or ""
                if statement.level:
                    anchor = package.split(".")[: len(package.split(".")) - statement.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in statement.names:
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
    found = set()
    for target in targets:
        parts = target.split(".")
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            if ".".join(parts[:end]) in modules:
                found.add(".".join(parts[:end]))
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            # A package's __init__ importing its own submodule is not a cycle of the graph.
            if node.startswith(target + "."):
                continue
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_among_module_level_imports():
    modules = project_modules()
    graph = {name: module_level_imports(name, path, modules) for name, path in modules.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_import_cycle_at_all():
    """Function-level imports too, inside a room as across rooms: only the package's lazy
    re-export of the notebook API (FACADE) runs back up."""
    modules = project_modules()
    graph = {name: all_imports(path, name, modules) - {t for (s, t) in FACADE if s == name}
             for name, path in modules.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


# Runs in a fresh interpreter: third-party libraries are loaded once, then every project module
# is imported in its own forked child (one per core at a time), which starts with no project
# module loaded: the same as a fresh interpreter for the questions asked here, at a fraction of
# the cost. A child exits 1 where the import fails and 2 where it loaded a model module.
IMPORT_EACH = """
import importlib, os, sys, traceback
for library in ("numpy", "pandas", "scipy", "sklearn", "torch", "torchvision", "xgboost",
                "lightgbm", "cv2", "PIL", "matplotlib", "ot", "rich", "typer", "pydantic", "yaml"):
    try:
        importlib.import_module(library)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] in ("milbench", "preprocessing")]
outcome, running = {1: [], 2: []}, {}
def reap():
    pid, status = os.wait()
    code = os.waitstatus_to_exitcode(status)
    if code:
        outcome.get(code, outcome[1]).append(running[pid])
    del running[pid]
for module in sys.argv[1:]:
    if len(running) >= (os.cpu_count() or 1):
        reap()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(2 if any(m.startswith("milbench.models") for m in sys.modules) else 0)
    running[pid] = module
while running:
    reap()
print("FAILED", *sorted(outcome[1]))
print("LOADS_MODELS", *sorted(outcome[2]))
"""


@pytest.fixture(scope="module")
def import_each() -> dict[str, list[str]]:
    """Each project module imported alone: the modules whose import failed, and those that loaded a
    model module."""
    modules = sorted(m for m in project_modules() if not m.endswith(".__main__"))
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, *modules], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = dict(line.split(" ", 1) if " " in line else (line, "")
                 for line in result.stdout.strip().splitlines())
    assert set(lines) == {"FAILED", "LOADS_MODELS"}, result.stdout + result.stderr[-4000:]
    return {key: value.split() for key, value in lines.items()} | {"stderr": result.stderr[-4000:]}


def test_every_module_imports_alone_in_a_fresh_interpreter(import_each):
    assert import_each["FAILED"] == [], import_each["stderr"]
    assert "milbench.models.dmil" in import_each["LOADS_MODELS"]  # the check sees model loads


def test_preprocessing_never_loads_a_model(import_each):
    assert [m for m in import_each["LOADS_MODELS"] if m.startswith("preprocessing")] == []


@pytest.mark.parametrize("module", ["milbench.data", "milbench.models", "milbench.config",
                                    "milbench.core.clinical", "milbench.synth"])
def test_light_modules_load_no_torch_and_no_model(module):
    code = (f"import sys, {module}; "
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('milbench.models.') "
            "and m not in ('milbench.models.registry', 'milbench.models.spec')); print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# The rooms of docs/architecture.md, lowest first: a module may import its own room and rooms below.
LAYERS = [
    ("core", ("milbench", "milbench.core", "milbench.io", "milbench.progress", "milbench.plots",
              "milbench.training")),
    ("data", ("milbench.data", "milbench.synth")),
    ("preprocessing", ("preprocessing",)),
    ("models", ("milbench.models", "milbench.slides", "milbench.semisup")),
    ("evaluation", ("milbench.evaluation",)),
    ("ensemble", ("milbench.ensemble",)),
    ("execution", ("milbench.execution",)),
    ("configuration and records", ("milbench.config", "milbench.runs", "milbench.submit")),
    ("run support", ("milbench.data_roots", "milbench.preflight", "milbench.source_set",
                     "milbench.preparation", "milbench.run_cv", "milbench.instances", "milbench.report",
                     "milbench.tracking", "milbench.saved")),
    ("orchestration", ("milbench.pipeline", "milbench.ablation", "milbench.tune", "milbench.bench",
                       "milbench.prediction")),
    ("wiring", ("milbench.cli", "milbench.__main__", "milbench.api")),
]
# The one import that runs up on purpose: the package re-exports the notebook API (milbench.run,
# milbench.load_model, ...), importing it on first use only.
FACADE = {("milbench", "milbench.api")}


def layer_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                    best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} belongs to no room of LAYERS"
    return best[0]


def all_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    body = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    return module_level_imports(name, path, modules, ast.Module(body=body, type_ignores=[]))


def test_imports_run_one_way_down_the_rooms():
    modules = project_modules()
    upward = []
    for name, path in modules.items():
        for target in all_imports(path, name, modules):
            if layer_of(target) > layer_of(name) and (name, target) not in FACADE:
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(sorted(upward))


MAX_MODULE_LINES = 450


def test_no_module_is_longer_than_the_house_limit():
    """A module over 450 lines holds more than one job: split it by job (docs/architecture.md)."""
    long = {name: n for name, path in project_modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
