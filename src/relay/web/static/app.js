// The Cloudlink dashboard: plain JavaScript, no build step. Every call goes to the relay's
// REST API with the same bearer token rules as the CLI; the token is a short-lived JWT
// traded for an API key at login and kept in sessionStorage, never in a URL.
"use strict";

const TOKEN = "cloudlink.token";
const main = document.getElementById("main");
let me = null;
let refresh = null;
let closeTerminal = null;

// Builds an element: h("td", {class: "x"}, "text", child). Text is always text, never HTML.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function show(...nodes) {
  main.replaceChildren(...nodes);
}

function message(text, isError) {
  return h("p", { class: isError ? "message error" : "message", role: "status" }, text || "");
}

function setMessage(el, text, isError) {
  el.textContent = text || "";
  el.className = isError ? "message error" : "message";
}

function when(iso) {
  if (!iso) return "never";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

class ApiError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

// One API call; a 401 means the session is over: back to the login page.
async function api(method, path, body, token) {
  const headers = { Authorization: "Bearer " + (token || sessionStorage.getItem(TOKEN)) };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit", cache: "no-store",
  });
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!res.ok) {
    const msg = (data && data.error && data.error.message) || ("The relay answered " + res.status + ".");
    if (res.status === 401 && !token) { logout(msg); }
    throw new ApiError(res.status, msg);
  }
  return data;
}

function logout(why) {
  sessionStorage.removeItem(TOKEN);
  me = null;
  loginPage(why);
}

function loginPage(why) {
  stopPage();
  document.getElementById("nav").hidden = true;
  const key = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true,
    placeholder: "clk_…", "aria-label": "API key" });
  const msg = message(why, !!why);
  const form = h("form", { class: "card login", id: "login" },
    h("h1", {}, "Log in"),
    h("p", {}, "Use an API key (", h("code", {}, "cloudlink api-key create"),
      ", or admin.key in the relay's data directory). It is traded for a short-lived token and not kept."),
    key, h("div", { class: "row" }, h("button", { type: "submit" }, "Log in")), msg);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const t = await api("POST", "/v1/auth/token", undefined, key.value.trim());
      sessionStorage.setItem(TOKEN, t.token);
      location.hash = "#/devices";
      await start();
    } catch (err) {
      setMessage(msg, err.message, true);
    }
  });
  show(form);
  key.focus();
}

function stopPage() {
  if (refresh) { clearInterval(refresh); refresh = null; }
  if (closeTerminal) { closeTerminal(); closeTerminal = null; }
}

async function devicesPage() {
  const filter = h("input", { id: "filter", type: "search", placeholder: "Filter by name, uuid or fleet",
    "aria-label": "Filter devices" });
  const body = h("tbody", { id: "devices" });
  const msg = message();
  let devices = [];
  const render = () => {
    const q = filter.value.trim().toLowerCase();
    body.replaceChildren(...devices
      .filter((d) => !q || [d.name, d.uuid, d.fleet].some((s) => s.toLowerCase().includes(q)))
      .map((d) => h("tr", { class: "link", "data-uuid": d.uuid, onclick: () => { location.hash = "#/device/" + d.uuid; } },
        h("td", {}, d.fleet),
        h("td", {}, h("a", { href: "#/device/" + d.uuid }, d.name || "(unnamed)")),
        h("td", { class: "mono wide" }, d.uuid),
        h("td", { class: stateOf(d) }, stateOf(d)),
        h("td", { class: "wide" }, d.relay || ""),
        h("td", { class: "wide" }, when(d.last_seen)))));
  };
  const load = async () => {
    try { devices = await api("GET", "/v1/devices"); render(); setMessage(msg, ""); }
    catch (err) { setMessage(msg, err.message, true); }
  };
  filter.addEventListener("input", render);
  show(h("h1", {}, "Devices"), h("div", { class: "row" }, filter), msg,
    h("div", { class: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Fleet"), h("th", {}, "Name"), h("th", { class: "wide" }, "UUID"),
        h("th", {}, "Status"), h("th", { class: "wide" }, "Relay"), h("th", { class: "wide" }, "Last seen"))),
      body)));
  await load();
  refresh = setInterval(load, 10000);
}

// online, reconnecting (tunnels held while its link is gone or silent) or offline; an older
// relay sends only `online`.
function stateOf(d) {
  return d.state || (d.online ? "online" : "offline");
}

