"""Benchmarks of the Cut-Out's storage engine (cutout.AppendOnlyDB), with SQLite as the yardstick.

One section per workload, all measured in the same run on this machine:

  1. reading the newest 10 records of a 1,000,000-record collection vs of a
     1,000-record one (the poll clients make most): its cost must not grow
     with the size of the collection;
  2. durable appends of batches of 10 records of 200 bytes, vs SQLite in WAL
     mode with synchronous=FULL, one transaction per batch;
  3. reading all records of a 100,000-record collection, vs SQLite;
  4. garbage collection of a 1,000,000-record collection: speed, and peak
     memory, which should grow with the number of distinct (type, id) keys.

The two sides of a comparison run interleaved (ours, the baseline, ours, ...)
so that the machine's drift hits both alike. Each section prints the figure,
the baseline, their ratio and, where there is one, the target with "ok" or
"MISSED". It is a measurement, not a test: it exits 0 whatever the figures.

    python bench.py                  # full sizes: a few minutes; data in ./bench-data, removed after
    python bench.py --quick          # sizes 10x smaller: a smoke run
    python bench.py --dir /mnt/disk/bench --keep

Needs only the standard library and cutout.py (which imports bottle).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time

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


FULL = Sizes()
QUICK = Sizes(big=100_000, small=100, newest_reads=500, append_batches=30,
              read_all=10_000, gc_keys=10_000)


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


def result(ratio_name, ratio, target=None, at_least=True):
    """Print the ratio and, if there is a target, whether it holds."""
    text = f"  ratio {ratio_name}: {ratio:.2f}"
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="./bench-data", help="where the collections go (default ./bench-data)")
    parser.add_argument("--quick", action="store_true", help="sizes 10x smaller, for a smoke run")
    parser.add_argument("--keep", action="store_true", help="leave DIR in place at the end")
    parser.add_argument("--only", type=int, choices=range(1, 5), action="append",
                        help="run only workload N (repeatable)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    root = os.path.abspath(args.dir)
    prepare(root)
    # cutout.py changes between commits while its version does not: name the exact file measured.
    with open(cutout.__file__, "rb") as source:
        digest = hashlib.sha256(source.read()).hexdigest()[:12]
    print(f"cutout {cutout.__version__} (cutout.py sha256 {digest}) storage benchmark"
          f"{' (--quick: sizes 10x smaller)' if args.quick else ''}: "
          f"Python {platform.python_version()} ({platform.python_implementation()}), {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.release()}, "
          f"SQLite {sqlite3.sqlite_version}, data in {root}", flush=True)
    started = time.perf_counter()
    try:
        workloads = (newest_of_big_vs_small, durable_appends, read_all, garbage_collection)
        for number, workload in enumerate(workloads, 1):
            if not args.only or number in args.only:
                workload(root, sizes)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s{'; data kept in ' + root if args.keep else ''}")


if __name__ == "__main__":
    main()
