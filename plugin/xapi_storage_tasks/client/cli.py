"""The task service for people: ``python3 -m xapi_storage_tasks.client.cli COMMAND``.

Commands:

``ls``           every task: id, state, progress, age, debug info
``watch ID``     a progress bar until the task finishes, then its final state
``cancel ID``    request cancellation (returns at once)
``destroy ID``   remove a finished task

Output is for people; ``--json`` prints JSON for scripts instead (``ls``:
a list of task records, ``watch``: the final record, ``cancel`` and
``destroy``: ``null``; a failure prints the XAPI error record). Calls go
through :mod:`xapi_storage_tasks.client.connection`: the daemon at ``--socket`` (or at the
default socket), else the executables.

Exit status: 0 on success (for ``watch``: the task Completed), 1 on an
error or a Failed task, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from xapi_storage_tasks.client import connection
from xapi_storage_tasks.wire import boundary
from xapi_storage_tasks.wire.errors import PluginError, TaskDoesNotExist

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

    from xapi_storage_tasks.client.connection import Client

PROG = "xapi-storage-tasks"
BAR_WIDTH = 30


def age(seconds: float) -> str:
    """A short human age: ``42s``, ``5m``, ``3h``, ``2d``."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def describe(state: list) -> str:
    """``["Failed", "Cancelled"]`` -> ``Failed: Cancelled`` and so on."""
    kind, value = state
    if kind == "Pending":
        return "Pending"
    if kind == "Completed":
        return "Completed in %.2fs" % value.get("duration", 0.0)
    return "Failed: %s" % value


def progress_text(state: list) -> str:
    """The PROGRESS column."""
    kind, value = state
    if kind == "Pending":
        return "%.0f%%" % (100 * value)
    return "100%" if kind == "Completed" else "-"


def _records(c: Client, dbg: str) -> list[dict]:
    """Every task's record, oldest first; unreadable tasks as
    ``{"id", "error"}``."""
    out = []
    for task_id in c.Task.ls(dbg=dbg):
        try:
            out.append(c.Task.stat(dbg=dbg, id=task_id))
        except TaskDoesNotExist:
            continue  # destroyed since the listing
        except PluginError as e:
            record = getattr(e, "record", None)
            if record is None:
                raise
            out.append({"id": task_id, "error": record})
    return out


def _table(records: list[dict], now: float, width: int) -> str:
    rows = [("ID", "STATE", "PROGRESS", "AGE", "DBG")]
    for r in records:
        if "error" in r:
            rows.append((r["id"], r["error"]["params"][0], "-", "-", "-"))
            continue
        state = describe(r["state"]) if r["state"][0] != "Completed" else "Completed"
        rows.append((r["id"], state[:40], progress_text(r["state"]), age(now - r["ctime"]), r["debug_info"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        line = "  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3].rjust(widths[3]),
                          row[4]])
        lines.append(line[:width] if width else line)
    return "\n".join(lines)


def cmd_ls(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    """List every task."""
    records = _records(c, args.dbg)
    if args.json:
        out.write(json.dumps(records) + "\n")
    elif records:
        width = 0
        if out.isatty():
            width = shutil.get_terminal_size().columns
        out.write(_table(records, time.time(), width) + "\n")
    else:
        out.write("no tasks\n")
    return 0


def _bar(fraction: float, task_id: str, started: float) -> str:
    filled = int(round(BAR_WIDTH * fraction))
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    return "\r[%s] %4.0f%%  %s  %s" % (bar, 100 * fraction, task_id, age(time.monotonic() - started))


def cmd_watch(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Follow a task until it finishes."""
    tty = out.isatty() and not args.json
    started = time.monotonic()
    while True:
        record = c.Task.stat(dbg=args.dbg, id=args.id)
        kind, value = record["state"]
        if kind != "Pending":
            break
        if tty:
            out.write(_bar(value, args.id, started))
            out.flush()
        time.sleep(args.interval)
    if args.json:
        out.write(json.dumps(record) + "\n")
    else:
        if tty:
            out.write(_bar(1.0 if kind == "Completed" else 0.0, args.id, started) + "\n")
        out.write("%s: %s\n" % (args.id, describe(record["state"])))
    return 0 if kind == "Completed" else 1


def cmd_cancel(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Request cancellation."""
    c.Task.cancel(dbg=args.dbg, id=args.id)
    out.write("null\n" if args.json else "cancel requested: %s\n" % args.id)
    return 0


def cmd_destroy(c: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Remove a finished task."""
    c.Task.destroy(dbg=args.dbg, id=args.id)
    out.write("null\n" if args.json else "destroyed: %s\n" % args.id)
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command is not reset by the
    # command's own (absent) copy of it.
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output for scripts")
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="the daemon's socket (default: its default path, else the executables)")
    common.add_argument("--dbg", default=argparse.SUPPRESS, help="debug context sent with every call (default: %s)" % PROG)
    summary = (__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python3 -m xapi_storage_tasks.client.cli", description=summary, parents=[common])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.add_parser("ls", parents=[common], help="list every task").set_defaults(run=cmd_ls)
    watch = commands.add_parser("watch", parents=[common], help="show a task's progress until it finishes")
    watch.add_argument("id", help="task id")
    watch.add_argument("--interval", type=float, default=0.2, help="seconds between polls (default 0.2)")
    watch.set_defaults(run=cmd_watch)
    for name, run, what in (("cancel", cmd_cancel, "request cancellation of a task"),
                            ("destroy", cmd_destroy, "remove a finished task")):
        sub = commands.add_parser(name, parents=[common], help=what)
        sub.add_argument("id", help="task id")
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    args.socket = getattr(args, "socket", None)
    args.dbg = getattr(args, "dbg", PROG)
    out = out or sys.stdout
    try:
        with connection.connect(socket=args.socket) as c:
            return args.run(c, args, out)
    except PluginError as e:
        if args.json:
            record = getattr(e, "record", None) or boundary.error_record(e)
            out.write(json.dumps(record) + "\n")
        sys.stderr.write(boundary.one_line("%s: %s" % (PROG, e)) + "\n")
        return 1
    except KeyboardInterrupt:
        if not args.json and out.isatty():
            out.write("\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
