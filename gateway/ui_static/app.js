// The API-keys page: plain DOM, no build step. Talks to /ui/session and /v1/ with the session cookie;
// every write sends the session's CSRF token. Data is only ever written with textContent.
"use strict";

const state = { session: null, page: "keys", projects: [] };
const $ = (id) => document.getElementById(id);

async function call(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.session) headers["X-CSRF-Token"] = state.session.csrf;
  const r = await fetch(path, { method, headers, credentials: "same-origin",
                                body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 204) return null;
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = new Error((data.error && data.error.message) || r.statusText);
    e.code = data.error && data.error.code;
    e.status = r.status;
    throw e;
  }
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

// On a phone each row becomes a card: every cell is labelled with its column's heading.
function labelCells(table) {
  const heads = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of table.querySelectorAll("tbody tr")) {
    [...row.children].forEach((td, i) => td.setAttribute("data-label", heads[i] || ""));
  }
}

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.classList.add("show");
  setTimeout(() => t.classList.remove("show"), 2500);
}

function confirmAction(text, label) {
  return new Promise((resolve) => {
    const d = $("confirm-dialog");
    $("confirm-text").textContent = text;
    $("confirm-yes").textContent = label;
    const done = (v) => { d.close(); resolve(v); };
    $("confirm-yes").onclick = () => done(true);
    $("confirm-no").onclick = () => done(false);
    d.showModal();
  });
}

const orgName = (id) => (state.session.orgs.find((o) => o.id === id) || { name: id }).name;
const date = (iso) => (iso ? new Date(iso).toISOString().slice(0, 10) : "—");
const activeOrg = () => state.session.orgs.find((o) => o.id === state.session.active_org) || {};
const activeRole = () => activeOrg().role;
const isAdmin = () => activeOrg().admin === true; // decided by the gateway (roles.admin), as the API does

function showSecret(raw) {
  $("secret-value").textContent = raw;
  $("secret-dialog").showModal();
}

// --- pages ---------------------------------------------------------------------------------------

async function renderInvitations() {
  const data = await call("GET", "/v1/invitations");
  $("invitations").hidden = data.items.length === 0;
  $("invitations-table").querySelector("tbody").replaceChildren(...data.items.map((i) => {
    const decide = (verb) => async () => {
      try {
        await call("POST", `/v1/invitations/${i.id}/${verb}`);
        toast(verb === "accept" ? `You joined ${i.org_name}` : "Invitation declined");
        state.session = await call("GET", "/ui/session");  // the org list changed
      } catch (e) { toast(e.message); }
      await show("keys");
    };
    return el("tr", { "data-invitation-id": i.id }, el("td", {}, i.org_name), el("td", {}, i.role),
      el("td", {}, i.invited_by || "—"), el("td", {}, date(i.expires_at)),
      el("td", {}, el("button", { class: "small", onclick: decide("accept") }, "Accept"), " ",
        el("button", { class: "small secondary", onclick: decide("decline") }, "Decline")));
  }));
  labelCells($("invitations-table"));
}

async function renderKeys() {
  await renderInvitations();
  const tbody = $("keys-table").querySelector("tbody");
  const data = await call("GET", "/v1/keys?limit=100");
  tbody.replaceChildren(...data.items.map((k) => {
    const eff = Object.entries(k.effective_role).map(([o, r]) => `${orgName(o)}: ${r}${r !== k.role ? " (capped)" : ""}`);
    const actions = el("td");
    if (k.status === "active") {
      actions.append(
        el("button", { class: "small secondary", onclick: () => rotate(k) }, "Rotate"), " ",
        el("button", { class: "small danger", onclick: () => revoke(k) }, "Revoke"));
    }
    return el("tr", { "data-key-id": k.id },
      el("td", {}, k.name), el("td", { class: "mono" }, `${k.start}…`), el("td", {}, k.role),
      el("td", { class: eff.some((e) => e.includes("capped")) ? "capped" : "" }, eff.join(", ") || "—"),
      el("td", { class: "wrap" }, Array.isArray(k.orgs) ? k.orgs.map(orgName).join(", ") : "all"),
      el("td", { class: "wrap" }, Array.isArray(k.projects) ? k.projects.join(", ") : "all"),
      el("td", {}, el("span", { class: `status ${k.status}` }, k.status)),
      el("td", {}, date(k.expires_at)), el("td", {}, date(k.last_used_at)), actions);
  }));
  labelCells($("keys-table"));
}

async function revoke(k) {
  if (!(await confirmAction(`Revoke “${k.name}” (${k.start}…)? Requests with it will be refused at once.`, "Revoke"))) return;
  await call("POST", `/v1/keys/${k.id}/revoke`);
  toast("Key revoked");
  await renderKeys();
}

