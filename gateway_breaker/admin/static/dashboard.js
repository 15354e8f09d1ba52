// The live dashboard of gateway-breaker: one script, no dependencies, no build step.
//
// It speaks the admin API next to the page ({admin.path}/breakers, /fleet, /events, ...) with the
// bearer token the person typed in. The token lives in this page's memory only: never in
// storage (a page of an upstream served on the same origin could read it), a URL, a cookie or
// a log line; a reload asks for it again. Live updates come from the event
// stream read with fetch (EventSource cannot send an Authorization header), and a periodic
// refresh of the breakers and the fleet catches whatever the stream missed.

const REFRESH_MS = 3000;
const SPARK_SAMPLES = 20; // bars in a sparkline: one per refresh, a minute at 3 s
const HISTORY_SHOWN = 10;
const HISTORY_PRELOAD = 60; // at start, fetch the history of this many breakers that are not closed
const STREAM_SILENCE_MS = 45000; // the server sends a keepalive every 15 s
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 15000;
const STATES = ["open", "forced_open", "half_open", "metrics_only", "disabled", "closed"];
const STATE_WORDS = {
  closed: "closed",
  open: "open",
  half_open: "half open",
  forced_open: "forced open",
  disabled: "disabled",
  metrics_only: "metrics only",
};
const STATE_RANK = Object.fromEntries(STATES.map((state, i) => [state, i]));
const ACTIONS = {
  "force-open": {
    title: (s) => `Force ${s} open?`,
    text: (s) =>
      `Every gateway of the fleet answers 503 for ${s} without calling it, until the mode is ` +
      "released or the duration ends.",
    ok: "Force open",
    inputs: true,
    done: "forced open",
    call: (s, input) => ["PUT", `/breakers/${enc(s)}/manual`, manualBody("forced_open", input)],
  },
  disable: {
    title: (s) => `Disable the breaker of ${s}?`,
    text: (s) =>
      `Every gateway lets all calls to ${s} through and counts nothing: no protection until the ` +
      "mode is released or the duration ends.",
    ok: "Disable",
    inputs: true,
    done: "disabled",
    call: (s, input) => ["PUT", `/breakers/${enc(s)}/manual`, manualBody("disabled", input)],
  },
  "metrics-only": {
    title: (s) => `Metrics only for ${s}?`,
    text: (s) =>
      `The breaker of ${s} keeps counting and reports its state on every gateway, but never ` +
      "rejects a call.",
    ok: "Metrics only",
    inputs: true,
    done: "set to metrics only",
    call: (s, input) => ["PUT", `/breakers/${enc(s)}/manual`, manualBody("metrics_only", input)],
  },
  release: {
    title: (s) => `Release the manual mode of ${s}?`,
    text: () => "The whole fleet returns to the automatic state machine.",
    ok: "Release",
    inputs: false,
    done: "released",
    call: (s) => ["DELETE", `/breakers/${enc(s)}/manual`, undefined],
  },
  reset: {
    title: (s) => `Reset ${s}?`,
    text: (s) => `The breaker of ${s} closes on every gateway and its counters are cleared.`,
    ok: "Reset",
    inputs: false,
    done: "reset",
    call: (s) => ["POST", `/breakers/${enc(s)}/reset`, undefined],
  },
};

// The page is served at {admin.path}/; the API lives under {admin.path}.
const BASE = location.pathname.replace(/[^/]*$/, "").replace(/\/$/, "");

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

class RefusedError extends Error {
  constructor() {
    super("the gateway refused the token (401)");
  }
}

class ApiError extends Error {
  constructor(status, problem) {
    super(describeProblem(status, problem));
    this.status = status;
    this.problem = problem;
  }
}

function describeProblem(status, problem) {
  if (!problem || typeof problem !== "object") return `HTTP ${status}`;
  let text = String(problem.detail || problem.title || `HTTP ${status}`);
  if (Array.isArray(problem.errors) && problem.errors.length) {
    text += ": " + problem.errors.map((e) => `${e.field}: ${e.message}`).join("; ");
  }
  return text;
}

function manualBody(mode, input) {
  const body = { mode };
  if (input.seconds !== null) body.seconds = input.seconds;
  if (input.reason) body.reason = input.reason;
  return body;
}

// ---- formatting ------------------------------------------------------------------------------

function nowSeconds() {
  return Date.now() / 1000;
}

