/* Notes: an offline-first app that keeps its notes in IndexedDB and syncs them
 * through a Cut-Out server with syncclient.js.
 *
 *     python cutout.py                                  # the sync server, on 127.0.0.1:8088
 *     python -m http.server 8000 --directory example    # this app; open http://localhost:8000/
 *
 * The part an app developer copies is `appData`: the glue between the app's own
 * storage and the sync library. Each note is a record {id, text, updated,
 * image, version, savedVersion}; it is pending (not yet on the server) while
 * version !== savedVersion. Each user's notes are a database of their own, and
 * the last user's open at once, offline too. Query parameters: server (the sync
 * server's URL), bucket, poll (ms between polls); and issuer and client_id, for a
 * "Log in with ..." button that logs in at an OpenID Provider (beside the development
 * login, where the email is the assertion):
 *
 *     python cutout.py --oidc-issuer https://accounts.example --oidc-client-id notes-app
 *     open http://localhost:8000/index.html?issuer=https://accounts.example&client_id=notes-app
 */
"use strict";

// Back from an OpenID Provider, the page's query is the provider's answer (code, state); the
// app's own parameters are those it had when it left, kept in sessionStorage meanwhile.
const OIDC_LOGIN_KEY = "notes-oidc-login";
const callback = new URLSearchParams(location.search);
const leftFor = callback.has("state") ? JSON.parse(sessionStorage.getItem(OIDC_LOGIN_KEY) || "null") : null;
const params = leftFor ? new URLSearchParams(leftFor.query) : callback;
const SERVER = params.get("server") || "http://127.0.0.1:8088/";
const BUCKET = params.get("bucket") || "notes";
const POLL = Number(params.get("poll")) || 10000;
const ISSUER = params.get("issuer");
const CLIENT_ID = params.get("client_id");

// ------------------------------------------------------------------ IndexedDB, one database per user

let database = null, databaseUser = null;

