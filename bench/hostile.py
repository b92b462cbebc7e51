#!/usr/bin/env python3
"""What hostile local clients cost the daemon, in RSS (issue 9's figures).

Starts the given rld binary on a private socket and measures its resident
memory in three phases:
  idle-after-batch  N clients each send one 64 KiB AcquireMany (13,106 items),
                    read its answer, then stay connected and idle;
  non-readers       N clients each send such a batch and never read;
  after             every client has left.
Also times how long a fresh client waits for its Health answer while the
non-readers are connected.

  bench/hostile.py PATH/TO/rld [N]     (default N = 2000)

Only processes this script starts are stopped (by PID).
"""
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time

HELLO = bytes([0, 0, 0, 3, 1, 0, 1])


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def batch(items):
    # AcquireMany (variant 2): id 2, items of (client "a", resource "b",
    # cost 1, priority normal (1), no trace).
    item = b"\x01a" + b"\x01b" + b"\x01" + b"\x01" + b"\x00"
    body = varint(2) + varint(2) + varint(items) + item * items
    return struct.pack(">I", len(body)) + body


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def read_frame(s):
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    n = struct.unpack(">I", head)[0]
    body = b""
    while len(body) < n:
        chunk = s.recv(min(1 << 20, n - len(body)))
        if not chunk:
            return None
        body += chunk
    return body


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(HELLO)
    read_frame(s)
    return s


def main():
    binary = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    items = (65536 - 8) // 7
    frame = batch(items)
    assert len(frame) - 4 <= 65536, len(frame)
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "rld.sock")
        conf = os.path.join(d, "rld.toml")
        with open(conf, "w") as f:
            f.write("max_connections = 8192\n")
        daemon = subprocess.Popen(
            [binary, "--config", conf, "--socket", sock, "--state-dir", os.path.join(d, "state"),
             "--log-level", "error"],
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            pid = daemon.pid
            print(f"binary {binary}, {n} clients, batches of {items} items")
            print(f"  start              {rss_kib(pid) / 1024:8.1f} MiB")
            idle = []
            for _ in range(n):
                s = connect(sock)
                s.sendall(frame)
                read_frame(s)
                idle.append(s)
            print(f"  idle-after-batch   {rss_kib(pid) / 1024:8.1f} MiB")
            for s in idle:
                s.close()
            time.sleep(1)
            stuck = []
            for _ in range(n):
                s = connect(sock)
                s.setblocking(False)
                try:
                    s.sendall(frame)
                except BlockingIOError:
                    pass
                stuck.append(s)
            time.sleep(2)
            print(f"  non-readers        {rss_kib(pid) / 1024:8.1f} MiB")
            start = time.monotonic()
            probe = connect(sock)
            probe.sendall(bytes([0, 0, 0, 2, 3, 8]))  # Health (variant 8), id 3
            read_frame(probe)
            print(f"  probe answered in  {(time.monotonic() - start) * 1000:8.1f} ms")
            probe.close()
            for s in stuck:
                s.close()
            time.sleep(2)
            print(f"  after              {rss_kib(pid) / 1024:8.1f} MiB")
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)


if __name__ == "__main__":
    main()
