"""Benchmarks of the Cut-Out: its storage engine against SQLite, its HTTP server against bare bottle.

One section per workload, all measured in the same run on this machine:

  1. reading the newest 10 records of a 1,000,000-record collection vs of a
     1,000-record one (the poll clients make most): its cost must not grow
     with the size of the collection;
  2. durable appends of batches of 10 records of 200 bytes, vs SQLite in WAL
     mode with synchronous=FULL, one transaction per batch;
  3. reading all records of a 100,000-record collection, vs SQLite;
  4. garbage collection of a 1,000,000-record collection: speed, and peak
     memory, which should grow with the number of distinct (type, id) keys;

and, over HTTP, for cutout.py on its own server and on each other server
installed (granian, cheroot, waitress: `pip install granian cheroot waitress`),
against a bare bottle route on the same server (a route that does nothing
but answer):

  5. empty polls (204): requests/s with 8 keep-alive connections, which
     must reach 70% of the bare route's on the fastest server measured;
  6. GET of the newest 10 objects and durable POST of 10 objects:
     requests/s and p50/p99 latency beside the bare route's;
  7. a client catching up on 10,000 and 100,000 objects through `limit`
     pages: objects/s, and the server's peak memory, which must stay flat;
  8. a 10 MB blob posted (base64 in the JSON body) and downloaded: MB/s, beside
     the bare route reading the same body and bottle.static_file serving the
     same bytes, and how much the server's peak memory grew, in blob sizes;
  9. many devices: 1,000 keep-alive connections each polling about once a
     second while 500 idle and 200 slowloris sockets are open and a new
     client logs in every half second: polls answered, p50/p99/max latency,
     connections the server closed, and the new clients' time to a hello.

and, in Chromium (Debian's, with the Python package playwright):

 12. syncclient.js as a fresh device reading 1,000, 10,000, 100,000 and 1,000,000
     objects: time to the first full sync, requests, peak heap, the state it
     stores, a sync that finds nothing, and an edit from elsewhere; beside another
     version of it (--baseline-client FILE), the two taking turns.

The servers run in processes of their own on 127.0.0.1. The load of 5 and 9
comes from a child process of asyncio clients on raw sockets (cheap, so that
the clients are not what is measured); that of 6-8 from this process, threads
each reusing one http.client connection. Reopened connections are counted and
shown per 1000 requests: 1000 means a new TCP connection for every request.
The server's CPU time per request (from /proc, all its processes) says how
much of the time is the server's.

The two sides of a comparison run interleaved (ours, the baseline, ours, ...)
so that the machine's drift hits both alike. Each section prints the figure,
the baseline, their ratio and, where there is one, the target with "ok" or
"MISSED". It is a measurement, not a test: it exits 0 whatever the figures.

    python bench.py                  # full sizes: about ten minutes; data in ./bench-data, removed after
    python bench.py --quick          # smaller sizes, shorter runs: a smoke run
    python bench.py --only 5 --only 9   # the empty polls and many devices alone
    git show main~1:syncclient.js > old.js && python bench.py --only 12 --baseline-client old.js
    python bench.py --dir /mnt/disk/bench --keep

Needs only the standard library and cutout.py (which imports bottle); the
other servers are measured if their packages are installed.
"""

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import http.client
import http.server
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import random
import re
import resource
import select
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

import bottle
import cutout

RECORD_SIZE = 200        # bytes per record, a typical small JSON object
BUILD_BATCH = 10_000     # records per append while building: setup must take seconds, not minutes
MARKER = ".cutout-bench" # marks a directory as this script's, so it may empty one left by --keep


@dataclasses.dataclass(frozen=True)
class Sizes:
    big: int = 1_000_000            # 1. newest 10 of `big` vs of `small`
    small: int = 1_000
    newest: int = 10
    newest_reads: int = 2_000       #    timed reads of each collection
    append_rounds: int = 10         # 2. rounds, each `append_batches` batches per side
    append_batches: int = 300
    append_batch: int = 10          #    records per batch
    read_all: int = 100_000         # 3. records read at once
    read_all_runs: int = 10         #    timed reads per side
    gc_keys: int = 100_000          # 4. distinct (type, id) keys ...
    gc_updates: int = 10            #    ... each appended this many times
    tombstone_every: int = 10       #    every 10th key's last update deletes it
    http_connections: int = 8       # 5.-6. keep-alive connections
    http_warmup: float = 0.5        #    seconds of load per side before measuring
    http_rounds: int = 8            #    measured rounds per side, interleaved ours/bare
    http_round: float = 1.0         #    seconds per round
    http_lead: float = 0.1          #    seconds of load before each round's window opens
    newest_collection: int = 1_000  # 6. objects in the collection whose newest 10 are read
    catchup_small: int = 10_000     # 7. collections caught up on
    catchup_big: int = 100_000
    catchup_batch: int = 1_000      #    objects per POST while building them (~200 KB bodies)
    catchup_page: int = 1_000       #    limit= of each page (the server's cap is 1000)
    catchup_runs: int = 3           #    catch-ups per collection, on one server process
    blob_bytes: int = 10_000_000    # 8. one blob's size
    blob_runs: int = 3              #    uploads and downloads per side
    devices: int = 1_000            # 9. devices polling, each on a keep-alive connection of its own
    device_users: int = 250         #    users they belong to, one collection each
    device_interval: float = 1.0    #    seconds between a device's polls (x0.5-1.5)
    device_seconds: float = 30.0    #    seconds of polling measured
    idle_sockets: int = 500         #    sockets that connect and send nothing
    slowloris: int = 200            #    sockets that trickle a request head
    fresh_every: float = 0.5        #    seconds between fresh clients' login + hello
    move_mb: int = 100              # 11. megabytes of the collection moved to a node that joins
    client_objects: tuple = (1_000, 10_000, 100_000, 1_000_000)   # 12. collections a fresh browser reads


FULL = Sizes()
QUICK = Sizes(big=100_000, small=100, newest_reads=500, append_batches=30,
              read_all=10_000, gc_keys=10_000,
              http_warmup=0.2, http_rounds=3, http_round=0.5,
              catchup_small=1_000, catchup_big=10_000, blob_bytes=1_000_000,
              devices=200, device_users=50, device_seconds=8.0, idle_sockets=100, slowloris=40, move_mb=10,
              client_objects=(1_000, 10_000))


###############################################################################
# Helpers
###############################################################################


def note(n, size=RECORD_SIZE):
    """A record of exactly `size` bytes: {"type":"note","id":n,"data":"xxx..."}."""
    head = b'{"type":"note","id":%d,"data":"' % n
    return head + b"x" * (size - len(head) - 2) + b'"}'


def tombstone(n):
    return b'{"type":"note","id":%d,"deleted":true}' % n


def seconds(operation):
    """How long one call of operation takes."""
    started = time.perf_counter()
    operation()
    return time.perf_counter() - started


def median(samples):
    return statistics.median(samples)


def build(db, count, record=note):
    """Append record(0) .. record(count - 1) in large batches; return the seconds it took."""
    def append_all():
        for first in range(0, count, BUILD_BATCH):
            db.append([record(n) for n in range(first, min(first + BUILD_BATCH, count))])
    return seconds(append_all)


def sqlite_open(path):
    # isolation_level=None: the module must not open transactions of its own,
    # so each batch is exactly the BEGIN ... COMMIT written here.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS records (counter INTEGER PRIMARY KEY, data BLOB)")
    return conn


def section(title):
    print(f"\n== {title} ==", flush=True)


def result(ratio_name, ratio, target=None, at_least=True, indent="  "):
    """Print the ratio and, if there is a target, whether it holds."""
    text = f"{indent}ratio {ratio_name}: {ratio:.2f}"
    if target is not None:
        holds = ratio >= target if at_least else ratio <= target
        text += f"    target {'>=' if at_least else '<='} {target}: {'ok' if holds else 'MISSED'}"
    print(text, flush=True)


###############################################################################
# Workloads
###############################################################################


def newest_of_big_vs_small(root, sizes):
    section(f"1. newest {sizes.newest} of {sizes.big:,} vs of {sizes.small:,}")
    big = cutout.AppendOnlyDB(os.path.join(root, "newest-big"))
    small = cutout.AppendOnlyDB(os.path.join(root, "newest-small"))
    built_big, built_small = build(big, sizes.big), build(small, sizes.small)
    print(f"  built {sizes.big:,} records in {built_big:.1f} s, {sizes.small:,} in {built_small:.2f} s")

    def read_newest(db):
        with db.snapshot() as snapshot:
            records = list(snapshot.records_after(snapshot.last_counter - sizes.newest))
        assert len(records) == sizes.newest, len(records)

    for _ in range(50):     # warm the page cache and the interpreter for both alike
        read_newest(big), read_newest(small)
    times = {big: [], small: []}
    for i in range(sizes.newest_reads):
        # Swap who goes first each time, so neither always gets the warmer turn.
        for db in (big, small) if i % 2 == 0 else (small, big):
            times[db].append(seconds(lambda: read_newest(db)))
    big_us, small_us = median(times[big]) * 1e6, median(times[small]) * 1e6
    print(f"  median per read (snapshot + read {sizes.newest} + close), "
          f"{sizes.newest_reads:,} reads each, interleaved:")
    print(f"    of {sizes.big:>9,} records: {big_us:8.1f} us")
    print(f"    of {sizes.small:>9,} records: {small_us:8.1f} us   (baseline)")
    result("big/small", big_us / small_us, 1.5, at_least=False)


def durable_appends(root, sizes):
    n = sizes.append_batch
    section(f"2. durable appends, batches of {n} x {RECORD_SIZE} bytes, vs SQLite WAL synchronous=FULL")
    db = cutout.AppendOnlyDB(os.path.join(root, "appends"))
    with db.snapshot():
        pass    # creates the collection now, so creating it is not timed
    conn = sqlite_open(os.path.join(root, "appends.sqlite"))
    total = sizes.append_rounds * sizes.append_batches
    batches = [[note(i * n + j) for j in range(n)] for i in range(total)]
    rows = [[(record,) for record in batch] for batch in batches]

    def ours(first):
        for batch in batches[first:first + sizes.append_batches]:
            db.append(batch)

    def theirs(first):
        # SQLite assigns the counter, as our append does.
        for batch in rows[first:first + sizes.append_batches]:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO records (data) VALUES (?)", batch)
            conn.execute("COMMIT")

    spent = {ours: 0.0, theirs: 0.0}
    for round_ in range(sizes.append_rounds):
        first = round_ * sizes.append_batches
        for side in (ours, theirs) if round_ % 2 == 0 else (theirs, ours):
            spent[side] += seconds(lambda: side(first))
    with db.snapshot() as snapshot:
        assert snapshot.record_count == total * n, snapshot.record_count
    assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == total * n
    conn.close()

    ours_rate, theirs_rate = total / spent[ours], total / spent[theirs]
    print(f"  {total:,} batches per side in {sizes.append_rounds} interleaved rounds of {sizes.append_batches}:")
    print(f"    ours:   {ours_rate:8,.0f} batches/s  ({spent[ours] / total * 1e3:.2f} ms per batch)")
    print(f"    SQLite: {theirs_rate:8,.0f} batches/s  ({spent[theirs] / total * 1e3:.2f} ms per batch)   (baseline)")
    result("ours/SQLite", ours_rate / theirs_rate, 1.0)