function duration(seconds) {
  if (!Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function clock(unixSeconds) {
  if (typeof unixSeconds !== "number" || !unixSeconds) return "—";
  const d = new Date(unixSeconds * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  const time = d.toLocaleTimeString([], { hour12: false });
  return sameDay ? time : `${d.toLocaleDateString()} ${time}`;
}

function percent(rate) {
  if (typeof rate !== "number") return null;
  return `${(rate * 100).toFixed(rate > 0 && rate < 0.1 ? 1 : 0)}%`;
}

function describePolicy(p) {
  if (!p || typeof p !== "object") return "";
  const parts = [];
  if (typeof p.failure_threshold === "number") parts.push(`${p.failure_threshold} failures in a row`);
  if (typeof p.error_rate_threshold === "number") {
    parts.push(
      `${percent(p.error_rate_threshold)} failed of ${p.min_calls ?? "?"}+ calls in ${p.window_seconds ?? "?"} s`,
    );
  }
  let text = parts.length ? `Opens on ${parts.join(" or ")}` : "Policy";
  if (typeof p.timeout_seconds === "number") text += `; stays open ${p.timeout_seconds} s`;
  if (typeof p.slow_call_seconds === "number") text += `; calls over ${p.slow_call_seconds} s fail`;
  if (typeof p.quorum === "number" && p.quorum > 1) text += `; needs ${p.quorum} instances`;
  return `${text}.`;
}

function stateWord(state) {
  return STATE_WORDS[state] || String(state);
}

function setText(el, text) {
  // Compare with what this script wrote last, so unchanged rows cost no DOM work.
  if (el._text !== text) {
    el._text = text;
    el.textContent = text;
  }
}

function setHidden(el, hidden) {
  if (el.hidden !== hidden) el.hidden = hidden;
}

function setAttr(el, name, value) {
  if (el.getAttribute(name) !== value) el.setAttribute(name, value);
}

// ---- the admin API ---------------------------------------------------------------------------

let token = null;

async function api(method, path, body, signal) {
  const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
  const init = { method, headers, cache: "no-store", credentials: "omit", signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(BASE + path, init);
  if (response.status === 401) throw new RefusedError();
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// ---- one breaker's card ----------------------------------------------------------------------

const rows = new Map(); // service -> Row
const template = $("breaker-template");

class Row {
  constructor(service) {
    this.service = service;
    this.view = null;
    this.history = []; // TransitionEvents, newest first
    this.historyRev = 0; // bumps when `history` changes
    this.historyShown = null; // what the list shows: `${historyRev}|${open}`
    this.historyWanted = false; // fetched once, or queued
    this.samples = []; // [{ok, fail, rej}] per refresh
    this.prevCalls = null;
    this.eventAt = 0; // performance.now() of the last event applied
    this.retryAt = null; // Unix seconds when a probe may pass
    this.pending = false;
    this.matches = true;

    const el = template.content.firstElementChild.cloneNode(true);
    this.el = el;
    el.dataset.service = service;
    el.querySelector(".b-name").textContent = service;
    this.badge = el.querySelector(".badge");
    this.tagLocal = el.querySelector(".tag-local");
    this.tagPolicy = el.querySelector(".tag-policy");
    this.rate = el.querySelector(".f-rate");
    this.health = el.querySelector(".f-health");
    this.counts = el.querySelector(".f-counts");
    this.since = el.querySelector(".f-since");
    this.retry = el.querySelector(".f-retry");
    this.manual = el.querySelector(".b-manual");
    this.spark = el.querySelector(".spark");
    this.sparkPaths = el.querySelectorAll(".spark path");
    this.sparkText = el.querySelector(".spark-text");
    this.policy = el.querySelector(".b-policy");
    this.fleet = el.querySelector(".b-fleet");
    this.last = el.querySelector(".b-last");
    this.details = el.querySelector(".b-history");
    this.historyList = el.querySelector(".history");
    this.buttons = el.querySelectorAll("button[data-action]");
    const group = el.querySelector(".b-actions");
    group.setAttribute("aria-label", `Controls for ${service}`);
    for (const button of this.buttons) {
      button.setAttribute("aria-label", `${button.textContent} ${service}`);
    }
    this.details.addEventListener("toggle", () => {
      if (!this.details.open) return;
      this.renderLast(); // what is known now; the fetch brings the rest
      historyLoader.fetch(this, true);
    });
    this.renderSpark();
  }

  apply(view) {
    this.view = view;
    this.retryAt = view.retry_after > 0 ? nowSeconds() + view.retry_after : null;
    this.render();
  }

  sample(calls) {
    if (!calls) return;
    const prev = this.prevCalls;
    this.prevCalls = calls;
    if (!prev) return;
    // Counters restart from zero on a reset or a restart: then the new value is the delta.
    const delta = (key) => {
      const now = calls[key] || 0;
      const before = prev[key] || 0;
      return now >= before ? now - before : now;
    };
    this.samples.push({
      ok: delta("success"),
      fail: delta("failure") + delta("slow"),
      rej: delta("rejected"),
    });
    if (this.samples.length > SPARK_SAMPLES) this.samples.shift();
    this.renderSpark();
  }

  addHistory(event) {
    // One transition can arrive twice: as a live event (this instance's clock, perhaps before
    // the store versioned it) and from the stored history (Redis's clock). Keep the versioned one.
    const twin = this.history.findIndex((known) => sameTransition(known, event));
    if (twin >= 0) {
      if ((event.version || 0) > (this.history[twin].version || 0)) {
        this.history[twin] = event;
        this.historyRev += 1;
      }
      return false;
    }
    this.historyRev += 1;
    this.history.push(event);
    this.history.sort((a, b) => b.at - a.at);
    if (this.history.length > 50) this.history.length = 50;
    return true;
  }

  render() {
    const v = this.view;
    if (!v) return;
    const el = this.el;
    if (el.dataset.state !== v.state) {
      el.dataset.state = v.state;
      this.badge.dataset.state = v.state;
    }
    setText(this.badge, stateWord(v.state));
    setHidden(this.tagLocal, !v.local);
    setHidden(this.tagPolicy, !v.policy_overridden);

    const win = v.window || {};
    const rate = percent(v.failure_rate);
    setText(
      this.rate,
      rate === null
        ? `— (${win.calls ?? 0} of ${v.policy?.min_calls ?? "min"} calls)`
        : `${rate} of ${win.calls ?? 0} calls`,
    );
    // Health: the window's success rate over the target (1 = healthy); and what is shed now.
    const health = typeof v.health === "number" ? v.health.toFixed(2) : "—";
    const shed = percent(v.rejection_probability);
    setText(this.health, v.rejection_probability > 0 ? `${health}, shedding ${shed}` : health);
    this.health.dataset.low = String(typeof v.health === "number" && v.health < 0.8);
    setText(this.counts, `${v.failure_count ?? 0} / ${v.success_count ?? 0}`);
    setText(this.policy, describePolicy(v.policy));

    const m = v.manual;
    setHidden(this.manual, !m);
    if (m) {
      let text = `Manual: ${stateWord(m.mode)}`;
      text += m.until ? `, until ${clock(m.until)} (in ${duration(m.until - nowSeconds())})` : ", until released";
      text += m.reason ? `. Reason: ${m.reason}` : ". No reason given";
      setText(this.manual, text);
    }
    for (const button of this.buttons) {
      const off = this.pending || (button.dataset.action === "release" && !m);
      if (button.disabled !== off) button.disabled = off;
    }
    this.renderLast();
    this.tick(nowSeconds());
  }

  // The transition that led to the current state, if known.
  entered() {
    const v = this.view;
    // The newest transition into the current state (under a manual mode the automatic state
    // machine may have moved since, without changing what is reported).
    const into = this.history.find((event) => event.to === v.state);
    if (into) return into.at;
    if ((v.state === "open" || v.state === "forced_open") && v.opened_at) return v.opened_at;
    return null;
  }

  tick(now) {
    const v = this.view;
    if (!v) return;
    const since = this.entered();
    setText(this.since, since ? duration(now - since) : "—");
    setText(this.retry, this.retryAt ? `${Math.max(1, Math.ceil(this.retryAt - now))} s` : "—");
    if (v.manual && v.manual.until) {
      const text = this.manual._text || "";
      const fresh = text.replace(/\(in [^)]*\)/, `(in ${duration(v.manual.until - now)})`);
      setText(this.manual, fresh);
    }
  }

  renderLast() {
    const e = this.history[0];
    setText(
      this.last,
      e
        ? `Last: ${stateWord(e.from)} → ${stateWord(e.to)} (${e.cause}) at ${clock(e.at)} on ${e.instance}` +
            (e.reason ? `: ${e.reason}` : "")
        : "Last: no transition seen",
    );
    // The list is built only while it is open and only when the history changed.
    const shown = `${this.historyRev}|${this.details.open}`;
    if (!this.details.open || this.historyShown === shown) return;
    this.historyShown = shown;
    const fragment = document.createDocumentFragment();
    for (const event of this.history.slice(0, HISTORY_SHOWN)) {
      const li = document.createElement("li");
      const when = document.createElement("time");
      when.dateTime = new Date(event.at * 1000).toISOString();
      when.textContent = clock(event.at);
      li.append(when, ` ${stateWord(event.from)} → ${stateWord(event.to)}, ${event.cause}`);
      const detail = [`${event.origin} on ${event.instance}`, `v${event.version}`];
      if (typeof event.failure_count === "number") detail.push(`${event.failure_count} failures`);
      if (typeof event.failure_rate === "number") detail.push(`rate ${percent(event.failure_rate)}`);
      li.append(` (${detail.join(", ")})`);
      if (event.reason) {
        const reason = document.createElement("q");
        reason.textContent = event.reason;
        li.append(" ", reason);
      }
      fragment.append(li);
    }
    if (!this.history.length) {
      const li = document.createElement("li");
      li.textContent = "No transition recorded.";
      fragment.append(li);
    }
    this.historyList.replaceChildren(fragment);
  }

  renderSpark() {
    const samples = this.samples;
    const width = 120 / SPARK_SAMPLES;
    const peak = Math.max(1, ...samples.map((s) => s.ok + s.fail + s.rej));
    const paths = ["", "", ""];
    const offset = SPARK_SAMPLES - samples.length;
    let ok = 0;
    let fail = 0;
    let rej = 0;
    samples.forEach((s, i) => {
      ok += s.ok;
      fail += s.fail;
      rej += s.rej;
      let y = 24;
      const x = ((offset + i) * width).toFixed(2);
      [s.ok, s.fail, s.rej].forEach((n, k) => {
        if (!n) return;
        const h = Math.max(1, (n / peak) * 24);
        y -= h;
        paths[k] += `M${x} ${y.toFixed(2)}h${(width * 0.8).toFixed(2)}v${h.toFixed(2)}h-${(width * 0.8).toFixed(2)}z`;
      });
    });
    this.sparkPaths.forEach((path, k) => {
      if (path._d !== paths[k]) {
        path._d = paths[k];
        path.setAttribute("d", paths[k]);
      }
    });
    const span = Math.round((samples.length * REFRESH_MS) / 1000);
    const text = samples.length
      ? `last ${span} s here: ${ok} ok, ${fail} failed, ${rej} rejected`
      : "collecting outcomes…";
    setText(this.sparkText, text);
    if (this.spark._label !== text) {
      this.spark._label = text;
      this.spark.setAttribute("aria-label", `Outcomes of ${this.service}, ${text}`);
    }
  }

  setFleet(text, agrees) {
    setText(this.fleet, text);
    const value = agrees === null ? "unknown" : String(agrees);
    if (this.fleet.dataset.agrees !== value) this.fleet.dataset.agrees = value;
  }

  setPending(pending) {
    this.pending = pending;
    this.el.setAttribute("aria-busy", String(pending));
    this.render();
  }
}

function sameTransition(a, b) {
  if (a.from !== b.from || a.to !== b.to || a.cause !== b.cause) return false;
  if (a.version > 0 && b.version > 0) return a.version === b.version;
  return Math.abs(a.at - b.at) < 3;
}

function ensureRow(service) {
  let row = rows.get(service);
  if (!row) {
    row = new Row(service);
    rows.set(service, row);
    row.matches = matchesFilter(row);
    row.el.hidden = !row.matches;
  }
  return row;
}

// ---- order and filter ------------------------------------------------------------------------

const list = $("breakers");
let layoutQueued = false;
let filterText = "";
let onlyNotClosed = false;

function matchesFilter(row) {
  const state = row.view ? row.view.state : "closed";
  if (onlyNotClosed && state === "closed") return false;
  if (!filterText) return true;
  return (
    row.service.toLowerCase().includes(filterText) ||
    stateWord(state).includes(filterText) ||
    state.includes(filterText)
  );
}

function scheduleLayout() {
  if (layoutQueued) return;
  layoutQueued = true;
  requestAnimationFrame(layout);
}

function layout() {
  layoutQueued = false;
  const ordered = [...rows.values()].sort((a, b) => {
    const ra = STATE_RANK[a.view?.state] ?? STATES.length;
    const rb = STATE_RANK[b.view?.state] ?? STATES.length;
    return ra - rb || (a.service < b.service ? -1 : a.service > b.service ? 1 : 0);
  });
  // Move only the cards that are out of place; keep the focus where the person left it.
  const focused = document.activeElement;
  let cursor = list.firstElementChild;
  for (const row of ordered) {
    if (row.el === cursor) {
      cursor = cursor.nextElementSibling;
    } else {
      list.insertBefore(row.el, cursor);
    }
  }
  if (focused && focused !== document.activeElement && list.contains(focused)) {
    focused.focus({ preventScroll: true });
  }
  let shown = 0;
  for (const row of ordered) {
    row.matches = matchesFilter(row);
    setHidden(row.el, !row.matches);
    if (row.matches) shown += 1;
  }
  setText($("shown-count"), `${shown} of ${rows.size} shown`);
  setHidden($("no-match"), shown > 0 || rows.size === 0);
  renderCounts();
}

function renderCounts() {
  const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const row of rows.values()) {
    if (row.view && row.view.state in counts) counts[row.view.state] += 1;
  }
  const ul = $("state-counts");
  const signature = STATES.map((s) => counts[s]).join(",");
  if (ul._sig === signature) return;
  ul._sig = signature;
  const fragment = document.createDocumentFragment();
  for (const state of STATES) {
    if (!counts[state] && state !== "open" && state !== "closed") continue;
    const li = document.createElement("li");
    li.className = "count";
    if (counts[state]) li.dataset.state = state; // a zero count stays grey
    const n = document.createElement("strong");
    n.textContent = String(counts[state]);
    li.append(n, ` ${stateWord(state)}`);
    fragment.append(li);
  }
  ul.replaceChildren(fragment);
}

let filterTimer = null;
$("filter").addEventListener("input", (event) => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    filterText = event.target.value.trim().toLowerCase();
    scheduleLayout();
  }, 80);
});
// "/" jumps to the filter, as in many consoles; never while typing somewhere else.
document.addEventListener("keydown", (event) => {
  if (event.key !== "/" || event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
  if ($("dashboard").hidden || dialog.open) return;
  event.preventDefault();
  $("filter").focus();
});
$("not-closed").addEventListener("change", (event) => {
  onlyNotClosed = event.target.checked;
  scheduleLayout();
});

// ---- history ---------------------------------------------------------------------------------

const historyLoader = {
  queue: [],
  running: 0,
  limit: 3,

  fetch(row, force = false) {
    if (row.historyWanted && !force) return;
    row.historyWanted = true;
    this.queue.push(row);
    this.pump();
  },

  pump() {
    while (this.running < this.limit && this.queue.length) {
      const row = this.queue.shift();
      this.running += 1;
      api("GET", `/breakers/${enc(row.service)}/history?limit=${HISTORY_SHOWN}`)
        .then((data) => {
          for (const event of data.history || []) row.addHistory(event);
          row.renderLast();
          row.tick(nowSeconds());
        })
        .catch(handleBackgroundError)
        .finally(() => {
          this.running -= 1;
          this.pump();
        });
    }
  },

  clear() {
    this.queue = [];
  },
};

// ---- refresh: breakers and fleet -------------------------------------------------------------

let refreshTimer = null;
let refreshing = false;
let session = 0; // bumps on sign-out so late answers of an old session are dropped
let firstLoad = true;
let lastFleet = null;
let servedBy = null;

async function refresh() {
  if (refreshing || !token) return;
  refreshing = true;
  const mine = session;
  const started = performance.now();
  try {
    const [breakers, fleet] = await Promise.all([api("GET", "/breakers"), api("GET", "/fleet")]);
    if (mine !== session) return;
    applyBreakers(breakers, started);
    applyFleet(fleet);
    setText($("refresh-note"), `Refreshed at ${clock(nowSeconds())}, every ${REFRESH_MS / 1000} s.`);
    $("refresh-note").classList.remove("error");
  } catch (error) {
    if (mine !== session) return;
    if (error instanceof RefusedError) {
      signOut("The gateway refused the token (401): sign in again.");
      return;
    }
    setText($("refresh-note"), `Refresh failed at ${clock(nowSeconds())}: ${error.message}. Retrying.`);
    $("refresh-note").classList.add("error");
  } finally {
    refreshing = false;
    if (mine === session && token) {
      clearTimeout(refreshTimer);
      refreshTimer = setTimeout(refresh, REFRESH_MS);
    }
  }
}

function applyBreakers(data, started) {
  servedBy = data.instance;
  const storeText =
    data.store === "redis"
      ? `store: Redis (${data.store_up === false ? "unreachable" : "connected"})`
      : "store: memory (this instance only)";
  setText($("served-by"), `Seen from instance ${data.instance} · ${storeText}`);
  setHidden($("served-by"), false);
  const warning = $("store-warning");
  setHidden(warning, data.store_up !== false);
  if (data.store_up === false) {
    setText(
      warning,
      `Instance ${data.instance} cannot reach Redis: it decides alone from its own traffic ` +
        "until Redis is back, and the fleet view below may be stale.",
    );
  }
  const seen = new Set();
  const fresh = [];
  for (const view of data.breakers || []) {
    seen.add(view.service);
    const row = rows.get(view.service);
    if (!row) {
      fresh.push(view);
      continue;
    }
    row.sample(view.calls);
    const before = row.view ? row.view.state : null;
    // An event that arrived after this request left is newer than what the request returned.
    if (row.eventAt <= started) {
      row.apply(view);
      // A change that no event told us about: learn its cause from the history.
      if (before !== null && before !== view.state) historyLoader.fetch(row, true);
    }
  }
  for (const [service, row] of rows) {
    if (!seen.has(service)) {
      row.el.remove();
      rows.delete(service);
    }
  }
  addCards(fresh, firstLoad);
  firstLoad = false;
  scheduleLayout();
}

// New cards are built a batch at a time, the not-closed ones first, yielding to the person's
// input between batches: at 1,000 services the page answers while the list fills.
const CARD_BATCH = 100;

function addCards(views, preloadHistory) {
  if (!views.length) return;
  views.sort(
    (a, b) => (STATE_RANK[a.state] ?? STATES.length) - (STATE_RANK[b.state] ?? STATES.length),
  );
  const mine = session;
  let next = 0;
  let preload = 0;
  const batch = () => {
    if (mine !== session) return;
    const added = document.createDocumentFragment(); // one insertion per batch
    for (const view of views.slice(next, next + CARD_BATCH)) {
      if (rows.has(view.service)) continue; // an event made it meanwhile
      const row = ensureRow(view.service);
      row.sample(view.calls);
      row.apply(view);
      updateRowFleet(row);
      added.append(row.el);
      if (preloadHistory && view.state !== "closed" && preload < HISTORY_PRELOAD) {
        preload += 1;
        historyLoader.fetch(row);
      }
    }
    list.append(added);
    next += CARD_BATCH;
    scheduleLayout();
    if (next < views.length) setTimeout(batch, 0);
  };
  batch();
}

function applyFleet(data) {
  lastFleet = data;
  const store = data.store || {};
  const instances = data.instances || [];
  const shared = Object.keys(store).length > 0;
  setText(
    $("fleet-note"),
    shared
      ? `${instances.length} live instance${instances.length === 1 ? "" : "s"}. ` +
          "An instance agrees when it holds the version of every breaker that Redis holds."
      : `${instances.length} instance${instances.length === 1 ? "" : "s"}; no shared store holds breaker state, so there is nothing to agree with.`,
  );
  const tbody = $("fleet-rows");
  const fragment = document.createDocumentFragment();
  const now = nowSeconds();
  for (const instance of instances) {
    const tr = document.createElement("tr");
    tr.dataset.instance = instance.id;
    const breakers = instance.breakers || {};
    const differs = [];
    for (const [service, held] of Object.entries(store)) {
      const own = breakers[service];
      if (!own) differs.push(`${service}: not loaded`);
      else if (own.version < held.version) differs.push(`${service}: behind (v${own.version} < v${held.version})`);
      else if (own.version !== held.version) {
        differs.push(`${service}: v${own.version}, store v${held.version}`);
      }
    }
    const agrees = shared ? differs.length === 0 : null;
    tr.dataset.agrees = agrees === null ? "unknown" : String(agrees);
    const byState = {};
    for (const own of Object.values(breakers)) byState[own.state] = (byState[own.state] || 0) + 1;
    const stale = typeof instance.last_seen === "number" && now - instance.last_seen > 30;
    const cells = [
      instance.id + (instance.id === servedBy ? " (this page)" : ""),
      instance.host ?? "—",
      instance.pid ?? "—",
      clock(instance.started_at),
      typeof instance.last_seen === "number"
        ? `${duration(now - instance.last_seen)} ago${stale ? " (stale)" : ""}`
        : "—",
      agrees === null
        ? "no shared store"
        : agrees
          ? "yes"
          : `no: ${differs.slice(0, 3).join("; ")}${differs.length > 3 ? `; and ${differs.length - 3} more` : ""}`,
      STATES.filter((s) => byState[s])
        .map((s) => `${byState[s]} ${stateWord(s)}`)
        .join(", ") || "none",
    ];
    cells.forEach((text, i) => {
      const cell = document.createElement(i === 0 ? "th" : "td");
      if (i === 0) cell.scope = "row";
      cell.textContent = String(text);
      if (i === 5) cell.className = agrees === false ? "disagrees" : "agrees";
      if (i === 4 && stale) cell.className = "disagrees";
      tr.append(cell);
    });
    fragment.append(tr);
  }
  const signature = JSON.stringify([servedBy, instances, store, Math.floor(now)]);
  if (tbody._sig !== signature) {
    tbody._sig = signature;
    tbody.replaceChildren(fragment);
  }
  for (const row of rows.values()) updateRowFleet(row);
}

function updateRowFleet(row) {
  if (!lastFleet) return;
  const instances = lastFleet.instances || [];
  const held = (lastFleet.store || {})[row.service];
  const states = {};
  let agreeing = 0;
  let reporting = 0;
  for (const instance of instances) {
    const own = (instance.breakers || {})[row.service];
    if (!own) continue;
    reporting += 1;
    states[own.state] = (states[own.state] || 0) + 1;
    if (held && own.version === held.version) agreeing += 1;
  }
  const spread = STATES.filter((s) => states[s])
    .map((s) => `${states[s]} ${stateWord(s)}`)
    .join(", ");
  if (!held) {
    row.setFleet(
      reporting ? `Fleet: ${spread} (${reporting} of ${instances.length} instances)` : "Fleet: not reported yet",
      null,
    );
    return;
  }
  const others = [];
  for (const instance of instances) {
    const own = (instance.breakers || {})[row.service];
    if (!own) others.push(`${instance.id} not reporting`);
    else if (own.version !== held.version) {
      others.push(`${instance.id} ${stateWord(own.state)} v${own.version}`);
    }
  }
  const agreed = agreeing === instances.length;
  row.setFleet(
    agreed
      ? `Fleet: all ${instances.length} instance${instances.length === 1 ? "" : "s"} agree with the store (v${held.version}): ${spread}`
      : `Fleet: ${agreeing} of ${instances.length} agree with the store (v${held.version}); ${others.slice(0, 3).join(", ")}${others.length > 3 ? `, and ${others.length - 3} more` : ""}`,
    agreed,
  );
}

// ---- the event stream ------------------------------------------------------------------------

const conn = {
  el: $("conn"),
  text: $("conn-text"),
  set(state, text) {
    if (this.el.dataset.conn !== state) this.el.dataset.conn = state;
    setText(this.text, text);
  },
};

class EventStream {
  constructor() {
    this.lastId = null;
    this.controller = null;
    this.timer = null;
    this.countdown = null;
    this.watchdog = null;
    this.attempt = 0;
    this.retryMs = 0;
    this.running = false;
    this.everConnected = false;
  }

  start() {
    this.running = true;
    this.connect();
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
    clearInterval(this.countdown);
    clearTimeout(this.watchdog);
    if (this.controller) this.controller.abort();
    this.controller = null;
    this.lastId = null;
    this.attempt = 0;
    this.everConnected = false;
  }

  async connect() {
    if (!this.running) return;
    conn.set(this.everConnected ? "reconnecting" : "connecting", this.everConnected ? "reconnecting…" : "connecting…");
    const controller = new AbortController();
    this.controller = controller;
    const headers = { Authorization: `Bearer ${token}`, Accept: "text/event-stream" };
    if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
    let failure = "the stream ended";
    try {
      const response = await fetch(BASE + "/events", {
        headers,
        cache: "no-store",
        credentials: "omit",
        signal: controller.signal,
      });
      if (response.status === 401) {
        signOut("The gateway refused the token (401): sign in again.");
        return;
      }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      const caughtUp = this.everConnected;
      this.everConnected = true;
      this.attempt = 0;
      conn.set("live", "live");
      // Events replayed after Last-Event-ID arrive first; a refresh covers anything older.
      if (caughtUp) refresh();
      await this.read(response.body.getReader(), controller);
    } catch (error) {
      if (!this.running || controller !== this.controller) return;
      failure = error.name === "AbortError" ? "no data for too long" : error.message;
    } finally {
      clearTimeout(this.watchdog);
    }
    if (!this.running || controller !== this.controller) return;
    this.scheduleReconnect(failure);
  }

  scheduleReconnect(why) {
    const base = Math.min(BACKOFF_MAX_MS, Math.max(this.retryMs, BACKOFF_FIRST_MS * 2 ** this.attempt));
    const delay = Math.round(base * (0.5 + Math.random() * 0.5));
    this.attempt += 1;
    const until = performance.now() + delay;
    const show = () => {
      const left = Math.max(1, Math.ceil((until - performance.now()) / 1000));
      conn.set("disconnected", `disconnected (${why}); reconnecting in ${left} s`);
    };
    show();
    clearInterval(this.countdown);
    this.countdown = setInterval(show, 1000);
    this.timer = setTimeout(() => {
      clearInterval(this.countdown);
      this.connect();
    }, delay);
  }

  armWatchdog(controller) {
    clearTimeout(this.watchdog);
    this.watchdog = setTimeout(() => controller.abort(), STREAM_SILENCE_MS);
  }

  async read(reader, controller) {
    const decoder = new TextDecoder();
    const parser = new SseParser((event) => this.dispatch(event));
    this.armWatchdog(controller);
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      this.armWatchdog(controller);
      parser.feed(decoder.decode(value, { stream: true }));
    }
    parser.feed(decoder.decode());
    parser.end();
  }

  dispatch(event) {
    if (event.id !== null) this.lastId = event.id;
    if (event.retry !== null) this.retryMs = event.retry;
    if (event.type !== "transition") return;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      console.warn("gateway-breaker dashboard: an event whose data is not JSON was ignored");
      return;
    }
    onTransition(data);
  }
}

