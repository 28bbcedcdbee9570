"""The Cut-Out: reference server for the sync protocol in SPEC.md.

    python cutout.py                                  # http://127.0.0.1:8088/, data in ./cutout-data
    python cutout.py gc --data-dir ./cutout-data      # collect garbage once
    python cutout.py token --email E --audience A     # a token for E in the app A, as /verify gives
    python test_protocol.py --url http://127.0.0.1:8088/   # check a server against SPEC.md

Written to be read first; durable and fast second, never at the cost of the first.
It is one server on one machine's files, serving from one worker process per core:
not a database server, not a framework. Its sections, in the order data flows from
the disk to the socket:

    Errors              the error codes every refusal is answered with (SPEC.md ERR-1)
    Storage             one collection: a data file of framed records, an index (chapter 3)
    Blobs               attachments kept beside a collection's records
    Maintenance         garbage collection, export and import of a collection
    The data directory  where each (domain, user, bucket) lives
    Protocol            chapter 2 on plain values: query and body in, (status, body) out
    HTTP                bottle routes: tokens, CORS, and the protocol's answers as HTTP
    Balancer            collections spread over nodes by rendezvous hashing, copied to backups
                        and moved between nodes; and the proxy
    Server              HTTP/1.1 on asyncio, in one worker process per core
    Command line        python cutout.py [gc | token | balancer]

Each section uses only those above it; within one, a function comes before the
helpers only it uses. So one POST reads: post_collection (HTTP) -> parse_objects
and write_collection (Protocol) -> BlobBatch (Blobs) -> AppendOnlyDB.append
(Storage), each step up the file, each read downwards from there.
"""

import argparse
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import errno
import functools
import hashlib
import hmac
import http
import io
import ipaddress
import itertools
import json
import logging
import math
import mmap
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import struct
import sys
import tarfile
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import zlib
from array import array

try:
    import fcntl        # flock() and, on macOS, F_FULLFSYNC
    import resource     # the open-files limit
except ImportError:     # Windows
    sys.exit("cutout.py runs on Linux, macOS and the BSDs (it needs flock() and fork()); on Windows, run it in WSL")

import bottle

__version__ = "0.1.0"
__all__ = ["AppendOnlyDB", "AppendConflict", "DataDir", "GarbageReport", "Limits", "PollState", "ProtocolError",
           "StorageError", "SyncQuery", "app", "check_token", "make_token", "main", "parse_objects",
           "parse_sync_query", "read_collection", "write_collection"]

log = logging.getLogger("cutout")


###############################################################################
# Errors
###############################################################################
# The protocol raises ProtocolError for every request the spec refuses;
# storage raises StorageError for damage it must not guess at, and
# AppendConflict when a conditional append finds records its caller missed.


# [ERR-1] Every error is answered {"error": CODE, "message": TEXT}, CODE one of
# these; each with the status it is answered with. A few are also answered with
# another status where HTTP has a more exact one for the case (too_large: 431 for
# a request head; bad_request: 408, 415, 501 or 505), named where they are raised.
ERRORS = {
    "bad_request": 400, "bad_path": 400, "bad_since": 400, "bad_limit": 400, "bad_filter": 400,
    "bad_json": 400, "bad_object": 400, "bad_blob": 400,
    "unauthorized": 401, "assertion_rejected": 401,
    "too_many_collections": 403,                # LIMIT-2
    "not_found": 404, "method_not_allowed": 405,
    "too_large": 413,                           # LIMIT-1
    "range_not_satisfiable": 416,               # BLOB-8
    "internal_error": 500, "storage_error": 500,
    "verifier_unavailable": 502,                # AUTH-1
    "overloaded": 503,                          # BACKOFF-1
    "stale_cluster": 409, "misdirected": 421, "node_unavailable": 502,     # CLUSTER-2, -5, -4
    "backup_unavailable": 503, "in_transit": 503, "change_in_progress": 409,      # CLUSTER-8, -10
    "behind": 409, "blobs_missing": 409,        # between nodes (CLUSTER-8)
}


class ProtocolError(Exception):
    """A request the spec refuses; answered with its status and {"error": code, "message": ...},
    and "object": the position of the object refused, when one is (POST-1)."""

    def __init__(self, code, message, status=None, headers=None, position=None):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status or ERRORS[code]
        self.headers = headers or {}
        self.position = position


class StorageError(Exception):
    """A collection's files are damaged beyond what repair may decide alone."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = path


class AppendConflict(Exception):
    """A conditional append found records the caller has not seen, or another collection_id."""

    def __init__(self, last_counter, collection_id):
        super().__init__(f"the collection {collection_id} holds records up to counter {last_counter}")
        self.last_counter = last_counter
        self.collection_id = collection_id


###############################################################################
# Storage: a data file of framed records + an index of fixed-width entries
###############################################################################
# A collection is a directory holding two files (SPEC.md chapter 3, whose DISK-n
# ids the code below names where it carries them out):
#
#   data   a 512-byte header (magic, then a space-padded JSON object naming the
#          collection_id, its secret, and the file's generation), then records
#          laid end to end, each behind a 32-byte FRAME: counter, length,
#          appended_at, its place in its batch, and a CRC-32 of frame and record.
#   index  a 24-byte header (magic, the data file's generation), then one
#          INDEX_ENTRY (counter, offset of the record, length) per record.
#
# The data file is the database and the index is an accelerator derived from
# it. An append writes the batch's frames, syncs the data file (sync_data: the
# one sync per append, the commit point), and only then writes the index
# entries. So every index entry points at durable data, and a crash leaves at
# worst a torn batch after the last entry, which the next open cuts off, or
# whole batches the index has not caught up with, which it indexes. Both are
# logged. An index entry that points at data that is not there is damage, never
# a crash, and raises StorageError.
#
# Concurrency: every operation opens the files, takes flock() on the collection
# directory, and closes everything when done, so an idle collection holds no
# open file. Writers take the lock exclusively for the whole append, which
# serialises appends between threads (each open has its own lock) and between
# processes. Readers take it shared only long enough to note how far the files
# reach; they then read without it, because the bytes below that point never
# change in these inodes: appends only add, and garbage collection writes new
# files and renames them over the old ones. flock() is released by the kernel
# when a process dies, so a killed writer never leaves the collection locked.
# It is not reliable on network filesystems; the data directory must be local.

DATA_MAGIC = b"CUTOUTDB"      # DISK-2
DATA_HEADER_SIZE = 512        # bytes: magic + space-padded JSON; frames start here
FRAME = struct.Struct("<QQIIII")  # DISK-3: counter, length, appended_at (unix s), batch_index, batch_count, crc32
FRAME_HEAD, FRAME_CRC = struct.Struct("<QQIII"), struct.Struct("<I")  # FRAME in the two parts the crc needs
INDEX_MAGIC = b"CUTOUTIX"     # DISK-5
INDEX_HEADER = struct.Struct("<8sQQ")  # magic, generation of the data file, reserved (0)
INDEX_ENTRY = struct.Struct("<QQQ")    # counter, offset of the record (after its frame), length
READ_PAGE_ENTRIES = 1024      # index entries per read: bounds a reader's memory; fastest of 512-4096 in bench.py 3
SCAN_CHUNK = 1 << 20          # bytes read at a time when scanning frames
SMALL_READ = 64 << 10         # bytes: a page of records this small is read with pread(), not mapped
ALLOCATE_AHEAD = 64 << 10     # bytes: the least a data file grows by; zeros until appended over
ALLOCATE_AHEAD_MAX = 8 << 20  # bytes: the most, so that no append writes a huge run of zeros
assert INDEX_HEADER.size == INDEX_ENTRY.size  # entry i then sits at (i + 1) * INDEX_ENTRY.size


def _allocation_ahead(data_end):
    """How many zero bytes to write after data_end when the data file must grow (DISK-4).

    An fdatasync that must also record a new file size costs about half as
    much again as one that overwrites allocated blocks, so the file grows by
    an eighth at a time, within [ALLOCATE_AHEAD, ALLOCATE_AHEAD_MAX], and
    most appends only overwrite zeros.
    """
    return min(max(ALLOCATE_AHEAD, data_end // 8), ALLOCATE_AHEAD_MAX)


def _entry_position(i):
    return (i + 1) * INDEX_ENTRY.size


def _frame_crc(header_without_crc, record):
    return zlib.crc32(record, zlib.crc32(header_without_crc))


def _pack_frame(counter, record, appended_at, batch_index, batch_count):
    """The FRAME that goes before record (DISK-3); every writer packs frames here."""
    head = FRAME_HEAD.pack(counter, len(record), appended_at, batch_index, batch_count)
    return head + FRAME_CRC.pack(_frame_crc(head, record))


@dataclasses.dataclass(frozen=True)
class DataHeader:
    """What the first DATA_HEADER_SIZE bytes of a data file say (DISK-2)."""

    collection_id: str
    secret: str
    generation: int        # changes whenever the data file is replaced; the index names it
    counter_floor: int     # counters given from now on are above this, even if no record is
    purge_horizon: int     # tombstones with counters up to this may have been purged
    deleted: dict = None   # {"reason": ...} while a deleted collection has not been written again

    @classmethod
    def new(cls):
        # Random, never from the clock: two collections made in the same
        # instant must not share an id (a flaw of the original). A collection
        # first made by a write keeps the id it had unwritten (AppendOnlyDB.create).
        return cls(secrets.token_hex(16), secrets.token_hex(32), generation=1, counter_floor=0, purge_horizon=0)

    def encode(self):
        return _encode_header(DATA_MAGIC, DATA_HEADER_SIZE, self)

    @classmethod
    def decode(cls, raw, path):
        _check_magic(raw, DATA_MAGIC, DATA_HEADER_SIZE, path, "data file")
        try:
            return _decoded_header(raw)
        except (ValueError, TypeError) as error:
            raise StorageError(path, f"unreadable data header: {error}") from None


def _encode_header(magic, size, fields):
    """A file header: magic, then the dataclass fields as JSON padded with spaces, then a newline."""
    text = json.dumps(dataclasses.asdict(fields), sort_keys=True, ensure_ascii=False).encode()
    room = size - len(magic) - 1
    if len(text) > room:
        raise ValueError(f"{type(fields).__name__} does not fit in {size} bytes")
    return magic + text.ljust(room) + b"\n"


def _check_magic(raw, magic, size, path, kind):
    if len(raw) < size or not raw.startswith(magic):
        raise StorageError(path, f"not a Cut-Out {kind} (bad or missing header)")


@functools.lru_cache(maxsize=4096)      # of 512-byte headers: some 4 MB at most
def _decoded_header(raw):
    # Every request reads its collection's header; parsing the same bytes
    # again would be a tenth of an append's own work.
    header = DataHeader(**json.loads(raw[len(DATA_MAGIC):DATA_HEADER_SIZE]))
    for name, digits in (("collection_id", 32), ("secret", 64)):
        value = getattr(header, name)
        if not (isinstance(value, str) and len(value) == digits and set(value) <= set("0123456789abcdef")):
            raise ValueError(f"{name} must be {digits} lower-case hex digits")
    for name in ("generation", "counter_floor", "purge_horizon"):
        value = getattr(header, name)
        # Below 2**62, so that counters and generations above it still fit in 64 bits.
        if not (type(value) is int and 0 <= value < 1 << 62):
            raise ValueError(f"{name} must be an integer from 0 to 2**62")
    if not (header.deleted is None or isinstance(header.deleted, dict) and set(header.deleted) == {"reason"}):
        raise ValueError('deleted must be null or {"reason": ...}')
    return header


@dataclasses.dataclass
class _Frame:
    offset: int            # of the record, just past its frame
    counter: int
    length: int
    appended_at: int
    batch_index: int
    batch_count: int
    record: bytes          # None when only the frame was checked

    @property
    def end(self):
        return self.offset + self.length

    @property
    def ends_batch(self):
        return self.batch_index == self.batch_count - 1


def _pread_exactly(fd, length, offset):
    """length bytes at offset, fewer only at the end of the file (one pread stops at 2 GiB)."""
    parts, wanted = [], length
    while wanted:
        part = os.pread(fd, min(wanted, 1 << 30), offset + length - wanted)
        if not part:
            break
        parts.append(part)
        wanted -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_frame(fd, record_offset, length):
    """The intact frame of the length-byte record at record_offset (without the record), or None."""
    start = record_offset - FRAME.size
    if start < DATA_HEADER_SIZE or record_offset + length > _file_size(fd):
        return None     # a damaged entry: the record would not be in the file
    head = os.pread(fd, FRAME.size + min(length, SCAN_CHUNK), start)
    counter, stored_length, appended_at, batch_index, batch_count, crc = FRAME.unpack_from(head)
    if stored_length != length or batch_index >= batch_count:
        return None
    computed = zlib.crc32(memoryview(head)[FRAME.size:], zlib.crc32(memoryview(head)[:FRAME.size - 4]))
    for chunk_start in range(record_offset + SCAN_CHUNK, record_offset + length, SCAN_CHUNK):
        chunk = os.pread(fd, min(SCAN_CHUNK, record_offset + length - chunk_start), chunk_start)
        computed = zlib.crc32(chunk, computed)
    if computed != crc:
        return None
    return _Frame(record_offset, counter, length, appended_at, batch_index, batch_count, None)


def _scan_frames(fd, start, end):
    """Yield the intact frames laid end to end from byte start; stop at the first that is not."""
    buffer, buffer_start, position = b"", start, start
    while position + FRAME.size <= end:
        if position + FRAME.size > buffer_start + len(buffer):
            buffer, buffer_start = os.pread(fd, min(SCAN_CHUNK, end - position), position), position
        head_at = position - buffer_start
        counter, length, appended_at, batch_index, batch_count, crc = FRAME.unpack_from(buffer, head_at)
        record_offset = position + FRAME.size
        if record_offset + length > end or batch_index >= batch_count:
            return
        if record_offset + length > buffer_start + len(buffer):
            buffer = _pread_exactly(fd, max(SCAN_CHUNK, FRAME.size + length), position)
            buffer_start, head_at = position, 0
        record = buffer[head_at + FRAME.size:head_at + FRAME.size + length]
        if _frame_crc(buffer[head_at:head_at + FRAME.size - 4], record) != crc:
            return
        yield _Frame(record_offset, counter, length, appended_at, batch_index, batch_count, record)
        position = record_offset + length


_NONZERO = re.compile(rb"[^\x00]")     # any byte but zero: where allocated-ahead zeros end


def _intact_batch_start_after(fd, start, end, above_counter):
    """Whether an intact frame that starts a batch lies anywhere in [start, end).

    Appends are synced one after another, so an intact batch after a
    damaged frame proves that the damaged batch was acknowledged. Only the
    tail is searched, byte by byte but skipping runs of zeros; repair is rare.
    """
    position = start
    while position + FRAME.size <= end:
        chunk = os.pread(fd, min(SCAN_CHUNK, end - position), position)
        at = 0
        while at + FRAME.size <= len(chunk):
            nonzero = _NONZERO.search(chunk, at)
            if nonzero is None:
                break
            at = max(at, nonzero.start() - FRAME.size + 1)
            counter, length, _, batch_index, batch_count, _ = FRAME.unpack_from(chunk, at)
            record_offset = position + at + FRAME.size
            if (batch_index == 0 and batch_count and counter > above_counter and record_offset + length <= end
                    and _read_frame(fd, record_offset, length) is not None):
                return True
            at += 1
        position += max(len(chunk) - FRAME.size + 1, 1)
    return False


def _pwrite_all(fd, data, offset):
    """Write all of data at offset; a short write (a full disk) raises OSError."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.ENOSPC, "no room to write", fd)
        view, offset = view[written:], offset + written


def _file_size(fd):
    # Not fstat(): measured on ext4, an fstat() before an append made its
    # fdatasync about 70 us (40%) slower; lseek() costs nothing of the kind.
    return os.lseek(fd, 0, os.SEEK_END)


def _open_without_atime(name, flags, dir_fd):
    # Every append reads the file it wrote last time; updating its access
    # time each time measurably slowed the append's fdatasync. O_NOATIME is
    # refused for files of another user, who then gets access times.
    try:
        return os.open(name, flags | getattr(os, "O_NOATIME", 0), 0o600, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, flags, 0o600, dir_fd=dir_fd)


def durable_sync_of(platform_fcntl, platform_os):
    """The call that makes a file's written bytes durable on this platform (DISK-7).

    Linux and the BSDs: fdatasync, which skips the file's times. macOS has no
    fdatasync, and its fsync leaves the bytes in the drive's cache: F_FULLFSYNC
    flushes that too, as SQLite's fullfsync does. Elsewhere fsync. Taking the
    modules as arguments lets a test on Linux force each branch.
    """
    if hasattr(platform_fcntl, "F_FULLFSYNC"):
        return lambda fd: platform_fcntl.fcntl(fd, platform_fcntl.F_FULLFSYNC)
    return getattr(platform_os, "fdatasync", platform_os.fsync)


