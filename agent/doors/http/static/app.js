// The agent's operator page: plain JavaScript, no framework, no build, nothing from elsewhere.
// The token lives in sessionStorage and goes in the Authorization header of every call, never
// in a URL. Output and every field of a record are shown with textContent, never as HTML.
"use strict";

const STATES = ["queued", "running", "succeeded", "failed", "timed_out", "cancelled", "lost"];
const KEY = "agent-token";
const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem(KEY);
let cursors = [null];   // the cursor of each page seen; the last one is shown
let tasks = [];         // the records of the page shown
let refresher = null;
let follower = null;    // the AbortController of the output being followed

class Refused extends Error {}

async function api(method, path, body) {
  const headers = {"Authorization": "Bearer " + token, "Accept": "application/json"};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {method, headers, cache: "no-store", credentials: "omit",
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) throw new Refused(data.error || "token refused");
  if (!response.ok) throw new Error(data.error || response.status + " " + response.statusText);
  return data;
}

function notice(text, ok) {
  const p = $("notice");
  p.textContent = text || "";
  p.className = ok ? "ok" : "";
  p.hidden = !text;
}

function failed(error) {
  if (error instanceof Refused) {
    signOut("The token was refused: " + error.message);
  } else if (error.name !== "AbortError") {
    notice(error.message);
  }
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function show(view) {
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== "view-" + view;
  }
  $("nav").hidden = view === "sign-in";
}

function stop() {
  if (refresher) clearInterval(refresher);
  refresher = null;
  if (follower) follower.abort();
  follower = null;
}

// -- signing in and out

async function signIn(event) {
  event.preventDefault();
  const candidate = $("token").value.trim();
  token = candidate;
  try {
    await api("GET", "/tasks?limit=1");
  } catch (error) {
    token = null;
    notice(error instanceof Refused ? "That token was refused." : error.message);
    return;
  }
  sessionStorage.setItem(KEY, candidate);
  $("token").value = "";
  notice("");
  route();
}

function signOut(message) {
  stop();
  token = null;
  sessionStorage.removeItem(KEY);
  notice(message || "");
  show("sign-in");
  $("token").focus();
}

// -- the list

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function seconds(ms) {
  return ms === null || ms === undefined ? "" : (ms / 1000).toFixed(ms < 10000 ? 2 : 0) + " s";
}

async function loadList() {
  const query = new URLSearchParams({limit: "50"});
  const state = $("filter-state").value;
  const source = $("filter-source").value;
  const words = $("filter-command").value.trim();
  const cursor = cursors[cursors.length - 1];
  if (state) query.set("state", state);
  if (source) query.set("source", source);
  if (words) query.set("q", words.slice(0, 200));
  if (cursor) query.set("cursor", cursor);
  try {
    const page = await api("GET", "/tasks?" + query);
    tasks = page.tasks;
    $("next-page").disabled = !page.next;
    $("next-page").dataset.next = page.next || "";
    $("prev-page").disabled = $("first-page").disabled = cursors.length === 1;
    drawList();
  } catch (error) {
    failed(error);
  }
}

function drawList() {
  const body = $("tasks").tBodies[0];
  const rows = [];
  for (const task of tasks) {
    const command = task.command.join(" ");
    const row = el("tr", null, "task");
    row.dataset.id = task.id;
    row.append(el("td", when(task.created_at)), el("td", command, "command"),
               el("td", task.state, "state state-" + task.state), el("td", task.source),
               el("td", seconds(task.duration_ms)), el("td", task.exit_code),
               el("td", task.reason), el("td", task.launched_by));
    row.addEventListener("click", () => { location.hash = "#/tasks/" + task.id; });
    rows.push(row);
  }
  body.replaceChildren(...rows);
  $("empty").hidden = rows.length > 0;
}

function listView() {
  show("list");
  loadList();
  refresher = setInterval(() => { if ($("auto-refresh").checked) loadList(); }, REFRESH_MS);
}

