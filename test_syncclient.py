"""Tests of syncclient.js in a real browser: Debian's chromium, driven by Playwright.

The example notes app (example/) is served from one origin (http://localhost:PORT)
and cutout.py from another (http://127.0.0.1:PORT), so every sync request is
cross-origin, as when the server is hosted centrally. Two browser contexts are two
devices of one user, each with its own localStorage and IndexedDB. Servers are
real processes, started, stopped and restarted by the tests; nothing is mocked.

They need /usr/bin/chromium (apt-get install chromium; CUTOUT_CHROMIUM names
another) and the Python package playwright; without them they are skipped, and
.ci/run, which installs both, fails on any skipped test.
"""

import base64
import contextlib
import functools
import http.server
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

import pytest
import requests

import cutout

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = os.environ.get("CUTOUT_CHROMIUM", "/usr/bin/chromium")
# Chromium's own calls home are refused on a closed network, many at a time; these keep it quiet.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps"]
POLL_MS = 300           # the example app's poll interval in these tests
WAIT_MS = 20_000        # how long a device may take to see a change


class CutoutServer:
    """cutout.py in a process of its own, stopped and started again on the same port; without its
    access log, which nobody reads here."""

    def __init__(self, data_dir, *options):
        self.data_dir, self.options, self.port, self.process = str(data_dir), list(options), 0, None

    def start(self):
        # A port of our choosing, not --port 0: the server sets SO_REUSEADDR only on a
        # given port, and without it a restart cannot bind while old connections linger.
        for attempt in range(3):
            port = self.port or _free_port()
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "cutout.py"), "--port", str(port), "--quiet",
                 "--data-dir", self.data_dir, *self.options],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = self.process.stdout.readline()
            if re.match(rf"The Cut-Out serving http://127\.0\.0\.1:{port}/", line):
                self.port = port        # kept, so that a restart serves the same URL
                return self
            self.process.wait()
            error = self.process.stderr.read()
            self.process.stdout.close()
            self.process.stderr.close()
            if "in use" not in error or self.port:
                break
        pytest.fail(f"cutout.py did not start: {line!r} {error[-500:]}")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        if self.process:
            self.process.stdout.close()
            self.process.stderr.close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/"

    def secret(self):
        with open(os.path.join(self.data_dir, ".secret"), "rb") as secret_file:
            return secret_file.read().strip()


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def app_origin():
    """The example app, served from its own origin."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietFiles, directory=os.path.join(HERE, "example")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def server(tmp_path):
    started = CutoutServer(tmp_path / "data").start()
    yield started
    started.stop()


_open_contexts = []


@pytest.fixture(autouse=True)
def _close_devices():
    """Each test's devices are closed after it, so that none goes on polling a stopped server."""
    yield
    while _open_contexts:
        _open_contexts.pop().close()


class Device:
    """One browser context running the example app: a device of the user's."""

    def __init__(self, browser, app_origin, server, email="ann@example.com", bucket="notes"):
        self.context = browser.new_context()
        _open_contexts.append(self.context)
        self.page = self.context.new_page()
        self.errors, self.responses = [], []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("response", self._note_response)
        query = urllib.parse.urlencode({"server": server.url, "bucket": bucket, "poll": POLL_MS})
        self.url = f"{app_origin}/index.html?{query}"
        self.open()
        if email:
            self.login(email)

    def _note_response(self, response):
        # When the request started, by the browser's clock: Playwright hands events to
        # Python only while Python calls it, so the time they arrive here says little.
        if "/+static/" not in response.url and "127.0.0.1" in response.url:
            started = response.request.timing["startTime"] / 1000
            self.responses.append((started, response.request.method, response.status, response.url))

    def open(self):
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-connected=true]")

    def login(self, email):
        self.page.fill("#email", email)
        self.page.click("#login")
        self.page.wait_for_selector("#who:not([hidden])")

    def add(self, text):
        self.page.fill("#text", text)
        self.page.click("#add")
        # Stored once the form is empty again: filling it sooner would race the reset.
        self.page.wait_for_function("text => document.getElementById('text').value === '' && "
                                    "notesApp.list().then(ns => ns.some(n => n.text === text))", arg=text)

    def add_with_image(self, text, path):
        self.page.fill("#text", text)
        self.page.set_input_files("#image", str(path))
        self.page.click("#add")

    def note_id(self, text):
        return self.page.evaluate("text => notesApp.list().then(ns => ns.find(n => n.text === text).id)", text)

    def edit(self, text, new_text):
        self.page.evaluate("([id, text]) => notesApp.edit(id, text)", [self.note_id(text), new_text])

    def texts(self):
        return sorted(self.page.evaluate("notesApp.list().then(ns => ns.map(n => n.text))"))

    def pending(self):
        return self.page.evaluate("notesApp.list().then(ns => ns.filter(n => n.version !== n.savedVersion).length)")

    def wait_for(self, texts, what=""):
        """Wait until the device holds exactly these texts, all saved; fail naming what it holds."""
        deadline = time.monotonic() + WAIT_MS / 1000
        while time.monotonic() < deadline:
            if self.texts() == sorted(texts) and self.pending() == 0:
                return
            self.page.wait_for_timeout(100)
        pytest.fail(f"{what}: the device holds {self.texts()} ({self.pending()} pending), not {sorted(texts)}; "
                    f"status {self.page.inner_text('#status')!r}; page errors {self.errors}")

    def status(self):
        return self.page.inner_text("#status")


def server_objects(server, email="ann@example.com", origin=None, bucket="notes"):
    """The newest version of each object the server holds, read over HTTP as any client would."""
    token = requests.post(server.url + "verify", data={"assertion": email, "audience": origin}).json()
    path = f"{server.url}{urllib.parse.urlsplit(origin).netloc}/{urllib.parse.quote(email)}/{bucket}"
    newest, since, collection_id = {}, 0, None
    while True:
        params = {"auth": token["auth"]["query"]["auth"]}
        if collection_id:
            params.update(since=since, collection_id=collection_id)
        response = requests.get(path, params=params)
        if response.status_code == 204:
            break
        answer = response.json()
        collection_id = answer.get("collection_id", collection_id)
        for counter, obj in answer["objects"]:
            newest[(obj["type"], obj["id"])] = obj
            since = counter
        if not answer.get("incomplete"):
            break
    return {key: obj for key, obj in newest.items() if not obj.get("deleted")}


# ---------------------------------------------------------------- two devices


def test_create_update_and_delete_propagate_between_devices(browser, app_origin, server):
    phone, laptop = Device(browser, app_origin, server), Device(browser, app_origin, server)
    phone.add("milk")
    phone.add("eggs")
    laptop.wait_for(["eggs", "milk"], "created on the phone")
    laptop.edit("milk", "oat milk")
    phone.wait_for(["eggs", "oat milk"], "updated on the laptop")
    phone.page.click(f"li[data-id='{phone.note_id('eggs')}'] .delete")
    laptop.wait_for(["oat milk"], "deleted on the phone")
    assert [obj["data"]["text"] for obj in server_objects(server, origin=app_origin).values()] == ["oat milk"]
    assert not phone.errors and not laptop.errors


