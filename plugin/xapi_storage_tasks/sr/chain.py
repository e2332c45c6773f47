"""A volume's backing chain, vetted before any daemon opens it.

QEMU follows a qcow2 image's backing file wherever its header points
(``/etc/hostname``, a device, another SR's image) and serves those bytes to
the guest. The datapath opens only a chain it can vouch for: every backing
file resolves (symbolic links followed) to a regular file in the top
image's own directory (the SR), names its format explicitly (raw or
qcow2), appears once, and the chain is at most :data:`MAX_LENGTH` images
long; a qcow2 image with an external data file is refused. The headers
are read here (no process, nothing opened but the chain's own files), and
:func:`blockdev` pins the vetted chain node by node, so QEMU cannot open
anything else.
"""

import os
import stat
import struct
from typing import Any, Dict, List, NamedTuple, Optional

from xapi_storage_tasks.wire.errors import InvalidArguments

MAX_LENGTH = 16
FORMATS = ("raw", "qcow2")
_MAGIC = b"QFI\xfb"
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_END = 0
_INCOMPAT_DATA_FILE = 1 << 2
_MAX_CLUSTER_BITS = 21  # qcow2's largest cluster (2 MiB) holds the header, its extensions and the backing name


class Image(NamedTuple):
    """One image of a chain: its real path and its format."""

    path: str
    driver: str


class _Header(NamedTuple):
    backing: Optional[str]
    backing_format: Optional[str]
    data_file: bool


def _read_header(path: str) -> _Header:
    """The backing file name, backing format and external-data-file flag of
    the qcow2 image ``path``; InvalidArguments if it is not qcow2."""
    try:
        with open(path, "rb") as f:
            head = f.read(104)
            if head[:4] != _MAGIC or len(head) < 104:  # any real qcow2 file is longer than its v3 header
                raise InvalidArguments("%s is not a qcow2 image" % path)
            version, backing_offset, backing_size, cluster_bits = struct.unpack(">IQII", head[4:24])
            if version not in (2, 3) or not 9 <= cluster_bits <= _MAX_CLUSTER_BITS:
                raise InvalidArguments("%s: unsupported qcow2 header (version %d)" % (path, version))
            f.seek(0)
            cluster = f.read(1 << cluster_bits)
    except OSError as e:
        raise InvalidArguments("cannot read the image %s: %s" % (path, e.strerror or e)) from None
    incompatible, header_length = (0, 72) if version == 2 else struct.unpack(">Q20xI", head[72:104])
    fmt: Optional[str] = None
    offset = header_length
    while True:  # header extensions: type, length, data padded to 8 bytes; type 0 ends them
        if offset + 8 > len(cluster):
            raise InvalidArguments("%s: qcow2 header extensions run past the first cluster" % path)
        kind, length = struct.unpack(">II", cluster[offset:offset + 8])
        if kind == _EXT_END:
            break
        data = cluster[offset + 8:offset + 8 + length]
        if kind == _EXT_BACKING_FORMAT:
            fmt = data.decode("utf-8", "replace")
        offset += 8 + (length + 7) // 8 * 8
    backing = None
    if backing_offset:
        name = cluster[backing_offset:backing_offset + backing_size]
        if len(name) != backing_size or not 0 < backing_size <= 1023:
            raise InvalidArguments("%s: the backing file name is not within the first cluster" % path)
        backing = os.fsdecode(name)
    return _Header(backing, fmt, bool(incompatible & _INCOMPAT_DATA_FILE))


def backing_of(path: str) -> Optional[str]:
    """The backing file name in the header of the qcow2 image ``path`` (as
    written: relative to the image's directory), or None."""
    return _read_header(path).backing


def vet(path: str, driver: str) -> List[Image]:
    """The chain of the image ``path`` (format ``driver``), top first, every
    image checked as the module says; InvalidArguments naming what is
    refused otherwise."""
    top = os.path.realpath(path)
    sr = os.path.dirname(top)
    chain = [Image(top, driver)]
    opened_as = path  # QEMU resolves a relative backing name against the name the image was opened by
    while chain[-1].driver == "qcow2":
        image = chain[-1]
        header = _read_header(image.path)
        if header.data_file:
            raise InvalidArguments("%s has an external data file: not served" % image.path)
        if header.backing is None:
            break
        if header.backing_format not in FORMATS:
            why = "names no backing format" if header.backing_format is None else \
                "names the backing format %r (served: raw, qcow2)" % header.backing_format
            raise InvalidArguments("%s %s: refused (recreate it with -F)" % (image.path, why))
        opened_as = os.path.join(os.path.dirname(opened_as), header.backing)
        real = os.path.realpath(opened_as)
        if os.path.dirname(real) != sr:
            raise InvalidArguments("backing file %r of %s resolves to %s, outside the image's directory %s: refused"
                                   % (header.backing, image.path, real, sr))
        try:
            regular = stat.S_ISREG(os.stat(real).st_mode)
        except OSError as e:
            raise InvalidArguments("backing file %s of %s: %s" % (real, image.path, e.strerror or e)) from None
        if not regular:
            raise InvalidArguments("backing file %s of %s is not a regular file: refused" % (real, image.path))
        if any(real == seen.path for seen in chain):
            raise InvalidArguments("the backing chain of %s loops through %s: refused" % (path, real))
        if len(chain) == MAX_LENGTH:
            raise InvalidArguments("the backing chain of %s is longer than %d images: refused" % (path, MAX_LENGTH))
        chain.append(Image(real, header.backing_format))
    return chain


def blockdev(chain: List[Image], node: str) -> Dict[str, Any]:
    """The ``--blockdev`` options opening exactly ``chain``, its top named
    ``node``: each backing node given explicitly (and the last qcow2 told
    it has none), so QEMU follows no name of its own."""
    below: Optional[Dict[str, Any]] = None
    for image in reversed(chain):
        options: Dict[str, Any] = {"driver": image.driver,
                                   "file": {"driver": "file", "filename": image.path, "aio": "threads"}}
        if image.driver == "qcow2":
            options["backing"] = below
        below = options
    assert below is not None
    return dict(below, **{"node-name": node})