// A parser of the text/event-stream format (the HTML standard's rules): lines end with CRLF, LF
// or CR; a blank line dispatches; comments start with ':'; fields are data, event, id and retry.
class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.data = [];
    this.type = "";
    this.id = null;
    this.retry = null;
  }

  feed(text) {
    this.buffer += text;
    let start = 0;
    for (;;) {
      let end = -1;
      let next = -1;
      for (let i = start; i < this.buffer.length; i += 1) {
        const c = this.buffer.charCodeAt(i);
        if (c === 10) {
          end = i;
          next = i + 1;
          break;
        }
        if (c === 13) {
          if (i + 1 === this.buffer.length) break; // a CR at the end may be the start of CRLF
          end = i;
          next = this.buffer.charCodeAt(i + 1) === 10 ? i + 2 : i + 1;
          break;
        }
      }
      if (end < 0) break;
      this.line(this.buffer.slice(start, end));
      start = next;
    }
    this.buffer = this.buffer.slice(start);
  }

  end() {
    if (this.buffer.endsWith("\r")) this.line(this.buffer.slice(0, -1));
    this.buffer = "";
    // An event not followed by a blank line is dropped, as the standard says.
  }

  line(line) {
    if (line === "") {
      if (this.data.length) {
        this.onEvent({
          type: this.type || "message",
          data: this.data.join("\n"),
          id: this.id,
          retry: this.retry,
        });
      } else if (this.id !== null || this.retry !== null) {
        this.onEvent({ type: "", data: "", id: this.id, retry: this.retry });
      }
      this.data = [];
      this.type = "";
      this.id = null;
      this.retry = null;
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }
}