function page(step) {
  if (step === "first") cursors = [null];
  else if (step === "prev" && cursors.length > 1) cursors.pop();
  else if (step === "next" && $("next-page").dataset.next) cursors.push($("next-page").dataset.next);
  loadList();
}

// -- one task

const FIELDS = ["id", "command", "state", "source", "launched_by", "created_at", "started_at",
                "finished_at", "duration_ms", "exit_code", "reason", "error", "signal", "pid",
                "timeout", "stdout_bytes", "stderr_bytes", "stdout_dropped", "stderr_dropped",
                "cleanup", "request_id", "command_cut"];

function drawRecord(task) {
  const items = [];
  for (const name of FIELDS) {
    if (!(name in task)) continue;
    const value = task[name];
    items.push(el("dt", name), el("dd", Array.isArray(value) ? JSON.stringify(value) : value));
  }
  $("record").replaceChildren(...items);
  const ended = !["queued", "running"].includes(task.state);
  $("cancel").disabled = ended;
  $("purge").disabled = !ended;
  if (ended) {
    const end = $("end");
    end.textContent = "Ended: " + task.state + " (" + (task.reason || "?") + "), exit code " +
      task.exit_code + (task.error ? ": " + task.error : "");
    end.hidden = false;
  }
}

async function loadRecord(id) {
  try {
    drawRecord(await api("GET", "/tasks/" + encodeURIComponent(id)));
  } catch (error) {
    failed(error);
  }
}

async function follow(id, offsets, controller) {
  // Server-sent events read by hand: EventSource cannot send the Authorization header.
  const query = new URLSearchParams({stream: "both", follow: "true",
                                     stdout_offset: offsets.stdout, stderr_offset: offsets.stderr});
  const response = await fetch("/tasks/" + encodeURIComponent(id) + "/output?" + query, {
    headers: {"Authorization": "Bearer " + token, "Accept": "text/event-stream"},
    cache: "no-store", credentials: "omit", signal: controller.signal});
  if (response.status === 401) throw new Refused("token refused");
  if (!response.ok) throw new Error("output: " + response.status);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return false;  // cut before the end event: the caller resumes
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue;
      const payload = JSON.parse(data.join("\n"));
      if (name === "stdout" || name === "stderr") {
        $(name).append(document.createTextNode(payload.text));
        offsets[name] = payload.next;
      } else if (name === "dropped") {
        $(payload.stream).append(document.createTextNode("[" + payload.bytes + " older bytes not kept]\n"));
      } else if (name === "end") {
        return true;
      }
    }
  }
}

async function taskView(id) {
  show("task");
  $("task-id").textContent = id;
  $("stdout").textContent = "";
  $("stderr").textContent = "";
  $("end").hidden = true;
  $("record").replaceChildren();
  await loadRecord(id);
  const controller = new AbortController();
  follower = controller;
  const offsets = {stdout: 0, stderr: 0};
  let refresh = setInterval(() => loadRecord(id), REFRESH_MS);
  try {
    while (!controller.signal.aborted) {
      let ended = false;
      try {
        ended = await follow(id, offsets, controller);
      } catch (error) {
        if (error instanceof Refused || controller.signal.aborted) throw error;
        notice("Output interrupted (" + error.message + "); resuming.");
      }
      if (ended) break;
      await new Promise((resolve) => setTimeout(resolve, 1000));  // resume from the offsets
    }
    notice("");
  } catch (error) {
    failed(error);
  } finally {
    clearInterval(refresh);
  }
  if (!controller.signal.aborted) loadRecord(id);
}

async function cancelTask() {
  const id = $("task-id").textContent;
  if (!confirm("Cancel task " + id + "? Its process group gets SIGTERM, then SIGKILL.")) return;
  try {
    drawRecord(await api("POST", "/tasks/" + encodeURIComponent(id) + "/cancel"));
    notice("Cancelled.", true);
  } catch (error) {
    failed(error);
  }
}

async function purgeTask() {
  const id = $("task-id").textContent;
  if (!confirm("Purge task " + id + "? Its record and output are removed for good.")) return;
  try {
    await api("DELETE", "/tasks/" + encodeURIComponent(id) + "?purge=true");
    notice("Purged " + id + ".", true);
    location.hash = "#/";
  } catch (error) {
    failed(error);
  }
}