async function devicePage(uuid) {
  const msg = message();
  let device;
  try { device = await api("GET", "/v1/devices/" + encodeURIComponent(uuid)); }
  catch (err) { show(h("h1", {}, "Device"), message(err.message, true)); return; }
  const status = h("dd", { id: "status", class: stateOf(device) }, stateOf(device));
  const target = h("select", { id: "target", "aria-label": "Terminal target" },
    h("option", { value: "" }, "Host OS"), h("option", { value: "service" }, "A service…"));
  const service = h("input", { id: "service", placeholder: "service name", hidden: true,
    "aria-label": "Service name" });
  target.addEventListener("change", () => { service.hidden = target.value !== "service"; });
  const startBtn = h("button", { id: "start", type: "button" }, "Start terminal");
  const expandBtn = h("button", { id: "expand", type: "button", class: "secondary", disabled: true }, "Expand");
  const termMsg = message();
  const box = h("div", { id: "terminal-box", hidden: true });
  const tunnels = h("tbody", { id: "tunnels" });
  startBtn.addEventListener("click", () => {
    if (target.value === "service" && !service.value.trim()) {
      setMessage(termMsg, "Name the service to enter.", true);
      return;
    }
    openTerminal({ uuid, service: target.value === "service" ? service.value.trim() : null,
      box, msg: termMsg, startBtn, expandBtn, onEnd: loadTunnels });
  });
  expandBtn.addEventListener("click", () => expand(box, true));
  async function loadTunnels() {
    try {
      const rows = await api("GET", "/v1/tunnels?limit=20&device=" + encodeURIComponent(uuid));
      tunnels.replaceChildren(...rows.map((t) => h("tr", {},
        h("td", {}, when(t.opened_at)), h("td", {}, t.user), h("td", {}, t.kind),
        h("td", {}, t.port), h("td", { class: "wide" }, bytes(t.bytes_up) + " up, " + bytes(t.bytes_down) + " down"),
        h("td", {}, t.closed_at ? (t.close_reason || "closed") : "open"))));
    } catch (err) { setMessage(msg, err.message, true); }
  }
  show(h("h1", {}, device.name || "(unnamed device)"), msg,
    h("section", {}, h("dl", {},
      h("dt", {}, "UUID"), h("dd", { class: "mono" }, device.uuid),
      h("dt", {}, "Fleet"), h("dd", {}, device.fleet),
      h("dt", {}, "Status"), status,
      h("dt", {}, "Relay"), h("dd", {}, device.relay ? device.relay + " (" + device.transport + ")" : "—"),
      h("dt", {}, "Last seen"), h("dd", {}, when(device.last_seen)))),
    h("section", {}, h("h2", {}, "Terminal"),
      h("div", { class: "row" }, target, service, startBtn, expandBtn), termMsg, box),
    h("section", {}, h("h2", {}, "Recent tunnels"), h("div", { class: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Opened"), h("th", {}, "User"), h("th", {}, "Kind"),
        h("th", {}, "Port"), h("th", { class: "wide" }, "Bytes"), h("th", {}, "State"))), tunnels))));
  await loadTunnels();
}

function expand(box, on) {
  box.classList.toggle("expanded", on);
  let collapse = document.getElementById("collapse");
  if (on && !collapse) {
    collapse = h("button", { id: "collapse", type: "button", onclick: () => expand(box, false) }, "Collapse");
    document.body.append(collapse);
  } else if (!on && collapse) {
    collapse.remove();
  }
  window.dispatchEvent(new Event("resize"));
}

// One terminal session over the relay's WebSocket (PROTOCOL.md §5).
function openTerminal({ uuid, service, box, msg, startBtn, expandBtn, onEnd }) {
  if (closeTerminal) closeTerminal();
  box.hidden = false;
  box.replaceChildren();
  startBtn.disabled = true;
  setMessage(msg, "Connecting…");
  const term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  // Ctrl+Insert copies the selection (Shift+Insert, Ctrl+Shift+V and ⌘V paste natively).
  term.attachCustomKeyEventHandler((e) => {
    if (e.type === "keydown" && e.ctrlKey && e.key === "Insert" && term.hasSelection()) {
      navigator.clipboard.writeText(term.getSelection()).catch(() => {});
      return false;
    }
    return true;
  });
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const query = service ? "?service=" + encodeURIComponent(service) : "";
  const ws = new WebSocket(scheme + location.host + "/v1/devices/" + encodeURIComponent(uuid) + "/terminal" + query);
  ws.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  let ended = false;
  const end = (text, isError) => {
    if (ended) return;
    ended = true;
    setMessage(msg, text, isError);
    startBtn.disabled = false;
    expandBtn.disabled = true;
    expand(box, false);
    if (onEnd) onEnd();
  };
  ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: sessionStorage.getItem(TOKEN),
    cols: term.cols, rows: term.rows }));
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") { term.write(new Uint8Array(e.data)); return; }
    let m;
    try { m = JSON.parse(e.data); } catch { return; }
    if (m.type === "started") {
      setMessage(msg, "Connected as " + m.login + (service ? " in service " + service : "") + ".");
      expandBtn.disabled = false;
      term.focus();
    } else if (m.type === "exit") {
      end("The session ended" + (m.signal ? " (signal " + m.signal + ")." : " with status " + m.status + "."));
    } else if (m.type === "error") {
      end(m.message, true);
    }
  };
  ws.onclose = () => end("The connection to the relay closed.", true);
  ws.onerror = () => end("Cannot reach the relay's terminal.", true);
  const onData = term.onData((d) => { if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d)); });
  const onResize = term.onResize(({ cols, rows }) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", cols, rows }));
  });
  const refit = () => fit.fit();
  window.addEventListener("resize", refit);
  closeTerminal = () => {
    ended = true;
    window.removeEventListener("resize", refit);
    onData.dispose();
    onResize.dispose();
    ws.close();
    term.dispose();
    const collapse = document.getElementById("collapse");
    if (collapse) collapse.remove();
  };
}