const stream = new EventStream();

function onTransition(event) {
  if (!event || typeof event.service !== "string") return;
  const isNew = !rows.has(event.service);
  const row = ensureRow(event.service);
  if (isNew) list.append(row.el);
  row.addHistory(event);
  if (event.breaker && typeof event.breaker === "object") {
    row.eventAt = performance.now();
    row.apply(event.breaker);
  } else {
    row.renderLast();
  }
  row.el.classList.remove("changed");
  // Restart the highlight animation of a card that just changed.
  void row.el.offsetWidth;
  row.el.classList.add("changed");
  scheduleLayout();
}

// ---- controls and the confirmation dialog ----------------------------------------------------

const dialog = $("confirm");
const notice = $("notice");
let noticeTimer = null;

function say(text, isError = false) {
  notice.textContent = text;
  notice.classList.toggle("error", isError);
  notice.setAttribute("role", isError ? "alert" : "status");
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    notice.textContent = "";
  }, isError ? 20000 : 8000);
}

function askConfirm(action, service) {
  const spec = ACTIONS[action];
  setText($("confirm-title"), spec.title(service));
  setText($("confirm-text"), spec.text(service));
  setText($("confirm-ok"), spec.ok);
  $("confirm-ok").dataset.action = action;
  $("confirm-inputs").hidden = !spec.inputs;
  const seconds = $("confirm-seconds");
  const reason = $("confirm-reason");
  seconds.value = "";
  reason.value = "";
  seconds.disabled = reason.disabled = !spec.inputs;
  dialog.returnValue = "";
  dialog.dataset.action = action;
  dialog.dataset.service = service;
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        if (dialog.returnValue !== "confirm") {
          resolve(null);
          return;
        }
        const raw = seconds.value.trim();
        resolve({ seconds: raw === "" ? null : Number(raw), reason: reason.value.trim() });
      },
      { once: true },
    );
    dialog.showModal();
    (spec.inputs ? seconds : $("confirm-cancel")).focus();
  });
}