def test_edits_made_offline_merge_through_since_invalid(browser, app_origin, server):
    phone, laptop = Device(browser, app_origin, server), Device(browser, app_origin, server)
    phone.add("one")
    phone.add("two")
    laptop.wait_for(["one", "two"], "before going offline")
    phone.context.set_offline(True)
    phone.edit("one", "one, edited offline")
    phone.add("three, written offline")
    phone.page.wait_for_timeout(3 * POLL_MS)
    assert phone.pending() == 2, "offline, the edits must wait"
    laptop.edit("two", "two, edited meanwhile")
    laptop.add("four")
    laptop.page.wait_for_function("notesApp.list().then(ns => ns.every(n => n.version === n.savedVersion))")
    # The phone reads before it posts, so on its own it would merge without a refusal: a third
    # device writes between the phone's GET and its POST, which must then meet since_invalid.
    between = {"type": "note", "id": "five", "data": {"text": "five, written in between", "updated": 1}}
    exchanges = _record_exchanges(phone, "notes", lambda: _write(server, app_origin, [between], "notes",
                                                                  "ann@example.com"))
    phone.context.set_offline(False)
    expected = ["five, written in between", "four", "one, edited offline", "three, written offline",
                "two, edited meanwhile"]
    phone.wait_for(expected, "the phone back online")
    laptop.wait_for(expected, "the laptop after the phone's merge")
    posts = [answer for method, _, _, answer, _ in exchanges if method == "POST"]
    assert posts and posts[0].get("since_invalid") is True, f"the phone's first POST was not refused: {posts[:1]}"
    assert any("object_counters" in answer for answer in posts[1:]), "the phone never posted again after merging"
    assert sorted(obj["data"]["text"] for obj in server_objects(server, origin=app_origin).values()) == expected


def test_a_server_restart_loses_no_local_edit(browser, app_origin, server):
    phone, laptop = Device(browser, app_origin, server), Device(browser, app_origin, server)
    phone.add("before the restart")
    laptop.wait_for(["before the restart"], "before the restart")
    server.stop()
    phone.add("while the server was down")
    phone.page.wait_for_timeout(2000)
    assert phone.pending() == 1 and "error" in phone.status()
    server.start()
    phone.wait_for(["before the restart", "while the server was down"], "the phone after the restart")
    laptop.wait_for(["before the restart", "while the server was down"], "the laptop after the restart")


def test_a_503_with_retry_after_is_waited_out(browser, app_origin, tmp_path):
    server = CutoutServer(tmp_path / "data", "--max-concurrent", "1").start()
    try:
        phone = Device(browser, app_origin, server)
        phone.add("first")
        phone.wait_for(["first"], "before the server is busy")
        # A request whose body never comes keeps the one slot busy (BACKOFF-1).
        hog = socket.create_connection(("127.0.0.1", server.port))
        hog.sendall(b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                    b"Content-Length: 100\r\n\r\n")
        phone.page.wait_for_timeout(300)
        phone.add("while busy")
        for _ in range(100):
            if any(status == 503 for _, _, status, _ in phone.responses):
                break
            phone.page.wait_for_timeout(100)
        hog.close()
        phone.wait_for(["first", "while busy"], "after the server was busy")
        times = [(at, status) for at, _, status, url in phone.responses if "/notes" in url]
        busy = max(at for at, status in times if status == 503)
        after = [at for at, status in times if at > busy]
        assert after and after[0] - busy >= 0.9, "the next request came before Retry-After: 1 had passed"
    finally:
        server.stop()


def test_an_expired_token_is_renewed_without_losing_an_edit(browser, app_origin, server):
    phone, laptop = Device(browser, app_origin, server), Device(browser, app_origin, server)
    phone.add("with a fresh token")
    laptop.wait_for(["with a fresh token"], "before the token expires")
    # The server's own signature, two days old: a token that has expired (AUTH-2).
    expired = cutout.make_token(server.secret(), "ann@example.com", app_origin.lower(), time.time() - 2 * 86400)
    # Swapped while no page of the app runs: a running one could write its own token back.
    phone.page.goto(f"{app_origin}/no-app-here")
    phone.page.evaluate("""token => {
        const key = Object.keys(localStorage).find(k => k.startsWith("cutout-sync "));
        const state = JSON.parse(localStorage.getItem(key));
        state.auth.auth = token;
        localStorage.setItem(key, JSON.stringify(state));
    }""", expired)
    phone.open()        # the device comes back days later
    phone.add("after the token expired")
    laptop.wait_for(["after the token expired", "with a fresh token"], "an edit made with an expired token")
    assert any(status == 401 for _, _, status, _ in phone.responses), "the expired token was never refused"


def test_a_deleted_collection_is_recovered_without_losing_a_local_edit(browser, app_origin, server):
    phone, laptop = Device(browser, app_origin, server), Device(browser, app_origin, server)
    phone.add("shared")
    laptop.wait_for(["shared"], "before the delete")
    phone.context.set_offline(True)
    phone.edit("shared", "edited before the delete was seen")
    collection_id = laptop.page.evaluate("notesApp.sync.deleteCollection('moving to a new server')")
    assert isinstance(collection_id, str)
    phone.context.set_offline(False)
    phone.wait_for(["edited before the delete was seen"], "the phone after the collection was deleted")
    laptop.wait_for(["edited before the delete was seen"], "the laptop after the phone resent its notes")
    assert [obj["data"]["text"] for obj in server_objects(server, origin=app_origin).values()] == [
        "edited before the delete was seen"]


