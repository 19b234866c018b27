// Myriad's dashboard: polls the controller's API once a second and redraws the jobs table, the
// selected job's charts and event timeline, and the node grid. No framework and no build step:
// the file is embedded in the controller as is. Text from the cluster (job names, commands, event
// messages) only ever goes into the page through textContent, never as HTML.
"use strict";

const POLL_MS = 1000;
// A fetch that takes longer than this counts as a failed poll; the next one tries again.
const FETCH_TIMEOUT_MS = 5000;
// A healthy node whose last heartbeat is older than this is shown as late (it is declared lost
// after three missed intervals, by the controller, not here).
const LATE_HEARTBEAT_MS = 2500;
const TOKEN_KEY = "myriad.token";
const SVG_NS = "http://www.w3.org/2000/svg";
const FAULT_KINDS = new Set(["attempt_failed", "rank_exited", "rank_hung", "node_lost", "checkpoint_corrupt", "straggler", "leftover_ranks"]);
const GOOD_KINDS = new Set(["recovered", "running", "attempt_succeeded", "node_returned"]);

const state = {
  token: null,
  selected: null,       // id of the job whose charts and events are shown
  pinned: false,        // the user picked the job: do not follow the newest running one
  events: new Map(),    // job id -> { after, list }
  polls: 0,
};

// ------------------------------------------------------------------ formatting

const fmt = {
  num: (v, digits) => (v == null ? "–" : v.toFixed(digits)),
  pct: (v) => (v == null ? "–" : (100 * v).toFixed(1) + "%"),
  rate: (v) => {
    if (v == null) return "–";
    if (v >= 1e6) return (v / 1e6).toFixed(2) + " M";
    if (v >= 1e3) return (v / 1e3).toFixed(1) + " k";
    return v.toFixed(0);
  },
  duration: (ms) => {
    const s = Math.max(0, ms) / 1000;
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " m";
  },
  clock: (ms) => new Date(ms).toLocaleTimeString([], { hour12: false }),
  offset: (ms) => {
    const s = Math.max(0, Math.round(ms / 1000));
    return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  },
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

// ------------------------------------------------------------------ API

class Unauthorized extends Error {}

async function api(path) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  try {
    const r = await fetch(path, { headers: { Authorization: "Bearer " + state.token }, signal: abort.signal, cache: "no-store" });
    if (r.status === 401) throw new Unauthorized("the controller refused the token");
    if (!r.ok) {
      let message = r.statusText;
      try { message = (await r.json()).error || message; } catch (_) { /* not JSON */ }
      throw new Error(path + ": " + r.status + " " + message);
    }
    return await r.json();
  } finally {
    clearTimeout(timer);
  }
}

// ------------------------------------------------------------------ token

function takeToken() {
  // `#token=…` (printed by `myriad up` and `myriad demo`) is read once, kept for this tab only
  // and wiped from the address bar so it is not bookmarked or shared by accident.
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function showLogin(message) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  setConn("no token", "bad");
  document.getElementById("token").focus();
}

function setConn(text, cls) {
  const c = document.getElementById("conn");
  c.textContent = text;
  c.className = "conn " + (cls || "");
}

// ------------------------------------------------------------------ jobs table

// Jobs whose charts move: the dashboard follows the newest of them unless one was clicked.
const ACTIVE = new Set(["running", "starting", "stopping"]);

function renderJobs(jobs, now) {
  const body = document.querySelector("#jobs-table tbody");
  document.getElementById("no-jobs").hidden = jobs.length > 0;
  const rows = jobs.slice().sort((a, b) => b.id - a.id).map((j) => {
    const tr = el("tr");
    tr.dataset.job = j.id;
    tr.dataset.state = j.state;
    if (j.id === state.selected) tr.classList.add("selected");
    const age = (j.ended_ms || now) - j.submitted_ms;
    const cells = [
      [j.id, "num"], [j.name, "name"], [j.state, "state s-" + j.state],
      [j.spec.nodes + "×" + j.spec.ranks_per_node, "num"], [j.step == null ? "–" : j.step, "num"],
      [fmt.num(j.loss, 4), "num"], [fmt.rate(j.tokens_per_s), "num"], [fmt.pct(j.mfu), "num"],
      [fmt.pct(j.ettr), "num"], [j.faults, "num"], [j.restarts + "/" + j.spec.max_restarts, "num"],
      [fmt.duration(age), "num"],
    ];
    for (const [text, cls] of cells) tr.appendChild(el("td", cls, String(text)));
    tr.title = (j.reason ? j.reason + "\n" : "") + j.spec.argv.join(" ");
    tr.addEventListener("click", () => { state.selected = j.id; state.pinned = true; poll(); });
    return tr;
  });
  body.replaceChildren(...rows);
}