async function keysPage() {
  const msg = message();
  const body = h("tbody", { id: "keys" });
  const load = async () => {
    try {
      const keys = await api("GET", "/v1/ssh-keys");
      body.replaceChildren(...keys.map((k) => h("tr", {},
        h("td", {}, k.title), h("td", { class: "mono" }, k.fingerprint), h("td", { class: "wide" }, when(k.created_at)),
        h("td", {}, h("button", { type: "button", class: "secondary", onclick: async () => {
          try { await api("DELETE", "/v1/ssh-keys/" + k.id); setMessage(msg, "Removed " + k.title + "."); await load(); }
          catch (err) { setMessage(msg, err.message, true); }
        } }, "Remove")))));
    } catch (err) { setMessage(msg, err.message, true); }
  };
  const title = h("input", { id: "key-title", placeholder: "Title, e.g. laptop", required: true, "aria-label": "Key title" });
  const text = h("textarea", { id: "key-text", placeholder: "ssh-ed25519 AAAA… you@laptop", required: true,
    "aria-label": "Public key" });
  const add = h("form", { class: "card", id: "add-key" }, h("h2", {}, "Add a key"), title, text,
    h("div", { class: "row" }, h("button", { type: "submit" }, "Add key")));
  add.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const k = await api("POST", "/v1/ssh-keys", { title: title.value.trim(), public_key: text.value.trim() });
      setMessage(msg, "Added " + k.fingerprint + ".");
      title.value = ""; text.value = "";
      await load();
    } catch (err) { setMessage(msg, err.message, true); }
  });
  const login = h("input", { id: "github-login", placeholder: "GitHub login", required: true, "aria-label": "GitHub login" });
  const gh = h("form", { class: "card", id: "import-github" }, h("h2", {}, "Import from GitHub"),
    h("p", {}, "The relay fetches the public keys of the GitHub account."),
    h("div", { class: "row" }, login, h("button", { type: "submit" }, "Import")));
  gh.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const r = await api("POST", "/v1/ssh-keys/import", { github: login.value.trim() });
      const parts = ["Imported " + r.added.length + " key" + (r.added.length === 1 ? "" : "s")];
      if (r.duplicates.length) parts.push(r.duplicates.length + " already yours");
      if (r.invalid.length) parts.push(r.invalid.length + " invalid (line " + r.invalid.map((i) => i.line).join(", ") + ")");
      setMessage(msg, parts.join("; ") + ".");
      await load();
    } catch (err) { setMessage(msg, err.message, true); }
  });
  show(h("h1", {}, "SSH keys"), msg,
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Title"),
      h("th", {}, "Fingerprint"), h("th", { class: "wide" }, "Added"), h("th", {}, ""))), body)),
    add, gh);
  await load();
}

async function listPage(title, path, headers, cells) {
  const msg = message();
  const body = h("tbody", {});
  show(h("h1", {}, title), msg, h("div", { class: "scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))), body)));
  try {
    const rows = await api("GET", path);
    body.replaceChildren(...rows.map((r) => h("tr", {}, cells(r).map((c) => h("td", {}, c)))));
  } catch (err) { setMessage(msg, err.message, true); }
}

async function route() {
  stopPage();
  if (!sessionStorage.getItem(TOKEN) || !me) { loginPage(); return; }
  const [, page, arg] = (location.hash || "#/devices").split("/");
  if (page === "device" && arg) return devicePage(arg);
  if (page === "keys") return keysPage();
  if (page === "users" && me.admin) {
    return listPage("Users", "/v1/users", ["Name", "Admin"], (u) => [u.username, u.admin ? "yes" : ""]);
  }
  if (page === "fleets" && me.admin) {
    return listPage("Fleets", "/v1/fleets", ["Name", "Allowed ports", "Created"],
      (f) => [f.name, f.allowed_ports.length ? f.allowed_ports.join(", ") : "all", when(f.created_at)]);
  }
  return devicesPage();
}

async function start() {
  if (!sessionStorage.getItem(TOKEN)) { loginPage(); return; }
  try { me = await api("GET", "/v1/me"); }
  catch (err) { if (err.status !== 401) loginPage(err.message); return; }
  document.getElementById("nav").hidden = false;
  document.getElementById("whoami").textContent = me.username;
  for (const a of document.querySelectorAll("nav .admin")) a.hidden = !me.admin;
  await route();
}

document.getElementById("logout").addEventListener("click", () => logout());
window.addEventListener("hashchange", route);
start();