def _png(width=2, height=2):
    """A real PNG image, made here."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_blob_round_trips_and_displays_through_authenticate_url(browser, app_origin, server, tmp_path):
    phone, laptop = Device(browser, app_origin, server), Device(browser, app_origin, server)
    image = tmp_path / "dot.png"
    image.write_bytes(_png(3, 2))
    phone.add_with_image("a photo", image)
    laptop.wait_for(["a photo"], "a note with an image")
    img = laptop.page.wait_for_selector("#notes img")
    src = img.get_attribute("src")
    assert src.startswith(server.url) and "/+static/" in src and "auth=" in src
    laptop.page.wait_for_function("img => img.complete && img.naturalWidth === 3", arg=img, timeout=WAIT_MS)
    assert requests.get(src).content == image.read_bytes()
    [note] = server_objects(server, origin=app_origin).values()
    assert set(note["blob"]) == {"content_type", "href"} and note["blob"]["content_type"] == "image/png"
    # The phone's copy now has the href, and sends it rather than the bytes, which it keeps.
    kept = phone.page.evaluate("notesApp.list().then(ns => ns[0].image)")
    assert kept["href"] == note["blob"]["href"] and base64.b64decode(kept["data"]) == image.read_bytes()
    phone.edit("a photo", "a photo, renamed")
    laptop.wait_for(["a photo, renamed"], "an edit of a note with an image")
    [renamed] = server_objects(server, origin=app_origin).values()
    assert renamed["blob"] == note["blob"], "an edit that keeps the image must keep its blob"


# ---------------------------------------------------------------- the library, with an app kept in memory

# An appData that keeps its objects in memory and records every call, made in the page.
MEMORY_APP = """() => {
window.memoryApp = (name) => {
  const app = {objects: new Map(), pending: new Map(), calls: [], received: [], errors: []};
  app.put = (obj) => { app.pending.set(JSON.stringify([obj.type, obj.id]), obj); app.onupdate && app.onupdate(); };
  app.getPendingObjects = () => { app.calls.push("getPendingObjects"); return [...app.pending.values()]; };
  app.objectsSaved = (objects) => {
    app.calls.push("objectsSaved");
    for (const obj of objects) {
      const key = JSON.stringify([obj.type, obj.id]);
      app.pending.delete(key);
      if (obj.deleted) app.objects.delete(key); else app.objects.set(key, obj);
    }
  };
  app.objectsReceived = (objects, callback) => {     // Node style, on purpose
    app.calls.push("objectsReceived");
    app.received.push(objects);
    for (const obj of objects) {
      const key = JSON.stringify([obj.type, obj.id]);
      if (obj.deleted) app.objects.delete(key); else app.objects.set(key, obj);
    }
    setTimeout(() => callback(null), 0);
  };
  app.resetSaved = async () => {
    app.calls.push("resetSaved");
    for (const [key, obj] of app.objects) app.pending.set(key, obj);
  };
  app.reportObjectErrors = (errors) => { app.errors.push(...errors); };
  app.status = () => {};
  return app;
};
}"""


def _record_exchanges(device, bucket, before_post=None):
    """Route the device's requests to the collection through Python and keep each exchange:
    a list of (method, the request's JSON body or None, status, the answer's JSON or None, URL).
    before_post(), if given, runs once, just before the first POST reaches the server."""
    exchanges = []

    def handle(route):
        request = route.request
        if request.method == "POST" and before_post is not None and not any(m == "POST" for m, *_ in exchanges):
            before_post()
        try:
            answer = route.fetch()
            sent = json.loads(request.post_data) if request.post_data else None
            body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else None
            exchanges.append((request.method, sent, answer.status, body, request.url))
            route.fulfill(response=answer)
        except playwright_api.Error:
            # A poll that outlived its test: its server is gone, or its page is closing (which
            # disposes of the fetched answer). The test that wanted it has its answer already.
            with contextlib.suppress(playwright_api.Error):
                route.abort()
    device.page.route(lambda url: f"/{bucket}?" in url and "/+static/" not in url, handle)
    return exchanges


def _page(browser, app_origin, server):
    device = Device(browser, app_origin, server, email=None)
    device.page.evaluate(MEMORY_APP)
    return device


def _new_sync(device, name, server, bucket, **options):
    device.page.evaluate("""([name, serverUrl, bucket, options]) => {
        const app = memoryApp(name);
        window[name] = {app, sync: new Sync(app, {serverUrl, bucket, pollInterval: 600000,
                                                   getAssertion: async () => "bo@example.com", ...options})};
        return window[name].sync.request();
    }""", [name, server.url, bucket, options])


def _write(server, app_origin, objects, bucket, email="bo@example.com"):
    """POST objects to the collection over HTTP, as another client would; the newest counter."""
    token = requests.post(server.url + "verify", data={"assertion": email, "audience": app_origin}
                          ).json()["auth"]["query"]["auth"]
    path = f"{server.url}{urllib.parse.urlsplit(app_origin).netloc}/{urllib.parse.quote(email)}/{bucket}"
    hello = requests.get(path, params={"auth": token}).json()
    since, answer = 0, hello
    while True:     # to the newest counter, through the pages
        since = max([since, answer.get("until", 0)] + [counter for counter, _ in answer["objects"]])
        if not answer.get("incomplete"):
            break
        answer = requests.get(path, params={"auth": token, "since": since,
                                            "collection_id": hello["collection_id"]}).json()
    for first in range(0, len(objects), 500):
        answer = requests.post(path, params={"auth": token, "since": since, "collection_id": hello["collection_id"]},
                               json=objects[first:first + 500]).json()
        since = answer["object_counters"][-1]
    return since


def test_several_sync_objects_work_side_by_side(browser, app_origin, server, tmp_path):
    other = CutoutServer(tmp_path / "other").start()
    try:
        device = _page(browser, app_origin, server)
        _new_sync(device, "before", server, "notes")
        _new_sync(device, "after", other, "notes-v2")
        device.page.evaluate("""async () => {
            before.app.put({type: "note", id: 1, data: "kept in the old bucket"});
            after.app.put({type: "note", id: 1, data: {text: "moved to the new bucket"}});
            await before.sync.syncNow();
            await after.sync.syncNow();
        }""")
        assert [o["data"] for o in server_objects(server, "bo@example.com", app_origin, "notes").values()] == [
            "kept in the old bucket"]
        assert [o["data"] for o in server_objects(other, "bo@example.com", app_origin, "notes-v2").values()] == [
            {"text": "moved to the new bucket"}]
        keys = device.page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('cutout-sync '))")
        assert sorted(keys) == sorted([f"cutout-sync {server.url} notes", f"cutout-sync {other.url} notes-v2"])
    finally:
        other.stop()


def test_pages_go_to_the_app_as_they_come_and_the_newest_version_comes_last(browser, app_origin, server):
    # 1,000 objects written three times over, then every tenth deleted: 3,100 records, four pages.
    objects = [{"type": "n", "id": i, "data": {"v": version}} for version in range(3) for i in range(1000)]
    objects += [{"type": "n", "id": i, "deleted": True} for i in range(0, 1000, 10)]
    last = _write(server, app_origin, objects, "paged")
    device = _page(browser, app_origin, server)
    exchanges = _record_exchanges(device, "paged")
    _new_sync(device, "reader", server, "paged")
    device.page.evaluate("reader.sync.syncNow()")
    calls = device.page.evaluate("reader.app.received")
    pages = [answer for method, _, _, answer, _ in exchanges if method == "GET" and answer and answer["objects"]]
    assert len(pages) >= 4 and len(calls) == len(pages), "each page must go to the app as it comes, on its own"
    versions = {}
    for call, page in zip(calls, pages):
        keys = [(obj["type"], obj["id"]) for obj in call]
        assert len(keys) == len(set(keys)), "a call must carry each object once"
        newest_on_page = {(obj["type"], obj["id"]): obj for _, obj in page["objects"]}
        assert sorted(map(json.dumps, call)) == sorted(map(json.dumps, newest_on_page.values())), \
            "a call must carry the newest version on its page of each object there"
        for obj in call:
            version = 3 if obj.get("deleted") else obj["data"]["v"]
            assert version > versions.get(obj["id"], -1), f"an older version of {obj['id']} came after a newer one"
            versions[obj["id"]] = version
    assert versions == {i: 3 if i % 10 == 0 else 2 for i in range(1000)}, "the last version given is the newest"
    state = device.page.evaluate("JSON.parse(localStorage.getItem(reader.sync.storageKey))")
    assert state["since"] == last


def _purge(server):
    """Every tombstone purged now, as an operator does with cutout.py gc."""
    subprocess.run([sys.executable, os.path.join(HERE, "cutout.py"), "gc", "--data-dir", server.data_dir,
                    "--purge-tombstones-days", "0"], check=True, capture_output=True)


def test_purged_tombstones_lead_to_a_full_read_that_says_what_is_gone(browser, app_origin, server):
    _write(server, app_origin, [{"type": "n", "id": i, "data": i} for i in range(5)], "purged")
    device = _page(browser, app_origin, server)
    exchanges = _record_exchanges(device, "purged")
    _new_sync(device, "reader", server, "purged")
    device.page.evaluate("reader.sync.syncNow()")
    assert device.page.evaluate("reader.app.objects.size") == 5
    _write(server, app_origin, [{"type": "n", "id": 1, "deleted": True}, {"type": "n", "id": 2, "data": "new"}],
           "purged")
    _purge(server)
    device.page.evaluate("reader.sync.syncNow()")
    held = device.page.evaluate("[...reader.app.objects.values()].map(o => [o.id, o.data]).sort()")
    assert held == [[0, 0], [2, "new"], [3, 3], [4, 4]], "the purged delete of id 1 was missed"
    answers = [answer or {} for _, _, _, answer, _ in exchanges]
    purged = [i for i, answer in enumerate(answers) if answer.get("since_purged") is True]
    assert purged, f"the server never answered since_purged: {answers}"
    reread = [url for _, _, _, _, url in exchanges[purged[0] + 1:]]
    assert reread and "since=0" in reread[0], f"since_purged must be followed by a read from since=0, not {reread[:1]}"


def test_objects_are_checked_before_upload_and_bad_ones_reported(browser, app_origin, server):
    device = _page(browser, app_origin, server)
    exchanges = _record_exchanges(device, "checked")
    _new_sync(device, "app1", server, "checked")
    errors = device.page.evaluate("""async () => {
        app1.app.put({type: "note", id: "good", data: 1});
        app1.app.put({type: "note", id: "no data"});
        app1.app.put({type: "", id: "no type", data: 1});
        app1.app.put({type: "note", id: "both", data: 1, deleted: true});
        app1.app.put({type: "note", id: "extra", data: 1, colour: "red"});
        await app1.sync.syncNow();
        return app1.app.errors.map(e => [e.object.id, e.error]);
    }""")
    assert sorted(object_id for object_id, _ in errors) == ["both", "extra", "no data", "no type"]
    assert all(message for _, message in errors)
    assert list(server_objects(server, "bo@example.com", app_origin, "checked")) == [("note", "good")]
    assert device.page.evaluate("app1.app.pending.size") == 4, "refused objects stay pending in the app"
    posted = [obj["id"] for method, sent, _, _, _ in exchanges if method == "POST" for obj in sent]
    assert posted == ["good"], f"the client sent objects it should have refused itself: {posted}"


def test_polls_wait_for_x_sync_poll_time_and_changes_are_debounced(browser, app_origin, tmp_path):
    server = CutoutServer(tmp_path / "data", "--poll-time", "1").start()
    try:
        device = _page(browser, app_origin, server)
        _new_sync(device, "poller", server, "polled", pollInterval=100, immediateDelay=200)
        device.page.wait_for_timeout(4000)
        device.page.evaluate("""() => {
            for (let i = 0; i < 20; i++) poller.app.put({type: "note", id: i, data: i});
        }""")
        device.page.wait_for_timeout(2500)
        device.page.evaluate("poller.sync.deactivate()")
        requests_made = [(at, method) for at, method, _, url in device.responses if "/polled" in url]
        gets = [at for at, method in requests_made if method == "GET"]
        posts = [at for at, method in requests_made if method == "POST"]
        gaps = [later - earlier for earlier, later in zip(gets, gets[1:])]
        assert len(gets) >= 3 and min(gaps) >= 0.95, f"polls {gaps} s apart; the server asked for 1 s"
        assert len(posts) == 1, f"20 quick changes made {len(posts)} POSTs, not one"
        assert device.page.evaluate("poller.app.pending.size") == 0
    finally:
        server.stop()


def test_polls_slow_down_while_the_page_is_hidden(browser, app_origin, server):
    device = _page(browser, app_origin, server)
    _new_sync(device, "hider", server, "hidden", pollInterval=200, hiddenPollInterval=600000)
    def gets_since(moment):     # moments and request starts both by the browser's clock
        return [at for at, method, _, url in device.responses if method == "GET" and "/hidden" in url and at > moment]

    def wait_for_gets(moment, count):
        for _ in range(100):
            if len(gets_since(moment)) >= count:
                return
            device.page.wait_for_timeout(100)
    wait_for_gets(0, 3)
    assert len(gets_since(0)) >= 3, "the shown page should poll every 200 ms"
    # The browser's own event, with the page reported hidden as a background tab is.
    hidden_at = device.page.evaluate("""() => {
        Object.defineProperty(document, "hidden", {configurable: true, get: () => true});
        document.dispatchEvent(new Event("visibilitychange"));
        return Date.now() / 1000;
    }""")
    device.page.wait_for_timeout(2000)
    # One poll already on its way may still go; at the shown pace there would be ten.
    assert len(gets_since(hidden_at)) <= 1, f"the hidden page polled at the shown pace: {gets_since(hidden_at)}"
    shown_at = device.page.evaluate("""() => {
        Object.defineProperty(document, "hidden", {configurable: true, get: () => false});
        document.dispatchEvent(new Event("visibilitychange"));
        return Date.now() / 1000;
    }""")
    wait_for_gets(shown_at, 3)
    assert len(gets_since(shown_at)) >= 3, "shown again, the page must poll at its pace again"


def test_the_readme_example_works(browser, app_origin, server):
    """The client example in README.md, run as it is written (only its server URL changed)."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        example = re.search(r"```html\n(.*?)```", readme.read(), re.S).group(1)
    example = example.replace("http://127.0.0.1:8088/", server.url)
    context = browser.new_context()
    _open_contexts.append(context)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept("reader@example.com"))
    page.goto(app_origin + "/readme-example")      # a page of the app's origin (a 404) with nothing on it
    page.set_content(f"<!doctype html><html><body>{example}</body></html>")
    page.dispatch_event("body", "click")
    page.wait_for_function("sync.isLoggedIn()")
    page.evaluate("write('n1', 'from the README')")
    page.wait_for_function("JSON.parse(localStorage.getItem('notes'))[0][1].saved === true", timeout=WAIT_MS)
    held = server_objects(server, "reader@example.com", app_origin)
    assert [obj["data"] for obj in held.values()] == ["from the README"]