async function useDatabase(email) {
  if (databaseUser === email) return;
  const opened = await new Promise((resolve, reject) => {
    const request = indexedDB.open(`cutout-notes ${BUCKET} ${email}`, 1);
    request.onupgradeneeded = () => request.result.createObjectStore("notes", {keyPath: "id"});
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  if (database) database.close();
  database = opened;
  databaseUser = email;
}

/* Run work(store) in one transaction; resolves with what work returned once it
 * commits, and aborts it (nothing written) if work fails. */
function transaction(mode, work) {
  return new Promise((resolve, reject) => {
    const tx = database.transaction("notes", mode);
    let result;
    Promise.resolve(work(tx.objectStore("notes"))).then((value) => { result = value; }, (error) => {
      tx.abort();
      reject(error);
    });
    tx.oncomplete = () => resolve(result);
    tx.onerror = tx.onabort = () => reject(tx.error || new Error("transaction aborted"));
  });
}

function asPromise(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

const allNotes = async () => (database ? transaction("readonly", (store) => asPromise(store.getAll())) : []);
const isPending = (note) => note.version !== note.savedVersion;

// ------------------------------------------------------------------ the glue: appData

const sentVersions = new Map();     // id -> the version getPendingObjects handed out

/* Guards against a sync of one user meeting the database of another, while the app switches. */
function checkUser() {
  if (!sync || databaseUser !== sync.email()) throw new Error("the notes of this user are still being opened");
}

function toObject(note) {
  if (note.deleted) return {type: "note", id: note.id, deleted: true};
  const obj = {type: "note", id: note.id, data: {text: note.text, updated: note.updated}};
  if (note.image) {
    // Once the server has the bytes, only the href is sent (BLOB-3); the bytes stay here too,
    // so that they can be sent again if the server's copy is ever lost.
    const {content_type, href, data} = note.image;
    obj.blob = href ? {content_type, href} : {content_type, data};
  }
  return obj;
}

/* The server's hrefs are gone (its copy was replaced, or it refused one): send the bytes again,
 * or, for an image this device never had the bytes of, drop it. */
function forgetHref(note) {
  if (!note.image || !note.image.href) return;
  note.image = note.image.data ? {content_type: note.image.content_type, data: note.image.data} : null;
}

const appData = {
  async getPendingObjects() {
    checkUser();
    const pending = (await allNotes()).filter(isPending);
    for (const note of pending) sentVersions.set(note.id, note.version);
    return pending.map(toObject);
  },

  async objectsSaved(objects) {
    checkUser();
    await transaction("readwrite", async (store) => {
      for (const obj of objects) {
        const note = await asPromise(store.get(obj.id));
        if (!note || note.version !== sentVersions.get(obj.id)) continue;   // changed since: still pending
        if (note.deleted) {
          store.delete(obj.id);
          continue;
        }
        note.savedVersion = note.version;
        if (obj.blob && obj.blob.href) note.image = {...note.image, href: obj.blob.href};
        store.put(note);
      }
    });
    render();
  },

  async objectsReceived(objects) {
    checkUser();
    await transaction("readwrite", async (store) => {
      for (const obj of objects) {
        if (!obj.deleted && !(obj.data && typeof obj.data.text === "string")) {
          console.warn("not a note of this app, left alone:", obj);
          continue;
        }
        const local = await asPromise(store.get(obj.id));
        // The newer edit wins; a local edit newer than what arrived stays pending, and is sent next.
        // Of two copies of one edit, the one that kept its image wins (a device that never had
        // the bytes drops the image when the server's copy is lost).
        if (local && isPending(local) && (obj.deleted || local.updated > obj.data.updated
            || (local.updated === obj.data.updated && local.image && !obj.blob))) continue;
        if (obj.deleted) {
          store.delete(obj.id);
          continue;
        }
        const version = local ? local.version + 1 : 1;
        store.put({id: obj.id, text: obj.data.text, updated: obj.data.updated, image: obj.blob || null,
                   version, savedVersion: version, deleted: false});
      }
    });
    render();
  },

  async resetSaved() {
    checkUser();
    await transaction("readwrite", async (store) => {
      for (const note of await asPromise(store.getAll())) {
        note.savedVersion = null;
        forgetHref(note);
        store.put(note);
      }
    });
  },

  status(state, detail) {
    lastSync.state = state;
    lastSync.detail = detail || {};
    showStatus();
  },

  async reportObjectErrors(errors) {
    console.warn("notes the server or the library refused:", errors);
    const blobs = errors.filter((error) => error.code === "bad_blob");
    if (!blobs.length) return;
    await transaction("readwrite", async (store) => {
      for (const {object} of blobs) {
        const note = await asPromise(store.get(object.id));
        if (note) {
          forgetHref(note);
          note.version += 1;
          store.put(note);
        }
      }
    });
    appData.onupdate();
  },

  onupdate: () => {},       // replaced by Sync: called below after every local change
};

// ------------------------------------------------------------------ the status line

/* What the library last said; the line joins it to what is true here now: who is logged in,
 * whether the browser is online, and how many changes wait to be sent. */
const lastSync = {state: null, detail: {}};
const BUSY = new Set(["login", "syncing", "merging", "reading_again", "reauthenticating", "collection_changed",
                      "collection_deleted"]);

let statusCalls = 0;

async function showStatus() {
  const line = document.getElementById("status"), call = ++statusCalls;
  let text;
  if (!databaseUser) {
    text = "not logged in";
  } else {
    const waiting = (await allNotes()).filter(isPending).length;
    const changes = `${waiting} ${waiting === 1 ? "change" : "changes"} waiting`;
    const {state, detail} = lastSync;
    if (!navigator.onLine || state === "offline") {
      text = `offline, ${waiting} waiting`;
    } else if (state === "error") {
      text = `error: ${detail.message || detail.error}` + (waiting ? ` (${changes})` : "");
    } else if (state === null) {
      text = "connecting" + (waiting ? ` (${changes})` : "");
    } else if (BUSY.has(state)) {
      text = "syncing" + (waiting ? ` (${changes})` : "");
    } else if (waiting) {
      text = changes;
    } else {
      text = `synced at ${clock(sync && sync.lastSyncTime())}`;
    }
  }
  if (call !== statusCalls) return;     // a later call knows better (it began after a change)
  line.textContent = text;
  line.dataset.state = text.split(/[ :,(]/)[0];
}

function clock(time) {
  const at = time ? new Date(time) : new Date();
  return `${String(at.getHours()).padStart(2, "0")}:${String(at.getMinutes()).padStart(2, "0")}`;
}

// ------------------------------------------------------------------ logging in with OpenID Connect
// The authorization-code flow with PKCE (RFC 7636), as a public client: a page can keep no
// secret, so none is registered; the code verifier, made here and sent only to the token
// endpoint, is what proves that this page asked for the code. The ID token it ends with is the
// assertion for /verify, where the server checks its signature and claims (SPEC.md OIDC-1..9).

const base64url = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)))
  .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
const randomText = () => base64url(crypto.getRandomValues(new Uint8Array(32)));
const redirectUri = () => location.origin + location.pathname;     // registered at the provider as it is

async function discover() {
  const response = await fetch(ISSUER.replace(/\/$/, "") + "/.well-known/openid-configuration");
  if (!response.ok) throw new Error(`${ISSUER} has no discovery document (${response.status})`);
  return response.json();
}

async function leaveForProvider() {
  const provider = await discover();
  const login = {state: randomText(), nonce: randomText(), verifier: randomText(), query: location.search};
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(login.verifier)));
  sessionStorage.setItem(OIDC_LOGIN_KEY, JSON.stringify(login));
  const url = new URL(provider.authorization_endpoint);
  url.search = new URLSearchParams({response_type: "code", client_id: CLIENT_ID, redirect_uri: redirectUri(),
                                    scope: "openid email", state: login.state, nonce: login.nonce,
                                    code_challenge: challenge, code_challenge_method: "S256"});
  location.assign(url.href);
}

