"""The one JSON file reader and atomic writer (files/jsonfile.py): a writer
SIGKILLed at any instant leaves the old file or the new one, whole, and
nothing a later sweep does not remove."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import SRC
from xapi_storage_tasks.files import jsonfile

WRITER = """
import errno, os, sys
sys.path.insert(0, %(src)r)
from xapi_storage_tasks.files import jsonfile
if %(no_tmpfile)r:  # a file system without O_TMPFILE
    real_open = os.open
    def no_tmpfile(path, flags, *args, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE")
        return real_open(path, flags, *args, **kw)
    os.open = no_tmpfile
fd = os.open(%(dir)r, os.O_RDONLY | os.O_DIRECTORY)
os.write(1, b"!")
n = 0
while True:
    n += 1
    jsonfile.write_json({"n": n, "pad": "x" * (n %% 5000)}, "rec.json", fd, fd)
"""


@pytest.mark.parametrize("no_tmpfile", [False, True], ids=["O_TMPFILE", "named temporary"])
def test_a_writer_killed_at_any_instant_leaves_a_whole_file_and_no_temporary_after_a_sweep(tmp_path, no_tmpfile):
    rng = random.Random(16)
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        jsonfile.write_json({"n": 0, "pad": ""}, "rec.json", fd, fd)
        last = 0
        for _ in range(40):
            proc = subprocess.Popen([sys.executable, "-c", WRITER % {"src": SRC, "dir": str(tmp_path),
                                                                    "no_tmpfile": no_tmpfile}],
                                    stdout=subprocess.PIPE)
            assert proc.stdout.read(1) == b"!"
            time.sleep(rng.uniform(0, 0.02))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            value = jsonfile.read_json("rec.json", fd, 1 << 20)  # whole, never a part
            assert isinstance(value, dict) and value["pad"] == "x" * (value["n"] % 5000)
            last = value["n"]
            names = set(os.listdir(fd)) - {"rec.json"}
            assert all(jsonfile.is_temporary(n) for n in names), names
            jsonfile.sweep(fd, age=0)  # a later call, once they are old
            assert os.listdir(fd) == ["rec.json"]
        assert last > 0
    finally:
        os.close(fd)


def test_sweep_removes_only_old_temporaries_of_ours(tmp_path):
    for name in ("a.json.tmp-0123abcd", "a.json.tmp-0123abcX", "a.json", "other.tmp-12", "young.json.tmp-89abcdef"):
        (tmp_path / name).write_text("{}")
    old = time.time() - 3600
    for name in ("a.json.tmp-0123abcd", "a.json.tmp-0123abcX", "a.json", "other.tmp-12"):
        os.utime(tmp_path / name, (old, old))
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        jsonfile.sweep(fd)
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.json.tmp-0123abcX", "other.tmp-12", "young.json.tmp-89abcdef"]


@pytest.mark.parametrize("content, why", [(b"x" * 11, "larger than 10 bytes"), (b"{\"a\": ", "expecting"),
                                          (b"\xff", "utf-8"), (b"NaN", "NaN")])
def test_the_reader_refuses_what_is_not_one_bounded_strict_value(tmp_path, content, why):
    (tmp_path / "f").write_bytes(content)
    os.symlink("f", tmp_path / "link")
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(jsonfile.Unreadable, match="(?i)" + why):
            jsonfile.read_json("f", fd, 10)
        with pytest.raises(jsonfile.Unreadable):
            jsonfile.read_json("link", fd, 10)  # never followed
        with pytest.raises(FileNotFoundError):
            jsonfile.read_json("absent", fd, 10)
    finally:
        os.close(fd)


def test_a_volume_call_sweeps_what_a_killed_writer_left_in_volumes(store):
    """Datapath.deactivate killed between link and rename left
    ``volumes/<key>.json.tmp-<hex>``: the next call on any volume removes
    it once it is old."""
    from xapi_storage_tasks.datapath.volume import Volumes

    vols = Volumes(store)
    left = os.path.join(vols.path, "0123456789abcdef.json.tmp-0badf00d")
    with open(left, "w") as f:
        f.write('{"version": 1')
    Volumes(store)
    assert os.path.exists(left)  # young: maybe a live writer's
    old = time.time() - 2 * jsonfile.TEMP_AGE
    os.utime(left, (old, old))
    Volumes(store)
    assert not os.path.exists(left)
