"""Plugin.Query, Plugin.diagnostics and Datapath.* through the real
executables, called the toolstack's way (``[script, "--json"]``, params on
stdin without a newline), with real qemu-storage-daemons."""

import fcntl
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import time

import pytest

from conftest import BIN, kill_leftover_daemons, run_bin
from xapi_storage_tasks.nbd.protocol import Client
from xapi_storage_tasks.process import identity

pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="qemu-storage-daemon is not installed (make deps)")

SIZE = 16 << 20
NBD_URI = re.compile(r"^nbd:unix:([^:]+):exportname=([^:]+)$")
QUERY_FIELDS = {"plugin": str, "name": str, "description": str, "vendor": str, "copyright": str, "version": str,
                "required_api_version": str, "features": list, "configuration": dict, "required_cluster_stack": list}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(b"\xa5" * 65536)
    return str(path)


@pytest.fixture
def uri(image):
    return "raw+file://" + image


@pytest.fixture
def volumes(state_dir):
    """Every daemon a test leaves running is stopped (a test that failed
    midway must not leak qemu-storage-daemons)."""
    yield state_dir / "volumes"
    kill_leftover_daemons(str(state_dir / "volumes"))


def wrap_daemon(tmp_path, monkeypatch, before="", options=""):
    """Make the plugin run qemu-storage-daemon through a shell script that
    runs ``before``, then execs the daemon (same pid) with ``options`` added."""
    wrapper = tmp_path / "qsd-wrapper"
    wrapper.write_text("#!/bin/sh\n%s\nexec %s %s \"$@\"\n" % (before, shutil.which("qemu-storage-daemon"), options))
    wrapper.chmod(0o755)
    monkeypatch.setenv("TASK_QEMU_STORAGE_DAEMON", str(wrapper))


def dp(method, uri, domain, **env):
    return run_bin("Datapath." + method, {"dbg": "test", "uri": uri, "domain": domain},
                   env=dict(os.environ, **env) if env else None)


def daemons(volumes):
    """The recorded daemons, as identities."""
    return [json.loads(p.read_text())["identity"] for p in sorted(volumes.glob("*.qsd"))]


def nbd_address(answer):
    """(socket, export) of an attach answer, checked to be exactly what the
    toolstack takes: XenDisk (blkback) and BlockDevice on one block device,
    then the Nbd, last, in the form the toolstack parses."""
    assert set(answer) == {"implementations"}
    xendisk, device, impl = answer["implementations"]
    assert xendisk[0] == "XenDisk" and device[0] == "BlockDevice"
    assert xendisk[1] == {"backend_type": "vbd", "params": device[1]["path"], "extra": {}}
    assert stat.S_ISBLK(os.stat(device[1]["path"]).st_mode)
    assert impl[0] == "Nbd" and set(impl[1]) == {"uri"}
    found = NBD_URI.match(impl[1]["uri"])
    assert found, impl
    return found.group(1), found.group(2)


# -- registration --------------------------------------------------------------------


