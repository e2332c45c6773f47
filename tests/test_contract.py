"""Everything that lists methods agrees with xapi_storage_tasks.registry,
and every record of the registry is true to the function it names."""

import ast
import configparser
import inspect
import os
import re

import pytest

from conftest import BIN, ROOT, run_bin
from xapi_storage_tasks import registry
from xapi_storage_tasks.wire import codec

METHODS = sorted(registry.METHODS)


def test_bin_has_exactly_one_link_per_registered_method():
    entries = set(os.listdir(BIN)) - {"dispatch"}
    assert entries == set(registry.METHODS)
    for name in entries:
        path = os.path.join(BIN, name)
        assert os.path.islink(path) and os.readlink(path) == "dispatch"
        assert os.access(path, os.X_OK)


def test_setup_cfg_scripts_match_the_registry():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    scripts = cfg["options"]["scripts"].split()
    assert sorted(scripts) == sorted("bin/" + m for m in registry.METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_each_record_names_its_own_method_and_a_function_taking_its_params(name):
    method = registry.METHODS[name]
    assert method.name == name
    assert re.fullmatch(r"[A-Z][A-Za-z]*\.[A-Za-z][A-Za-z_]*", name)  # Interface.method (Plugin.Query too)
    assert inspect.isfunction(method.impl)
    # The function's parameters are the record's, in order: the decoded
    # params are passed by keyword, positional CLI arguments in this order.
    assert list(inspect.signature(method.impl).parameters) == list(method.param_names)
    assert method.result in codec.RESULT_KINDS
    for _, kind in method.params:
        assert kind.rstrip("?") in codec.DECODERS
    assert isinstance(method.idempotent, bool)


@pytest.mark.parametrize("name", METHODS)
def test_lookup_is_case_insensitive_and_canonical(name):
    assert registry.lookup(name) is registry.METHODS[name]
    assert registry.lookup(name.upper()) is registry.METHODS[name]
    assert registry.lookup(name.swapcase()).name == name
    assert registry.lookup(name + "x") is None


def test_no_two_methods_differ_only_by_case():
    folded = [name.lower() for name in registry.METHODS]
    assert len(folded) == len(set(folded))
    with pytest.raises(ValueError):
        registry._table(registry.METHODS["Task.ls"], registry.Method("task.LS", params=registry.DBG, result="id_list",
                                                                     impl=registry.METHODS["Task.ls"].impl))


def test_only_methods_safe_to_run_twice_are_idempotent():
    idempotent = {name for name, m in registry.METHODS.items() if m.idempotent}
    # A resent Data.copy or Data.mirror would start a second operation; a
    # resent destroy would fail with Task_does_not_exist.
    # Every Plugin.* and Datapath.* call is idempotent by the interface's
    # contract (the toolstack repeats them after its own restarts).
    datapath = {name for name in registry.METHODS if name.split(".")[0] in ("Plugin", "Datapath")}
    assert datapath and datapath <= idempotent
    # SR.* and Volume.* are too, but for what makes something new
    # (SR.create, Volume.create/snapshot/clone) or goes away (SR.destroy).
    volume = {name for name in registry.METHODS if name.split(".")[0] in ("SR", "Volume")}
    assert volume - idempotent == {"SR.create", "SR.destroy", "Volume.create", "Volume.snapshot", "Volume.clone"}
    assert idempotent - datapath - volume == {"Task.stat", "Task.ls", "Task.cancel", "Data.stat", "Data.ls", "Data.cancel"}


@pytest.mark.parametrize("name", METHODS)
def test_the_executable_serves_the_registered_params(name, state_dir):
    """Leaving out any required parameter is refused by the executable
    with a message naming it: the executable decodes by this record."""
    method = registry.METHODS[name]
    required = [p for p, kind in method.params if not kind.endswith("?")]
    for missing in required:
        # Every other parameter present (well-typed or not: the missing one
        # is reported first, by the record's order).
        params = {p: "x" for p in required if p != missing}
        res = run_bin(name, params)
        assert res.error_name == "Invalid_arguments", (name, missing, res.json)
        assert "missing parameter %r" % missing in res.json["params"][1], (name, missing, res.json)


# ---------------------------------------------------------------------------
# The package's import graph, read statically from the source


PACKAGE = "xapi_storage_tasks"
PACKAGE_DIR = os.path.join(ROOT, "plugin", PACKAGE)

# Lower layers never import higher ones. A module's layer is that of the
# longest prefix listed; imports inside one layer are free (but acyclic).
LAYERS = [
    ("xapi_storage_tasks.settings", 0),
    ("xapi_storage_tasks.wire.errors", 0),
    ("xapi_storage_tasks.wire.jsontext", 0),
    ("xapi_storage_tasks.wire.ids", 0),
    ("xapi_storage_tasks.process", 1),
    ("xapi_storage_tasks.wire", 2),  # codec, boundary, httpio
    ("xapi_storage_tasks.files", 2),
    ("xapi_storage_tasks.tasks", 3),  # state, record, log, store, lifecycle, worker...
    ("xapi_storage_tasks.nbd", 3),
    ("xapi_storage_tasks.sr", 3),
    ("xapi_storage_tasks.data", 4),
    ("xapi_storage_tasks.datapath", 4),
    ("xapi_storage_tasks.volume", 4),
    ("xapi_storage_tasks.tasks.api", 4),
    ("xapi_storage_tasks.registry", 5),
    ("xapi_storage_tasks.plugins", 5),
    ("xapi_storage_tasks.entry", 6),
    ("xapi_storage_tasks.client", 7),
    ("xapi_storage_tasks.daemon", 7),
    ("xapi_storage_tasks", 8),  # the public face (lazy)
]

# The folders (subpackages; a top-level module counts as its own folder),
# lowest first: a folder imports only folders before it.
FOLDERS = ["settings", "wire", "process", "files", "tasks", "nbd", "sr", "datapath", "volume", "data", "plugins",
           "registry", "entry", "daemon", "client"]

# Imports allowed to climb the folder order, as (module, imported) pairs:
# none. A new entry needs a reason written beside it.
KNOWN_CLIMBING: set = set()


def layer(module):
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def package_modules():
    out = {}
    for dirpath, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _runtime_nodes(tree):
    """Every node except those under ``if TYPE_CHECKING:`` (never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph():
    """module -> {(imported package module, at module level?)}."""
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.Try) for n in s.body}
        edges = set()
        for node in _runtime_nodes(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module + "." + a.name if node.module + "." + a.name in modules else node.module for a in node.names]
            for name in names:
                if name.split(".")[0] == PACKAGE and name in modules and name != module:
                    edges.add((name, id(node) in top))
        graph[module] = edges
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_reader_sees_imports_and_finds_cycles():
    graph = import_graph()
    assert ("xapi_storage_tasks.registry", True) in graph["xapi_storage_tasks.entry"]
    assert ("xapi_storage_tasks.tasks.store", False) in graph["xapi_storage_tasks.tasks.api"]  # inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    """Not at import time, and not through the imports functions make
    when called either: every dependency points one way."""
    graph = {m: {n for n, _ in edges} for m, edges in import_graph().items()}
    assert _cycle(graph) is None


def test_lower_layers_never_import_higher_ones():
    # (Importing the package itself is free: every import of a module does it.)
    climbing = sorted((m, n) for m, edges in import_graph().items() for n, _ in edges
                      if layer(n) > layer(m) and n != PACKAGE)
    assert climbing == []


def folder(module):
    """The folder of a module: its subpackage, or the top-level module
    itself (None for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def folder_graph(module_graph, ignore=frozenset()):
    """folder -> {folders it imports}, from module -> {modules} (the
    package itself and the ``ignore``d module edges left out)."""
    out = {}
    for m, edges in module_graph.items():
        for n in edges:
            a, b = folder(m), folder(n)
            if a and b and a != b and (m, n) not in ignore:
                out.setdefault(a, set()).add(b)
    return out


def folders_out_of_order(graph):
    """The folder imports that do not point down :data:`FOLDERS` (or
    name a folder it does not list)."""
    rank = {f: i for i, f in enumerate(FOLDERS)}
    return sorted((a, b) for a, bs in graph.items() for b in bs if rank.get(b, len(rank)) >= rank.get(a, -1))


def test_the_folder_checks_fail_on_a_folder_cycle():
    """Modules free of cycles can still make their folders one: the
    checks see it."""
    modules = {"p.wire.codec": {"p.tasks.ids"}, "p.tasks.store": {"p.wire.jsontext"}, "p.wire.jsontext": set()}
    assert _cycle({m: set(e) for m, e in modules.items()}) is None
    graph = folder_graph(modules)
    assert _cycle(graph) == ["tasks", "wire", "tasks"]
    assert folders_out_of_order(graph) == [("wire", "tasks")]
    assert folders_out_of_order({"tasks": {"wire"}}) == []
    assert folders_out_of_order({"tasks": {"unlisted"}}) == [("tasks", "unlisted")]


def test_every_folder_is_in_the_declared_order():
    found = {folder(m) for m in package_modules()} - {None}
    assert found == set(FOLDERS)


def test_no_folder_imports_a_later_one_and_folders_make_no_cycle():
    modules = {m: {n for n, _ in edges if n != PACKAGE} for m, edges in import_graph().items()}
    # A known edge that is gone must leave KNOWN_CLIMBING too.
    assert all(n in modules[m] for m, n in KNOWN_CLIMBING)
    graph = folder_graph(modules, ignore=KNOWN_CLIMBING)
    assert folders_out_of_order(graph) == []
    assert _cycle(graph) is None


def test_the_interface_modules_the_registry_names_import_nothing_heavy_at_import_time():
    """The registry refers to their functions directly, so every
    executable imports them: at module level they may import only the
    error tree (each call imports what it needs)."""
    graph = import_graph()
    modules = {m.impl.__module__ for m in registry.METHODS.values()}
    for module in modules:
        at_import = {n for n, top in graph[module] if top}
        assert at_import <= {"xapi_storage_tasks.wire.errors"}, (module, at_import)
