"""The one list of methods this plugin serves.

Everything that enumerates methods derives from :data:`METHODS` or is
checked against it by ``tests/test_contract.py``: the executables in
``bin/``, the dispatcher in :mod:`xapi_storage_tasks.entry`, ``setup.cfg``'s scripts,
and the RPM file list.

Each entry: name -> (module, function, params, result kind). ``params``
are (name, kind) pairs decoded by :func:`xapi_storage_tasks.wire.codec.decode_params` (a
kind ending in ``?`` is optional: absent or null gives None); the
function receives them as keyword arguments and returns a value that
:mod:`xapi_storage_tasks.entry` encodes according to the result kind.
"""

TASK_ID = (("dbg", "str"), ("id", "task_id"))
OPERATION = (("dbg", "str"), ("operation", "operation"))
MIRROR = (("dbg", "str"), ("uri", "str"), ("domain", "str"), ("remote", "str"))
DATAPATH = (("dbg", "str"), ("uri", "str"), ("domain", "str"))

METHODS = {
    "Task.stat": ("xapi_storage_tasks.tasks.api", "stat", TASK_ID, "task"),
    "Task.cancel": ("xapi_storage_tasks.tasks.api", "cancel", TASK_ID, "unit"),
    "Task.destroy": ("xapi_storage_tasks.tasks.api", "destroy", TASK_ID, "unit"),
    "Task.ls": ("xapi_storage_tasks.tasks.api", "ls", (("dbg", "str"),), "id_list"),
    "Data.copy": ("xapi_storage_tasks.data.api", "copy", MIRROR + (("blocklist", "blocklist?"),), "operation"),
    "Data.mirror": ("xapi_storage_tasks.data.api", "mirror", MIRROR, "operation"),
    "Data.stat": ("xapi_storage_tasks.data.api", "stat", OPERATION, "status"),
    "Data.cancel": ("xapi_storage_tasks.data.api", "cancel", OPERATION, "unit"),
    "Data.destroy": ("xapi_storage_tasks.data.api", "destroy", OPERATION, "unit"),
    "Data.ls": ("xapi_storage_tasks.data.api", "ls", (("dbg", "str"),), "operation_list"),
    "Plugin.Query": ("xapi_storage_tasks.datapath.api", "query", (("dbg", "str"),), "query"),
    "Plugin.diagnostics": ("xapi_storage_tasks.datapath.api", "diagnostics", (("dbg", "str"),), "string"),
    "Datapath.attach": ("xapi_storage_tasks.datapath.api", "attach", DATAPATH, "attach"),
    "Datapath.activate": ("xapi_storage_tasks.datapath.api", "activate", DATAPATH, "unit"),
    "Datapath.activate_readonly": ("xapi_storage_tasks.datapath.api", "activate_readonly", DATAPATH, "unit"),
    "Datapath.deactivate": ("xapi_storage_tasks.datapath.api", "deactivate", DATAPATH, "unit"),
    "Datapath.detach": ("xapi_storage_tasks.datapath.api", "detach", DATAPATH, "unit"),
}

# Methods whose repetition changes nothing: a client may resend them when a
# connection broke before the answer came (others, e.g. Data.copy, never).
IDEMPOTENT = frozenset({"Task.stat", "Task.ls", "Task.cancel", "Data.stat", "Data.ls", "Data.cancel", "Data.mirror"})


def lookup(name):
    """The registered method called ``name`` (case-insensitively, as the
    toolstack looks executables up), as ``(canonical name, entry)``, or
    None."""
    if name in METHODS:
        return name, METHODS[name]
    folded = name.lower()
    for key, entry in METHODS.items():
        if key.lower() == folded:
            return key, entry
    return None
