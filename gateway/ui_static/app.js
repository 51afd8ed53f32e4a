// The web page: plain DOM, no build step. Talks to /ui/session and /v1/ with the session cookie; every
// write sends the session's CSRF token. Data is only ever written with textContent (and SVG attributes).
"use strict";

const PAGE_SIZE = 20;
const SOON_DAYS = 7; // keys expiring within this many days are highlighted and listed on sign-in
const USAGE_DAYS = 30;

const state = {
  session: null,
  page: "keys",
  keys: { cursor: null, back: [], next: null, owner: null, ownerName: "" },
  audit: { next: null },
  expiryDismissed: false,
  projectNames: {},
};
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

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
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

// A table and its empty state: the table hides when there is nothing to show, and the text says so.
function fill(tableId, emptyId, rows, emptyText) {
  const table = $(tableId);
  table.querySelector("tbody").replaceChildren(...rows);
  labelCells(table);
  table.closest(".table-wrap").hidden = rows.length === 0;
  if (emptyId) {
    $(emptyId).hidden = rows.length !== 0;
    if (emptyText) $(emptyId).textContent = emptyText;
  }
}

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.classList.add("show");
  setTimeout(() => t.classList.remove("show"), 2500);
}

// Errors are shown in the page, above the current section, until dismissed or the next page is shown.
function showError(text) {
  $("page-error-text").textContent = text;
  $("page-error").hidden = false;
}

function clearError() {
  $("page-error").hidden = true;
  $("page-error-text").textContent = "";
}

// A failed call: a credential that no longer works signs the page out, anything else is shown.
async function fail(e) {
  if (e.status === 401) {
    await signedOut(e.code === "revoked_api_key"
      ? "The key this page was signed in with has been revoked: sign in with another key."
      : "Your session has ended: sign in again.");
    return;
  }
  showError(e.message);
}

async function attempt(action) {
  try {
    await action();
    return true;
  } catch (e) {
    await fail(e);
    return false;
  }
}

function confirmAction(text, label, warning) {
  return new Promise((resolve) => {
    const d = $("confirm-dialog");
    $("confirm-text").textContent = text;
    $("confirm-warning").textContent = warning || "";
    $("confirm-warning").hidden = !warning;
    $("confirm-yes").textContent = label;
    const done = (v) => { d.close(); resolve(v); };
    $("confirm-yes").onclick = () => done(true);
    $("confirm-no").onclick = () => done(false);
    d.showModal();
  });
}