async function rotate(k) {
  if (!(await confirmAction(`Rotate “${k.name}”? The old key keeps working for one hour.`, "Rotate"))) return;
  const created = await call("POST", `/v1/keys/${k.id}/rotate`, { grace: "1h" });
  showSecret(created.key);
  await renderKeys();
}

async function openCreate() {
  const s = state.session;
  $("create-form").reset();
  $("create-error").textContent = "";
  $("k-expiry-date").hidden = true;
  $("k-role").replaceChildren(...s.roles.map((r) => el("option", { value: r }, r)));
  $("k-role").value = activeRole() || s.roles[0];
  $("k-org-list").replaceChildren(...s.orgs.map((o) =>
    el("label", { class: "check" }, el("input", { type: "checkbox", value: o.id }), o.name)));
  const projects = s.active_org ? (await call("GET", `/v1/orgs/${s.active_org}/projects`)).items : [];
  $("k-project-list").replaceChildren(...projects.map((p) =>
    el("label", { class: "check" }, el("input", { type: "checkbox", value: p.id }), p.name)));
  $("create-dialog").showModal();
}

function picked(listId, radioName) {
  if (document.querySelector(`input[name=${radioName}]:checked`).value === "all") return "all";
  return [...$(listId).querySelectorAll("input:checked")].map((i) => i.value);
}

const split = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

async function submitCreate(ev) {
  ev.preventDefault();
  const body = { name: $("k-name").value.trim(), role: $("k-role").value,
                 orgs: picked("k-org-list", "k-orgs"), projects: picked("k-project-list", "k-projects") };
  const scopes = split($("k-scopes").value);
  if (scopes.length) body.scopes = scopes;
  const ips = split($("k-ips").value);
  if (ips.length) body.allowed_ips = ips;
  const expiry = $("k-expiry").value;
  if (expiry === "custom") body.expires_at = new Date($("k-expiry-date").value + "T23:59:59Z").toISOString();
  else if (expiry) body.expires_in = expiry;
  try {
    const created = await call("POST", "/v1/keys", body);
    $("create-dialog").close();
    showSecret(created.key);
    await renderKeys();
  } catch (e) {
    $("create-error").textContent = e.message;
  }
}

async function renderMembers() {
  const org = state.session.active_org;
  $("member-role").replaceChildren(...state.session.roles.map((r) => el("option", { value: r }, r)));
  const data = await call("GET", `/v1/orgs/${org}/members`);
  $("members-table").querySelector("tbody").replaceChildren(...data.items.map((m) => {
    const select = el("select", { "aria-label": "Role", onchange: async (ev) => {
      try { await call("PUT", `/v1/orgs/${org}/members/${m.user_id}`, { role: ev.target.value }); toast("Role changed"); }
      catch (e) { toast(e.message); }
      await renderMembers();
    } }, ...state.session.roles.map((r) => el("option", { value: r }, r)));
    select.value = m.role;
    const remove = el("button", { class: "small danger", onclick: async () => {
      if (!(await confirmAction(`Remove ${m.email || m.name} from this org?`, "Remove"))) return;
      try { await call("DELETE", `/v1/orgs/${org}/members/${m.user_id}`); toast("Member removed"); }
      catch (e) { toast(e.message); }
      await renderMembers();
    } }, "Remove");
    return el("tr", {}, el("td", {}, m.email || m.name || m.user_id), el("td", {}, m.kind), el("td", {}, select),
              el("td", {}, remove));
  }));
  labelCells($("members-table"));
  const invited = await call("GET", `/v1/orgs/${org}/invitations`);
  $("org-invitations-table").querySelector("tbody").replaceChildren(...invited.items.map((i) =>
    el("tr", {}, el("td", {}, i.email || i.user_id), el("td", {}, i.role), el("td", {}, date(i.expires_at)),
       el("td", {}, el("button", { class: "small danger", onclick: async () => {
         try { await call("DELETE", `/v1/orgs/${org}/invitations/${i.id}`); toast("Invitation withdrawn"); }
         catch (e) { toast(e.message); }
         await renderMembers();
       } }, "Withdraw")))));
  labelCells($("org-invitations-table"));
}

async function addMember(ev) {
  ev.preventDefault();
  $("member-error").textContent = "";
  try {
    const r = await call("POST", `/v1/orgs/${state.session.active_org}/members`,
                         { email: $("member-email").value.trim(), role: $("member-role").value });
    toast(r.status === "pending" ? "Invitation sent: they join once they accept" : "Role changed");
    $("member-form").reset();
    await renderMembers();
  } catch (e) {
    $("member-error").textContent = e.message;
  }
}