def test_the_default_server_is_where_syncclient_js_was_loaded_from(browser, app_origin, server):
    """[JS-1] Loaded from the server under either of its names, the library's default server
    is that name: the server writes nothing of the request into it."""
    context = browser.new_context()
    _open_contexts.append(context)
    page = context.new_page()
    page.goto(app_origin + "/default-server")      # a page of the app's origin (a 404) with nothing on it
    for base in (server.url, server.url.replace("127.0.0.1", "localhost")):
        page.add_script_tag(url=base + "syncclient.js")
        assert page.evaluate("new Sync({}, {}).serverUrl") == base


# ---------------------------------------------------------------- what a review found

# A second device in the same page: a Sync of its own, its state and keys kept apart in memory.
OTHER_DEVICE = """([serverUrl, bucket]) => {
    const app = memoryApp("other");
    const store = new Map();
    const storage = {getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v)};
    window.other = {app, sync: new Sync(app, {serverUrl, bucket, storage, database: null, pollInterval: 600000,
                                              getAssertion: async () => "bo@example.com"})};
    return other.sync.request();
}"""


def test_a_post_refused_as_since_invalid_merges_and_posts_again(browser, app_origin, server):
    device = _page(browser, app_origin, server)
    _new_sync(device, "mine", server, "merged")
    device.page.evaluate(OTHER_DEVICE, [server.url, "merged"])
    calls = device.page.evaluate("""async () => {
        await mine.sync.syncNow();
        // Between this device's GET and its POST, the other device writes.
        const pending = mine.app.getPendingObjects;
        mine.app.getPendingObjects = async () => {
            mine.app.getPendingObjects = pending;
            other.app.put({type: "note", id: "theirs", data: "written in between"});
            await other.sync.syncNow();
            return pending();
        };
        mine.app.put({type: "note", id: "mine", data: "mine"});
        await mine.sync.syncNow();
        return mine.app.calls;
    }""")
    # GET, then a POST refused with since_invalid: the missed object goes to the app, and the retry is stored.
    assert calls[-4:] == ["getPendingObjects", "objectsReceived", "getPendingObjects", "objectsSaved"], calls
    assert device.page.evaluate("mine.app.received.flat().map(o => o.id)") == ["theirs"]
    held = server_objects(server, "bo@example.com", app_origin, "merged")
    assert sorted(obj["data"] for obj in held.values()) == ["mine", "written in between"]