/* Back from the provider: its code exchanged for an ID token. Resolves to the ID token, or null
 * when the page was not opened by the provider. */
async function backFromProvider() {
  if (!leftFor) return null;
  sessionStorage.removeItem(OIDC_LOGIN_KEY);
  history.replaceState(null, "", redirectUri() + leftFor.query);       // the app's own URL again
  if (callback.get("state") !== leftFor.state) throw new Error("the provider answered another login (state)");
  if (callback.has("iss") && callback.get("iss") !== ISSUER) throw new Error("another provider answered (iss)");
  if (callback.has("error")) {
    throw new Error(`login refused: ${callback.get("error_description") || callback.get("error")}`);
  }
  const provider = await discover();
  const response = await fetch(provider.token_endpoint, {
    method: "POST",
    headers: {"Content-Type": "application/x-www-form-urlencoded"},
    body: new URLSearchParams({grant_type: "authorization_code", code: callback.get("code"),
                               redirect_uri: redirectUri(), client_id: CLIENT_ID, code_verifier: leftFor.verifier}),
  });
  const tokens = await response.json();
  if (!response.ok || !tokens.id_token) throw new Error(`no ID token: ${tokens.error_description || response.status}`);
  // The server checks everything else; only this page knows the nonce it sent, which proves
  // that the token was issued for this login and not replayed from another.
  const claims = JSON.parse(atob(tokens.id_token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  if (claims.nonce !== leftFor.nonce) throw new Error("the ID token is not for this login (nonce)");
  return tokens.id_token;
}

// ------------------------------------------------------------------ the app

let sync = null;
let idToken = null;     // from the provider, until it is posted to /verify: an assertion is used once

async function change(id, update) {
  if (!database) throw new Error("log in first");
  await transaction("readwrite", async (store) => {
    const note = (await asPromise(store.get(id))) || {id, text: "", image: null, version: 0, savedVersion: null};
    Object.assign(note, update, {updated: Date.now(), version: note.version + 1});
    store.put(note);
  });
  render();
  appData.onupdate();
}

const notesApp = {
  add: (text, image = null) => change(crypto.randomUUID(), {text, image, deleted: false}),
  edit: (id, text) => change(id, {text}),
  remove: (id) => change(id, {deleted: true}),
  list: async () => (await allNotes()).filter((note) => !note.deleted),
  get sync() { return sync; },
};

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({content_type: file.type || "application/octet-stream",
                                   data: reader.result.split(",")[1]});
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function render() {
  const list = document.getElementById("notes");
  const notes = (await notesApp.list()).sort((a, b) => a.updated - b.updated);
  list.replaceChildren(...notes.map((note) => {
    const item = document.createElement("li");
    item.dataset.id = note.id;
    item.classList.toggle("pending", isPending(note));
    const text = Object.assign(document.createElement("input"), {className: "note-text", value: note.text});
    text.addEventListener("change", () => notesApp.edit(note.id, text.value));
    item.append(text);
    if (note.image && (note.image.data || sync)) {
      const src = note.image.data ? `data:${note.image.content_type};base64,${note.image.data}`
        : sync.authenticateUrl(note.image.href);
      item.append(Object.assign(document.createElement("img"), {src, alt: "attached image"}));
    }
    const remove = Object.assign(document.createElement("button"), {className: "delete", textContent: "Delete"});
    remove.addEventListener("click", () => notesApp.remove(note.id));
    item.append(remove);
    return item;
  }));
  await showStatus();
}

async function showUser(email) {
  if (email) {
    await useDatabase(email);
  } else if (database) {
    database.close();
    database = databaseUser = null;
  }
  localStorage.setItem("notes-email", email || "");
  document.getElementById("login-form").hidden = Boolean(email);
  document.getElementById("login-provider").hidden = Boolean(email) || !(ISSUER && CLIENT_ID);
  document.getElementById("who").hidden = document.getElementById("logout").hidden = !email;
  document.getElementById("who").textContent = email || "";
  document.getElementById("new-note").hidden = !email;
  await render();
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const script = Object.assign(document.createElement("script"), {src});
    script.onload = resolve;
    script.onerror = () => {
      script.remove();
      reject(new Error(`cannot load ${src}`));
    };
    document.head.append(script);
  });
}

