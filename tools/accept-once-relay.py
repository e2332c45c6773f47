"""The toolstack's relay between the two hosts of a storage migration, for
the demo and tests: it listens on a Unix socket, accepts exactly ONE
connection (the source's mirror), connects to the destination's NBD socket
(what its ``Datapath.attach`` answered) and copies raw bytes both ways
until either side closes; then it exits. A second connection is never
accepted, as with xapi's proxy.

    python3 tools/accept-once-relay.py LISTEN_SOCKET DESTINATION_SOCKET
"""

import os
import socket
import sys
import threading


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends; then end ``dst``'s way."""
    try:
        while True:
            data = src.recv(1 << 20)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main(listen: str, destination: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen + ".tmp")
    server.listen(1)
    os.rename(listen + ".tmp", listen)  # appears only once it accepts
    source, _ = server.accept()
    server.close()
    os.unlink(listen)  # accepted once: nobody else gets in
    target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    target.connect(destination)
    back = threading.Thread(target=pipe, args=(target, source), daemon=True)
    back.start()
    pipe(source, target)
    back.join()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