sync_data = durable_sync_of(fcntl, os)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durably(path):
    """os.makedirs(path), then sync each new directory and the one holding the first."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    if not missing:
        return
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(new)
    for directory in missing + [path]:
        _fsync_dir(directory)


class _OpenCollection:
    """The files of one collection, opened and checked under the directory lock (DISK-10).

    Files that do not agree are repaired before anything reads them (DISK-8).
    """

    def __init__(self, db, exclusive):
        self.db = db
        self.dir_fd = self.data_fd = self.index_fd = None
        try:
            self.dir_fd = os.open(db.path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self.dir_fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            self._open_files(writable=exclusive)
            if not self._files_agree():
                if not exclusive:
                    # flock() cannot upgrade atomically: the files may have been
                    # replaced meanwhile, so open and check them again.
                    fcntl.flock(self.dir_fd, fcntl.LOCK_EX)
                    self._open_files(writable=True)
                if not self._files_agree():
                    self._repair()
                if not exclusive:
                    fcntl.flock(self.dir_fd, fcntl.LOCK_SH)
        except BaseException:
            self.close()
            raise

    def _open_files(self, writable):
        for fd in (self.data_fd, self.index_fd):
            if fd is not None:
                os.close(fd)
        self.data_fd = self.index_fd = None
        mode = os.O_RDWR if writable else os.O_RDONLY
        self.data_fd = _open_without_atime("data", mode, self.dir_fd)
        # A missing index is made empty, and so rebuilt: it is only an accelerator.
        self.index_fd = _open_without_atime("index", mode | os.O_CREAT, self.dir_fd)
        self.header = DataHeader.decode(os.pread(self.data_fd, DATA_HEADER_SIZE, 0), self.db.data_path)

    def _files_agree(self):
        """Whether the index ends exactly where the data's last intact batch ends (DISK-8's "agree").

        Sets data_end, entry_count and last_counter as it goes.
        Checking the last frame is enough: index entries are written only
        after their batch is durable, so an index that reaches the end of the
        data covers no torn batch. Past data_end the file holds zeros
        (allocated ahead by append) or a torn batch.
        """
        index_size = _file_size(self.index_fd)
        head = os.pread(self.index_fd, INDEX_HEADER.size, 0)
        if len(head) < INDEX_HEADER.size or head[:8] != INDEX_MAGIC:
            return False        # DISK-6: rebuilt from the data file
        if INDEX_HEADER.unpack(head)[1] != self.header.generation:
            return False        # DISK-6 too: the data file was replaced (DISK-9)
        if index_size % INDEX_ENTRY.size:
            return False
        self.entry_count = index_size // INDEX_ENTRY.size - 1
        self.last_counter = self.header.counter_floor
        self.last_record_counter = 0
        self.data_end = DATA_HEADER_SIZE
        if self.entry_count:
            counter, offset, length = self.entry(self.entry_count - 1)
            frame = _read_frame(self.data_fd, offset, length)
            if frame is None or frame.counter != counter or not frame.ends_batch:
                return False
            self.data_end = offset + length
            self.last_counter = max(counter, self.header.counter_floor)
            self.last_record_counter = counter
        return not os.pread(self.data_fd, FRAME.size, self.data_end).strip(b"\0")

    def entry(self, i):
        return INDEX_ENTRY.unpack(os.pread(self.index_fd, INDEX_ENTRY.size, _entry_position(i)))

    def _repair(self):
        """Bring the index and the data's tail into agreement, DISK-8's steps; log what changed.

        If the index's last entry is intact, the frames after it are indexed;
        otherwise the whole index is rebuilt from the data file, beside the
        old one, which snapshots may still be reading. A torn batch at the end
        is cut off. Everything is decided before anything changes: when the
        index lists records the data file does not hold intact, or when intact
        batches follow a damaged frame, the damaged records were acknowledged,
        so StorageError is raised and nothing is cut.
        """
        db = self.db
        file_size = _file_size(self.data_fd)
        index_size = _file_size(self.index_fd)
        head = os.pread(self.index_fd, INDEX_HEADER.size, 0)
        index_usable = (len(head) == INDEX_HEADER.size and head[:8] == INDEX_MAGIC
                        and INDEX_HEADER.unpack(head)[1] == self.header.generation)
        listed = max(index_size // INDEX_ENTRY.size - 1, 0) if index_usable else 0
        # Step 1: resume after the last entry if it is intact, else rebuild from the header.
        kept, previous = 0, None
        if listed:
            counter, offset, length = self.entry(listed - 1)
            previous = _read_frame(self.data_fd, offset, length)
            if previous is not None and previous.counter == counter:
                kept = listed
            else:
                previous = None
        resume_at = DATA_HEADER_SIZE if previous is None else previous.end
        expected_index = 0 if previous is None or previous.ends_batch else previous.batch_index + 1
        last_counter = 0 if previous is None else previous.counter
        entries, pending, good_end, scanned_end = array("Q"), array("Q"), resume_at, resume_at
        for frame in _scan_frames(self.data_fd, resume_at, file_size):
            if frame.batch_index != expected_index or frame.counter <= last_counter:
                break
            pending.extend((frame.counter, frame.offset, frame.length))
            last_counter, scanned_end = frame.counter, frame.end
            if frame.ends_batch:
                entries.extend(pending)
                del pending[:]
                good_end, expected_index = frame.end, 0
            else:
                expected_index += 1
        # Step 3 before step 2: broken acknowledged records are reported, and nothing is cut.
        found = kept + len(entries) // 3
        if found < listed:
            raise StorageError(db.data_path, f"the index lists {listed} records but the data file holds "
                               f"only {found} intact ones (shorter than the index says?)")
        if previous is not None and not previous.ends_batch and not entries:
            raise StorageError(db.data_path, f"the batch of counter {previous.counter} is listed "
                               "in the index but the rest of it is damaged")
        if _intact_batch_start_after(self.data_fd, scanned_end, file_size, last_counter):
            raise StorageError(db.data_path, f"damaged data at offset {scanned_end} is followed by "
                               "intact records")
        # Step 2: cut the data file after the last intact batch.
        if os.pread(self.data_fd, FRAME.size, good_end).strip(b"\0"):
            log.warning("%s: cut off a torn append at offset %d", db.data_path, good_end)
        if good_end < file_size:
            os.ftruncate(self.data_fd, good_end)
            sync_data(self.data_fd)
        # Step 1's index: written now that nothing was refused.
        if sys.byteorder == "big":
            entries.byteswap()
        if kept == 0:
            log.warning("%s: rebuilt the index from the data file", db.index_path)
            rebuilt = db.index_path + ".rebuilt"
            fd = os.open(rebuilt, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _pwrite_all(fd, INDEX_HEADER.pack(INDEX_MAGIC, self.header.generation, 0) + entries.tobytes(), 0)
                sync_data(fd)
            finally:
                os.close(fd)
            os.rename(rebuilt, db.index_path)
            _fsync_dir(db.path)
            self._open_files(writable=True)
        else:
            # Only bytes past every snapshot's view change here: a partly
            # written entry, and the entries of the batches just found.
            if entries:
                log.warning("%s: indexed %d records the index had not caught up with",
                            db.index_path, len(entries) // 3)
            elif index_size % INDEX_ENTRY.size:
                log.warning("%s: dropped a partly written index entry", db.index_path)
            _pwrite_all(self.index_fd, entries.tobytes(), _entry_position(kept))
            os.ftruncate(self.index_fd, _entry_position(kept + len(entries) // 3))
            sync_data(self.index_fd)
        if not self._files_agree():
            raise StorageError(db.data_path, "repair did not bring index and data into agreement")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        for fd in (self.index_fd, self.data_fd, self.dir_fd):
            if fd is not None:
                os.close(fd)
        self.dir_fd = self.data_fd = self.index_fd = None


@dataclasses.dataclass(frozen=True)
class PollState:
    """What an empty poll needs to know of a collection (a Snapshot knows it too)."""

    collection_id: str
    last_counter: int
    last_record_counter: int
    purge_horizon: int


class BoundedCache:
    """A mapping that forgets its least recently used entries once they take more than max_bytes.

    An entry's size is what its caller says it is. Safe to use from several
    threads. A cache whose keys come from requests, of any length, is one of
    these: bounded only in entries, it would grow with what requests put in
    its keys.
    """

    def __init__(self, max_bytes):
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries = collections.OrderedDict()     # key -> (value, size)
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key, value, size):
        with self._lock:
            replaced = self._entries.pop(key, None)
            self.bytes += size - (replaced[1] if replaced else 0)
            self._entries[key] = value, size
            while self.bytes > self.max_bytes:
                self.bytes -= self._entries.popitem(last=False)[1][1]


# Per process, the PollState of each collection read here, with the identity
# of the index file it was read from (inode, size, change time). Every
# acknowledged append grows the index, and every repair or replacement
# rewrites it or renames another in, so while that identity is unchanged the
# state is: a poll then answers with one stat() instead of opening the files.
POLL_STATE_BYTES = 32 << 20   # per process: some 50,000 collections at the longest paths, more at usual ones
POLL_STATE_OVERHEAD = 400     # bytes an entry takes besides its path: the tuples, the PollState, the id
_poll_states = BoundedCache(POLL_STATE_BYTES)


def _index_identity(path):
    status = os.stat(path)
    return status.st_ino, status.st_size, status.st_ctime_ns


class Snapshot:
    """A consistent view of a collection as it was when the snapshot was taken.

    Records appended later are not seen. The snapshot keeps the files open
    (not locked) until close(); use it as a context manager.
    """

    def __init__(self, files):
        self._files = files
        self.path = files.db.path
        self.collection_id = files.header.collection_id
        self.secret = files.header.secret
        self.purge_horizon = files.header.purge_horizon
        self.deleted = files.header.deleted
        self.last_counter = files.last_counter              # the newest counter given, record or not
        self.last_record_counter = files.last_record_counter  # the newest counter of a record held
        self.record_count = files.entry_count
        self._mapping = None    # of the data file, made by the first read of records

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self._mapping is not None:
            self._mapping.close()
        self._files.close()

    def hide_after(self, counter):
        """Show the records up to counter only, as if those after it were not there."""
        if counter < self.last_counter:
            self.record_count = self._first_entry_after(counter)
            self.last_counter = counter
            self.last_record_counter = self._files.entry(self.record_count - 1)[0] if self.record_count else 0

    def records_after(self, since=0, limit=None):
        """Iterate (counter, record) for records with counter > since, oldest first."""
        first = self._first_entry_after(since)
        stop = self.record_count if limit is None else min(self.record_count, first + limit)
        return itertools.chain.from_iterable(self._pages(first, stop))

    def _mapped(self, end):
        """The data file mapped into memory, checked to reach end.

        Large reads copy records straight out of a mapping: one copy fewer
        than pread() and then slicing. Small ones use pread(): mapping and
        unmapping a file costs more than copying a few kilobytes.
        """
        files = self._files
        if self._mapping is None:
            try:
                self._mapping = mmap.mmap(files.data_fd, files.data_end, access=mmap.ACCESS_READ)
            except ValueError:
                raise StorageError(files.db.data_path, "data file is shorter than the index says") from None
        # Reading a mapping past the end of its file kills the process
        # (SIGBUS), so a file cut short since the snapshot is an error here.
        if end > min(len(self._mapping), _file_size(files.data_fd)):
            raise StorageError(files.db.data_path, "data file is shorter than the index says")
        return self._mapping

    def _first_entry_after(self, since):
        """Index of the first entry whose counter is above since.

        Clients poll for the newest records, so the search gallops back from
        the end before it bisects: its cost grows with how far back `since`
        is, not with the size of the collection.
        """
        files, high = self._files, self.record_count
        if high == 0 or self.last_counter <= since:
            return high
        step = 1
        while high - step > 0 and files.entry(high - step)[0] > since:
            high, step = high - step, step * 2
        low = max(high - step, 0)
        while low < high:
            middle = (low + high) // 2
            if files.entry(middle)[0] > since:
                high = middle
            else:
                low = middle + 1
        return low

    def _pages(self, first, stop):
        """Yield, page by page, iterators of (counter, record) for entries first..stop-1.

        Each page is read with the entry before it, and every entry is checked
        against its neighbours (frames lie end to end, counters grow) by
        operations that loop in C. The first and last entries are also checked
        against their frames. So the records returned are exactly those after
        the entry before them, however the search that found it went. It
        stands for this loop, which took six times as long (100,000 records):

            previous = files.entry(first - 1) if first else None
            for i in range(first, stop):
                counter, offset, length = files.entry(i)
                if previous and (counter <= previous[0] or offset != previous[1] + previous[2] + FRAME.size):
                    raise StorageError(...)
                yield counter, data[offset:offset + length]
                previous = counter, offset, length
        """
        files = self._files
        for page_first in range(first, stop, READ_PAGE_ENTRIES):
            lead = 1 if page_first else 0
            count = min(READ_PAGE_ENTRIES, stop - page_first) + lead
            raw = os.pread(files.index_fd, count * INDEX_ENTRY.size, _entry_position(page_first - lead))
            if len(raw) != count * INDEX_ENTRY.size:
                raise StorageError(files.db.index_path, "index file is shorter than when the snapshot was taken")
            entries = array("Q", raw)
            if sys.byteorder == "big":
                entries.byteswap()
            counters, offsets, lengths = entries[0::3].tolist(), entries[1::3], entries[2::3]
            # Were the frames end to end, record i would run from bounds[2i] to
            # bounds[2i + 1]: the first offset, plus its length, plus a frame,
            # plus the next length... summed in C. The entries' offsets must be
            # those starts and their counters must grow (sorted and distinct).
            steps = array("Q", (0, FRAME.size)) * count
            steps[0::2] = lengths
            bounds = list(itertools.accumulate(steps, initial=offsets[0]))
            if (bounds[-1] >> 64 or array("Q", bounds[0:2 * count:2]) != offsets
                    or sorted(counters) != counters or len(set(counters)) != count):
                raise StorageError(files.db.index_path, f"damaged entries near entry {page_first}; "
                                   "deleting the index file makes the next open rebuild it")
            start, end = offsets[0] - FRAME.size, bounds[2 * count - 1]
            if end - start <= SMALL_READ and self._mapping is None:
                data, base = _pread_exactly(files.data_fd, end - start, start), start
                if len(data) < end - start:
                    raise StorageError(files.db.data_path, "data file is shorter than the index says")
            else:
                data, base = self._mapped(end), 0
            for i in (0, count - 1):
                if FRAME.unpack_from(data, offsets[i] - FRAME.size - base)[:2] != (counters[i], lengths[i]):
                    raise StorageError(files.db.index_path,
                                       f"entry {page_first - lead + i} disagrees with the data file")
            edges = iter(bounds)    # zip(edges, edges) pairs them up; the lone last item ends it
            if lead:
                next(edges), next(edges)    # the entry before the page: read only to be checked
            if base:
                records = [data[a - base:b - base] for a, b in zip(edges, edges)]
            else:
                records = [data[a:b] for a, b in zip(edges, edges)]
            # zip() makes each (counter, record) pair in C, and reuses the tuple
            # when the reader lets go of it, as a streaming reader does.
            yield zip(counters[lead:], records)


class UnwrittenSnapshot:
    """The Snapshot of a collection never written: empty, with its first collection_id; no file behind it."""

    secret = deleted = None
    purge_horizon = last_counter = last_record_counter = record_count = 0

    def __init__(self, path, collection_id):
        self.path, self.collection_id = path, collection_id

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def close(self):
        pass

    def hide_after(self, counter):
        pass

    def records_after(self, since=0, limit=None):
        return iter(())


class _ReplacementWriter:
    """Writes a whole new data file and index beside the live ones, then swaps them in.

    Garbage collection, import and creation all replace a collection this way,
    so a reader never meets a half-written file: it holds the old inodes open,
    or opens the new ones after the rename. The data file is renamed first; a
    crash between the two renames leaves an index of the old generation,
    which the next open rebuilds from the new data file.
    """

    def __init__(self, db):
        self.db = db
        self.data_fd = os.open(db.data_path + ".new", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.index_fd = os.open(db.index_path + ".new", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.position = DATA_HEADER_SIZE    # the header is written last, when it is known
        self.record_count = 0
        self.frames, self.entries = [], array("Q")

    def add(self, counter, record, appended_at, batch_index=0, batch_count=1):
        self.frames += (_pack_frame(counter, record, appended_at, batch_index, batch_count), record)
        self.entries.extend((counter, self.position + FRAME.size, len(record)))
        self.position += FRAME.size + len(record)
        self.record_count += 1
        if len(self.entries) >= 3 * READ_PAGE_ENTRIES:
            self._flush()

    def add_received(self, frame):
        """Index a frame that is already in place in the new data file."""
        self.entries.extend((frame.counter, frame.offset, frame.length))
        self.position = frame.end
        self.record_count += 1
        if len(self.entries) >= 3 * READ_PAGE_ENTRIES:
            self._flush()

    def _flush(self):
        written = self.position - sum(map(len, self.frames))
        _pwrite_all(self.data_fd, b"".join(self.frames), written)
        if sys.byteorder == "big":
            self.entries.byteswap()
        _pwrite_all(self.index_fd, self.entries.tobytes(),
                  _entry_position(self.record_count - len(self.entries) // 3))
        self.frames, self.entries = [], array("Q")

    def sync(self):
        """Make what was added so far durable, so that install() has little left to sync."""
        try:
            self._flush()
            sync_data(self.data_fd)
            sync_data(self.index_fd)
        except BaseException:
            self.abandon()
            raise

    def install(self, header):
        """Sync the new files and rename them over the old, data first (DISK-9; the caller holds the exclusive lock)."""
        try:
            self._flush()
            _pwrite_all(self.data_fd, header.encode(), 0)
            _pwrite_all(self.index_fd, INDEX_HEADER.pack(INDEX_MAGIC, header.generation, 0), 0)
            sync_data(self.data_fd)
            sync_data(self.index_fd)
        except BaseException:
            self.abandon()
            raise
        self._close()
        os.rename(self.db.data_path + ".new", self.db.data_path)
        os.rename(self.db.index_path + ".new", self.db.index_path)
        _fsync_dir(self.db.path)

    def abandon(self):
        self._close()
        for path in (self.db.data_path + ".new", self.db.index_path + ".new"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _close(self):
        for fd in (self.data_fd, self.index_fd):
            if fd is not None:
                os.close(fd)
        self.data_fd = self.index_fd = None


class AppendOnlyDB:
    """One collection's durable, ordered stream of records (bytes), in one directory.

    Counters grow strictly and are never reused, even when garbage
    collection removes the newest records. Without a first_id, the first use
    creates the collection, with a random collection_id. With one (the
    server's collections have one, see DataDir), a collection that was never
    written is an empty one with that collection_id, and reading it creates
    nothing: its first write creates it, keeping that id (GET-1, LIMIT-2).
    """

    def __init__(self, path, first_id=None):
        self.path = os.path.abspath(path)
        self.first_id = first_id
        self.data_path = os.path.join(self.path, "data")
        self.index_path = os.path.join(self.path, "index")
        self.blobs_path = os.path.join(self.path, "blobs")

    def exists(self):
        return os.path.exists(self.data_path)

    def _open(self, exclusive):
        """The collection's files, opened and checked; a new collection is made first."""
        try:
            return _OpenCollection(self, exclusive)
        except FileNotFoundError:
            # Found by trying, not by stat(): a stat() of the data file before
            # an append makes its fdatasync slower (see _file_size).
            self.create()
            return _OpenCollection(self, exclusive)

    def create(self):
        """Make the collection, empty, if it does not exist (with its first_id, if it has one)."""
        _make_dirs_durably(self.path)
        # The maintenance lock keeps this from clobbering an import's data.new.
        with self.maintenance(), self.locked():
            if not self.exists():
                header = DataHeader.new()
                if self.first_id is not None:
                    header = dataclasses.replace(header, collection_id=self.first_id)
                _ReplacementWriter(self).install(header)

    @contextlib.contextmanager
    def locked(self):
        """Hold the collection directory's lock exclusively, without opening its files."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def snapshot(self, create=True):
        """A Snapshot of the collection; one never written is created first (if create), unless it has a first_id."""
        if self.first_id is not None and not self.exists():
            snapshot = UnwrittenSnapshot(self.path, self.first_id)
            self._remember(None, snapshot)
            return snapshot
        files = self._open(exclusive=False) if create else _OpenCollection(self, exclusive=False)
        try:
            snapshot = Snapshot(files)
            # Under the shared lock no writer can change the index, so the
            # path names the very file this state was read from.
            self._remember(_index_identity(self.index_path), snapshot)
        except BaseException:
            files.close()
            raise
        fcntl.flock(files.dir_fd, fcntl.LOCK_UN)    # the snapshot reads without it
        return snapshot

    def _remember(self, identity, snapshot):
        state = PollState(snapshot.collection_id, snapshot.last_counter, snapshot.last_record_counter,
                          snapshot.purge_horizon)
        _poll_states.put(self.path, (identity, state), sys.getsizeof(self.path) + POLL_STATE_OVERHEAD)

    def poll_state(self):
        """The PollState last read here, if the index is still the file it was read from; else None.

        The state of a collection never written is remembered with the
        identity None: it holds while neither of its files exists.
        """
        remembered = _poll_states.get(self.path)
        if remembered is None:
            return None
        try:
            identity = _index_identity(self.index_path)
        except FileNotFoundError:
            identity = None if not self.exists() else "unindexed"
        return remembered[1] if remembered[0] == identity else None

    def append(self, records, if_last_counter=None, ignore_newer=None, if_collection_id=None, now=None,
               before_write=None, after_write=None):
        """Store records (a list of bytes) as one batch; return their counters.

        All of them are stored or none. With if_last_counter, the batch is
        stored only if that counter is one the collection has given, is not
        below its purge horizon, and no record newer than it exists (except
        those for which ignore_newer(counter, record) is true); with
        if_collection_id, only if that is the collection's id. Otherwise
        AppendConflict is raised. Returns once the records are on disk.
        Under the writer lock, before_write(secret) is called once the checks
        have passed (False refuses the append as a conflict), and
        after_write(secret) once the batch is durable: the collection's secret,
        so that they can name its files (the blobs use them).
        """
        if not isinstance(records, (list, tuple)) or not all(isinstance(r, bytes) for r in records):
            raise TypeError("records must be a list of bytes")
        if self.first_id is not None and not self.exists():
            # Refused, or with nothing to store, a write leaves a collection never written as it is.
            if (if_collection_id not in (None, self.first_id)) or (if_last_counter or 0) > 0:
                raise AppendConflict(0, self.first_id)
            if not records:
                return []
        appended_at = int(time.time() if now is None else now)
        files = self._open(exclusive=True)
        view = Snapshot(files)          # closing it closes the files
        try:
            if if_collection_id is not None and if_collection_id != files.header.collection_id:
                raise AppendConflict(files.last_counter, files.header.collection_id)
            if if_last_counter is not None and (0 < if_last_counter < files.header.purge_horizon
                                                or if_last_counter > files.last_counter):
                # Below the horizon the caller may have missed a delete; past
                # the newest counter it claims to have seen what never was.
                raise AppendConflict(files.last_counter, files.header.collection_id)
            if if_last_counter is not None and files.last_record_counter > if_last_counter:
                newer = view.records_after(if_last_counter)
                if ignore_newer is None or not all(itertools.starmap(ignore_newer, newer)):
                    raise AppendConflict(files.last_counter, files.header.collection_id)
            if not records:
                return []
            if before_write is not None and not before_write(files.header.secret):
                raise AppendConflict(files.last_counter, files.header.collection_id)
            counters = range(files.last_counter + 1, files.last_counter + 1 + len(records))
            _write_batch(files, zip(counters, records), appended_at, self.index_path)
            if after_write is not None:
                after_write(files.header.secret)
            return list(counters)
        finally:
            view.close()

    def append_copied(self, numbered, after, collection_id, before_write=None, after_write=None):
        """Store records another copy numbered, [(counter, bytes)], the counters above `after` (CLUSTER-8).

        This copy must be of collection_id and hold it up to `after` at
        least, else AppendConflict (it is behind, or holds another state).
        Records it already holds are skipped: every copy of a collection is
        a prefix of its owner's, so one it holds is the same record. Returns
        the copy's last counter; before_write and after_write as for append.
        """
        if not self.exists():
            raise AppendConflict(0, None)
        with _OpenCollection(self, exclusive=True) as files:
            if files.header.collection_id != collection_id or files.last_counter < after:
                raise AppendConflict(files.last_counter, files.header.collection_id)
            fresh = [(counter, record) for counter, record in numbered if counter > files.last_counter]
            if not fresh:
                return files.last_counter
            if before_write is not None and not before_write(files.header.secret):
                raise AppendConflict(files.last_counter, files.header.collection_id)
            _write_batch(files, fresh, int(time.time()), self.index_path)
            if after_write is not None:
                after_write(files.header.secret)
            return fresh[-1][0]

    def delete(self, reason=None, before_write=None):
        """Replace the collection by an empty one with a new collection_id; return that id.

        Counters go on from where they were, one higher, so that the deleted
        state is newer than the one before it by its last counter, as every
        later state of a collection is (copies are compared so, CLUSTER-8).
        The new header remembers the reason until the collection is written again.
        """
        self.create()                   # a delete is a write: the collection exists from now on
        with self.maintenance():
            writer = _ReplacementWriter(self)
            try:
                with _OpenCollection(self, exclusive=True) as live:
                    if before_write is not None:
                        before_write()
                    header = dataclasses.replace(
                        DataHeader.new(), generation=live.header.generation + 1,
                        counter_floor=live.last_counter + 1, purge_horizon=0, deleted={"reason": reason})
                    writer.install(header)
                    # An upload racing this may leave a file behind; its append
                    # is refused (the id changed) and gc removes the file.
                    shutil.rmtree(self.blobs_path, ignore_errors=True)
            except BaseException:
                writer.abandon()
                raise
        return header.collection_id

    @contextlib.contextmanager
    def maintenance(self):
        """Serialise the operations that replace files (gc, import, delete) with each other (DISK-10)."""
        fd = os.open(os.path.join(self.path, "maintenance.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _write_batch(files, numbered, appended_at, index_path):
    """Append [(counter, record)] to the open collection as one batch, durably (DISK-7)."""
    numbered = list(numbered)
    batch, entries, count = bytearray(), array("Q"), len(numbered)
    for i, (counter, record) in enumerate(numbered):
        batch += _pack_frame(counter, record, appended_at, i, count)
        entries.extend((counter, files.data_end + len(batch), len(record)))
        batch += record
    position = files.data_end + len(batch)
    if position > _file_size(files.data_fd):
        batch += bytes(_allocation_ahead(position))
    if sys.byteorder == "big":
        entries.byteswap()
    # [DISK-7] The commit point: once the frames are synced the batch is
    # durable, and only then may the index point at it.
    _pwrite_all(files.data_fd, batch, files.data_end)
    sync_data(files.data_fd)
    try:
        _pwrite_all(files.index_fd, entries.tobytes(), _entry_position(files.entry_count))
    except OSError:
        # The batch is durable and the next open will index it, but it is
        # not acknowledged: an acknowledged append always grows the index
        # (poll_state relies on it). A retry stores a newer copy of the same
        # objects, which the model allows.
        log.warning("%s: counters %d..%d are stored but not yet indexed", index_path,
                    numbered[0][0], numbered[-1][0])
        raise


###############################################################################
# Blobs: attachments kept beside the stream
###############################################################################
# A record may carry a blob (SPEC.md BLOB-*, DISK-13), bytes too large to send with
# every sync. Its bytes live in the collection directory as
# blobs/<key>/<nonce>: key is an HMAC of the record's (type, id) under the
# collection's secret, nonce is random, and the blob's name is "<key>-<nonce>".
# So a name cannot be guessed, it proves which object owns the blob, and the
# blobs of one object are one small directory.
#
# A blob file is a 512-byte header (magic, then space-padded JSON giving
# content_type, length and sha256), then the bytes. The bytes are written as
# <nonce>.partial and synced before the append that names the blob takes the
# writer lock; under the lock they are renamed into place and the directory
# is synced, and only then is the record written. So no record ever names a
# missing or half-written blob. Once the batch is durable, still under the
# lock, the other blobs of every object it wrote are deleted (an update
# without a blob, or a tombstone, deletes them all). A crash leaves at worst
# .partial files or blobs no record names, and garbage collection removes both.

BLOB_MAGIC = b"CUTOUTBL"
BLOB_HEADER_SIZE = 512
# blob-name = key "-" nonce, key = nonce = 32( %x30-39 / %x61-66 )   (lower-case hex, DISK-13)
BLOB_NAME = re.compile(r"([0-9a-f]{32})-([0-9a-f]{32})\Z")
BLOB_CHUNK = 256 << 10            # bytes read or written at a time
STALE_PARTIAL_SECONDS = 3600      # a .partial file older than this is a crash's leftover


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """What a blob file's header says of its bytes."""

    content_type: str
    length: int
    sha256: str     # hex digest of the bytes

    def encode(self):
        return _encode_header(BLOB_MAGIC, BLOB_HEADER_SIZE, self)

    @classmethod
    def decode(cls, raw, path):
        _check_magic(raw, BLOB_MAGIC, BLOB_HEADER_SIZE, path, "blob file")
        try:
            info = cls(**json.loads(raw[len(BLOB_MAGIC):BLOB_HEADER_SIZE]))
        except (ValueError, TypeError) as error:
            raise StorageError(path, f"unreadable blob header: {error}") from None
        if not (isinstance(info.content_type, str) and info.content_type.isascii() and info.content_type.isprintable()
                and type(info.length) is int and info.length >= 0
                and isinstance(info.sha256, str) and len(info.sha256) == 64):
            raise StorageError(path, "unreadable blob header: bad content_type, length or sha256")
        return info


def blob_key(secret, type_, id_):
    """The key of (type, id)'s blobs: an HMAC under the collection's secret, 32 hex digits."""
    name = json.dumps([type_, id_], separators=(",", ":"), ensure_ascii=False).encode()
    return hmac.new(secret.encode(), name, hashlib.sha256).hexdigest()[:32]


def _named_blob(obj):
    """The name of the blob a stored object names, or None."""
    blob = obj.get("blob") if isinstance(obj, dict) else None
    href = blob.get("href") if isinstance(blob, dict) else None
    return href.rpartition("/")[2] if isinstance(href, str) else None


def _blob_name_of(record):
    """The name of the blob a stored record names, or None."""
    if b'"href"' not in record:     # most records carry no blob: skip parsing them
        return None
    try:
        return _named_blob(json.loads(record))
    except ValueError:
        return None


def _write_blob_file(path, content_type, chunks):
    """Write the bytes of chunks as a blob file at path, synced; return its BlobInfo.

    The file is removed again if anything fails, a bad chunk included.
    """
    directory = os.path.dirname(path)
    for attempt in range(3):
        _make_dirs_durably(directory)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileNotFoundError:
            # Garbage collection removed the empty directory between the two.
            if attempt == 2:
                raise
    try:
        digest, length = hashlib.sha256(), 0
        for chunk in chunks:
            _pwrite_all(fd, chunk, BLOB_HEADER_SIZE + length)
            digest.update(chunk)
            length += len(chunk)
        info = BlobInfo(content_type, length, digest.hexdigest())
        _pwrite_all(fd, info.encode(), 0)
        sync_data(fd)
        return info
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


class BlobBatch:
    """The blobs one append brings, and the objects whose other blobs it ends.

    The protocol fills it (upload, existing, owner) before it appends; the
    append commits it under the writer lock and prunes after the batch is
    durable; discard() removes whatever was uploaded but not committed.
    """

    def __init__(self, db):
        self.db = db
        self.secret = None          # the collection's, read at the first upload
        self.uploads = []           # (path of the .partial file, path to rename it to)
        self.owners = []            # (type, id, nonce of the blob it keeps or None), per record
        self.kept_paths = []        # of the blobs existing() found, to be found again under the lock

    def key(self, type_, id_):
        if self.secret is None:
            self.db.create()            # an upload is a write: its collection's secret keys it
            with self.db.snapshot() as snapshot:
                self.secret = snapshot.secret
        return blob_key(self.secret, type_, id_)

    def upload(self, type_, id_, content_type, chunks):
        """Write a new blob of (type, id) from chunks of bytes; return (its name, BlobInfo)."""
        key, nonce = self.key(type_, id_), secrets.token_hex(16)
        path = os.path.join(self.db.blobs_path, key, nonce)
        info = _write_blob_file(path + ".partial", content_type, chunks)
        self.uploads.append((path + ".partial", path))
        return f"{key}-{nonce}", info

    def existing(self, type_, id_, name):
        """The BlobInfo of the blob called name if it is one of (type, id)'s, else None."""
        match = BLOB_NAME.match(name or "")
        if match is None or match.group(1) != self.key(type_, id_):
            return None
        info = blob_info(self.db, name)
        if info is not None:
            self.kept_paths.append(os.path.join(self.db.blobs_path, *match.groups()))
        return info

    def owner(self, type_, id_, name=None):
        """Record that the batch writes (type, id), keeping its blob called name, if any."""
        self.owners.append((type_, id_, name and name.partition("-")[2]))

    def commit(self, secret):
        """Rename the uploads into place and sync them (the caller holds the writer lock).

        False if the collection was deleted or replaced since the blobs were
        keyed (its secret is another), or a kept blob was deleted since
        existing() found it: then nothing is done.
        """
        if self.secret is not None and secret != self.secret or not all(map(os.path.exists, self.kept_paths)):
            return False
        for partial, final in self.uploads:
            os.rename(partial, final)
        for directory in {os.path.dirname(final) for _, final in self.uploads}:
            _fsync_dir(directory)
        self.uploads = []
        return True

    def prune(self, secret):
        """Delete the blobs the batch's records no longer name (the caller holds the writer lock)."""
        if not os.path.isdir(self.db.blobs_path):
            return
        newest = {blob_key(secret, type_, id_): kept for type_, id_, kept in self.owners}
        for key, kept in newest.items():
            try:
                with os.scandir(os.path.join(self.db.blobs_path, key)) as entries:
                    ended = [entry.path for entry in entries
                             if entry.name != kept and not entry.name.endswith(".partial")]
                for path in ended:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as error:    # garbage collection removes what is left
                log.warning("%s: could not delete an ended blob: %s", self.db.path, error)

    def discard(self):
        for partial, _ in self.uploads:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
        self.uploads = []


def open_blob(db, name):
    """(BlobInfo, file) of the blob called name, the file at its first byte; or None."""
    match = BLOB_NAME.match(name)
    if match is None:
        return None
    path = os.path.join(db.blobs_path, *match.groups())
    try:
        blob = open(path, "rb")
    except FileNotFoundError:
        return None
    try:
        info = BlobInfo.decode(blob.read(BLOB_HEADER_SIZE), path)
        if os.fstat(blob.fileno()).st_size != BLOB_HEADER_SIZE + info.length:
            raise StorageError(path, "the blob file is not as long as its header says")
    except BaseException:
        blob.close()
        raise
    return info, blob


def blob_info(db, name):
    """The BlobInfo of the blob called name, or None if there is none."""
    found = open_blob(db, name)
    if found is None:
        return None
    found[1].close()
    return found[0]


def _sweep_blobs(db, named):
    """Delete every blob not in named, and stale .partial files; return how many.

    The caller holds the writer lock, so no append is between renaming
    its blobs into place and writing the records that name them.
    """
    removed, stale = 0, time.time() - STALE_PARTIAL_SECONDS
    try:
        keys = os.scandir(db.blobs_path)
    except FileNotFoundError:
        return 0
    with keys:
        for key in keys:
            # An upload going on beside this deletes its own .partial file when it fails.
            with contextlib.suppress(FileNotFoundError), os.scandir(key.path) as blobs:
                for blob in blobs:
                    with contextlib.suppress(FileNotFoundError):
                        if (blob.stat().st_mtime > stale if blob.name.endswith(".partial")
                                else f"{key.name}-{blob.name}" in named):
                            continue
                        os.unlink(blob.path)
                        removed += 1
            with contextlib.suppress(OSError):     # not empty: it holds a kept blob or an upload
                os.rmdir(key.path)
    return removed


def _blob_paths(db):
    """(key, nonce, path) of every blob in place, in a stable order."""
    try:
        keys = sorted(os.listdir(db.blobs_path))
    except FileNotFoundError:
        return
    for key in keys:
        for nonce in sorted(os.listdir(os.path.join(db.blobs_path, key))):
            if not nonce.endswith(".partial"):
                yield key, nonce, os.path.join(db.blobs_path, key, nonce)


###############################################################################
# Maintenance: garbage collection, export and import of a collection
###############################################################################
# Garbage collection, export and import each replace a collection's files whole
# (DISK-9): they write data.new and index.new beside the live files, sync them,
# and rename them into place under the collection's lock, while readers and
# writers go on with the old ones. One at a time runs on a collection, under
# maintenance.lock (DISK-10). They are the only code that reads a collection
# whole, and none of it is on the path of an answer.

# A record's fate in garbage collection. Dropping the newest record of a
# (type, id) that replaced an older one hides a change from clients that saw
# the older one, so _PURGED and _EXPIRED_HIDING raise the purge horizon.
_KEEP = 1
_REPLACED = 2          # a later record has the same (type, id)
_EXPIRED = 3           # the newest of its (type, id), and the first: no client misses anything
_EXPIRED_HIDING = 4    # the newest of its (type, id), replacing an older one
_PURGED = 5            # the newest of its (type, id), a tombstone older than the purge time


@dataclasses.dataclass
class GarbageReport:
    """What one garbage collection of one collection did."""

    path: str
    records_before: int = 0
    records_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    replaced: int = 0      # records replaced by a later record of the same (type, id)
    expired: int = 0       # records whose `expires` had passed
    tombstones_purged: int = 0
    purge_horizon: int = 0
    blobs_removed: int = 0     # blobs no kept record names, and crashed uploads
    seconds: float = 0.0

    @property
    def removed(self):
        return self.records_before - self.records_after


def collect_garbage(db, now=None, purge_tombstones_before=None):
    """Drop the records no client needs any more (DISK-11); return a GarbageReport.

    A record goes when a later record has the same (type, id) or when its
    `expires` (unix seconds) has passed. The newest tombstone of each
    (type, id) stays, unless it was appended before purge_tombstones_before
    (unix seconds): then it goes too, and the collection's purge_horizon
    rises to its counter so that the protocol can send a client whose
    `since` is older back to the start instead of letting it miss the
    delete. Records that are not JSON objects with an `id` are kept.
    Kept records keep their counters.

    Readers and writers go on while it runs; it holds the lock only to
    copy what was appended meanwhile and to swap the files.
    """
    report = GarbageReport(db.path)
    if not db.exists():
        return report
    now = time.time() if now is None else now
    started = time.perf_counter()
    with db.maintenance(), db.snapshot(create=False) as snapshot:
        files = snapshot._files
        report.records_before = report.records_after = snapshot.record_count
        report.bytes_before = report.bytes_after = files.data_end
        report.purge_horizon = horizon = files.header.purge_horizon
        blob_names = {}
        fates = _decide_fates(files, now, purge_tombstones_before, report, blob_names)
        named = {name for position, name in blob_names.items() if fates[position] == _KEEP}
        if fates.count(_KEEP) == len(fates):
            # Nothing to drop: the files stay as they are, and only blobs may go.
            if os.path.isdir(db.blobs_path):
                with _OpenCollection(db, exclusive=True) as live:
                    named.update(_blob_name_of(frame.record)
                                 for frame in _scan_frames(live.data_fd, files.data_end, live.data_end))
                    report.blobs_removed = _sweep_blobs(db, named)
            report.seconds = time.perf_counter() - started
            return report
        writer = _ReplacementWriter(db)
        try:
            frames = _scan_frames(files.data_fd, DATA_HEADER_SIZE, files.data_end)
            for frame, fate in zip(frames, fates):
                if fate == _KEEP:
                    # Survivors of a batch no longer form it, so each becomes a batch of one.
                    writer.add(frame.counter, frame.record, frame.appended_at)
                elif fate in (_PURGED, _EXPIRED_HIDING):
                    horizon = max(horizon, frame.counter)
            writer.sync()       # the bulk, before readers and writers are held up
            with _OpenCollection(db, exclusive=True) as live:
                if live.header.generation != files.header.generation:
                    raise StorageError(db.path, "replaced while garbage was being collected")
                late = live.entry_count - snapshot.record_count
                for frame in itertools.islice(_scan_frames(live.data_fd, files.data_end, live.data_end), late):
                    writer.add(frame.counter, frame.record, frame.appended_at,
                               frame.batch_index, frame.batch_count)
                    named.add(_blob_name_of(frame.record))
                if writer.record_count != fates.count(_KEEP) + late:
                    raise StorageError(db.data_path, "a record appended during garbage collection is damaged")
                report.records_before += late
                report.records_after = writer.record_count
                report.bytes_before, report.bytes_after = live.data_end, writer.position
                report.purge_horizon = horizon
                writer.install(dataclasses.replace(
                    live.header, generation=live.header.generation + 1,
                    counter_floor=live.last_counter, purge_horizon=horizon,
                    deleted=None if live.entry_count else live.header.deleted))
                report.blobs_removed = _sweep_blobs(db, named)
        except BaseException:
            writer.abandon()
            raise
    report.seconds = time.perf_counter() - started
    return report


def _decide_fates(files, now, purge_tombstones_before, report, blob_names):
    """One fate per record, in order (see _KEEP and the rest); fills report's counts.

    Fills blob_names with {position: name} of the records that name a blob.
    Memory: one byte per record plus one dict entry per (type, id), about
    150 bytes; never the records themselves.
    """
    fates = bytearray()
    # A 16-byte digest keeps memory per key small; two keys colliding, which
    # would lose a record, is as likely as guessing a random 128-bit number.
    newest = {}                  # digest of (type, id) -> position of its newest record
    for position, frame in enumerate(_scan_frames(files.data_fd, DATA_HEADER_SIZE, files.data_end)):
        try:
            obj = json.loads(frame.record)
            key = hashlib.blake2b(json.dumps([obj.get("type"), obj["id"]]).encode(), digest_size=16).digest()
        except (ValueError, TypeError, KeyError, AttributeError):
            fates.append(_KEEP)
            continue
        older = newest.get(key)
        if older is not None:
            fates[older] = _REPLACED
        if "blob" in obj:
            blob_names[position] = _named_blob(obj)
        expires = obj.get("expires")
        if isinstance(expires, (int, float)) and not isinstance(expires, bool) and expires <= now:
            fates.append(_EXPIRED if older is None else _EXPIRED_HIDING)
        elif (obj.get("deleted") is True and purge_tombstones_before is not None
              and frame.appended_at < purge_tombstones_before):
            fates.append(_PURGED)
        else:
            fates.append(_KEEP)
        newest[key] = position
    if len(fates) != files.entry_count:
        raise StorageError(files.db.data_path, f"record {len(fates) + 1} is damaged (CRC or frame)")
    report.replaced = fates.count(_REPLACED)
    report.expired = fates.count(_EXPIRED) + fates.count(_EXPIRED_HIDING)
    report.tombstones_purged = fates.count(_PURGED)
    return fates


def export_collection(db, out):
    """Write the collection to the binary file out as a tar stream: `data`, `index`, then its blobs (DISK-12).

    The export holds the lock shared while it is written, so appends wait
    for it and it is one state of the collection, blobs included.
    """
    with _OpenCollection(db, exclusive=False) as files, tarfile.open(fileobj=out, mode="w|") as tar:
        members = [("data", os.dup(files.data_fd), files.data_end),
                   ("index", os.dup(files.index_fd), _entry_position(files.entry_count))]
        members += ((f"blobs/{key}/{nonce}", os.open(path, os.O_RDONLY), None)
                    for key, nonce, path in _blob_paths(db))
        for name, fd, size in members:
            info = tarfile.TarInfo(name)
            info.size = _file_size(fd) if size is None else size
            info.mode, info.mtime = 0o600, int(time.time())
            with os.fdopen(fd, "rb") as member:
                member.seek(0)
                tar.addfile(info, member)


def import_collection(db, stream, copy=False):
    """Replace the collection by the one exported to stream; all at once or not at all (DISK-12).

    Every frame is verified and the index must match the data. The old copy
    serves reads and writes until the new one is complete; writes made to
    it meanwhile are replaced with it. The exported collection_id is kept,
    unless the collection here has that id and is newer or unreadable: then
    the import restores an older state, so it gets a new collection_id (and
    counters above the old ones) and clients read it again from the start.
    With copy (a node receiving another node's copy, CLUSTER-9), the header
    is kept as it is, and the import is made only if it is newer than the
    collection here, by its last counter. Returns whether it was made.
    Raises StorageError if the stream is not a whole, intact export.
    """
    _make_dirs_durably(db.path)
    with db.maintenance():
        writer, blobs = _ReplacementWriter(db), []
        try:
            header, imported_last = _receive(db, stream, writer, blobs)
            writer.sync()
            with contextlib.ExitStack() as lock:
                try:
                    live = lock.enter_context(_OpenCollection(db, exclusive=True))
                    live_header, live_last = live.header, live.last_counter
                except (FileNotFoundError, StorageError):
                    # Missing or damaged: restoring a damaged copy is what import is for.
                    lock.enter_context(db.locked())
                    live_header, live_last = _readable_header(db), None
                if copy and live_last is not None and live_last >= imported_last:
                    writer.abandon()
                    _discard_partials(blobs)
                    return False
                if live_header is not None:
                    header = dataclasses.replace(header, generation=max(header.generation,
                                                                        live_header.generation) + 1)
                    if not copy and live_header.collection_id == header.collection_id and (
                            live_last is None or live_last > imported_last):
                        header = dataclasses.replace(
                            header, collection_id=DataHeader.new().collection_id,
                            counter_floor=max(header.counter_floor, live_last or 0, imported_last))
                # The blobs first, so that no record is ever installed without its blob.
                for partial, final in blobs:
                    os.rename(partial, final)
                for directory in {os.path.dirname(final) for _, final in blobs}:
                    _fsync_dir(directory)
                writer.install(header)
                _sweep_blobs(db, {"-".join(final.split(os.sep)[-2:]) for _, final in blobs})
                return True
        except BaseException:
            writer.abandon()
            _discard_partials(blobs)
            raise


def _discard_partials(blobs):
    for partial, _ in blobs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def _receive_blob(db, member, source):
    """Write an exported blob as a .partial file, checked; return (its path, the path it goes to)."""
    parts = member.name.split("/")
    if not (member.isfile() and len(parts) == 3 and parts[0] == "blobs"
            and BLOB_NAME.match(f"{parts[1]}-{parts[2]}")):
        raise StorageError(db.path, f"an export holds only data, index and blobs, not {member.name!r}")
    final = os.path.join(db.blobs_path, parts[1], parts[2])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(final + ".partial")       # left by an import that crashed
    exported = BlobInfo.decode(source.read(BLOB_HEADER_SIZE), f"{db.path} (import of {member.name})")
    written = _write_blob_file(final + ".partial", exported.content_type,
                               iter(functools.partial(source.read, BLOB_CHUNK), b""))
    if written != exported:
        os.unlink(final + ".partial")
        raise StorageError(db.path, f"the exported blob {member.name} is damaged")
    return final + ".partial", final


def _readable_header(db):
    """The data file's header, or None if there is none that can be read."""
    try:
        fd = os.open(db.data_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return DataHeader.decode(os.pread(fd, DATA_HEADER_SIZE, 0), db.data_path)
    except StorageError:
        return None
    finally:
        os.close(fd)


def _receive(db, stream, writer, blobs):
    """Read an export into writer, checking all of it; return its header and last counter.

    Its blobs are written as .partial files in place; blobs gets
    (partial path, final path) of each.
    """
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            members = iter(tar)
            data_member = next(members, None)
            if data_member is None or data_member.name != "data" or not data_member.isfile():
                raise StorageError(db.path, "an export starts with its data file")
            data = tar.extractfile(data_member)
            header = DataHeader.decode(data.read(DATA_HEADER_SIZE), f"{db.path} (import)")
            _pwrite_all(writer.data_fd, header.encode(), 0)
            received = DATA_HEADER_SIZE
            while chunk := data.read(SCAN_CHUNK):
                _pwrite_all(writer.data_fd, chunk, received)
                received += len(chunk)
            index_member = next(members, None)
            if index_member is None or index_member.name != "index" or not index_member.isfile():
                raise StorageError(db.path, "an export ends with its index")
            exported_index = tar.extractfile(index_member).read()
            for member in members:
                blobs.append(_receive_blob(db, member, tar.extractfile(member)))
    except tarfile.TarError as error:
        raise StorageError(db.path, f"not a readable export: {error}") from None
    last_counter, expected_index = 0, 0
    for frame in _scan_frames(writer.data_fd, DATA_HEADER_SIZE, received):
        if frame.batch_index != expected_index or frame.counter <= last_counter:
            break
        writer.add_received(frame)
        last_counter, expected_index = frame.counter, 0 if frame.ends_batch else expected_index + 1
    if writer.position != received or expected_index:
        raise StorageError(db.path, f"the exported data is damaged at offset {writer.position}")
    writer._flush()
    if exported_index[INDEX_HEADER.size:] != os.pread(writer.index_fd, len(exported_index), 0)[
            INDEX_HEADER.size:] or len(exported_index) != _entry_position(writer.record_count):
        raise StorageError(db.path, "the exported index does not match its data")
    return header, max(last_counter, header.counter_floor)


###############################################################################
# The data directory: one collection directory per (domain, user, bucket)
###############################################################################
# A collection lives at DATA_DIR/<domain>/<user>/<bucket>/, each part escaped
# by escape_name(). Escaped names use only letters, digits and "-_.@+", never
# start with ".", and are at most MAX_NAME_BYTES long, so no name (`..`, a
# slash, NUL, a very long or unicode name) can reach outside the data directory.

SAFE_NAME_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.@+")
MAX_NAME_BYTES = 200    # escaped bytes per path part; filesystems allow 255


def escape_name(name):
    """The directory name for one part of a collection's path (DISK-1).

    Bytes outside SAFE_NAME_BYTES, and a leading ".", become %XX. A name whose
    escaped form is too long keeps a readable prefix and ends in "~" and a
    hash of the whole name ("~" is otherwise always escaped, so the two kinds
    of names cannot collide). Raises ValueError for an empty name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a collection path part must be a non-empty string")
    raw = name.encode("utf-8")      # a lone surrogate raises UnicodeEncodeError, a ValueError
    # Each byte escapes to one character or more, so of a name longer than
    # MAX_NAME_BYTES only a prefix is kept, and its first bytes are enough to
    # make it: escaping all 60,000 of a long name took 11 ms.
    escaped = "".join(chr(b) if b in SAFE_NAME_BYTES and not (i == 0 and b == ord(".")) else f"%{b:02X}"
                      for i, b in enumerate(raw[:MAX_NAME_BYTES + 1]))
    if len(raw) <= MAX_NAME_BYTES and len(escaped) <= MAX_NAME_BYTES:
        return escaped
    digest = hashlib.sha256(raw).hexdigest()
    prefix = escaped[:MAX_NAME_BYTES - len(digest) - 1]
    split_escape = prefix.rfind("%", len(prefix) - 2)    # a %XX the cut broke in two
    if split_escape != -1:
        prefix = prefix[:split_escape]
    return prefix + "~" + digest


# Every poll finds its collection: building the path again each time was a
# quarter of an empty poll's cost. The names come from requests, up to 64 KiB
# of them, so the cache is bounded in bytes.
NAME_CACHE_BYTES = 16 << 20   # per process
_collection_dbs = BoundedCache(NAME_CACHE_BYTES)


def _collection_db(root, id_key, domain, user, bucket):
    key = root, id_key, domain, user, bucket
    db = _collection_dbs.get(key)
    if db is None:
        first_id = None if id_key is None else hmac.new(
            id_key, json.dumps([domain, user, bucket]).encode(), "sha256").hexdigest()[:32]
        db = AppendOnlyDB(os.path.join(root, escape_name(domain), escape_name(user), escape_name(bucket)), first_id)
        # AppendOnlyDB holds four paths as long as its own.
        _collection_dbs.put(key, db, sum(map(sys.getsizeof, key)) + 4 * sys.getsizeof(db.path) + 300)
    return db


class DataDir:
    """The data directory: finds the AppendOnlyDB of each (domain, user, bucket).

    With an id_key (the server has one), each collection's first_id is an
    HMAC of its names under that key: a collection never written has an id
    that stays the same, in every process and on every node with the key,
    without a file on disk (GET-1).
    """

    def __init__(self, root, id_key=None):
        self.root, self.id_key = os.path.abspath(root), id_key

    def collection(self, domain, user, bucket):
        return _collection_db(self.root, self.id_key, domain, user, bucket)

    def collections_beside(self, db):
        """How many collections exist of db's user and app, db's own included if it exists."""
        try:
            return sum(entry.is_dir() for entry in os.scandir(os.path.dirname(db.path)))
        except FileNotFoundError:
            return 0

    def collections(self):
        """Every collection that exists, in a stable order."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            if os.path.relpath(dirpath, self.root).count(os.sep) == 2 and "data" in filenames:
                dirnames.clear()
                yield AppendOnlyDB(dirpath)


###############################################################################
# Protocol: the rules of SPEC.md chapter 2, on plain values
###############################################################################
# Nothing here touches bottle or the request's socket: each function takes what a request
# said (query pairs, body bytes) and returns what to answer (a status and a
# body), or raises ProtocolError. The HTTP section below only translates.
# Records are stored as the compact JSON of the object, so an answer is built
# by splicing stored bytes, never by parsing them again (except to filter).


@dataclasses.dataclass
class Limits:
    """Sizes a request or an answer may have (SPEC.md LIMIT-1, GET-6); all in bytes or objects."""

    max_body_bytes: int = 1 << 20
    max_object_bytes: int = 256 << 10
    max_response_objects: int = 1000
    max_response_bytes: int = 1 << 20
    max_examined: int = 10_000    # records a filtered answer may look at before it says incomplete
    max_blob_bytes: int = 16 << 20
    max_collections_per_user: int = 1000   # collections of one user in one app (LIMIT-2)

    @property
    def max_post_bytes(self):
        """A POST body may be max_body_bytes plus the base64 of one largest blob (LIMIT-1, BLOB-7)."""
        return self.max_body_bytes + 4 * -(-self.max_blob_bytes // 3)

    def post_too_large(self):
        """The words of the 413 for a POST body over max_post_bytes: which two limits make it."""
        return (f"the body is larger than {self.max_post_bytes} bytes: {self.max_body_bytes} for the objects "
                f"(--max-body-bytes), and the base64 of one blob of at most {self.max_blob_bytes} bytes "
                "(--max-blob-bytes)")


TOKEN_LIFETIME = 24 * 3600    # seconds a token from /verify is good for (AUTH-2)
MAX_REASON_BYTES = 256        # bytes of JSON in a deletion's reason; it lives in the data header
OBJECT_MEMBERS = frozenset({"type", "id", "data", "deleted", "expires", "blob"})
MAX_SAFE_INTEGER = 2 ** 53 - 1   # the largest integer id: every JSON parser, JavaScript's too, reads it exactly
BLOB_MEMBERS = frozenset({"content_type", "data", "href"})
# token = 1*tchar, tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
#   "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA                    (RFC 9110, 5.6.2)
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# media-type = type "/" subtype *( OWS ";" OWS parameter )          (RFC 9110, 8.3.1)
#   type = subtype = token; parameter = token "=" ( token / quoted-string ), the
#   quoted-string here without quoted-pairs; at most 255 characters in all (BLOB-1)
MEDIA_TYPE = re.compile(rf'(?=.{{1,255}}\Z){_TOKEN}/{_TOKEN}([ \t]*;[ \t]*{_TOKEN}=({_TOKEN}|"[ !#-\[\]-~]*"))*\Z')
# A host as the path and an origin spell it (PATH-1), at most 253 characters before the port:
#   domain = *( label "." ) label [ ":" 1*5DIGIT ]
#   label = ( LOWER / DIGIT ) [ *61( LOWER / DIGIT / "-" ) ( LOWER / DIGIT ) ]
DOMAIN_PATTERN = re.compile(r"(?=.{1,253}(:|\Z))([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                            r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(:[0-9]{1,5})?\Z")


def is_domain(text):
    """Whether text is a host[:port] as SPEC.md PATH-1 defines it."""
    match = DOMAIN_PATTERN.match(text)
    return bool(match) and (match.group(5) is None or 0 < int(match.group(5)[1:]) < 65536)


@dataclasses.dataclass
class SyncQuery:
    """What a GET or POST to a collection asked for."""

    since: int = None
    collection_id: str = None
    limit: int = None
    include: tuple = ()
    exclude: tuple = ()
    purge_horizon: int = 0      # the newest purge horizon the client knows of (PURGE-2)

    def wanted(self):
        """A test of a stored record against include/exclude, or None when all are wanted (GET-7)."""
        if self.include:
            types = frozenset(self.include)
            return lambda record: json.loads(record)["type"] in types
        if self.exclude:
            types = frozenset(self.exclude)
            return lambda record: json.loads(record)["type"] not in types
        return None


def parse_sync_query(pairs, post=False):
    """A SyncQuery from the query's (name, value) pairs, of a GET or a POST; raises ProtocolError.

    ERR-3's query rung: GET-7, GET-8, GET-9, and POST-1's since.
    """
    values = {}
    for name, value in pairs:
        values.setdefault(name, []).append(value)
    for name in ("since", "collection_id", "limit", "auth", "purge_horizon"):
        if len(values.get(name, ())) > 1:
            raise ProtocolError("bad_request", f"{name} may appear only once")
    # [GET-9] Other names are ignored, but the 2012 protocol's way of deleting must not be
    # taken for a read or a write.
    if "delete" in values:
        raise ProtocolError("bad_request", "?delete is the 2012 protocol's delete: send the DELETE method")
    query = SyncQuery(include=tuple(values.get("include", ())), exclude=tuple(values.get("exclude", ())))
    if query.include and query.exclude:
        raise ProtocolError("bad_filter", "include and exclude cannot be used together")
    if "since" in values:
        query.since = _parse_integer(values["since"][0], "since", "bad_since", minimum=0)
    if "limit" in values:
        query.limit = _parse_integer(values["limit"][0], "limit", "bad_limit", minimum=1)
    if "collection_id" in values:
        query.collection_id = values["collection_id"][0]
    if "purge_horizon" in values:
        query.purge_horizon = _parse_integer(values["purge_horizon"][0], "purge_horizon", "bad_since", minimum=0)
    # [POST-1] "A POST MUST carry since (else 400, bad_request)."
    if post and query.since is None:
        raise ProtocolError("bad_request", "a POST needs since (and should carry collection_id)")
    return query


def _parse_integer(text, name, code, minimum):
    # Decimal digits only: int() would also take "+5", " 5" and "5_000".
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) < minimum:
        raise ProtocolError(code, f"{name} must be a whole number of at least {minimum}, not {text!r}")
    return int(text)


def parse_json_body(body, limits, max_bytes=None):
    """The JSON value of a request body; raises ProtocolError (ERR-2, LIMIT-1)."""
    max_bytes = max_bytes or limits.max_body_bytes
    if len(body) > max_bytes:
        raise ProtocolError("too_large", f"the body is larger than {max_bytes} bytes")
    try:
        return json.loads(str(body, "utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError("bad_json", f"the body is not UTF-8 JSON: {error}") from None
    except RecursionError:
        raise ProtocolError("bad_json", "the body's JSON is nested too deeply") from None


def _compact_json(value):
    """value as compact UTF-8 JSON; ValueError for what JSON cannot hold (infinities, lone surrogates)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _not_json(constant):
    # Python's json module reads NaN and Infinity, which JSON does not have.
    raise ValueError(f"{constant} is not JSON")


def parse_objects(body, limits):
    """The objects of a POST body, checked (POST-1, BLOB-1, LIMIT-1).

    A blob's data is left as a _Base64, still in the body: a large blob is
    decoded straight from the request body to its file, never parsed into a
    string and decoded whole (that would hold four copies of it at once).
    """
    if len(body) > limits.max_post_bytes:
        raise ProtocolError("too_large", limits.post_too_large())
    # Sizes are checked before anything is parsed: parsing a body of small
    # JSON values takes some 25 times its size in memory.
    reduced, lifted = _lift_long_base64(body)
    _check_body_size(body, lifted.values(), limits)     # as if every long string were a blob's data
    objects = parse_json_body(reduced, limits, limits.max_post_bytes)
    in_blobs = set(_blob_data(objects)) & lifted.keys()
    if in_blobs != lifted.keys():
        # Long base64-like strings elsewhere than in a blob's data: they count, and
        # the body is read as it is.
        _check_body_size(body, [lifted[placeholder] for placeholder in in_blobs], limits)
        objects, lifted = parse_json_body(body, limits, limits.max_post_bytes), {}
    if not isinstance(objects, list):
        raise ProtocolError("bad_object", "the body must be a JSON list of objects")
    for position, obj in enumerate(objects):
        problem = _object_problem(obj)
        if problem:
            raise ProtocolError("bad_object", f"object {position}: {problem}", position=position)
        if "data" in obj.get("blob", ()):
            data = obj["blob"]["data"]
            # A lifted string matched the alphabet already: 4 MB of base64 take 5 ms to check again.
            obj["blob"]["data"] = (_Base64.check(lifted[data], limits, position, alphabet_checked=True)
                                   if data in lifted else _Base64.check(data.encode(), limits, position))
    return objects


def _check_body_size(body, blob_data, limits):
    # [BLOB-7] What a body holds besides the data of its large blobs must fit the body limit.
    if len(body) - sum(map(len, blob_data)) > limits.max_body_bytes:
        raise ProtocolError("too_large", f"the body, without its blobs' data, is larger than "
                            f"{limits.max_body_bytes} bytes")


def _blob_data(objects):
    """The "data" strings of the blobs in what a POST body holds."""
    if isinstance(objects, list):
        for obj in objects:
            if isinstance(obj, dict) and isinstance(obj.get("blob"), dict) and isinstance(obj["blob"].get("data"), str):
                yield obj["blob"]["data"]


# JSON strings of at least this many base64 characters are cut out of a POST
# body before it is parsed; shorter ones cost little to parse.
LIFTED_BASE64_CHARS = 4096
# long-base64 = DQUOTE 4096*( ALPHA / DIGIT / "+" / "/" / "-" / "_" ) 0*2"=" DQUOTE
#   (standard or URL-safe alphabet, padding optional: BLOB-1)
_LONG_BASE64 = re.compile(rb'"([A-Za-z0-9+/_-]{%d,}={0,2})"' % LIFTED_BASE64_CHARS)


def _lift_long_base64(body):
    """body with each long base64-like JSON string replaced by a short random
    placeholder; and {placeholder: a memoryview of the string in body}."""
    pieces, lifted, position, nonce = [], {}, 0, secrets.token_hex(8)
    for match in _LONG_BASE64.finditer(body):
        backslash = match.start() - 1
        while backslash >= 0 and body[backslash] == ord("\\"):
            backslash -= 1
        if (match.start() - 1 - backslash) % 2:
            continue        # an escaped quote: the match is inside a string, not one
        placeholder = f"lifted-{nonce}-{len(lifted)}"
        lifted[placeholder] = memoryview(body)[match.start(1):match.end(1)]
        pieces += (body[position:match.start()], b'"%s"' % placeholder.encode())
        position = match.end()
    if not lifted:
        return body, lifted
    pieces.append(body[position:])
    return b"".join(pieces), lifted


_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/_-]*")      # *( ALPHA / DIGIT / "+" / "/" / "-" / "_" )
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


@dataclasses.dataclass
class _Base64:
    """A blob's data as sent: base64 in the standard or URL-safe alphabet, padded or not (BLOB-1)."""

    text: object        # bytes-like, the padding removed
    length: int         # of the bytes it decodes to

    @classmethod
    def check(cls, text, limits, position, alphabet_checked=False):
        tail = bytes(text[-2:])
        padding = len(tail) - len(tail.rstrip(b"="))
        core = text[:len(text) - padding]
        if ((not alphabet_checked and not _BASE64_TEXT.fullmatch(core))
                or len(core) % 4 == 1 or padding and (len(core) + padding) % 4):
            raise ProtocolError("bad_blob", f"object {position}: the blob's data is not base64", position=position)
        length = len(core) * 3 // 4
        if length > limits.max_blob_bytes:
            raise ProtocolError("too_large", f"object {position}: the blob is larger than "
                                f"{limits.max_blob_bytes} bytes", position=position)
        return cls(core, length)

    def chunks(self):
        """The decoded bytes, a chunk at a time; ValueError if the text mixes the two alphabets."""
        step, standard, urlsafe = BLOB_CHUNK // 3 * 4, False, False    # characters, a multiple of 4
        for start in range(0, len(self.text), step):
            piece = bytes(self.text[start:start + step])
            standard = standard or b"+" in piece or b"/" in piece
            urlsafe = urlsafe or b"-" in piece or b"_" in piece
            if standard and urlsafe:
                raise ValueError("it mixes the standard and URL-safe alphabets")
            yield binascii.a2b_base64(piece.translate(_URLSAFE_TO_STANDARD) + b"=" * (-len(piece) % 4))


def _object_problem(obj):
    """What makes obj not an object of SPEC.md POST-1, or None."""
    if not isinstance(obj, dict):
        return "is not a JSON object"
    unknown = set(obj) - OBJECT_MEMBERS
    if unknown:
        return f"has members the protocol does not know: {', '.join(sorted(unknown))}"
    if not isinstance(obj.get("type"), str) or not obj["type"]:
        return '"type" must be a non-empty string'
    id_ = obj.get("id")
    if not (isinstance(id_, str) or type(id_) is int and -MAX_SAFE_INTEGER <= id_ <= MAX_SAFE_INTEGER):
        return f'"id" must be a string or an integer from -{MAX_SAFE_INTEGER} to {MAX_SAFE_INTEGER}'
    if ("data" in obj) == ("deleted" in obj):
        return 'needs either "data" or "deleted": true, not both'
    if "deleted" in obj and obj["deleted"] is not True:
        return '"deleted" can only be true'
    expires = obj.get("expires")
    if "expires" in obj and (not isinstance(expires, (int, float)) or isinstance(expires, bool)):
        return '"expires" must be a number (unix seconds)'
    return _blob_problem(obj) if "blob" in obj else None


def _blob_problem(obj):
    """What makes obj's "blob" not one of SPEC.md BLOB-1, or None."""
    blob = obj["blob"]
    if "deleted" in obj:
        return "a tombstone carries no blob"
    if not isinstance(blob, dict):
        return '"blob" must be an object'
    if set(blob) - BLOB_MEMBERS:
        return f'"blob" has members the protocol does not know: {", ".join(sorted(set(blob) - BLOB_MEMBERS))}'
    if not isinstance(blob.get("content_type"), str) or not MEDIA_TYPE.match(blob["content_type"]):
        return '"blob" needs a "content_type" that is a media type, such as "image/png"'
    if "data" not in blob and "href" not in blob:
        return '"blob" needs "data" (base64) or the "href" the server gave it'
    for member in ("data", "href"):
        if member in blob and not (isinstance(blob[member], str) and blob[member].isascii()):
            return f'the blob\'s "{member}" must be an ASCII string'
    return None


def _json_with_objects(members, fragments):
    """The JSON text of members plus "objects": the stored [counter, object] fragments."""
    head = json.dumps(members, separators=(",", ":")).encode()
    comma = b"," if members else b""
    return head[:-1] + comma + b'"objects":[' + b",".join(fragments) + b"]}"


def _objects_after(snapshot, query, since, limits, members):
    """The [counter, object] fragments after since; adds incomplete and until to members.

    [GET-6] at most limit objects (and the server's caps), "incomplete" when
    more remain. [GET-7] "until", the newest counter looked at, whenever it
    is past the last object returned: with a filter, or when the newest
    counters are of records the answer does not hold (purged, deleted).
    """
    wanted = query.wanted()
    cap = min(query.limit or limits.max_response_objects, limits.max_response_objects)
    fragments, size, until, last_returned, incomplete = [], 0, since, since, False
    # Without a filter, one record past the cap says whether more remain.
    newer = snapshot.records_after(since, None if wanted else cap + 1)
    for examined, (counter, record) in enumerate(newer):
        if (len(fragments) == cap or examined == limits.max_examined
                or (fragments and size + len(record) > limits.max_response_bytes)):
            incomplete = True
            break
        until = counter
        if wanted is None or wanted(record):
            fragments.append(b"[%d,%s]" % (counter, record))
            size += len(record)
            last_returned = counter
    else:
        until = max(until, snapshot.last_counter)
    if incomplete:
        members["incomplete"] = True
    if query.include or query.exclude or until > last_returned:
        members["until"] = until
    return fragments


def _introducing(snapshot, query, since, limits, members):
    """The JSON of members, the collection's id and its objects after since, for a client that
    did not know the id (GET-1, GET-4); collection_deleted if it was deleted (DEL-2)."""
    members["collection_id"] = snapshot.collection_id
    if snapshot.deleted is not None and snapshot.record_count == 0:
        members["collection_deleted"] = snapshot.deleted["reason"]
    return _json_with_objects(members, _objects_after(snapshot, query, since, limits, members))


def read_collection(snapshot, query, limits):
    """Answer a GET (SPEC.md 2.2), rung by rung in the order of SPEC: (status, body bytes or None)."""
    # [GET-4], [GET-5], [PURGE-1]: the client's collection_id or since no longer hold.
    answer = _no_longer_current(snapshot, query, limits)
    if answer is not None:
        return answer
    # [GET-1] A hello: the collection's id, and its objects after since (from the start
    # without one); never 204, which could not say the id.
    if query.collection_id is None:
        return 200, _introducing(snapshot, query, query.since or 0, limits, {})
    # [GET-3] Nothing newer than since: 204, the empty poll (Front.empty_poll answers most
    # of them from the remembered state with this same test).
    if nothing_new(snapshot, query):
        return 204, None
    # [GET-2] The objects newer than since (a collection_id alone asks for all), at most a
    # page of them (GET-6), of the types asked for (GET-7).
    members = {}
    fragments = _objects_after(snapshot, query, query.since or 0, limits, members)
    return 200, _json_with_objects(members, fragments)


def _no_longer_current(snapshot, query, limits):
    """The answer to a GET or a refused POST whose collection_id or since no longer hold; else None."""
    # [GET-4] "If collection_id is not the collection's current id, the server MUST answer
    # 200 with {"collection_changed": true, "collection_id": NEW, "objects": [...]}, the
    # objects from the start." (POST-5 answers a POST the same way.)
    if query.collection_id not in (None, snapshot.collection_id):
        return 200, _introducing(snapshot, query, 0, limits, {"collection_changed": True})
    # [GET-5] "A since greater than any counter the collection has given is answered 400."
    since = query.since or 0
    if since > snapshot.last_counter:
        raise ProtocolError("bad_since", f"since {since} is newer than the newest counter, {snapshot.last_counter}")
    # [PURGE-1] "If a GET or POST carries 0 < since < purge_horizon, and no purge_horizon=P
    # with P >= purge_horizon (PURGE-2), the server MUST NOT answer normally: it MUST answer 200
    # with {"since_purged": true, "collection_id": C, "purge_horizon": H}."
    if _purged_under(since, query, snapshot.purge_horizon):
        return 200, json.dumps({"since_purged": True, "collection_id": snapshot.collection_id,
                                "purge_horizon": snapshot.purge_horizon}).encode()
    return None


def _purged_under(since, query, purge_horizon):
    # [PURGE-2] A client reading again from since=0 pages on below the horizon it was told of.
    return 0 < since < purge_horizon and query.purge_horizon < purge_horizon


def nothing_new(state, query):
    """Whether a GET is answered 204 No Content, from a PollState or a Snapshot.

    [GET-3] "If the collection holds no object newer than since ..., the
    server MUST answer 204 No Content." The rungs above it are tested here
    too, so that an empty poll can be answered from the remembered state alone.
    """
    since = query.since or 0     # a collection_id without since means since=0 (GET-2)
    return (query.collection_id == state.collection_id
            and state.last_record_counter <= since <= state.last_counter      # GET-5
            and not _purged_under(since, query, state.purge_horizon))         # PURGE-1


def write_collection(db, query, objects, limits, blob_base="/", still_here=None, stored=None):
    """Answer a POST (SPEC.md 2.3): (status, body bytes). Stores all objects or none, with their blobs.

    query is parse_sync_query(..., post=True)'s, so it has a since (POST-1). blob_base is
    the path under which the collection's blobs are served (BLOB-2). still_here(db), if
    given, is called under the writer lock and may raise to refuse the write; stored([(counter,
    record)]) once it is durable.
    """
    # [POST-7] Without a collection_id (as in the 2012 protocol) the objects go to the current
    # collection, and every answer says which that is.
    collection_id = query.collection_id
    if collection_id is None:
        with db.snapshot() as snapshot:
            collection_id = snapshot.collection_id
    wanted = query.wanted()
    blobs = BlobBatch(db)
    try:
        records, hrefs = _records(objects, blobs, limits, blob_base)
        # [POST-2], [POST-4], [POST-5], [PURGE-1] are checked again under the writer lock.
        def before_write(secret):
            if still_here is not None:
                still_here(db)
            return blobs.commit(secret)
        counters = db.append(records, if_last_counter=query.since, if_collection_id=collection_id,
                             ignore_newer=None if wanted is None else _other_types(wanted, limits.max_examined),
                             before_write=before_write, after_write=blobs.prune)
    except AppendConflict:
        # Refused whole: say why from a fresh view, the rungs a GET would climb first, then
        # [POST-2] "... MUST answer 200 with {"since_invalid": true, "objects": [...]}: the
        # objects the client missed (paged as in GET-6)."
        with db.snapshot() as snapshot:
            answer = _no_longer_current(snapshot, query, limits)
            if answer is not None:
                return answer
            members = {"since_invalid": True}
            if query.collection_id is None:
                members["collection_id"] = snapshot.collection_id     # POST-7
            fragments = _objects_after(snapshot, query, query.since, limits, members)
            return 200, _json_with_objects(members, fragments)
    finally:
        blobs.discard()     # uploads of a refused POST
    if stored is not None and counters:
        stored(list(zip(counters, records)))
    # [POST-3] Stored, in order: one counter per object.
    answer = {"object_counters": counters}
    if query.collection_id is None:
        answer["collection_id"] = collection_id     # POST-7
    if any("blob" in obj for obj in objects):
        answer["blob_hrefs"] = hrefs        # BLOB-2
    return 200, json.dumps(answer).encode()


def _records(objects, blobs, limits, blob_base):
    """The record to store for each object, and the href of each one's blob (or None).

    New blobs are written to blobs; each object's other blobs end when its
    record is stored (BLOB-4).
    """
    # Every record is made once with a stand-in for its blob's name, so that
    # an object refused for its JSON or its size is refused before any upload.
    stand_in = "0" * 32 + "-" + "0" * 32
    for position, obj in enumerate(objects):
        _record(obj, position, limits, blob_base + stand_in)
    records, hrefs = [], []
    for position, obj in enumerate(objects):
        name = _blob_kept_or_made(obj, position, blobs, blob_base) if "blob" in obj else None
        blobs.owner(obj["type"], obj["id"], name)
        hrefs.append(name and blob_base + name)
        records.append(_record(obj, position, limits, name and blob_base + name))
    return records, hrefs


def _record(obj, position, limits, href):
    """The record of obj, its blob named by href: its compact JSON (POST-1, LIMIT-1)."""
    if "blob" in obj:
        obj = dict(obj, blob={"content_type": obj["blob"]["content_type"], "href": href})
    try:
        record = _compact_json(obj)
    except RecursionError:
        raise ProtocolError("bad_object", f"object {position} is nested too deeply", position=position) from None
    except ValueError as error:     # 1e400 read as infinity, a lone surrogate
        raise ProtocolError("bad_object", f"object {position}: {error}", position=position) from None
    if len(record) > limits.max_object_bytes:
        raise ProtocolError("too_large", f"object {position} is larger than {limits.max_object_bytes} bytes",
                            position=position)
    return record


def _blob_kept_or_made(obj, position, blobs, blob_base):
    """The name of the blob obj's record will name: the one its href keeps, or a new one of its data."""
    blob, type_, id_ = obj["blob"], obj["type"], obj["id"]
    kept = None
    if "href" in blob:
        href = blob["href"]
        name = href[len(blob_base):] if href.startswith(blob_base) else ""
        kept = blobs.existing(type_, id_, name)
        if kept is None:        # BLOB-5
            raise ProtocolError("bad_blob", f"object {position}: {href!r} is not a blob of this object",
                                position=position)
        if "data" not in blob:
            if kept.content_type != blob["content_type"]:
                raise ProtocolError("bad_blob", f"object {position}: the content_type is not the blob's; "
                                    "send the data again to change it", position=position)
            return name
    try:
        if kept is None:
            return blobs.upload(type_, id_, blob["content_type"], blob["data"].chunks())[0]
        digest = hashlib.sha256()
        for chunk in blob["data"].chunks():
            digest.update(chunk)
    except ValueError as error:
        raise ProtocolError("bad_blob", f"object {position}: the blob's data is not base64: {error}",
                            position=position) from None
    if (digest.hexdigest(), blob["content_type"]) != (kept.sha256, kept.content_type):
        raise ProtocolError("bad_blob", f"object {position}: the blob's data and href disagree", position=position)
    return name


def _other_types(wanted, most):
    """A test for append's ignore_newer: a newer record of another type is no conflict.

    The writer lock is held while it runs, so it gives up (a conflict, which
    the client resolves page by page) after looking at most records.
    """
    looked_at = itertools.count()
    return lambda counter, record: next(looked_at) < most and not wanted(record)


def parse_reason(body, limits):
    """The reason a DELETE gives (DEL-1): any JSON value of at most MAX_REASON_BYTES, or None."""
    reason = parse_json_body(body, limits) if body.strip() else None
    try:
        size = len(_compact_json(reason))
    except (ValueError, RecursionError) as error:
        raise ProtocolError("bad_json", f"the reason cannot be stored as JSON: {error}") from None
    if size > MAX_REASON_BYTES:
        raise ProtocolError("too_large", f"the reason is larger than {MAX_REASON_BYTES} bytes of JSON")
    return reason


def delete_collection(db, reason, still_here=None):
    """Answer a DELETE (SPEC.md 2.4): empty the collection under a new collection_id.

    still_here(db), if given, is called under the writer lock and may raise to refuse.
    """
    return 200, json.dumps({"collection_id": db.delete(reason, still_here and functools.partial(still_here, db))
                            }).encode()


# origin = scheme "://" host [ ":" port ], with scheme http or https (RFC 6454, 6.2), and
# an optional "/" as browsers and apps write one; nothing else, not even a space:
# urlsplit() would quietly drop a tab or a newline and let "app.exa<TAB>mple" pass.
ORIGIN = re.compile(r"(?i:http|https)://([A-Za-z0-9.-]+(?::[0-9]+)?)/?\Z")


def is_loopback(host):
    """Whether host (a name or an address, without a port) is this machine's own."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def domain_of_origin(origin):
    """The domain (host[:port]) of an origin such as "https://example.com", or None if it is not one."""
    match = ORIGIN.match(origin)
    if match is None:
        return None
    domain = match.group(1).lower()
    return domain if is_domain(domain) else None


def make_token(secret, email, audience, now):
    """A signed token binding email and audience until now + TOKEN_LIFETIME (AUTH-2)."""
    payload = base64.urlsafe_b64encode(json.dumps(
        {"email": email, "audience": audience, "expires": int(now) + TOKEN_LIFETIME}).encode()).rstrip(b"=")
    signature = base64.urlsafe_b64encode(hmac.new(secret, payload, "sha256").digest()).rstrip(b"=")
    return (payload + b"." + signature).decode()


MAX_TOKEN_LENGTH = 2048      # characters; ours are about 250, longer ones are not ours


def check_token(secret, token, now):
    """(email, domain) of a valid token; raises ProtocolError 401 otherwise (AUTH-3)."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise ProtocolError("unauthorized", "a valid token is needed: verify again")
    email, domain, expires = _token_claims(secret, token)
    if expires <= now:
        raise ProtocolError("unauthorized", "the token has expired: verify again")
    return email, domain


@functools.lru_cache(maxsize=10_000)     # of tokens of at most MAX_TOKEN_LENGTH: some 25 MB at most
def _token_claims(secret, token):
    # A client polls with the same token for hours: checking its signature
    # and parsing its JSON once keeps an empty poll free of both. A token
    # that fails raises, and exceptions are not cached.
    if token.count(".") != 1 or not token.isascii():
        raise ProtocolError("unauthorized", "a valid token is needed: verify again")
    payload, signature = token.encode().split(b".")
    expected = base64.urlsafe_b64encode(hmac.new(secret, payload, "sha256").digest()).rstrip(b"=")
    if not hmac.compare_digest(signature, expected):
        raise ProtocolError("unauthorized", "a valid token is needed: verify again")
    claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    return claims["email"], domain_of_origin(claims["audience"]), claims["expires"]


# An email address as a verifier may return it, loosely: something @ something, no space.
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\Z")
MAX_EMAIL_LENGTH = 254        # characters (RFC 5321, 4.5.3.1.3: a path of 256 less its brackets)


def development_verifier(assertion, audience):
    """Accepts an assertion that is an email address; for running on one's own machine."""
    if not EMAIL.match(assertion) or len(assertion) > MAX_EMAIL_LENGTH:
        raise ProtocolError("assertion_rejected", "the development verifier takes an email address")
    return assertion


FORM = "application/x-www-form-urlencoded"
VERIFIER_TIMEOUT = 10         # seconds the whole call to a remote verifier (or an issuer) may take
VERIFIER_MAX_BYTES = 64 << 10 # bytes of a verifier's or an issuer's answer; a verdict is a few hundred,
                              # a key set with certificates (x5c) a few dozen KB at most


def _ask(url, method="GET", body=None, headers=None):
    """The body of a 200 answer from url: one request, no redirect followed, one deadline
    (VERIFIER_TIMEOUT) for the whole exchange, at most VERIFIER_MAX_BYTES with no content
    coding. Raises OSError, http.client.HTTPException or ValueError, whose text names what
    went wrong (for the log, not for the client)."""
    parts = urllib.parse.urlsplit(url)
    connect = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    connection = connect(parts.hostname, parts.port, timeout=VERIFIER_TIMEOUT)
    try:
        connection.connect()
        # One deadline for all of it: a timeout per read never trips on an
        # answer dribbled a byte at a time.
        watchdog = threading.Timer(VERIFIER_TIMEOUT, _cut, [connection.sock])
        watchdog.start()
        try:
            connection.request(method, target, body, headers or {})
            answer = connection.getresponse()
            content = answer.read(VERIFIER_MAX_BYTES + 1)
        finally:
            watchdog.cancel()
    finally:
        connection.close()
    if answer.status != 200 or answer.getheader("Content-Encoding", "identity") != "identity":
        raise ValueError(f"it answered {answer.status} {answer.getheader('Content-Encoding', '')}")
    if len(content) > VERIFIER_MAX_BYTES:
        raise ValueError(f"its answer is longer than {VERIFIER_MAX_BYTES} bytes")
    return content


def _cut(sock):
    with contextlib.suppress(OSError):      # already closed: the exchange ended in time
        sock.shutdown(socket.SHUT_RDWR)


def remote_verifier(url):
    """A verifier that asks url, as a BrowserID verifier is asked (SPEC.md 2.6).

    Its answer is trusted only so far (_ask): nothing but a 200 within the
    deadline counts. What went wrong is logged; the client is told only that
    the verifier could not be asked.
    """
    def verify(assertion, audience):
        form = urllib.parse.urlencode({"assertion": assertion, "audience": audience})
        try:
            verdict = json.loads(_ask(url, "POST", form, {"Content-Type": FORM}))
        except (OSError, http.client.HTTPException, ValueError) as error:
            log.warning("the verifier %s could not be asked: %s", url, error)
            raise ProtocolError("verifier_unavailable", "the verifier could not be asked: try again later") from None
        if not (isinstance(verdict, dict) and verdict.get("status") == "okay"
                and isinstance(verdict.get("email"), str) and verdict.get("audience") == audience):
            raise ProtocolError("assertion_rejected", "the verifier rejected the assertion")
        return verdict["email"]
    return verify


# OpenID Connect: an assertion that is an ID token (OIDC-1..OIDC-9). An ID token is a JWT
# (RFC 7519) signed by its issuer, whose public keys are a JWK set (RFC 7517) at the jwks_uri
# of its discovery document (OpenID Connect Discovery 1.0, 4). The signature is checked by
# PyJWT, never here; this code only decides which key and which algorithm PyJWT may use,
# and which claims an ID token must carry (OpenID Connect Core 1.0, 3.1.3.7).
#
# The keys are fetched when a token first needs them, kept, and fetched again when a token
# names a key (kid) they lack, as when the issuer rotates its keys; but not more than once
# every OIDC_REFETCH_INTERVAL per issuer, so that tokens with made-up kids cannot make this
# server hammer the issuer. Each worker process fetches its own.

OIDC_LEEWAY = 60              # seconds of clock difference allowed on exp, nbf and iat (OIDC-4)
OIDC_REFETCH_INTERVAL = 60    # seconds between fetches of an issuer's keys for an unknown kid (OIDC-3)
OIDC_KEYS_MAX_AGE = 24 * 3600 # seconds before keys in use are fetched again anyway: a key the issuer
                              # withdrew (leaked) is trusted no longer than this
OIDC_RETRY_INTERVAL = 5       # seconds an issuer that could not be reached is not asked again (OIDC-8)

# [OIDC-2] The algorithms each type of key may sign with: never "none", never an HMAC (whose
# "key" would be the public key, which anyone has).
OIDC_ALGORITHMS = {
    ("RSA", None): {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"},
    ("EC", "P-256"): {"ES256"}, ("EC", "P-384"): {"ES384"}, ("EC", "P-521"): {"ES512"},
    ("OKP", "Ed25519"): {"EdDSA"}, ("OKP", "Ed448"): {"EdDSA"},
}


def load_pyjwt():
    """PyJWT with its crypto extra, imported only when an OpenID issuer is configured."""
    try:
        import jwt
        import jwt.algorithms
    except ImportError:
        jwt = None
    if jwt is None or not jwt.algorithms.has_crypto:
        raise ImportError("--oidc-issuer needs PyJWT with its crypto extra: pip install 'PyJWT[crypto]'")
    return jwt


def oidc_verifier(issuers, client_ids):
    """A verifier that takes an OpenID Connect ID token from one of issuers for one of client_ids.

    verify(assertion, audience) returns the token's email, or raises ProtocolError
    assertion_rejected (401) naming the check that failed, or verifier_unavailable (502)
    when the issuer's keys cannot be fetched. Implements OIDC-1..OIDC-9.
    """
    jwt = load_pyjwt()
    keys_of = {issuer: _IssuerKeys(issuer, jwt) for issuer in issuers}
    client_ids = frozenset(client_ids)

    def verify(assertion, audience):
        issuer = "unknown"      # until the token names one of ours: what it says is not logged (OIDC-9)
        try:
            header = jwt.get_unverified_header(assertion)
            claimed = jwt.decode(assertion, options={"verify_signature": False}).get("iss")
            # [OIDC-1] "the token's iss MUST be exactly one of those issuer URLs"
            if not isinstance(claimed, str) or claimed not in keys_of:
                raise _Refused("the ID token's issuer (iss) is not one this server accepts")
            issuer = claimed
            claims = _checked_claims(jwt, assertion, header, keys_of[issuer], client_ids)
        except _Refused as refusal:
            # [OIDC-9] "MUST log each refusal with the check that failed and the configured issuer
            # it concerns, and MUST NOT log the token or the claims in it"
            log.warning("an ID token was refused (issuer %s): %s", issuer, refusal)
            raise ProtocolError("assertion_rejected", str(refusal)) from None
        except jwt.InvalidTokenError:      # not even a JWT's header and claims can be read
            log.warning("an assertion that is not an ID token (a JWT) was refused")
            raise ProtocolError("assertion_rejected", "the assertion is not an ID token (a signed JWT)") from None
        return claims["email"]
    return verify


class _Refused(Exception):
    """Which check an ID token failed; the message is the client's and the log's."""


def _checked_claims(jwt, token, header, keys, client_ids):
    """The claims of token once every check of OIDC-2..OIDC-7 has passed; raises _Refused."""
    # [OIDC-2] "the algorithm MUST be one the issuer's key of that type signs with"
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or not any(algorithm in allowed for allowed in OIDC_ALGORITHMS.values()):
        # Named only when it is one of the usual ones: nothing else the token says is repeated.
        named = algorithm if algorithm in ("none", "HS256", "HS384", "HS512") else "of another kind"
        raise _Refused(f"the ID token's algorithm (alg) {named} is not allowed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _Refused("the ID token's key id (kid) is not a string")
    key = keys.key_for(kid, algorithm)
    try:
        claims = jwt.decode(token, key, algorithms=[algorithm], audience=list(client_ids), issuer=keys.issuer,
                            leeway=OIDC_LEEWAY, options={"require": ["iss", "sub", "aud", "exp", "iat"]})
    except jwt.InvalidSignatureError:
        raise _Refused("the ID token's signature is not the issuer's (bad signature)") from None
    except jwt.ExpiredSignatureError:
        raise _Refused("the ID token has expired (exp)") from None
    except jwt.ImmatureSignatureError:
        raise _Refused("the ID token is not yet valid (nbf or iat in the future)") from None
    except jwt.InvalidAudienceError:
        raise _Refused("the ID token is for another client (wrong audience, aud)") from None
    except jwt.InvalidIssuerError:
        raise _Refused("the ID token's issuer (iss) is not the one whose key signed it") from None
    except jwt.MissingRequiredClaimError as error:
        raise _Refused(f"the ID token has no {error.claim} claim") from None
    except jwt.InvalidTokenError:
        raise _Refused("the ID token's claims are malformed") from None
    # [OIDC-5] "an ID token for several audiences MUST name one of the client ids in azp"
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    azp = claims.get("azp")
    if (len(audiences) > 1 or "azp" in claims) and not (isinstance(azp, str) and azp in client_ids):
        raise _Refused("the ID token's authorized party (azp) is not one of this server's clients")
    # [OIDC-6] "MUST carry email, and email_verified true"
    email = claims.get("email")
    if not isinstance(email, str) or not email:
        raise _Refused("the ID token has no email claim (ask for the email scope)")
    if claims.get("email_verified") is not True:
        raise _Refused("the issuer has not verified the email (email_verified is not true)")
    if len(email) > MAX_EMAIL_LENGTH or not EMAIL.match(email):
        raise _Refused("the ID token's email is not an email address")
    return claims


class _IssuerKeys:
    """The signing keys of one issuer, fetched as OIDC-3 says; safe to use from several threads."""

    def __init__(self, issuer, jwt):
        self.issuer, self._jwt = issuer, jwt
        self._keys = None                 # [(kid, public key, algorithms it may sign with)], once fetched
        self._fetched_at = self._refetched_at = self._failed_at = -math.inf    # time.monotonic()
        self._lock = threading.Lock()     # one fetch at a time; the others wait for its keys

    def key_for(self, kid, algorithm):
        """The public key that kid (or, without one, the issuer's only key) names for algorithm."""
        with self._lock:
            now = time.monotonic()
            if self._keys is None:
                self._fetch(now)
            elif now - self._fetched_at > OIDC_KEYS_MAX_AGE:
                # Old keys are still the issuer's keys while it cannot say otherwise: an issuer
                # down for a while does not log everyone out (the failure is logged).
                with contextlib.suppress(ProtocolError):
                    self._fetch(now)
            found = self._matching(kid)
            # [OIDC-3] "a kid it does not hold MUST make it fetch the keys again, but not more often
            # than once a minute"
            if not found and kid is not None and now - self._refetched_at >= OIDC_REFETCH_INTERVAL:
                self._refetched_at = now
                self._fetch(now)
                found = self._matching(kid)
        if not found:
            raise _Refused("the ID token's key (kid) is not one of the issuer's" if kid is not None else
                           "the ID token names no key (kid) and the issuer has several")
        if len(found) > 1:
            found = [candidate for candidate in found if algorithm in candidate[2]] or found
        _, key, algorithms = found[0]
        if algorithm not in algorithms:
            raise _Refused(f"the ID token's algorithm (alg) {algorithm} does not fit the issuer's key")
        return key

    def _matching(self, kid):
        if kid is None:
            return self._keys if len(self._keys) == 1 else []
        return [candidate for candidate in self._keys if candidate[0] == kid]

    def _fetch(self, now):
        # [OIDC-8] An issuer that cannot be reached: the client may try again later, but
        # meanwhile each login does not wait for a connection that is known to fail.
        if now - self._failed_at < OIDC_RETRY_INTERVAL:
            raise ProtocolError("verifier_unavailable", "the ID token's issuer could not be reached: try again later")
        try:
            discovery = json.loads(_ask(self.issuer.rstrip("/") + "/.well-known/openid-configuration"))
            # OpenID Connect Discovery 1.0, 4.3: "The issuer value returned MUST be identical to
            # the Issuer URL that was used as the prefix to /.well-known/openid-configuration"
            if not isinstance(discovery, dict) or discovery.get("issuer") != self.issuer:
                raise ValueError("its discovery document names another issuer")
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not issuer_url(jwks_uri):
                raise ValueError("its discovery document has no https jwks_uri")
            key_set = json.loads(_ask(jwks_uri))
            if not isinstance(key_set, dict) or not isinstance(key_set.get("keys"), list):
                raise ValueError("its jwks_uri holds no JWK set")
        except (OSError, http.client.HTTPException, ValueError) as error:
            self._failed_at = time.monotonic()
            log.warning("the keys of the issuer %s could not be fetched: %s", self.issuer, error)
            raise ProtocolError("verifier_unavailable",
                                "the ID token's issuer could not be reached: try again later") from None
        self._keys = [key for key in map(self._signing_key, key_set["keys"]) if key is not None]
        self._fetched_at = now
        log.info("fetched %d signing keys of the issuer %s", len(self._keys), self.issuer)

    def _signing_key(self, jwk):
        """(kid, public key, algorithms) of a JWK that signs, or None for one that does not or is unknown here."""
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            return None
        kind = tuple(value if isinstance(value, str) else None for value in (jwk.get("kty"), jwk.get("crv")))
        algorithms = OIDC_ALGORITHMS.get((kind[0], None) if kind[0] == "RSA" else kind)
        if algorithms is None or "alg" in jwk and not (isinstance(jwk["alg"], str) and jwk["alg"] in algorithms):
            return None
        if "alg" in jwk:
            algorithms = {jwk["alg"]}
        try:
            key = self._jwt.PyJWK(jwk, algorithm=min(algorithms)).key
        except (self._jwt.PyJWTError, ValueError, TypeError, KeyError):     # a key PyJWT cannot read is no key
            return None
        kid = jwk.get("kid")
        return (kid if isinstance(kid, str) else None), key, frozenset(algorithms)


def issuer_url(text):
    """Whether text is an https URL, or an http one on this machine (for development and tests)."""
    parts = urllib.parse.urlsplit(text)
    return bool(parts.hostname) and (parts.scheme == "https" or parts.scheme == "http" and is_loopback(parts.hostname))


NODE_HEAD_BYTES = 1 << 20     # bytes a write's copy between nodes may add to the write: framing, blob names
MAX_VERIFY_BYTES = 16 << 10  # bytes of a /verify form: an assertion (an ID token is 1-2 KB) and an origin


def parse_verify_form(body, content_type):
    """(assertion, audience) from the body of POST /verify; raises ProtocolError (AUTH-1).

    The form is read here, not by a general parser: a multipart body or a
    malformed Content-Type is refused before anything in it is parsed.
    """
    if len(body) and content_type.partition(";")[0].strip().lower() != FORM:
        raise ProtocolError("bad_request", f"POST /verify takes a form ({FORM})", status=415)
    try:
        pairs = urllib.parse.parse_qsl(str(body, "ascii"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ProtocolError("bad_request", "the form is not percent-encoded UTF-8") from None
    fields = {}
    for name, value in pairs:
        if name in ("assertion", "audience"):
            if name in fields:
                raise ProtocolError("bad_request", f"{name} may appear only once")
            fields[name] = value
    return fields.get("assertion", ""), fields.get("audience", "")


def verify_assertion(secret, verifier, assertion, audience, now, http_apps=True):
    """Answer POST /verify (AUTH-1): (status, body bytes).

    http_apps: whether an app served over plain http may log in (AUTH-5).
    """
    if not assertion or not audience:
        raise ProtocolError("bad_request", "assertion and audience are both needed")
    domain = domain_of_origin(audience)
    if domain is None:
        raise ProtocolError("bad_request", "audience must be an origin such as https://example.com")
    # [AUTH-5] "a server that other machines can reach SHOULD refuse to verify for an audience
    # that is not https, except a loopback host"
    host = domain.split(":")[0]
    if not http_apps and audience.lower().startswith("http:") and not is_loopback(host):
        raise ProtocolError("bad_request", "this server logs in only apps served over https")
    audience = audience.rstrip("/").lower()
    email = verifier(assertion, audience)
    token = make_token(secret, email, audience, now)
    return 200, json.dumps({"status": "okay", "email": email, "audience": audience,
                            "expires": int(now) + TOKEN_LIFETIME, "auth": {"query": {"auth": token}}}).encode()


###############################################################################
# HTTP: bottle routes that translate between requests and the protocol
###############################################################################
# Every answer goes through the after_request hook, which adds the CORS and
# backoff headers; every error, bottle's own (404, 405) included, is JSON.

app = bottle.Bottle()
COLLECTION_METHODS = ("GET", "POST", "DELETE")
EXPOSED_HEADERS = "X-Sync-Poll-Time, Retry-After, ETag, Content-Range, Content-Disposition, Accept-Ranges"
PREFLIGHT_MAX_AGE = 600       # seconds a browser may cache a preflight answer


@dataclasses.dataclass
class ServerConfig:
    """What the routes need from the command line."""

    data_dir: DataDir
    secret: bytes
    verifier: object
    limits: Limits = dataclasses.field(default_factory=Limits)
    poll_time: int = 0            # seconds; sent as X-Sync-Poll-Time when > 0 (BACKOFF-1)
    http_apps: bool = True        # apps served over plain http may log in (AUTH-5)
    cluster: object = None        # the node's NodeCluster (CLUSTER-5), when it may be in one


def _config():
    return app.config["cutout.server"]


def _answer(status, body, content_type="application/json"):
    headers = {} if body is None else {"Content-Type": content_type}
    return bottle.HTTPResponse(body=body or b"", status=status, **headers)


def _error_answer(error):
    members = {"error": error.code, "message": error.message}
    if error.position is not None:
        members["object"] = error.position
    body = json.dumps(members).encode()
    return bottle.HTTPResponse(body=body, status=error.status, headers=error.headers,
                               **{"Content-Type": "application/json"})


def _protocol(handler):
    """Run a route's handler, rendering ProtocolError and storage damage as JSON errors."""
    @functools.wraps(handler)
    def route(**url_parts):
        try:
            return handler(**url_parts)
        except ProtocolError as error:
            return _error_answer(error)
        except StorageError as error:
            log.error("%s", error)
            return _error_answer(ProtocolError("storage_error", "the collection's files are damaged"))
    return route


def _collection(query_string, *raw_parts, write=False):
    """(the AppendOnlyDB the request may use, the query's pairs); raises ProtocolError.

    ERR-3's first rungs: the path (PATH-1), the query's encoding (GET-8), the
    token (AUTH-3, AUTH-4), then whether this node is the one to ask (CLUSTER-5).
    The parts arrive still percent-encoded (see Front), so that a "/" inside a
    bucket's name stays inside it.
    """
    try:
        domain, user, bucket = (urllib.parse.unquote(part, errors="strict") for part in raw_parts)
    except UnicodeDecodeError:
        raise ProtocolError("bad_path", "a path part is not percent-encoded UTF-8") from None
    if not is_domain(domain):
        raise ProtocolError("bad_path", f"{domain!r} is not a host in lower case")
    pairs = _query_pairs(query_string)
    tokens = [value for name, value in pairs if name == "auth"]
    if len(tokens) > 1:
        raise ProtocolError("bad_request", "auth may appear only once")
    email, token_domain = check_token(_config().secret, tokens[0] if tokens else "", time.time())
    # [AUTH-4] "A token MUST only give access to /{domain}/{user}/... of its email and audience."
    if (email, token_domain) != (user, domain):
        raise ProtocolError("unauthorized", "this token is for another user or app")
    try:
        db = _config().data_dir.collection(domain, user, bucket)
    except ValueError as error:
        raise ProtocolError("bad_path", str(error)) from None
    if _config().cluster:
        _config().cluster.check(db, write)      # CLUSTER-5, CLUSTER-10
    return db, pairs


def _room_for(db):
    """Refuse a write that would make a collection its user has no room for (LIMIT-2)."""
    if db.exists():
        return
    # [LIMIT-2] "a write that would make one more MUST be refused with 403 (too_many_collections)"
    most, count = _config().limits.max_collections_per_user, _config().data_dir.collections_beside(db)
    if count >= most:
        raise ProtocolError("too_many_collections",
                            f"this user has {count} collections of this app, the most this server keeps")


def _query_pairs(query_string):
    # Not bottle.request.query: it decodes values as Latin-1, so include=é
    # would not match the type "é".
    try:
        return urllib.parse.parse_qsl(query_string, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ProtocolError("bad_request", "the query is not percent-encoded UTF-8") from None


BODY_CHUNK = 64 << 10     # bytes read at a time from a large request body


def _body(limit=None):
    limit = limit or _config().limits.max_body_bytes
    length = bottle.request.content_length
    if length > limit:
        raise ProtocolError("too_large", f"the body is larger than {limit} bytes")
    environ = bottle.request.environ
    if "cutout.body" in environ:
        return environ["cutout.body"]       # read whole by the server below, and measured
    if environ.get("wsgi.input_terminated"):
        # The server has already undone any chunking; bottle would try to undo it again.
        return environ["wsgi.input"].read(limit + 1)
    if length <= BODY_CHUNK:
        return bottle.request.body.read(limit + 1)
    # A large body (a blob's) is read a chunk at a time into a memory map of
    # its own. read() of it all at once held it twice (measured on cheroot:
    # 27 MB for 13 MB), and memory from malloc stays with the thread that
    # freed it, so each server thread would keep a blob's worth.
    body, source, received = mmap.mmap(-1, length), environ["wsgi.input"], 0
    while received < length:
        chunk = source.read(min(BODY_CHUNK, length - received))
        if not chunk:
            raise ProtocolError("bad_request", "the body ended before its Content-Length")
        body[received:received + len(chunk)] = chunk
        received += len(chunk)
    return body


@app.get("/<domain>/<user>/<bucket>")
@_protocol
def get_collection(domain, user, bucket):
    db, pairs = _collection(bottle.request.query_string, domain, user, bucket)
    query = parse_sync_query(pairs)
    with db.snapshot() as snapshot:     # an empty poll was answered by Front.empty_poll, if it could
        if _config().cluster:
            _config().cluster.hide_unpublished(db, snapshot)       # CLUSTER-8
        return _answer(*read_collection(snapshot, query, _config().limits))


@app.post("/<domain>/<user>/<bucket>")
@_protocol
def post_collection(domain, user, bucket):
    db, pairs = _collection(bottle.request.query_string, domain, user, bucket, write=True)
    query = parse_sync_query(pairs, post=True)
    limits = _config().limits
    objects = parse_objects(_body(limits.max_post_bytes), limits)
    _room_for(db)
    # Blob hrefs name the collection as a path, so they stay good whatever
    # host or proxy a client reaches the server by.
    names = (urllib.parse.unquote(part) for part in (domain, user, bucket))
    blob_base = "/" + "/".join(urllib.parse.quote(name, safe="") for name in names) + "/+static/"
    cluster = _config().cluster
    if not cluster:
        return _answer(*write_collection(db, query, objects, limits, blob_base))
    # [CLUSTER-8] Answered once it is on the backups too; checked again under the writer
    # lock, in case the membership changed meanwhile (CLUSTER-5).
    with cluster.writing(db) as copy:
        stored = []
        answer = write_collection(db, query, objects, limits, blob_base,
                                  still_here=functools.partial(cluster.check, write=True), stored=stored.append)
        if stored:
            copy(after=stored[0][0][0] - 1, numbered=stored[0])
    return _answer(*answer)


@app.delete("/<domain>/<user>/<bucket>")
@_protocol
def delete_collection_route(domain, user, bucket):
    db, _ = _collection(bottle.request.query_string, domain, user, bucket, write=True)
    reason = parse_reason(bytes(_body()), _config().limits)
    _room_for(db)
    cluster = _config().cluster
    if not cluster:
        return _answer(*delete_collection(db, reason))
    with cluster.writing(db) as copy:       # CLUSTER-8, as a POST
        answer = delete_collection(db, reason, still_here=functools.partial(cluster.check, write=True))
        copy(deleted=True)
    return _answer(*answer)


@app.get("/<domain>/<user>/<bucket>/+static/<name>")
@_protocol
def get_blob(domain, user, bucket, name):
    db, pairs = _collection(bottle.request.query_string, domain, user, bucket)
    found = open_blob(db, name)
    if found is None:
        raise ProtocolError("not_found", "this collection has no blob of that name")
    info, blob = found
    try:
        return _blob_answer(info, blob, name, dict(pairs).get("filename"), bottle.request.environ)
    except BaseException:
        blob.close()
        raise


# The only types served as what they are: media and plain text, which a
# browser shows but never runs. Anything else (text/html, image/svg+xml, XML,
# JavaScript, ...) from the API's own origin could run script that reads the
# user's collections, so it is served as a download (BLOB-6).
INLINE_BLOB_TYPES = re.compile(r"(image/(png|jpeg|gif|webp|avif|bmp)|audio/.+|video/.+|text/plain)\Z")
# Range = "bytes=" ( first-pos "-" [ last-pos ] / "-" suffix-length )   (RFC 9110, 14.1.1)
#   one range only, each number at most 19 digits (so it fits in 64 bits); more ranges are ignored
BYTE_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})\Z", re.IGNORECASE)


def _blob_answer(info, blob, name, filename, environ):
    """The answer to a GET of a blob: whole, one byte range, or 304 (BLOB-6, BLOB-8)."""
    etag = f'"{name}"'
    inline = INLINE_BLOB_TYPES.match(info.content_type.partition(";")[0].strip().lower())
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, no-cache",
               "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'",
               "Content-Type": info.content_type if inline else "application/octet-stream"}
    if filename is not None or not inline:
        headers["Content-Disposition"] = _attachment(filename)
    if etag in (tag.strip().removeprefix("W/") for tag in environ.get("HTTP_IF_NONE_MATCH", "").split(",")) \
            or environ.get("HTTP_IF_NONE_MATCH", "").strip() == "*":
        blob.close()
        return bottle.HTTPResponse(status=304, headers={"ETag": etag, "Cache-Control": "private, no-cache"})
    status, start, end = 200, 0, info.length
    if environ.get("HTTP_IF_RANGE", etag) == etag:
        byte_range = _byte_range(environ.get("HTTP_RANGE"), info.length)
        if byte_range is not None:
            status, (start, end) = 206, byte_range
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{info.length}"
    headers["Content-Length"] = str(end - start)
    return bottle.HTTPResponse(body=_blob_bytes(blob, start, end), status=status, headers=headers)


def _byte_range(header, length):
    """(start, end) of the one byte range a Range header asks for, or None to send all (RFC 9110, 14)."""
    match = BYTE_RANGE.match((header or "").replace(" ", ""))
    if match is None or match.groups() == ("", ""):
        return None         # not one byte range: ignored, as the RFC allows
    first, last = match.groups()
    if first == "":
        if int(last) == 0:
            raise _unsatisfiable(length)
        # A suffix of an empty blob is all of it: nothing a 206 could say.
        return (max(0, length - int(last)), length) if length else None
    if last != "" and int(last) < int(first):
        return None         # not a valid range: ignored
    if int(first) >= length:
        raise _unsatisfiable(length)
    return int(first), length if last == "" else min(int(last) + 1, length)


def _unsatisfiable(length):
    return ProtocolError("range_not_satisfiable", f"the blob has {length} bytes",
                         headers={"Content-Range": f"bytes */{length}"})


def _blob_bytes(blob, start, end):
    try:
        blob.seek(BLOB_HEADER_SIZE + start)
        while start < end:
            chunk = blob.read(min(BLOB_CHUNK, end - start))
            if not chunk:
                raise StorageError(blob.name, "the blob file ended early")
            start += len(chunk)
            yield chunk
    finally:
        blob.close()


def _attachment(filename):
    """A Content-Disposition for a download named filename, made safe to save (BLOB-6)."""
    if filename is None:
        return "attachment"
    # The last part of a path; no control or format characters (a right-to-left
    # override could make "txt.exe" look like "exe.txt"), none that file systems refuse.
    name = re.split(r"[/\\]", filename)[-1]
    name = "".join("_" if unicodedata.category(c)[0] == "C" or c in '"*:<>?|' else c for c in name)
    name = name.strip(" .")[:200].rstrip(" .") or "download"
    fallback = name.encode("ascii", "replace").decode().replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


@app.route("/<domain>/<user>/<bucket>", method="OPTIONS")
@app.route("/<domain>/<user>/<bucket>/+static/<name>", method="OPTIONS")
@app.route("/verify", method="OPTIONS")
def preflight(**url_parts):
    # [CORS-2] No token is needed: a browser sends none with a preflight.
    return _answer(204, None)


@app.post("/verify")
@_protocol
def verify():
    assertion, audience = parse_verify_form(_body(MAX_VERIFY_BYTES), bottle.request.content_type)
    bottle.request.environ["cutout.audience"] = audience        # for the CORS headers (CORS-3)
    config = _config()
    return _answer(*verify_assertion(config.secret, config.verifier, assertion, audience, time.time(),
                                     config.http_apps))


@app.get("/syncclient.js")
def syncclient_js():
    # [JS-1] The same bytes for every request: the library finds its server
    # from where it was loaded, so nothing a request says (Host) is written
    # into it, and a cache in front may serve it to anyone.
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "syncclient.js"), "rb") as script:
        answer = _answer(200, script.read(), "application/javascript; charset=utf-8")
    answer.set_header("Cache-Control", "no-cache")     # a new version is fetched at once
    return answer


def _answer_headers(method, path, origin, audience=None):
    """The headers every answer to method on path carries: nosniff, CORS (CORS-1..3), backoff (BACKOFF-1).

    path is as it was sent, still percent-encoded; audience is what a POST
    to /verify named. nosniff because an answer may quote the request's text
    (an error naming a bucket): a browser must never take it for a page.
    """
    parts = path.strip("/").split("/")
    allowed = False
    if path == "/verify":
        # [CORS-3] Any origin may ask; only the audience's origin may read the answer.
        allowed = origin is not None and (method == "OPTIONS" or (
            domain_of_origin(origin) is not None
            and origin.rstrip("/").lower() == (audience or "").rstrip("/").lower()))
    elif _is_collection_path(parts) and origin is not None:
        # [CORS-1] Only the origin of the collection's domain, one origin per header.
        allowed = domain_of_origin(origin) == urllib.parse.unquote(parts[0])
    headers = [("Vary", "Origin"), ("X-Content-Type-Options", "nosniff")]
    if path == "/syncclient.js":
        headers.append(("Access-Control-Allow-Origin", "*"))
    elif allowed:
        headers += [("Access-Control-Allow-Origin", origin), ("Access-Control-Expose-Headers", EXPOSED_HEADERS)]
        if method == "OPTIONS":
            headers += [("Access-Control-Allow-Methods", "GET" if len(parts) == 5 else ", ".join(COLLECTION_METHODS)),
                        ("Access-Control-Allow-Headers", "Content-Type, Range, If-None-Match, If-Range"),
                        ("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE))]
    poll_time = _config().poll_time
    if poll_time and len(parts) == 3:
        headers.append(("X-Sync-Poll-Time", str(poll_time)))
    return headers


@app.hook("after_request")
def _add_answer_headers():
    request, response = bottle.request, bottle.response
    origin = request.environ.get("HTTP_ORIGIN")
    audience = request.environ.get("cutout.audience")      # set by verify() once it has read the form
    for name, value in _answer_headers(request.method, _raw_path(request.environ), origin, audience):
        if name == "Vary":
            response.add_header(name, value)
        else:
            response.set_header(name, value)


def _is_collection_path(parts):
    """Whether the path's parts name a collection or one of its blobs."""
    return len(parts) == 3 or len(parts) == 5 and parts[3] == "+static"


def _raw_path(environ):
    """The request's path as it was sent, still percent-encoded (see Front)."""
    request_uri = environ.get("REQUEST_URI", "")
    if request_uri.startswith("/"):     # not urlsplit: it reads "//a/b" as a host and a path
        return request_uri.partition("?")[0]
    return environ.get("PATH_INFO", "/")


def _json_error_page(error):
    # bottle's own errors (no route: 404, wrong method: 405 with Allow) as JSON too.
    codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    bottle.response.content_type = "application/json"
    if error.status_code >= 500:
        log.error("unexpected error: %s", error.exception)
        return json.dumps({"error": "internal_error", "message": "internal error"})
    return json.dumps({"error": codes.get(error.status_code, "bad_request"), "message": error.body})


app.default_error_handler = _json_error_page


class _DebugLog:
    """A stream for wsgi.errors: tracebacks go to the log at DEBUG, so only --debug shows them."""

    def write(self, text):
        log.debug("%s", text.rstrip())

    def flush(self):
        pass


_DEBUG_LOG = _DebugLog()
RETRY_AFTER = 1               # seconds, in the Retry-After of a 503 (BACKOFF-1)


class Front:
    """What stands between an HTTP server and bottle: what bottle cannot do.

    As a WSGI application, any server can run it: it answers an empty poll
    itself (empty_poll), and hands every other request to bottle (dispatch).
    The server below asks it for those two apart, so that it can answer
    empty polls on its event loop and the rest on threads; for the most a
    request's body may hold, so that it refuses a larger one before reading
    it (body_limit); for the 503 it answers when too many requests are
    in progress (overloaded), and which requests that limit does not count (exempt);
    and for the 413 of a body over its limit (too_large).
    """

    def __init__(self, application):
        self.application = application

    def __call__(self, environ, start_response):
        answer = self.empty_poll(environ)
        if answer is None:
            return self.dispatch(environ, start_response)
        status, headers, body = answer
        start_response(status, headers)
        return [body]

    def empty_poll(self, environ):
        """(status, headers, body) of the answer to an empty poll, or None for any other request.

        [GET-3] An empty poll is answered 204 from the PollState remembered
        for the collection: one stat() and no file opened, so the server
        may answer it without a thread. Anything else, a request that is
        wrong included, is None: bottle answers it in full.
        """
        if environ["REQUEST_METHOD"] != "GET":
            return None
        path = _raw_path(environ)
        parts = path[1:].split("/")
        if len(parts) != 3:
            return None
        try:
            db, pairs = _collection(environ.get("QUERY_STRING", ""), *parts)
            query = parse_sync_query(pairs)
        except ProtocolError:
            return None
        state = db.poll_state()
        if state is None or not nothing_new(state, query):
            return None
        return "204 No Content", _answer_headers("GET", path, environ.get("HTTP_ORIGIN")), b""

    def dispatch(self, environ, start_response):
        """Answer any request with bottle.

        Bottle gets the path as it was sent, still percent-encoded, because
        servers decode PATH_INFO and a "/" inside a name would split it
        (PATH-1); and the tracebacks it writes go to the log at DEBUG.
        Other servers pass on the Content-Length: 0 bottle gives a 204 or
        304, which HTTP forbids on a 204 and which would be wrong on a 304
        (RFC 9110, 8.6), so it is dropped here.
        """
        environ["wsgi.errors"] = _DEBUG_LOG
        environ["PATH_INFO"] = _raw_path(environ)

        def respond(status, headers, exc_info=None):
            if status.startswith(("204", "304")):
                headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
            return start_response(status, headers, exc_info)
        return self.application(environ, respond)

    def body_limit(self, environ):
        return _body_limit(environ)

    def overloaded(self, environ):
        return _overloaded(environ)

    def too_large(self, environ, limit):
        return _too_large(environ, limit)

    def exempt(self, environ):
        """Whether a request is one of the cluster's own, which the server does not count against
        --max-concurrent and runs on threads of its own: nodes that wait on each other (a write's
        copy, CLUSTER-8) must never wait for a place behind the clients' requests that wait on them."""
        return _raw_path(environ).startswith("/_node/") and _authorized(environ, _config().secret)


def _too_large(environ, limit):
    """The 413 for a body over the limit body_limit gave (LIMIT-1), saying which limits make it."""
    limits = _config().limits
    if limit == limits.max_post_bytes and environ["REQUEST_METHOD"] == "POST":
        return ProtocolError("too_large", limits.post_too_large())
    return ProtocolError("too_large", f"the body is larger than {limit} bytes")


def _authorized(environ, secret):
    """Whether a request carries the cluster's secret (CLUSTER-3); a client's token never does."""
    scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), secret)


def _body_limit(environ):
    """The most bytes the body of this request may have, known from its head (LIMIT-1, AUTH-1)."""
    limits = _config().limits
    path = _raw_path(environ)
    if path == "/verify":
        return MAX_VERIFY_BYTES
    if environ["REQUEST_METHOD"] == "POST" and len(path[1:].split("/")) == 3:
        return limits.max_post_bytes        # the objects, and the base64 of one largest blob
    if path.startswith("/_node/"):
        return limits.max_post_bytes + NODE_HEAD_BYTES      # a write's copy, or a blob's file (CLUSTER-8)
    return limits.max_body_bytes


def _overloaded(environ):
    """(status, headers, body) of the 503 a busy server answers (BACKOFF-1).

    With the CORS headers of the path, so that a browser can read its Retry-After.
    """
    headers = _answer_headers(environ["REQUEST_METHOD"], _raw_path(environ), environ.get("HTTP_ORIGIN"))
    headers.append(("Retry-After", str(RETRY_AFTER)))
    return _error_answer_parts(ProtocolError("overloaded", "too busy: try again later"), headers)


def _error_answer_parts(error, headers=()):
    """(status, headers, body) of error as JSON, for answers made without bottle."""
    return (f"{error.status} {http.HTTPStatus(error.status).phrase}",
            [*headers, ("Content-Type", "application/json")],
            json.dumps({"error": error.code, "message": error.message}).encode())


###############################################################################
# Balancer: collections spread over nodes, and the proxy in front of them
###############################################################################
# A cluster is a balancer in front of several cutout.py nodes that share one
# secret file (SPEC.md chapter 4). The balancer sends each request to the
# node that owns its collection; every node knows the membership, so it can
# refuse a write that reached it by mistake. Which node owns a collection is
# decided by rendezvous hashing (CLUSTER-1): every node's weight for the
# collection is a hash of the two, and the heaviest node owns it. With no
# virtual points to tune, the spread is as even as the hash, and a node that
# joins takes over exactly the collections it now outweighs.
#
# Each collection has B backups besides its owner, which store every write
# before the owner answers it (CLUSTER-8); a node joins or leaves by handing
# the collections that change nodes to their new owners (CLUSTER-10).

CLUSTER_FILE = ".cluster.json"    # in a node's data directory: the membership it was last given
PLACEMENTS_CACHED = 100_000         # users whose nodes a process remembers: each took 3 hashes and a sort


def placement(nodes, domain, user):
    """The nodes of a user's collections of one app, heaviest first (CLUSTER-1): the owner first.

    domain and user are the collection's directory names (escape_name, DISK-1), which
    every node can read from its data directory. All of a user's collections of an
    app share their nodes, so that a node can count them (LIMIT-2) and a user's data
    moves together.
    """
    return _placement(tuple(nodes), domain, user)


@functools.lru_cache(maxsize=PLACEMENTS_CACHED)
def _placement(nodes, domain, user):
    def weight(node):
        key = json.dumps([node, domain, user], ensure_ascii=False).encode()
        return hashlib.sha256(key).digest()[:8]
    return tuple(sorted(nodes, key=weight, reverse=True))


@dataclasses.dataclass(frozen=True)
class Membership:
    """Which nodes the cluster has (CLUSTER-2); version grows with every change.

    While nodes join or leave, previous holds the nodes before the change and
    gone those that left without handing anything over (CLUSTER-10).
    """

    version: int
    nodes: tuple
    backups: int = 0
    own_url: str = None     # "self": the node's own URL, as the balancer reaches it (in no list once it left)
    previous: tuple = None
    gone: tuple = ()

    @classmethod
    def from_json(cls, value):
        """A Membership from its JSON form; ValueError if it is not one."""
        names = ("version", "nodes", "backups", "self", "previous", "gone")
        if not isinstance(value, dict) or set(value) - set(names):
            raise ValueError('a membership is {"version", "nodes", "backups"[, "self", "previous", "gone"]}')
        version, nodes, backups, self_url, previous, gone = (value.get(name) for name in names)
        gone = [] if gone is None else gone

        def node_list(urls):
            return (isinstance(urls, list) and urls and len(set(urls)) == len(urls)
                    and all(isinstance(url, str) and _node_url(url) == url for url in urls))
        if not (type(version) is int and version >= 1 and node_list(nodes)
                and type(backups) is int and 0 <= backups < len(nodes)
                and (previous is None or node_list(previous) and backups < len(previous))
                and isinstance(gone, list) and set(gone) <= set(previous or []) - set(nodes)
                and (self_url is None or _node_url(self_url) == self_url)):
            raise ValueError("a membership needs a version >= 1, distinct node URLs, and fewer backups than nodes")
        return cls(version, tuple(nodes), backups, self_url, previous and tuple(previous), tuple(gone))

    def to_json(self):
        value = {"version": self.version, "nodes": list(self.nodes), "backups": self.backups}
        if self.previous is not None:
            value.update(previous=list(self.previous), gone=list(self.gone))
        return value if self.own_url is None else {**value, "self": self.own_url}

    def replicas(self, domain, user):
        """The owner and the backups of a user's collections of an app (names as escape_name gives them)."""
        return placement(self.nodes, domain, user)[:self.backups + 1]

    def previous_replicas(self, domain, user):
        """While nodes join or leave, the owner and backups before the change."""
        return placement(self.previous, domain, user)[:self.backups + 1]

    def source(self, domain, user):
        """While nodes join or leave, the node that hands a user's collections over (CLUSTER-10):
        the owner before the change, or if it is gone, the first backup that is not."""
        return next((node for node in self.previous_replicas(domain, user) if node not in self.gone), None)


def _node_url(text):
    """text as a node's base URL, http://host:port with no path; None if it is not one."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    return f"{parts.scheme}://{parts.netloc}"


# In a collection directory on a node of a cluster:
HANDED_OVER_FILE = "handed-over"    # the membership version in which it was handed to this node (CLUSTER-10)
UNPUBLISHED_FILE = "unpublished"    # the owner shows no record after this counter: not on every backup yet
REPLICA_LOCK_FILE = "replica.lock"  # held while the owner brings the backups up to date


class NodeCluster:
    """A node's view of its cluster: the membership in its data directory, if it has one.

    Every worker process reads the file, and reads it again when it changes, so
    a membership given to one worker holds in all of them.
    """

    def __init__(self, data_dir):
        self.path = os.path.join(data_dir, CLUSTER_FILE)
        self._read = (None, None)       # (identity of the file, Membership)

    def membership(self):
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        identity = status.st_ino, status.st_size, status.st_mtime_ns
        if self._read[0] != identity:
            with open(self.path, "rb") as file:
                self._read = identity, Membership.from_json(json.loads(file.read()))
        return self._read[1]

    def store(self, membership):
        """Keep membership, unless the one kept is newer (CLUSTER-2); the one kept after."""
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            kept = self.membership()
            # An older membership, or another one under the same version (two balancers that
            # started at once), is refused: nodes must never disagree about a version.
            if kept is not None and (kept.version > membership.version or kept.version == membership.version
                                     and dataclasses.replace(kept, own_url=None)
                                     != dataclasses.replace(membership, own_url=None)):
                return kept
            with open(self.path + ".new", "w") as file:
                json.dump(membership.to_json(), file)
                file.flush()
                sync_data(file.fileno())
            os.rename(self.path + ".new", self.path)
            _fsync_dir(os.path.dirname(self.path))
        return membership

    def check(self, db, write):
        """Refuse a client's request this node must not answer (CLUSTER-5), or not yet (CLUSTER-10)."""
        membership = self.membership()
        if membership is None or membership.own_url is None:
            return      # in no cluster: it answers everything
        misdirected = _misdirected(membership, db, write)
        if misdirected:
            raise ProtocolError("misdirected", misdirected)
        if membership.previous is not None and _in_transit(membership, db):
            raise ProtocolError("in_transit", "this collection is moving between nodes: try again soon",
                                headers={"Retry-After": str(RETRY_AFTER)})

    @contextlib.contextmanager
    def writing(self, db):
        """[CLUSTER-8] Around a client's write to db's collection; yields copy(after=None, deleted=False),
        which brings every backup up to this owner's copy once the write is durable, or raises 503.

        after: the counter the write came after (its records go to the backups);
        deleted: the collection was deleted (the backups fetch it whole). Until
        the backups hold a write, the owner does not show it (hide_unpublished),
        so that no client reads what a backup might not hold; a write they did
        not all store stays hidden until the next write brings them up to date
        first. One write of a collection is made and copied at a time.
        """
        membership = self.membership()
        if membership is None or membership.own_url is None or not membership.backups:
            yield lambda after=None, deleted=False, numbered=None: None
            return
        backups = membership.replicas(*_escaped_names(db)[:2])[1:]
        unpublished_path, lock_path = (os.path.join(db.path, name) for name in (UNPUBLISHED_FILE, REPLICA_LOCK_FILE))
        existed = db.exists()
        _make_dirs_durably(db.path)
        copying, hiding = [], []
        try:
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                earlier = _read_counter(unpublished_path)
                if earlier is not None:
                    self._copy(db, backups, membership.own_url, earlier)
                _write_counter(unpublished_path, _position(db)[1])     # what reads show until the copy is made
                hiding.append(True)

                def copy(after=None, deleted=False, numbered=None):
                    copying.append(True)
                    self._copy(db, backups, membership.own_url, after, deleted, numbered)
                yield copy
        finally:
            if hiding and not copying:      # nothing was written: nothing to hide, and no collection made
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(unpublished_path)
                if not existed and not db.exists():
                    with contextlib.suppress(OSError):
                        os.unlink(lock_path)
                        os.rmdir(db.path)

    def _copy(self, db, backups, own_url, after, deleted=False, numbered=None):
        """Bring the backups up to this copy, from after on (or whole); then show what they hold.

        numbered: the records after `after` as [(counter, record)], if the caller has them.
        """
        try:
            for backup in backups:
                _bring_up_to_date(backup, own_url, db, None if deleted else after, numbered)
        except (OSError, http.client.HTTPException, RuntimeError) as error:
            log.warning("%s: a backup did not store a write: %s", db.path, error)
            raise ProtocolError("backup_unavailable", "a backup of this collection did not store it: try again",
                                headers={"Retry-After": str(RETRY_AFTER)}) from None
        os.unlink(os.path.join(db.path, UNPUBLISHED_FILE))

    def hide_unpublished(self, db, snapshot):
        """Show a read only what every backup holds (CLUSTER-8)."""
        unpublished = _read_counter(os.path.join(db.path, UNPUBLISHED_FILE))
        if unpublished is not None:
            snapshot.hide_after(unpublished)


def _misdirected(membership, db, write):
    """Why this node must not answer a client's request to db's collection (CLUSTER-5), or None:
    it answers a write only to a collection it owns, and a read only of one it owns or backs up."""
    own = membership.own_url
    if own not in _members(membership):
        return f"this node left the cluster: ask {', '.join(membership.nodes)}"
    replicas = membership.replicas(*_escaped_names(db)[:2])
    if write and replicas[0] != own:
        return f"this collection's writes go to {replicas[0]}"
    if not write and own not in replicas:
        return f"this node holds no copy of this collection: ask {replicas[0]}"
    return None


def _in_transit(membership, db):
    """Whether db's collection is being handed to this node, and not yet here (CLUSTER-10)."""
    domain, user, _ = _escaped_names(db)
    if membership.source(domain, user) == membership.own_url == membership.previous_replicas(domain, user)[0]:
        return False        # the owner before the change, and after it: nothing moves
    return _read_counter(os.path.join(db.path, HANDED_OVER_FILE)) != membership.version


def _position(db):
    """(collection_id, last counter) of db's collection, from its poll state if that holds (DISK-7)."""
    state = db.poll_state()
    if state is not None:
        return state.collection_id, state.last_counter
    if not db.exists():
        return db.first_id, 0
    with db.snapshot(create=False) as snapshot:
        return snapshot.collection_id, snapshot.last_counter


def _read_counter(path):
    try:
        with open(path) as file:
            return int(file.read())
    except FileNotFoundError:
        return None


def _write_counter(path, counter, durable=False):
    """Replace the file at path by one holding counter; durable: synced, and its directory too."""
    with open(path + ".new", "w") as file:
        file.write(str(counter))
        if durable:
            file.flush()
            sync_data(file.fileno())
    os.rename(path + ".new", path)
    if durable:
        _fsync_dir(os.path.dirname(path))


def _escaped_names(db):
    """(domain, user, bucket) of a collection directory, as escape_name gave them (DISK-1)."""
    return tuple(db.path.rsplit(os.sep, 3)[1:])


def _node_route(handler):
    """A node route: only with the cluster's secret (CLUSTER-3), errors as JSON."""
    @_protocol
    @functools.wraps(handler)
    def route(**url_parts):
        if not _authorized(bottle.request.environ, _config().secret):
            raise ProtocolError("unauthorized", "node routes need the cluster's secret")
        return handler(**url_parts)
    return route


@app.route("/_node/cluster", method=["GET", "PUT"])
@_node_route
def node_cluster():
    """[CLUSTER-2] The membership this node keeps: read, or given a newer one."""
    cluster = _config().cluster
    if bottle.request.method == "PUT":
        try:
            given = Membership.from_json(parse_json_body(bytes(_body()), _config().limits))
        except ValueError as error:
            raise ProtocolError("bad_request", str(error)) from None
        if given.own_url is None:
            raise ProtocolError("bad_request", "a node is given its membership with \"self\", its own URL")
        if cluster.store(given) != given:
            raise ProtocolError("stale_cluster", f"this node has version {cluster.membership().version}")
    membership = cluster.membership()
    if membership is None:
        raise ProtocolError("not_found", "this node is in no cluster")
    return _answer(200, json.dumps(membership.to_json()).encode())


# Copies on other nodes. The owner of a collection sends every write to its
# backups before it answers (CLUSTER-8), and a copy that is behind fetches
# the owner's whole collection (CLUSTER-9). Every copy of a collection is so
# a prefix of its owner's, and of two copies the one with the higher last
# counter is the newer: every write, a delete included, raises it. Copies
# are only ever replaced by newer ones, so every step below may be repeated.

# A name as escape_name() makes it (DISK-1), in node routes' paths:
#   escaped-name = 1*200( ALPHA / DIGIT / "." / "_" / "@" / "+" / "%" / "~" / "-" ), not starting with "."
ESCAPED_NAME = re.compile(r"(?!\.)[A-Za-z0-9._@+%~-]{1,200}\Z")
REPLICATE_TIMEOUT = 10          # seconds a backup may take to store a write's copy
COPY_TIMEOUT = 600              # seconds a node may take to send or fetch a whole collection
NUMBERED_RECORD = struct.Struct(">QI")      # counter, length; then the record's bytes
BLOB_NAME_BYTES = 70                        # a blob's name as JSON in a list, with its comma


def _copy_db(domain, user, bucket):
    """The collection a node route names by its escaped names; ProtocolError if they are not such names."""
    names = [urllib.parse.unquote(part) for part in (domain, user, bucket)]
    if not all(ESCAPED_NAME.match(name) for name in names):
        raise ProtocolError("bad_path", "node routes name a collection by its directory names (DISK-1)")
    return AppendOnlyDB(os.path.join(_config().data_dir.root, *names))


def _node_path(route, db):
    return f"/_node/{route}/" + "/".join(urllib.parse.quote(name, safe="") for name in _escaped_names(db))


def _bring_up_to_date(backup, own_url, db, after, numbered=None):
    """Send backup the records after `after` (numbered, if given: [(counter, record)]), and the blobs
    they name that it lacks; or have it fetch the whole collection."""
    secret = _config().secret
    for _ in range(3):
        if after is None:
            break
        if numbered is None:
            with db.snapshot() as snapshot:
                collection_id, numbered, size = snapshot.collection_id, [], 0
                for counter, record in snapshot.records_after(after):
                    numbered.append((counter, bytes(record)))
                    size += NUMBERED_RECORD.size + len(record) + (BLOB_NAME_BYTES if b'"href"' in record else 0)
                    if size > _config().limits.max_post_bytes:
                        break       # more than one write's worth: the backup fetches the whole
            if size > _config().limits.max_post_bytes:
                break
        else:
            collection_id = _position(db)[0]
        names = [name for name in map(_blob_name_of, (record for _, record in numbered))
                 if name and blob_info(db, name) is not None]
        head = json.dumps({"after": after, "collection_id": collection_id, "blobs": names}).encode()
        body = b"".join([head, b"\n", *(NUMBERED_RECORD.pack(counter, len(record)) + record
                                         for counter, record in numbered)])
        status, answer = _node_call(backup, "POST", _node_path("replicate", db), secret, body,
                                    timeout=REPLICATE_TIMEOUT)
        if status == 200:
            return
        if status == 409 and answer.get("error") == "blobs_missing":
            for name in answer["blobs"]:
                _send_blob(backup, db, name)
            numbered = None     # read again: a blob deleted meanwhile is no longer named
            continue
        if status == 409 and answer.get("error") == "behind":
            break
        raise RuntimeError(f"{backup} answered a copy of a write with {status}: {answer}")
    last_counter = _position(db)[1]
    status, answer = _node_call(backup, "POST", _node_path("fetch", db) + "?" + urllib.parse.urlencode(
        {"from": own_url, "last_counter": last_counter}), secret, timeout=COPY_TIMEOUT)
    if status != 200 or answer["last_counter"] < last_counter:
        raise RuntimeError(f"{backup} did not fetch the collection: {status} {answer}")


def _send_blob(backup, db, name):
    """PUT one blob's file to backup; a blob deleted here meanwhile is not sent (no record needs it)."""
    found = open_blob(db, name)
    if found is None:
        return
    info, blob = found
    with blob:
        blob.seek(0)
        status, answer = _node_call(backup, "PUT", _node_path("blob", db) + "/" + name, _config().secret, blob,
                                    timeout=REPLICATE_TIMEOUT, length=BLOB_HEADER_SIZE + info.length)
    if status != 200:
        raise RuntimeError(f"{backup} did not store blob {name}: {status} {answer}")


@app.post("/_node/replicate/<domain>/<user>/<bucket>")
@_node_route
def node_replicate(domain, user, bucket):
    """[CLUSTER-8] A backup stores the records its owner sends, with their counters."""
    db = _copy_db(domain, user, bucket)
    head, _, packed = bytes(_body(_config().limits.max_post_bytes + NODE_HEAD_BYTES)).partition(b"\n")
    try:
        head = json.loads(head)
        after, collection_id, names = head["after"], head["collection_id"], head["blobs"]
        numbered, offset = [], 0
        while offset < len(packed):
            counter, length = NUMBERED_RECORD.unpack_from(packed, offset)
            offset += NUMBERED_RECORD.size + length
            numbered.append((counter, packed[offset - length:offset]))
        counters = [after] + [counter for counter, _ in numbered]
        if offset != len(packed) or counters != sorted(set(counters)) or not all(map(BLOB_NAME.match, names)):
            raise ValueError
    except (ValueError, KeyError, TypeError, struct.error):
        raise ProtocolError("bad_request", "not a copy of a write") from None
    paths = [os.path.join(db.blobs_path, *BLOB_NAME.match(name).groups()) for name in names]
    missing = [name for name, path in zip(names, paths)
               if not os.path.exists(path) and not os.path.exists(path + ".partial")]
    if missing:
        return _answer(ERRORS["blobs_missing"], json.dumps({"error": "blobs_missing", "blobs": missing,
                                                            "message": "send these blobs first"}).encode())

    def place_blobs(secret):        # under the writer lock, as an upload's (see BlobBatch)
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path + ".partial", path)
        for directory in {os.path.dirname(path) for path in paths}:
            _fsync_dir(directory)
        return all(map(os.path.exists, paths))

    def prune_blobs(secret):
        ended = BlobBatch(db)
        for _, record in numbered:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                obj = json.loads(record)
                ended.owner(obj["type"], obj["id"], _named_blob(obj))
        ended.prune(secret)
    try:
        last_counter = db.append_copied(numbered, after, collection_id, place_blobs, prune_blobs)
        _forget_unpublished(db)
    except AppendConflict as behind:
        return _answer(ERRORS["behind"], json.dumps({"error": "behind", "last_counter": behind.last_counter,
                                                     "message": "fetch the whole collection"}).encode())
    return _answer(200, json.dumps({"last_counter": last_counter}).encode())


@app.put("/_node/blob/<domain>/<user>/<bucket>/<name>")
@_node_route
def node_blob(domain, user, bucket, name):
    """[CLUSTER-8] A backup stores a blob's file before the record that names it."""
    db, match = _copy_db(domain, user, bucket), BLOB_NAME.match(name)
    if match is None:
        raise ProtocolError("bad_path", "not a blob's name")
    body = _body(_config().limits.max_post_bytes + NODE_HEAD_BYTES)
    path = os.path.join(db.blobs_path, *match.groups())
    try:
        sent = BlobInfo.decode(bytes(body[:BLOB_HEADER_SIZE]), path)
    except StorageError:
        raise ProtocolError("bad_blob", "not a blob file") from None
    receiving = f"{path}.{secrets.token_hex(8)}.partial"
    written = _write_blob_file(receiving, sent.content_type, [memoryview(body)[BLOB_HEADER_SIZE:]])
    if written != sent:
        os.unlink(receiving)
        raise ProtocolError("bad_blob", "the blob's bytes do not match its header")
    os.rename(receiving, path + ".partial")     # whole: its record's append puts it in place
    return _answer(200, b"{}")


@app.get("/_node/copy/<domain>/<user>/<bucket>")
@_node_route
def node_copy(domain, user, bucket):
    """[CLUSTER-9] The whole collection, exported (DISK-12), for a node that fetches it."""
    db = _held_copy(domain, user, bucket)
    export = tempfile.TemporaryFile()
    try:
        export_collection(db, export)
        size = export.tell()
        export.seek(0)
    except BaseException:
        export.close()
        raise
    return bottle.HTTPResponse(body=_file_chunks(export),
                               headers={"Content-Type": "application/x-tar", "Content-Length": str(size)})


@app.get("/_node/state/<domain>/<user>/<bucket>")
@_node_route
def node_state(domain, user, bucket):
    """[CLUSTER-9] Which state of the collection this node's copy holds: its collection_id and last counter."""
    return _state_answer(_held_copy(domain, user, bucket))


def _held_copy(domain, user, bucket):
    db = _copy_db(domain, user, bucket)
    if not db.exists():
        raise ProtocolError("not_found", "this node holds no copy of this collection")
    return db


def _state_answer(db):
    """{"collection_id", "last_counter"} of this node's copy (null and 0 without one)."""
    collection_id, last_counter = _position(db)
    return _answer(200, json.dumps({"collection_id": collection_id, "last_counter": last_counter}).encode())


@app.post("/_node/fetch/<domain>/<user>/<bucket>")
@_node_route
def node_fetch(domain, user, bucket):
    """[CLUSTER-9] Fetch the collection from another node, if that copy is newer than this one's."""
    db = _copy_db(domain, user, bucket)
    pairs = dict(_query_pairs(bottle.request.query_string))
    source, last_counter = _node_url(pairs.get("from", "")), pairs.get("last_counter", "")
    if source is None or not last_counter.isdigit() or not pairs.get("version", "0").isdigit():
        raise ProtocolError("bad_request", "fetch needs from=NODE and last_counter=N, and a version is a number")
    fetch_copy(db, source, int(last_counter))
    if "version" in pairs:      # [CLUSTER-10] the last step of handing it to this node
        _mark_handed_over(db, int(pairs["version"]))
    return _state_answer(db)


def fetch_copy(db, source, last_counter):
    """Make db a copy of source's collection, if source's (at last_counter) is newer than db's."""
    if db.exists() and _position(db)[1] >= last_counter:
        return
    connection = _node_connection(source, COPY_TIMEOUT)
    try:
        connection.request("GET", _node_path("copy", db), headers=_secret_header(_config().secret))
        answer = connection.getresponse()
        if answer.status == 404:
            return      # nothing there to copy: the collection was never written
        if answer.status != 200:
            raise ProtocolError("node_unavailable", f"{source} did not send the collection: {answer.status}")
        import_collection(db, answer, copy=True)
        _forget_unpublished(db)
    except (OSError, http.client.HTTPException) as error:
        raise ProtocolError("node_unavailable", f"{source} did not send the collection: {error}") from None
    finally:
        connection.close()


def _forget_unpublished(db):
    """A copy this node was sent holds what it holds: what it left unpublished as an owner is past."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(db.path, UNPUBLISHED_FILE))


def _mark_handed_over(db, version):
    _make_dirs_durably(db.path)
    _write_counter(os.path.join(db.path, HANDED_OVER_FILE), version, durable=True)


@app.post("/_node/hand-over")
@_node_route
def node_hand_over():
    """[CLUSTER-10] Hand over every collection this node is the source of in the change going on."""
    membership, secret = _config().cluster.membership(), _config().secret
    if membership is None or membership.previous is None:
        raise ProtocolError("bad_request", "no change of the membership is going on")
    own, handed = membership.own_url, 0
    for db in _config().data_dir.collections():
        domain, user, _ = _escaped_names(db)
        before, after = membership.previous_replicas(domain, user), membership.replicas(domain, user)
        if membership.source(domain, user) != own or before == after:
            continue
        if before[0] in membership.gone:
            # The owner left without handing over: the newest of the copies left goes on (CLUSTER-11).
            for other in before:
                if other not in membership.gone and other != own:
                    try:
                        status, state = _node_call(other, "GET", _node_path("state", db), secret)
                    except (OSError, http.client.HTTPException) as error:
                        log.warning("%s: no newer copy asked of %s: %s", db.path, other, error)
                        continue
                    if status == 200:
                        fetch_copy(db, other, state["last_counter"])
        last_counter = _position(db)[1]
        for target in [*after[1:], after[0]]:       # the new owner last: it is served from then on
            query = {"from": own, "last_counter": last_counter}
            if target == after[0]:
                query["version"] = membership.version
            if target == own:
                if "version" in query:
                    _mark_handed_over(db, membership.version)
                continue
            try:
                status, answer = _node_call(target, "POST", _node_path("fetch", db) + "?" +
                                            urllib.parse.urlencode(query), secret, timeout=COPY_TIMEOUT)
            except (OSError, http.client.HTTPException) as error:
                status, answer = None, str(error)
            if status != 200:
                raise ProtocolError("node_unavailable", f"{target} did not take {'/'.join(_escaped_names(db))}: "
                                    f"{status} {answer}")
        handed += 1
    return _answer(200, json.dumps({"handed_over": handed}).encode())


@app.post("/_node/clean")
@_node_route
def node_clean():
    """[CLUSTER-10] Delete the copies this node neither owns nor backs up any more."""
    membership, removed = _config().cluster.membership(), 0
    if membership is None or membership.previous is not None:
        raise ProtocolError("bad_request", "a change of the membership is going on, or there is none")
    for db in list(_config().data_dir.collections()):
        if membership.own_url not in membership.replicas(*_escaped_names(db)[:2]):
            shutil.rmtree(db.path)
            removed += 1
    return _answer(200, json.dumps({"removed": removed}).encode())


@app.post("/_node/leave")
@_node_route
def node_leave():
    """[CLUSTER-10] Leave the cluster: keep its membership, which does not name this node, so that
    every client request is refused (CLUSTER-5), and delete every collection."""
    try:
        given = Membership.from_json(parse_json_body(bytes(_body()), _config().limits))
    except ValueError as error:
        raise ProtocolError("bad_request", str(error)) from None
    if given.own_url is None or given.own_url in _members(given):
        raise ProtocolError("bad_request", "a node leaves with a membership that does not name it")
    if _config().cluster.store(given) != given:
        raise ProtocolError("stale_cluster", f"this node has version {_config().cluster.membership().version}")
    removed = 0
    for db in list(_config().data_dir.collections()):
        shutil.rmtree(db.path)
        removed += 1
    return _answer(200, json.dumps({"removed": removed}).encode())


# Headers that belong to one connection (RFC 9110, 7.6.1), never passed on; and those the
# balancer sets itself on a request (Host, and the length of the body it sends).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade"})
SET_BY_THE_BALANCER = HOP_BY_HOP | {"host", "content-length", "date"}
NODE_TIMEOUT = 60           # seconds a node may take to answer the balancer
NODE_IDLE_REUSE = 30        # seconds an idle node connection is reused for; nodes close theirs after IDLE_TIMEOUT
PROXY_CHUNK = 64 << 10      # bytes of a large answer passed on at a time
PROXY_READ_WHOLE = 4 << 20  # bytes: a longer answer is spooled to a file before it is passed on
SAFE_TO_SEND_AGAIN = frozenset({"GET", "HEAD", "OPTIONS"})
HAND_OVER_TIMEOUT = 3600    # seconds a node may take for one step of a change of the membership
REFRESH_TIMEOUT = 2         # seconds a node may take to say which membership it keeps


def _node_connection(node, timeout=NODE_TIMEOUT):
    """A new connection to node (not yet open)."""
    url = urllib.parse.urlsplit(node)
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    return kind(url.hostname, url.port, timeout=timeout)


def _secret_header(secret):
    return {"Authorization": f"Bearer {secret.decode()}"}


def _node_call(node, method, path, secret, body=None, timeout=NODE_TIMEOUT, length=None):
    """(status, JSON answer) of a node to one request of the cluster's own; OSError when it cannot be reached.

    body: bytes, or a file of length bytes. Every such request may be sent twice
    (CLUSTER-9), so one that meets a kept connection the node had closed is sent
    again on a new one.
    """
    headers = _secret_header(secret)
    if length is not None:
        headers["Content-Length"] = str(length)
    for attempt in (1, 2):
        connection = node_connections.take(node, timeout, new=attempt == 2)
        try:
            connection.request(method, path, body=body, headers=headers)
            answer = connection.getresponse()
            text = answer.read()
            break
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
            connection.close()
            if attempt == 2 or not isinstance(body, (bytes, type(None))):
                raise
        except BaseException:
            connection.close()
            raise
    node_connections.put_back(node, connection, answer)
    try:
        return answer.status, json.loads(text)
    except ValueError:
        raise http.client.HTTPException(f"{node} answered {method} {path} with {answer.status}, not JSON") from None


class NodeConnections:
    """Kept-alive connections to the nodes, in one process; each is used by one request at a time."""

    def __init__(self):
        self._idle = collections.defaultdict(list)      # node -> [(connection, idle since)]
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def take(self, node, timeout=NODE_TIMEOUT, new=False):
        """A connection to node that no request is using: a kept one, else a new one."""
        with self._lock:
            if self._pid != os.getpid():
                # Kept before the server forked its workers: each of them holds the same sockets.
                self._idle, self._pid = collections.defaultdict(list), os.getpid()
            while self._idle[node] and not new:
                connection, idle_since = self._idle[node].pop()
                if time.monotonic() - idle_since < NODE_IDLE_REUSE:
                    connection.timeout = timeout
                    connection.sock.settimeout(timeout)
                    return connection
                connection.close()
        return _node_connection(node, timeout)

    def put_back(self, node, connection, answer):
        if answer.will_close or connection.sock is None:
            connection.close()
            return
        with self._lock:
            self._idle[node].append((connection, time.monotonic()))


node_connections = NodeConnections()


class Balancer:
    """The balancer's front for the HTTP server (as Front is a node's): proxies every request
    to the node that owns its collection (CLUSTER-4) and answers the admin API (CLUSTER-6)."""

    def __init__(self, membership, secret):
        self.membership, self.secret = membership, secret
        self._admin_lock = threading.Lock()
        self._membership_lock = threading.Lock()

    def empty_poll(self, environ):
        return None             # every request goes to a node

    def body_limit(self, environ):
        return _body_limit(environ)

    def overloaded(self, environ):
        return _overloaded(environ)

    def too_large(self, environ, limit):
        return _too_large(environ, limit)

    def exempt(self, environ):
        """The admin API is exempt, as a node's routes are (Front.exempt): a change waits on the nodes."""
        return _is_admin_path(_raw_path(environ)) and _authorized(environ, self.secret)

    def dispatch(self, environ, start_response):
        path = _raw_path(environ)
        if _is_admin_path(path):
            status, headers, body = self.admin(environ, path)
            start_response(status, headers)
            return [body]
        if path.startswith("/_node/"):
            # Node routes are for the balancer and the nodes themselves, never passed on.
            status, headers, body = self._error(environ, ProtocolError("not_found", "no such route here"))
            start_response(status, headers)
            return [body]
        method, version = environ["REQUEST_METHOD"], self.membership.version
        nodes = self.nodes_for(path)
        for node in nodes if method in SAFE_TO_SEND_AGAIN else nodes[:1]:
            try:
                connection, answer = self.send(node, environ)
            except (OSError, http.client.HTTPException) as error:
                # [CLUSTER-7] A read goes on to the collection's backups while its owner is down.
                log.warning("node %s did not answer %s %s: %s", node, method, path, error)
                continue
            if answer.status == 421 and self.refresh() != version:
                # A node with a newer membership than this balancer's (another balancer, or another
                # worker of this one, changed it): asked again where the newer one says.
                answer.read()
                node_connections.put_back(node, connection, answer)
                return self.dispatch(environ, start_response)
            return self.pass_back(node, connection, answer, method, start_response)
        error = ProtocolError("node_unavailable", "the node that holds this collection did not answer")
        status, headers, body = self._error(environ, error, [("Retry-After", str(RETRY_AFTER))])
        start_response(status, headers)
        return [body]

    def _error(self, environ, error, headers=()):
        """An error the balancer answers itself, with the headers a node's would have (CORS, nosniff)."""
        return _error_answer_parts(error, [*_answer_headers(environ["REQUEST_METHOD"], _raw_path(environ),
                                                            environ.get("HTTP_ORIGIN")), *headers])

    def nodes_for(self, path):
        """The nodes a request may go to: its collection's owner, then its backups; else one node,
        chosen by the request's path."""
        parts = path[1:].split("/")
        if _is_collection_path(parts):
            try:
                return self.membership.replicas(*(escape_name(urllib.parse.unquote(part)) for part in parts[:2]))
            except ValueError:
                pass        # not a name any node takes: one of them says why
        return placement(self.membership.nodes, path, "")[:1]

    def refresh(self):
        """Take the newest membership the nodes keep, if it is newer than the one served; its version."""
        for node in _members(self.membership):
            with contextlib.suppress(OSError, LookupError, RuntimeError, ValueError, http.client.HTTPException):
                kept = Membership.from_json(_node_request(node, "GET", "/_node/cluster", self.secret,
                                                          timeout=REFRESH_TIMEOUT))
                with self._membership_lock:     # an admin change may have served a newer one meanwhile
                    if kept.version > self.membership.version:
                        self.membership = dataclasses.replace(kept, own_url=None)
        return self.membership.version

    def send(self, node, environ):
        """Send the request to node: (the connection, the node's answer, its head read)."""
        method = environ["REQUEST_METHOD"]
        target = _raw_path(environ) + (f"?{environ['QUERY_STRING']}" if environ.get("QUERY_STRING") else "")
        headers = {key[5:].replace("_", "-").title(): value for key, value in environ.items()
                   if key.startswith("HTTP_") and key[5:].replace("_", "-").lower() not in SET_BY_THE_BALANCER}
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        body = environ.get("cutout.body")
        if isinstance(body, mmap.mmap):
            body = memoryview(body)     # sent with its length, from its start every time, not as a stream
        for attempt in (1, 2):
            connection = node_connections.take(node, new=attempt == 2)
            try:
                connection.request(method, target, body=body, headers=headers)
                return connection, connection.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                connection.close()
                # A kept connection the node had closed: sent again on a new one, but only a
                # request that may be sent twice (a POST may have been stored).
                if attempt == 2 or method not in SAFE_TO_SEND_AGAIN:
                    raise
            except BaseException:
                connection.close()
                raise

    def pass_back(self, node, connection, answer, method, start_response):
        """Pass the node's answer back, naming the node (CLUSTER-4)."""
        passed = [(name, value) for name, value in answer.getheaders() if name.lower() not in SET_BY_THE_BALANCER]
        length = answer.getheader("Content-Length")
        if length is not None and answer.status not in (204, 304):
            passed.append(("Content-Length", length))
        if method == "HEAD" or answer.status in (204, 304) or (answer.length or 0) <= PROXY_READ_WHOLE:
            # Read here, on the request's thread: the server writes the answer from its event
            # loop, which must never wait on a node. Every answer but a large blob's is this small.
            try:
                whole = answer.read()
            except BaseException:
                connection.close()
                raise
            node_connections.put_back(node, connection, answer)
            start_response(f"{answer.status} {answer.reason}", passed + [("X-Cutout-Node", node)])
            return [whole]
        spool = tempfile.TemporaryFile()        # a large blob: to a local file first, for the same reason
        try:
            shutil.copyfileobj(answer, spool, PROXY_CHUNK)
        except BaseException:
            spool.close()
            connection.close()
            raise
        node_connections.put_back(node, connection, answer)
        spool.seek(0)
        start_response(f"{answer.status} {answer.reason}", passed + [("X-Cutout-Node", node)])
        return _file_chunks(spool)

    def admin(self, environ, path):
        """[CLUSTER-6] The admin API: GET /_cluster, POST /_cluster/nodes, POST /_cluster/remove."""
        if not _authorized(environ, self.secret):
            return self._error(environ, ProtocolError("unauthorized", "the admin API needs the cluster's secret"))
        method = {"/_cluster": "GET", "/_cluster/nodes": "POST", "/_cluster/remove": "POST"}.get(path)
        if method is None:
            return self._error(environ, ProtocolError("not_found", f"no admin route {path}"))
        if environ["REQUEST_METHOD"] != method:
            return self._error(environ, ProtocolError("method_not_allowed", f"{method} {path}"), [("Allow", method)])
        answer = {}
        try:
            if path == "/_cluster":
                self.refresh()
            else:
                url, force = _admin_change(environ.get("cutout.body") or b"", path == "/_cluster/remove")
                with self._admin_lock:
                    answer["handed_over"] = self.change(url, path == "/_cluster/nodes", force)
        except ProtocolError as error:
            return self._error(environ, error)
        return ("200 OK", [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")],
                json.dumps({**self.membership.to_json(), **answer}).encode())

    def change(self, url, add, force):
        """[CLUSTER-10] Add url to the cluster or remove it, and move the collections that change nodes.

        Every step may be repeated: called again after a balancer or a node
        died half-way, it finishes the same change. Returns how many
        collections each node handed over.
        """
        self.refresh()
        membership = self.membership
        if membership.previous is not None:
            changing = set(membership.nodes) ^ set(membership.previous)
            if changing != {url} or add != (url in membership.nodes):
                raise ProtocolError("change_in_progress", f"the cluster is changing from {list(membership.previous)} "
                                    f"to {list(membership.nodes)}: ask for that change again to finish it first")
            if not add and force and url not in membership.gone:
                membership = dataclasses.replace(membership, version=membership.version + 1, gone=(url,))
                self._give(membership)
        elif add == (url in membership.nodes):
            membership = None       # done before: only the old copies may be left to delete
        elif add:
            # A node that joins holds nothing from an earlier time, and refuses every client until it
            # is given the new membership, first of all the nodes.
            self._ask(url, "POST", "/_node/leave", {**membership.to_json(), "self": url})
            membership = Membership(membership.version + 1, (*membership.nodes, url), membership.backups,
                                    previous=membership.nodes)
            self._give(membership)
        else:
            if len(membership.nodes) <= membership.backups + 1:
                raise ProtocolError("bad_request", f"a cluster with {membership.backups} backups needs "
                                    f"{membership.backups + 1} nodes at least")
            membership = Membership(membership.version + 1, tuple(node for node in membership.nodes if node != url),
                                    membership.backups, previous=membership.nodes, gone=(url,) if force else ())
            self._give(membership)
        handed = {}
        if membership is not None:
            for node in _members(membership):
                handed[node] = self._ask(node, "POST", "/_node/hand-over")["handed_over"]
            final = Membership(membership.version + 1, membership.nodes, membership.backups)
            self._give(final)
            for node in _members(membership):
                if node not in final.nodes:
                    self._ask(node, "POST", "/_node/leave", {**final.to_json(), "self": node})
        for node in self.membership.nodes:
            self._ask(node, "POST", "/_node/clean")
        return handed

    def _give(self, membership):
        """Give every node of membership the membership; then the balancer serves it.

        Nodes that join get it first: once another node has it, a balancer that
        asks may send their collections' requests to them (CLUSTER-2).
        """
        joining = [node for node in membership.nodes if node not in (membership.previous or membership.nodes)]
        for node in joining + [node for node in _members(membership) if node not in joining]:
            self._ask(node, "PUT", "/_node/cluster", {**membership.to_json(), "self": node})
        with self._membership_lock:
            self.membership = dataclasses.replace(membership, own_url=None)

    def _ask(self, node, method, path, value=None):
        try:
            return _node_request(node, method, path, self.secret, value, timeout=HAND_OVER_TIMEOUT)
        except (OSError, LookupError, RuntimeError, http.client.HTTPException) as error:
            raise ProtocolError("node_unavailable", f"{node} did not answer {method} {path} ({error}): ask again "
                                "once it is back, or remove it by force") from None


def _is_admin_path(path):
    return path == "/_cluster" or path.startswith("/_cluster/")


def _admin_change(body, removing):
    """(url, force) of an admin request's body, {"url": U[, "force": bool]}; ProtocolError if it is not one."""
    try:
        given = json.loads(bytes(body))
        url, force = _node_url(given["url"]), given.get("force", False) if removing else False
        if url is None or type(force) is not bool or set(given) - {"url", "force"}:
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ProtocolError("bad_request", '{"url": "http://host:port"} (and "force": true or false to remove)'
                            ) from None
    return url, force


def _members(membership):
    """Every node that takes part in membership: its nodes, and while they change, those leaving but not gone."""
    return [node for node in dict.fromkeys((*membership.nodes, *(membership.previous or ())))
            if node not in membership.gone]


def _file_chunks(file):
    """The bytes of file, chunk by chunk; the file is closed at the end, or when the answer is given up."""
    try:
        while chunk := file.read(PROXY_CHUNK):
            yield chunk
    finally:
        file.close()


def start_cluster(nodes, backups, secret):
    """The cluster's membership: the newest any node keeps, else a first one of nodes, given to all.

    A restarted balancer so finds the membership the cluster last had (CLUSTER-2).
    """
    kept, reached = [], []
    for node in nodes:
        try:
            kept.append(Membership.from_json(_node_request(node, "GET", "/_node/cluster", secret)))
            reached.append(node)
        except LookupError:
            reached.append(node)        # in no cluster yet
        except OSError as error:        # down: the cluster is served without it
            log.warning("node %s cannot be reached: %s", node, error)
    if not reached:
        raise OSError("no node could be reached")
    newest = max(kept, key=lambda membership: membership.version, default=None)
    membership = dataclasses.replace(newest, own_url=None) if newest else Membership(1, tuple(nodes), backups)
    for node in _members(membership):
        try:
            _node_request(node, "PUT", "/_node/cluster", secret, {**membership.to_json(), "self": node})
        except OSError as error:
            log.warning("node %s was not given the membership: %s", node, error)
    return membership


def _node_request(node, method, path, secret, value=None, timeout=NODE_TIMEOUT):
    """The JSON answer of a node to one request of the cluster's own; LookupError for a 404,
    RuntimeError for any other refusal, OSError when it cannot be reached."""
    status, answer = _node_call(node, method, path, secret, None if value is None else json.dumps(value).encode(),
                                timeout)
    if status == 404:
        raise LookupError(f"{node}{path}: not found")
    if status != 200:
        raise RuntimeError(f"{node} answered {method} {path} with {status}: {answer}")
    return answer


###############################################################################
# Server: HTTP/1.1 on an event loop, in one worker process per core
###############################################################################
# A sync server's traffic is many devices, each holding a keep-alive
# connection and polling every few seconds, and whatever else the internet
# sends: sockets that connect and say nothing, request heads trickled a byte
# at a time. A server with a thread per connection stops once connections
# outnumber its threads, so here a connection never holds a thread:
#
# - In each worker process one asyncio event loop owns every connection. It
#   reads request heads and bodies, checks their framing and their limits,
#   keeps their deadlines, and writes the answers. A connection that waits
#   costs a few kilobytes.
# - An empty poll, most of the traffic, is answered on the loop itself from
#   the remembered poll state (Front.empty_poll: one stat(), no file opened).
#   Every other request runs on a thread, because it may wait for the disk
#   (fdatasync, a lock) or for the verifier. Only an answer's body that is a
#   file (a blob) is read on the loop, a chunk at a time as the client takes
#   it. More than --max-concurrent requests in progress in the whole server,
#   counted from the end of a head to its answer, and the next one is
#   answered 503 (BACKOFF-1).
# - Worker processes, one per core by default, listen on the same port with
#   SO_REUSEPORT, so the kernel spreads new connections between them. They
#   share only the data directory and a count of the requests each has in
#   progress. Sharing the data is safe because every storage operation takes
#   the collection's flock(), and a poll state remembered in one process is
#   used only while the index file is unchanged: an append made through any
#   other process changes it, and the next poll reads the files again
#   (_poll_states).
#
# Parsing follows RFC 9112 to the letter. Framing that two parsers could read
# differently (both Content-Length and Transfer-Encoding, two lengths, a
# length that is not plain digits, bare LF, folded lines) is refused and the
# connection closed, so a proxy in front cannot see another request than the
# one answered here. Every refusal is JSON, like every other error.
#
# Why a server of our own, and not one of the libraries that run WSGI apps:
# README.md, "Which HTTP server runs, and why", has the measurements.

MAX_HEAD_BYTES = 64 << 10     # bytes of request line and header fields; a token query is ~300
MAX_HEADER_FIELDS = 100       # field lines in one head
MAX_CHUNK_LINE = 1024         # bytes of a chunk's size line, extensions included
MAX_CHUNKS = 10_000           # chunks in one body: each costs the loop a parse, however small it is
IDLE_TIMEOUT = 120            # seconds a connection may wait for its next request; clients poll every 30
HEAD_TIMEOUT = 10             # seconds from a request's first byte to the end of its head
BODY_TIMEOUT = 30             # seconds a body may go without a byte arriving
SEND_TIMEOUT = 30             # seconds an answer may wait for a client that does not read it
LINGER_TIMEOUT = 2            # seconds a refused client may go on sending before it is cut off
STOP_TIMEOUT = 0.8            # seconds requests in progress get to finish when the server stops;
                              # an answer not ready by then is not sent (the client asks again)
ACCESS_LOG_LINES = 1000       # access log lines a worker keeps before it writes them, within the second
ACCESS_LOG_BACKLOG = 8        # batches of them waiting for standard error before newer lines are dropped
ACCESS_LOG_LAST_WRITE = 0.5   # seconds (up to three times) a stopping worker waits to write its last lines
KILL_TIMEOUT = 3              # seconds a stopping worker gets before it is killed
EXEMPT_THREADS = 32           # per worker, for the cluster's own requests (Front.exempt)
MAX_CONNECTIONS = 10_000      # per worker process; each costs a few KB and one or two file descriptors
FILES_PER_CONNECTION = 2      # its socket, and the blob file it may be downloading
MIN_CONNECTIONS = 64          # per worker: fewer file descriptors than that allow is no server
LISTEN_BACKLOG = 1024         # connections the kernel holds for a worker until it accepts them
SMALL_ANSWER = 64 << 10       # bytes: an answer body up to this is sent in one write with its head
LARGE_BODY = 64 << 10         # bytes: a request body larger than this gets memory of its own (see _start_body)

# request-line = method SP request-target SP HTTP-version        (RFC 9112, 3)
#   method = token; request-target = 1*VCHAR here; HTTP-version = "HTTP/" DIGIT "." DIGIT
REQUEST_LINE = re.compile(rb"(%s) ([!-~]+) HTTP/([0-9])\.([0-9])\Z" % _TOKEN.encode())
# field-line = field-name ":" OWS field-value OWS                (RFC 9112, 5)
#   field-name = token; field-value = *( VCHAR / obs-text / SP / HTAB ): no CR, LF or NUL
FIELD_LINE = re.compile(rb"(%s):([\t -~\x80-\xff]*)\Z" % _TOKEN.encode())
# absolute-form = "http" or "https" "://" authority path-abempty [ "?" query ]   (RFC 9112, 3.2.2)
ABSOLUTE_FORM = re.compile(rb"https?://([^/?#]+)([/?][!-~]*)?\Z", re.IGNORECASE)
# Host = uri-host [ ":" port ], uri-host = IP-literal / IPv4address / reg-name   (RFC 9110, 7.2)
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]*)?\Z")
# chunk-size [ chunk-ext ] CRLF, chunk-size = 1*HEXDIG          (RFC 9112, 7.1)
#   chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ), read here as ";" and visible text
CHUNK_SIZE_LINE = re.compile(rb"0*([0-9A-Fa-f]{1,16})([ \t]*;[\t -~]*)?\Z")


class _Request:
    """A request's head as the connection needs it: the WSGI environ, and how the body is framed."""

    __slots__ = ("environ", "method", "http_10", "length", "chunked", "keep_alive", "expects_continue")

    @property
    def has_body(self):
        return self.chunked or self.length > 0


def parse_request_head(head, connection_environ):
    """A _Request from the bytes of a head, without the empty line that ends it; raises ProtocolError.

    connection_environ holds the WSGI environ entries that are the same for
    every request on the connection.
    """
    lines = head.split(b"\r\n")
    request_line = REQUEST_LINE.match(lines[0])
    if request_line is None:
        raise ProtocolError("bad_request", "the request line is not METHOD TARGET HTTP/1.1")
    method, target, major, minor = request_line.groups()
    if major != b"1":
        raise ProtocolError("bad_request", "this server speaks HTTP/1.1 and HTTP/1.0", status=505)
    if len(lines) > MAX_HEADER_FIELDS + 1:
        raise ProtocolError("too_large", f"a request may have at most {MAX_HEADER_FIELDS} header fields", status=431)
    request = _Request()
    request.method, request.http_10 = method.decode(), minor == b"0"
    environ = request.environ = dict(connection_environ)
    environ["REQUEST_METHOD"] = request.method
    environ["SERVER_PROTOCOL"] = "HTTP/1.0" if request.http_10 else "HTTP/1.1"
    for line in lines[1:]:
        field = FIELD_LINE.match(line)
        if field is None:
            raise ProtocolError("bad_request", "a header field is not NAME: VALUE on one line")
        name, value = field.group(1), field.group(2).strip(b" \t").decode("latin-1")
        if b"_" in name:
            continue        # in the environ it would pass for the same name with "-"
        key = name.decode().upper().replace("-", "_")
        key = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key
        if key in environ:
            if key in ("CONTENT_LENGTH", "HTTP_HOST", "HTTP_TRANSFER_ENCODING"):
                # [RFC 9112, 6.3 and 3.2] Two of these is a request framed two ways.
                raise ProtocolError("bad_request", f"{name.decode()} may appear only once")
            value = environ[key] + ", " + value       # one field, its lines joined (RFC 9110, 5.3)
        environ[key] = value
    _read_target(target, environ)
    _read_framing(request, environ)
    connection = {token.strip() for token in environ.get("HTTP_CONNECTION", "").lower().split(",")}
    # [RFC 9112, 9.3] HTTP/1.1 keeps the connection unless told "close"; HTTP/1.0 only if told "keep-alive".
    request.keep_alive = "keep-alive" in connection if request.http_10 else "close" not in connection
    request.expects_continue = not request.http_10 and environ.get("HTTP_EXPECT", "").lower() == "100-continue"
    return request


def _read_target(target, environ):
    """Set the environ's path, query and host from the request-target (RFC 9112, 3.2)."""
    if "HTTP_HOST" not in environ and environ["SERVER_PROTOCOL"] == "HTTP/1.1":
        # [RFC 9112, 3.2] "A server MUST respond with a 400 (Bad Request) status code to any
        # HTTP/1.1 request message that lacks a Host header field".
        raise ProtocolError("bad_request", "an HTTP/1.1 request needs a Host header")
    absolute = ABSOLUTE_FORM.match(target)
    if absolute is not None:
        # [RFC 9112, 3.2.2] "the origin server MUST ignore the received Host header field (if any)
        # and instead use the host information of the request-target."
        environ["HTTP_HOST"] = absolute.group(1).decode()
        target = absolute.group(2) or b"/"
        if target.startswith(b"?"):
            target = b"/" + target
    elif not target.startswith(b"/"):
        raise ProtocolError("bad_request", "the request target is neither a path nor an http URL")
    if not HOST.match(environ.get("HTTP_HOST", "")):
        raise ProtocolError("bad_request", "the Host header is not a host")
    path, _, query = target.decode("ascii").partition("?")
    environ["REQUEST_URI"] = target.decode("ascii")     # as sent: Front reads the path from it (PATH-1)
    environ["PATH_INFO"] = urllib.parse.unquote_to_bytes(path).decode("latin-1")    # as WSGI has it
    environ["QUERY_STRING"] = query


def _read_framing(request, environ):
    """Set how the request's body is framed: a length, or chunked (RFC 9112, 6)."""
    transfer_encoding = environ.pop("HTTP_TRANSFER_ENCODING", None)
    length = environ.pop("CONTENT_LENGTH", None)
    request.chunked, request.length = transfer_encoding is not None, 0
    if request.chunked:
        # [RFC 9112, 6.1] "A server or client that receives an HTTP/1.0 message containing a
        # Transfer-Encoding header field MUST treat the message as if the framing is faulty";
        # a request with both it and Content-Length "MAY" be rejected, and is.
        if request.http_10 or length is not None:
            raise ProtocolError("bad_request", "a body framed both by Content-Length and by "
                                "Transfer-Encoding, or chunked in HTTP/1.0")
        if transfer_encoding.lower() != "chunked":
            # [RFC 9112, 6.1] "A server that receives a request message with a transfer coding
            # it does not understand SHOULD respond with 501 (Not Implemented)."
            raise ProtocolError("bad_request", "the only transfer coding served is chunked", status=501)
    elif length is not None:
        # [RFC 9112, 6.3] Content-Length = 1*DIGIT; anything else is "an unrecoverable error".
        if not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise ProtocolError("bad_request", "Content-Length is not a number of bytes")
        request.length = int(length)


def _error_bytes(error, date, retry_after=None, to_head=False):
    """A whole HTTP answer to a ProtocolError the server meets before any route, closing the connection.

    to_head: it answers a HEAD, so it has no body (RFC 9110, 9.3.2).
    """
    body = json.dumps({"error": error.code, "message": error.message}).encode()
    retry = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\nDate: {date}\r\n"
            f"Content-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
            f"Content-Length: {len(body)}\r\n{retry}"
            f"Connection: close\r\n\r\n").encode() + (b"" if to_head else body)