function pickJob(jobs) {
  if (state.pinned && jobs.some((j) => j.id === state.selected)) return state.selected;
  const active = jobs.filter((j) => ACTIVE.has(j.state));
  const newest = (list) => list.reduce((a, b) => (b.id > a.id ? b : a));
  if (active.length) return newest(active).id;
  return jobs.length ? newest(jobs).id : null;
}

// ------------------------------------------------------------------ one job: time bar, charts, events

const TIME_PARTS = [
  ["committed_ms", "committed steps", "t-committed"],
  ["startup_ms", "start-up", "t-startup"],
  ["detection_ms", "detection", "t-detection"],
  ["restart_ms", "restart", "t-restart"],
  ["recompute_ms", "recomputation", "t-recompute"],
];

function renderTimeBar(job) {
  const t = job.time;
  const known = TIME_PARTS.reduce((s, [k]) => s + t[k], 0);
  const other = Math.max(0, t.wall_ms - known);
  const wall = Math.max(1, t.wall_ms);
  const bar = document.getElementById("time-bar");
  const legend = document.getElementById("time-legend");
  const segments = [];
  const entries = [];
  for (const [key, label, cls] of [...TIME_PARTS, ["other", "other (step in flight, queued)", "t-other"]]) {
    const ms = key === "other" ? other : t[key];
    const seg = el("span", cls);
    seg.style.width = (100 * ms / wall).toFixed(3) + "%";
    seg.title = label + ": " + fmt.duration(ms);
    segments.push(seg);
    const entry = el("span", "entry");
    entry.append(el("span", "swatch " + cls), label + " " + fmt.duration(ms));
    entries.push(entry);
  }
  bar.replaceChildren(...segments);
  legend.replaceChildren(...entries);
}

// Lost-time windows from the job's events: a fault (an attempt ended by a failure) until the
// next attempt's first step ("recovered"); still open while the job recovers.
function faultWindows(events, now) {
  const windows = [];
  let open = null;
  for (const e of events) {
    if (e.kind === "attempt_failed" && open == null) open = { start: e.time_ms, end: null, failed: e };
    if (e.kind === "recovered" && open != null) {
      const detection = e.data && e.data.detection_s ? e.data.detection_s * 1000 : 0;
      open.start = Math.min(open.start, open.failed.time_ms - detection);
      open.end = e.time_ms;
      windows.push(open);
      open = null;
    }
  }
  if (open != null) windows.push({ start: open.start, end: now, failed: open.failed });
  return windows;
}

function drawChart(id, points, key, format, t0, t1, windows) {
  const fig = document.getElementById(id);
  const box = fig.querySelector("svg");
  const data = points.filter((p) => p[key] != null).map((p) => [p.time_ms, p[key]]);
  fig.querySelector(".value").textContent = data.length ? format(data[data.length - 1][1]) : "–";
  fig.dataset.points = data.length;
  const W = Math.max(200, box.clientWidth || 300);
  const H = 150;
  const pad = { l: 54, r: 8, t: 8, b: 20 };
  box.setAttribute("viewBox", "0 0 " + W + " " + H);
  box.setAttribute("height", H);
  const parts = [];
  if (!data.length) {
    parts.push(Object.assign(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }), { textContent: "waiting for steps" }));
    box.replaceChildren(...parts);
    return;
  }
  let lo = Math.min(...data.map((d) => d[1]));
  let hi = Math.max(...data.map((d) => d[1]));
  if (key === "mfu" || key === "ettr") { lo = Math.min(lo, 0); hi = Math.max(hi, key === "ettr" ? 1 : hi); }
  if (hi - lo < 1e-9) { const d = Math.abs(hi) * 0.1 || 1; lo -= d; hi += d; }
  const span = Math.max(1, t1 - t0);
  const x = (t) => pad.l + (W - pad.l - pad.r) * (t - t0) / span;
  const y = (v) => pad.t + (H - pad.t - pad.b) * (1 - (v - lo) / (hi - lo));
  for (const w of windows) {
    const a = Math.max(pad.l, x(w.start));
    const b = Math.min(W - pad.r, x(w.end));
    if (b > a) parts.push(svg("rect", { x: a, y: pad.t, width: Math.max(1.5, b - a), height: H - pad.t - pad.b, class: "fault-window" }));
  }
  for (let i = 0; i <= 2; i++) {
    const v = lo + (hi - lo) * i / 2;
    parts.push(svg("line", { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), class: "grid" }));
    parts.push(Object.assign(svg("text", { x: pad.l - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }), { textContent: format(v) }));
  }
  parts.push(Object.assign(svg("text", { x: pad.l, y: H - 4, class: "axis" }), { textContent: "0:00" }));
  parts.push(Object.assign(svg("text", { x: W - pad.r, y: H - 4, "text-anchor": "end", class: "axis" }), { textContent: fmt.offset(t1 - t0) }));
  const line = data.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
  parts.push(svg("polyline", { points: line, class: "line" }));
  const [lt, lv] = data[data.length - 1];
  parts.push(svg("circle", { cx: x(lt), cy: y(lv), r: 3, class: "dot" }));
  box.replaceChildren(...parts);
}

