"""Where a copy writes: the registry of target kinds.

Every kind is one :class:`~xapi_storage_tasks.data.target.Target`
subclass (the interface and its two halves are described there), listed
once in :data:`KINDS`. A new kind is one class in one module plus one
entry here.

=========  ===========================================  ===================
kind       what                                         module
=========  ===========================================  ===================
``nbd``    an NBD export (``nbd://``, ``nbd+unix://``)  ``nbd_export``
``new``    a local path that does not exist yet         ``local``
``file``   an existing regular file                     ``local``
``block``  a block device                               ``local``
=========  ===========================================  ===================
"""

from typing import TYPE_CHECKING, Dict, Tuple, Type

from xapi_storage_tasks.data.local import BlockDevice, ExistingFile, NewFile
from xapi_storage_tasks.data.nbd_export import NbdExport
from xapi_storage_tasks.data.target import Remote, Source, Spec, Target, same_file
from xapi_storage_tasks.wire.errors import InvalidArguments, OperationFailed

if TYPE_CHECKING:
    from xapi_storage_tasks.tasks.worker import Context

KINDS: Tuple[Type[Target], ...] = (NbdExport, NewFile, ExistingFile, BlockDevice)
"""Every target kind, asked in this order which one a ``remote`` is."""

_BY_NAME: Dict[str, Type[Target]] = {kind.kind: kind for kind in KINDS}


def plan(remote: object, source: Source, needed: int) -> Spec:
    """In the caller: the spec of the target ``remote`` names, for a copy
    of ``source`` writing up to byte ``needed``; InvalidArguments if no
    kind takes it."""
    examined = Remote(remote)
    if examined.st is not None and same_file(examined.st, source.st):
        raise InvalidArguments("source and target are the same: %s" % examined.named)
    for kind in KINDS:
        spec = kind.plan(examined, source, needed)
        if spec is not None:
            return spec
    raise InvalidArguments("target %s is neither a regular file nor a block device" % examined.named)


def open_target(ctx: "Context", spec: Spec, needed: int, exact: bool) -> Target:
    """In the worker: open the planned target ``spec`` (see
    :meth:`Target.open <xapi_storage_tasks.data.target.Target.open>`)."""
    kind = _BY_NAME.get(spec.get("kind", ""))
    if kind is None:
        raise OperationFailed("unknown target kind %r in the task's plan" % spec.get("kind"))
    return kind.open(ctx, spec, needed, exact)
