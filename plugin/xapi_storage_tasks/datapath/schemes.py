"""The URI schemes this datapath serves: the one list.

A datapath plugin directory is named after the scheme it serves (the
toolstack picks the first URI of ``Volume.stat`` whose scheme names a
registered directory), so this list decides the directories the RPM
installs, what ``Plugin.Query`` reports and which URIs ``Datapath.*`` and
``Data.mirror`` accept.

``raw+file:///abs/path.raw``    a raw image file (xapi's own v5 test plugin)
``qcow2+file:///abs/path.qcow2`` a qcow2 image file (read natively by
                                 qemu-storage-daemon)
"""

import collections
import os
import urllib.parse

from xapi_storage_tasks.wire.errors import InvalidArguments

# scheme -> qemu block driver of the image format.
SCHEMES = {"raw+file": "raw", "qcow2+file": "qcow2"}


class Volume(collections.namedtuple("Volume", "uri scheme driver path")):
    """A parsed volume URI: its scheme, the qemu format driver and the
    image's absolute path."""

    __slots__ = ()


def parse(uri: str, must_exist: bool = True) -> Volume:
    """Parse a volume URI served here; raise InvalidArguments naming what
    is wrong. The path is percent-decoded; it must be absolute and, with
    ``must_exist``, name a regular file (the volume plugin created it)."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        served = ", ".join(sorted(SCHEMES))
        raise InvalidArguments("URI %r: scheme %r is not served here (served: %s)" % (uri[:200], parts.scheme, served))
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise InvalidArguments("URI %r: expected %s:///absolute/path" % (uri[:200], scheme))
    try:
        path = urllib.parse.unquote(parts.path, errors="strict")
    except UnicodeError:
        raise InvalidArguments("URI %r: the path is not valid percent-encoded UTF-8" % uri[:200]) from None
    if not path.startswith("/") or path.startswith("//") or "\0" in path or os.path.normpath(path) != path:
        raise InvalidArguments("URI %r: the path must be absolute and normalised" % uri[:200])
    if must_exist and not os.path.isfile(path):
        raise InvalidArguments("URI %r: %s is not an existing regular file" % (uri[:200], path))
    return Volume(uri, scheme, SCHEMES[scheme], path)
