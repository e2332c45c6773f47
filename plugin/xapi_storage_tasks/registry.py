"""The one table of the methods this plugin serves, each with its whole truth.

A :class:`Method` record names the method, its parameters, its result kind,
whether a client may resend it, and the function that implements it (a
direct reference: reading the table leads straight to the code).
Everything that enumerates methods derives from :data:`METHODS` or is
checked against it by ``tests/test_contract.py``: the executables in
``bin/``, the dispatcher in :mod:`xapi_storage_tasks.entry`, the socket
daemon, the Python client, ``setup.cfg``'s scripts, and the RPM file list
(the spec imports this module at build time).

Every executable call imports this module, and with it every interface
module it names: those stay light at import and import what a call needs
inside the call (see :mod:`xapi_storage_tasks.tasks.api`).
"""

from __future__ import annotations

from xapi_storage_tasks import plugins
from xapi_storage_tasks.data import api as data_api
from xapi_storage_tasks.datapath import api as datapath_api
from xapi_storage_tasks.tasks import api as task_api
from xapi_storage_tasks.volume import api as volume_api

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing stays out of every call
    from collections.abc import Callable


class Method:
    """One method of the interface.

    - ``name``: ``Interface.method``, the executable's name;
    - ``params``: ``(name, kind)`` pairs decoded by
      :func:`xapi_storage_tasks.wire.codec.decode_params` (a kind ending in
      ``?`` is optional: absent or null gives None), passed to ``impl`` as
      keyword arguments;
    - ``result``: how :func:`xapi_storage_tasks.wire.codec.encode_result`
      encodes what ``impl`` returns;
    - ``idempotent``: running it twice changes nothing more than once, so a
      client may resend it when a connection broke before the answer came;
    - ``impl``: the function that does it;
    - ``plugins``: the plugin directories that carry it: ``datapath``
      (one per URI scheme served: ``Datapath.*``, ``Data.*``, ``Task.*``)
      and/or ``volume`` (the SR type's: ``SR.*``, ``Volume.*``).

    New fields get a default, so existing records need not change.
    """

    __slots__ = ("name", "params", "result", "idempotent", "impl", "plugins")

    def __init__(self, name: str, *, params: tuple[tuple[str, str], ...], result: str, impl: Callable[..., object],
                 idempotent: bool = False, plugins: tuple[str, ...] = ("datapath",)) -> None:
        self.name = name
        self.params = params
        self.result = result
        self.idempotent = idempotent
        self.impl = impl
        self.plugins = plugins

    @property
    def interface(self) -> str:
        """``Task`` of ``Task.stat``."""
        return self.name.split(".", 1)[0]

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameters' names, in order."""
        return tuple(name for name, _ in self.params)

    def __repr__(self) -> str:
        return "<Method %s(%s) -> %s>" % (self.name, ", ".join(self.param_names), self.result)


DBG = (("dbg", "str"),)
TASK_ID = DBG + (("id", "task_id"),)
OPERATION = DBG + (("operation", "operation"),)
MIRROR = DBG + (("uri", "str"), ("domain", "str"), ("remote", "str"))
DATAPATH = DBG + (("uri", "str"), ("domain", "str"))
SR = DBG + (("sr", "str"),)
VOLUME = SR + (("key", "str"),)
BOTH = ("datapath", "volume")
VOL = ("volume",)


def _table(*methods: Method) -> dict[str, Method]:
    table: dict[str, Method] = {}
    for method in methods:
        if method.name.lower() in {name.lower() for name in table}:
            raise ValueError("method %s is registered twice" % method.name)
        table[method.name] = method
    return table