async function renderAudit() {
  const type = $("audit-type").value;
  const data = await call("GET", `/v1/orgs/${state.session.active_org}/audit?limit=100${type ? `&type=${encodeURIComponent(type)}` : ""}`);
  $("audit-table").querySelector("tbody").replaceChildren(...data.items.map((e) =>
    el("tr", {}, el("td", {}, e.at.replace("T", " ").slice(0, 19)), el("td", {}, e.type), el("td", {}, e.actor || "—"),
       el("td", { class: "mono" }, e.target || e.key_id || "—"), el("td", {}, e.ip || "—"),
       el("td", { class: "wrap mono" }, JSON.stringify(e.detail)))));
  labelCells($("audit-table"));
}

const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 16) : "—");

async function renderSessions() {
  const data = await call("GET", "/v1/sessions");
  $("sessions-table").querySelector("tbody").replaceChildren(...data.items.map((s) =>
    el("tr", {}, el("td", {}, when(s.created)), el("td", {}, when(s.last_seen)),
       el("td", { class: "wrap" }, s.user_agent || "—"), el("td", {}, s.address || "—"),
       el("td", {}, s.active_org ? orgName(s.active_org) : "—"),
       el("td", {}, s.current ? el("span", { class: "badge" }, "this browser")
         : el("button", { class: "secondary", onclick: () => endSession(s.id) }, "End")))));
  labelCells($("sessions-table"));
}

async function endSession(id) {
  try {
    await call("DELETE", `/v1/sessions/${encodeURIComponent(id)}`);
    toast("Session ended");
  } catch (e) {
    toast(e.message);
  }
  await renderSessions();
}

async function endAllSessions() {
  if (!(await confirmAction("End every session, here too, and every access token issued to you?", "Sign out everywhere"))) return;
  await call("DELETE", "/v1/sessions").catch((e) => toast(e.message));
  state.session = null;
  await show("keys");
}

// --- shell ---------------------------------------------------------------------------------------

const PAGES = { keys: renderKeys, members: renderMembers, audit: renderAudit, sessions: renderSessions };
const OPEN_TO_ALL = new Set(["keys", "sessions"]);

async function show(page) {
  if (!state.session) {
    for (const id of ["keys", "members", "audit", "sessions", "top"]) $(id).hidden = true;
    $("signin").hidden = false;
    return;
  }
  if (!(page in PAGES) || (!isAdmin() && !OPEN_TO_ALL.has(page))) page = "keys";
  state.page = page;
  $("signin").hidden = true;
  $("top").hidden = false;
  for (const a of document.querySelectorAll(".admin-only")) a.hidden = !isAdmin();
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.page === page);
  for (const id of Object.keys(PAGES)) $(id).hidden = id !== page;
  const select = $("org-switch");
  select.replaceChildren(...state.session.orgs.map((o) => el("option", { value: o.id }, `${o.name} (${o.role})`)));
  select.value = state.session.active_org || "";
  try {
    await PAGES[page]();
  } catch (e) {
    if (e.status === 401) { state.session = null; return show("keys"); }
    toast(e.message);
  }
}

async function start() {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("signin-error").textContent = "";
    try {
      state.session = await call("POST", "/ui/session", { key: $("signin-key").value.trim() });
      $("signin-key").value = "";
      await show("keys");
    } catch (e) {
      $("signin-error").textContent = e.message;
    }
  });
  $("sign-out").addEventListener("click", async () => {
    await call("DELETE", "/ui/session").catch(() => {});
    state.session = null;
    await show("keys");
  });
  $("org-switch").addEventListener("change", async (ev) => {
    state.session = await call("POST", "/ui/session/org", { org: ev.target.value });
    await show(state.page);
  });
  $("new-key").addEventListener("click", openCreate);
  $("create-form").addEventListener("submit", submitCreate);
  $("create-cancel").addEventListener("click", () => $("create-dialog").close());
  $("k-expiry").addEventListener("change", (ev) => { $("k-expiry-date").hidden = ev.target.value !== "custom"; });
  $("copy-secret").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("secret-value").textContent); toast("Copied"); }
    catch { toast("Select the key and copy it"); }
  });
  $("close-secret").addEventListener("click", () => { $("secret-value").textContent = ""; $("secret-dialog").close(); });
  $("member-form").addEventListener("submit", addMember);
  $("audit-type").addEventListener("change", renderAudit);
  $("end-all-sessions").addEventListener("click", endAllSessions);
  window.addEventListener("hashchange", () => show(location.hash.slice(1) || "keys"));
  try {
    state.session = await call("GET", "/ui/session");
  } catch {
    state.session = null;
  }
  await show(location.hash.slice(1) || "keys");
}

document.addEventListener("DOMContentLoaded", start);
