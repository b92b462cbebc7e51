#!/usr/bin/env python3
"""bench/share-model.py: what v2 leases (shares) cost etcd and each daemon,
by simulation of the protocol's rules over a population of keys, for
fleets too big to run here (100 daemons x 1,000,000 keys).

For each key it draws a request rate (Zipf over the keys), spreads it over
the daemons (every daemon sees every key's traffic, or each key sticks to
one daemon), and applies the coordinator's rules:
  - a key is recorded when some daemon's demand outgrows its implicit share
    (1/n of the rate and floor(burst/n) tokens: a share of 0 tokens is
    outgrown by any demand);
  - creating a record costs 1 write, and every other operating daemon
    listed in it responds once (its demand, or lowering its share): n writes;
  - a recorded key then costs 2 writes per crossing of a daemon's share by
    its demand (the one that wants more reports, one that gives up lowers;
    the raise is its next write), `--crossings` per key per hour;
  - a key that goes idle everywhere costs 1 write per daemon holding a share
    (its demand to 0) and 1 delete, once per key lifetime (`--lifetime`);
  - every daemon watches every record: each write reaches all n daemons.
Sizes are those measured on real records (tests/it, bench/global): about
100 bytes of record plus 115 per entry, JSON.

It prints, per scenario: keys recorded, etcd writes/s and bytes/s (in, and
out to the watchers), memory per daemon, and whether one etcd cluster can
take it (figures measured on this kind of machine, 2 vCPUs: ~10,000 puts/s
per member, see DESIGN.md 11; etcd's documented limits: 8 GB database,
1.5 MB request). Nothing here is measured; the inputs are the protocol's
rules, and `cargo bench --bench global` checks them at small scale.

Usage: bench/share-model.py            (the scenarios of bench/README.md)
       bench/share-model.py --daemons 100 --keys 1000000 --rate 1e6 ...
"""

import argparse
import math
import random

RECORD_BASE = 100  # bytes of a record without entries
ENTRY = 115  # bytes per entry
BUCKET = 132  # bytes per bucket in the table (README: ~124 + the share word)
BOOK = 96  # bytes per recorded share in a shard's book
VIEW_OVERHEAD = 80  # bytes per record kept in the view beyond its JSON
PUTS_PER_MEMBER = 10_000  # what one etcd member took here (tmpfs, 2 vCPUs)
MEMBERS = 3  # watchers spread over the members of one cluster
WATCH_OUT_PER_MEMBER = 100e6  # bytes/s one member sends its watchers (1 Gbit/s NIC: 125 MB/s)


def zipf_rates(keys, total, s, sample):
    """A sample of per-key request rates (Zipf s over `keys`), each with the
    weight it stands for: the hot head exactly, the tail sampled."""
    h = sum(k ** -s for k in range(1, min(keys, 200_000) + 1))
    if keys > 200_000:  # the rest of the harmonic sum, by its integral
        h += ((keys ** (1 - s)) - (200_000 ** (1 - s))) / (1 - s) if s != 1 else math.log(keys / 200_000)
    head = min(keys, 1000)
    out = [(total * k ** -s / h, 1.0) for k in range(1, head + 1)]
    rest = keys - head
    if rest > 0:
        rng = random.Random(7)
        n = min(sample, rest)
        for _ in range(n):
            k = rng.randint(head + 1, keys)
            out.append((total * k ** -s / h, rest / n))
    return out


def model(daemons, keys, rate, zipf, limit, burst, affinity, crossings, lifetime):
    n = daemons
    implicit_rate = limit / n
    implicit_depth = burst // n
    recorded = 0.0
    entries = 0.0
    for q, weight in zipf_rates(keys, rate, zipf, 20_000):
        if q <= 0:
            continue
        if affinity == "spread":
            per = [q / n] * n
        else:  # sticky: one daemon sees all of it
            per = [q] + [0.0] * (n - 1)
        busy = [d for d in per if d > 0]
        unmet = any(d > implicit_rate * 1.05 for d in busy) or implicit_depth == 0
        if unmet:
            recorded += weight
            # Daemons listed hold shares: all n at creation.
            entries += weight * n
    record_bytes = RECORD_BASE + ENTRY * n
    # Writes per second: creations and deletions over a key's lifetime,
    # responses at creation and on idling, crossings while it lives.
    per_record_life = 1 + (n - 1) + (n if affinity == "spread" else 1) + 1
    creations = recorded / lifetime
    writes = creations * per_record_life + recorded * crossings / 3600 * 2
    bytes_in = writes * record_bytes
    watch_out_per_daemon = bytes_in  # every daemon watches every record
    mem = recorded * (record_bytes + VIEW_OVERHEAD + BOOK)
    buckets_per_daemon = keys if affinity == "spread" else keys / n
    mem += buckets_per_daemon * BUCKET
    return {
        "recorded": recorded,
        "record_bytes": record_bytes,
        "writes": writes,
        "bytes_in": bytes_in,
        "watch_out_total": watch_out_per_daemon * n,
        "watch_per_daemon": watch_out_per_daemon,
        "mem_per_daemon": mem,
        "db_bytes": recorded * record_bytes,
    }


