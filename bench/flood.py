#!/usr/bin/env python3
"""Does one client's flood delay another? (issue 22's figures)

Starts the given rld binary on a private socket and runs four floods, one
after the other. During each, a separate process (the probe) sends one
Acquire every 10 ms on its own connection and times each answer:
  non-readers  2,000 connections pipelining AcquireMany batches of 100
               items (the largest whose answers need no reservation from
               the answer budget: all are decided), never reading an
               answer (the daemon's CPU is reported);
  idle-large   4,090 connections that each sent one 64 KiB batch and left
               its answer unread, then sit idle (RSS reported);
  slowloris    1,000 connections each sending a frame one byte at a time;
  uid-cap      one uid (nobody) at its connection cap (512), every
               connection pipelining such batches and reading its answers;
  uid-share    no probe: nobody with 64 such connections and root with one,
               at once; the share of the decisions root's one connection
               gets (fair by uid: about half; by connection: 1/65).
Prints the probe's p50/p99/max per flood.

  bench/flood.py PATH/TO/rld [SECONDS]     (default 5 s per flood)

The flood generators run at nice 10, the daemon and the probe at the usual
priority: on a small machine the generators' own CPU use would otherwise
show up as probe latency. Every loop is bounded in count and time; only
processes this script starts are stopped (by PID). Run as root (the
uid-cap flood runs as nobody; the probe returns to nice 0).
"""
import json
import os
import pwd
import resource
import selectors
import struct
import subprocess
import sys
import tempfile
import time

from hostile import batch, connect, read_frame, rss_kib, varint  # noqa: E402 (same folder)


def acquire(rid):
    body = varint(rid) + varint(1) + b"\x05probe" + b"\x01p" + b"\x01\x01\x00"
    return struct.pack(">I", len(body)) + body


BIG = batch((65536 - 8) // 7)
# 100 items: the largest batch whose answer needs no reservation from the
# answer budget (every one is decided), pipelined 90 to a 64 KiB write.
SMALL = batch(100) * 90


def probe(path, seconds):
    """One Acquire every 10 ms; prints the latencies (ms) as JSON."""
    # Back to the daemon's priority (the flood generators run at nice 10).
    os.nice(-int(os.environ.get("RLD_FLOOD_NICE", "10")))
    s = connect(path)
    lat = []
    deadline = time.monotonic() + seconds
    rid = 10
    next_at = time.monotonic()
    while time.monotonic() < deadline and len(lat) < 100_000:
        rid += 1
        t = time.monotonic()
        s.sendall(acquire(rid))
        read_frame(s)
        lat.append((time.monotonic() - t) * 1000)
        next_at += 0.010
        time.sleep(max(0.0, next_at - time.monotonic()))
    print(json.dumps(lat))


def start_probe(path, seconds):
    return subprocess.Popen([sys.executable, __file__, "--probe", path, str(seconds)],
                            stdout=subprocess.PIPE)


def summary(proc):
    out, _ = proc.communicate(timeout=120)
    raw = json.loads(out)
    if os.environ.get("RLD_FLOOD_TRACE"):
        print("   slow probes (index, ms):", [(i, round(x, 1)) for i, x in enumerate(raw) if x > 5])
    lat = sorted(raw)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"n": len(lat), "p50_ms": round(pick(0.5), 3), "p99_ms": round(pick(0.99), 3),
            "max_ms": round(lat[-1], 3)}


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    return rss_kib(pid) / 1024


def pump(socks, seconds, read, payload):
    """Keeps sending `payload` on every socket (reading answers if `read`)
    for `seconds`, never blocking."""
    sel = selectors.DefaultSelector()
    pending = {}
    for s in socks:
        s.setblocking(False)
        pending[s.fileno()] = memoryview(payload)
        sel.register(s, selectors.EVENT_WRITE | (selectors.EVENT_READ if read else 0))
    deadline = time.monotonic() + seconds
    received = 0
    while time.monotonic() < deadline:
        for key, ev in sel.select(timeout=0.05):
            s = key.fileobj
            if ev & selectors.EVENT_READ:
                try:
                    while True:
                        chunk = s.recv(1 << 20)
                        if not chunk:
                            break
                        received += len(chunk)
                except (BlockingIOError, ConnectionError):
                    pass
            if ev & selectors.EVENT_WRITE:
                buf = pending[s.fileno()]
                try:
                    n = s.send(buf)
                    buf = buf[n:]
                    pending[s.fileno()] = buf if len(buf) else memoryview(payload)
                except (BlockingIOError, ConnectionError):
                    pass
    sel.close()
    return received


def flood_non_readers(path, pid, seconds):
    socks = [connect(path) for _ in range(2000)]
    cpu0 = cpu_s(pid)
    p = start_probe(path, seconds)
    pump(socks, seconds, read=False, payload=SMALL)
    result = summary(p)
    result["daemon_cpu_s"] = round(cpu_s(pid) - cpu0, 2)
    for s in socks:
        s.close()
    return result


