"""The direction of the house (docs/architecture.md): the ROS package and the training package
stand on the core and never on each other, and the core has no import cycle.

Imports are read from the source (AST), at any depth: a lazy import inside a function is
still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "src" / "lidar_completion"


def _imports(path: Path, module: str = "") -> set[str]:
    """Absolute names of every module the file ``path`` (module ``module``, e.g.
    ``lidar_completion.sparse``) imports, plus string arguments of ``importlib.import_module``
    / ``__import__``. ``from .x import y`` counts as both ``x`` and ``x.y`` (y may be a module)."""
    parts = module.split(".") + (["__init__"] if path.name == "__init__.py" else [])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(parts[: len(parts) - node.level])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


def test_no_module_under_ros2_ws_imports_the_training_package() -> None:
    offenders = sorted(
        f"{path.relative_to(REPO)}: {name}"
        for path in (REPO / "ros2_ws").rglob("*.py")
        for name in _imports(path, f"lidar_completion_ros.{path.stem}")
        if name.split(".")[0] == "lidar_completion_training"
    )
    assert not offenders, "the ROS package must not import the training package (run it as a command):\n" + "\n".join(offenders)


def test_the_core_imports_neither_the_ros_nor_the_training_package() -> None:
    offenders = sorted(
        f"{path.relative_to(REPO)}: {name}"
        for path in CORE.rglob("*.py")
        for name in _imports(path, f"lidar_completion.{path.stem}")
        if name.split(".")[0] in ("lidar_completion_training", "lidar_completion_ros", "rclpy")
    )
    assert not offenders, "\n".join(offenders)


def _core_graph() -> dict[str, set[str]]:
    """``module -> core modules it imports`` over ``src/lidar_completion``."""
    modules = {f"lidar_completion.{p.stem}": p for p in CORE.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in modules if m != name and any(i == m or i.startswith(m + ".") for i in _imports(path, name))}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path back to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_core() -> None:
    graph = _core_graph()
    assert "lidar_completion.sparse" in graph and graph["lidar_completion.completer"]  # the scan reads something
    cycle = _cycle(graph)
    assert cycle is None, "import cycle in src/lidar_completion: " + " -> ".join(cycle)


def _project_sources() -> list[Path]:
    return [p for top in ("src", "training", "ros2_ws") for p in (REPO / top).rglob("*.py")]


def test_only_minkowski_py_imports_minkowski_engine() -> None:
    importers = sorted(str(path.relative_to(REPO)) for path in _project_sources()
                       if any(name.split(".")[0].startswith("MinkowskiEngine") for name in _imports(path)))
    assert importers == ["src/lidar_completion/minkowski.py"]


def test_only_spconv_backend_py_imports_spconv() -> None:
    importers = sorted(str(path.relative_to(REPO)) for path in _project_sources()
                       if any(name.split(".")[0] in ("spconv", "cumm") for name in _imports(path)))
    assert importers == ["src/lidar_completion/spconv_backend.py"]


def test_backend_names_are_checked_in_one_place() -> None:
    """No comparison with a backend's name outside lidar_completion.backends: every setting
    that takes one calls ``check_backend``, the model asks ``get_backend``."""
    from lidar_completion.backends import BACKENDS

    offenders = []
    for path in _project_sources():
        if path.name == "backends.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                constants = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]
                if any(c in BACKENDS for c in constants):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, "backend names compared outside lidar_completion/backends.py: " + ", ".join(offenders)
