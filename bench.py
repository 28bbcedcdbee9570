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

and, over HTTP, for each server adapter bottle can run cutout.py on
(`--server wsgiref|waitress|cheroot`), against a bare bottle route on the
same adapter (a route that does nothing but answer):

  5. empty polls (204): requests/s with 8 keep-alive connections, which
     must reach 70% of the bare route's;
  6. GET of the newest 10 objects and durable POST of 10 objects:
     requests/s and p50/p99 latency beside the bare route's;
  7. a client catching up on 10,000 and 100,000 objects through `limit`
     pages: objects/s, and the server's peak memory, which must stay flat;
  8. a 10 MB blob posted (base64 in the JSON body) and downloaded: MB/s, beside
     the bare route reading the same body and bottle.static_file serving the
     same bytes, and how much the server's peak memory grew, in blob sizes.

The servers run in processes of their own on 127.0.0.1; the load comes from
this process, 8 threads each reusing one http.client connection, which is
reopened only when the server closed it. Those reopenings are counted and
shown per 1000 requests: 1000 means a new TCP connection for every request.
The server's CPU time per request (from /proc) says how much of the time is
the server's. An adapter that is not installed is skipped.

The two sides of a comparison run interleaved (ours, the baseline, ours, ...)
so that the machine's drift hits both alike. Each section prints the figure,
the baseline, their ratio and, where there is one, the target with "ok" or
"MISSED". It is a measurement, not a test: it exits 0 whatever the figures.

    python bench.py                  # full sizes: a few minutes; data in ./bench-data, removed after
    python bench.py --quick          # sizes 10x smaller, shorter runs: a smoke run
    python bench.py --only 5 --only 6 --only 7 --only 8   # the HTTP part alone: two minutes
    python bench.py --dir /mnt/disk/bench --keep

Needs only the standard library and cutout.py (which imports bottle); the
waitress and cheroot adapters need those packages.
"""

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
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
    http_connections: int = 8       # 5.-6. keep-alive connections, one thread each
    http_warmup: float = 0.5        #    seconds of load per side before measuring
    http_rounds: int = 3            #    measured rounds per side, interleaved ours/bare
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


FULL = Sizes()
QUICK = Sizes(big=100_000, small=100, newest_reads=500, append_batches=30,
              read_all=10_000, gc_keys=10_000,
              http_warmup=0.2, http_rounds=2, http_round=0.5,
              catchup_small=1_000, catchup_big=10_000, blob_bytes=1_000_000)


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
report = cutout.AppendOnlyDB(sys.argv[1]).collect_garbage()
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
# HTTP: cutout.py under each of bottle's server adapters, vs a bare bottle route
###############################################################################
# Each server runs in a process of its own; this process is the clients. The
# bare baseline is a bottle app on the same adapter, set up as cutout.py sets
# up its own (the same threaded wsgiref server class), whose routes answer
# without doing anything: the figures ours/bare are what cutout.py's own work
# costs on top of bottle's and the server's.

ADAPTERS = getattr(cutout, "SERVERS", ("wsgiref", "waitress", "cheroot"))
HOST = "127.0.0.1"
DOMAIN, USER = "example.com", "bench@example.com"
AUDIENCE = "http://" + DOMAIN
EMPTY_POLL_TARGET = 0.70          # ours/bare requests/s on empty polls
KINTO_EMPTY_POLLS = 1_200         # Kinto 26, memory backend, 8 keep-alive connections, this machine class
KINTO_POSTED_OBJECTS = 470        # objects/s it stores posted 10 at a time, same setup
FLAT_MEMORY = 1.10                # peak RSS catching up on the big collection / on the small one
SERVER_START_TIMEOUT = 20         # seconds

# Filled in by sections 5-7, printed by http_summary().
http_results = {}

BARE_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[3])
import bottle

adapter, port, newest_body = sys.argv[1], int(sys.argv[2]), sys.argv[4].encode()
served_file = sys.argv[5] if len(sys.argv) > 5 else None
posted_body = b'{"object_counters":[1,2,3,4,5,6,7,8,9,10]}'
app = bottle.Bottle()

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

import os
import cutout

# The same server setup as cutout.py's (threads, limits), so that only the app differs.
cutout._run_server(adapter, "127.0.0.1", port, app,
                   lambda port: print(f"bare bottle serving http://127.0.0.1:{port}/ ({adapter})", flush=True))
"""