def check_registration(answer):
    """What xapi-storage-script checks before it registers a datapath."""
    assert set(QUERY_FIELDS) <= set(answer)
    for field, kind in QUERY_FIELDS.items():
        assert isinstance(answer[field], kind), field
    assert answer["required_api_version"] == "5.0"
    assert all(isinstance(f, str) for f in answer["features"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in answer["configuration"].items())
    assert all(isinstance(s, str) for s in answer["required_cluster_stack"])


def test_plugin_query_has_every_field_the_toolstack_requires(state_dir):
    res = run_bin("Plugin.Query", b'{"dbg": "register"}')
    assert res.returncode == 0, res.stderr
    check_registration(res.json)
    # Only what we really support: neither open/close nor import_activate.
    assert not {"NONPERSISTENT", "VDI_MIRROR_IN"} & set(res.json["features"])


@pytest.mark.parametrize("scheme", ["raw+file", "qcow2+file"])
def test_plugin_query_names_the_scheme_of_its_directory(state_dir, tmp_path, scheme):
    directory = tmp_path / scheme
    directory.mkdir()
    os.symlink(os.path.join(BIN, "dispatch"), directory / "dispatch")
    os.symlink("dispatch", directory / "Plugin.Query")
    proc = subprocess.run([str(directory / "Plugin.Query"), "--json"], input=b'{"dbg":"register"}',
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    check_registration(answer)
    assert answer["plugin"] == scheme


# -- attach, activate, deactivate, detach ---------------------------------------------------


def test_attach_serves_the_volume_and_deactivate_flushes_it_through_the_export(state_dir, volumes, image, uri,
                                                                             tmp_path, monkeypatch):
    # The daemon traces every NBD request it decodes to its log: the
    # deactivate's flush must reach it.
    wrap_daemon(tmp_path, monkeypatch, options="--trace nbd_co_receive_request_decode_type")
    res = dp("attach", uri, "7")
    assert res.returncode == 0, res.stdout
    sock, export = nbd_address(res.json)
    assert os.path.dirname(sock) == str(volumes)
    assert dp("activate", uri, "7").stdout == b"null\n"
    with Client.connect("nbd+unix:///%s?socket=%s" % (export, sock)) as client:
        assert client.size == SIZE
        assert client.pread(4096, 0) == b"\xa5" * 4096
        client.pwrite(b"guest data" * 100, 1 << 20)
    (log,) = volumes.glob("*.log")
    flushes = log.read_text().count("(flush)")
    assert dp("deactivate", uri, "7").stdout == b"null\n"
    # The deactivate's flushes reached the daemon: the block device's, then the export's.
    assert log.read_text().count("(flush)") == flushes + 2
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert f.read(1000) == b"guest data" * 100
    assert dp("detach", uri, "7").stdout == b"null\n"


def test_every_call_is_idempotent_for_two_domains(state_dir, volumes, uri):
    first = dp("attach", uri, "7").json
    assert dp("attach", uri, "7").json == first
    assert dp("attach", uri, "u0_mirror_vbd_7_xvda").json == first  # one daemon serves every domain
    (daemon,) = daemons(volumes)
    for method in ("activate", "activate", "activate_readonly"):
        assert dp(method, uri, "7" if method == "activate" else "u0_mirror_vbd_7_xvda").stdout == b"null\n"
    record = json.loads(next(volumes.glob("*.json")).read_text())
    assert record["domains"] == {"7": "rw", "u0_mirror_vbd_7_xvda": "ro"}
    for _ in range(2):
        assert dp("deactivate", uri, "u0_mirror_vbd_7_xvda").stdout == b"null\n"
        assert dp("detach", uri, "u0_mirror_vbd_7_xvda").stdout == b"null\n"
    # The guest still has it: the same daemon still serves.
    assert daemons(volumes) == [daemon] and identity.matches(daemon)
    assert json.loads(next(volumes.glob("*.json")).read_text())["domains"] == {"7": "rw"}
    for _ in range(2):
        assert dp("deactivate", uri, "7").stdout == b"null\n"
    assert dp("activate", uri, "7").stdout == b"null\n"  # reactivation works too
    assert dp("deactivate", uri, "7").stdout == b"null\n"
    for _ in range(2):
        assert dp("detach", uri, "7").stdout == b"null\n"
    # The last detach stopped the daemon and left nothing behind.
    assert identity.wait_gone(daemon, 10)
    assert sorted(os.listdir(volumes)) == []


def test_activate_needs_an_attach(state_dir, volumes, uri):
    assert dp("activate", uri, "7").error_name == "Volume_not_attached"
    assert daemons(volumes) == []


def test_the_callers_pipes_reach_eof_while_the_daemon_runs(state_dir, volumes, uri):
    proc = subprocess.Popen([os.path.join(BIN, "Datapath.attach"), "--json"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(json.dumps({"dbg": "t", "uri": uri, "domain": "3"}).encode(), timeout=30)
    assert proc.returncode == 0, err
    nbd_address(json.loads(out))
    (daemon,) = daemons(volumes)
    assert identity.matches(daemon)  # still serving after both pipes closed
    assert dp("detach", uri, "3").stdout == b"null\n"


def test_a_killed_daemon_is_reported_by_the_next_call(state_dir, volumes, uri):
    dp("attach", uri, "7")
    dp("activate", uri, "7")
    (daemon,) = daemons(volumes)
    os.kill(daemon["pid"], signal.SIGKILL)
    assert identity.wait_gone(daemon, 10)
    res = dp("activate", uri, "7")
    assert res.error_name == "Storage_daemon_lost"
    assert str(daemon["pid"]) in res.json["params"][1]
    # Reported once; then the volume can be served again, and detach works.
    fresh = dp("attach", uri, "7")
    assert fresh.returncode == 0, fresh.stdout
    (again,) = daemons(volumes)
    assert again != daemon and identity.matches(again)
    assert dp("detach", uri, "7").stdout == b"null\n"
    assert identity.wait_gone(again, 10)


def test_a_killed_daemon_does_not_make_detach_fail(state_dir, volumes, uri):
    dp("attach", uri, "7")
    (daemon,) = daemons(volumes)
    os.kill(daemon["pid"], signal.SIGKILL)
    assert identity.wait_gone(daemon, 10)
    assert dp("detach", uri, "7").stdout == b"null\n"
    assert os.listdir(volumes) == []
    assert "is gone" in (state_dir / "logs" / "store.log").read_text()


def test_a_busy_volume_makes_callers_wait_boundedly_and_detach_is_queued(state_dir, volumes, uri):
    dp("attach", uri, "7")
    (daemon,) = daemons(volumes)
    (lock,) = volumes.glob("*.lock")
    with open(lock, "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = dp("activate", uri, "7", TASK_DATAPATH_LOCK_WAIT="0.2")
        assert busy.error_name == "Volume_busy"
        detached = dp("detach", uri, "7", TASK_DATAPATH_LOCK_WAIT="0.2")
        assert detached.stdout == b"null\n"  # never fails: queued
        assert list(volumes.glob("*.detach.*"))
        assert identity.matches(daemon)
    # Released: the detached finisher completes the detach.
    assert identity.wait_gone(daemon, 30)
    deadline = time.monotonic() + 30
    while os.listdir(volumes) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.listdir(volumes) == []  # record, queue entry and lock file: nothing left
    assert "queued" in (state_dir / "logs" / "store.log").read_text()


@pytest.mark.parametrize("bad", ["file:///x.raw", "raw+file://host/x.raw", "raw+file://relative", "raw+file:///no/such.raw",
                                 "raw+file:///a/../b.raw"])
def test_bad_uris_are_invalid_arguments(state_dir, bad):
    for method in ("attach", "activate"):
        assert dp(method, bad, "7").error_name == "Invalid_arguments"
    if bad == "raw+file:///no/such.raw":
        # An image deleted while attached is still deactivated (its daemon holds
        # it open); one never attached has nothing to deactivate.
        assert dp("deactivate", bad, "7").stdout == b"null\n"
    else:
        assert dp("deactivate", bad, "7").error_name == "Invalid_arguments"
    assert dp("detach", bad, "7").stdout == b"null\n"  # never fails


def test_bad_domains_are_invalid_arguments(state_dir, uri):
    for domain in ("", "x" * 300, "a\nb"):
        assert dp("attach", uri, domain).error_name == "Invalid_arguments"


def test_qcow2_volumes_are_served(state_dir, volumes, tmp_path):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    uri = "qcow2+file://" + str(image)
    sock, export = nbd_address(dp("attach", uri, "9").json)
    assert dp("activate", uri, "9").stdout == b"null\n"
    with Client.connect("nbd+unix:///%s?socket=%s" % (export, sock)) as client:
        assert client.size == 8 << 20  # the virtual size, not the file's
        client.pwrite(b"q" * 65536, 65536)
    assert dp("deactivate", uri, "9").stdout == b"null\n"
    assert dp("detach", uri, "9").stdout == b"null\n"
    raw = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True)
    with open(raw, "rb") as f:
        f.seek(65536)
        assert f.read(65536) == b"q" * 65536


def test_diagnostics_shows_volumes_and_their_daemons(state_dir, volumes, uri):
    dp("attach", uri, "7")
    dp("activate", uri, "7")
    res = run_bin("Plugin.diagnostics", {"dbg": "d"})
    assert res.returncode == 0
    dump = json.loads(res.json)  # a readable text: indented JSON
    (volume,) = dump["volumes"]
    assert volume["uri"] == uri and volume["domains"] == {"7": "rw"}
    daemon = volume["daemon"]
    assert daemon["running"] is True and daemon["pid"] == daemons(volumes)[0]["pid"]
    assert isinstance(daemon["rss"], int) and daemon["rss"] > 0 and isinstance(daemon["status"], str)
    assert dump["mirrors"] == []
    dp("detach", uri, "7")
    assert json.loads(run_bin("Plugin.diagnostics", {"dbg": "d"}).json)["volumes"] == []


def test_detach_never_fails_even_with_an_unusable_state_dir(tmp_path, monkeypatch, uri):
    bad = tmp_path / "not-a-dir"
    bad.write_text("")
    monkeypatch.setenv("TASK_STATE_DIR", str(bad))
    res = dp("detach", uri, "7")
    assert res.returncode == 0 and res.stdout == b"null\n"
    assert b"could not be recorded" in res.stderr
    assert dp("attach", uri, "7").error_name == "State_directory_invalid"


# -- starting a daemon: why it failed, a caller killed midway -------------------------------


def test_a_daemon_that_cannot_exec_says_why_in_the_error_and_the_log(state_dir, volumes, tmp_path, monkeypatch, uri):
    bogus = tmp_path / "qsd-not-a-program"
    bogus.write_bytes(b"\x7fELF but not a program")
    bogus.chmod(0o755)
    monkeypatch.setenv("TASK_QEMU_STORAGE_DAEMON", str(bogus))
    res = dp("attach", uri, "7")
    assert res.error_name == "Storage_daemon_failed"
    reason = "cannot run %s: Exec format error" % bogus
    assert reason in res.json["params"][1] and reason in res.stderr.decode()
    assert reason in (state_dir / "logs" / "store.log").read_text()
    assert daemons(volumes) == [] and not list(volumes.glob("*.log"))


def test_an_attach_killed_while_its_daemon_starts_leaves_nothing_taken_for_a_lost_daemon(state_dir, volumes, uri,
                                                                                        tmp_path, monkeypatch):
    """kill -9 of Datapath.attach at random instants around its daemon's
    start; the next attach always serves (never Storage_daemon_lost), and
    many kills landed while the daemon was starting (recorded, never seen
    serving). The daemon takes 0.2s more to start, as on a loaded host."""
    wrap_daemon(tmp_path, monkeypatch, before="sleep 0.2")
    rng = random.Random(os.environ.get("RELIABILITY_SEED", "qsd-start"))
    params = json.dumps({"dbg": "t", "uri": uri, "domain": "7"}).encode()

    def attach_in_background():
        proc = subprocess.Popen([os.path.join(BIN, "Datapath.attach"), "--json"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.stdin.write(params)
        proc.stdin.close()
        return proc

    # When, in an attach, its daemon is recorded and when it is seen
    # serving: most kills land in that span, some just before it.
    t0, proc = time.monotonic(), attach_in_background()
    recorded = served = None
    while proc.poll() is None or served is None:
        records = [json.loads(p.read_text()) for p in volumes.glob("*.qsd")]
        if recorded is None and records:
            recorded = time.monotonic() - t0
        if served is None and any(r["served"] for r in records):
            served = time.monotonic() - t0
        time.sleep(0.001)
    assert proc.returncode == 0 and recorded is not None
    assert dp("detach", uri, "7").stdout == b"null\n"
    mid_start, deadline = 0, time.monotonic() + 120
    for trial in range(30):
        assert time.monotonic() < deadline, "only %d trials in 120s" % trial
        proc = attach_in_background()
        time.sleep(rng.uniform(recorded - 0.03, served))
        proc.kill()  # our own child, not yet reaped: its pid cannot be reused
        proc.wait()
        records = [json.loads(p.read_text()) for p in volumes.glob("*.qsd")]
        mid_start += proc.returncode == -signal.SIGKILL and any(not r["served"] for r in records)
        res = dp("attach", uri, "7")
        assert res.returncode == 0, res.stdout
        sock, export = nbd_address(res.json)
        with Client.connect("nbd+unix:///%s?socket=%s" % (export, sock)) as client:
            assert client.pread(4096, 0) == b"\xa5" * 4096
        (daemon,) = daemons(volumes)
        assert dp("detach", uri, "7").stdout == b"null\n"
        assert identity.wait_gone(daemon, 10)
        assert [n for n in os.listdir(volumes) if ".json" not in n] == []  # no daemon file left
    assert mid_start >= 10, "only %d of 30 kills landed while the daemon was starting (recorded at %.3fs, served at %.3fs)" \
        % (mid_start, recorded, served)


# -- what a daemon may open: one daemon per image, a vetted backing chain ---------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_second_state_directory_cannot_serve_an_image_already_served(state_dir, volumes, tmp_path, monkeypatch, fmt):
    image = tmp_path / ("disk." + fmt)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "8M"], check=True)
    uri = "%s+file://%s" % (fmt, image)
    assert dp("attach", uri, "7").returncode == 0
    (first,) = daemons(volumes)
    other = tmp_path / "other-state"
    try:
        res = dp("attach", uri, "7", TASK_STATE_DIR=str(other))
        assert res.error_name == "Storage_daemon_failed"
        assert "another qemu-storage-daemon holds its lock" in res.json["params"][1]
        assert daemons(other / "volumes") == [] and identity.matches(first)
        # The lock goes with the daemon that held it.
        assert dp("detach", uri, "7").stdout == b"null\n"
        assert identity.wait_gone(first, 10)
        assert dp("attach", uri, "7", TASK_STATE_DIR=str(other)).returncode == 0
        assert dp("detach", uri, "7", TASK_STATE_DIR=str(other)).stdout == b"null\n"
    finally:
        kill_leftover_daemons(str(other / "volumes"))


def qcow2_over(path, backing, backing_fmt):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_fmt, "-b", backing, str(path), "8M"],
                   check=True)
    return "qcow2+file://%s" % path


def test_a_backing_file_outside_the_image_directory_is_refused(state_dir, volumes, tmp_path):
    (tmp_path / "sr").mkdir()
    uri = qcow2_over(tmp_path / "sr" / "top.qcow2", "/etc/hostname", "raw")
    res = dp("attach", uri, "7")
    assert res.error_name == "Invalid_arguments"
    assert "resolves to /etc/hostname, outside the image's directory" in res.json["params"][1]
    assert daemons(volumes) == [] and not list(volumes.glob("*.log"))


def test_a_backing_symlink_escaping_the_image_directory_is_refused(state_dir, volumes, tmp_path):
    sr, elsewhere = tmp_path / "sr", tmp_path / "elsewhere"
    sr.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.raw").write_bytes(b"secret" * 1000)
    (sr / "base.raw").symlink_to(elsewhere / "secret.raw")
    uri = qcow2_over(sr / "top.qcow2", "base.raw", "raw")
    res = dp("attach", uri, "7")
    assert res.error_name == "Invalid_arguments"
    assert "resolves to %s, outside the image's directory" % (elsewhere / "secret.raw") in res.json["params"][1]
    assert daemons(volumes) == []


def test_a_backing_file_without_an_explicit_format_is_refused(state_dir, volumes, tmp_path):
    (tmp_path / "base.raw").write_bytes(b"\0" * 65536)
    top = tmp_path / "top.qcow2"
    uri = qcow2_over(top, "base.raw", "raw")
    data = top.read_bytes()
    assert data.count(b"\xe2\x79\x2a\xca") == 1  # the backing format header extension...
    top.write_bytes(data.replace(b"\xe2\x79\x2a\xca", b"\x00\x00\x0b\xad"))  # ...made one QEMU ignores
    res = dp("attach", uri, "7")
    assert res.error_name == "Invalid_arguments"
    assert "names no backing format" in res.json["params"][1]
    assert daemons(volumes) == []


def test_a_two_level_chain_in_the_image_directory_is_served_and_only_it_is_opened(state_dir, volumes, tmp_path):
    sr = tmp_path / "sr"
    sr.mkdir()
    base, mid, top = sr / "base.raw", sr / "mid.qcow2", sr / "top.qcow2"
    with open(base, "wb") as f:
        f.truncate(8 << 20)
        f.write(b"B" * 65536)
    qcow2_over(mid, "base.raw", "raw")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x4d 65536 65536", str(mid)], check=True,
                   capture_output=True)
    uri = qcow2_over(top, "mid.qcow2", "qcow2")
    res = dp("attach", uri, "7")
    assert res.returncode == 0, res.stdout
    sock, export = nbd_address(res.json)
    out = tmp_path / "read.raw"
    subprocess.run(["nbdcopy", "nbd+unix:///%s?socket=%s" % (export, sock), str(out)], check=True, timeout=30)
    data = out.read_bytes()
    assert data[:65536] == b"B" * 65536 and data[65536:131072] == b"M" * 65536 and data[131072:] == bytes(len(data) - 131072)
    (daemon,) = daemons(volumes)
    opened = {os.path.realpath("/proc/%d/fd/%s" % (daemon["pid"], fd)) for fd in os.listdir("/proc/%d/fd" % daemon["pid"])}
    assert {str(p) for p in (base, mid, top)} == {p for p in opened if p.startswith(str(sr) + "/")}
    assert dp("detach", uri, "7").stdout == b"null\n"


def test_a_backing_chain_that_loops_is_refused(state_dir, volumes, tmp_path):
    (tmp_path / "base.raw").write_bytes(b"\0" * 65536)
    qcow2_over(tmp_path / "b.qcow2", "base.raw", "raw")
    uri = qcow2_over(tmp_path / "a.qcow2", "b.qcow2", "qcow2")
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", "a.qcow2", str(tmp_path / "b.qcow2")], check=True)
    res = dp("attach", uri, "7")
    assert res.error_name == "Invalid_arguments"
    assert "loops through %s" % (tmp_path / "a.qcow2") in res.json["params"][1]
    assert daemons(volumes) == []