def human(x, unit=""):
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def show(name, args, r):
    limits = [
        (r["writes"] > PUTS_PER_MEMBER, f"{human(r['writes'])} writes/s > {human(PUTS_PER_MEMBER)} per member"),
        (r["db_bytes"] >= 8e9, "database over etcd's 8 GB"),
        (r["record_bytes"] >= 1.5e6, "a record over etcd's 1.5 MB request"),
        (r["watch_out_total"] / MEMBERS > WATCH_OUT_PER_MEMBER,
         f"{human(r['watch_out_total'] / MEMBERS, 'B/s')} to watchers per member > "
         f"{human(WATCH_OUT_PER_MEMBER, 'B/s')}"),
    ]
    over = [why for hit, why in limits if hit]
    print(f"\n{name}")
    print(
        f"  {args['daemons']} daemons, {human(args['keys'])} keys, {human(args['rate'], '/s')} "
        f"requests (Zipf {args['zipf']}), rule {args['limit']}/s burst {args['burst']}, "
        f"traffic {args['affinity']}, {args['crossings']} share crossings/key/h, "
        f"keys live {args['lifetime']:.0f} s"
    )
    print(
        f"  implicit share {args['limit'] / args['daemons']:.3g}/s, "
        f"{args['burst'] // args['daemons']} tokens; keys recorded {human(r['recorded'])} "
        f"({100 * r['recorded'] / args['keys']:.1f}%), a record {human(r['record_bytes'], 'B')}"
    )
    print(
        f"  etcd: {human(r['writes'], ' writes/s')}, {human(r['bytes_in'], 'B/s')} in, "
        f"{human(r['watch_out_total'], 'B/s')} out to watchers "
        f"({human(r['watch_per_daemon'], 'B/s')} per daemon), database {human(r['db_bytes'], 'B')}"
    )
    print(f"  memory per daemon: {human(r['mem_per_daemon'], 'B')}")
    print(f"  one etcd cluster: {'NOT enough (' + '; '.join(over) + ')' if over else 'enough'}")


SCENARIOS = [
    ("bench scale (measured: bench/README.md)", dict(daemons=3, keys=2000, rate=80_000, zipf=0.0,
                                                     limit=20, burst=20, affinity="spread",
                                                     crossings=6, lifetime=3600)),
    ("bench zipf", dict(daemons=3, keys=20_000, rate=100_000, zipf=1.1, limit=20, burst=20,
                        affinity="spread", crossings=6, lifetime=3600)),
    ("bench sparse", dict(daemons=3, keys=100_000, rate=100_000, zipf=0.0, limit=20, burst=20,
                          affinity="spread", crossings=6, lifetime=3600)),
    ("100 x 1M, spread traffic, burst 20 (below the daemon count)",
     dict(daemons=100, keys=1_000_000, rate=1_000_000, zipf=1.1, limit=20, burst=20,
          affinity="spread", crossings=6, lifetime=3600)),
    ("100 x 1M, spread traffic, burst 200",
     dict(daemons=100, keys=1_000_000, rate=1_000_000, zipf=1.1, limit=200, burst=200,
          affinity="spread", crossings=6, lifetime=3600)),
    ("100 x 1M, sticky traffic (each client on one host), burst 200",
     dict(daemons=100, keys=1_000_000, rate=1_000_000, zipf=1.1, limit=200, burst=200,
          affinity="sticky", crossings=6, lifetime=3600)),
]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--daemons", type=int)
    p.add_argument("--keys", type=int)
    p.add_argument("--rate", type=float, help="requests per second, all keys")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--limit", type=float, default=20, help="per key, per second")
    p.add_argument("--burst", type=int, default=20)
    p.add_argument("--affinity", choices=["spread", "sticky"], default="spread")
    p.add_argument("--crossings", type=float, default=6, help="per recorded key per hour")
    p.add_argument("--lifetime", type=float, default=3600, help="seconds a key stays in use")
    a = p.parse_args()
    if a.daemons:
        args = dict(daemons=a.daemons, keys=a.keys or 1_000_000, rate=a.rate or 1e6,
                    zipf=a.zipf, limit=a.limit, burst=a.burst, affinity=a.affinity,
                    crossings=a.crossings, lifetime=a.lifetime)
        show("custom", args, model(**args))
        return
    for name, args in SCENARIOS:
        show(name, args, model(**args))


if __name__ == "__main__":
    main()
