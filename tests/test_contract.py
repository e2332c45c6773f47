"""Everything that lists methods agrees with xapi_storage_tasks.registry,
and every record of the registry is true to the function it names."""

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
    assert re.fullmatch(r"[A-Z][A-Za-z]*\.[a-z][A-Za-z_]*", name)
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
    assert idempotent == {"Task.stat", "Task.ls", "Task.cancel", "Data.stat", "Data.ls", "Data.cancel"}


@pytest.mark.parametrize("name", METHODS)
def test_the_executable_serves_the_registered_params(name, state_dir):
    """Leaving out any required parameter is refused by the executable
    with a message naming it: the executable decodes by this record."""
    method = registry.METHODS[name]
    required = [p for p, kind in method.params if not kind.endswith("?")]
    res = run_bin(name, {})
    assert res.error_name in ("Invalid_arguments", "Unimplemented")
    if res.error_name == "Invalid_arguments":
        assert "missing parameter %r" % required[0] in res.json["params"][1]
