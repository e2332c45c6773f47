"""A storage-plugin task service for the XAPI toolstack (SMAPIv3 style).

Long-running storage operations run as tasks in detached workers; the
toolstack queries and controls them through the Task and Data interfaces,
served by the executables in ``bin/`` (see :mod:`xapi_storage_tasks.registry`).

Public Python API:

- :class:`xapi_storage_tasks.tasks.store.Store` -- the file-per-task state store;
- :mod:`xapi_storage_tasks.tasks.state` -- the task states and allowed transitions;
- :func:`xapi_storage_tasks.tasks.worker.start` -- run an operation as a task in a detached
  worker;
- :func:`xapi_storage_tasks.client.connection.connect` -- call any method through the socket
  daemon or the executables;
- :mod:`xapi_storage_tasks.wire.errors` -- the error tree.

Nothing is imported here: every executable call pays only for the modules
its method needs.
"""

__version__ = "0.1.0"