$("confirm-cancel").addEventListener("click", () => dialog.close("cancel"));

list.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button || !list.contains(button)) return;
  const card = button.closest("[data-service]");
  const row = rows.get(card.dataset.service);
  const action = button.dataset.action;
  if (!row || !(action in ACTIONS) || row.pending) return;
  const input = await askConfirm(action, row.service);
  if (!input) return;
  const [method, path, body] = ACTIONS[action].call(row.service, input);
  row.setPending(true);
  try {
    const view = await api(method, path, body);
    row.eventAt = performance.now();
    if (view && view.service === row.service) row.apply(view);
    historyLoader.fetch(row, true);
    say(`${row.service}: ${ACTIONS[action].done} for the fleet.`);
    scheduleLayout();
  } catch (error) {
    if (error instanceof RefusedError) {
      signOut("The gateway refused the token (401): sign in again.");
      return;
    }
    say(`${row.service}: ${ACTIONS[action].ok} failed: ${error.message}`, true);
  } finally {
    row.setPending(false);
    if (document.activeElement === document.body) button.focus({ preventScroll: true });
  }
});

function handleBackgroundError(error) {
  if (error instanceof RefusedError) signOut("The gateway refused the token (401): sign in again.");
  // Other failures of background fetches show up through the periodic refresh's note.
}