// -- the fleet's nodes (GET /fleet/nodes, on an agent started with --fleet)

async function loadNodes() {
  try {
    const nodes = (await api("GET", "/fleet/nodes")).nodes;
    const rows = nodes.map((node) => {
      const row = el("tr", null, "node");
      row.dataset.id = node.id;
      const labels = Object.entries(node.labels).map(([k, v]) => k + "=" + v).join(", ");
      row.append(el("td", node.id), el("td", node.state, "state node-" + node.state),
                 el("td", node.running + " / " + (node.parallel || "unlimited")),
                 el("td", node.heartbeat_age.toFixed(1) + " s ago"), el("td", labels),
                 el("td", node.http || ""));
      return row;
    });
    $("nodes").tBodies[0].replaceChildren(...rows);
    $("nodes").hidden = false;
    $("fleet-none").hidden = true;
  } catch (error) {
    if (error instanceof Refused) return failed(error);
    $("nodes").hidden = true;
    $("fleet-none").textContent = error.message;  // "this agent is not in a fleet (--fleet)"
    $("fleet-none").hidden = false;
  }
}

function fleetView() {
  show("fleet");
  loadNodes();
  refresher = setInterval(loadNodes, REFRESH_MS);
}

// -- launching

function addRow(list, fields) {
  const item = el("li");
  for (const [className, placeholder] of fields) {
    const input = el("input", null, className);
    input.placeholder = placeholder;
    item.append(input, " ");
  }
  const remove = el("button", "remove");
  remove.type = "button";
  remove.addEventListener("click", () => item.remove());
  item.append(remove);
  $(list).append(item);
  item.querySelector("input").focus();
  return item;
}

async function launch(event) {
  event.preventDefault();
  const body = {command: $("launch-command").value};
  body.args = [...document.querySelectorAll("#launch-args input.arg")].map((input) => input.value);
  const timeout = $("launch-timeout").value;
  if (timeout !== "") body.timeout = Number(timeout);
  const env = {};
  for (const item of $("launch-env").children) {
    const name = item.querySelector("input.env-name").value;
    if (name) env[name] = item.querySelector("input.env-value").value;
  }
  if (Object.keys(env).length) body.env = env;
  try {
    const task = await api("POST", "/tasks", body);
    location.hash = "#/tasks/" + task.id;
  } catch (error) {
    failed(error);
  }
}

function launchView() {
  show("launch");
  $("launch-command").focus();
}

// -- routing on the fragment (which never holds the token)

function route() {
  stop();
  if (!token) {
    show("sign-in");
    return;
  }
  const hash = location.hash.replace(/^#\/?/, "");
  const task = /^tasks\/([0-9a-f]+)$/.exec(hash);
  if (task) taskView(task[1]);
  else if (hash === "launch") launchView();
  else if (hash === "fleet") fleetView();
  else listView();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const state of STATES) $("filter-state").append(new Option(state, state));
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  $("filter-state").addEventListener("change", () => { cursors = [null]; loadList(); });
  $("filter-source").addEventListener("change", () => { cursors = [null]; loadList(); });
  let typing = null;  // search the whole history once the typing pauses
  $("filter-command").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { cursors = [null]; loadList(); }, 300);
  });
  $("first-page").addEventListener("click", () => page("first"));
  $("prev-page").addEventListener("click", () => page("prev"));
  $("next-page").addEventListener("click", () => page("next"));
  $("cancel").addEventListener("click", cancelTask);
  $("purge").addEventListener("click", purgeTask);
  $("add-arg").addEventListener("click", () => addRow("launch-args", [["arg", "argument"]]));
  $("add-env").addEventListener("click",
    () => addRow("launch-env", [["env-name", "NAME"], ["env-value", "value"]]));
  $("launch-form").addEventListener("submit", launch);
  window.addEventListener("hashchange", route);
  route();
});