class _Worker:
    """One worker process's part of the server: its loop, its connections and its threads."""

    def __init__(self, front, in_progress, index, limits, access_log=True):
        self.front = front
        self.access = _AccessLog() if access_log else None
        self.log_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())     # kept by keep_time
        # Requests in progress, one count per worker, in memory the workers share: each
        # writes only its own and reads the sum. Two workers may both take the last
        # place at once; the limit is a bound on load, not a count of resources.
        self.in_progress, self.index = in_progress, index
        self.max_concurrent, self.max_connections = limits
        self.connections = set()
        self.loop = self.threads = self.exempt_threads = self.listener = None
        self.stopping = False
        self.date = email.utils.formatdate(usegmt=True)

    def run(self, sock, supervisor):
        """Serve sock until SIGTERM or SIGINT, or until the supervisor (its pid) is gone; in the
        worker's own process, with signals blocked."""
        self.parent = supervisor
        self.loop = asyncio.new_event_loop()
        self.threads = concurrent.futures.ThreadPoolExecutor(self.max_concurrent, thread_name_prefix="request")
        self.exempt_threads = concurrent.futures.ThreadPoolExecutor(EXEMPT_THREADS, thread_name_prefix="cluster")
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        self.listener = self.loop.run_until_complete(
            self.loop.create_server(lambda: _Connection(self), sock=sock, backlog=LISTEN_BACKLOG))
        self.loop.call_later(1, self.keep_time)
        self.loop.run_forever()
        if self.access is not None:
            self.access.close(ACCESS_LOG_LAST_WRITE)

    def admit(self):
        """Count one more request in progress, if there is room for it in the whole server (BACKOFF-1)."""
        if sum(self.in_progress) >= self.max_concurrent:
            return False
        self.in_progress[self.index] += 1
        return True

    def release(self):
        self.in_progress[self.index] -= 1

    def keep_time(self):
        """Once a second: refresh the Date, end connections past their deadline, notice an orphaning."""
        self.loop.call_later(1, self.keep_time)
        self.date = email.utils.formatdate(usegmt=True)
        self.log_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        now = self.loop.time()
        for connection in [c for c in self.connections if c.deadline < now]:
            connection.time_out()
        if os.getppid() != self.parent:
            self.stop()         # the supervisor is gone (killed): nobody would stop this worker
        if self.access is not None:
            self.access.hand_over()

    def log_access(self, request, status, size, began):
        """Keep one line of the access log: who, what (the token left out), status, bytes, time taken.

        Lines are written once a second (keep_time), not each with a system
        call of its own on the event loop.
        """
        target = request.environ["PATH_INFO"]
        query = request.environ.get("QUERY_STRING")
        if query:
            target += "?" + "&".join("auth=-" if urllib.parse.unquote_plus(pair.partition("=")[0]) == "auth"
                                     else pair for pair in query.split("&"))
        self.access.add(f'{self.log_time} {request.environ["REMOTE_ADDR"]} "{request.method} {target}" '
                        f'{status[:3]} {size} {(self.loop.time() - began) * 1e3:.1f}ms\n')

    def stop(self):
        """Stop accepting, let the requests in progress finish, and end the loop."""
        if self.stopping:
            return
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
        for connection in list(self.connections):
            connection.stop()
        self.loop.call_later(STOP_TIMEOUT, self.loop.stop)
        self.stopped_if_done()

    def stopped_if_done(self):
        if self.stopping and not self.connections:
            self.loop.stop()