const orgName = (id) => (state.session.orgs.find((o) => o.id === id) || { name: id }).name;
const pad = (n) => String(n).padStart(2, "0");
const date = (iso) => {
  if (!iso) return "—";
  const d = new Date(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
};
const when = (iso) => {
  if (!iso) return "—";
  const d = new Date(iso);
  return `${date(iso)} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
};
const activeOrg = () => state.session.orgs.find((o) => o.id === state.session.active_org) || {};
const activeRole = () => activeOrg().role;
const isAdmin = () => activeOrg().admin === true; // decided by the gateway (roles.admin), as the API does
const isCurrent = (k) => k.id === state.session.key_id;

function daysLeft(k) {
  if (k.status !== "active" || !k.expires_at) return null;
  return (new Date(k.expires_at).getTime() - Date.now()) / 86400000;
}

const expiringSoon = (k) => { const d = daysLeft(k); return d !== null && d <= SOON_DAYS; };

function inDays(k) {
  const d = daysLeft(k);
  if (d < 1) return `in ${Math.max(1, Math.round(d * 24))} h`;
  const days = Math.round(d);
  return `in ${days} day${days === 1 ? "" : "s"}`;
}

function showSecret(raw) {
  $("secret-value").textContent = raw;
  $("secret-dialog").showModal();
}

function person(name, id, kind) {
  if (id && state.session && id === state.session.user_id) return `${name || id} (you)`;
  if (kind === "service") return `${name || id} (service account)`;
  return name || id || "—";
}

// --- keys ----------------------------------------------------------------------------------------

async function renderInvitations() {
  const data = await call("GET", "/v1/invitations");
  $("invitations").hidden = data.items.length === 0;
  $("invitations-table").querySelector("tbody").replaceChildren(...data.items.map((i) => {
    const decide = (verb) => async () => {
      const ok = await attempt(async () => {
        await call("POST", `/v1/invitations/${i.id}/${verb}`);
        toast(verb === "accept" ? `You joined ${i.org_name}` : "Invitation declined");
        state.session = await call("GET", "/ui/session"); // the org list changed
        // This replica learns of the new membership by NOTIFY, a few milliseconds after the commit: until
        // the session lists the org, ask again (for at most two seconds).
        for (let n = 0; n < 20 && verb === "accept" && !state.session.orgs.some((o) => o.id === i.org_id); n++) {
          await new Promise((done) => setTimeout(done, 100));
          state.session = await call("GET", "/ui/session");
        }
      });
      if (ok) await show("keys");
    };
    const by = i.invited_by_name || (i.invited_by === "cli" ? "the operator" : i.invited_by) || "—";
    return el("tr", { "data-invitation-id": i.id }, el("td", {}, i.org_name), el("td", {}, i.role),
      el("td", {}, by), el("td", {}, date(i.expires_at)),
      el("td", {}, el("span", { class: "buttons" },
        el("button", { class: "small", onclick: decide("accept") }, "Accept"),
        el("button", { class: "small secondary", onclick: decide("decline") }, "Decline"))));
  }));
  labelCells($("invitations-table"));
}

// The user's own keys that expire within SOON_DAYS: listed above the keys on sign-in until dismissed.
async function renderExpiring() {
  if (state.expiryDismissed) { $("expiry-warning").hidden = true; return; }
  const before = new Date(Date.now() + SOON_DAYS * 86400000).toISOString();
  const data = await call("GET", `/v1/keys?status=active&limit=100&expires_before=${encodeURIComponent(before)}`);
  $("expiry-list").replaceChildren(...data.items.map((k) =>
    el("li", { "data-key-id": k.id }, el("strong", {}, k.name), ` (${k.start}…) expires ${when(k.expires_at)}, ${inDays(k)}`)));
  $("expiry-warning").hidden = data.items.length === 0;
}

function keysScope() {
  return isAdmin() ? $("keys-scope").value : "mine";
}

function keysQuery() {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (keysScope() === "org") params.set("org", state.session.active_org);
  if (state.keys.owner && keysScope() === "org") params.set("owner", state.keys.owner);
  const q = $("keys-search").value.trim();
  if (q) params.set("q", q);
  const status = $("keys-status").value;
  if (status === "expiring") {
    params.set("status", "active");
    params.set("expires_before", new Date(Date.now() + SOON_DAYS * 86400000).toISOString());
  } else if (status) {
    params.set("status", status);
  }
  if (state.keys.cursor) params.set("cursor", state.keys.cursor);
  return `/v1/keys?${params}`;
}

function resetKeyPaging() {
  state.keys.cursor = null;
  state.keys.back = [];
}

function lastUse(k) {
  if (!k.last_used_at) return "never";
  return k.last_used_ip ? `${when(k.last_used_at)} from ${k.last_used_ip}` : when(k.last_used_at);
}

function statusCell(k) {
  const cell = el("td", {}, el("span", { class: `status ${k.status}` }, k.status));
  if (expiringSoon(k)) cell.append(el("span", { class: "expiry soon" }, `expires ${inDays(k)}`));
  else if (k.status === "active" && k.expires_at) cell.append(el("span", { class: "expiry" }, `until ${date(k.expires_at)}`));
  return cell;
}

function keyRow(k) {
  const mine = k.user_id === state.session.user_id;
  const actions = el("span", { class: "buttons" },
    el("button", { class: "small secondary details", onclick: () => openKey(k) }, "Details"));
  if (k.status === "active") {
    if (mine || k.owner_kind === "service") {
      actions.append(el("button", { class: "small secondary", onclick: () => rotate(k) }, "Rotate"));
    }
    actions.append(el("button", { class: "small danger", onclick: () => revoke(k) }, "Revoke"));
  }
  const box = el("span", {}, el("span", { class: "key-name" }, k.name));
  if (isCurrent(k)) box.append(" ", el("span", { class: "badge current-key", title: "This page is signed in with this key" }, "this session"));
  box.append(el("span", { class: "mono sub" }, `${k.start}…`));
  const name = el("td", { class: "wrap name" }, box);
  // The role it has here (the lower of its own and its owner's), and its own when that is higher.
  const here = (k.effective_role || {})[state.session.active_org];
  const capped = here !== undefined && here !== k.role;
  const classes = [isCurrent(k) ? "current" : "", expiringSoon(k) ? "expiring" : ""].filter(Boolean).join(" ");
  return el("tr", { "data-key-id": k.id, class: classes },
    name,
    el("td", { class: "wrap" }, person(k.owner_name, k.user_id, k.owner_kind)),
    el("td", { class: capped ? "wrap capped" : "wrap", title: capped ? `The key's own role is ${k.role}; its owner's role here caps it` : "" },
       capped ? `${here} (key: ${k.role})` : k.role),
    statusCell(k),
    el("td", { class: "wrap last-used" }, lastUse(k)),
    el("td", { class: "actions-cell" }, actions));
}

function keysEmptyText() {
  if ($("keys-search").value.trim() || $("keys-status").value || state.keys.owner) return "No keys match these filters.";
  return keysScope() === "org" ? "No keys act in this org yet." : "You have no keys yet: create one.";
}

// Only the latest listing asked for is drawn (typing in the search asks again before the last answer).
async function renderKeys() {
  const seq = (state.keys.seq = (state.keys.seq || 0) + 1);
  const table = $("keys-table");
  table.dataset.state = "loading";
  await renderInvitations();
  await renderExpiring();
  $("keys-owner-filter").hidden = !(state.keys.owner && keysScope() === "org");
  $("keys-owner-name").textContent = state.keys.owner ? `Owner: ${state.keys.ownerName}` : "";
  const data = await call("GET", keysQuery());
  if (seq !== state.keys.seq) return;
  table.dataset.state = "ready";
  state.keys.next = data.next_cursor;
  fill("keys-table", "keys-empty", data.items.map(keyRow), keysEmptyText());
  $("keys-prev").disabled = state.keys.back.length === 0;
  $("keys-next").disabled = !data.next_cursor;
  $("keys-page").textContent = `Page ${state.keys.back.length + 1}`;
}

async function revoke(k) {
  const current = isCurrent(k);
  const warning = current
    ? "This is the key this page is signed in with: revoking it signs you out of this page at once."
    : "";
  const mine = k.user_id === state.session.user_id;
  const text = mine
    ? `Revoke “${k.name}” (${k.start}…)? Requests with it will be refused at once.`
    : `Revoke “${k.name}” (${k.start}…) of ${k.owner_name || k.user_id} in this org? Requests with it here will be refused at once.`;
  if (!(await confirmAction(text, "Revoke", warning))) return;
  const ok = await attempt(() => call("POST", `/v1/keys/${k.id}/revoke`));
  if (!ok) return;
  if (current) {
    await signedOut("You revoked the key this page was signed in with, so you are signed out. Sign in with another key.");
    return;
  }
  toast("Key revoked");
  await attempt(renderKeys);
}

async function rotate(k) {
  const warning = isCurrent(k)
    ? "This is the key this page is signed in with: once the old key expires in an hour, sign in with the new one."
    : "";
  if (!(await confirmAction(`Rotate “${k.name}”? The old key keeps working for one hour.`, "Rotate", warning))) return;
  await attempt(async () => {
    const created = await call("POST", `/v1/keys/${k.id}/rotate`, { grace: "1h" });
    showSecret(created.key);
    await renderKeys();
  });
}

function fact(label, value) {
  return [el("dt", {}, label), el("dd", {}, value)];
}

async function openKey(k) {
  $("kd-name").textContent = k.name;
  $("kd-error").textContent = "";
  const names = k.project_names || {};
  const eff = Object.entries(k.effective_role || {}).map(([o, r]) => `${orgName(o)}: ${r}`).join(", ");
  $("kd-facts").replaceChildren(
    ...fact("Key", `${k.start}…  (id ${k.id})`),
    ...fact("Owner", person(k.owner_name, k.user_id, k.owner_kind)),
    ...fact("Role", eff ? `${k.role}; in effect ${eff}` : k.role),
    ...fact("Orgs", Array.isArray(k.orgs) ? k.orgs.map(orgName).join(", ") || "—" : "all of the owner's"),
    ...fact("Projects", Array.isArray(k.projects) ? k.projects.map((p) => names[p] || p).join(", ") || "—" : "all"),
    ...fact("Scopes", k.scopes ? k.scopes.join(", ") : "everything the role allows"),
    ...fact("IP allowlist", k.allowed_ips ? k.allowed_ips.join(", ") : "any address"),
    ...fact("Rate limit", k.rate_limit || "the default"),
    ...fact("Status", k.status + (expiringSoon(k) ? ` (expires ${inDays(k)})` : "")),
    ...fact("Created", when(k.created_at)),
    ...fact("Expires", k.expires_at ? when(k.expires_at) : "never"),
    ...fact("Last used", lastUse(k)));
  $("usage-chart").replaceChildren();
  $("kd-usage-total").textContent = "Loading…";
  $("key-dialog").showModal();
  try {
    drawUsage(await call("GET", `/v1/keys/${k.id}/usage?days=${USAGE_DAYS}`));
  } catch (e) {
    $("kd-usage-total").textContent = "";
    $("kd-error").textContent = e.message;
  }
}

// Requests per day as bars: one per day, the highest day's bar full height, each with its count.
function drawUsage(usage) {
  const chart = $("usage-chart");
  const width = 300, top = 4, height = 80, slot = width / usage.items.length;
  const max = Math.max(1, ...usage.items.map((d) => d.requests));
  chart.replaceChildren(svg("line", { x1: 0, y1: top + height, x2: width, y2: top + height, class: "axis" }),
    ...usage.items.map((d, i) => {
      const h = d.requests === 0 ? 0 : Math.max(1, (d.requests / max) * height);
      return svg("rect", { x: (i * slot + slot * 0.15).toFixed(2), y: (top + height - h).toFixed(2),
                           width: (slot * 0.7).toFixed(2), height: h.toFixed(2), class: "bar",
                           "data-day": d.day, "data-requests": d.requests },
        svg("title", {}, `${d.day}: ${d.requests} request${d.requests === 1 ? "" : "s"}`));
    }));
  const peak = usage.items.reduce((a, d) => (d.requests > a.requests ? d : a), usage.items[0]);
  $("kd-usage-total").textContent = usage.total === 0
    ? `No requests in the last ${usage.days} days.`
    : `${usage.total} requests in the last ${usage.days} days; busiest day ${peak.day} (${peak.requests}).`;
  $("kd-usage-first").textContent = usage.items[0].day;
  $("kd-usage-last").textContent = usage.items[usage.items.length - 1].day;
}

async function openCreate(serviceAccount) {
  const s = state.session;
  state.createFor = serviceAccount || null;
  $("create-form").reset();
  $("create-error").textContent = "";
  $("create-title").textContent = serviceAccount ? `Create key for ${serviceAccount.name}` : "Create key";
  $("k-orgs-field").hidden = !!serviceAccount;
  $("k-expiry-date").hidden = true;
  $("k-role").replaceChildren(...s.roles.map((r) => el("option", { value: r }, r)));
  $("k-role").value = serviceAccount ? serviceAccount.role : activeRole() || s.roles[0];
  $("k-org-list").replaceChildren(...s.orgs.map((o) =>
    el("label", { class: "check" }, el("input", { type: "checkbox", value: o.id }), o.name)));
  let projects = [];
  if (s.active_org && !(await attempt(async () => {
    projects = (await call("GET", `/v1/orgs/${s.active_org}/projects`)).items;
  }))) return;
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
  const sa = state.createFor;
  const body = { name: $("k-name").value.trim(), role: $("k-role").value,
                 projects: picked("k-project-list", "k-projects") };
  if (!sa) body.orgs = picked("k-org-list", "k-orgs");
  const scopes = split($("k-scopes").value);
  if (scopes.length) body.scopes = scopes;
  const ips = split($("k-ips").value);
  if (ips.length) body.allowed_ips = ips;
  const expiry = $("k-expiry").value;
  if (expiry === "custom") body.expires_at = new Date($("k-expiry-date").value + "T23:59:59Z").toISOString();
  else if (expiry) body.expires_in = expiry;
  try {
    const path = sa ? `/v1/orgs/${state.session.active_org}/service-accounts/${sa.id}/keys` : "/v1/keys";
    const created = await call("POST", path, body);
    $("create-dialog").close();
    showSecret(created.key);
    await PAGES[state.page]();
  } catch (e) {
    $("create-error").textContent = e.message;
  }
}

// --- projects and service accounts ---------------------------------------------------------------

async function renderProjects() {
  const org = state.session.active_org;
  const data = await call("GET", `/v1/orgs/${org}/projects`);
  fill("projects-table", "projects-empty", data.items.map((p) => {
    const actions = el("td");
    if (isAdmin()) actions.append(el("button", { class: "small danger", onclick: () => deleteProject(p) }, "Delete"));
    return el("tr", { "data-project-id": p.id }, el("td", { class: "wrap" }, p.name), el("td", { class: "mono" }, p.id), actions);
  }), isAdmin() ? "No projects in this org yet: create one." : "No projects in this org yet.");
}

async function createProject(ev) {
  ev.preventDefault();
  const ok = await attempt(() => call("POST", `/v1/orgs/${state.session.active_org}/projects`,
                                      { name: $("project-name").value.trim() }));
  if (!ok) return;
  toast("Project created");
  $("project-form").reset();
  await attempt(renderProjects);
}

async function deleteProject(p) {
  if (!(await confirmAction(`Delete the project “${p.name}”?`, "Delete"))) return;
  const path = `/v1/orgs/${state.session.active_org}/projects/${p.id}`;
  try {
    await call("DELETE", path);
  } catch (e) {
    if (e.status !== 409) { await fail(e); return; }
    const warning = `${e.message}. Deleting it anyway revokes those keys in this org.`;
    if (!(await confirmAction(`Keys name “${p.name}”.`, "Delete and revoke keys", warning))) return;
    if (!(await attempt(() => call("DELETE", `${path}?revoke_keys=true`)))) return;
  }
  toast("Project deleted");
  await attempt(renderProjects);
}

async function renderServiceAccounts() {
  const org = state.session.active_org;
  $("sa-role").replaceChildren(...state.session.roles.map((r) => el("option", { value: r }, r)));
  $("sa-role").value = state.session.roles.includes("member") ? "member" : state.session.roles[0];
  const data = await call("GET", `/v1/orgs/${org}/service-accounts`);
  fill("sa-table", "sa-empty", data.items.map((sa) =>
    el("tr", { "data-sa-id": sa.id }, el("td", { class: "wrap" }, sa.name), el("td", {}, sa.role),
       el("td", { class: "mono" }, sa.id),
       el("td", {}, el("span", { class: "buttons" },
         el("button", { class: "small", onclick: () => openCreate(sa) }, "Create key"),
         el("button", { class: "small secondary", onclick: () => keysOf(sa) }, "Keys"))))));
}

async function keysOf(sa) {
  state.keys.owner = sa.id;
  state.keys.ownerName = sa.name;
  resetKeyPaging();
  $("keys-scope").value = "org";
  location.hash = "#keys";
  if (state.page === "keys") await show("keys");
}

async function createServiceAccount(ev) {
  ev.preventDefault();
  const ok = await attempt(() => call("POST", `/v1/orgs/${state.session.active_org}/service-accounts`,
                                      { name: $("sa-name").value.trim(), role: $("sa-role").value }));
  if (!ok) return;
  toast("Service account created");
  $("sa-form").reset();
  await attempt(renderServiceAccounts);
}

// --- members, audit, sessions --------------------------------------------------------------------

async function renderMembers() {
  const org = state.session.active_org;
  $("member-role").replaceChildren(...state.session.roles.map((r) => el("option", { value: r }, r)));
  const data = await call("GET", `/v1/orgs/${org}/members`);
  fill("members-table", null, data.items.map((m) => {
    const select = el("select", { "aria-label": "Role", onchange: async (ev) => {
      if (await attempt(() => call("PUT", `/v1/orgs/${org}/members/${m.user_id}`, { role: ev.target.value }))) toast("Role changed");
      await attempt(renderMembers);
    } }, ...state.session.roles.map((r) => el("option", { value: r }, r)));
    select.value = m.role;
    const remove = el("button", { class: "small danger", onclick: async () => {
      if (!(await confirmAction(`Remove ${m.email || m.name} from this org?`, "Remove"))) return;
      if (await attempt(() => call("DELETE", `/v1/orgs/${org}/members/${m.user_id}`))) toast("Member removed");
      await attempt(renderMembers);
    } }, "Remove");
    return el("tr", {}, el("td", { class: "wrap" }, person(m.email || m.name, m.user_id, m.kind)), el("td", {}, m.kind),
              el("td", {}, select), el("td", {}, remove));
  }));
  const invited = await call("GET", `/v1/orgs/${org}/invitations`);
  fill("org-invitations-table", "org-invitations-empty", invited.items.map((i) =>
    el("tr", {}, el("td", { class: "wrap" }, i.email || i.user_id), el("td", {}, i.role), el("td", {}, date(i.expires_at)),
       el("td", {}, el("button", { class: "small danger", onclick: async () => {
         if (await attempt(() => call("DELETE", `/v1/orgs/${org}/invitations/${i.id}`))) toast("Invitation withdrawn");
         await attempt(renderMembers);
       } }, "Withdraw")))));
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

const EVENT_TEXT = {
  "api_key.used": "requests", "auth.failed": "denials",
};

function detailText(e) {
  const parts = [];
  if (e.count > 1 || EVENT_TEXT[e.type]) parts.push(`${e.count} ${EVENT_TEXT[e.type] || "events"}`);
  for (const [k, v] of Object.entries(e.detail || {})) {
    let value = typeof v === "string" ? v : JSON.stringify(v);
    if (typeof v === "string" && state.projectNames[v]) value = state.projectNames[v];
    if (k === "via_key" && v === e.key_id) continue;
    parts.push(`${k.replace(/_/g, " ")}: ${value}`);
  }
  return parts;
}

function target(e) {
  if (e.key_name && (e.target === e.key_id || !e.target)) return `key “${e.key_name}”`;
  if (e.user_name && (e.target === e.user_id || !e.target)) return e.user_name;
  if (e.target && state.projectNames[e.target]) return `project “${state.projectNames[e.target]}”`;
  return e.target || e.key_id || "—";
}

function auditRow(e) {
  const actor = e.actor === "cli" ? "operator (command line)" : e.actor_name || e.actor || "—";
  return el("tr", { "data-event-id": String(e.id) },
    el("td", {}, when(e.at)), el("td", {}, e.type), el("td", { class: "wrap" }, actor),
    el("td", { class: "wrap" }, target(e)), el("td", {}, e.ip || "—"),
    el("td", { class: "wrap details" }, ...detailText(e).map((t) => el("span", { class: "chip" }, t))));
}

async function renderAudit(more) {
  const org = state.session.active_org;
  const type = $("audit-type").value;
  if (!more) {
    const projects = await call("GET", `/v1/orgs/${org}/projects`);
    state.projectNames = Object.fromEntries(projects.items.map((p) => [p.id, p.name]));
  }
  const params = new URLSearchParams({ limit: "50" });
  if (type) params.set("type", type);
  if (more && state.audit.next) params.set("cursor", state.audit.next);
  const data = await call("GET", `/v1/orgs/${org}/audit?${params}`);
  state.audit.next = data.next_cursor;
  const rows = data.items.map(auditRow);
  if (more) {
    $("audit-table").querySelector("tbody").append(...rows);
    labelCells($("audit-table"));
  } else {
    fill("audit-table", "audit-empty", rows, type ? `No ${type} events in this org yet.` : "No events in this org yet.");
  }
  $("audit-more").hidden = !data.next_cursor;
}

async function renderSessions() {
  const data = await call("GET", "/v1/sessions");
  fill("sessions-table", null, data.items.map((s) =>
    el("tr", {}, el("td", {}, when(s.created)), el("td", {}, when(s.last_seen)),
       el("td", { class: "wrap" }, s.user_agent || "—"), el("td", {}, s.address || "—"),
       el("td", {}, s.active_org ? orgName(s.active_org) : "—"),
       el("td", {}, s.current ? el("span", { class: "badge" }, "this browser")
         : el("button", { class: "secondary", onclick: () => endSession(s.id) }, "End")))));
}

async function endSession(id) {
  if (await attempt(() => call("DELETE", `/v1/sessions/${encodeURIComponent(id)}`))) toast("Session ended");
  await attempt(renderSessions);
}

async function endAllSessions() {
  if (!(await confirmAction("End every session, here too, and every access token issued to you?", "Sign out everywhere"))) return;
  await call("DELETE", "/v1/sessions").catch((e) => showError(e.message));
  await signedOut("");
}

// --- shell ---------------------------------------------------------------------------------------

const PAGES = { keys: renderKeys, projects: renderProjects, "service-accounts": renderServiceAccounts,
                members: renderMembers, audit: () => renderAudit(false), sessions: renderSessions };
const OPEN_TO_ALL = new Set(["keys", "projects", "sessions"]);

// Signed out (by the user, or because the key or session stopped working): the sign-in form, and why.
async function signedOut(notice) {
  state.session = null;
  state.expiryDismissed = false;
  state.keys.owner = null;
  resetKeyPaging();
  $("signin-notice").textContent = notice || "";
  $("signin-notice").hidden = !notice;
  await show("keys");
}

async function show(page) {
  clearError();
  if (!state.session) {
    for (const id of [...Object.keys(PAGES), "top"]) $(id).hidden = true;
    for (const d of document.querySelectorAll("dialog[open]")) d.close();
    $("signin").hidden = false;
    return;
  }
  $("signin-notice").hidden = true;
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
  await attempt(PAGES[page]);
}

function onKeyFilter() {
  resetKeyPaging();
  attempt(renderKeys);
}

async function start() {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("signin-error").textContent = "";
    try {
      state.session = await call("POST", "/ui/session", { key: $("signin-key").value.trim() });
      $("signin-key").value = "";
      state.expiryDismissed = false;
      $("keys-scope").value = "org";
      await show("keys");
    } catch (e) {
      $("signin-error").textContent = e.message;
    }
  });
  $("sign-out").addEventListener("click", async () => {
    await call("DELETE", "/ui/session").catch(() => {});
    await signedOut("");
  });
  $("org-switch").addEventListener("change", async (ev) => {
    await attempt(async () => {
      state.session = await call("POST", "/ui/session/org", { org: ev.target.value });
      state.keys.owner = null;
      resetKeyPaging();
    });
    if (state.session) await show(state.page);
  });
  $("page-error-close").addEventListener("click", clearError);
  $("expiry-close").addEventListener("click", () => { state.expiryDismissed = true; $("expiry-warning").hidden = true; });
  $("new-key").addEventListener("click", () => openCreate(null));
  $("create-form").addEventListener("submit", submitCreate);
  $("create-cancel").addEventListener("click", () => $("create-dialog").close());
  $("k-expiry").addEventListener("change", (ev) => { $("k-expiry-date").hidden = ev.target.value !== "custom"; });
  $("kd-close").addEventListener("click", () => $("key-dialog").close());
  $("copy-secret").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("secret-value").textContent); toast("Copied"); }
    catch { toast("Select the key and copy it"); }
  });
  $("close-secret").addEventListener("click", () => { $("secret-value").textContent = ""; $("secret-dialog").close(); });
  let typing = null;
  $("keys-filters").addEventListener("submit", (ev) => { ev.preventDefault(); clearTimeout(typing); onKeyFilter(); });
  $("keys-search").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(onKeyFilter, 250); });
  $("keys-status").addEventListener("change", onKeyFilter);
  $("keys-scope").addEventListener("change", onKeyFilter);
  $("keys-owner-clear").addEventListener("click", () => { state.keys.owner = null; onKeyFilter(); });
  $("keys-next").addEventListener("click", () => {
    state.keys.back.push(state.keys.cursor);
    state.keys.cursor = state.keys.next;
    attempt(renderKeys);
  });
  $("keys-prev").addEventListener("click", () => {
    state.keys.cursor = state.keys.back.pop() || null;
    attempt(renderKeys);
  });
  $("project-form").addEventListener("submit", createProject);
  $("sa-form").addEventListener("submit", createServiceAccount);
  $("member-form").addEventListener("submit", addMember);
  $("audit-type").addEventListener("change", () => attempt(() => renderAudit(false)));
  $("audit-more").addEventListener("click", () => attempt(() => renderAudit(true)));
  $("end-all-sessions").addEventListener("click", endAllSessions);
  window.addEventListener("hashchange", () => show(location.hash.slice(1) || "keys"));
  try {
    state.session = await call("GET", "/ui/session");
  } catch (e) {
    state.session = null;
    if (e.code === "revoked_api_key") {
      $("signin-notice").textContent = "The key this page was signed in with has been revoked: sign in with another key.";
      $("signin-notice").hidden = false;
    }
  }
  await show(location.hash.slice(1) || "keys");
}

document.addEventListener("DOMContentLoaded", start);