def test_a_post_that_meets_a_deleted_collection_sends_everything_again(browser, app_origin, server):
    device = _page(browser, app_origin, server)
    _new_sync(device, "mine", server, "replaced")
    device.page.evaluate(OTHER_DEVICE, [server.url, "replaced"])
    device.page.evaluate("""async () => {
        mine.app.put({type: "note", id: "old", data: "saved before"});
        await mine.sync.syncNow();
        const pending = mine.app.getPendingObjects;
        mine.app.getPendingObjects = async () => {
            mine.app.getPendingObjects = pending;
            await other.sync.syncNow();
            await other.sync.deleteCollection("starting over");
            return pending();
        };
        mine.app.put({type: "note", id: "new", data: "written after"});
        await mine.sync.syncNow();
    }""")
    assert "resetSaved" in device.page.evaluate("mine.app.calls")
    held = server_objects(server, "bo@example.com", app_origin, "replaced")
    assert sorted(obj["data"] for obj in held.values()) == ["saved before", "written after"]


def test_an_object_the_server_refuses_is_reported_and_does_not_hold_up_the_rest(browser, app_origin, server):
    device = _page(browser, app_origin, server)
    _new_sync(device, "mine", server, "refused")
    href = f"/{urllib.parse.urlsplit(app_origin).netloc}/bo%40example.com/refused/+static/{'0' * 32}-{'0' * 32}"
    errors = device.page.evaluate("""async (href) => {
        mine.app.put({type: "note", id: "good", data: 1});
        mine.app.put({type: "photo", id: "made-up", data: 1, blob: {content_type: "image/png", href}});
        mine.app.put({type: "note", id: "also good", data: 2});
        await mine.sync.syncNow();
        await mine.sync.syncNow();          // the refused one is not sent again as it is
        return mine.app.errors.map(e => [e.object.id, e.code]);
    }""", href)
    assert errors == [["made-up", "bad_blob"]]
    held = server_objects(server, "bo@example.com", app_origin, "refused")
    assert sorted(key[1] for key in held) == ["also good", "good"]
    posts = [status for _, method, status, url in device.responses if method == "POST" and "/refused" in url]
    assert posts == [400, 200], f"POST statuses {posts}: the refused object was sent again"


def test_a_login_refused_on_renewal_says_so(browser, app_origin, server):
    device = _page(browser, app_origin, server)
    _new_sync(device, "mine", server, "renewal")
    outcome = device.page.evaluate("""async ([token]) => {
        const events = [];
        mine.sync.watch({onlogin: (email) => events.push("login " + email), onlogout: () => events.push("logout")});
        mine.sync._state.auth = {auth: token};          // the token expired
        mine.sync.options.getAssertion = async () => "not an email address";
        const error = await mine.sync.syncNow().then(() => null, (e) => e.message);
        await new Promise((resolve) => setTimeout(resolve, 50));
        return {error, events, loggedIn: mine.sync.isLoggedIn()};
    }""", [cutout.make_token(server.secret(), "bo@example.com", app_origin.lower(), time.time() - 2 * 86400)])
    assert outcome["error"] and outcome["loggedIn"] is False
    assert outcome["events"] == ["login bo@example.com", "logout"], "the app must hear that the login is gone"