class _AccessLog:
    """A worker's access log lines, written to standard error by a thread of their own.

    The loop only hands lines over, never writes: a standard error that nobody
    reads (a full pipe) blocks a write, and a loop blocked in one serves no
    one. While the writer is stuck, newer lines are dropped, and a line says
    how many once it moves again.
    """

    def __init__(self):
        self.lines = []           # not yet handed over
        self.dropped = 0
        self.batches = queue.Queue(ACCESS_LOG_BACKLOG)
        self.writer = threading.Thread(target=self._write, name="access-log", daemon=True)
        self.writer.start()

    def add(self, line):
        self.lines.append(line)
        if len(self.lines) >= ACCESS_LOG_LINES:
            self.hand_over()

    def hand_over(self, wait=0):
        """Give the writer the lines kept, waiting at most `wait` seconds for room."""
        if not self.lines and not self.dropped:
            return
        batch = "".join(self.lines)
        if self.dropped:
            batch = f"{self.dropped} access log lines dropped: standard error was not being read\n" + batch
        try:
            self.batches.put(batch, timeout=wait) if wait else self.batches.put_nowait(batch)
            self.dropped = 0
        except queue.Full:
            self.dropped += len(self.lines)
        self.lines.clear()

    def close(self, timeout):
        """Write what is left, waiting at most about timeout seconds for a standard error that may never take it."""
        self.hand_over(wait=timeout)
        with contextlib.suppress(queue.Full):
            self.batches.put(None, timeout=timeout)
        self.writer.join(timeout)

    def _write(self):
        while (batch := self.batches.get()) is not None:
            try:
                sys.stderr.write(batch)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass        # standard error is closed or broken: the lines are lost, the server goes on