def installed_adapters():
    """The adapters whose package is here; says which are not."""
    found = []
    for adapter in ADAPTERS:
        if adapter == "wsgiref" or importlib.util.find_spec(adapter) is not None:
            found.append(adapter)
        else:
            print(f"  {adapter}: not installed (pip install {adapter}): skipped", flush=True)
    return found


def unused_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class ServerProcess:
    """A server in a child process on 127.0.0.1: started, waited for, measured through /proc, stopped."""

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
        """User + system CPU time of the server process so far (all its threads); nan without /proc."""
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / self.CLOCK_TICKS

    def peak_rss(self):
        """The process's high-water mark of resident memory, in bytes (VmHWM); nan without /proc."""
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return float("nan")

    def close(self):    # for contextlib.closing()
        self.stop()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_ours(adapter, data_dir, log_dir):
    port = unused_port()
    argv = [sys.executable, cutout.__file__, "--server", adapter, "--host", HOST, "--port", str(port),
            "--data-dir", data_dir]
    return ServerProcess(f"cutout.py --server {adapter}", argv, port, os.path.join(log_dir, f"ours-{adapter}.log"))


def start_bare(adapter, log_dir, newest_body=b"{}", served_file=None):
    port = unused_port()
    here = os.path.dirname(os.path.abspath(cutout.__file__))
    argv = [sys.executable, "-c", BARE_CHILD, adapter, str(port), here, newest_body.decode()]
    argv += [served_file] if served_file else []
    return ServerProcess(f"bare bottle on {adapter}", argv, port, os.path.join(log_dir, f"bare-{adapter}.log"))


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

    def __init__(self, server):
        self.server = server
        client = Client(server.port)
        form = urllib.parse.urlencode({"assertion": USER, "audience": AUDIENCE})
        body = expect(*client.request("POST", "/verify", form,
                                      {"Content-Type": "application/x-www-form-urlencoded"}), 200, "verify")
        self.token = json.loads(body)["auth"]["query"]["auth"]
        client.close()

    def path(self, bucket, **query):
        query = dict(auth=self.token, **query)
        return (f"/{DOMAIN}/{urllib.parse.quote(USER, safe='@')}/{bucket}?"
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


def objects_body(first, count):
    """A JSON list of count notes of RECORD_SIZE bytes each, ids first .. first + count - 1."""
    return b"[" + b",".join(note(n) for n in range(first, first + count)) + b"]"


@dataclasses.dataclass
class LoadFigures:
    """What a side did during its measured windows, summed over rounds."""

    requests: int = 0
    seconds: float = 0.0
    opened: int = 0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    latencies: list = dataclasses.field(default_factory=list)

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
        return (f"    {label:<5} {rate:9,.0f} {unit}  p50 {self.percentile(50) * 1e3:6.2f} ms  "
                f"p99 {self.percentile(99) * 1e3:7.2f} ms  {self.opened_per_1000:6.1f} conns/1000 req  "
                f"CPU/req: server {self.server_cpu / self.requests * 1e6:5.0f} us, "
                f"client {self.client_cpu / self.requests * 1e6:5.0f} us")


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


def http_section(title, sizes, root, each_adapter):
    """Print the section header, then run each_adapter(adapter, data_dir, log_dir) for every installed adapter."""
    section(title)
    print(f"  {sizes.http_connections} keep-alive connections (one thread each) from this process; "
          f"servers in child processes on {HOST}", flush=True)
    for adapter in installed_adapters():
        data_dir = os.path.join(root, f"http-{title.split('.')[0]}-{adapter}")
        log_dir = os.path.join(root, "logs")
        os.makedirs(log_dir, exist_ok=True)
        try:
            each_adapter(adapter, data_dir, log_dir)
        except Exception as error:     # one adapter failing must not hide the others' figures
            print(f"  {adapter}: FAILED: {error}", flush=True)
            http_results.setdefault(adapter, {})["failed"] = str(error)


def empty_polls(root, sizes):
    n = sizes.http_connections

    def each_adapter(adapter, data_dir, log_dir):
        with contextlib.ExitStack() as stack:
            ours = stack.enter_context(contextlib.closing(start_ours(adapter, data_dir, log_dir)))
            bare = stack.enter_context(contextlib.closing(start_bare(adapter, log_dir)))
            api, setup = Api(ours), Client(ours.port)
            collection_id, since = api.hello(setup, "poll")
            since = api.post(setup, "poll", collection_id, since, objects_body(0, 10))
            setup.close()
            poll = api.path("poll", since=since, collection_id=collection_id)

            def ours_call(client):
                expect(*client.request("GET", poll), 204, "empty poll")

            def bare_call(client):
                expect(*client.request("GET", "/empty"), 204, "bare 204")

            mine, theirs = interleaved([Side("ours", ours, [ours_call] * n),
                                        Side("bare", bare, [bare_call] * n)], sizes)
        print(f"  {adapter}:")
        print(mine.line("ours"))
        print(theirs.line("bare"))
        result("ours/bare req/s", mine.rate / theirs.rate, EMPTY_POLL_TARGET, indent="    ")
        aim = 3 * KINTO_EMPTY_POLLS
        print(f"    vs Kinto 26 (~{KINTO_EMPTY_POLLS:,}/s on this machine class): {mine.rate / KINTO_EMPTY_POLLS:.1f}x"
              f"    aim >= {aim:,}/s (3x): {'ok' if mine.rate >= aim else 'MISSED'}", flush=True)
        http_results.setdefault(adapter, {})["empty"] = (mine, theirs)

    http_section("5. HTTP: empty polls (204)", sizes, root, each_adapter)
    print("  conns/1000 req: TCP connections the clients opened per 1000 answers; 1000 = one per request.")


def newest_and_posts(root, sizes):
    n = sizes.http_connections

    def each_adapter(adapter, data_dir, log_dir):
        with contextlib.ExitStack() as stack:
            ours = stack.enter_context(contextlib.closing(start_ours(adapter, data_dir, log_dir)))
            api, setup = Api(ours), Client(ours.port)
            # The collection read from: its newest 10 of newest_collection.
            collection_id, since = api.hello(setup, "newest")
            last = api.post(setup, "newest", collection_id, since, objects_body(0, sizes.newest_collection))
            newest = api.path("newest", since=last - 10, collection_id=collection_id)
            newest_body = expect(*setup.request("GET", newest), 200, "newest 10")
            assert len(json.loads(newest_body)["objects"]) == 10
            # Each connection posts to a collection of its own, as each user's device does:
            # posts to one collection from 8 clients at once would refuse each other (POST-2).
            buckets = [f"posts-{i}" for i in range(n)]
            state = {bucket: list(api.hello(setup, bucket)) for bucket in buckets}
            setup.close()
            bare = stack.enter_context(contextlib.closing(start_bare(adapter, log_dir, newest_body)))
            check = Client(bare.port)
            expect(*check.request("GET", "/json"), 200, "bare json")
            check.close()

            def ours_newest(client):
                body = expect(*client.request("GET", newest), 200, "newest 10")
                if len(body) != len(newest_body):
                    raise RuntimeError(f"newest 10: {len(body)} bytes, expected {len(newest_body)}")

            def bare_newest(client):
                expect(*client.request("GET", "/json"), 200, "bare json")

            post_body = objects_body(0, 10)

            def ours_post_to(bucket):
                def call(client):
                    collection_id, since = state[bucket]
                    state[bucket][1] = api.post(client, bucket, collection_id, since, post_body)
                return call

            def bare_post(client):
                answer = json.loads(expect(*client.request("POST", "/json", post_body,
                                                           {"Content-Type": "application/json"}), 200, "bare post"))
                assert answer["object_counters"]

            reads = interleaved([Side("ours", ours, [ours_newest] * n),
                                 Side("bare", bare, [bare_newest] * n)], sizes)
            writes = interleaved([Side("ours", ours, [ours_post_to(b) for b in buckets]),
                                  Side("bare", bare, [bare_post] * n)], sizes)
            posted = sum(since for _, since in state.values())
        print(f"  {adapter}: GET newest 10 of {sizes.newest_collection:,} ({len(newest_body):,} bytes):")
        print(reads[0].line("ours"))
        print(reads[1].line("bare"))
        result("ours/bare req/s", reads[0].rate / reads[1].rate, indent="    ")
        print(f"  {adapter}: POST of 10 x {RECORD_SIZE} bytes, durable before the answer "
              f"({posted:,} objects stored, warm-up included):")
        print(writes[0].line("ours", 10, "obj/s"))
        print(writes[1].line("bare", 10, "obj/s"))
        result("ours/bare req/s", writes[0].rate / writes[1].rate, indent="    ")
        aim = 10 * KINTO_POSTED_OBJECTS
        print(f"    vs Kinto 26 (~{KINTO_POSTED_OBJECTS}/s): {writes[0].rate * 10 / KINTO_POSTED_OBJECTS:.1f}x"
              f"    aim >= {aim:,} objects/s (10x): {'ok' if writes[0].rate * 10 >= aim else 'MISSED'}", flush=True)
        http_results.setdefault(adapter, {}).update(newest=reads, post=writes)

    http_section("6. HTTP: GET newest 10 / POST 10", sizes, root, each_adapter)


def catch_up(root, sizes):
    small, big = sizes.catchup_small, sizes.catchup_big
    section(f"7. HTTP: catching up on {small:,} and {big:,} objects through limit={sizes.catchup_page} pages")
    adapters = installed_adapters()
    if not adapters:
        return
    data_dir, log_dir = os.path.join(root, "http-7"), os.path.join(root, "logs")
    os.makedirs(log_dir, exist_ok=True)
    buckets = {small: f"catchup-{small}", big: f"catchup-{big}"}
    # Built once, through the API of the first adapter; every adapter then serves the same files.
    with contextlib.closing(start_ours(adapters[0], data_dir, log_dir)) as ours:
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
        print(f"  built through POSTs of {sizes.catchup_batch:,} objects on {adapters[0]}: {small + big:,} objects "
              f"in {spent:.1f} s ({(small + big) / spent:,.0f} objects/s; server CPU {cpu / spent:.0%} of the time)")
    print(f"  {'adapter':<9} {'objects':>8} | {'pages':>5} {'seconds':>7} {'objects/s':>10} "
          f"{'server CPU':>10} | {'RSS MB at start':>15} {'peak RSS MB':>11}")
    for adapter in adapters:
        try:
            peaks = {}
            for count, bucket in buckets.items():
                # A fresh server for each, so that each peak is its catch-up's alone.
                with contextlib.closing(start_ours(adapter, data_dir, log_dir)) as ours:
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
                print(f"  {adapter:<9} {count:>8,} | {pages:>5} {spent:>7.3f} {count / spent:>10,.0f} "
                      f"{cpu:>10} | {at_start / 1e6:>15.1f} {peaks[count] / 1e6:>11.1f}", flush=True)
                http_results.setdefault(adapter, {})[f"catchup-{count}"] = (count / spent, peaks[count])
            result(f"{adapter} peak RSS {big:,}/{small:,}", peaks[big] / peaks[small], FLAT_MEMORY, at_least=False)
        except Exception as error:
            print(f"  {adapter}: FAILED: {error}", flush=True)
            http_results.setdefault(adapter, {})["failed"] = str(error)
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
    print(f"  {'adapter':<9} | {'POST MB/s':>9} {'bare':>7} {'ratio':>5} | {'GET MB/s':>8} {'static':>7} "
          f"{'ratio':>5} | {'peak RSS growth MB':>18} {'blobs':>5}")
    for adapter in installed_adapters():
        data_dir, log_dir = os.path.join(root, f"http-8-{adapter}"), os.path.join(root, "logs")
        os.makedirs(log_dir, exist_ok=True)
        try:
            with contextlib.closing(start_ours(adapter, data_dir, log_dir)) as ours, \
                    contextlib.closing(start_bare(adapter, log_dir, served_file=served_file)) as bare:
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
            print(f"  {adapter:<9} | {rate['post']:>9.0f} {rate['bare post']:>7.0f} "
                  f"{rate['post'] / rate['bare post']:>5.2f} | {rate['get']:>8.0f} {rate['static']:>7.0f} "
                  f"{rate['get'] / rate['static']:>5.2f} | {growth / 1e6:>18.1f} {growth / size:>5.1f}", flush=True)
        except Exception as error:
            print(f"  {adapter}: FAILED: {error}", flush=True)
    print(f"  bare: the bare route reading the same body, and bottle.static_file serving the same bytes; "
          f"MB/s are of the\n  blob's {size / 1e6:g} MB either way (the POST body is base64, a third larger).")


def http_summary():
    """One line per adapter, and which adapter wins where, for choosing the default by the numbers."""
    if not http_results:
        return
    section("HTTP summary: cutout.py per adapter (bare bottle route on the same adapter in brackets)")
    print(f"  {'adapter':<9} | {'empty polls/s':>22} {'ratio':>5} {'conns/1k':>8} | {'newest 10 req/s':>17} "
          f"| {'POST 10 objects/s':>19} {'conns/1k':>8} | {'catch-up obj/s':>14} {'peak RSS MB':>13}")

    def both(pair, per=1):
        return f"{pair[0].rate * per:,.0f} [{pair[1].rate * per:,.0f}]" if pair else "-"

    for adapter, figures in http_results.items():
        empty, newest, post = figures.get("empty"), figures.get("newest"), figures.get("post")
        catchups = sorted((int(key.split("-")[1]), value) for key, value in figures.items()
                          if key.startswith("catchup-"))
        catchup_rate = f"{catchups[-1][1][0]:,.0f}" if catchups else "-"
        peaks = " / ".join(f"{peak / 1e6:.0f}" for _, (_, peak) in catchups) or "-"
        print(f"  {adapter:<9} | {both(empty):>22} "
              f"{(f'{empty[0].rate / empty[1].rate:.2f}' if empty else '-'):>5} "
              f"{(f'{empty[0].opened_per_1000:.0f}' if empty else '-'):>8} | {both(newest):>17} "
              f"| {both(post, 10):>19} {(f'{post[0].opened_per_1000:.0f}' if post else '-'):>8} "
              f"| {catchup_rate:>14} {peaks:>13}"
              f"{'   FAILED: ' + figures['failed'][:60] if 'failed' in figures else ''}")
    if any(key.startswith("catchup-") for figures in http_results.values() for key in figures):
        print("  catch-up obj/s is of the largest collection; peak RSS MB after the smaller / the larger.")
    for title, key, per, unit in (("empty polls", "empty", 1, "req/s"), ("GET newest 10", "newest", 1, "req/s"),
                                  ("POST 10", "post", 10, "objects/s")):
        ranked = sorted(((figures[key][0].rate * per, adapter) for adapter, figures in http_results.items()
                         if key in figures), reverse=True)
        if ranked:
            text = ", ".join(f"{adapter} {rate:,.0f}" for rate, adapter in ranked)
            print(f"  fastest on {title}: {ranked[0][1]}   ({unit}: {text})")


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


def adapter_versions():
    versions = []
    for adapter in ADAPTERS:
        if adapter != "wsgiref":
            try:
                versions.append(f"{adapter} {importlib.metadata.version(adapter)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(f"{adapter} not installed")
    return versions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="./bench-data", help="where the collections go (default ./bench-data)")
    parser.add_argument("--quick", action="store_true", help="sizes 10x smaller and shorter runs, for a smoke run")
    parser.add_argument("--keep", action="store_true", help="leave DIR in place at the end")
    parser.add_argument("--only", type=int, choices=range(1, 9), action="append",
                        help="run only workload N (repeatable)")
    args = parser.parse_args(argv)
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
          f"{', '.join(adapter_versions())}, data in {root}", flush=True)
    started = time.perf_counter()
    try:
        workloads = (newest_of_big_vs_small, durable_appends, read_all, garbage_collection,
                     empty_polls, newest_and_posts, catch_up, blobs)
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