def read_all(root, sizes):
    count = sizes.read_all
    section(f"3. read all records of {count:,}, vs SQLite")
    db = cutout.AppendOnlyDB(os.path.join(root, "read-all"))
    build(db, count)
    conn = sqlite_open(os.path.join(root, "read-all.sqlite"))
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO records (counter, data) VALUES (?, ?)",
                     ((n + 1, note(n)) for n in range(count)))
    conn.execute("COMMIT")
    # A long-lived database has been checkpointed; reading rows still in the
    # WAL would measure a passing state of SQLite, not its steady one.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def streamed(records):
        """Touch every (counter, record) as a server writing a response does, keeping none."""
        seen = 0
        for counter, record in records:
            seen += 1
        assert seen == count

    def ours():
        with db.snapshot() as snapshot:
            streamed(snapshot.records_after(0))

    def theirs():
        streamed(conn.execute("SELECT counter, data FROM records WHERE counter > ?", (0,)))

    def ours_listed():
        with db.snapshot() as snapshot:
            assert len(list(snapshot.records_after(0))) == count

    def theirs_listed():
        assert len(list(conn.execute("SELECT counter, data FROM records WHERE counter > ?", (0,)))) == count

    # Streaming is how a server reads a collection, so the target applies to it.
    # Collecting every pair into a list is shown too: there Python's cost of
    # keeping 100,000 tuples alive weighs on both sides alike.
    for title, mine, baseline, target in (("streamed", ours, theirs, 2.0),
                                          ("into a list", ours_listed, theirs_listed, None)):
        mine(), baseline()    # warm the page cache for both alike
        times = {mine: [], baseline: []}
        for i in range(sizes.read_all_runs):
            for side in (mine, baseline) if i % 2 == 0 else (baseline, mine):
                times[side].append(seconds(side))
        ours_s, theirs_s = median(times[mine]), median(times[baseline])
        print(f"  {title}, median of {sizes.read_all_runs} interleaved reads each:")
        print(f"    ours:   {ours_s * 1e3:8.1f} ms  ({count / ours_s:12,.0f} records/s)")
        print(f"    SQLite: {theirs_s * 1e3:8.1f} ms  ({count / theirs_s:12,.0f} records/s)   (baseline)")
        result("SQLite time/our time", theirs_s / ours_s, target)
    conn.close()


# Runs in a fresh interpreter, so that its peak memory is the collection's
# alone and not whatever this process has built up. It reads VmHWM, the
# process's own high-water mark: ru_maxrss will not do, because after
# fork+exec Linux carries the parent's peak into the child's ru_maxrss.
GC_CHILD = r"""
import dataclasses, json, resource, sys
sys.path.insert(0, sys.argv[2])
import cutout

def peak_rss():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss    # no /proc: the best there is
    return peak if sys.platform == "darwin" else peak * 1024

before = peak_rss()
report = cutout.collect_garbage(cutout.AppendOnlyDB(sys.argv[1]))
print(json.dumps(dict(dataclasses.asdict(report), rss_before=before, rss_peak=peak_rss())))
"""


def collect_garbage_in_child(path):
    here = os.path.dirname(os.path.abspath(cutout.__file__))
    child = subprocess.run([sys.executable, "-c", GC_CHILD, path, here],
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout)


