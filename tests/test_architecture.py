"""The shape of the package, read from its source with ``ast``: no import cycles, no stage imports
another stage, lower layers import no stage, and nothing but the entry points imports the CLI."""

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "ftdeploy"
STAGES = {"train", "prune", "export", "quantize", "usability"}
ENTRY_POINTS = {"cli", "pipeline", "optimize", "__main__", "train.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``: names for type hints, never imported at run time."""
    return {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
            for stmt in block.body for n in ast.walk(stmt)}


def imported(path: Path, name: str) -> set[str]:
    """ftdeploy modules that ``path`` imports, anywhere in the file (function-level imports too; type
    hints under ``if TYPE_CHECKING:`` are not imports)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text())
    hints = type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif (node.module or "").startswith("ftdeploy"):
                target = node.module.removeprefix("ftdeploy").lstrip(".")
            else:
                continue
            candidates = [f"{target}.{a.name}".lstrip(".") for a in node.names] if not node.module else [target]
            found.update(candidates)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("ftdeploy.") for a in node.names if a.name.startswith("ftdeploy."))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # "from . import __version__" names the package root, which is not a module of the graph
        graph[name] = {m for m in imported(path, name) if m in modules and m != ""}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_the_shape_of_the_architecture():
    graph = import_graph()
    assert {"train", "prune", "export", "quantize", "cli", "rundir", "evaluation", "gates", "latency"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    problems = []
    for module, targets in graph.items():
        if module in ENTRY_POINTS:
            continue
        for target in targets & ENTRY_POINTS:
            problems.append(f"{module} imports the entry point {target}")
        for target in targets & STAGES:
            kind = "stage" if module in STAGES else "lower layer"
            problems.append(f"{kind} {module} imports the stage {target}")
    assert not problems, "\n".join(problems)


def test_tasks_never_import_the_server_nor_a_stage():
    """A task's codec is HTTP-free: bytes and a content type in, a batch out. Its errors and limits
    live on the base floor (errors, codecs), so tasks/ imports nothing of the server (which imports
    the tasks): no circle through tasks/, onnx_model and serve."""
    graph = import_graph()

    def reached(module: str, seen: set[str]) -> set[str]:
        for nxt in graph[module] - seen:
            seen.add(nxt)
            reached(nxt, seen)
        return seen

    for module in [m for m in graph if m == "tasks" or m.startswith("tasks.")]:
        below = reached(module, set())  # everything it imports, directly or not
        server = {m for m in below if m == "serve" or m.startswith("serve.")}
        assert not server and not below & ({"cli", "pipeline", "optimize"} | STAGES), (module, below)


def test_the_checker_sees_a_cycle_and_a_stage_to_stage_import(tmp_path):
    """The test above would fail on a reintroduced knot: shown on a graph with one."""
    knotted = import_graph()
    knotted["rundir"] = knotted["rundir"] | {"prune"}
    assert find_cycle(knotted) is not None
    assert "export" in imported(PACKAGE / "pipeline.py", "pipeline")  # function-level imports are read too
    (tmp_path / "x.py").write_text("from .export import export\nfrom ..cli import main\nimport ftdeploy.quantize\n"
                                   "if TYPE_CHECKING:\n    from .serve import app\n")
    assert imported(tmp_path / "x.py", "train.x") == {"train.export", "cli", "quantize"}


TASK_NAMES = re.compile(r"image_classification|text_classification|ImageClassification|TextClassification")
# where a task's name may be written: the tasks themselves and the config's choice of one
MAY_NAME_TASKS = {"tasks", "config"}


def task_name_mentions(package: Path) -> list[str]:
    """``module:line`` of every task name written outside the tasks and the config."""
    found = []
    for path in sorted(package.rglob("*.py")):
        name = ".".join(path.relative_to(package).with_suffix("").parts)
        if name.split(".")[0] in MAY_NAME_TASKS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if TASK_NAMES.search(line):
                found.append(f"{name}:{number}")
    return found


def test_no_stage_or_server_branches_on_a_task_name(tmp_path):
    assert task_name_mentions(PACKAGE) == []
    # the check sees one
    (tmp_path / "serve.py").write_text('if model.task.name == "text_classification":\n    pass\n')
    assert task_name_mentions(tmp_path) == ["serve:1"]
