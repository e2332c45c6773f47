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

from xapi_storage_tasks.data import api as data_api
from xapi_storage_tasks.datapath import api as datapath_api
from xapi_storage_tasks.tasks import api as task_api

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
    - ``impl``: the function that does it.

    New fields get a default, so existing records need not change.
    """

    __slots__ = ("name", "params", "result", "idempotent", "impl")

    def __init__(self, name: str, *, params: tuple[tuple[str, str], ...], result: str, impl: Callable[..., object],
                 idempotent: bool = False) -> None:
        self.name = name
        self.params = params
        self.result = result
        self.idempotent = idempotent
        self.impl = impl

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
    Method("Plugin.Query", params=DBG, result="query", impl=datapath_api.query, idempotent=True),
    Method("Plugin.diagnostics", params=DBG, result="string", impl=datapath_api.diagnostics, idempotent=True),
    Method("Datapath.attach", params=DATAPATH, result="attach", impl=datapath_api.attach, idempotent=True),
    Method("Datapath.activate", params=DATAPATH, result="unit", impl=datapath_api.activate, idempotent=True),
    Method("Datapath.activate_readonly", params=DATAPATH, result="unit", impl=datapath_api.activate_readonly, idempotent=True),
    Method("Datapath.deactivate", params=DATAPATH, result="unit", impl=datapath_api.deactivate, idempotent=True),
    Method("Datapath.detach", params=DATAPATH, result="unit", impl=datapath_api.detach, idempotent=True),
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
