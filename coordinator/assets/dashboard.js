// Skald's dashboard: plain JavaScript over the coordinator's JSON API.
// Every value from the API goes into the page through text nodes and
// attributes set one by one (see `h`), never parsed as HTML.
"use strict";

const TOKEN_KEY = "skald.adminToken";
const STATUSES = ["RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "STUCK"];
const $ = (id) => document.getElementById(id);

// ---------- DOM ----------

/** Creates an element; children are nodes or text (never HTML). */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function show(...nodes) {
  $("view").replaceChildren(...nodes);
}

function badge(value) {
  return h("span", { class: "badge " + String(value) }, value);
}

function sagaLink(id) {
  return h("a", { href: "#/saga/" + encodeURIComponent(id), class: "mono" }, id);
}

function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

function fmtDuration(fromIso, toIso) {
  if (!fromIso || !toIso) return "";
  const ms = new Date(toIso) - new Date(fromIso);
  if (!Number.isFinite(ms)) return "";
  return ms < 10000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function json(value) {
  return h("pre", {}, JSON.stringify(value, null, 2));
}

// ---------- notices ----------

let noticeTimer = null;
function notify(kind, text) {
  const n = $("notice");
  n.className = "notice " + kind;
  n.textContent = text;
  n.hidden = false;
  clearTimeout(noticeTimer);
  if (kind === "ok") noticeTimer = setTimeout(() => { n.hidden = true; }, 6000);
}

// ---------- API ----------

class ApiError extends Error {
  constructor(status, body) {
    const msg = body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${status}`;
    super(msg);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options) {
  const resp = await fetch(path, Object.assign({ headers: { Accept: "application/json" } }, options));
  const body = await resp.json().catch(() => null);
  if (!resp.ok) throw new ApiError(resp.status, body);
  return body;
}

function failure(err) {
  return h("div", { class: "notice error" }, "Could not load: ", err.message || String(err));
}

// ---------- the admin token ----------

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function renderTokenState() {
  const has = Boolean(token());
  $("token-state").textContent = has ? "admin token set (this tab)" : "no admin token";
  $("token-forget").hidden = !has;
}

/** Asks for the token in a dialog; resolves to it, or null if cancelled. */
function askToken() {
  const dialog = $("token-dialog");
  const input = $("token-input");
  input.value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      $("token-ok").onclick = null;
      $("token-cancel").onclick = null;
      input.onkeydown = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    $("token-ok").onclick = () => done(input.value.trim() || null);
    $("token-cancel").onclick = () => done(null);
    input.onkeydown = (e) => { if (e.key === "Enter") done(input.value.trim() || null); };
    dialog.onclose = () => done(null);
    dialog.showModal();
    input.focus();
  });
}

/** POSTs an operator action with the bearer token; asks for it once. */
async function operatorAction(path, what) {
  let t = token();
  if (!t) {
    t = await askToken();
    if (!t) return null;
    sessionStorage.setItem(TOKEN_KEY, t);
    renderTokenState();
  }
  const resp = await fetch(path, { method: "POST", headers: { Authorization: "Bearer " + t, Accept: "application/json" } });
  const body = await resp.json().catch(() => null);
  if (resp.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    renderTokenState();
    notify("error", `401 Unauthorized: the coordinator refused the admin token. ${what} was not done; enter the token again.`);
    return null;
  }
  if (resp.status === 403) {
    notify("error", `403 Forbidden: operator actions are disabled on this coordinator (ADMIN_TOKEN is not set). ${what} was not done.`);
    return null;
  }
  if (!resp.ok) {
    const detail = body && body.error ? body.error.message : "";
    notify("error", `${resp.status}: ${what} failed. ${detail}`);
    return null;
  }
  notify("ok", `${what}: done.`);
  return body;
}

// ---------- counters ----------

async function renderCounters() {
  try {
    const stats = await api("/v1/stats");
    const boxes = STATUSES.map((s) => {
      const n = stats.by_status[s] ?? 0;
      return h("a", { class: `counter ${s.toLowerCase()}${n ? " nonzero" : ""}`, href: "#/?status=" + s, "data-status": s },
        h("span", { class: "n" }, n), h("span", { class: "label" }, s));
    });
    boxes.push(h("a", { class: "counter", href: "#/" }, h("span", { class: "n" }, stats.total), h("span", { class: "label" }, "ALL")));
    $("counters").replaceChildren(...boxes);
    knownTypes = stats.saga_types;
  } catch (err) {
    $("counters").replaceChildren(failure(err));
  }
}

let knownTypes = [];

// ---------- saga list ----------

function toIso(local) {
  if (!local) return "";
  const d = new Date(local);
  return Number.isNaN(d.getTime()) ? "" : d.toISOString();
}

function toLocalInput(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

async function renderSagas(params) {
  const filters = {
    status: params.get("status") || "",
    saga_type: params.get("saga_type") || "",
    created_after: params.get("created_after") || "",
    created_before: params.get("created_before") || "",
    limit: params.get("limit") || "25",
  };
  const cursors = (params.get("cursors") || "").split(",").filter(Boolean);
  const query = new URLSearchParams({ order: "desc" });
  for (const [k, v] of Object.entries(filters)) if (v) query.set(k, v);
  if (cursors.length) query.set("after", cursors[cursors.length - 1]);

  const statusSel = h("select", { id: "f-status" }, h("option", { value: "" }, "any"),
    STATUSES.map((s) => h("option", { value: s, selected: s === filters.status }, s)));
  const typeSel = h("select", { id: "f-type" }, h("option", { value: "" }, "any"),
    knownTypes.map((t) => h("option", { value: t, selected: t === filters.saga_type }, t)));
  const from = h("input", { id: "f-from", type: "datetime-local", value: toLocalInput(filters.created_after) });
  const to = h("input", { id: "f-to", type: "datetime-local", value: toLocalInput(filters.created_before) });
  const limit = h("select", { id: "f-limit" }, ["10", "25", "50", "100"].map((n) => h("option", { value: n, selected: n === filters.limit }, n)));
  const apply = (extra) => {
    const next = new URLSearchParams();
    const set = (k, v) => { if (v) next.set(k, v); };
    set("status", statusSel.value);
    set("saga_type", typeSel.value);
    set("created_after", toIso(from.value));
    set("created_before", toIso(to.value));
    set("limit", limit.value);
    for (const [k, v] of Object.entries(extra || {})) set(k, v);
    location.hash = "#/?" + next.toString();
  };
  const filterBar = h("div", { class: "filters" },
    h("label", {}, "Status", statusSel), h("label", {}, "Type", typeSel),
    h("label", {}, "Created from", from), h("label", {}, "Created before", to),
    h("label", {}, "Per page", limit),
    h("button", { type: "button", class: "primary", onclick: () => apply() }, "Apply"),
    h("button", { type: "button", onclick: () => { location.hash = "#/"; } }, "Clear"));

  const card = h("div", { class: "card" }, h("h2", {}, "Sagas ", h("span", { class: "muted" }, "newest first")), filterBar,
    h("p", { class: "muted" }, "Loading…"));
  show(card);
  let page;
  try {
    page = await api("/v1/sagas?" + query.toString());
  } catch (err) {
    card.lastChild.replaceWith(failure(err));
    return;
  }
  const rows = page.sagas.map((s) => h("tr", { "data-saga": s.saga_id },
    h("td", {}, sagaLink(s.saga_id)), h("td", {}, s.saga_type), h("td", {}, badge(s.status)),
    h("td", {}, s.current_step || ""), h("td", { class: "time" }, fmtTime(s.created_at)), h("td", { class: "time" }, fmtTime(s.finished_at)),
    h("td", { class: "error-text" }, s.failure || "")));
  const table = rows.length
    ? h("table", { id: "saga-table" }, h("thead", {}, h("tr", {}, ["Saga", "Type", "Status", "Step", "Created", "Finished", "Failure"].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows))
    : h("p", { class: "muted" }, "No saga matches.");
  const pager = h("div", { class: "row" },
    h("button", { type: "button", disabled: cursors.length === 0, onclick: () => apply({ cursors: cursors.slice(0, -1).join(",") }) }, "← Newer"),
    h("span", { class: "muted" }, `page ${cursors.length + 1}`),
    h("button", { type: "button", disabled: !page.next, onclick: () => apply({ cursors: cursors.concat([page.next]).join(",") }) }, "Older →"));
  card.lastChild.replaceWith(h("div", {}, table, pager));
}

// ---------- one saga ----------

function outcomeText(a) {
  if (!a.outcome) return a.finished_at ? "" : "in flight";
  if (a.outcome.result === "failed") return `failed (${a.outcome.retryable ? "retryable" : "final"}): ${a.outcome.reason}`;
  return a.outcome.result.replace("_", " ");
}

function timeline(saga) {
  const events = [];
  for (const step of saga.steps) {
    for (const a of step.attempts) events.push({ step: step.name, kind: "action", a });
    for (const a of step.compensations) events.push({ step: step.name, kind: "compensation", a });
  }
  events.sort((x, y) => new Date(x.a.sent_at) - new Date(y.a.sent_at));
  if (!events.length) return h("p", { class: "muted" }, "No attempt yet.");
  return h("ol", { class: "timeline" }, events.map(({ step, kind, a }) => {
    const bad = a.outcome && a.outcome.result !== "succeeded";
    return h("li", { class: kind + (bad ? " bad" : "") },
      h("div", {}, h("span", { class: "when" }, fmtTime(a.sent_at)), " ", h("strong", {}, step), " ",
        h("span", { class: "muted" }, `${kind} #${a.number}`), " ",
        a.outcome ? badge(a.outcome.result) : badge("running")),
      h("div", { class: bad ? "error-text" : "muted" }, outcomeText(a),
        a.finished_at ? ` — ${fmtDuration(a.sent_at, a.finished_at)}` : ` — deadline ${fmtTime(a.deadline)}`));
  }));
}