def flood_idle_large(path, pid, seconds):
    socks = []
    for _ in range(4090):
        s = connect(path)
        s.setblocking(False)
        try:
            s.send(BIG)
        except BlockingIOError:
            pass
        socks.append(s)
    time.sleep(1)
    p = start_probe(path, seconds)
    result = summary(p)
    result["rss_mib"] = round(rss_mib(pid), 1)
    for s in socks:
        s.close()
    return result


def flood_slowloris(path, pid, seconds):
    socks = [connect(path) for _ in range(1000)]
    for s in socks:
        s.setblocking(False)
    p = start_probe(path, seconds)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        for s in socks:
            try:
                s.send(BIG[i % len(BIG): i % len(BIG) + 1])
            except (BlockingIOError, ConnectionError):
                pass
        i += 1
        time.sleep(0.05)
    result = summary(p)
    for s in socks:
        s.close()
    return result


def flood_uid_cap(path, pid, seconds, per_uid):
    nobody = pwd.getpwnam("nobody")
    child = os.fork()
    if child == 0:
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            socks = []
            for _ in range(per_uid):
                try:
                    socks.append(connect(path))
                except (ConnectionError, OSError):
                    break
            pump(socks, seconds + 1, read=True, payload=SMALL)
        finally:
            os._exit(0)
    time.sleep(1)
    p = start_probe(path, seconds)
    result = summary(p)
    os.waitpid(child, 0)
    return result


def flood_uid_share(path, pid, seconds, connections=64):
    """Service per uid: nobody with `connections` busy connections, root with
    one, both pipelining 100-item batches and reading, in separate processes
    at once. Answers are the same size per batch, so answer bytes measure
    decisions."""
    nobody = pwd.getpwnam("nobody")
    counts = {}
    children = []
    for uid_name, n in [("nobody", connections), ("root", 1)]:
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                os.close(r)
                if uid_name == "nobody":
                    os.setgid(nobody.pw_gid)
                    os.setuid(nobody.pw_uid)
                socks = [connect(path) for _ in range(n)]
                got = pump(socks, seconds, read=True, payload=SMALL)
                os.write(w, str(got).encode())
            finally:
                os._exit(0)
        os.close(w)
        children.append((uid_name, child, r))
    for uid_name, child, r in children:
        with os.fdopen(r) as f:
            counts[uid_name] = int(f.read() or 0)
        os.waitpid(child, 0)
    total = max(1, sum(counts.values()))
    return {
        "n": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0,
        "root_1_conn_share_pct": round(100 * counts["root"] / total, 1),
        "nobody_conns": connections,
        "answer_mib": {k: round(v / 2**20, 1) for k, v in counts.items()},
    }


def main():
    if sys.argv[1] == "--probe":
        probe(sys.argv[2], float(sys.argv[3]))
        return
    binary = os.path.abspath(sys.argv[1])
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    per_uid = 512
    # RLD_FLOODS=non-readers,uid-cap runs only those.
    only = [f for f in os.environ.get("RLD_FLOODS", "").split(",") if f]
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        sock = os.path.join(d, "rld.sock")
        conf = os.path.join(d, "rld.toml")
        with open(conf, "w") as f:
            f.write("max_connections = 8192\n")
            f.write(f"max_connections_per_uid = {per_uid}\n")
            f.write("socket_mode = \"0666\"\n")
        daemon = subprocess.Popen(
            [binary, "--config", conf, "--socket", sock, "--state-dir",
             os.path.join(d, "state"), "--log-level", "error"],
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            pid = daemon.pid
            # The flood generators (Python, on the same cores) yield the CPU
            # to the daemon and the probe, both at the usual priority: the
            # probe measures the daemon, not the generators' CPU use.
            os.nice(int(os.environ.get("RLD_FLOOD_NICE", "10")))
            print(f"binary {binary}, {seconds} s per flood, probe: one Acquire every 10 ms")
            results = {"quiet": summary(start_probe(sock, min(seconds, 2.0)))}
            for name, run in [
                ("non-readers", lambda: flood_non_readers(sock, pid, seconds)),
                ("idle-large", lambda: flood_idle_large(sock, pid, seconds)),
                ("slowloris", lambda: flood_slowloris(sock, pid, seconds)),
                ("uid-cap", lambda: flood_uid_cap(sock, pid, seconds, per_uid)),
                ("uid-share", lambda: flood_uid_share(sock, pid, seconds)),
            ]:
                if only and name not in only:
                    continue
                results[name] = run()
                time.sleep(1)
            for name, r in results.items():
                if name == "uid-share":
                    print(f"  {name:12} one root connection got {r['root_1_conn_share_pct']}% of "
                          f"the answers beside {r['nobody_conns']} busy connections of nobody "
                          f"({r['answer_mib']} MiB)")
                    continue
                extra = "".join(f", {k} {v}" for k, v in r.items()
                                if k not in ("n", "p50_ms", "p99_ms", "max_ms"))
                print(f"  {name:12} n {r['n']:4}  p50 {r['p50_ms']:8.3f} ms  "
                      f"p99 {r['p99_ms']:8.3f} ms  max {r['max_ms']:8.3f} ms{extra}")
            print(json.dumps(results))
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)


if __name__ == "__main__":
    main()