METHODS = _table(
    Method("Task.stat", params=TASK_ID, result="task", impl=task_api.stat, idempotent=True),
    Method("Task.cancel", params=TASK_ID, result="unit", impl=task_api.cancel, idempotent=True),
    Method("Task.destroy", params=TASK_ID, result="unit", impl=task_api.destroy),
    Method("Task.ls", params=DBG, result="id_list", impl=task_api.ls, idempotent=True),
    Method("Data.copy", params=MIRROR + (("blocklist", "blocklist?"),), result="operation", impl=data_api.copy),
    Method("Data.mirror", params=MIRROR, result="operation", impl=data_api.mirror),
    Method("Data.stat", params=OPERATION, result="status", impl=data_api.stat, idempotent=True),
    Method("Data.cancel", params=OPERATION, result="unit", impl=data_api.cancel, idempotent=True),
    Method("Data.destroy", params=OPERATION, result="unit", impl=data_api.destroy),
    Method("Data.ls", params=DBG, result="operation_list", impl=data_api.ls, idempotent=True),
    Method("Plugin.Query", params=DBG, result="query", impl=plugins.query, idempotent=True, plugins=BOTH),
    Method("Plugin.diagnostics", params=DBG, result="string", impl=datapath_api.diagnostics, idempotent=True,
           plugins=BOTH),
    Method("Datapath.attach", params=DATAPATH, result="attach", impl=datapath_api.attach, idempotent=True),
    Method("Datapath.activate", params=DATAPATH, result="unit", impl=datapath_api.activate, idempotent=True),
    Method("Datapath.activate_readonly", params=DATAPATH, result="unit", impl=datapath_api.activate_readonly, idempotent=True),
    Method("Datapath.deactivate", params=DATAPATH, result="unit", impl=datapath_api.deactivate, idempotent=True),
    Method("Datapath.detach", params=DATAPATH, result="unit", impl=datapath_api.detach, idempotent=True),
    Method("SR.probe", params=DBG + (("configuration", "config"),), result="record_list", impl=volume_api.sr_probe,
           idempotent=True, plugins=VOL),
    Method("SR.create", params=DBG + (("uuid", "str"), ("configuration", "config"), ("name", "str"), ("description", "str")),
           result="record", impl=volume_api.sr_create, plugins=VOL),
    Method("SR.attach", params=DBG + (("configuration", "config"),), result="string", impl=volume_api.sr_attach,
           idempotent=True, plugins=VOL),
    Method("SR.detach", params=SR, result="unit", impl=volume_api.sr_detach, idempotent=True, plugins=VOL),
    Method("SR.destroy", params=SR, result="unit", impl=volume_api.sr_destroy, plugins=VOL),
    Method("SR.stat", params=SR, result="record", impl=volume_api.sr_stat, idempotent=True, plugins=VOL),
    Method("SR.ls", params=SR, result="record_list", impl=volume_api.sr_ls, idempotent=True, plugins=VOL),
    Method("SR.set_name", params=SR + (("new_name", "str"),), result="unit", impl=volume_api.sr_set_name,
           idempotent=True, plugins=VOL),
    Method("SR.set_description", params=SR + (("new_description", "str"),), result="unit",
           impl=volume_api.sr_set_description, idempotent=True, plugins=VOL),
    Method("Volume.create", params=SR + (("name", "str"), ("description", "str"), ("size", "int"), ("sharable", "bool")),
           result="record", impl=volume_api.volume_create, plugins=VOL),
    Method("Volume.destroy", params=VOLUME, result="unit", impl=volume_api.volume_destroy, idempotent=True, plugins=VOL),
    Method("Volume.stat", params=VOLUME, result="record", impl=volume_api.volume_stat, idempotent=True, plugins=VOL),
    Method("Volume.set", params=VOLUME + (("k", "str"), ("v", "str")), result="unit", impl=volume_api.volume_set,
           idempotent=True, plugins=VOL),
    Method("Volume.unset", params=VOLUME + (("k", "str"),), result="unit", impl=volume_api.volume_unset,
           idempotent=True, plugins=VOL),
    Method("Volume.set_name", params=VOLUME + (("new_name", "str"),), result="unit", impl=volume_api.volume_set_name,
           idempotent=True, plugins=VOL),
    Method("Volume.set_description", params=VOLUME + (("new_description", "str"),), result="unit",
           impl=volume_api.volume_set_description, idempotent=True, plugins=VOL),
    Method("Volume.resize", params=VOLUME + (("new_size", "int"),), result="unit", impl=volume_api.volume_resize,
           idempotent=True, plugins=VOL),
    Method("Volume.snapshot", params=VOLUME, result="record", impl=volume_api.volume_snapshot, plugins=VOL),
    Method("Volume.clone", params=VOLUME, result="record", impl=volume_api.volume_clone, plugins=VOL),
)
"""Every method, by its canonical name."""


def lookup(name: str) -> Method | None:
    """The method called ``name``, matched case-insensitively as the
    toolstack looks executables up; None if there is none."""
    method = METHODS.get(name)
    if method is not None:
        return method
    folded = name.lower()
    for method in METHODS.values():
        if method.name.lower() == folded:
            return method
    return None