function renderEvents(job, events) {
  const list = document.getElementById("events");
  const items = events.slice(-200).reverse().map((e) => {
    const li = el("li", FAULT_KINDS.has(e.kind) ? "fault" : GOOD_KINDS.has(e.kind) ? "good" : "info");
    li.dataset.kind = e.kind;
    const when = el("span", "when", "+" + fmt.offset(e.time_ms - job.submitted_ms));
    when.title = fmt.clock(e.time_ms);
    li.append(when, el("span", "kind", e.kind.replace(/_/g, " ")));
    const text = el("span", "message", e.message + (e.node ? "  [" + e.node + "]" : ""));
    text.title = text.textContent;
    li.append(text);
    const d = e.data;
    if (e.kind === "recovered" && d) {
      // The recovery's lost seconds as one bar, 10 s to its full width.
      const bar = el("span", "recovery");
      for (const [k, cls] of [["detection_s", "t-detection"], ["restart_s", "t-restart"], ["recompute_s", "t-recompute"]]) {
        const seg = el("span", cls);
        seg.style.width = Math.min(100, 10 * (d[k] || 0)).toFixed(2) + "%";
        seg.title = k.replace("_s", "") + " " + (d[k] || 0).toFixed(2) + " s";
        bar.append(seg);
      }
      const total = (d.detection_s || 0) + (d.restart_s || 0) + (d.recompute_s || 0);
      li.append(bar, el("span", "total", total.toFixed(2) + " s lost"));
    }
    return li;
  });
  list.replaceChildren(...items);
}

async function loadEvents(id) {
  let entry = state.events.get(id);
  if (!entry) { entry = { after: 0, list: [] }; state.events.set(id, entry); }
  // Paged: a long job may have more events than one call returns.
  for (let page = 0; page < 10; page++) {
    const batch = await api("/v1/jobs/" + id + "/events?after=" + entry.after + "&limit=1000");
    for (const e of batch) { entry.list.push(e); entry.after = e.seq; }
    if (batch.length < 1000) break;
  }
  if (entry.list.length > 5000) entry.list.splice(0, entry.list.length - 5000);
  return entry.list;
}

async function renderJob(job, now) {
  const section = document.getElementById("job");
  section.hidden = false;
  section.dataset.job = job.id;
  document.getElementById("job-title").textContent =
    "Job " + job.id + " · " + job.name + " · " + job.state + " · attempt " + job.attempt +
    " · " + job.world_size + " ranks";
  renderTimeBar(job);
  const [series, events] = await Promise.all([api("/v1/jobs/" + job.id + "/series"), loadEvents(job.id)]);
  const t0 = job.submitted_ms;
  const t1 = Math.max(job.ended_ms || now, t0 + 1000);
  const windows = faultWindows(events, job.ended_ms || now);
  drawChart("chart-loss", series.points, "loss", (v) => v.toFixed(3), t0, t1, windows);
  drawChart("chart-tokens", series.points, "tokens_per_s", fmt.rate, t0, t1, windows);
  drawChart("chart-mfu", series.points, "mfu", fmt.pct, t0, t1, windows);
  drawChart("chart-ettr", series.points, "ettr", fmt.pct, t0, t1, windows);
  renderEvents(job, events);
}

// ------------------------------------------------------------------ nodes

function nodeClass(n) {
  if (n.health === "lost") return "lost";
  if (n.health === "quarantined") return "quarantined";
  if (n.health === "gpu_failed") return "gpu-failed";
  if (n.heartbeat_age_ms != null && n.heartbeat_age_ms > LATE_HEARTBEAT_MS) return "late";
  if (n.slots_used > 0) return "busy";
  return n.spare ? "spare" : "idle";
}

const NODE_CLASSES = [
  ["busy", "running ranks"], ["idle", "idle"], ["spare", "hot spare"], ["late", "heartbeat late"],
  ["quarantined", "quarantined"], ["gpu-failed", "GPU failed"], ["lost", "lost"],
];