class _Connection(asyncio.Protocol):
    """One client's connection: reads its requests one at a time and answers them in order.

    Its state is "idle" (waiting for a request), "head" or "body" (reading
    one), "busy" (a thread is answering it), "sending" (the answer waits for
    the client to read it), "lingering" (refused, see _linger), "closing"
    (the last answer is on its way out), or "closed". Every state but "busy"
    and "closed" has a deadline.
    """

    def __init__(self, worker):
        self.worker = worker
        self.transport = None
        self.buffer = bytearray()
        self.scanned = 0                # bytes of the buffer known to hold no end of head
        self.state = "idle"
        self.deadline = worker.loop.time() + IDLE_TIMEOUT
        self.request = self.body = self.answer = self.chunks = None
        self.began = 0.0                # loop time the request's head was read
        self.admitted = False           # counted in progress (Worker.admit)
        self.exempt = False             # a request of the cluster's own (Front.exempt)
        self.body_limit = 0             # bytes the body being read may have (Front.body_limit)
        self.writing_paused = False
        self.input_ended = False        # the client will send nothing more (it half-closed)
        self.close_after_answer = False
        self.unread_body = False        # answered without reading the body the client is sending
        self.chunked_answer = False

    def connection_made(self, transport):
        self.transport = transport
        worker = self.worker
        worker.connections.add(self)
        if len(worker.connections) > worker.max_connections:
            transport.write(_error_bytes(ProtocolError("overloaded", "too many connections: try again later"),
                                         worker.date, RETRY_AFTER))
            self._linger()
            return
        host, port = transport.get_extra_info("sockname")[:2]
        peer = transport.get_extra_info("peername") or ("", 0)
        self.environ = {
            "SERVER_NAME": host, "SERVER_PORT": str(port), "REMOTE_ADDR": peer[0], "REMOTE_PORT": str(peer[1]),
            "SCRIPT_NAME": "", "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.input_terminated": True}

    def connection_lost(self, exc):
        if self.state != "busy":
            self._release()         # a request on a thread is counted until its answer is ready
        self.state = "closed"
        self._close_answer()
        self.worker.connections.discard(self)
        self.worker.stopped_if_done()

    def data_received(self, data):
        if self.state == "lingering":
            return
        self.buffer += data
        if self.state in ("idle", "head", "body"):
            self._read()
        elif len(self.buffer) > MAX_HEAD_BYTES:
            self.transport.pause_reading()      # pipelined requests wait until this one is answered

    def eof_received(self):
        self.input_ended = True
        if self.state in ("busy", "sending") or (self.state == "idle" and b"\r\n\r\n" in self.buffer):
            return True             # keep the connection open to answer what was asked
        return False                # nothing is owed, or a request can no longer be finished: close

    def pause_writing(self):
        self.writing_paused = True

    def resume_writing(self):
        # Not the work itself: closing the transport from inside this callback
        # makes asyncio end the connection twice.
        self.writing_paused = False
        self.worker.loop.call_soon(self._resumed)

    def _resumed(self):
        if self.writing_paused or self.state in ("closing", "closed"):
            return
        if self.answer is not None:
            self._pump()
        elif self.state == "sending":
            self._answer_sent()
        self._read()        # requests that came meanwhile

    # Reading ----------------------------------------------------------------

    def _read(self):
        """Read on in the buffer, a head then a body, and answer each request once it is whole."""
        while self.state in ("idle", "head", "body"):
            try:
                if self.state != "body":
                    if not self._read_head():
                        break
                    if self._answered_at_once():
                        continue        # the buffer may hold the next request
                if self.state == "body" and not self._read_body():
                    break
            except ProtocolError as error:
                self._refuse(error)
                return
            self._answer_on_thread()
        if self.input_ended and self.state in ("idle", "head", "body"):
            self._close()           # what is left of the input can never be a whole request

    def _read_head(self):
        """Whether the buffer held a whole head, now parsed into self.request."""
        buffer = self.buffer
        if self.state == "idle":
            # [RFC 9112, 2.2] "a server that is expecting to receive and parse a request-line
            # SHOULD ignore at least one empty line (CRLF) received prior to the request-line."
            while buffer.startswith(b"\r\n"):
                del buffer[:2]
            if not buffer:
                return False
            self.state, self.deadline = "head", self.worker.loop.time() + HEAD_TIMEOUT
        end = buffer.find(b"\r\n\r\n", max(0, self.scanned - 3))
        if end == -1:
            if buffer.find(b"\n\n", max(0, self.scanned - 1)) != -1:
                raise ProtocolError("bad_request", "the lines of a request head end in CRLF, not LF")
            self.scanned = len(buffer)          # a head trickled byte by byte is scanned once
            if len(buffer) > MAX_HEAD_BYTES:
                raise ProtocolError("too_large", f"the request head is larger than {MAX_HEAD_BYTES} bytes", status=431)
            return False
        if end > MAX_HEAD_BYTES:
            raise ProtocolError("too_large", f"the request head is larger than {MAX_HEAD_BYTES} bytes", status=431)
        head = bytes(buffer[:end])
        del buffer[:end + 4]
        self.scanned = 0
        self.request = parse_request_head(head, self.environ)
        self.began = self.worker.loop.time()
        return True

    def _answered_at_once(self):
        """Answer the request now if it needs no thread: an empty poll, or a refusal.

        Otherwise count it in progress and go on to its body, if it has one.
        """
        request, worker = self.request, self.worker
        if not request.has_body:
            try:
                answer = worker.front.empty_poll(request.environ)
            except Exception:
                log.exception("answering an empty poll failed")
                answer = None       # the thread answers it, with the error if there is one
            if answer is not None:
                self._send(*answer)
                return True
        self.body_limit = worker.front.body_limit(request.environ) if request.has_body else 0
        if request.length > self.body_limit:
            # [LIMIT-1] Refused before any of it is read; what follows cannot be read as a request.
            raise worker.front.too_large(request.environ, self.body_limit)
        self.exempt = worker.front.exempt(request.environ)
        if not self.exempt:
            if not worker.admit():
                self.unread_body = request.has_body
                self._send(*worker.front.overloaded(request.environ))
                return True
            self.admitted = True
        if request.has_body:
            self._start_body()
        return False

    def _start_body(self):
        request = self.request
        self.state, self.deadline = "body", self.worker.loop.time() + BODY_TIMEOUT
        self.received = self.chunk_count = 0
        # A large body gets memory of its own, given back whole when it is freed
        # (the heap would keep a blob's worth in every thread that freed one).
        self.body = mmap.mmap(-1, request.length) if request.length > LARGE_BODY else bytearray(request.length)
        self.chunk_left, self.in_trailer = None, False
        if request.expects_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_body(self):
        """Whether the whole body has arrived, into self.body."""
        self.deadline = self.worker.loop.time() + BODY_TIMEOUT
        if self.request.chunked:
            return self._read_chunks()
        take = min(self.request.length - self.received, len(self.buffer))
        self.body[self.received:self.received + take] = self.buffer[:take]
        del self.buffer[:take]
        self.received += take
        return self.received == self.request.length

    def _read_chunks(self):
        """Whether a whole chunked body has arrived (RFC 9112, 7.1); its data into self.body.

        chunked-body = *chunk last-chunk trailer-section CRLF, and
        chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF. Trailer
        fields are read and dropped.
        """
        buffer, body = self.buffer, self.body
        while True:
            if self.chunk_left is not None and self.chunk_left > 0:
                take = min(self.chunk_left, len(buffer))
                body += buffer[:take]
                del buffer[:take]
                self.chunk_left -= take
                if self.chunk_left:
                    return False
            line_end = buffer.find(b"\r\n")
            if line_end == -1:
                if b"\n" in buffer:
                    raise ProtocolError("bad_request", "the lines of a chunked body end in CRLF, not LF")
                if len(buffer) > MAX_CHUNK_LINE:
                    raise ProtocolError("bad_request", "a chunk's size line is too long")
                return False
            line = bytes(buffer[:line_end])
            del buffer[:line_end + 2]
            if self.in_trailer:
                if not line:
                    return True                 # the empty line that ends the body
                self.received += len(line)
                if FIELD_LINE.match(line) is None or self.received > MAX_HEAD_BYTES:
                    raise ProtocolError("bad_request", "a trailer field is malformed or too large")
            elif self.chunk_left == 0:          # the CRLF after a chunk's data
                if line:
                    raise ProtocolError("bad_request", "a chunk is longer than its size says")
                self.chunk_left = None
            else:
                size = CHUNK_SIZE_LINE.match(line)
                if size is None:
                    raise ProtocolError("bad_request", "a chunk's size is not hexadecimal digits")
                self.chunk_left, self.chunk_count = int(size.group(1), 16), self.chunk_count + 1
                if len(body) + self.chunk_left > self.body_limit:
                    raise self.worker.front.too_large(self.request.environ, self.body_limit)
                if self.chunk_count > MAX_CHUNKS:
                    raise ProtocolError("bad_request", f"a body may come in at most {MAX_CHUNKS} chunks")
                if self.chunk_left == 0:        # the last chunk: the trailer section follows
                    self.chunk_left, self.in_trailer, self.received = None, True, 0

    # Answering --------------------------------------------------------------

    def _answer_on_thread(self):
        request = self.request
        if self.body is not None:
            # [RFC 9112, 7.1.3] A chunked body is handed on as one of known length.
            request.environ["CONTENT_LENGTH"] = str(len(self.body))
            request.environ["cutout.body"] = self.body          # for _body(), which then copies nothing
            # An mmap reads like a file; a small body is copied, which costs nothing.
            request.environ["wsgi.input"] = self.body if isinstance(self.body, mmap.mmap) else io.BytesIO(self.body)
        else:
            request.environ["wsgi.input"] = io.BytesIO()
        self.state = "busy"
        threads = self.worker.exempt_threads if self.exempt else self.worker.threads
        threads.submit(self._call_application, request.environ)

    def _call_application(self, environ):
        """Run the WSGI application on a thread, and hand its answer to the loop."""
        started = []

        def start_response(status, headers, exc_info=None):
            if exc_info and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return body_parts.append        # the write() of WSGI 1.0
        body_parts = []
        try:
            answer = self.worker.front.dispatch(environ, start_response)
            if isinstance(answer, (list, tuple)):
                body_parts += answer
                answer = b"".join(body_parts)
            elif body_parts:
                answer = itertools.chain(body_parts, answer)
            status, headers = started
        except Exception:
            log.exception("%s %s failed", environ["REQUEST_METHOD"], environ.get("REQUEST_URI"))
            status, headers = "500 Internal Server Error", [("Content-Type", "application/json")]
            answer = json.dumps({"error": "internal_error", "message": "internal error"}).encode()
        self.worker.loop.call_soon_threadsafe(self._answered, status, headers, answer)

    def _answered(self, status, headers, answer):
        self._release()
        if self.state == "closed":
            if hasattr(answer, "close"):
                answer.close()
            return
        try:
            self._send(status, headers, answer)
        except Exception:
            log.exception("sending an answer failed")
            self.transport.abort()
            return
        self._read()        # a request that came in the meantime

    def _send(self, status, headers, answer):
        """Write an answer: its head, then its body (bytes, or an iterable of bytes)."""
        request = self.request
        close = (self.close_after_answer or self.unread_body or not request.keep_alive or self.worker.stopping
                 or (self.input_ended and b"\r\n\r\n" not in self.buffer))
        bodiless = status.startswith(("1", "204", "304"))
        lines = [f"HTTP/1.1 {status}\r\nDate: {self.worker.date}\r\n"]
        length = None
        for name, value in headers:
            if name.lower() == "content-length":
                # [RFC 9110, 8.6] none on a 1xx or 204; on a 304 it would have to be the
                # length of the 200 it stands for, which bottle's 0 is not.
                if bodiless:
                    continue
                length = value
            lines.append(f"{name}: {value}\r\n")
        self.chunked_answer = False
        if not bodiless and length is None:
            if isinstance(answer, bytes):
                lines.append(f"Content-Length: {len(answer)}\r\n")
            elif request.http_10:
                close = True        # the end of the body is the end of the connection
            else:
                self.chunked_answer = True
                lines.append("Transfer-Encoding: chunked\r\n")
        if close:
            lines.append("Connection: close\r\n")
        elif request.http_10:
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        self.close_after_answer = close
        if self.worker.access is not None:
            size = 0 if bodiless or request.method == "HEAD" else len(answer) if isinstance(answer, bytes) else length
            self.worker.log_access(request, status, "-" if size is None else size, self.began)
        if bodiless or request.method == "HEAD":
            if hasattr(answer, "close"):
                answer.close()
            answer = b""
        if isinstance(answer, bytes):
            if len(answer) <= SMALL_ANSWER:
                self.transport.write(head + answer)
            else:
                self.transport.write(head)
                self.transport.write(answer)
            self._answer_sent()
        else:
            self.transport.write(head)
            self.answer = answer
            self.chunks = iter(answer)
            self._pump()

    def _pump(self):
        """Write the answer's chunks while the client keeps reading them."""
        try:
            while not self.writing_paused:
                chunk = next(self.chunks, None)
                if chunk is None:
                    break
                if chunk:
                    self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if self.chunked_answer else chunk)
            else:
                self.state, self.deadline = "sending", self.worker.loop.time() + SEND_TIMEOUT
                return
        except Exception:
            log.exception("writing an answer failed")
            self.transport.abort()
            return
        if self.chunked_answer:
            self.transport.write(b"0\r\n\r\n")
        self._close_answer()
        self._answer_sent()

    def _close_answer(self):
        if self.answer is not None and hasattr(self.answer, "close"):
            self.answer.close()
        self.answer = self.chunks = None

    def _answer_sent(self):
        """The answer is written (perhaps not yet sent): close, wait for the client to read, or go on."""
        self.request = self.body = None
        if self.unread_body:
            self._linger()
        elif self.close_after_answer:
            self._close()
        elif self.writing_paused:
            self.state, self.deadline = "sending", self.worker.loop.time() + SEND_TIMEOUT
        else:
            self.state, self.deadline = "idle", self.worker.loop.time() + IDLE_TIMEOUT
            self.transport.resume_reading()

    def _release(self):
        if self.admitted:
            self.admitted = False
            self.worker.release()

    # Ending -----------------------------------------------------------------

    def _refuse(self, error):
        """Answer an error met while reading, and close: what follows in the stream cannot be trusted."""
        self._release()
        to_head = self.request is not None and self.request.method == "HEAD"
        self.transport.write(_error_bytes(error, self.worker.date, to_head=to_head))
        self._linger()

    def _linger(self):
        """Close once the client has read the answer, reading and dropping whatever it still sends.

        Closing with unread data would send a reset, which can destroy the
        answer before the client reads it.
        """
        self.state, self.deadline = "lingering", self.worker.loop.time() + LINGER_TIMEOUT
        self.buffer.clear()
        self.transport.write_eof()

    def _close(self):
        """Close once what is written has gone, or at SEND_TIMEOUT if the client will not take it."""
        self.state, self.deadline = "closing", self.worker.loop.time() + SEND_TIMEOUT
        self.transport.close()

    def time_out(self):
        if self.state in ("head", "body"):
            self._refuse(ProtocolError("bad_request", "the request took too long to arrive", status=408))
        elif self.state in ("sending", "lingering", "closing"):
            self.transport.abort()
        elif self.state == "idle":
            self._close()           # [RFC 9112, 9.5] a server may close an idle connection

    def stop(self):
        """The server is stopping: end this connection once it owes nothing."""
        if self.state in ("idle", "head", "body", "lingering"):
            self._close()           # a request not read whole was never answered
        elif self.state == "sending":
            self.close_after_answer = True
            self._answer_sent()     # closes once the answer has gone
        else:
            self.close_after_answer = True