async function renderSaga(id) {
  show(h("p", { class: "muted" }, "Loading…"));
  let saga;
  try {
    saga = await api("/v1/sagas/" + encodeURIComponent(id));
  } catch (err) {
    show(failure(err));
    return;
  }
  const act = async (action, what) => {
    const updated = await operatorAction(`/v1/sagas/${encodeURIComponent(id)}/${action}`, what);
    if (updated) { renderCounters(); renderSaga(id); }
  };
  const actions = h("div", { class: "row" },
    h("button", { type: "button", id: "retry", class: "primary", disabled: saga.status !== "STUCK", title: "Resume the compensation of a STUCK saga",
      onclick: () => act("retry", "Retry") }, "Retry"),
    h("button", { type: "button", id: "abort", class: "danger", disabled: saga.status !== "RUNNING", title: "Abort a RUNNING saga: it compensates",
      onclick: () => { if (confirm("Abort this saga? It will compensate what may have run.")) act("abort", "Abort"); } }, "Abort"),
    h("button", { type: "button", onclick: () => renderSaga(id) }, "Refresh"));
  const head = h("div", { class: "card" },
    h("div", { class: "row" }, h("h2", {}, "Saga ", h("span", { class: "mono" }, saga.saga_id)), h("span", { id: "saga-status" }, badge(saga.status)),
      h("span", { class: "spacer" }), actions),
    h("dl", { class: "kv" },
      h("dt", {}, "Type"), h("dd", {}, saga.saga_type),
      h("dt", {}, "Created"), h("dd", {}, fmtTime(saga.created_at)),
      h("dt", {}, "Updated"), h("dd", {}, fmtTime(saga.updated_at)),
      h("dt", {}, "Finished"), h("dd", {}, fmtTime(saga.finished_at), saga.finished_at ? ` (${fmtDuration(saga.created_at, saga.finished_at)})` : ""),
      h("dt", {}, "Next wake-up"), h("dd", {}, fmtTime(saga.wake_at)),
      h("dt", {}, "Failure"), h("dd", { class: saga.failure ? "error-text" : "" }, saga.failure || "—")));
  const steps = h("div", { class: "card" }, h("h3", {}, "Steps"),
    h("table", {}, h("thead", {}, h("tr", {}, ["#", "Step", "Status", "Actions", "Compensations", "May have run", "Reply data"].map((c) => h("th", {}, c)))),
      h("tbody", {}, saga.steps.map((s, i) => h("tr", {},
        h("td", {}, i + 1), h("td", {}, h("strong", {}, s.name)), h("td", {}, badge(s.status)),
        h("td", { class: "num" }, s.attempts.length), h("td", { class: "num" }, s.compensations.length),
        h("td", {}, s.may_have_run ? "yes" : "no"),
        h("td", {}, s.data === undefined || s.data === null ? "" : h("details", {}, h("summary", {}, "show"), json(s.data))))))));
  const events = h("div", { class: "card" }, h("h3", {}, "Timeline (every attempt, oldest first)"), timeline(saga));
  const payload = h("div", { class: "card" }, h("h3", {}, "Payload (sent with every command)"), json(saga.payload));
  // On demand: browsing the dead-letter queue holds its letters for a moment.
  const letters = h("div", { class: "card", id: "saga-dead-letters" }, h("h3", {}, "Dead letters of this saga"),
    h("button", { type: "button", onclick: () => findLetters() }, "Search the dead-letter queue"));
  const findLetters = async () => {
    letters.lastChild.replaceWith(h("p", { class: "muted" }, "Searching…"));
    try {
      const dl = await api("/v1/dead-letters?limit=500");
      const mine = dl.dead_letters.filter((l) => l.correlation_id === saga.saga_id);
      letters.lastChild.replaceWith(mine.length ? deadLetterTable(mine) : h("p", { class: "muted" }, "None."));
    } catch (err) {
      letters.lastChild.replaceWith(failure(err));
    }
  };
  show(head, steps, events, payload, letters);
  if (saga.status === "RUNNING" || saga.status === "COMPENSATING") scheduleRefresh(() => renderSaga(id), 2000);
}