function renderNodes(nodes) {
  const grid = document.getElementById("node-grid");
  grid.classList.toggle("dense", nodes.length > 300);
  // Cells are kept and only their class changes: at 1,250 nodes a full rebuild every second
  // would be the page's main cost.
  while (grid.children.length > nodes.length) grid.lastChild.remove();
  while (grid.children.length < nodes.length) grid.appendChild(el("div", "node"));
  const counts = Object.fromEntries(NODE_CLASSES.map(([c]) => [c, 0]));
  const problems = [];
  nodes.forEach((n, i) => {
    const c = nodeClass(n);
    counts[c]++;
    const cell = grid.children[i];
    const cls = "node " + c;
    if (cell.className !== cls) cell.className = cls;
    cell.dataset.index = i;
    if (c === "lost" || c === "quarantined" || c === "late" || c === "gpu-failed") problems.push(n.name + " (" + c + ")");
    const warned = (n.gpu_findings || []).some((f) => !f.fatal);
    if (cell.classList.contains("gpu-warning") !== warned) cell.classList.toggle("gpu-warning", warned);
  });
  grid.nodes = nodes;
  const legend = document.getElementById("node-legend");
  legend.replaceChildren(...NODE_CLASSES.map(([c, label]) => {
    const entry = el("span", "entry");
    entry.dataset.class = c;
    entry.append(el("span", "node " + c), label + " " + counts[c]);
    return entry;
  }));
  const p = document.getElementById("node-problems");
  p.textContent = problems.length ? "Needs attention: " + problems.slice(0, 50).join(", ") + (problems.length > 50 ? " … and " + (problems.length - 50) + " more" : "") : "";
}

function nodeTooltip(ev) {
  const tip = document.getElementById("tooltip");
  const grid = document.getElementById("node-grid");
  const i = ev.target.dataset ? ev.target.dataset.index : undefined;
  if (i == null || !grid.nodes || !grid.nodes[i]) { tip.hidden = true; return; }
  const n = grid.nodes[i];
  const lines = [
    n.name + (n.spare ? " (spare)" : ""),
    "health: " + n.health,
    "slots: " + n.slots_used + " of " + n.slots + " in use",
    "heartbeat: " + (n.heartbeat_age_ms == null ? "never" : fmt.duration(n.heartbeat_age_ms) + " ago"),
    "jobs: " + (n.jobs.length ? n.jobs.join(", ") : "none"),
    "agent: " + n.addr + ":" + n.http_port,
  ];
  const gpus = n.gpus || [];
  if (gpus.length) {
    lines.push("GPUs: " + gpus.length + " × " + gpus[0].model + " (" + Math.round(gpus[0].memory_mib / 1024) + " GiB)");
  }
  for (const f of n.gpu_findings || []) {
    lines.push("GPU " + f.index + (f.fatal ? " FAILED: " : " warning: ") + f.reason);
  }
  tip.textContent = lines.join("\n");
  tip.hidden = false;
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 260) + "px";
  tip.style.top = ev.clientY + 14 + "px";
}

// ------------------------------------------------------------------ summary and the poll loop

function renderSummary(jobs, nodes) {
  const healthy = nodes.filter((n) => n.health === "healthy");
  const slots = healthy.reduce((s, n) => s + n.slots, 0);
  const used = nodes.reduce((s, n) => s + n.slots_used, 0);
  const running = jobs.filter((j) => j.state === "running").length;
  const queued = jobs.filter((j) => j.state === "queued").length;
  const parts = [
    nodes.length + " nodes, " + healthy.length + " healthy",
    used + "/" + slots + " slots in use",
    running + " running, " + queued + " queued",
  ];
  document.getElementById("summary").textContent = parts.join(" · ");
}

let timer = null;
let busy = false;

async function poll() {
  clearTimeout(timer);
  if (busy || !state.token) return;
  busy = true;
  try {
    const [jobs, nodes] = await Promise.all([api("/v1/jobs"), api("/v1/nodes")]);
    const now = Date.now();
    state.selected = pickJob(jobs);
    renderSummary(jobs, nodes);
    renderJobs(jobs, now);
    renderNodes(nodes);
    const job = jobs.find((j) => j.id === state.selected);
    if (job) await renderJob(job, now);
    else document.getElementById("job").hidden = true;
    state.polls++;
    document.body.dataset.polls = state.polls;
    setConn("live · " + fmt.clock(now), "ok");
  } catch (e) {
    if (e instanceof Unauthorized) { showLogin(e.message); return; }
    setConn("controller unreachable: " + e.message, "bad");
  } finally {
    busy = false;
  }
  timer = setTimeout(poll, POLL_MS);
}

function start(token) {
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = document.getElementById("token").value.trim();
    if (t) start(t);
  });
  const grid = document.getElementById("node-grid");
  grid.addEventListener("mousemove", nodeTooltip);
  grid.addEventListener("mouseleave", () => { document.getElementById("tooltip").hidden = true; });
  const token = takeToken();
  if (token) start(token); else showLogin("");
});
