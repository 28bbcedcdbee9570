/* syncclient.js: the Cut-Out sync client, for today's browsers.
 *
 * It runs the sync process of SPEC.md chapter 2 between an app's own storage
 * and a Cut-Out server, and knows nothing of the app's UI or data model: the
 * app hands it an `appData` object that reads and writes the app's storage
 * (README.md, "The client library", has a complete example).
 *
 *     <script src="http://127.0.0.1:8088/syncclient.js"></script>
 *     const sync = new Sync(appData, {getAssertion: async () => email});
 *     await sync.request();            // log in
 *
 * One file, no build step. The default server is the one this file was
 * loaded from (SPEC.md JS-1). Every Sync keeps its own state (login,
 * collection_id, since: a few hundred bytes, whatever the collection's size) in
 * localStorage, and the keys of the objects it has handed the app in an
 * IndexedDB database, both named after its server and bucket, so several can
 * run side by side in one page.
 */
(function (root) {
  "use strict";

  // [JS-1] The server this file was loaded from, read while it runs: the
  // server sends the same bytes to everyone, and the browser knows the URL
  // it used, scheme included, whatever proxy is in between.
  const loadedFrom = root.document && root.document.currentScript && root.document.currentScript.src;
  const DEFAULT_SERVER_URL = loadedFrom ? new URL(".", loadedFrom).href : null;

  const DEFAULTS = {
    serverUrl: DEFAULT_SERVER_URL,
    bucket: "default",           // the collection's last path part: one app may keep several
    audience: null,              // the app's origin; default: this page's
    getAssertion: null,          // async () => an identity assertion (the dev verifier takes the email)
    storage: null,               // a localStorage-like object; default: localStorage
    database: undefined,         // the IndexedDB database of the objects' keys; default: named as the state
                                 // is; null: kept in memory
    pollInterval: 30000,         // ms between polls while the page is shown
    hiddenPollInterval: 300000,  // ms between polls while it is hidden
    slowPollInterval: 600000,    // ms between polls after scheduleSlowly()
    immediateDelay: 250,         // ms that scheduleImmediately() waits, so a burst of changes is one sync
    backoffInitial: 1000,        // ms before the first retry after a network error; doubles each time
    backoffMax: 300000,          // ms, the longest such wait
    maxMergeAttempts: 5,         // POSTs refused with since_invalid before a sync gives up
    fetch: null,                 // default: the global fetch
  };

  const OBJECT_MEMBERS = new Set(["type", "id", "data", "deleted", "expires", "blob"]);
  const TOMBSTONES_PER_CALL = 1000;  // objectsReceived's tombstones at the end of a read from the start
  const KEEP_FAILED = Symbol("the keys could not be read or written");
  const MAX_READS_AGAIN = 3;        // reads from the start one sync begins, a purge coming each time

  /* localStorage, or where it is disabled (reading it throws), one that keeps nothing. */
  function browserStorage() {
    try {
      if (root.localStorage) return root.localStorage;
    } catch (error) {
      // fall through
    }
    return {getItem: () => null, setItem: () => { throw new Error("localStorage is disabled"); }};
  }

  /* A failed sync step. `status` is the HTTP status (0 for no answer), `code`
   * the server's error code, `object` the position of the object it refused
   * (SPEC.md POST-1), `retryAfter` seconds to wait, if the server said. */
  class SyncError extends Error {
    constructor(message, {status = 0, code = null, object = null, retryAfter = null} = {}) {
      super(message);
      this.name = "SyncError";
      this.status = status;
      this.code = code;
      this.object = object;
      this.retryAfter = retryAfter;
    }

    /* Whether trying again later may succeed: no answer, or the server's own trouble. */
    get transient() {
      return this.status === 0 || this.status >= 500;
    }
  }

  const ATTACHED = Symbol("the Sync objects an appData serves");

  /* Call appData[name](...args). It may return a value, a Promise, or take a
   * Node-style callback as its last parameter; either way a Promise results. */
  function callApp(appData, name, args, optional) {
    const method = appData[name];
    if (typeof method !== "function") {
      return optional ? Promise.resolve(undefined)
        : Promise.reject(new SyncError(`appData.${name} is missing`));
    }
    return new Promise((resolve, reject) => {
      let settled = false;
      const settle = (error, value) => {
        if (settled) return;
        settled = true;
        if (error) reject(error); else resolve(value);
      };
      let result;
      try {
        result = method.apply(appData, [...args, settle]);
      } catch (error) {
        settle(error);
        return;
      }
      if (result && typeof result.then === "function") {
        result.then((value) => settle(null, value), (error) => settle(error || new Error(`appData.${name} failed`)));
      } else if (result !== undefined || method.length <= args.length) {
        settle(null, result);       // it answered by returning, not through the callback
      }
    });
  }

  /* Why obj cannot be posted (SPEC.md POST-1, BLOB-1), or null. */
  function objectProblem(obj) {
    if (!obj || typeof obj !== "object" || Array.isArray(obj)) return "is not an object";
    const unknown = Object.keys(obj).filter((key) => !OBJECT_MEMBERS.has(key));
    if (unknown.length) return `has members the protocol does not know: ${unknown.join(", ")}`;
    if (typeof obj.type !== "string" || !obj.type) return '"type" must be a non-empty string';
    if (!(typeof obj.id === "string" || Number.isInteger(obj.id))) return '"id" must be a string or an integer';
    if (("data" in obj) === ("deleted" in obj)) return 'needs either "data" or "deleted": true, not both';
    if ("deleted" in obj && obj.deleted !== true) return '"deleted" can only be true';
    if ("data" in obj && obj.data === undefined) return '"data" must be a JSON value';
    if ("expires" in obj && typeof obj.expires !== "number") return '"expires" must be a number (unix seconds)';
    if ("blob" in obj) {
      const blob = obj.blob;
      if (obj.deleted) return "a tombstone carries no blob";
      if (!blob || typeof blob !== "object") return '"blob" must be an object';
      if (typeof blob.content_type !== "string" || !/^[^\s\/]+\/[^\s\/;]+/.test(blob.content_type)) {
        return '"blob" needs a "content_type" such as "image/png"';
      }
      if (!("data" in blob) && !("href" in blob)) return '"blob" needs "data" (base64) or its "href"';
    }
    try {
      JSON.stringify(obj);
    } catch (error) {
      return `cannot be sent as JSON: ${error.message}`;
    }
    return null;
  }

  function keyOf(obj) {
    return JSON.stringify([obj.type, obj.id]);
  }

  /* {type, id} of the object a key (keyOf) names. */
  function namedBy(key) {
    const [type, id] = JSON.parse(key);
    return {type, id};
  }

  /* The newest version of each (type, id) among [counter, object] pairs, oldest first. */
  function newestOnly(pairs) {
    const newest = new Map();
    for (const [, obj] of pairs) {
      newest.delete(keyOf(obj));      // re-inserted: the Map keeps the order of the newest
      newest.set(keyOf(obj), obj);
    }
    return [...newest.values()];
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  // ------------------------------------------------------------------ the keys the app holds

  /* The (type, id) of every object the app holds from the collection, each with the number of
   * the last read from the start that saw it, so that such a read can tell the app which of its
   * objects are gone: those it did not see (SPEC.md PURGE-1). Asking the app instead would make
   * every app keep such a list; this way none has to.
   *
   * The list grows with the collection, so it lives in IndexedDB, never in localStorage (about
   * 5 MB an origin, shared with the app, and written whole). IndexedDB's cost is per record, about
   * 60 us, so one record a key would add a minute to a million objects. Instead the keys are spread
   * over BUCKETS buckets by a hash, and each page adds one record to each bucket it touches: a log
   * of [key, mark] entries (mark GONE: deleted). A bucket whose log has as many entries as its base
   * (and FOLD_ENTRIES at least) is folded into a new base, so the log stays within twice the list,
   * the entries rewritten add up to about twice the list too, and whatever reads a bucket holds
   * a BUCKETS-th of the keys in memory. */
  const BUCKETS = 32;
  const GONE = -1;
  const FOLD_ENTRIES = 1000;        // a bucket's log is not folded before it has this many entries ...
  const FOLD_RECORDS = 256;         // ... or this many records, however small they are

  function bucketOf(key) {          // FNV-1a
    let hash = 2166136261;
    for (let i = 0; i < key.length; i++) hash = Math.imul(hash ^ key.charCodeAt(i), 16777619);
    return (hash >>> 0) % BUCKETS;
  }

  /* key -> mark of the keys held, from a bucket's records in the order they were written. */
  function replay(records) {
    const held = new Map();
    for (const {entries} of records) {
      for (const [key, mark] of entries) {
        if (mark === GONE) held.delete(key); else held.set(key, mark);
      }
    }
    return held;
  }

  function noSizes() {
    return {base: new Array(BUCKETS).fill(0), log: new Array(BUCKETS).fill(0), records: new Array(BUCKETS).fill(0)};
  }

  class KnownKeys {
    constructor(database, sizes) {
      this.database = database;
      this.sizes = sizes;           // entries per bucket in its base and its log, and its records: when to fold
    }

    static open(name) {
      return new Promise((resolve, reject) => {
        const request = root.indexedDB.open(name, 1);
        request.onupgradeneeded = () => {
          request.result.createObjectStore("keys", {autoIncrement: true}).createIndex("bucket", "bucket");
          request.result.createObjectStore("state");
        };
        request.onerror = () => reject(request.error);
        request.onblocked = () => reject(new Error("the database is held open elsewhere"));
        request.onsuccess = () => {
          const database = request.result;
          database.onversionchange = () => database.close();    // never block a deleteDatabase
          const sizes = database.transaction("state").objectStore("state").get("sizes");
          sizes.onsuccess = () => resolve(new KnownKeys(database, sizes.result || noSizes()));
          sizes.onerror = () => reject(sizes.error);
        };
      });
    }

    /* Run work(transaction) in a transaction of both stores; resolves to what work returned once written. */
    _transaction(mode, work) {
      return new Promise((resolve, reject) => {
        const transaction = this.database.transaction(["keys", "state"], mode);
        const result = work(transaction);
        transaction.oncomplete = () => resolve(result);
        transaction.onerror = transaction.onabort = () => reject(transaction.error || new Error("aborted"));
      });
    }

    /* Received or saved: these objects are held (seen by read `mark`), tombstones are not. One
     * transaction, the folds it makes due included: a transaction costs about a millisecond. */
    note(objects, mark) {
      const buckets = new Map();
      for (const obj of objects) {
        const key = keyOf(obj), bucket = bucketOf(key);
        if (!buckets.has(bucket)) buckets.set(bucket, []);
        buckets.get(bucket).push([key, obj.deleted ? GONE : mark]);
      }
      const sizes = this.sizes;
      return this._transaction("readwrite", (transaction) => {
        for (const [bucket, entries] of buckets) {
          transaction.objectStore("keys").add({bucket, entries});
          sizes.log[bucket] += entries.length;
          sizes.records[bucket] += 1;
          const due = sizes.log[bucket] >= Math.max(sizes.base[bucket], FOLD_ENTRIES);
          if (due || sizes.records[bucket] >= FOLD_RECORDS) this._fold(transaction, bucket, 0);
        }
        transaction.objectStore("state").put(sizes, "sizes");
      });
    }

    /* Make the bucket's records one, leaving out the keys that read `seenBy` did not see. */
    fold(bucket, seenBy) {
      return this._transaction("readwrite", (transaction) => this._fold(transaction, bucket, seenBy));
    }

    _fold(transaction, bucket, seenBy) {
      const store = transaction.objectStore("keys"), index = store.index("bucket");
      const ids = index.getAllKeys(bucket);
      index.getAll(bucket).onsuccess = (event) => {
        const entries = [...replay(event.target.result)].filter(([, mark]) => mark >= seenBy);
        ids.result.forEach((id) => store.delete(id));
        if (entries.length) store.add({bucket, entries});
        this.sizes.base[bucket] = entries.length;
        this.sizes.log[bucket] = 0;
        this.sizes.records[bucket] = entries.length ? 1 : 0;
        transaction.objectStore("state").put(this.sizes, "sizes");
      };
    }

    /* The keys of the bucket that read `seenBy` did not see. */
    async unseen(bucket, seenBy) {
      const records = await this._transaction(
        "readonly", (transaction) => transaction.objectStore("keys").index("bucket").getAll(bucket));
      return [...replay(records.result)].filter(([, mark]) => mark < seenBy).map(([key]) => key);
    }

    clear() {
      this.sizes = noSizes();
      return this._transaction("readwrite", (transaction) => {
        transaction.objectStore("keys").clear();
        transaction.objectStore("state").put(this.sizes, "sizes");
      });
    }

    /* The sync state, kept here only while localStorage refuses it. */
    async readState() {
      const request = await this._transaction("readonly",
                                              (transaction) => transaction.objectStore("state").get("sync"));
      return request.result;
    }

    writeState(state) {
      return this._transaction("readwrite", (transaction) => state ? transaction.objectStore("state").put(state, "sync")
                                                                    : transaction.objectStore("state").delete("sync"));
    }
  }

  /* The same, in memory: where IndexedDB cannot be had, or options.database is null. */
  class KnownKeysInMemory {
    constructor() {
      this.marks = new Map();
      this.state = undefined;
    }

    async note(objects, mark) {
      for (const obj of objects) {
        if (obj.deleted) this.marks.delete(keyOf(obj)); else this.marks.set(keyOf(obj), mark);
      }
    }

    async fold(bucket, seenBy) {
      for (const key of await this.unseen(bucket, seenBy)) this.marks.delete(key);
    }

    async unseen(bucket, seenBy) {
      return [...this.marks].filter(([key, mark]) => mark < seenBy && bucketOf(key) === bucket).map(([key]) => key);
    }

    async clear() {
      this.marks.clear();
    }

    async readState() {
      return this.state;
    }

    async writeState(state) {
      this.state = state || undefined;
    }
  }

  class Sync {
    constructor(appData, options = {}) {
      this.appData = appData;
      this.options = {...DEFAULTS, ...options};
      const location = root.location;
      if (!this.options.serverUrl) {
        throw new SyncError("no server: syncclient.js was not loaded from one, so pass options.serverUrl");
      }
      this.serverUrl = new URL(this.options.serverUrl, location && location.href).href.replace(/\/?$/, "/");
      this.audience = this.options.audience || (location && location.origin);
      this.storage = this.options.storage || browserStorage();
      this.fetch = this.options.fetch || root.fetch.bind(root);
      this.storageKey = `cutout-sync ${this.serverUrl} ${this.options.bucket}`;
      this._reported = new Set();  // kinds of storage failure said through status (once, until one succeeds)
      this._state = this._load();
      this._keys = null;            // KnownKeys (or KnownKeysInMemory) once _ready
      this._stateElsewhere = false; // whether the state is kept in IndexedDB, localStorage having refused it
      this._stateWrites = Promise.resolve();
      this._watchers = [];
      this._running = null;         // the sync in progress, if any
      this._again = false;          // a sync was asked for while one ran
      this._timer = null;
      this._active = false;
      this._notBefore = 0;          // Date.now() before which no request goes out (Retry-After)
      this._failures = 0;           // network errors in a row, for the backoff
      this._pace = "normal";        // or "slow"
      this._lastPoll = 0;           // Date.now() when the last sync started
      this._pollTime = 0;           // ms, the server's X-Sync-Poll-Time
      this._due = Infinity;         // Date.now() when the armed timer fires
      this._generation = 0;         // grows when the state is replaced under a running sync
      this._readsAgain = 0;         // reads from the start in this sync (_readAgain)
      this._refused = new Map();    // key -> JSON of an object the server refused; not sent again as is
      this._listeners = [];
      // The app calls onupdate when its data changed (the 2012 client's slot, kept);
      // one appData may serve several Sync objects, and each is told.
      const attached = appData[ATTACHED] || (appData[ATTACHED] = new Set());
      attached.add(this);
      appData.onupdate = () => attached.forEach((sync) => sync.scheduleImmediately());
      this._ready = this._open();   // what needs the keys or the state kept elsewhere waits for it
      this.activate();
    }

    // ---------------------------------------------------------------- state

    _load() {
      try {
        const saved = JSON.parse(this.storage.getItem(this.storageKey) || "null");
        if (saved && typeof saved === "object") return saved;
      } catch (error) {
        // A damaged entry is forgotten: the next sync starts from scratch.
      }
      return {};
    }

    /* Open the keys' database, take the state kept there if it is newer than localStorage's
     * (it is there only while localStorage refuses it), and move the list of keys an older
     * version of this library kept in the state into the database. Never fails: without
     * IndexedDB the keys are kept in memory, and that is said once through status. */
    async _open() {
      const name = this.options.database === undefined ? this.storageKey : this.options.database;
      try {
        this._keys = name === null ? new KnownKeysInMemory() : await KnownKeys.open(name);
      } catch (error) {
        this._keys = new KnownKeysInMemory();
        this._storageFailed("keys", `cannot open IndexedDB (${error && error.name}: ${error && error.message}): ` +
                            "the keys of the objects are kept in memory, so a read from the start after a purge " +
                            "cannot tell the app which of them were deleted before this page was loaded");
      }
      const kept = await this._keys.readState().catch(() => undefined);
      if (kept && (kept.saves || 0) > (this._state.saves || 0)) {
        const wasIn = this.isLoggedIn();
        this._state = kept;
        this._stateElsewhere = true;
        if (!wasIn && this.isLoggedIn()) {
          for (const watcher of this._watchers) this._tell(watcher, "onlogin", [kept.email, null]);
          this.scheduleImmediately();
        }
      }
      if (Array.isArray(this._state.known)) {
        const held = this._state.known.map(namedBy);
        await this._keep((keys) => keys.note(held, this._state.mark || 0));
        delete this._state.known;
        this._save();
      }
    }

    /* Keep the state in storage, a few hundred bytes. One that cannot be stored there (quota,
     * private mode, storage disabled) does not stop the sync: it is kept in IndexedDB instead
     * (or, failing that, in memory only), the failure is said once, as a SyncError through
     * status, and every later save tries localStorage again. */
    _save() {
      const state = this._state;
      state.saves = (state.saves || 0) + 1;      // which of two copies is newer
      try {
        this.storage.setItem(this.storageKey, JSON.stringify(state));
        this._reported.delete("state");
        if (this._stateElsewhere) {
          this._stateElsewhere = false;
          this._writeStateElsewhere(null);
        }
      } catch (error) {
        this._stateElsewhere = true;
        this._writeStateElsewhere(JSON.parse(JSON.stringify(state)));
        this._storageFailed("state", `cannot store the sync state (${error.name}: ${error.message}) in ` +
                            "localStorage: it is kept in IndexedDB meanwhile, and localStorage tried again " +
                            "at every change");
      }
    }

    _writeStateElsewhere(state) {
      this._stateWrites = this._stateWrites.then(() => this._ready).then(() => this._keys.writeState(state)).then(
        () => this._reported.delete("stateElsewhere"),
        (error) => this._storageFailed("stateElsewhere", `cannot store the sync state in IndexedDB either ` +
                                       `(${error && error.name}: ${error && error.message}): syncing on in memory`));
    }

    /* Do something with the keys; a failure is said once through status and does not stop the sync.
     * Resolves to what it resolved to, or KEEP_FAILED. */
    async _keep(operation) {
      try {
        const result = await operation(this._keys);
        this._reported.delete("keys");
        return result;
      } catch (error) {
        this._storageFailed("keys", `cannot keep the keys of the objects in IndexedDB (${error && error.name}: ` +
                            `${error && error.message}): a read from the start after a purge may not tell the ` +
                            "app of every object that was deleted");
        return KEEP_FAILED;
      }
    }

    _storageFailed(kind, message) {
      if (this._reported.has(kind)) return;
      this._reported.add(kind);
      const error = new SyncError(message, {code: "storage"});
      this._status("error", {error, message});
    }

    async _forgetCollection() {
      const state = this._state;
      delete state.collectionId;
      delete state.since;
      delete state.sweep;
      delete state.purgeHorizon;
      this._generation += 1;
      this._save();
      await this._keep((keys) => keys.clear());
    }

    /* Raises if the state was replaced (another user, a reset) since a sync step began. */
    _stillCurrent(generation) {
      if (generation !== this._generation) {
        throw new SyncError("the sync state was reset meanwhile: syncing again", {status: 0});
      }
    }

    _status(state, detail) {
      callApp(this.appData, "status", [state, detail], true).catch(() => {});
    }

    lastSyncTime() {
      return this._state.lastSyncTime || null;
    }

    // ---------------------------------------------------------------- login

    isLoggedIn() {
      return Boolean(this._state.auth);
    }

    email() {
      return this._state.email || null;
    }

    /* Log in: get an assertion from options.getAssertion, verify it with the
     * server (SPEC.md AUTH-1) and keep the token. Resolves to the email. */
    async request() {
      if (typeof this.options.getAssertion !== "function") {
        throw new SyncError("no options.getAssertion to log in with");
      }
      await this._ready;
      const assertion = await this.options.getAssertion();
      if (!assertion) throw new SyncError("login cancelled: no assertion", {status: 401});
      const response = await this._fetch(this.serverUrl + "verify", {
        method: "POST",
        headers: {"Content-Type": "application/x-www-form-urlencoded"},
        body: new URLSearchParams({assertion, audience: this.audience}).toString(),
      });
      const body = await this._json(response);
      if (!response.ok || !body || body.status !== "okay" || !body.auth) {
        throw new SyncError(`login refused: ${(body && (body.message || body.reason)) || response.status}`,
                            {status: response.status, code: body && body.error});
      }
      if (this._state.email && this._state.email !== body.email) {
        // Another user: their collection is another one. What the app holds is not
        // sent to it as if it were theirs; an app with several users keeps their data apart.
        this._state = {saves: this._state.saves};
        this._generation += 1;
        await this._keep((keys) => keys.clear());
      }
      this._state.email = body.email;
      this._state.auth = body.auth.query || {};
      this._save();
      this._status("login", {email: body.email});
      for (const watcher of this._watchers) this._tell(watcher, "onlogin", [body.email, body]);
      this.scheduleImmediately();
      return body.email;
    }

    logout() {
      const wasIn = this.isLoggedIn();
      delete this._state.auth;
      this._save();
      if (wasIn) {
        this._status("logout");
        for (const watcher of this._watchers) this._tell(watcher, "onlogout", []);
      }
    }

    toggleLogin() {
      if (this.isLoggedIn()) {
        this.logout();
        return Promise.resolve(null);
      }
      return this.request();
    }

    /* watch({onlogin(email), onlogout()}): told now of the current state, and of every change. */
    watch(watcher) {
      this._watchers.push(watcher);
      if (this.isLoggedIn()) this._tell(watcher, "onlogin", [this._state.email, null]);
      else this._tell(watcher, "onlogout", []);
    }

    _tell(watcher, name, args) {
      if (typeof watcher[name] !== "function") return;
      setTimeout(() => {
        try {
          watcher[name](...args);
        } catch (error) {
          this._status("error", {error});
        }
      }, 0);
    }

    /* url (a blob's href) made absolute on the server, with the token in its query (SPEC.md BLOB-6). */
    authenticateUrl(url) {
      const absolute = new URL(url, this.serverUrl);
      for (const [name, value] of Object.entries(this._state.auth || {})) {
        absolute.searchParams.set(name, value);
      }
      return absolute.href;
    }

    // ---------------------------------------------------------------- HTTP

    _collectionUrl(params) {
      const parts = [new URL(this.audience).host, this._state.email, this.options.bucket];
      const url = new URL(parts.map(encodeURIComponent).join("/"), this.serverUrl);
      for (const [name, value] of Object.entries({...this._state.auth, ...params})) {
        if (value !== undefined && value !== null) url.searchParams.set(name, value);
      }
      return url.href;
    }

    async _fetch(url, init) {
      const wait = this._notBefore - Date.now();
      if (wait > 0) await sleep(wait);
      let response;
      try {
        response = await this.fetch(url, {...init, cache: "no-store", credentials: "omit"});
      } catch (error) {
        throw new SyncError(`the server cannot be reached (${error.message})`);
      }
      if (response.status === 503) {
        const retryAfter = Number(response.headers.get("Retry-After")) || 1;
        this._notBefore = Date.now() + retryAfter * 1000;
        throw new SyncError(`the server is busy: trying again in ${retryAfter} s`, {status: 503, retryAfter});
      }
      return response;
    }

    async _json(response) {
      if (response.status === 204) return null;
      try {
        return await response.json();
      } catch (error) {
        throw new SyncError(`the server answered ${response.status} without JSON`, {status: response.status});
      }
    }

    /* A request to the collection; logs in again once on 401 (SPEC.md AUTH-3). */
    async _collectionRequest(method, params, body) {
      for (let attempt = 0; ; attempt++) {
        if (!this.isLoggedIn()) throw new SyncError("not logged in", {status: 401});
        const init = {method};
        if (body !== undefined) {
          init.headers = {"Content-Type": "application/json"};
          init.body = JSON.stringify(body);
        }
        const response = await this._fetch(this._collectionUrl(params), init);
        this._pollTime = (Number(response.headers.get("X-Sync-Poll-Time")) || 0) * 1000;
        if (response.status === 401 && attempt === 0 && typeof this.options.getAssertion === "function") {
          this._status("reauthenticating");
          try {
            await this.request();
          } catch (error) {
            // No answer: the token is kept and the next sync tries again. Refused: logged out.
            if (!(error instanceof SyncError && error.transient)) this.logout();
            throw error;
          }
          continue;
        }
        if (response.status === 401) {
          this.logout();
          throw new SyncError("the server refused the login: log in again", {status: 401, code: "unauthorized"});
        }
        const answer = await this._json(response);
        if (!response.ok) {
          throw new SyncError(`${method} refused: ${(answer && answer.message) || response.status}`,
                              {status: response.status, code: answer && answer.error,
                               object: answer && Number.isInteger(answer.object) ? answer.object : null});
        }
        return {status: response.status, answer};
      }
    }

    // ---------------------------------------------------------------- the sync process

    /* Sync now: receive what is new, then send what is pending. Resolves when
     * done; rejects with a SyncError (nothing pending is lost either way). */
    syncNow() {
      if (this._running) {
        this._again = true;
        return this._running;
      }
      this._lastPoll = Date.now();
      this._running = (async () => {
        try {
          this._status("syncing");
          this._readsAgain = 0;
          await this._ready;
          await this._receive();
          await this._send();
          this._state.lastSyncTime = Date.now();
          this._save();
          this._failures = 0;
          this._status("synced", {lastSyncTime: this._state.lastSyncTime});
        } catch (error) {
          if (error instanceof SyncError && error.status === 0) this._failures += 1;
          this._status("error", {error, message: error.message});
          throw error;
        } finally {
          this._running = null;
          this._schedule();
        }
      })();
      return this._running;
    }

    /* GET what is new, page by page (SPEC.md GET-2..GET-7). */
    async _receive() {
      const {status, answer} = await this._collectionRequest("GET", this._position());
      if (status !== 204) await this._read(answer);
      else if (this._state.sweep) await this._sweep();
    }

    _position() {
      const state = this._state;
      if (!state.collectionId) return {};
      // The pages of a read from the start are below the horizon until the last (PURGE-2).
      return {since: state.since || 0, collection_id: state.collectionId,
              purge_horizon: state.sweep ? state.purgeHorizon : undefined};
    }

    /* Take an answer with objects (a GET's, or a refused POST's) and follow its pages. Each page
     * goes to the app as it arrives, and only then does since move past it, so the page's memory
     * is one answer, whatever the collection's size, and a page load in between goes on where
     * it stopped. The newest version of an object is the last the app gets: a page holds one
     * version of each object, its newest there, and pages come in the collection's order. */
    async _read(answer) {
      const state = this._state;
      for (;;) {
        if (answer.since_purged) return this._readAgain(answer.purge_horizon);
        if (answer.collection_changed || answer.collection_deleted !== undefined || !state.collectionId) {
          if (state.collectionId) await this._reset(answer);
          state.collectionId = answer.collection_id;
          state.since = 0;
        }
        // The next page is asked for while the app takes this one: the two overlap.
        const end = this._end(answer);
        const next = answer.incomplete ? this._collectionRequest("GET", {...this._position(), since: end}) : null;
        if (next) next.catch(() => {});     // a delivery that fails leaves it unread
        await this._deliver(answer, end);
        if (!next) break;
        const page = await next;
        if (page.status === 204) break;
        answer = page.answer;
      }
      if (state.sweep) await this._sweep();
    }

    /* Where the next GET after this answer starts. */
    _end(answer) {
      let since = this._state.since || 0;
      if (answer.objects.length) since = Math.max(since, answer.objects[answer.objects.length - 1][0]);
      if (answer.until !== undefined) since = Math.max(since, answer.until);
      return since;
    }

    /* Hand the app the newest of each object of one answer, note which it holds, and move since on. */
    async _deliver(answer, since) {
      const state = this._state, generation = this._generation;
      const objects = newestOnly(answer.objects);
      if (objects.length) await callApp(this.appData, "objectsReceived", [objects]);
      this._stillCurrent(generation);
      await this._keep((keys) => keys.note(objects, state.mark || 0));
      this._stillCurrent(generation);
      state.since = since;
      this._save();
    }

    /* The collection was replaced (collection_changed, collection_deleted):
     * everything the app holds counts as unsaved, and it is read again. */
    async _reset(answer) {
      this._status(answer.collection_deleted !== undefined ? "collection_deleted" : "collection_changed",
                   {reason: answer.collection_deleted});
      await callApp(this.appData, "resetSaved", [], true);
      delete this._state.sweep;
      delete this._state.purgeHorizon;
      await this._keep((keys) => keys.clear());
    }

    /* Since is below the purge horizon (SPEC.md PURGE-1): read it all again from since=0, as
     * read number mark + 1; the objects the app holds that this read does not see were deleted,
     * and the app gets them as tombstones at its end (_sweep). The state says a read from the
     * start is going on, so a page load in between goes on with it. */
    async _readAgain(purgeHorizon) {
      if (++this._readsAgain > MAX_READS_AGAIN) {
        throw new SyncError("the collection was purged again each time it was read again", {status: 0});
      }
      this._status("reading_again");
      const state = this._state;
      state.mark = (state.mark || 0) + 1;
      state.sweep = true;
      state.purgeHorizon = purgeHorizon;
      state.since = 0;
      this._save();
      const {status, answer} = await this._collectionRequest("GET", this._position());
      return status === 204 ? this._sweep() : this._read(answer);
    }

    /* The end of a read from the start: what the app holds and the read did not see is gone. */
    async _sweep() {
      const state = this._state, generation = this._generation;
      for (let bucket = 0; bucket < BUCKETS; bucket++) {
        const gone = await this._keep((keys) => keys.unseen(bucket, state.mark));
        if (gone === KEEP_FAILED) break;
        for (let first = 0; first < gone.length; first += TOMBSTONES_PER_CALL) {
          const tombstones = gone.slice(first, first + TOMBSTONES_PER_CALL)
            .map((key) => ({...namedBy(key), deleted: true}));
          await callApp(this.appData, "objectsReceived", [tombstones]);
          this._stillCurrent(generation);
        }
        if (await this._keep((keys) => keys.fold(bucket, state.mark)) === KEEP_FAILED) break;
      }
      delete state.sweep;
      delete state.purgeHorizon;
      this._save();
    }

    /* POST what the app has pending; on since_invalid, hand it what it missed
     * and try again, a few times at most (SPEC.md POST-2..POST-5). An object the
     * server refuses is reported and set aside, so that it does not hold up the rest. */
    async _send() {
      for (let merges = 0; ;) {
        const pending = (await callApp(this.appData, "getPendingObjects", [])) || [];
        const good = [], errors = [];
        for (const obj of pending) {
          const problem = objectProblem(obj);
          if (problem) errors.push({object: obj, error: problem});
          else if (this._refused.get(keyOf(obj)) !== JSON.stringify(obj)) good.push(obj);
        }
        if (errors.length) await callApp(this.appData, "reportObjectErrors", [errors], true);
        if (!good.length) return;
        const state = this._state, generation = this._generation;
        let answer;
        try {
          ({answer} = await this._collectionRequest(
            "POST", {since: state.since || 0, collection_id: state.collectionId}, good));
        } catch (error) {
          const refused = error instanceof SyncError && error.object !== null && good[error.object];
          if (!refused) throw error;
          this._refused.set(keyOf(refused), JSON.stringify(refused));
          await callApp(this.appData, "reportObjectErrors",
                        [[{object: refused, error: error.message, code: error.code}]], true);
          continue;
        }
        this._stillCurrent(generation);
        if (answer.object_counters) {
          const hrefs = answer.blob_hrefs || [];
          const saved = good.map((obj, i) => hrefs[i]
            ? {...obj, blob: {content_type: obj.blob.content_type, href: hrefs[i]}} : obj);
          state.since = Math.max(state.since || 0, ...answer.object_counters);
          // The app hears first: if the page ended before the state was stored, the next
          // sync reads these objects back, which is harmless; the other way round, they
          // would still be pending, and be sent, and stored, twice.
          try {
            await callApp(this.appData, "objectsSaved", [saved]);
          } finally {
            await this._keep((keys) => keys.note(saved, state.mark || 0));
            this._save();
          }
          return;
        }
        if (++merges >= this.options.maxMergeAttempts) {
          throw new SyncError(`gave up after ${merges} attempts: the collection kept changing`, {status: 0});
        }
        if (!(answer.since_invalid || answer.since_purged || answer.collection_changed
              || answer.collection_deleted !== undefined)) {
          throw new SyncError("the server's answer to a POST is not one the protocol knows", {status: 502});
        }
        if (answer.since_invalid) this._status("merging", {objects: answer.objects.length});
        await this._read(answer);
      }
    }

    /* Forget where this device is in the collection, so that the next sync reads it all
     * again and sends everything the app holds (the server keeps its copy). */
    async reset() {
      await this._ready;
      await this._forgetCollection();
      await callApp(this.appData, "resetSaved", [], true);
    }

    /* Delete the server's copy of the collection (SPEC.md DEL-1), with a reason for
     * the other devices. This device's objects count as unsaved: the next sync sends them
     * unless the app removes them first. */
    async deleteCollection(reason) {
      await this._ready;
      const {answer} = await this._collectionRequest("DELETE", {}, reason === undefined ? null : reason);
      await this._forgetCollection();
      this._state.collectionId = answer.collection_id;
      this._state.since = 0;
      this._save();
      await callApp(this.appData, "resetSaved", [], true);
      return answer.collection_id;
    }

    // ---------------------------------------------------------------- scheduling

    activate() {
      if (this._active) return;
      this._active = true;
      const on = (target, event, handler) => {
        if (!target || !target.addEventListener) return;
        target.addEventListener(event, handler);
        this._listeners.push([target, event, handler]);
      };
      on(root.document, "visibilitychange", () => this._schedule());
      on(root, "online", () => {
        this._failures = 0;
        this.scheduleImmediately();
      });
      on(root, "offline", () => this._schedule());
      this._schedule(this.isLoggedIn() ? this.options.immediateDelay : undefined);
    }

    deactivate() {
      this._active = false;
      clearTimeout(this._timer);
      this._timer = null;
      this._due = Infinity;
      for (const [target, event, handler] of this._listeners) target.removeEventListener(event, handler);
      this._listeners = [];
    }

    /* Sync soon (debounced), but never sooner than the server allows. */
    scheduleImmediately() {
      this._schedule(this.options.immediateDelay);
    }

    resetSchedule() {
      this._pace = "normal";
      this._schedule();
    }

    scheduleSlowly() {
      this._pace = "slow";
      this._schedule();
    }

    _interval() {
      if (this._pace === "slow") return this.options.slowPollInterval;
      if (root.document && root.document.hidden) return this.options.hiddenPollInterval;
      return this.options.pollInterval;
    }

    /* (Re)arm the one timer: after `delay` ms, or the normal interval; later
     * if the server asked (X-Sync-Poll-Time, Retry-After) or after failures. */
    _schedule(delay) {
      if (!this._active) return;
      if (this._running) {
        if (delay !== undefined) this._again = true;
        return;
      }
      if (this._again) {
        this._again = false;
        delay = this.options.immediateDelay;
      }
      let wait = delay === undefined ? this._interval() : delay;
      if (this._failures) {
        const backoff = Math.min(this.options.backoffMax,
                                 this.options.backoffInitial * 2 ** (this._failures - 1));
        wait = Math.max(wait, backoff / 2 + Math.random() * backoff / 2);
      }
      wait = Math.max(wait, this._notBefore - Date.now(), this._lastPoll + this._pollTime - Date.now());
      if (root.navigator && root.navigator.onLine === false) {
        clearTimeout(this._timer);
        this._timer = null;      // the "online" event resumes
        this._due = Infinity;
        return;
      }
      const due = Date.now() + Math.max(0, wait);
      if (this._timer !== null && this._due <= due) return;    // a sync is due sooner already
      clearTimeout(this._timer);
      this._due = due;
      this._timer = setTimeout(() => {
        this._timer = null;
        this._due = Infinity;
        if (!this.isLoggedIn()) return;
        // A timer never throws: the error went to appData.status.
        this.syncNow().catch(() => {});
      }, due - Date.now());
    }
  }

  Sync.SyncError = SyncError;
  Sync.objectProblem = objectProblem;
  Sync.defaultServerUrl = DEFAULT_SERVER_URL;
  root.Sync = Sync;
  if (typeof module === "object" && module.exports) module.exports = Sync;
})(typeof window !== "undefined" ? window : globalThis);