def _listening_sockets(host, port, workers):
    """One listening socket per worker, all on one port (port 0: a free one), where the kernel
    spreads connections between them; one socket for all where it cannot."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    spread = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
    if spread and port:
        # With SO_REUSEPORT this server could bind a port another one already serves, and the
        # kernel would split the connections between the two: a socket without it finds that out.
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    sockets = []
    for _ in range(workers if spread else 1):
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spread:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        address = sock.getsockname()        # the others take the port the first was given
        sockets.append(sock)
    return sockets


def _raise_open_files_limit(wanted):
    """Let this process hold wanted file descriptors if the hard limit allows; return how many it may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def serve_http(front, host, port, workers, max_concurrent, announce, access_log=True):
    """Serve front (see Front) on (host, port) with worker processes until SIGTERM or SIGINT.

    announce(port) is called once the port is listening and the signals
    are handled. A worker that dies is replaced; one that will not stop is
    killed after KILL_TIMEOUT.
    """
    reserve = 64 + workers + 4 * max_concurrent     # listening sockets, and the files of requests in progress
    allowed = _raise_open_files_limit(FILES_PER_CONNECTION * MAX_CONNECTIONS + reserve)
    max_connections = min(MAX_CONNECTIONS, (allowed - reserve) // FILES_PER_CONNECTION)
    if max_connections < MIN_CONNECTIONS:
        sys.exit(f"cutout.py: this process may open only {allowed} files (ulimit -n), too few for "
                 f"{MIN_CONNECTIONS} connections and {max_concurrent} requests at once; raise the limit "
                 f"to at least {FILES_PER_CONNECTION * MIN_CONNECTIONS + reserve}")
    try:
        sockets = _listening_sockets(host, port, workers)
    except OSError as error:
        sys.exit(f"cutout.py: cannot listen on {host} port {port}: {error.strerror or error}"
                 + (" (is another server running there? pick another --port)" if error.errno == errno.EADDRINUSE
                    else ""))
    in_progress = memoryview(mmap.mmap(-1, 8 * workers)).cast("q")     # shared with the workers
    children, stopping = {}, []

    def start(index):
        # Signals wait until the worker has its own handlers: the supervisor's would stop the others.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        supervisor = os.getpid()    # taken before the fork: one killed at once would leave the worker none to compare
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
                    signal.signal(signum, signal.SIG_DFL)
                _Worker(front, in_progress, index, (max_concurrent, max_connections), access_log).run(
                    sockets[index % len(sockets)], supervisor)
                code = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index, time.monotonic()     # before a signal can look for it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    def stop(signum, frame):
        stopping.append(signum)
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        signal.setitimer(signal.ITIMER_REAL, KILL_TIMEOUT)

    def kill(signum, frame):
        log.error("workers still running after %s s: killed", KILL_TIMEOUT)
        for pid in children:
            os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGALRM, kill)
    for index in range(workers):
        if not stopping:
            start(index)
    announce(sockets[0].getsockname()[1])
    while children:
        pid, status = os.wait()
        index, started = children.pop(pid)
        in_progress[index] = 0      # what it had in progress died with it
        if not stopping:
            log.error("worker %d (pid %d) ended with status %d; starting another", index, pid, status)
            time.sleep(max(0.0, started + 1 - time.monotonic()))   # one that dies at once is not restarted in a loop
            if not stopping:
                start(index)
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sock in sockets:
        sock.close()


