// The Archive Console page: plain JavaScript against the console API (no build step).
"use strict";

const state = { token: sessionStorage.getItem("archive-kms-token"), me: null, timer: null };
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.detail || `${resp.status}`);
  return data;
}

function say(text) { $("#message").textContent = text; }
const can = (perm) => state.me && state.me.permissions.includes(perm);

async function signIn(token) {
  state.token = token;
  try {
    state.me = await api("GET", "/api/me");
  } catch (e) {
    state.token = null;
    $("#login-error").textContent = `Sign-in refused: ${e.message}`;
    return;
  }
  sessionStorage.setItem("archive-kms-token", token);
  $("#login").hidden = true;
  $("#console").hidden = false;
  $("#who").textContent = `${state.me.subject} · ${state.me.role}` + (state.me.tenant ? ` · ${state.me.tenant}` : "");
  document.body.dataset.role = state.me.role;
  await refresh();
  state.timer = setInterval(refresh, 2000);
}

function signOut() {
  sessionStorage.removeItem("archive-kms-token");
  clearInterval(state.timer);
  location.reload();
}

async function refresh() {
  try {
    const [tenants, warnings, runs, approvals] = await Promise.all([
      api("GET", "/api/tenants"), api("GET", "/api/warnings"), api("GET", "/api/runs?limit=20"),
      api("GET", "/api/approvals?limit=20"),
    ]);
    renderTenants(tenants); renderWarnings(warnings); renderRuns(runs); renderApprovals(approvals);
  } catch (e) { say(`Refresh failed: ${e.message}`); }
}

function renderTenants(tenants) {
  const body = $("#tenants tbody");
  body.replaceChildren(...tenants.map((t) => {
    const buttons = el("td");
    if (t.actions.includes("enable") && t.key_mode === "managed")
      buttons.append(el("button", { class: "key-action", "data-action": "enable", onclick: () => openEnable(t.tenant) }, "Enable own key"));
    if (t.actions.includes("remove") && t.key_mode !== "managed")
      buttons.append(el("button", { class: "key-action", "data-action": "remove", onclick: () => openRemove(t.tenant) }, "Remove own key"));
    return el("tr", { "data-tenant": t.tenant },
      el("td", {}, t.tenant), el("td", {}, t.key_mode),
      el("td", { class: `state-${t.key_state.state}` }, t.key_state.state + (t.key_state.detail ? ` (${t.key_state.detail})` : "")),
      el("td", {}, t.location), el("td", {}, `${t.gate.state}, ${t.gate.pending} queued`),
      el("td", {}, t.active_run || "-"), buttons);
  }));
}

function renderWarnings(warnings) {
  const list = $("#warnings");
  if (!warnings.length) { list.replaceChildren(el("li", { class: "none" }, "No warnings.")); return; }
  list.replaceChildren(...warnings.map((w) => {
    const item = el("li", { class: `sev-${w.severity}`, "data-kind": w.kind, "data-warning": w.id },
      el("strong", {}, `${w.tenant}: `), w.message, " ");
    // A rotation waiting for the customer's confirmation (docs/key-lifecycle.md section 12).
    if (w.actions.includes("confirm_rotation") && can("confirm_rotation"))
      item.append(el("button", { class: "key-action confirm", "data-warning": w.id, onclick: () => confirmRotation(w) }, "Confirm"));
    if (can("support")) {
      for (const a of w.actions.filter((x) => ["resume", "cancel"].includes(x)))
        item.append(el("button", { class: "support-action", onclick: () => support(w.run_id, a) }, a));
    }
    return item;
  }));
}

function renderRuns(runs) {
  const body = $("#runs tbody");
  body.replaceChildren(...runs.map((r) => {
    const p = r.progress;
    const done = p.steps_done + (p.objects ? (p.copied + p.verified) / (2 * p.objects) : 0);
    const support_cell = el("td");
    if (can("support") && r.state === "failed") {
      support_cell.append(el("button", { class: "support-action", onclick: () => support(r.run_id, "resume") }, "Resume"));
      support_cell.append(el("button", { class: "support-action", onclick: () => support(r.run_id, "cancel") }, "Cancel"));
    }
    return el("tr", { "data-run": r.run_id, "data-state": r.state },
      el("td", {}, r.run_id), el("td", {}, r.tenant), el("td", {}, r.flow),
      el("td", { class: `run-${r.state}` }, r.state),
      el("td", {}, el("progress", { max: String(p.steps), value: String(Math.min(done, p.steps)) }), ` ${p.steps_done}/${p.steps} steps, ${p.copied}/${p.objects} copied`),
      el("td", {}, r.current_step || "-"), support_cell);
  }));
}