def test_an_image_survives_its_collection_being_deleted(browser, app_origin, server, tmp_path):
    phone, laptop = Device(browser, app_origin, server), Device(browser, app_origin, server)
    image = tmp_path / "dot.png"
    image.write_bytes(_png(2, 2))
    phone.add_with_image("a photo", image)
    laptop.wait_for(["a photo"], "a note with an image")
    phone.wait_for(["a photo"], "the image saved")
    laptop.page.evaluate("notesApp.sync.deleteCollection('moving')")
    # The phone kept the bytes, so it sends them again; the laptop never had them.
    laptop.wait_for(["a photo"], "after the delete")
    phone.wait_for(["a photo"], "after the delete")
    for _ in range(100):
        [note] = server_objects(server, origin=app_origin).values()
        if "blob" in note:
            break
        phone.page.wait_for_timeout(100)
    assert requests.get(phone.page.evaluate("href => notesApp.sync.authenticateUrl(href)",
                                            note["blob"]["href"])).content == image.read_bytes()


def test_another_user_on_the_same_device_does_not_get_the_first_ones_notes(browser, app_origin, server):
    device = Device(browser, app_origin, server, email="ann@example.com")
    device.add("ann's own")
    device.wait_for(["ann's own"], "ann's note saved")
    device.page.click("#logout")
    device.login("bob@example.com")
    device.add("bob's own")
    device.wait_for(["bob's own"], "bob's notes")
    assert [o["data"]["text"] for o in server_objects(server, "bob@example.com", app_origin).values()] == [
        "bob's own"]
    assert [o["data"]["text"] for o in server_objects(server, "ann@example.com", app_origin).values()] == [
        "ann's own"]


def test_the_app_starts_and_works_offline_then_syncs(browser, app_origin, server):
    phone, laptop = Device(browser, app_origin, server), Device(browser, app_origin, server)
    phone.add("online")
    laptop.wait_for(["online"], "before the server stops")
    server.stop()
    phone.page.goto(phone.url)
    phone.page.wait_for_selector("body[data-ready=true]")
    assert phone.texts() == ["online"]
    phone.add("written while the server was gone")
    server.start()
    phone.page.wait_for_selector("body[data-connected=true]", timeout=WAIT_MS)
    laptop.wait_for(["online", "written while the server was gone"], "after the server came back")


def test_the_rest_of_the_interface(browser, app_origin, server):
    """lastSyncTime, reset, toggleLogin, watch, scheduleSlowly / resetSchedule, deactivate / activate."""
    device = _page(browser, app_origin, server)
    _new_sync(device, "api", server, "interface", pollInterval=200, slowPollInterval=600000)
    result = device.page.evaluate("""async () => {
        const seen = [];
        const polls = () => performance.getEntriesByType("resource").filter(e => e.name.includes("/interface")).length;
        api.sync.watch({onlogin: (email) => seen.push("in " + email), onlogout: () => seen.push("out")});
        api.app.put({type: "note", id: 1, data: "one"});
        await api.sync.syncNow();
        const synced = api.sync.lastSyncTime();
        await api.sync.reset();                 // forget the position: everything is read and sent again
        await api.sync.syncNow();
        const afterReset = api.app.calls.slice();
        await api.sync.toggleLogin();           // out
        const outLoggedIn = api.sync.isLoggedIn();
        await api.sync.toggleLogin();           // in again
        api.sync.deactivate();
        const before = polls();
        await new Promise((resolve) => setTimeout(resolve, 800));
        const whileInactive = polls() - before;
        api.sync.activate();
        await new Promise((resolve) => setTimeout(resolve, 800));
        const whileActive = polls() - before;
        api.sync.scheduleSlowly();
        await new Promise((resolve) => setTimeout(resolve, 400));     // the poll already due may still run
        const slow = polls();
        await new Promise((resolve) => setTimeout(resolve, 800));
        const whileSlow = polls() - slow;
        api.sync.resetSchedule();
        await new Promise((resolve) => setTimeout(resolve, 800));
        const afterResetSchedule = polls() - slow;
        api.sync.deactivate();
        await new Promise((resolve) => setTimeout(resolve, 50));
        return {synced, afterReset, outLoggedIn, seen, whileInactive, whileActive, whileSlow, afterResetSchedule};
    }""")
    assert isinstance(result["synced"], int) and result["synced"] > 0
    calls = result["afterReset"]
    assert calls.count("resetSaved") == 1 and calls[-1] == "objectsSaved"
    assert result["afterReset"].index("resetSaved") < len(calls) - 1
    assert device.page.evaluate("api.app.received.flat().map(o => o.id)") == [1], "after reset() it reads all again"
    assert result["outLoggedIn"] is False
    assert result["seen"] == ["in bo@example.com", "out", "in bo@example.com"]
    assert result["whileInactive"] == 0 and result["whileActive"] >= 2
    assert result["whileSlow"] == 0 and result["afterResetSchedule"] >= 2


def test_the_status_line_tells_the_truth(browser, app_origin, server):
    """The example app's status line: not logged in (before login, after Sync now, after
    logout), N changes waiting, offline with N waiting, synced at HH:MM; and the page asks
    for no favicon it does not have."""
    device = Device(browser, app_origin, server, email=None)
    assert device.status() == "not logged in"
    device.page.click("#sync-now")
    device.page.wait_for_timeout(300)
    assert device.status() == "not logged in"
    device.login("ann@example.com")
    device.page.wait_for_function("/^synced at \\d\\d:\\d\\d$/.test(document.getElementById('status').textContent)",
                                  timeout=WAIT_MS)
    device.context.set_offline(True)
    device.add("written offline")
    device.page.wait_for_function("document.getElementById('status').textContent === 'offline, 1 waiting'",
                                  timeout=WAIT_MS)
    assert device.page.eval_on_selector("#notes li", "li => li.classList.contains('pending')")
    device.context.set_offline(False)
    device.page.evaluate("notesApp.sync.syncNow()")
    device.page.wait_for_function("/^synced at /.test(document.getElementById('status').textContent)",
                                  timeout=WAIT_MS)
    assert device.pending() == 0
    device.page.click("#logout")
    device.page.wait_for_function("document.getElementById('status').textContent === 'not logged in'",
                                  timeout=WAIT_MS)
    assert not [url for _, _, status, url in device.responses if status == 404], "a request the app made was 404"
    assert device.errors == []


# What an app does that keeps its own data in localStorage until the quota is reached.
FILL_LOCAL_STORAGE = """() => {
    window.fillLocalStorage = () => {
        const block = "x".repeat(1 << 20);
        for (let size = 1 << 20; size >= 1; size = Math.floor(size / 2)) {
            for (let i = 0; ; i++) {
                try { localStorage.setItem(`fill ${size} ${i}`, block.slice(0, size)); } catch (error) { break; }
            }
        }
    };
}"""