###############################################################################
# Command line
###############################################################################

MAX_CONCURRENT_PER_WORKER = 16    # requests in progress per worker by default: more wait on the disk, not the CPU


def _server_secret(path):
    """The secret that signs tokens: read from path, or made there (readable by us alone) at first start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path, "rb") as existing:
            secret = existing.read().strip()
        if len(secret) < 32:
            sys.exit(f"cutout.py: the secret in {path} is shorter than 32 bytes")
        return secret
    secret = secrets.token_hex(32).encode()
    try:
        os.write(fd, secret + b"\n")
        sync_data(fd)
    finally:
        os.close(fd)
    return secret


def configure(args):
    """Set up app for the command line's options. Exits on options that cannot serve."""
    try:
        os.makedirs(args.data_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.data_dir):
            pass
    except OSError as error:
        sys.exit(f"cutout.py: cannot write in the data directory {args.data_dir}: {error.strerror or error} "
                 "(pick another with --data-dir)")
    if args.verifier_url and args.oidc_issuer:
        sys.exit("cutout.py: --verifier-url and --oidc-issuer are two verifiers: give one of them")
    if bool(args.oidc_issuer) != bool(args.oidc_client_id):
        sys.exit("cutout.py: --oidc-issuer and --oidc-client-id go together: an ID token is checked against both")
    if args.verifier_url:
        verifier = remote_verifier(args.verifier_url)
    elif args.oidc_issuer:
        try:
            verifier = oidc_verifier(args.oidc_issuer, args.oidc_client_id)
        except ImportError as error:
            sys.exit(f"cutout.py: {error}")
    elif is_loopback(args.host):
        verifier = development_verifier     # said loudly once the server's URL is known (serve)
    else:
        sys.exit(f"cutout.py: refusing to listen on {args.host} without --verifier-url or --oidc-issuer: "
                 "the development verifier lets anyone log in as anyone")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_object_bytes=args.max_object_bytes,
                    max_blob_bytes=args.max_blob_bytes, max_collections_per_user=args.max_collections_per_user)
    secret = _server_secret(args.secret_file or os.path.join(args.data_dir, ".secret"))
    app.config["cutout.server"] = ServerConfig(
        data_dir=DataDir(args.data_dir, id_key=hmac.new(secret, b"collection ids", "sha256").digest()),
        secret=secret, verifier=verifier, poll_time=args.poll_time, limits=limits,
        http_apps=is_loopback(args.host) if args.http_apps is None else args.http_apps,
        cluster=NodeCluster(args.data_dir))