def garbage_collection(root, sizes):
    section(f"4. garbage collection of {sizes.gc_keys * sizes.gc_updates:,} records "
            f"(in a child process, for its peak memory)")

    def collection(name, keys, updates):
        """keys distinct notes, each appended `updates` times; every 10th one's last update deletes it."""
        def record(position):
            key, update = position % keys, position // keys
            if update == updates - 1 and key % sizes.tombstone_every == 0:
                return tombstone(key)
            return note(key)
        db = cutout.AppendOnlyDB(os.path.join(root, name))
        built = build(db, keys * updates, record)
        return db, built

    # The first is the workload; the other two tell apart what memory grows
    # with: one has a tenth of the keys and of the bytes, the other a tenth of
    # the bytes but all of the keys.
    cases = [(sizes.gc_keys, sizes.gc_updates), (sizes.gc_keys // 10, sizes.gc_updates), (sizes.gc_keys, 1)]
    print(f"  {'records':>10} {'keys':>8} | {'records after':>13} {'MB before':>9} {'MB after':>8} "
          f"{'seconds':>7} {'MB/s':>6} | {'peak RSS MB':>11} {'growth MB':>9}")
    for i, (keys, updates) in enumerate(cases):
        db, built = collection(f"gc-{i}", keys, updates)
        report = collect_garbage_in_child(db.path)
        expected = keys    # one newest record per key; tombstones are kept (no purge asked for)
        assert report["records_after"] == expected, (report, expected)
        mb_before, mb_after = report["bytes_before"] / 1e6, report["bytes_after"] / 1e6
        print(f"  {report['records_before']:>10,} {keys:>8,} | {report['records_after']:>13,} "
              f"{mb_before:>9.1f} {mb_after:>8.1f} {report['seconds']:>7.2f} "
              f"{mb_before / report['seconds']:>6.1f} | {report['rss_peak'] / 1e6:>11.1f} "
              f"{(report['rss_peak'] - report['rss_before']) / 1e6:>9.1f}", flush=True)
        shutil.rmtree(db.path)    # a GB of disk less while the next one is built
    print("  growth = peak RSS during collect_garbage() minus the peak after importing cutout.")
    print("  No target; memory should follow the keys column, not the MB before column.")


###############################################################################
# HTTP: cutout.py on its own server and on others, vs a bare bottle route
###############################################################################
# Each server runs in processes of its own on 127.0.0.1; this process and
# its children are the clients. "ours" is cutout.py's application; "bare" is
# a bottle app whose routes answer without doing anything, run by the same
# server set up the same way, so ours/bare is what cutout.py's own work costs
# on top of bottle's and the server's. The servers, each set up as well as we
# could for many keep-alive connections (SERVER_CHILD):
#
#   cutout    cutout.py's own: an event loop and threads in one worker process
#             per core; it answers empty polls on the loop, a bare route (which
#             it cannot tell from other work) on a thread
#   granian   one worker per core, 16 blocking threads each, backpressure and
#             backlog raised to 4,096 (backpressure counts connections)
#   cheroot   18 threads, as cutout.py ran on it until it had its own server; the
#             connections it keeps alive without a thread raised from 10 to 10,000
#   waitress  16 threads, connection limit raised from 100 to 10,000
#
# A server other than cutout's is measured only if its package is installed.

SERVERS = ("cutout", "granian", "cheroot", "waitress")
HOST = "127.0.0.1"
DOMAIN, USER = "example.com", "bench@example.com"
AUDIENCE = "http://" + DOMAIN
EMPTY_POLL_TARGET = 0.70          # ours/bare req/s on empty polls, bare on the fastest server measured
KINTO_EMPTY_POLLS = 730           # Kinto 26, memory backend, 8 keep-alive connections, this machine class (issue 10)
KINTO_POSTED_OBJECTS = 470        # objects/s it stores posted 10 at a time, same setup
FLAT_MEMORY = 1.10                # peak RSS catching up on the big collection / on the small one
SERVER_START_TIMEOUT = 20         # seconds
DEVICE_TIMEOUT = 5.0              # seconds a device waits for an answer before it counts a timeout
DEVICE_P99_TARGET = 0.100         # seconds: p99 of the devices' polls
FRESH_CLIENT_TARGET = 0.200       # seconds: a new client's login + hello

# Filled in by sections 5-9, printed by http_summary().
http_results = {}

SERVER_CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import bottle
import cutout

server, port, kind, data_dir = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
newest_body, served_file = sys.argv[6].encode(), sys.argv[7] if len(sys.argv) > 7 else None
workers = cutout._cores()
if kind == "ours":
    cutout.configure(cutout.parse_args(["--port", str(port), "--data-dir", data_dir]))
    app = cutout.Front(cutout.app)
else:
    app = bottle.Bottle()
    posted_body = b'{"object_counters":[1,2,3,4,5,6,7,8,9,10]}'

    @app.get("/empty")
    def empty():
        return bottle.HTTPResponse(status=204)

    @app.get("/json")
    def newest():
        return bottle.HTTPResponse(body=newest_body, status=200, headers={"Content-Type": "application/json"})

    @app.post("/json")
    def posted():
        bottle.request.body.read()
        return bottle.HTTPResponse(body=posted_body, status=200, headers={"Content-Type": "application/json"})

    @app.get("/file")
    def file():
        return bottle.static_file(os.path.basename(served_file), os.path.dirname(served_file))


def announce(port=port):
    print(f"{kind} on {server} serving http://127.0.0.1:{port}/", flush=True)


if server == "cutout":      # the bare app: cutout.py itself is started as a user starts it
    class Bare:
        dispatch = staticmethod(app)

        def empty_poll(self, environ):
            return None

        def body_limit(self, environ):
            return 1 << 30

        def overloaded(self, environ):
            return "503 Service Unavailable", [("Retry-After", "1")], b""
    cutout.serve_http(Bare(), "127.0.0.1", port, workers, cutout.MAX_CONCURRENT_PER_WORKER * workers, announce)
elif server == "granian":
    from granian import Granian
    announce()
    Granian("bench:app", interface="wsgi", address="127.0.0.1", port=port, workers=workers, blocking_threads=16,
            backlog=4096, backpressure=4096, log_enabled=False).serve(target_loader=lambda target: app)
elif server == "cheroot":
    from cheroot import wsgi
    server = wsgi.Server(("127.0.0.1", port), app, numthreads=18)
    server.keep_alive_conn_limit = 10_000
    server.prepare()
    announce()
    server.serve()
elif server == "waitress":
    import waitress
    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=16, connection_limit=10_000)
    announce()
    server.run()
"""


def installed_servers():
    """The servers whose package is here; says which are not."""
    found = []
    for server in SERVERS:
        if server == "cutout" or importlib.util.find_spec(server) is not None:
            found.append(server)
        else:
            print(f"  {server}: not installed (pip install {server}): skipped", flush=True)
    return found


def unused_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _process_tree(pid):
    """pid and the pids of all its descendants (servers with worker processes), from /proc."""
    found, unseen = [], [pid]
    while unseen:
        parent = unseen.pop()
        found.append(parent)
        try:
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    unseen += [int(child) for child in children.read().split()]
        except OSError:
            pass
    return found


class ServerProcess:
    """A server in child processes on 127.0.0.1: started, waited for, measured through /proc, stopped."""

    CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

    def __init__(self, name, argv, port, log_path):
        self.name, self.port, self.log_path = name, port, log_path
        self.out_path = log_path + ".out"
        with open(self.out_path, "wb") as out, open(log_path, "ab") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.pid = self.process.pid
        self._wait_until_serving()

    def _wait_until_serving(self):
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with open(self.out_path, "rb") as out:
                line = out.readline().decode(errors="replace")
            if line.endswith("\n"):
                if f"http://{HOST}:{self.port}/" not in line:
                    raise RuntimeError(f"{self.name} printed {line!r}, not its address")
                try:
                    socket.create_connection((HOST, self.port), timeout=1).close()
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start in {SERVER_START_TIMEOUT} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, lines=20):
        with open(self.log_path, "rb") as log:
            return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self):
        """User + system CPU time of the server's processes so far (all their threads); nan without /proc."""
        total = 0
        for pid in _process_tree(self.pid):
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / self.CLOCK_TICKS if os.path.exists(f"/proc/{self.pid}") else float("nan")

    def peak_rss(self):
        """The sum of the high-water marks of resident memory (VmHWM) of the server's processes, in bytes."""
        total = 0
        for pid in _process_tree(self.pid):
            try:
                with open(f"/proc/{pid}/status") as status:
                    total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                pass
        return total or float("nan")

    def close(self):    # for contextlib.closing()
        self.stop()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                for pid in _process_tree(self.pid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                self.process.wait()


def start_ours(server, data_dir, log_dir):
    """cutout.py's application on server: on its own, started as a user starts it."""
    port = unused_port()
    if server == "cutout":
        argv = [sys.executable, cutout.__file__, "--host", HOST, "--port", str(port), "--data-dir", data_dir]
    else:
        here = os.path.dirname(os.path.abspath(cutout.__file__))
        argv = [sys.executable, "-c", SERVER_CHILD, here, server, str(port), "ours", data_dir, ""]
    return ServerProcess(f"cutout.py on {server}", argv, port, os.path.join(log_dir, f"ours-{server}.log"))


def start_bare(server, log_dir, newest_body=b"{}", served_file=None):
    port = unused_port()
    here = os.path.dirname(os.path.abspath(cutout.__file__))
    argv = [sys.executable, "-c", SERVER_CHILD, here, server, str(port), "bare", "", newest_body.decode()]
    argv += [served_file] if served_file else []
    return ServerProcess(f"bare bottle on {server}", argv, port, os.path.join(log_dir, f"bare-{server}.log"))


class _CountingConnection(http.client.HTTPConnection):
    """An HTTPConnection that counts the TCP connections it opens."""

    opened = 0

    def connect(self):
        super().connect()
        self.opened += 1


class Client:
    """One keep-alive connection, reused for every request.

    http.client opens a new connection by itself when the server said it
    would close this one (HTTP/1.0, Connection: close). When the server closed
    an idle connection without saying so, the request is sent once more.
    """

    def __init__(self, port):
        self.connection = _CountingConnection(HOST, port, timeout=60)

    @property
    def opened(self):
        return self.connection.opened

    def request(self, method, path, body=None, headers=None):
        for attempt in range(2):
            try:
                self.connection.request(method, path, body, headers or {})
                response = self.connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.connection.close()
                if attempt:
                    raise

    def close(self):
        self.connection.close()


def expect(status, body, wanted, what):
    if status != wanted:
        raise RuntimeError(f"{what}: expected {wanted}, got {status} {body[:300]!r}")
    return body


class Api:
    """The protocol as the benchmark's clients speak it, on one server."""

    def __init__(self, server, user=USER, audience=AUDIENCE):
        self.server, self.user, self.domain = server, user, urllib.parse.urlsplit(audience).netloc
        client = Client(server.port)
        body = expect(*client.request("POST", "/verify", login_form(user, audience),
                                      {"Content-Type": "application/x-www-form-urlencoded"}), 200, "verify")
        self.token = json.loads(body)["auth"]["query"]["auth"]
        client.close()

    def path(self, bucket, **query):
        query = dict(auth=self.token, **query)
        return (f"/{self.domain}/{urllib.parse.quote(self.user, safe='@')}/{bucket}?"
                + urllib.parse.urlencode(query))

    def hello(self, client, bucket):
        """(collection_id, newest counter) of a collection, made if new; reads it all, so only for small ones."""
        answer = json.loads(expect(*client.request("GET", self.path(bucket)), 200, "hello"))
        objects = answer["objects"]
        assert "incomplete" not in answer, "hello() is for collections of at most one page"
        return answer["collection_id"], objects[-1][0] if objects else 0

    def post(self, client, bucket, collection_id, since, body):
        """POST a JSON list; return the newest counter it got."""
        answer = json.loads(expect(*client.request(
            "POST", self.path(bucket, since=since, collection_id=collection_id), body,
            {"Content-Type": "application/json"}), 200, "post"))
        if "object_counters" not in answer:
            raise RuntimeError(f"post: expected object_counters, got {str(answer)[:300]}")
        return answer["object_counters"][-1]


def login_form(user, audience=AUDIENCE):
    return urllib.parse.urlencode({"assertion": user, "audience": audience})


def objects_body(first, count):
    """A JSON list of count notes of RECORD_SIZE bytes each, ids first .. first + count - 1."""
    return b"[" + b",".join(note(n) for n in range(first, first + count)) + b"]"


@dataclasses.dataclass
class LoadFigures:
    """What a side did during its measured windows, summed over rounds."""

    requests: int = 0
    seconds: float = 0.0
    opened: int = 0
    dropped: int = 0                # connections the server closed without saying so
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    latencies: list = dataclasses.field(default_factory=list)
    round_rates: list = dataclasses.field(default_factory=list)

    @property
    def rate(self):
        return self.requests / self.seconds

    def percentile(self, p):
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def opened_per_1000(self):
        return self.opened / self.requests * 1000

    def line(self, label, per_request=1, unit="req/s"):
        rate = self.rate * per_request
        spread = (f" (rounds {min(self.round_rates) * per_request:,.0f}-{max(self.round_rates) * per_request:,.0f})"
                  if len(self.round_rates) > 1 else "")
        dropped = f"  DROPPED {self.dropped} connections" if self.dropped else ""
        return (f"    {label:<5} {rate:9,.0f} {unit}{spread}  p50 {self.percentile(50) * 1e3:5.2f} ms  "
                f"p99 {self.percentile(99) * 1e3:6.2f} ms  {self.opened_per_1000:6.1f} conns/1000 req  "
                f"CPU/req: server {self.server_cpu / self.requests * 1e6:4.0f} us, "
                f"client {self.client_cpu / self.requests * 1e6:4.0f} us; cores busy "
                f"{(self.server_cpu + self.client_cpu) / self.seconds:.2f}{dropped}")


class Side:
    """One side of a comparison: a server, its clients (one per connection), and what each does per request."""

    def __init__(self, name, server, calls):
        self.name, self.server, self.calls = name, server, calls
        self.clients = [Client(server.port) for _ in calls]
        self.figures = LoadFigures()

    def run(self, lead, seconds, measured=True):
        """Load the server from every client for lead + seconds; add the last `seconds` to the figures."""
        window_open = time.perf_counter() + lead
        window_close = window_open + seconds
        done = [[] for _ in self.clients]       # per client: (end, latency, connections opened)
        failures = []

        def work(client, call, out):
            try:
                while True:
                    opened = client.opened
                    started = time.perf_counter()
                    if started >= window_close:
                        return
                    call(client)
                    ended = time.perf_counter()
                    out.append((ended, ended - started, client.opened - opened))
            except BaseException as error:     # shown by the main thread
                failures.append(error)

        threads = [threading.Thread(target=work, args=args, daemon=True)
                   for args in zip(self.clients, self.calls, done)]
        for thread in threads:
            thread.start()
        time.sleep(max(0.0, window_open - time.perf_counter()))
        cpu_before, client_before = self.server.cpu_seconds(), time.process_time()
        time.sleep(max(0.0, window_close - time.perf_counter()))
        cpu_after, client_after = self.server.cpu_seconds(), time.process_time()
        for thread in threads:
            thread.join()
        if failures:
            raise RuntimeError(f"{self.name}: {failures[0]!r}") from failures[0]
        if measured:
            figures = self.figures
            for out in done:
                for ended, latency, opened in out:
                    if window_open <= ended <= window_close:
                        figures.requests += 1
                        figures.latencies.append(latency)
                        figures.opened += opened
            figures.seconds += seconds
            figures.server_cpu += cpu_after - cpu_before
            figures.client_cpu += client_after - client_before

    def close(self):
        for client in self.clients:
            client.close()


def load_child(server, mode, spec, timeout):
    """Run `bench.py --MODE SPEC` (load_closed_loop or load_devices) against server in a child process.

    Returns what the child found, and the server's CPU seconds inside the
    window the child announced first (on CLOCK_MONOTONIC, the same clock
    here) once its load was going. A child that fails raises RuntimeError.
    """
    child = subprocess.Popen([sys.executable, __file__, f"--{mode}", json.dumps(spec)], stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([child.stdout], [], [], SERVER_START_TIMEOUT)
        window = json.loads(child.stdout.readline() or "null") if ready else None
        if window is not None:
            time.sleep(max(0.0, window[0] - time.monotonic()))
            cpu_before = server.cpu_seconds()
            time.sleep(max(0.0, window[1] - time.monotonic()))
            cpu_after = server.cpu_seconds()
        out, _ = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    done = json.loads(out or "null") or {"failure": "the load child said nothing"}
    if done["failure"] or window is None:
        raise RuntimeError(done["failure"] or "the load child did not start")
    return done, cpu_after - cpu_before


class LoadSide(Side):
    """A Side whose load comes from a child process of asyncio clients (load_closed_loop), one
    connection per entry of `connections`, each sending its next request as soon as it has the
    answer to the last: a request that is always the same bytes, {"request": ...}, or a POST
    that carries on from the counter the last one got, {"post": ...} (see _ClosedLoop). The
    clients cost far less than the threads of Side and share no interpreter with this process."""

    def __init__(self, name, server, connections, status):
        self.name, self.server, self.figures = name, server, LoadFigures()
        self.spec = {"port": server.port, "connections": connections, "status": status}

    def run(self, lead, seconds, measured=True):
        try:
            done, server_cpu = load_child(self.server, "load", dict(self.spec, lead=lead, seconds=seconds),
                                          seconds + SERVER_START_TIMEOUT)
        except RuntimeError as error:
            raise RuntimeError(f"{self.name}: {error}") from None
        self.spec["connections"] = done["connections"]      # where each POST plan has got to
        if measured:
            figures = self.figures
            figures.requests += len(done["latencies"])
            figures.latencies += done["latencies"]
            figures.opened += done["opened"]
            figures.dropped += done["dropped"]
            figures.seconds += seconds
            figures.server_cpu += server_cpu
            figures.client_cpu += done["client_cpu"]
            figures.round_rates.append(len(done["latencies"]) / seconds)

    def close(self):
        pass


def interleaved(sides, sizes):
    """Warm every side up, then measure them in turn, round after round, who goes first alternating."""
    for side in sides:
        side.run(0.0, sizes.http_warmup, measured=False)
    for round_ in range(sizes.http_rounds):
        for side in sides if round_ % 2 == 0 else reversed(sides):
            side.run(sizes.http_lead, sizes.http_round)
    for side in sides:
        side.close()
    return [side.figures for side in sides]


def http_section(title, sizes, root, each_server):
    """Print the section header, then run each_server(server, data_dir, log_dir) for every installed server."""
    section(title)
    for server in installed_servers():
        data_dir = os.path.join(root, f"http-{title.split('.')[0]}-{server}")
        log_dir = os.path.join(root, "logs")
        os.makedirs(log_dir, exist_ok=True)
        try:
            each_server(server, data_dir, log_dir)
        except Exception as error:     # one server failing must not hide the others' figures
            print(f"  {server}: FAILED: {error}", flush=True)
            http_results.setdefault(server, {})["failed"] = str(error)


def post_plans(api, setup, buckets, body):
    """A load plan per bucket: POST body to it, each carrying on from the counter the last one got."""
    plans = []
    for bucket in buckets:
        collection_id, since = api.hello(setup, bucket)
        target = api.path(bucket, since="SINCE", collection_id=collection_id).replace("SINCE", "{since}")
        plans.append({"post": {"target": target, "since": since, "body": body}})
    return plans


def get_request(path):
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def empty_polls(root, sizes):
    n = sizes.http_connections

    def each_server(server, data_dir, log_dir):
        with contextlib.ExitStack() as stack:
            ours = stack.enter_context(contextlib.closing(start_ours(server, data_dir, log_dir)))
            bare = stack.enter_context(contextlib.closing(start_bare(server, log_dir)))
            mine, theirs = interleaved([LoadSide("ours", ours, [{"request": empty_poll(ours)}] * n, 204),
                                        LoadSide("bare", bare, [{"request": get_request("/empty").decode()}] * n, 204)],
                                       sizes)
        print(f"  {server}:")
        print(mine.line("ours"))
        print(theirs.line("bare"))
        result("ours/bare req/s", mine.rate / theirs.rate, indent="    ")
        http_results.setdefault(server, {})["empty"] = (mine, theirs)

    http_section("5. HTTP: empty polls (204)", sizes, root, each_server)
    print(f"  {n} keep-alive connections from a child process of asyncio clients, each sending its next request "
          f"as soon as\n  it has the answer; {sizes.http_rounds} rounds of {sizes.http_round:g} s a side, each on "
          f"new connections (the kernel spreads them over a server's\n  processes differently each time); conns/1000 "
          f"req: connections the server closed per 1000 answers (1000 = one per request);\n  cores busy: server and "
          f"client CPU over the time, of the {os.cpu_count()} cores they share.")
    bare = [(figures["empty"][1].rate, server) for server, figures in http_results.items() if "empty" in figures]
    if "empty" not in http_results.get("cutout", {}) or not bare:
        return
    fastest = max(bare)[1]
    # The target, measured again with both sides interleaved, as every other comparison is.
    log_dir = os.path.join(root, "logs")
    with contextlib.closing(start_ours("cutout", os.path.join(root, "http-5-target"), log_dir)) as ours, \
            contextlib.closing(start_bare(fastest, log_dir)) as bare_server:
        bare_request = [{"request": get_request("/empty").decode()}] * n
        mine, theirs = interleaved([LoadSide("ours", ours, [{"request": empty_poll(ours)}] * n, 204),
                                    LoadSide("bare", bare_server, bare_request, 204)], sizes)
    print(f"  cutout.py on its own server vs the bare route on the fastest server above ({fastest}), interleaved:")
    print(mine.line("ours"))
    print(theirs.line("bare"))
    result("ours/fastest bare req/s", mine.rate / theirs.rate, EMPTY_POLL_TARGET)
    aim = 10 * KINTO_EMPTY_POLLS
    print(f"  vs Kinto 26 (~{KINTO_EMPTY_POLLS:,}/s on this machine class, not measured in this run): "
          f"{mine.rate / KINTO_EMPTY_POLLS:.1f}x    aim >= {aim:,}/s (10x): "
          f"{'ok' if mine.rate >= aim else 'MISSED'}", flush=True)


def empty_poll(server, bucket="poll"):
    """The bytes of an empty poll on a collection of ten objects, made on server."""
    api, setup = Api(server), Client(server.port)
    collection_id, since = api.hello(setup, bucket)
    since = api.post(setup, bucket, collection_id, since, objects_body(0, 10))
    setup.close()
    return get_request(api.path(bucket, since=since, collection_id=collection_id)).decode("latin-1")


def newest_and_posts(root, sizes):
    n = sizes.http_connections

    def each_server(server, data_dir, log_dir):
        with contextlib.ExitStack() as stack:
            ours = stack.enter_context(contextlib.closing(start_ours(server, data_dir, log_dir)))
            api, setup = Api(ours), Client(ours.port)
            # The collection read from: its newest 10 of newest_collection.
            collection_id, since = api.hello(setup, "newest")
            last = api.post(setup, "newest", collection_id, since, objects_body(0, sizes.newest_collection))
            newest = api.path("newest", since=last - 10, collection_id=collection_id)
            newest_body = expect(*setup.request("GET", newest), 200, "newest 10")
            assert len(json.loads(newest_body)["objects"]) == 10
            # Each connection posts to a collection of its own, as each user's device does:
            # posts to one collection from 8 clients at once would refuse each other (POST-2).
            post_body = objects_body(0, 10).decode()
            posts = post_plans(api, setup, [f"posts-{i}" for i in range(n)], post_body)
            setup.close()
            bare = stack.enter_context(contextlib.closing(start_bare(server, log_dir, newest_body)))
            bare_post = (f"POST /json HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(post_body)}\r\n\r\n{post_body}")
            reads = interleaved([LoadSide("ours", ours, [{"request": get_request(newest).decode()}] * n, 200),
                                 LoadSide("bare", bare, [{"request": get_request("/json").decode()}] * n, 200)], sizes)
            posting = LoadSide("ours", ours, posts, 200)
            writes = interleaved([posting, LoadSide("bare", bare, [{"request": bare_post}] * n, 200)], sizes)
            # Each collection's counters start at 1, so its last counter is how many objects it holds.
            posted = sum(plan["post"]["since"] for plan in posting.spec["connections"])
        print(f"  {server}: GET newest 10 of {sizes.newest_collection:,} ({len(newest_body):,} bytes):")
        print(reads[0].line("ours"))
        print(reads[1].line("bare"))
        result("ours/bare req/s", reads[0].rate / reads[1].rate, indent="    ")
        print(f"  {server}: POST of 10 x {RECORD_SIZE} bytes, durable before the answer "
              f"({posted:,} objects stored, warm-up included):")
        print(writes[0].line("ours", 10, "obj/s"))
        print(writes[1].line("bare", 10, "obj/s"))
        result("ours/bare req/s", writes[0].rate / writes[1].rate, indent="    ")
        aim = 10 * KINTO_POSTED_OBJECTS
        print(f"    vs Kinto 26 (~{KINTO_POSTED_OBJECTS}/s, not measured in this run): "
              f"{writes[0].rate * 10 / KINTO_POSTED_OBJECTS:.1f}x    aim >= {aim:,} objects/s (10x): "
              f"{'ok' if writes[0].rate * 10 >= aim else 'MISSED'}", flush=True)
        http_results.setdefault(server, {}).update(newest=reads, post=writes)

    http_section("6. HTTP: GET newest 10 / POST 10", sizes, root, each_server)
    print(f"  {n} keep-alive connections from a child process of asyncio clients, as in 5; each POST carries on "
          f"from the counter\n  the last one got, to a collection of its connection's own.")


def catch_up(root, sizes):
    small, big = sizes.catchup_small, sizes.catchup_big
    section(f"7. HTTP: catching up on {small:,} and {big:,} objects through limit={sizes.catchup_page} pages")
    servers = installed_servers()
    if not servers:
        return
    data_dir, log_dir = os.path.join(root, "http-7"), os.path.join(root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    buckets = {small: f"catchup-{small}", big: f"catchup-{big}"}
    # Built once, through the API of the first server; every server then serves the same files.
    with contextlib.closing(start_ours(servers[0], data_dir, log_dir)) as ours:
        api, client = Api(ours), Client(ours.port)
        started, cpu_before = time.perf_counter(), ours.cpu_seconds()
        for count, bucket in buckets.items():
            collection_id, since = api.hello(client, bucket)
            for first in range(0, count, sizes.catchup_batch):
                body = objects_body(first, min(sizes.catchup_batch, count - first))
                assert len(body) < 1 << 20
                since = api.post(client, bucket, collection_id, since, body)
        spent, cpu = time.perf_counter() - started, ours.cpu_seconds() - cpu_before
        client.close()
        print(f"  built through POSTs of {sizes.catchup_batch:,} objects on {servers[0]}: {small + big:,} objects "
              f"in {spent:.1f} s ({(small + big) / spent:,.0f} objects/s; server CPU {cpu / spent:.0%} of the time)")
    print(f"  {'server':<9} {'objects':>8} | {'pages':>5} {'seconds':>7} {'objects/s':>10} "
          f"{'server CPU':>10} | {'RSS MB at start':>15} {'peak RSS MB':>11}")
    for server in servers:
        try:
            peaks = {}
            for count, bucket in buckets.items():
                # A fresh server for each, so that each peak is its catch-up's alone.
                with contextlib.closing(start_ours(server, data_dir, log_dir)) as ours:
                    at_start = ours.peak_rss()
                    api, client = Api(ours), Client(ours.port)
                    runs = []
                    for _ in range(sizes.catchup_runs):
                        started, cpu_before = time.perf_counter(), ours.cpu_seconds()
                        pages, got = catch_up_once(api, client, bucket, sizes.catchup_page)
                        runs.append((time.perf_counter() - started, ours.cpu_seconds() - cpu_before))
                        assert got == count, (got, count)
                    peaks[count] = ours.peak_rss()
                    client.close()
                spent = median([seconds for seconds, _ in runs])
                # /proc counts CPU time in ticks of 10 ms: too coarse for a shorter total.
                total = sum(seconds for seconds, _ in runs)
                cpu = f"{sum(cpu for _, cpu in runs) / total:.0%}" if total >= 0.5 else "-"
                print(f"  {server:<9} {count:>8,} | {pages:>5} {spent:>7.3f} {count / spent:>10,.0f} "
                      f"{cpu:>10} | {at_start / 1e6:>15.1f} {peaks[count] / 1e6:>11.1f}", flush=True)
                http_results.setdefault(server, {})[f"catchup-{count}"] = (count / spent, peaks[count])
            result(f"{server} peak RSS {big:,}/{small:,}", peaks[big] / peaks[small], FLAT_MEMORY, at_least=False)
        except Exception as error:
            print(f"  {server}: FAILED: {error}", flush=True)
            http_results.setdefault(server, {})["failed"] = str(error)
    print(f"  seconds: median of {sizes.catchup_runs} catch-ups by one client, which parses each page as a "
          f"client does;\n  server CPU: the server's share of that time; peak RSS: VmHWM of a server "
          f"process started\n  fresh for each collection, after its {sizes.catchup_runs} catch-ups.")


def catch_up_once(api, client, bucket, page):
    """Read a whole collection from since=0 through limit pages; (pages, objects)."""
    answer = json.loads(expect(*client.request("GET", api.path(bucket, limit=page)), 200, "hello"))
    collection_id, pages, got = answer["collection_id"], 1, len(answer["objects"])
    while answer.get("incomplete"):
        since = answer["objects"][-1][0]
        answer = json.loads(expect(*client.request(
            "GET", api.path(bucket, since=since, collection_id=collection_id, limit=page)), 200, "page"))
        pages, got = pages + 1, got + len(answer["objects"])
    return pages, got


def blobs(root, sizes):
    size = sizes.blob_bytes
    section(f"8. HTTP: a blob of {size / 1e6:g} MB posted and downloaded, vs the bare route")
    content = os.urandom(size)
    post_body = json.dumps([{"type": "photo", "id": 1, "data": {}, "blob": {
        "content_type": "image/jpeg", "data": base64.b64encode(content).decode()}}]).encode()
    served_file = os.path.join(root, "blob-bytes")
    with open(served_file, "wb") as bytes_file:
        bytes_file.write(content)
    print(f"  {sizes.blob_runs} interleaved runs per side, median; one client; JSON body {len(post_body):,} bytes. "
          f"Memory: the server's\n  peak RSS (VmHWM) after it all, less that before the first upload, "
          f"in blob sizes.", flush=True)
    print(f"  {'server':<9} | {'POST MB/s':>9} {'bare':>7} {'ratio':>5} | {'GET MB/s':>8} {'static':>7} "
          f"{'ratio':>5} | {'peak RSS growth MB':>18} {'blobs':>5}")
    for server in installed_servers():
        data_dir, log_dir = os.path.join(root, f"http-8-{server}"), os.path.join(root, "logs")
        os.makedirs(log_dir, exist_ok=True)
        try:
            with contextlib.closing(start_ours(server, data_dir, log_dir)) as ours, \
                    contextlib.closing(start_bare(server, log_dir, served_file=served_file)) as bare:
                api, client, bare_client = Api(ours), Client(ours.port), Client(bare.port)
                collection_id, since = api.hello(client, "blobs")
                before = ours.peak_rss()
                times = {side: [] for side in ("post", "bare post", "get", "static")}
                headers = {"Content-Type": "application/json"}
                for run in range(sizes.blob_runs):
                    started = time.perf_counter()
                    answer = json.loads(expect(*client.request(
                        "POST", api.path("blobs", since=since, collection_id=collection_id), post_body, headers),
                        200, "post blob"))
                    times["post"].append(time.perf_counter() - started)
                    since, href = answer["object_counters"][-1], answer["blob_hrefs"][0]
                    started = time.perf_counter()
                    expect(*bare_client.request("POST", "/json", post_body, headers), 200, "bare post")
                    times["bare post"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    got = expect(*client.request("GET", href + "?" + urllib.parse.urlencode({"auth": api.token})),
                                 200, "get blob")
                    times["get"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    static = expect(*bare_client.request("GET", "/file"), 200, "bare static")
                    times["static"].append(time.perf_counter() - started)
                    if got != content or static != content:
                        raise RuntimeError("a blob came back with other bytes")
                growth = ours.peak_rss() - before
                client.close()
                bare_client.close()
            rate = {side: size / 1e6 / median(spent) for side, spent in times.items()}
            print(f"  {server:<9} | {rate['post']:>9.0f} {rate['bare post']:>7.0f} "
                  f"{rate['post'] / rate['bare post']:>5.2f} | {rate['get']:>8.0f} {rate['static']:>7.0f} "
                  f"{rate['get'] / rate['static']:>5.2f} | {growth / 1e6:>18.1f} {growth / size:>5.1f}", flush=True)
        except Exception as error:
            print(f"  {server}: FAILED: {error}", flush=True)
    print(f"  bare: the bare route reading the same body, and bottle.static_file serving the same bytes; "
          f"MB/s are of the\n  blob's {size / 1e6:g} MB either way (the POST body is base64, a third larger).")


def many_devices(root, sizes):
    section(f"9. HTTP: {sizes.devices:,} devices each polling about once a second on a keep-alive connection, "
            f"with {sizes.idle_sockets} idle and {sizes.slowloris} slowloris sockets open")
    print(f"  {sizes.devices // sizes.device_users} devices per user, {sizes.device_users} users; a device waits "
          f"{sizes.device_interval:g} s (x0.5-1.5) between polls and {DEVICE_TIMEOUT:g} s for an answer; idle "
          f"sockets send nothing,\n  slowloris sockets a byte of a request head every {SLOWLORIS_TRICKLE:g} s and "
          f"reconnect when cut; a fresh client logs in and says hello every {sizes.fresh_every:g} s.\n"
          f"  {sizes.device_seconds:g} s of polling per run, from a child process of asyncio clients.", flush=True)
    for server in installed_servers():
        data_dir, log_dir = os.path.join(root, f"http-9-{server}"), os.path.join(root, "logs")
        os.makedirs(log_dir, exist_ok=True)
        for kind in ("ours", "bare"):
            try:
                if kind == "ours":
                    with contextlib.closing(start_ours(server, data_dir, log_dir)) as running:
                        done = devices_run(running, device_polls(running, sizes), 204, "cutout", sizes)
                else:
                    with contextlib.closing(start_bare(server, log_dir)) as running:
                        done = devices_run(running, [get_request("/empty")], 204, "bare", sizes)
                report_devices(f"{server} {kind}", done, sizes)
            except Exception as error:
                print(f"  {server} {kind}: FAILED: {error}", flush=True)
                http_results.setdefault(server, {})["failed"] = str(error)
                continue
            http_results.setdefault(server, {})[f"devices-{kind}"] = done


def through_the_balancer(root, sizes):
    n = sizes.http_connections
    section("10. HTTP: through the balancer, vs straight to the node behind it, vs a node in no cluster")
    log_dir = os.path.join(root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    secret_file = cluster_secret(root)
    with contextlib.ExitStack() as stack:
        owner, backup, single = (stack.enter_context(contextlib.closing(start_node(root, name, secret_file)))
                                 for name in ("node-a", "node-b", "single"))
        nodes = [f"http://{HOST}:{owner.port}", f"http://{HOST}:{backup.port}"]
        if cutout.placement(nodes, DOMAIN, USER)[0] != nodes[0]:
            owner, backup = backup, owner       # the node every request of USER goes to
        balancer = stack.enter_context(contextlib.closing(start_balancer(root, nodes, secret_file, backups=1)))
        targets = ((balancer, "balancer"), (owner, "owner"), (single, "single node"))
        polls = interleaved([LoadSide(name, server, [{"request": empty_poll(server, f"poll-{i}")}] * n, 204)
                             for i, (server, name) in enumerate(targets)], sizes)
        sides = []
        for i, (server, name) in enumerate(targets):
            setup = Client(server.port)
            posts = post_plans(Api(server), setup, [f"posts-{i}-{j}" for j in range(n)], objects_body(0, 10).decode())
            setup.close()
            sides.append(LoadSide(name, server, posts, 200))
        posted = interleaved(sides, sizes)
        print(f"  empty polls ({n} keep-alive connections, as in 5; CPU/req: that server's):")
        for figures, (_, name) in zip(polls, targets):
            print(figures.line(name))
        result("balancer/owner req/s", polls[0].rate / polls[1].rate)
        print("  POST of 10 objects (as in 6), each stored on the owner and its backup before it is answered,")
        print("  except on the single node:")
        for figures, (_, name) in zip(posted, targets):
            print(figures.line(name, 10, "obj/s"))
        result("balancer/owner objects/s", posted[0].rate / posted[1].rate)
        result("owner with a backup/single node objects/s", posted[1].rate / posted[2].rate)
        report_devices("through the balancer (as in 9; server CPU: the balancer's)",
                       devices_run(balancer, device_polls(balancer, sizes), 204, "cutout", sizes), sizes)
    print("  The balancer, the nodes and the clients share this machine's cores.", flush=True)


def moving_a_collection(root, sizes):
    section(f"11. A cluster: moving a collection of {sizes.move_mb} MB to a node that joins")
    log_dir = os.path.join(root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    secret_file = cluster_secret(root)
    with contextlib.ExitStack() as stack:
        first, second = (stack.enter_context(contextlib.closing(start_node(root, name, secret_file)))
                         for name in ("move-a", "move-b"))
        nodes = [f"http://{HOST}:{first.port}", f"http://{HOST}:{second.port}"]
        joining_port = unused_port()
        joining = f"http://{HOST}:{joining_port}"
        # A user the joining node will own, and one that stays where it is.
        mover = next(user for user in (f"mover{n}@example.com" for n in itertools.count())
                     if cutout.placement([*nodes, joining], DOMAIN, user)[0] == joining)
        stayer = next(user for user in (f"stayer{n}@example.com" for n in itertools.count())
                      if cutout.placement([*nodes, joining], DOMAIN, user)[0] != joining)
        balancer = stack.enter_context(contextlib.closing(start_balancer(root, nodes, secret_file, backups=1)))
        client, api = Client(balancer.port), Api(balancer, mover)
        collection_id, since = api.hello(client, "big")
        records = (250 << 10) // RECORD_SIZE        # ~250 KB bodies
        while since * RECORD_SIZE < sizes.move_mb << 20:
            since = api.post(client, "big", collection_id, since, objects_body(since, records))
        client.close()
        stay = Api(balancer, stayer)
        setup = Client(balancer.port)
        stay_id, stay_since = stay.hello(setup, "notes")
        stay_since = stay.post(setup, "notes", stay_id, stay_since, objects_body(0, 1))
        setup.close()
        stack.enter_context(contextlib.closing(start_node(root, "move-c", secret_file, joining_port)))
        answers, stop = [], threading.Event()

        def poll_elsewhere():       # another user's device, polling through the balancer during the move
            device = Client(balancer.port)
            while not stop.is_set():
                began = time.perf_counter()
                status, _ = device.request("GET", stay.path("notes", since=stay_since, collection_id=stay_id))
                answers.append((status, time.perf_counter() - began))
                time.sleep(0.01)
            device.close()
        poller = threading.Thread(target=poll_elsewhere)
        poller.start()
        admin = Client(balancer.port)
        began = time.perf_counter()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {read_secret(secret_file)}"}
        status, body = admin.request("POST", "/_cluster/nodes", json.dumps({"url": joining}).encode(), headers)
        took = time.perf_counter() - began
        stop.set()
        poller.join()
        admin.close()
        expect(status, body, 200, "adding a node")
        latencies = sorted(seconds for status, seconds in answers if status == 204)
        print(f"  {since * RECORD_SIZE / 1e6:.0f} MB in {since} records moved to the node that joined "
              f"in {took:.1f} s: {since * RECORD_SIZE / 1e6 / took:.1f} MB/s")
        print(f"  another user's device polling through the balancer meanwhile: {len(answers)} polls, "
              f"{len(latencies)} answered 204, p50 {_at(latencies, 50):.1f} ms, "
              f"max {max(latencies, default=0) * 1e3:.1f} ms, other answers: "
              f"{sorted(status for status, _ in answers if status != 204) or 'none'}", flush=True)


CLIENT_USER = "device@example.com"
CLIENT_BUCKET = "client"
CLIENT_BATCH = 4_000        # objects per POST while building (~1 MB, the server's default body limit)
CLIENT_UPDATED = 100        # of every this many objects written, one is written again (version 2)
CLIENT_NO_CHANGE_SYNCS = 20


def client_uuid(n):
    """A UUID-shaped id (36 characters, what most apps use) that says which object it is."""
    return f"{n >> 96 & 0xffffffff:08x}-0000-4000-8000-{n:012x}"


def client_objects_body(first, count, version):
    objects = [{"type": "note", "id": client_uuid(n), "data": {"v": version, "text": "x" * 130}}
               for n in range(first, first + count)]
    return json.dumps(objects, separators=(",", ":")).encode()


# The app of the measured page: it keeps nothing but the newest version of each object
# (by its index, in an Int32Array), so that the page's heap is the library's.
CLIENT_PAGE_APP = """([count, serverUrl, bucket, email, audience]) => {
  const versions = new Int32Array(count);
  const figures = {received: 0, calls: 0, largestCall: 0, peakHeap: 0, retained: 0, storageErrors: []};
  const sample = () => { figures.peakHeap = Math.max(figures.peakHeap, performance.memory.usedJSHeapSize); };
  // What is still referenced while the app takes a call: the heap after a full collection, at
  // calls 1, 2, 4, 8, ... (a collection takes milliseconds; at every call it would be the figure).
  const retained = () => {
    gc();
    figures.retained = Math.max(figures.retained, performance.memory.usedJSHeapSize);
  };
  setInterval(sample, 5);
  const app = {
    getPendingObjects: () => [],
    objectsSaved() {},
    objectsReceived(objects) {
      sample();
      figures.calls += 1;
      if ((figures.calls & (figures.calls - 1)) === 0) retained();
      figures.largestCall = Math.max(figures.largestCall, objects.length);
      for (const obj of objects) {
        versions[parseInt(obj.id.slice(-12), 16)] = obj.deleted ? -1 : obj.data.v;
        figures.received += 1;
      }
    },
    resetSaved() {},
    status(state, detail) {
      const storage = state === "error" && detail.error && detail.error.code === "storage";
      if (storage) figures.storageErrors.push(detail.message);
    },
  };
  window.bench = {app, versions, figures, sync: new Sync(app, {serverUrl, bucket, audience, pollInterval: 3600000,
                                                             getAssertion: async () => email})};
  return bench.sync.request();
}"""

CLIENT_STATE_SIZE = """async () => {
  const stored = Object.keys(localStorage).filter((key) => key.startsWith("cutout-sync "));
  const chars = stored.reduce((sum, key) => sum + localStorage.getItem(key).length, 0);
  const estimate = await navigator.storage.estimate();
  return {chars, usage: estimate.usage};
}"""

CLIENT_NO_CHANGE = """async (times) => {
  const took = [];
  for (let i = 0; i < times; i++) {
    const began = performance.now();
    await bench.sync.syncNow();
    took.push(performance.now() - began);
  }
  return took.sort((a, b) => a - b)[Math.floor(times / 2)];
}"""


def the_client_in_a_browser(root, sizes, baseline_file=None):
    """12. syncclient.js in Chromium, as a fresh device of a user with 1,000 ... 1,000,000 objects,
    beside another version of it (the baseline) if one is given, the two taking turns."""
    sides = {"this": os.path.join(os.path.dirname(os.path.abspath(cutout.__file__)), "syncclient.js")}
    if baseline_file:
        sides["baseline"] = baseline_file
    for name, path in sides.items():
        with open(path, "rb") as source:
            sides[name] = source.read().decode()
    section("12. syncclient.js in Chromium: a fresh device reads a collection ("
            + ", ".join(f"{name}: sha256 {hashlib.sha256(source.encode()).hexdigest()[:12]}"
                        for name, source in sides.items()) + ")")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("  skipped: pip install playwright (and apt-get install chromium)")
        return
    chromium = os.environ.get("CUTOUT_CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(chromium):
        print(f"  skipped: no browser at {chromium} (apt-get install chromium)")
        return
    print(f"  objects of ~200 bytes with UUID ids, 1 in {CLIENT_UPDATED} written twice; the app keeps only their "
          "versions, so the heap is the library's: peak used (garbage included, sampled every 5 ms and at each "
          "objectsReceived) and retained (after a full collection, at objectsReceived calls 1, 2, 4, ...)")
    log_dir = os.path.join(root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    # The app's page, served on loopback as the server is: Chromium lets no page of a public
    # origin (nor one without an address) call a loopback server.
    page_server = http.server.ThreadingHTTPServer((HOST, 0), _EmptyPage)
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    origin = f"http://localhost:{page_server.server_address[1]}"
    with contextlib.ExitStack() as stack, \
            contextlib.closing(start_ours("cutout", os.path.join(root, "client-data"), log_dir)) as server, \
            sync_playwright() as playwright:
        stack.callback(page_server.server_close)
        stack.callback(page_server.shutdown)
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--enable-precise-memory-info", "--js-flags=--expose-gc"])
        api, client = Api(server, CLIENT_USER, origin), Client(server.port)
        collection_id, since = api.hello(client, CLIENT_BUCKET)
        written = 0
        for count in sizes.client_objects:
            first_new = written
            while written < count:
                batch = min(CLIENT_BATCH, count - written)
                since = api.post(client, CLIENT_BUCKET, collection_id, since, client_objects_body(written, batch, 1))
                written += batch
            twice = [n for n in range(first_new, count) if n % CLIENT_UPDATED == 0]
            for first in range(0, len(twice), CLIENT_BATCH):
                again = [{"type": "note", "id": client_uuid(n), "data": {"v": 2, "text": "y" * 130}}
                         for n in twice[first:first + CLIENT_BATCH]]
                since = api.post(client, CLIENT_BUCKET, collection_id, since,
                                 json.dumps(again, separators=(",", ":")).encode())
            figures = {}
            for name, source in sides.items():
                try:
                    edited_before = first_new > 0 or bool(figures)
                    figures[name], since = _client_figures(name, browser, origin, server, source, count, api, client,
                                                           collection_id, since, edited_before)
                except Exception as error:      # a client that fails at a size is a figure too
                    print(f"  {name:<8} {count:>9,} objects: FAILED: {str(error).splitlines()[0][:300]}", flush=True)
            if len(figures) == 2:
                ratios = {what: figures["this"][what] / max(figures["baseline"][what], 1e-9)
                          for what in ("seconds", "retained_heap", "no_change")}
                print(f"  {'ratios':<8} {count:>9,} objects: first full sync {ratios['seconds']:.2f}, retained heap "
                      f"{ratios['retained_heap']:.2f}, no-change sync {ratios['no_change']:.2f} (this / baseline)",
                      flush=True)
        client.close()
        browser.close()


class _EmptyPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<!doctype html><title>the app</title>")

    def log_message(self, *args):
        pass


def _client_figures(name, browser, origin, server, client_source, count, api, client, collection_id, since,
                    edited_before):
    """Measure one fresh device reading the collection: (figures, the newest counter after its edit from elsewhere)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(origin + "/")
        page.add_script_tag(content=client_source)
        gets = []
        page.on("request", lambda request: gets.append(request.url)
                if request.method == "GET" and f"/{CLIENT_BUCKET}?" in request.url else None)
        page.evaluate(CLIENT_PAGE_APP, [count, f"http://{HOST}:{server.port}/", CLIENT_BUCKET, CLIENT_USER, origin])
        page.set_default_timeout(600_000)
        began = time.perf_counter()
        page.evaluate("bench.sync.syncNow()")
        took = time.perf_counter() - began
        full_gets = len(gets)
        figures = page.evaluate("bench.figures")
        wrong = page.evaluate("""([updated, edited]) => {
            let wrong = 0;
            for (let n = 0; n < bench.versions.length; n++) {
              wrong += bench.versions[n] !== (n === 1 && edited ? 3 : n % updated === 0 ? 2 : 1);
            }
            return wrong;
        }""", [CLIENT_UPDATED, edited_before])
        state = page.evaluate(CLIENT_STATE_SIZE)
        no_change = page.evaluate(CLIENT_NO_CHANGE, CLIENT_NO_CHANGE_SYNCS)
        del gets[:]
        since = api.post(client, CLIENT_BUCKET, collection_id, since, json.dumps(
            [{"type": "note", "id": client_uuid(1), "data": {"v": 3, "text": "edited elsewhere"}}]).encode())
        page.evaluate("bench.sync.syncNow()")
        edit_arrived = page.evaluate("bench.versions[1]") == 3
        print(f"  {name:<8} {count:>9,} objects: first full sync {took:6.2f} s, {full_gets:5,} GETs, "
              f"{figures['received']:,} objects in {figures['calls']:,} calls (largest {figures['largestCall']:,}), "
              f"{wrong:,} not in their newest version; heap: peak {figures['peakHeap'] / 1e6:6.1f} MB, "
              f"retained {figures['retained'] / 1e6:6.1f} MB; "
              f"state: {state['chars']:,} chars in localStorage, {state['usage'] / 1e6:.1f} MB of origin storage; "
              f"no-change sync {no_change:5.1f} ms (median of {CLIENT_NO_CHANGE_SYNCS}); an edit from elsewhere: "
              f"{len(gets)} GET{'' if len(gets) == 1 else 's'}, {'arrived' if edit_arrived else 'NOT ARRIVED'}; "
              f"storage failures said: {len(figures['storageErrors'])}"
              + (f" ({figures['storageErrors'][0][:100]})" if figures["storageErrors"] else ""), flush=True)
        return {"seconds": took, "retained_heap": figures["retained"], "no_change": no_change}, since
    finally:
        context.close()


def cluster_secret(root):
    path = os.path.join(root, "cluster-secret")
    if not os.path.exists(path):
        with open(path, "w") as file:
            file.write(secrets.token_hex(32) + "\n")
    return path


def read_secret(path):
    with open(path) as file:
        return file.read().strip()


def start_node(root, name, secret_file, port=None):
    port = port or unused_port()
    return ServerProcess(f"node {name}", [sys.executable, cutout.__file__, "--host", HOST, "--port", str(port),
                                          "--data-dir", os.path.join(root, f"http-{name}"), "--secret-file",
                                          secret_file], port, os.path.join(root, "logs", f"{name}.log"))


def start_balancer(root, nodes, secret_file, backups):
    port = unused_port()
    return ServerProcess("the balancer", [sys.executable, cutout.__file__, "balancer", "--host", HOST, "--port",
                                          str(port), "--backups", str(backups), "--secret-file", secret_file,
                                          *itertools.chain.from_iterable(("--node", node) for node in nodes)],
                         port, os.path.join(root, "logs", "balancer.log"))


def device_polls(server, sizes):
    """The empty poll each user's devices repeat: one collection of one object per user, made on server."""
    setup, polls = Client(server.port), []
    for n in range(sizes.device_users):
        api = Api(server, f"device-{n}@example.com")
        collection_id, since = api.hello(setup, "notes")
        since = api.post(setup, "notes", collection_id, since, objects_body(0, 1))
        polls.append(get_request(api.path("notes", since=since, collection_id=collection_id)))
    setup.close()
    return polls


SLOWLORIS_TRICKLE = 3.0     # seconds between the bytes a slowloris socket sends


def devices_run(server, polls, status, kind, sizes):
    """Run the many-devices load (load_devices) against server; what the child saw, and the server's CPU."""
    spec = {"port": server.port, "polls": [poll.decode("latin-1") for poll in polls], "status": status,
            "kind": kind, "devices": sizes.devices, "idle": sizes.idle_sockets, "slowloris": sizes.slowloris,
            "interval": sizes.device_interval, "seconds": sizes.device_seconds, "fresh_every": sizes.fresh_every}
    done, done["server_cpu"] = load_child(server, "devices", spec, 2 * DEVICE_TIMEOUT + SERVER_START_TIMEOUT)
    return done


def _at(ordered, p):
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e3 if ordered else float("nan")


def report_devices(label, done, sizes):
    latencies, fresh = sorted(done["latencies"]), sorted(done["fresh"])
    print(f"  {label}: {done['answered']:,} of {done['due']:,} polls due answered "
          f"({done['answered'] / sizes.device_seconds:,.0f}/s); {done['missed']:,} not sent (the last still "
          f"waiting), {done['timeouts']} timeouts, {sum(done['errors'].values())} errors {done['errors'] or ''}\n"
          f"    connections: {done['closed_by_server']:,} closed by the server, {done['connect_failed']} refused or "
          f"not taken in {DEVICE_TIMEOUT:g} s\n"
          f"    poll latency p50 {_at(latencies, 50):.1f} ms, p99 {_at(latencies, 99):.1f} ms, "
          f"max {_at(latencies, 100):.1f} ms; fresh client login + hello: p50 {_at(fresh, 50):.1f} ms, "
          f"max {_at(fresh, 100):.1f} ms ({len(fresh)} of {done['fresh_tried']}"
          f"{'; failed: ' + ', '.join(sorted(set(done['fresh_failures']))[:3]) if done['fresh_failures'] else ''})\n"
          f"    server CPU {done['server_cpu'] / done['seconds']:.0%} of a core; idle sockets closed by the server: "
          f"{done['idle_closed']}; slowloris sockets cut: {done['slowloris_cut']}", flush=True)
    ok = (done["due"] and done["answered"] == done["due"] and not done["closed_by_server"]
          and not done["connect_failed"] and _at(latencies, 99) <= DEVICE_P99_TARGET * 1e3
          and len(fresh) == done["fresh_tried"] and _at(fresh, 100) <= FRESH_CLIENT_TARGET * 1e3)
    print(f"    every poll due answered, no connection closed or refused, p99 <= {DEVICE_P99_TARGET * 1e3:.0f} ms, "
          f"every fresh client within {FRESH_CLIENT_TARGET * 1e3:.0f} ms: {'ok' if ok else 'MISSED'}", flush=True)


def http_summary():
    """One line per server, and which server wins where: the figures that chose the server."""
    if not http_results:
        return
    section("HTTP summary: cutout.py on each server (bare bottle route on the same server in brackets)")
    print(f"  {'server':<9} | {'empty polls/s':>22} {'ratio':>5} {'conns/1k':>8} | {'newest 10 req/s':>17} "
          f"| {'POST 10 objects/s':>19} | {'catch-up obj/s':>14} | {'devices: due answered, p99 ms':>30}")

    def both(pair, per=1):
        return f"{pair[0].rate * per:,.0f} [{pair[1].rate * per:,.0f}]" if pair else "-"

    def devices(done):
        if not done:
            return "-"
        return f"{done['answered'] / max(1, done['due']):.1%}, {_at(sorted(done['latencies']), 99):,.0f}"

    for server, figures in http_results.items():
        empty, newest, post = figures.get("empty"), figures.get("newest"), figures.get("post")
        catchups = sorted((int(key.split("-")[1]), value) for key, value in figures.items()
                          if key.startswith("catchup-"))
        catchup_rate = f"{catchups[-1][1][0]:,.0f}" if catchups else "-"
        many = f"{devices(figures.get('devices-ours'))} [{devices(figures.get('devices-bare'))}]"
        print(f"  {server:<9} | {both(empty):>22} "
              f"{(f'{empty[0].rate / empty[1].rate:.2f}' if empty else '-'):>5} "
              f"{(f'{empty[0].opened_per_1000:.0f}' if empty else '-'):>8} | {both(newest):>17} "
              f"| {both(post, 10):>19} | {catchup_rate:>14} | {many:>30}"
              f"{'   FAILED: ' + figures['failed'][:60] if 'failed' in figures else ''}")
    for title, key, per, unit in (("empty polls", "empty", 1, "req/s"), ("GET newest 10", "newest", 1, "req/s"),
                                  ("POST 10", "post", 10, "objects/s")):
        ranked = sorted(((figures[key][0].rate * per, server) for server, figures in http_results.items()
                         if key in figures), reverse=True)
        if ranked:
            text = ", ".join(f"{server} {rate:,.0f}" for rate, server in ranked)
            print(f"  fastest on {title}: {ranked[0][1]}   ({unit}: {text})")


###############################################################################
# Load from a child process: asyncio clients on raw sockets
###############################################################################
# bench.py --load SPEC and bench.py --devices SPEC run here, in a process of
# their own. A client is a few lines over a socket, so that thousands fit in
# one process and the clients cost little next to the server they load.


async def _exchange(reader, writer, request):
    """Send request; read the answer: (status, body, whether the server will close the connection)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status, length, chunked = int(head[9:12]), None, False
    closes = head.startswith(b"HTTP/1.0")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            closes = value == b"close" or (closes and value != b"keep-alive")
        elif name == b"transfer-encoding":
            chunked = value == b"chunked"
    if chunked:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    elif length is not None:
        body = await reader.readexactly(length)
    elif status in (204, 304) or not closes:
        body = b""
    else:
        body = await reader.read()      # the body ends with the connection
    return status, bytes(body), closes


def _load_child(main, spec):
    """Run the coroutine main(spec) and print what it returns as JSON, with the child's CPU time."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # thousands of sockets
    try:
        done = asyncio.run(main(spec))
        done["failure"] = None
    except Exception as error:
        done = {"failure": repr(error)}
    print(json.dumps(done))


class _ClosedLoopClient(asyncio.Protocol):
    """One keep-alive connection sending its next request as soon as it has the answer to the last.

    Answers must say their length (Content-Length, or none for a 204), as
    every answer this is used for does.
    """

    def __init__(self, load, plan):
        self.load, self.plan, self.buffer = load, plan, bytearray()
        self.closing = False        # closed by us: at the end, or because the server said it would

    def connection_made(self, transport):
        self.transport = transport
        self.ask()

    def ask(self):
        self.asked = time.monotonic()
        post = self.plan.get("post")
        if post is None:
            self.transport.write(self.plan["request"].encode("latin-1"))
        else:
            body = post["body"].encode()
            target = post["target"].format(since=post["since"])
            self.transport.write(f"POST {target} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def data_received(self, data):
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end == -1:
            return
        head = bytes(self.buffer[:end]).lower()
        length = re.search(rb"\r\ncontent-length: *([0-9]+)", head)
        length = int(length.group(1)) if length else 0
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4:end + 4 + length])
        del self.buffer[:end + 4 + length]
        if "post" in self.plan and head[9:12] == b"200":
            counters = json.loads(body).get("object_counters")
            if not counters:
                self.load.fail(f"a POST was answered {body[:200]!r}")
            else:
                self.plan["post"]["since"] = counters[-1]   # the next round's child starts from here
        closes = b"\r\nconnection: close" in head or head.startswith(b"http/1.0")
        self.load.answered(self, int(head[9:12]), closes)

    def connection_lost(self, exc):
        self.load.lost(self)


class _ClosedLoop:
    """What load_closed_loop measures, and the connections it keeps going until the window closes.

    A connection the server closes (after saying so, or not) is opened
    again; inside the window, each is counted: "opened" if the server had
    said so, "dropped" if not.
    """

    def __init__(self, spec):
        self.spec = spec
        self.window = [float("inf"), float("inf")]
        self.latencies, self.opened, self.dropped, self.failure = [], 0, 0, None
        self.running = 0
        self.done = asyncio.get_running_loop().create_future()

    def inside(self, moment):
        return self.window[0] <= moment <= self.window[1]

    async def connect(self, plan):
        self.running += 1
        try:
            await asyncio.get_running_loop().create_connection(lambda: _ClosedLoopClient(self, plan), HOST,
                                                               self.spec["port"])
        except OSError as error:
            self.fail(f"could not connect: {error}")
            self.running -= 1
            self.finish_if_done()

    def answered(self, client, status, closes):
        now = time.monotonic()
        if status != self.spec["status"]:
            self.fail(f"expected {self.spec['status']}, got {status}")
        elif self.inside(now):
            self.latencies.append(now - client.asked)
        if closes or now >= self.window[1] or self.failure:
            client.closing = True
            self.opened += closes and self.inside(now)
            if closes and now < self.window[1] and not self.failure:
                asyncio.ensure_future(self.connect(client.plan))
            client.transport.close()
        else:
            client.ask()

    def lost(self, client):
        self.running -= 1
        now = time.monotonic()
        if not client.closing and now < self.window[1] and not self.failure:
            self.dropped += self.inside(now)
            asyncio.ensure_future(self.connect(client.plan))
        self.finish_if_done()

    def finish_if_done(self):
        if not self.running and not self.done.done():
            self.done.set_result(None)

    def fail(self, message):
        self.failure = self.failure or message


async def load_closed_loop(spec):
    """Load the server from one connection per spec["connections"] entry for spec["lead"] +
    spec["seconds"] seconds. Prints the measured window (monotonic) as soon as the connections
    are open, then returns the latencies of the answers that arrive inside it, the connections
    reopened and dropped in it, and this process's CPU time in it."""
    load = _ClosedLoop(spec)
    for plan in spec["connections"]:
        await load.connect(plan)
    load.window = [time.monotonic() + spec["lead"], time.monotonic() + spec["lead"] + spec["seconds"]]
    print(json.dumps(load.window), flush=True)
    await asyncio.sleep(max(0.0, load.window[0] - time.monotonic()))
    cpu = time.process_time()
    await asyncio.sleep(max(0.0, load.window[1] - time.monotonic()))
    cpu = time.process_time() - cpu
    await asyncio.wait_for(load.done, SERVER_START_TIMEOUT)
    if load.failure:
        raise RuntimeError(load.failure)
    return {"latencies": load.latencies, "opened": load.opened, "dropped": load.dropped, "client_cpu": cpu,
            "connections": spec["connections"]}


async def load_devices(spec):
    """Many devices polling on keep-alive connections, idle and slowloris sockets beside them, and
    a fresh client logging in now and then. See many_devices().

    Each device has a poll due about every spec["interval"] seconds, on a
    schedule of its own; a poll that cannot be sent when due, because the
    last one is still waiting for its answer, is counted as missed. Prints
    the measured window first, as load_closed_loop does.
    """
    port, interval = spec["port"], spec["interval"]
    polling_from = time.monotonic() + 2 * interval      # every device has connected by then
    deadline = polling_from + spec["seconds"]
    print(json.dumps([polling_from, deadline]), flush=True)
    done = {"due": 0, "answered": 0, "missed": 0, "timeouts": 0, "closed_by_server": 0, "connect_failed": 0,
            "errors": {}, "latencies": [], "fresh": [], "fresh_tried": 0, "fresh_failures": [],
            "idle_closed": 0, "slowloris_cut": 0, "seconds": spec["seconds"]}
    polls = [poll.encode("latin-1") for poll in spec["polls"]]

    async def connect(counted=True):
        """A new connection, or (None, None) if the server does not take one within DEVICE_TIMEOUT."""
        try:
            return await asyncio.wait_for(asyncio.open_connection(HOST, port), DEVICE_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            done["connect_failed"] += counted
            return None, None

    async def device(n):
        poll = polls[n % len(polls)]
        due = time.monotonic() + random.uniform(0, interval)
        await asyncio.sleep(due - time.monotonic())
        reader, writer = await connect(counted=False)
        while due < deadline:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            counted = polling_from <= due
            done["due"] += counted
            asked = time.monotonic()
            if writer is None:      # the server closed the last one: connecting is part of this poll
                reader, writer = await connect(counted)
            if writer is None:
                status, closes = None, True
            else:
                try:
                    status, _, closes = await asyncio.wait_for(_exchange(reader, writer, poll), DEVICE_TIMEOUT)
                except asyncio.TimeoutError:
                    status, closes = None, True
                    done["timeouts"] += counted
                except (ConnectionError, asyncio.IncompleteReadError):
                    status, closes = None, True
                    done["closed_by_server"] += counted
                else:
                    done["closed_by_server"] += counted and closes
            if status == spec["status"]:
                done["answered"] += counted
                if counted:
                    done["latencies"].append(time.monotonic() - asked)
            elif status is not None and counted:
                done["errors"][status] = done["errors"].get(status, 0) + 1
            if closes and writer is not None:
                writer.close()
                reader = writer = None
            due += interval * random.uniform(0.5, 1.5)
            while due < time.monotonic() and due < deadline:     # the answer came too late for these
                done["missed"] += polling_from <= due
                done["due"] += polling_from <= due
                due += interval * random.uniform(0.5, 1.5)
        if writer is not None:
            writer.close()

    async def idle():
        reader, writer = await connect()
        if writer is None:
            return
        try:
            await asyncio.wait_for(reader.read(1), deadline - time.monotonic())
            done["idle_closed"] += 1
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.close()

    async def slowloris():
        await asyncio.sleep(random.uniform(0, SLOWLORIS_TRICKLE))
        head = b"GET /" + DOMAIN.encode() + b"/slow/loris HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nX-Slow: "
        while time.monotonic() < deadline:
            reader, writer = await connect()
            if writer is None:
                await asyncio.sleep(SLOWLORIS_TRICKLE)
                continue
            writer.write(head[:1])
            sent = 1
            while time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(reader.read(65536), SLOWLORIS_TRICKLE)
                except asyncio.TimeoutError:
                    writer.write(head[sent:sent + 1] if sent < len(head) else b"a")
                    sent += 1
                    continue
                except ConnectionError:
                    pass
                done["slowloris_cut"] += 1      # answered (408) or closed: start again, as an attacker would
                break
            writer.close()

    async def fresh_client(n):
        asked = time.monotonic()
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            if spec["kind"] == "cutout":
                user = f"fresh-{n}@example.com"
                form = login_form(user).encode()
                status, body, closes = await _exchange(reader, writer, (
                    f"POST /verify HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                    f"Content-Length: {len(form)}\r\n\r\n").encode() + form)
                if status != 200:
                    raise RuntimeError(f"login answered {status}")
                token = json.loads(body)["auth"]["query"]["auth"]
                second, wanted = get_request(f"/{DOMAIN}/{urllib.parse.quote(user, safe='@')}/notes?auth={token}"), 200
            else:
                status, body, closes = await _exchange(reader, writer, get_request("/empty"))
                if status != 204:
                    raise RuntimeError(f"the first request answered {status}")
                second, wanted = get_request("/empty"), 204
            if closes:
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
            status, body, _ = await _exchange(reader, writer, second)
            if status != wanted:
                raise RuntimeError(f"the hello answered {status}")
            done["fresh"].append(time.monotonic() - asked)
        finally:
            writer.close()

    async def fresh_clients():
        await asyncio.sleep(polling_from - time.monotonic())
        tasks = []
        for n in itertools.count():
            if time.monotonic() >= deadline:
                break
            done["fresh_tried"] += 1
            tasks.append(asyncio.create_task(asyncio.wait_for(fresh_client(n), DEVICE_TIMEOUT)))
            await asyncio.sleep(spec["fresh_every"])
        for failure in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(failure, BaseException):
                done["fresh_failures"].append(repr(failure)[:100])

    others = [idle() for _ in range(spec["idle"])] + [slowloris() for _ in range(spec["slowloris"])]
    await asyncio.gather(*others, *(device(n) for n in range(spec["devices"])), fresh_clients())
    return done


###############################################################################
# Main
###############################################################################


def prepare(directory):
    """Make directory ready for a run; refuse one with content that is not ours."""
    if os.path.isdir(directory) and os.listdir(directory):
        if not os.path.exists(os.path.join(directory, MARKER)):
            sys.exit(f"bench.py: {directory} is not empty and not from an earlier run; "
                     f"remove it or pass another --dir")
        shutil.rmtree(directory)    # left by an earlier --keep
    os.makedirs(directory, exist_ok=True)
    open(os.path.join(directory, MARKER), "w").close()


def server_versions():
    versions = []
    for server in SERVERS[1:]:
        try:
            versions.append(f"{server} {importlib.metadata.version(server)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{server} not installed")
    return versions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="./bench-data", help="where the collections go (default ./bench-data)")
    parser.add_argument("--quick", action="store_true", help="sizes 10x smaller and shorter runs, for a smoke run")
    parser.add_argument("--keep", action="store_true", help="leave DIR in place at the end")
    parser.add_argument("--only", type=int, choices=range(1, 13), action="append",
                        help="run only workload N (repeatable)")
    parser.add_argument("--baseline-client", metavar="FILE", help="another syncclient.js for workload 12 to "
                        "measure beside the one beside cutout.py, e.g. from `git show REV:syncclient.js > old.js`")
    parser.add_argument("--load", metavar="SPEC", help=argparse.SUPPRESS)      # the children that are clients
    parser.add_argument("--devices", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load or args.devices:
        return _load_child(load_closed_loop if args.load else load_devices, json.loads(args.load or args.devices))
    sizes = QUICK if args.quick else FULL
    root = os.path.abspath(args.dir)
    prepare(root)
    # cutout.py changes between commits while its version does not: name the exact file measured.
    with open(cutout.__file__, "rb") as source:
        digest = hashlib.sha256(source.read()).hexdigest()[:12]
    print(f"cutout {cutout.__version__} (cutout.py sha256 {digest}) benchmark"
          f"{' (--quick: sizes 10x smaller, shorter runs)' if args.quick else ''}: "
          f"Python {platform.python_version()} ({platform.python_implementation()}), {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.release()}, "
          f"SQLite {sqlite3.sqlite_version}, bottle {bottle.__version__}, "
          f"{', '.join(server_versions())}, data in {root}", flush=True)
    started = time.perf_counter()
    try:
        workloads = (newest_of_big_vs_small, durable_appends, read_all, garbage_collection,
                     empty_polls, newest_and_posts, catch_up, blobs, many_devices, through_the_balancer,
                     moving_a_collection,
                     functools.partial(the_client_in_a_browser, baseline_file=args.baseline_client))
        for number, workload in enumerate(workloads, 1):
            if not args.only or number in args.only:
                workload(root, sizes)
        http_summary()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s{'; data kept in ' + root if args.keep else ''}")


if __name__ == "__main__":
    main()