/* The library comes from the sync server; offline, the app works without it and tries again. */
async function connect() {
  for (;;) {
    try {
      await loadScript(new URL("syncclient.js", SERVER).href);
      break;
    } catch (error) {
      appData.status("offline", {message: `${error.message}; working locally, trying again`});
      await new Promise((resolve) => setTimeout(resolve, 5000));
    }
  }
  sync = new Sync(appData, {
    serverUrl: SERVER, bucket: BUCKET, pollInterval: POLL,
    // An ID token, after a login at the OpenID Provider; with the server's development
    // verifier, the assertion is just the email. A login at the provider is not renewed
    // silently: when the server's token expires, the user logs in there again.
    getAssertion: async () => {
      const assertion = idToken;
      idToken = null;
      if (assertion || localStorage.getItem("notes-login-with") === "provider") return assertion;
      return document.getElementById("email").value || localStorage.getItem("notes-email");
    },
  });
  sync.watch({onlogin: (email) => showUser(email), onlogout: () => showUser(null)});
}

async function start() {
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!sync) return appData.status("offline", {message: "the sync server cannot be reached to log in"});
    localStorage.setItem("notes-login-with", "email");
    sync.request().catch((error) => appData.status("error", {message: error.message}));
  });
  if (ISSUER && CLIENT_ID) {
    const button = document.getElementById("login-provider");
    button.textContent = `Log in with ${new URL(ISSUER).host}`;
    button.addEventListener("click", () => leaveForProvider().catch((error) => {
      appData.status("error", {message: `${ISSUER} cannot be reached: ${error.message}`});
    }));
  }
  document.getElementById("logout").addEventListener("click", () => sync && sync.logout());
  window.addEventListener("online", showStatus);
  window.addEventListener("offline", showStatus);
  document.getElementById("sync-now").addEventListener("click", () => sync && sync.syncNow().catch(() => {}));
  document.getElementById("new-note").addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = document.getElementById("image").files[0];
    await notesApp.add(document.getElementById("text").value, file ? await readImage(file) : null);
    event.target.reset();
  });
  // The last user's notes, at once, online or not.
  await showUser(localStorage.getItem("notes-email") || null);
  window.notesApp = notesApp;       // for the console, and for the browser tests
  document.body.dataset.ready = "true";
  const returned = await backFromProvider().catch((error) => {
    appData.status("error", {message: error.message});
    return null;
  });
  await connect();
  if (returned) {
    idToken = returned;
    localStorage.setItem("notes-login-with", "provider");
    sync.request().catch((error) => appData.status("error", {message: error.message}));
  }
  document.body.dataset.connected = "true";
}

start().catch((error) => appData.status("error", {message: error.message}));