def serve(args):
    configure(args)
    max_concurrent = args.max_concurrent or MAX_CONCURRENT_PER_WORKER * args.workers
    host = f"[{args.host}]" if ":" in args.host else args.host

    def announce(port):     # once listening, so that whoever reads this can connect
        # The warning first: whoever waits for the address may close standard error once it has it,
        # and a server must not die of a warning it could not print.
        if _config().verifier is development_verifier:
            rule = "*" * 78
            with contextlib.suppress(OSError):
                print(f"{rule}\n*  DEVELOPMENT VERIFIER at http://{host}:{port}/: anyone can log in as anyone.\n"
                      f"*  An assertion that is an email address logs in as that address. Fine on your\n"
                      f"*  own machine; start with --oidc-issuer or --verifier-url for anything else.\n{rule}",
                      file=sys.stderr, flush=True)
        print(f"The Cut-Out serving http://{host}:{port}/ (data in {args.data_dir}, "
              f"{args.workers} worker processes)", flush=True)
    serve_http(Front(app), args.host, args.port, args.workers, max_concurrent, announce, not args.quiet)
    print("The Cut-Out stopped", flush=True)


def balancer_command(args):
    if not args.secret_file:
        sys.exit("cutout.py balancer: --secret-file is needed: the nodes' secret, which node and admin requests carry")
    nodes = [_node_url(node) for node in args.node]
    if not nodes or None in nodes:
        sys.exit("cutout.py balancer: each --node must be a URL such as http://127.0.0.1:9001")
    with open(args.secret_file, "rb") as file:
        secret = file.read().strip()
    try:
        membership = start_cluster(nodes, args.backups, secret)
    except (OSError, RuntimeError, ValueError) as error:
        sys.exit(f"cutout.py balancer: the nodes could not be given the cluster's membership: {error}")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_blob_bytes=args.max_blob_bytes)
    app.config["cutout.server"] = ServerConfig(data_dir=None, secret=secret, verifier=None, limits=limits)
    max_concurrent = args.max_concurrent or MAX_CONCURRENT_PER_WORKER * args.workers
    host = f"[{args.host}]" if ":" in args.host else args.host

    def announce(port):
        print(f"The Cut-Out balancer serving http://{host}:{port}/ in front of {', '.join(membership.nodes)} "
              f"({membership.backups} backups, membership version {membership.version})", flush=True)
    serve_http(Balancer(membership, secret), args.host, args.port, args.workers, max_concurrent, announce,
               not args.quiet)
    print("The Cut-Out balancer stopped", flush=True)


def _cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gc_command(args):
    purge_before = None
    if args.purge_tombstones_days is not None:
        purge_before = time.time() - args.purge_tombstones_days * 86400
    if not os.path.isdir(args.data_dir):
        sys.exit(f"cutout.py gc: {args.data_dir} is not a directory: no data directory to collect garbage in")
    data_dir = DataDir(args.data_dir)
    total = GarbageReport(data_dir.root)
    for db in data_dir.collections():
        report = collect_garbage(db, purge_tombstones_before=purge_before)
        print(f"{os.path.relpath(db.path, data_dir.root)}: removed {report.removed} of "
              f"{report.records_before} records ({report.replaced} replaced, {report.expired} expired, "
              f"{report.tombstones_purged} tombstones purged), {report.bytes_before - report.bytes_after} bytes, "
              f"{report.blobs_removed} blobs")
        for field in ("records_before", "records_after", "bytes_before", "bytes_after",
                      "replaced", "expired", "tombstones_purged", "blobs_removed", "seconds"):
            setattr(total, field, getattr(total, field) + getattr(report, field))
    megabytes = total.bytes_before / 1e6
    rate = megabytes / total.seconds if total.seconds else 0.0
    print(f"total: removed {total.removed} of {total.records_before} records, "
          f"{total.bytes_before - total.bytes_after} bytes, {total.blobs_removed} blobs; read {megabytes:.1f} MB in "
          f"{total.seconds:.2f} s ({rate:.1f} MB/s)")


def token_command(args):
    path = args.secret_file or os.path.join(args.data_dir, ".secret")
    try:
        with open(path, "rb") as file:
            secret = file.read().strip()
    except FileNotFoundError:
        sys.exit(f"cutout.py: no secret at {path}: the server makes it when it first starts")
    if domain_of_origin(args.audience) is None:
        sys.exit(f"cutout.py: {args.audience!r} is not an origin such as https://app.example")
    print(make_token(secret, args.email, args.audience, time.time() + args.expires_in - TOKEN_LIFETIME))


def _number(least, most=None, kind=int):
    """An argparse type: a number from least to most, or one line saying why not."""
    def number(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < least or most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{text} is not from {least} to {most}" if most is not None
                                             else f"{text} is less than {least}")
        return value
    return number


def _http_url(text):
    """An argparse type: an http or https URL with a host."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def _issuer_url(text):
    """An argparse type: an OpenID issuer's URL, https unless it is on this machine (OIDC-1)."""
    if not issuer_url(text) or urllib.parse.urlsplit(text).query or "#" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not an https:// URL (http:// only on loopback) "
                                         "without a query")
    return text


def parse_args(argv):
    port, count, size = _number(0, 65535), _number(1), _number(1)
    parser = argparse.ArgumentParser(prog="cutout.py", description="The Cut-Out sync server.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=8088, help="port to listen on; 0 picks a free one "
                        "(default %(default)s)")
    parser.add_argument("--data-dir", default="./cutout-data", help="where collections live (default %(default)s)")
    parser.add_argument("--secret-file", help="the secret that signs tokens (default DATA_DIR/.secret, "
                        "made at first start)")
    parser.add_argument("--verifier-url", type=_http_url, help="a BrowserID-style verifier to check assertions with "
                        "(without one: the development verifier, on loopback only)")
    parser.add_argument("--oidc-issuer", action="append", default=[], type=_issuer_url, metavar="URL",
                        help="take OpenID Connect ID tokens from this issuer as assertions (repeat for several; "
                        "https, or http on loopback)")
    parser.add_argument("--oidc-client-id", action="append", default=[], metavar="ID",
                        help="a client id the app is registered with at the issuer: an ID token's audience "
                        "(repeat for several)")
    parser.add_argument("--http-apps", action=argparse.BooleanOptionalAction,
                        help="log in apps served over plain http, whose pages anyone on the way can change "
                        "(default: only when listening on loopback)")
    parser.add_argument("--poll-time", type=_number(0), default=0, metavar="SECONDS",
                        help="ask clients to poll no sooner than this (X-Sync-Poll-Time)")
    parser.add_argument("--workers", type=count, default=_cores(),
                        help="worker processes (default: one per core, here %(default)s)")
    parser.add_argument("--max-concurrent", type=count,
                        help=f"requests in progress at once in the whole server before answering 503 "
                        f"(default {MAX_CONCURRENT_PER_WORKER} per worker)")
    parser.add_argument("--max-body-bytes", type=size, default=Limits.max_body_bytes,
                        help=f"largest request body (default {Limits.max_body_bytes})")
    parser.add_argument("--max-object-bytes", type=size, default=Limits.max_object_bytes,
                        help=f"largest object, as JSON (default {Limits.max_object_bytes})")
    parser.add_argument("--max-blob-bytes", type=size, default=Limits.max_blob_bytes,
                        help=f"largest blob (default {Limits.max_blob_bytes})")
    parser.add_argument("--max-collections-per-user", type=count, default=Limits.max_collections_per_user,
                        help=f"collections one user may have in one app (default {Limits.max_collections_per_user})")
    parser.add_argument("--quiet", action="store_true", help="print no access log line per request")
    parser.add_argument("--debug", action="store_true", help="log every request")
    parser.set_defaults(run=serve)
    commands = parser.add_subparsers(title="commands")
    gc = commands.add_parser("gc", help="collect garbage in every collection once")
    gc.add_argument("--data-dir", default="./cutout-data", help="where collections live")
    gc.add_argument("--purge-tombstones-days", type=_number(0, kind=float), metavar="DAYS",
                    help="also purge tombstones appended more than DAYS days ago")
    gc.set_defaults(run=gc_command)
    token = commands.add_parser("token", help="print a token for a user and an app, as /verify gives "
                                "(for scripts and tests: it opens that user's data)")
    token.add_argument("--data-dir", default="./cutout-data", help="where collections live")
    token.add_argument("--secret-file", help="the server's secret (default DATA_DIR/.secret)")
    token.add_argument("--email", required=True, help="the user")
    token.add_argument("--audience", required=True, help="the app's origin, such as https://app.example")
    token.add_argument("--expires-in", type=int, default=TOKEN_LIFETIME, metavar="SECONDS",
                       help="seconds until it expires; negative: one that has expired (default %(default)s)")
    token.set_defaults(run=token_command)
    balancer = commands.add_parser("balancer", help="serve a cluster: pass each request to the node that owns "
                                   "its collection (SPEC.md chapter 4)")
    balancer.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    balancer.add_argument("--port", type=port, default=8080, help="port to listen on; 0 picks a free one "
                          "(default %(default)s)")
    balancer.add_argument("--node", action="append", default=[], metavar="URL",
                          help="a node, started with the same --secret-file (repeat for each); once the cluster "
                          "has a membership, the one the nodes keep wins")
    balancer.add_argument("--backups", type=_number(0), default=0, help="copies of each collection besides its owner's")
    balancer.add_argument("--secret-file", help="the secret file the nodes were started with")
    balancer.add_argument("--workers", type=count, default=_cores(), help="worker processes (default: one per core)")
    balancer.add_argument("--max-concurrent", type=count, help="requests in progress at once before answering 503")
    balancer.add_argument("--max-body-bytes", type=size, default=Limits.max_body_bytes,
                          help="largest request body passed on: give it the nodes' --max-body-bytes")
    balancer.add_argument("--max-blob-bytes", type=size, default=Limits.max_blob_bytes,
                          help="largest blob passed on: give it the nodes' --max-blob-bytes")
    balancer.add_argument("--quiet", action="store_true", help="print no access log line per request")
    balancer.set_defaults(run=balancer_command)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