def test_a_state_that_cannot_be_stored_is_reported_once_and_nothing_is_sent_twice(browser, app_origin, server):
    """The app fills localStorage to its quota: each acknowledged POST is still followed by
    objectsSaved, so nothing is sent twice; the failure is one SyncError through status, with a
    clear message, and the library syncs on in memory (a second edit is sent once too)."""
    device = _page(browser, app_origin, server)
    _new_sync(device, "api", server, "quota")
    device.page.evaluate(FILL_LOCAL_STORAGE)
    exchanges = _record_exchanges(device, "quota")
    result = device.page.evaluate("""async () => {
        const statuses = [];
        api.app.status = (state, detail) => statuses.push([state, detail && detail.error ? detail.error.name : null,
                                                           detail && detail.message || null]);
        fillLocalStorage();
        api.app.put({type: "note", id: 1, data: "one"});
        const first = await api.sync.syncNow().then(() => "resolved", (error) => `rejected: ${error.message}`);
        api.app.put({type: "note", id: 2, data: "two"});
        await api.sync.syncNow();
        await api.sync.syncNow();
        return {first, statuses, pending: api.app.pending.size,
                saved: api.app.calls.filter((call) => call === "objectsSaved").length};
    }""")
    assert result["first"] == "resolved", result
    errors = [status for status in result["statuses"] if status[0] == "error"]
    assert len(errors) == 1 and errors[0][1] == "SyncError", result["statuses"]
    assert errors[0][2].startswith("cannot store the sync state (QuotaExceededError"), errors
    assert result["pending"] == 0 and result["saved"] == 2
    posts = [sent for method, sent, status, _, _ in exchanges if method == "POST"]
    assert posts == [[{"type": "note", "id": 1, "data": "one"}], [{"type": "note", "id": 2, "data": "two"}]], posts
    stored = server_objects(server, "bo@example.com", app_origin, "quota")
    assert sorted(obj["id"] for obj in stored.values()) == [1, 2], stored


# ---------------------------------------------------------------- at scale: what the library keeps, and where


def _reopen(device, name, server, bucket):
    """The page loaded again: a new app in memory, and a Sync that takes up the state where it was
    kept; its timer is off, so that every sync is one the test asks for."""
    device.page.reload()
    device.page.evaluate(MEMORY_APP)
    device.page.evaluate("""([name, serverUrl, bucket]) => {
        const app = memoryApp(name);
        window[name] = {app, sync: new Sync(app, {serverUrl, bucket, pollInterval: 600000,
                                                   getAssertion: async () => "bo@example.com"})};
        window[name].sync.deactivate();
    }""", [name, server.url, bucket])


def _gets(exchanges):
    return [status for method, _, status, _, _ in exchanges if method == "GET"]


NO_CHANGE_SYNCS = """async (name) => {
    const stateBefore = localStorage.getItem(window[name].sync.storageKey);
    const took = [];
    for (let i = 0; i < 21; i++) {
        const began = performance.now();
        await window[name].sync.syncNow();
        took.push(performance.now() - began);
    }
    const stateAfter = localStorage.getItem(window[name].sync.storageKey);
    return {median: took.sort((a, b) => a - b)[10], before: stateBefore.length, after: stateAfter.length};
}"""


def test_a_fresh_device_reads_100000_objects_with_uuid_ids_and_keeps_a_state_of_constant_size(
        browser, app_origin, server):
    """Pages reach the app as they come (never more than one page in a call), each object ends in
    its newest version, the state in localStorage stays a few hundred characters, a sync that finds
    nothing new is one GET whatever the size, and one edit from elsewhere arrives in one GET. The
    no-change syncs are timed at 1,000 and 100,000 objects and printed; bench.py workload 12 has
    the full figures."""
    import uuid
    small, big = [str(uuid.uuid4()) for _ in range(1_000)], [str(uuid.uuid4()) for _ in range(100_000)]
    twice = big[::100]
    _write(server, app_origin, [{"type": "note", "id": i, "data": {"v": 1}} for i in small], "small")
    _write(server, app_origin, [{"type": "note", "id": i, "data": {"v": 1}} for i in big]
           + [{"type": "note", "id": i, "data": {"v": 2}} for i in twice], "big")
    device = _page(browser, app_origin, server)
    timings = {}
    for name, bucket, ids in (("few", "small", small), ("many", "big", big)):
        exchanges = _record_exchanges(device, bucket)
        _new_sync(device, name, server, bucket, immediateDelay=600000)
        device.page.evaluate(f"{name}.sync.deactivate()")        # no timer: every sync here is one of the test's
        device.page.evaluate(f"{name}.sync.syncNow()")
        held = device.page.evaluate("""([name, twice]) => {
            const again = new Set(twice);
            const app = window[name].app;
            const wrong = [...app.objects.values()].filter((o) => o.data.v !== (again.has(o.id) ? 2 : 1)).length;
            return {count: app.objects.size, wrong, largestCall: Math.max(...app.received.map((c) => c.length)),
                    calls: app.received.length};
        }""", [name, twice])
        assert held["count"] == len(ids) and held["wrong"] == 0, held
        assert held["largestCall"] <= 1000, f"a call of {held['largestCall']} objects: pages must go one by one"
        gets_before = len(_gets(exchanges))
        figures = device.page.evaluate(NO_CHANGE_SYNCS, name)
        assert _gets(exchanges)[gets_before:] == [204] * 21, "a sync that finds nothing is one GET"
        assert figures["after"] < 400 and abs(figures["after"] - figures["before"]) <= 2, figures
        timings[bucket] = figures["median"]
    print(f"\nno-change syncNow(), median of 21: {timings['small']:.1f} ms at 1,000 objects, "
          f"{timings['big']:.1f} ms at 100,000 (ratio {timings['big'] / timings['small']:.2f})")
    gets_before = len(_gets(exchanges))
    _write(server, app_origin, [{"type": "note", "id": big[5], "data": {"v": 3}}], "big")
    device.page.evaluate("many.sync.syncNow()")
    assert _gets(exchanges)[gets_before:] == [200], "one edit from elsewhere must take one GET"
    assert device.page.evaluate("([id]) => many.app.objects.get(JSON.stringify(['note', id])).data.v", [big[5]]) == 3


def test_a_device_whose_local_storage_is_full_keeps_its_place_across_a_reload(browser, app_origin, server):
    """The app filled localStorage before the first sync: the state goes to IndexedDB, that is said
    once, and after a reload the device goes on from where it was: one GET, nothing read again."""
    _write(server, app_origin, [{"type": "note", "id": i, "data": i} for i in range(2_500)], "full")
    device = _page(browser, app_origin, server)
    device.page.evaluate(FILL_LOCAL_STORAGE)
    exchanges = _record_exchanges(device, "full")
    first = device.page.evaluate("""async (serverUrl) => {
        fillLocalStorage();
        const statuses = [];
        const app = memoryApp("api");
        app.status = (state, detail) => state === "error" && statuses.push([detail.error.name, detail.message]);
        window.api = {app, sync: new Sync(app, {serverUrl, bucket: "full", pollInterval: 600000,
                                                getAssertion: async () => "bo@example.com"})};
        api.sync.deactivate();
        await api.sync.request();
        await api.sync.syncNow();
        return {statuses, count: api.app.objects.size, stored: localStorage.getItem(api.sync.storageKey)};
    }""", server.url)
    assert first["count"] == 2_500
    assert first["stored"] is None, "localStorage was full: nothing of the state can be there"
    assert len(first["statuses"]) == 1 and first["statuses"][0][0] == "SyncError", first["statuses"]
    assert first["statuses"][0][1].startswith("cannot store the sync state (QuotaExceededError"), first["statuses"]
    gets_before = len(_gets(exchanges))
    _reopen(device, "again", server, "full")
    again = device.page.evaluate("""async () => {
        await again.sync.syncNow();
        return {loggedIn: again.sync.isLoggedIn(), received: again.app.received.length};
    }""")
    assert again == {"loggedIn": True, "received": 0}, again
    assert _gets(exchanges)[gets_before:] == [204], "after the reload, the device must go on where it was"