function renderApprovals(approvals) {
  const body = $("#approvals tbody");
  body.replaceChildren(...approvals.map((a) => {
    const cell = el("td");
    if (a.state === "pending" && can("migrate") && a.requested_by !== state.me.subject) {
      cell.append(el("button", { class: "key-action approve", onclick: () => decide(a.request_id, "approve") }, "Approve"));
      cell.append(el("button", { class: "key-action reject", onclick: () => decide(a.request_id, "reject") }, "Reject"));
    }
    return el("tr", { "data-request": a.request_id },
      el("td", {}, a.request_id), el("td", {}, a.tenant), el("td", {}, a.action), el("td", {}, a.requested_by),
      el("td", {}, a.reason), el("td", {}, a.expires_at), el("td", {}, a.state + (a.run_id ? ` (run ${a.run_id})` : "")), cell);
  }));
}

async function confirmRotation(w) {
  const rotation = w.details && w.details.rotation_id;
  try {
    const out = await api("POST", `/api/tenants/${encodeURIComponent(w.tenant)}/confirm_rotation`, { rotation_id: rotation });
    say(`rotation of ${w.tenant} confirmed: run ${out.run.run_id} ${out.run.message}`);
  } catch (e) { say(`confirmation refused: ${e.message}`); }
  await refresh();
}

async function support(runId, action) {
  try { const out = await api("POST", `/api/runs/${runId}/${action}`, {}); say(`${action} of run ${runId}: ${out.run.message}`); }
  catch (e) { say(`${action} refused: ${e.message}`); }
  refresh();
}

async function decide(requestId, how) {
  try { const out = await api("POST", `/api/approvals/${requestId}/${how}`, {}); say(`${how}: ${out.status || out.state}`); }
  catch (e) { say(`${how} refused: ${e.message}`); }
  refresh();
}

function openEnable(tenant) { $("#enable-tenant").textContent = tenant; $("#enable-form").hidden = false; }

async function openRemove(tenant) {
  $("#remove-tenant").textContent = tenant; $("#remove-panel").hidden = false;
  try {
    const b = await api("GET", `/api/tenants/${tenant}/blast-radius?action=remove`);
    $("#blast-radius").replaceChildren(
      el("p", {}, `${b.objects} objects (${b.bytes} bytes) at ${b.location}; index ${b.index || "-"} with ${b.index_documents ?? "?"} documents; ${b.queued_jobs} queued jobs; running runs: ${b.running_runs.join(", ") || "none"}`),
      el("ol", {}, ...b.would.map((w) => el("li", {}, w))));
  } catch (e) { $("#blast-radius").textContent = `No preview: ${e.message}`; }
}

$("#login-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("#token").value.trim()); });
$("#sign-out").addEventListener("click", signOut);
$("#enable-close").addEventListener("click", () => { $("#enable-form").hidden = true; });
$("#remove-close").addEventListener("click", () => { $("#remove-panel").hidden = true; });
$("#enable-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const tenant = $("#enable-tenant").textContent;
  try {
    const out = await api("POST", `/api/tenants/${tenant}/enable`, { mode: $("#enable-mode").value, key_ref: $("#enable-key-ref").value.trim() });
    say(`enable of ${tenant}: run ${out.run.run_id} ${out.run.message}`); $("#enable-form").hidden = true;
  } catch (err) { say(`enable refused: ${err.message}`); }
  refresh();
});
$("#remove-request").addEventListener("click", async () => {
  const tenant = $("#remove-tenant").textContent;
  try {
    const out = await api("POST", `/api/tenants/${tenant}/remove`, { reason: $("#remove-reason").value.trim() || "removal requested" });
    say(`removal of ${tenant} requested (${out.approval.request_id}): waiting for a second approver`); $("#remove-panel").hidden = true;
  } catch (err) { say(`removal refused: ${err.message}`); }
  refresh();
});

if (state.token) signIn(state.token);
