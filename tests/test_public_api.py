"""The public surface: API.md's names import from where it says, ``__all__`` matches what
each module defines (anyio's test_all_attributes), and the pure core imports no I/O."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import interpreters
import stroma

ROOT = Path(__file__).resolve().parent.parent

# Every name API.md lists, by the module its heading names.
API: dict[str, tuple[str, ...]] = {
    "stroma.trace": ("RunStatus", "TraceEvent", "ExecutionTrace", "ExecutionResult"),
    "stroma.failures": (
        "FailureClass", "FailurePolicy", "default_policy_map", "NodeContext", "StepContext",
        "Classifier", "classify", "RetryBudget",
    ),
    "stroma.contracts": (
        "NodeContract", "StepContract", "StepViolation", "ContractViolation",
        "BoundaryValidator", "ContractRegistry",
    ),
    "stroma.cost": (
        "KNOWN_MODELS", "estimate_cost_usd", "ExecutionBudget", "NodeUsage", "StepUsage",
        "BudgetExceeded", "CostTracker", "ModelHint", "FallbackPolicy", "resolve_model",
    ),
    "stroma.checkpoint": (
        "CheckpointStore", "AsyncCheckpointStore", "InMemoryStore", "AsyncInMemoryStore",
        "CheckpointKey", "RedisStore", "SyncRedisStore", "CheckpointManager", "_schema_ref",
        "_resolve_schema",
    ),
    "stroma.runner": (
        "NodeHooks", "StepHooks", "RunConfig", "StromaRunner", "stroma_node", "stroma_step",
        "parallel", "interpret",
    ),
    "stroma.middleware": ("ReliabilityContext", "execute_step", "StromaStep"),
}

ALIASES = [
    ("StepContext", "NodeContext"),
    ("StepContract", "NodeContract"),
    ("StepViolation", "ContractViolation"),
    ("StepUsage", "NodeUsage"),
    ("StepHooks", "NodeHooks"),
    ("stroma_step", "stroma_node"),
]


@pytest.mark.parametrize(
    ("module_name", "name"),
    [(m, n) for m, names in API.items() for n in names],
    ids=lambda v: v,
)
def test_api_name_imports_from_stroma_and_its_module(module_name: str, name: str) -> None:
    """Each API.md name imports from ``stroma`` and from its module, as the same object."""
    module = importlib.import_module(module_name)
    from_module = getattr(module, name)
    from_package = getattr(stroma, name)
    assert from_module is from_package
    assert name in stroma.__all__
    assert name in module.__all__


@pytest.mark.parametrize(("alias", "target"), ALIASES)
def test_aliases_are_the_same_objects(alias: str, target: str) -> None:
    """The ``Step*`` names of API.md are aliases of the ``Node*`` ones, not copies."""
    assert getattr(stroma, alias) is getattr(stroma, target)


def test_star_import_gives_exactly_all() -> None:
    """``from stroma import *`` binds every name of ``__all__`` (lazy store names included)."""
    namespace: dict[str, object] = {}
    exec("from stroma import *", namespace)
    exported = {k for k in namespace if k != "__builtins__"}
    assert exported == set(stroma.__all__)


# ------------------------------------------------------------------------------ __all__


def _public_modules() -> list[str]:
    names = ["stroma", "interpreters"]
    for package in (stroma, interpreters):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue
            names.append(info.name)
    return sorted(names)


PUBLIC_MODULES = _public_modules()


def _defined_names(module: ModuleType) -> set[str]:
    """Public names a module binds itself at top level (defs, classes, assignments), not
    names it imports."""
    tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
    names: set[str] = set()

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Name):
            return [node.id]
        if isinstance(node, ast.Tuple | ast.List):
            return [n for elt in node.elts for n in targets(elt)]
        return []

    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(targets(target))
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            names.update(targets(node.target))
    return {n for n in names if not n.startswith("_")}


def test_every_public_module_was_found() -> None:
    """The module walk sees the modules API.md names (so the checks below cover them)."""
    assert set(API) <= set(PUBLIC_MODULES)
    assert {"stroma.machine", "stroma.plan", "interpreters.live"} <= set(PUBLIC_MODULES)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_a_tuple_of_existing_names(module_name: str) -> None:
    """``__all__`` is a tuple without duplicates, and every name in it exists."""
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, tuple), f"{module_name}.__all__ must be a tuple"
    assert len(set(exported)) == len(exported), f"duplicates in {module_name}.__all__"
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == [], f"{module_name}.__all__ names what it does not have: {missing}"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_definition_is_in_all(module_name: str) -> None:
    """Every public name a module defines itself is listed in its ``__all__``."""
    module = importlib.import_module(module_name)
    unlisted = sorted(_defined_names(module) - set(getattr(module, "__all__", ())))
    assert unlisted == [], (
        f"{module_name} defines public names missing from __all__: {unlisted} "
        "(add them to __all__, or rename them with a leading underscore)"
    )


# ------------------------------------------------------------------------ pure core

# The facade and entry points may reach the interpreters; everything else is the pure core.
NOT_CORE = {"runner.py", "middleware.py", "checkpoint.py", "__init__.py", "__main__.py",
            "cli.py", "demo.py"}
FORBIDDEN = {"anyio", "aiofiles", "time", "random", "asyncio", "trio", "interpreters"}
CORE_FILES = sorted(p for p in (ROOT / "stroma").glob("*.py") if p.name not in NOT_CORE)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_core_files_were_found() -> None:
    """The core the AST check covers includes the machine, plan and effects."""
    names = {p.name for p in CORE_FILES}
    assert {"machine.py", "plan.py", "effects.py", "trace.py", "cost.py"} <= names


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_module_imports_no_io(path: Path) -> None:
    """A core module imports none of anyio, aiofiles, time, random, asyncio, trio or
    interpreters (at top level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [
        f"line {line}: {name}" for line, name in _imports(tree)
        if name.split(".", 1)[0] in FORBIDDEN
    ]
    assert bad == [], f"stroma/{path.name} imports I/O modules: {bad}"


def test_import_check_sees_every_form() -> None:
    """The AST check catches plain, dotted, from- and dynamic imports (so it can fail)."""
    code = (
        "import time\nimport anyio.abc\nfrom random import random\n"
        "def f():\n    from interpreters.live import LivePerformer\n"
        "    importlib.import_module('trio')\n    __import__('asyncio')\n"
    )
    assert [name for _, name in _imports(ast.parse(code))] == [
        "time", "anyio.abc", "random", "interpreters.live", "trio", "asyncio"
    ]