def test_a_read_from_the_start_after_a_reload_names_every_object_that_is_gone(browser, app_origin, server):
    """The keys the app holds are kept in IndexedDB: after a reload and a purge (PURGE-1), the read
    from the start hands the app a tombstone for exactly the objects deleted meanwhile, a thousand
    at most in a call, and the next sync finds nothing more."""
    _write(server, app_origin, [{"type": "n", "id": i, "data": i} for i in range(3_000)], "gone")
    device = _page(browser, app_origin, server)
    _new_sync(device, "reader", server, "gone")
    device.page.evaluate("reader.sync.syncNow()")
    assert device.page.evaluate("reader.app.objects.size") == 3_000
    _reopen(device, "later", server, "gone")
    deleted = list(range(0, 3_000, 7))
    _write(server, app_origin, [{"type": "n", "id": i, "deleted": True} for i in deleted]
           + [{"type": "n", "id": 1, "data": "changed"}], "gone")
    _purge(server)
    calls = device.page.evaluate("later.sync.syncNow().then(() => later.app.received)")
    tombstones = [obj["id"] for call in calls for obj in call if obj.get("deleted")]
    assert sorted(tombstones) == deleted
    assert max(len(call) for call in calls) <= 1000
    assert device.page.evaluate("later.app.objects.get(JSON.stringify(['n', 1])).data") == "changed"
    device.page.evaluate("later.sync.syncNow()")
    assert device.page.evaluate("later.app.received.length") == len(calls), "the next sync must find nothing"


def test_the_keys_an_earlier_version_kept_in_local_storage_move_to_indexeddb(browser, app_origin, server):
    """A state stored by the previous version of syncclient.js, with its list of keys: after the
    upgrade the list is in IndexedDB, the stored state is small, and a purge is still followed by
    a tombstone for what was deleted."""
    _write(server, app_origin, [{"type": "n", "id": i, "data": i} for i in range(5)], "upgraded")
    device = _page(browser, app_origin, server)
    _new_sync(device, "old", server, "upgraded")
    device.page.evaluate("old.sync.syncNow()")
    device.page.evaluate("""async () => {
        old.sync.deactivate();
        const state = JSON.parse(localStorage.getItem(old.sync.storageKey));
        state.known = [0, 1, 2, 3, 4].map((id) => JSON.stringify(["n", id]));    // as the previous version kept it
        localStorage.setItem(old.sync.storageKey, JSON.stringify(state));
        (await old.sync._ready, old.sync._keys.database.close());
        await new Promise((resolve, reject) => {
            const request = indexedDB.deleteDatabase(old.sync.storageKey);
            request.onsuccess = resolve;
            request.onerror = () => reject(request.error);
        });
    }""")
    _reopen(device, "upgraded", server, "upgraded")
    _write(server, app_origin, [{"type": "n", "id": 3, "deleted": True}], "upgraded")
    _purge(server)
    result = device.page.evaluate("""async () => {
        await upgraded.sync.syncNow();
        return {stored: JSON.parse(localStorage.getItem(upgraded.sync.storageKey)),
                tombstones: upgraded.app.received.flat().filter((o) => o.deleted).map((o) => o.id)};
    }""")
    assert result["tombstones"] == [3]
    assert "known" not in result["stored"] and len(json.dumps(result["stored"])) < 400, result["stored"]


# ---------------------------------------------------------------- logging in at an OpenID Provider


def test_the_example_app_logs_in_at_an_openid_provider_and_syncs(browser, app_origin, tmp_path):
    """The example app's "Log in with ..." button: the authorization-code flow with PKCE in the
    browser, through the provider's own login and consent pages (oidc-provider on loopback, as
    test_cutout.py runs it), and the ID token it ends with posted to /verify by syncclient.js as
    the assertion; the note then synced is the provider's user's, on a server that takes only
    ID tokens from that provider."""
    from test_cutout import OIDC_CLIENT, OpenIdProvider
    provider = OpenIdProvider(str(tmp_path), redirect_uris=[f"{app_origin}/index.html"]).start()
    server = CutoutServer(tmp_path / "data", "--oidc-issuer", provider.issuer,
                          "--oidc-client-id", OIDC_CLIENT)
    try:
        server.start()
        device = Device(browser, app_origin, server, email=None)
        device.url += "&" + urllib.parse.urlencode({"issuer": provider.issuer, "client_id": OIDC_CLIENT})
        device.open()
        assert device.page.inner_text("#login-provider") == f"Log in with 127.0.0.1:{provider.port}"
        device.page.click("#login-provider")
        device.page.wait_for_selector("input[name=login]")          # the provider's own sign-in page
        assert device.page.url.startswith(provider.issuer)
        device.page.fill("input[name=login]", "ida@example.com")
        device.page.fill("input[name=password]", "anything")
        device.page.click("button[type=submit]")
        device.page.click("button:has-text('Continue')")            # its consent page
        device.page.wait_for_selector("#who:not([hidden])")
        assert device.page.inner_text("#who") == "ida@example.com"
        assert device.page.url.startswith(f"{app_origin}/index.html?server=")   # the app's own URL again
        device.add("written after logging in at the provider")
        device.wait_for(["written after logging in at the provider"], "synced")
        token = cutout.make_token(server.secret(), "ida@example.com", app_origin, time.time())
        stored = requests.get(f"{server.url}localhost:{urllib.parse.urlsplit(app_origin).port}/ida@example.com/notes",
                              params={"auth": token}, timeout=10).json()["objects"]
        assert [obj["data"]["text"] for _, obj in stored] == ["written after logging in at the provider"]
        # The development login is refused by this server: an email is no ID token.
        refused = requests.post(server.url + "verify", data={"assertion": "ida@example.com", "audience": app_origin},
                                timeout=10)
        assert refused.status_code == 401 and "not an ID token" in refused.json()["message"]
        assert not device.errors
    finally:
        server.stop()
        provider.stop()
