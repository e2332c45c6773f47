"""Everything that lists methods agrees with xapi_storage_tasks.registry."""

import configparser
import os

from conftest import BIN, ROOT
from xapi_storage_tasks import registry
from xapi_storage_tasks import entry as runner


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


def test_every_registered_method_resolves_to_a_function():
    for name, (module, function, spec, kind) in registry.METHODS.items():
        impl = getattr(__import__(module, fromlist=[function]), function)
        assert callable(impl), name
        assert [p for p, _ in spec] == list(impl.__code__.co_varnames[: len(spec)]), name
        assert registry.lookup(name.upper())[0] == name
        assert kind in ("task", "unit", "id_list", "operation", "operation_list", "status", "query", "attach", "string")
    assert runner.registry is registry


def test_idempotent_methods_are_registered():
    assert registry.IDEMPOTENT <= set(registry.METHODS)
    assert "Data.copy" not in registry.IDEMPOTENT and "Task.destroy" not in registry.IDEMPOTENT
