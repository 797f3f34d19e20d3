"""The import graph among stpnet's modules has no cycle.

Every ``import`` / ``from ... import`` of an stpnet module counts, at module level and inside
functions alike (a function-level import that only breaks a cycle hides the cycle, it does not
remove it); only imports under ``if TYPE_CHECKING:`` are left out, since they never run. Importing
``stpnet.a.b`` also runs the package ``stpnet.a`` on the way, so there is an edge to each such
package that the importer is not itself inside (a package's own modules run inside it), and to
the module named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stpnet

PACKAGE_DIR = Path(stpnet.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ["stpnet", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _imported(module: str, path: Path, is_package: bool, modules) -> dict[str, int]:
    """The stpnet modules ``module`` imports (with the line of the first such import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = module if is_package else module.rpartition(".")[0]
    targets: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        while name and name not in modules:  # an attribute of a module: the module
            name = name.rpartition(".")[0]
        parts = name.split(".")
        for end in range(1, len(parts)):  # the packages run on the way, but for the importer's own
            prefix = ".".join(parts[:end])
            if not (module + ".").startswith(prefix + ".") and prefix in modules:
                targets.setdefault(prefix, line)
        if name != module:  # what it names, even its own package (``from . import something``)
            targets.setdefault(name, line)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stpnet":
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "stpnet":
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                add(full if full in modules else source, node.lineno)
    return targets


def import_graph() -> dict[str, dict[str, int]]:
    """Each stpnet module -> {imported stpnet module: line of the import}."""
    modules = _modules()
    return {name: _imported(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_sees_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 1}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    # stpnet.compress imports the format registry at module level, relatively
    assert "stpnet.formats" in graph["stpnet.compress"]
    assert "stpnet.nn.base" in graph["stpnet.nn.conv"]
    assert len(graph) > 50


def test_no_import_cycle_among_stpnet_modules():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} imports {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle among stpnet modules:\n  " + "\n  ".join(steps))


def test_only_the_application_layer_imports_it():
    graph = import_graph()
    app = [m for m in graph if m == "stpnet.app" or m.startswith("stpnet.app.")]
    assert "stpnet.app.cli" in app and "stpnet.app.pipeline" in app
    assert "stpnet.app.pipeline" in graph["stpnet.app.cli"]  # the checker sees imports within the app
    for module, targets in graph.items():
        if module in app or module == "stpnet":  # stpnet/__init__.py may re-export public names
            continue
        reached = [t for t in targets if t == "stpnet.app" or t.startswith("stpnet.app.")]
        assert not reached, f"{module} imports the application layer: {reached}"


def test_the_layers_never_import_their_deployment_forms():
    graph = import_graph()
    for module, targets in graph.items():
        if module == "stpnet.nn" or module.startswith("stpnet.nn."):
            reached = [t for t in targets if t.startswith("stpnet.deploy")]
            assert not reached, f"{module} imports {reached}"


def test_format_modules_never_import_the_decompositions():
    graph = import_graph()
    formats = [m for m in graph if m.startswith("stpnet.formats")]
    assert "stpnet.formats.tucker" in formats and "stpnet.formats.cp" in formats
    for module in formats:
        reached = [t for t in graph[module] if t.startswith("stpnet.decomposition")]
        assert not reached, f"{module} imports {reached}"


def test_recovery_and_compress_import_the_layer_discovery_from_below():
    graph = import_graph()
    assert "stpnet.discovery" in graph["stpnet.compress"]
    assert "stpnet.discovery" in graph["stpnet.recovery.allocate"]
    assert "stpnet.compress" not in graph["stpnet.discovery"]
    assert not any(t.startswith("stpnet.train") for t in graph["stpnet.recovery.fit"])


def test_every_format_family_has_a_registered_decomposition():
    import warnings

    import torch

    from stpnet.formats import FITS, FORMATS, TTTensor, fit_method

    families = {cls.family for cls, _ in FORMATS.values()}
    assert families == set(FITS)
    X = TTTensor.random((4, 6, 4), rank=4, t=2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = X.to_tensor()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        via_decompose = stpnet.decompose(dense, "stt", rank=4, t=2)
        assert fit_method(TTTensor).fit_bytes(TTTensor, (4, 6, 4), 2, (4, 4), 0, 8, "exact") > dense.numel() * 8
    # the classmethod of the earlier API still works for one release, through the registry
    with pytest.warns(DeprecationWarning, match="TTTensor.fit is deprecated"):
        via_class = TTTensor.fit(dense, (4, 4), 2, tol=None, svd="exact", generator=torch.Generator())
    assert torch.allclose(via_class.to_tensor(), via_decompose.to_tensor())
    assert stpnet.relative_error(dense, via_class) < 1e-10


def test_a_format_class_with_its_own_fit_is_still_served_with_a_warning(monkeypatch):
    import torch

    from stpnet.formats import TTTensor, base

    calls = []
    registered = base.FITS["tt"]

    class OwnFit(TTTensor):  # a format written before the registry: fit and fit_bytes on the class
        @classmethod
        def fit(cls, X, rank, t, **options):
            calls.append("fit")
            return registered.fit(TTTensor, X, rank, t, **options)

        @classmethod
        def fit_bytes(cls, shape, t, rank, n_iter, itemsize, svd):
            calls.append("fit_bytes")
            return 1

    monkeypatch.delitem(base._FITS, "tt")  # no decomposition registered for its family
    with pytest.warns(DeprecationWarning, match="register it with stpnet.formats.register_fit"):
        method = base.fit_method(OwnFit)
    X = torch.randn(4, 4, 4, dtype=torch.float64)
    assert method.fit_bytes(OwnFit, (4, 4, 4), 1, None, 0, 8, "exact") == 1
    result = method.fit(OwnFit, X, (2, 2), 1, tol=None, svd="exact", generator=torch.Generator())
    assert calls == ["fit_bytes", "fit"] and result.rank == (2, 2)
    with pytest.raises(ValueError, match="no decomposition is registered for format 'tt'"):
        base.fit_method(TTTensor)