// ---------- needs an operator ----------

async function renderAttention() {
  const card = h("div", { class: "card" }, h("h2", {}, "Needs an operator"), h("p", { class: "muted" }, "Loading…"));
  show(card);
  let stuck, running;
  try {
    [stuck, running] = await Promise.all([api("/v1/sagas?status=STUCK&order=desc&limit=100"), api("/v1/sagas?status=RUNNING&limit=100")]);
  } catch (err) {
    card.lastChild.replaceWith(failure(err));
    return;
  }
  const act = async (id, action, what) => {
    const updated = await operatorAction(`/v1/sagas/${encodeURIComponent(id)}/${action}`, what);
    if (updated) { renderCounters(); renderAttention(); }
  };
  const stuckTable = stuck.sagas.length
    ? h("table", { id: "stuck-table" }, h("thead", {}, h("tr", {}, ["Saga", "Type", "Status", "Failure", "Since", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, stuck.sagas.map((s) => h("tr", { "data-saga": s.saga_id },
        h("td", {}, sagaLink(s.saga_id)), h("td", {}, s.saga_type), h("td", {}, badge(s.status)),
        h("td", { class: "error-text" }, s.failure || ""), h("td", {}, fmtTime(s.finished_at)),
        h("td", {}, h("button", { type: "button", class: "primary", onclick: () => act(s.saga_id, "retry", "Retry") }, "Retry"))))))
    : h("p", { class: "muted" }, "No STUCK saga.");
  const cutoff = Date.now() - 60_000;
  const old = running.sagas.filter((s) => new Date(s.created_at).getTime() < cutoff);
  const runningTable = old.length
    ? h("table", {}, h("thead", {}, h("tr", {}, ["Saga", "Type", "Step", "Created", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, old.map((s) => h("tr", {},
        h("td", {}, sagaLink(s.saga_id)), h("td", {}, s.saga_type), h("td", {}, s.current_step || ""), h("td", {}, fmtTime(s.created_at)),
        h("td", {}, h("button", { type: "button", class: "danger",
          onclick: () => { if (confirm("Abort this saga? It will compensate what may have run.")) act(s.saga_id, "abort", "Abort"); } }, "Abort"))))))
    : h("p", { class: "muted" }, "No saga has been RUNNING for more than a minute.");
  card.lastChild.replaceWith(h("div", {},
    h("h3", {}, "STUCK: a compensation kept failing"),
    h("p", { class: "muted" }, "Fix the cause (is the participant up? see Participants), then Retry: the compensation resumes."),
    stuckTable,
    h("h3", {}, "RUNNING for more than a minute"),
    h("p", { class: "muted" }, "Abort applies to RUNNING sagas only: the saga compensates what may have run."),
    runningTable));
}

// ---------- dead letters ----------

function deadLetterTable(letters) {
  return h("table", { id: "dead-letter-table" },
    h("thead", {}, h("tr", {}, ["Message", "Type", "Reason", "From queue", "Saga", "Time", "Body", ""].map((c) => h("th", {}, c)))),
    h("tbody", {}, letters.map((l) => h("tr", { "data-message": l.message_id },
      h("td", { class: "mono" }, l.message_id || "—"), h("td", {}, l.message_type), h("td", { class: "error-text" }, l.reason),
      h("td", {}, l.original_queue), h("td", {}, l.correlation_id && !/^0{8}-/.test(l.correlation_id) ? sagaLink(l.correlation_id) : "—"),
      h("td", {}, fmtTime(l.timestamp)),
      h("td", {}, h("details", {}, h("summary", {}, l.body_truncated ? "show (truncated)" : "show"), h("pre", {}, l.body))),
      h("td", {}, h("button", { type: "button", class: "primary", disabled: !(l.original_exchange && l.original_routing_key) || !l.message_id,
        title: "Send it again to where it was first published", onclick: () => replay(l.message_id) }, "Replay"))))));
}

async function replay(messageId) {
  const done = await operatorAction(`/v1/dead-letters/${encodeURIComponent(messageId)}/replay`, `Replay of ${messageId}`);
  if (done) render();
}

async function renderDeadLetters() {
  const card = h("div", { class: "card" },
    h("div", { class: "row" }, h("h2", {}, "Dead letters"), h("span", { class: "spacer" }), h("button", { type: "button", onclick: () => render() }, "Refresh")),
    h("p", { class: "muted" }, "Messages that could not be processed, oldest first. Listing them consumes nothing."),
    h("p", { class: "muted" }, "Loading…"));
  show(card);
  try {
    const dl = await api("/v1/dead-letters?limit=200");
    card.lastChild.replaceWith(h("div", {},
      dl.dead_letters.length ? deadLetterTable(dl.dead_letters) : h("p", { class: "muted" }, "The dead-letter queue is empty."),
      dl.truncated ? h("p", { class: "muted" }, "More letters are queued than shown (200).") : null));
  } catch (err) {
    card.lastChild.replaceWith(failure(err));
  }
}

// ---------- participants ----------

async function renderParticipants() {
  const card = h("div", { class: "card" },
    h("div", { class: "row" }, h("h2", {}, "Participants"), h("span", { class: "spacer" }), h("button", { type: "button", onclick: () => render() }, "Refresh")),
    h("p", { class: "muted" }, "Loading…"));
  show(card);
  try {
    const r = await api("/v1/participants");
    const source = r.source === "management_api"
      ? "From RabbitMQ's management API (refreshed by the broker every few seconds)."
      : `Over AMQP (passive declares): unacknowledged counts are unknown. Management API not used: ${r.management_error || "unknown reason"}`;
    card.lastChild.replaceWith(h("div", {},
      h("p", { class: "muted" }, source),
      h("table", { id: "participants-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "Participant"), h("th", {}, "Queue"), h("th", { class: "num" }, "Consumers"),
          h("th", { class: "num" }, "Backlog (ready)"), h("th", { class: "num" }, "Unacked"), h("th", {}, ""))),
        h("tbody", {}, r.queues.map((q) => h("tr", { "data-queue": q.queue },
          h("td", {}, h("strong", {}, q.participant)), h("td", { class: "mono" }, q.queue),
          h("td", { class: "num" }, q.consumers), h("td", { class: "num" }, q.ready),
          h("td", { class: "num" }, q.unacked === null || q.unacked === undefined ? "?" : q.unacked),
          h("td", {}, q.consumers === 0 ? h("span", { class: "badge STUCK" }, "no consumer") : h("span", { class: "badge COMPLETED" }, "served"))))))));
  } catch (err) {
    card.lastChild.replaceWith(failure(err));
  }
}

// ---------- routing ----------

let refreshTimer = null;
function scheduleRefresh(fn, ms) {
  clearTimeout(refreshTimer);
  const route = location.hash;
  refreshTimer = setTimeout(() => {
    if (location.hash !== route) return;
    renderCounters();
    fn();
  }, ms);
}

function render() {
  clearTimeout(refreshTimer);
  renderCounters();
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, qs] = hash.split("?");
  const params = new URLSearchParams(qs || "");
  let view = "sagas";
  if (path.startsWith("/saga/")) {
    view = "saga";
    renderSaga(decodeURIComponent(path.slice("/saga/".length)));
  } else if (path === "/attention") {
    view = "attention";
    renderAttention();
  } else if (path === "/dead-letters") {
    view = "dead-letters";
    renderDeadLetters();
  } else if (path === "/participants") {
    view = "participants";
    renderParticipants();
  } else {
    renderSagas(params);
  }
  for (const a of document.querySelectorAll("nav a[data-view]")) {
    a.classList.toggle("current", a.dataset.view === view);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    renderTokenState();
    notify("ok", "Admin token forgotten.");
  });
  renderTokenState();
  await renderCounters();
  setInterval(renderCounters, 5000);
  window.addEventListener("hashchange", render);
  render();
});
