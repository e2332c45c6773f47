"""A storage-plugin task service for the XAPI toolstack (SMAPIv3 style).

Long-running storage operations run as tasks in detached workers; the
toolstack queries and controls them through the Task and Data interfaces,
served by the executables in ``bin/`` (see :mod:`plugin.registry`).

Public Python API:

- :class:`plugin.store.Store` -- the file-per-task state store;
- :mod:`plugin.state` -- the task states and allowed transitions;
- :func:`plugin.worker.start` -- run an operation as a task in a detached
  worker;
- :func:`plugin.client.connect` -- call any method through the socket
  daemon or the executables;
- :mod:`plugin.errors` -- the error tree.

Nothing is imported here: every executable call pays only for the modules
its method needs.
"""

__version__ = "0.1.0"