// ---- signing in and out ----------------------------------------------------------------------

let ticker = null;

function showDashboard() {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("sign-out").hidden = false;
  stream.start();
  refresh();
  ticker = setInterval(() => {
    const now = nowSeconds();
    for (const row of rows.values()) if (row.matches) row.tick(now);
  }, 1000);
}

function signOut(message = "") {
  session += 1;
  token = null;
  stream.stop();
  historyLoader.clear();
  clearTimeout(refreshTimer);
  clearInterval(ticker);
  for (const row of rows.values()) row.el.remove();
  rows.clear();
  lastFleet = null;
  firstLoad = true;
  $("fleet-rows").replaceChildren();
  $("fleet-rows")._sig = null;
  $("state-counts")._sig = null;
  if (dialog.open) dialog.close("cancel");
  $("dashboard").hidden = true;
  $("sign-out").hidden = true;
  $("served-by").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  conn.set(message ? "refused" : "signed-out", message ? "token refused" : "signed out");
  $("token").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const field = $("token");
  const candidate = field.value.trim();
  const error = $("login-error");
  if (!candidate) {
    error.textContent = "Enter the admin token.";
    field.focus();
    return;
  }
  const submit = $("login-submit");
  submit.disabled = true;
  error.textContent = "";
  token = candidate;
  try {
    await api("GET", "/breakers");
  } catch (failure) {
    token = null;
    submit.disabled = false;
    if (failure instanceof RefusedError) {
      error.textContent = "Refused: the gateway did not accept this token (401).";
      conn.set("refused", "token refused");
    } else {
      error.textContent = `Could not reach the admin API: ${failure.message}`;
    }
    field.select();
    return;
  }
  submit.disabled = false;
  field.value = "";
  showDashboard();
});

$("sign-out").addEventListener("click", () => signOut());

$("token").focus();
