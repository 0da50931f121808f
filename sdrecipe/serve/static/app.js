// sdrecipe's web view: the live build panel (server-sent events), clickable
// graphs, sortable tables, block sliders and the new-recipe form. No eval, no
// inline handlers: the page's content security policy allows this file only.
"use strict";

const token = JSON.parse(document.body.getAttribute("hx-headers"))["X-Sdrecipe-Token"];
const $ = (selector, root = document) => root.querySelector(selector);

function post(url, body) {
  return fetch(url, {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-Sdrecipe-Token": token},
    body: JSON.stringify(body || {}),
  }).then(async (response) => {
    const data = await response.json().catch(() => ({error: response.statusText}));
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  });
}

function toast(message, kind = "error") {
  const box = document.createElement("div");
  box.className = `toast ${kind}`;
  box.textContent = message;
  document.body.appendChild(box);
  setTimeout(() => box.remove(), 8000);
}

// --- the live build panel ----------------------------------------------------

let shown = null;  // the build the panel follows
const counts = {hits: 0, misses: 0};

function showBuild(record) {
  if (record.state === "queued" && shown && shown !== record.id) return;
  const panel = $("#live");
  if (shown !== record.id) {
    shown = record.id;
    counts.hits = counts.misses = 0;
    $("#live-outputs").replaceChildren();
    $("#live-progress").replaceChildren();
    $("#live-counts").textContent = "";
  }
  panel.hidden = false;
  panel.dataset.state = record.state;
  $("#live-id").textContent = record.id;
  $("#live-state").textContent = record.state;
  $("#live-state").className = `pill ${record.state}`;
  $("#live-target").textContent = record.target;
  $("#live-cancel").hidden = !["queued", "running"].includes(record.state);
  if (record.errors && record.errors.length) {
    $("#live-counts").textContent = record.errors.join("\n");
  }
}

function progressBar(recipe, phase, done, total) {
  const id = `progress-${recipe}`;
  let row = document.getElementById(id);
  if (!row) {
    row = document.createElement("div");
    row.id = id;
    row.className = "progress-row";
    row.innerHTML = '<span class="label"></span><progress max="1" value="0"></progress><span class="numbers"></span>';
    $("#live-progress").appendChild(row);
  }
  row.querySelector(".label").textContent = `${recipe.split("/").pop()}: ${phase}`;
  const bar = row.querySelector("progress");
  bar.max = Math.max(total, 1);
  bar.value = done;
  row.querySelector(".numbers").textContent = `${(done / 1e6).toFixed(1)} / ${(total / 1e6).toFixed(1)} MB`;
}

function buildEvent(message) {
  const {build, event} = message;
  if (build !== shown) return;
  if (event.type === "progress") {
    progressBar(event.recipe, event.phase, event.done, event.total);
  } else if (event.type === "output_started") {
    const item = document.createElement("li");
    item.dataset.output = event.output;
    item.textContent = `${event.output}: ${event.status}${event.reason ? " (" + event.reason + ")" : ""}`;
    $("#live-outputs").appendChild(item);
  } else if (event.type === "output_finished") {
    const item = $(`#live-outputs li[data-output="${CSS.escape(event.output)}"]`) || document.createElement("li");
    item.dataset.output = event.output;
    item.dataset.result = event.result;
    item.textContent = `${event.output}: ${event.result}, ${(event.size / 1e6).toFixed(1)} MB`;
    $("#live-outputs").appendChild(item);
  } else if (event.type === "cache_hit" || event.type === "cache_miss") {
    counts[event.type === "cache_hit" ? "hits" : "misses"] += 1;
    $("#live-counts").textContent = `${counts.misses} computed, ${counts.hits} from cache`;
  } else if (event.type === "note" || event.type === "warning") {
    const note = document.createElement("li");
    note.className = "note";
    note.textContent = event.message;
    $("#live-outputs").appendChild(note);
  } else if (event.type === "recipe_finished" && !event.ok) {
    toast(`${event.recipe}: ${event.error}`);
  }
}

function connect() {
  const source = new EventSource("/api/events");
  const status = $("#connection");
  // The page shows the snapshot it was rendered from; one taken since (before
  // this stream began, so never announced to it) is fetched on connecting.
  source.addEventListener("hello", (e) => {
    status.textContent = "live";
    status.className = "connection live";
    const version = String(JSON.parse(e.data).version);
    if (version !== document.body.dataset.version) {
      document.body.dataset.version = version;
      htmx.trigger(document.body, "recipes-changed");
    }
  });
  source.addEventListener("recipes", (e) => {
    const data = JSON.parse(e.data);
    if (data.error) toast(data.error);
    if (data.version !== undefined) document.body.dataset.version = String(data.version);
    htmx.trigger(document.body, "recipes-changed");
  });
  source.addEventListener("build", (e) => {
    showBuild(JSON.parse(e.data));
    htmx.trigger(document.body, "builds-changed");
  });
  source.addEventListener("build-event", (e) => buildEvent(JSON.parse(e.data)));
  source.onerror = () => { status.textContent = "reconnecting…"; status.className = "connection"; };
}

$("#live-cancel").addEventListener("click", () => {
  if (shown) post(`/api/builds/${shown}/cancel`).catch((error) => toast(error.message));
});

// Build buttons post through htmx; a refusal is shown, an accepted build followed.
document.body.addEventListener("htmx:afterRequest", (e) => {
  const xhr = e.detail.xhr;
  const path = (e.detail.pathInfo || {}).requestPath || "";
  if (!xhr || !path.startsWith("/api/")) return;
  let data = {};
  try { data = JSON.parse(xhr.responseText); } catch (error) { /* not JSON */ }
  if (xhr.status >= 400) toast(data.error || xhr.statusText);
  else if (data.id) showBuild(data);
});

// --- graphs: a click on a box opens its detail --------------------------------

document.addEventListener("click", (e) => {
  const box = e.target.closest && e.target.closest("#graph [data-key]");
  if (!box) return;
  const graph = $("#graph");
  const query = new URLSearchParams({recipe: graph.dataset.recipe, vertex: box.dataset.key});
  graph.querySelectorAll("[data-key].selected").forEach((other) => other.classList.remove("selected"));
  box.classList.add("selected");
  htmx.ajax("GET", `/partials/node?${query}`, {target: "#node", swap: "innerHTML"});
});

// --- sortable tables -----------------------------------------------------------

document.addEventListener("click", (e) => {
  const header = e.target.closest && e.target.closest("table.sortable th");
  if (!header) return;
  const table = header.closest("table");
  const column = Array.from(header.parentNode.children).indexOf(header);
  const numeric = header.dataset.sort === "number";
  const ascending = header.dataset.direction !== "ascending";
  table.querySelectorAll("th").forEach((th) => delete th.dataset.direction);
  header.dataset.direction = ascending ? "ascending" : "descending";
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const value = (row) => {
    const text = row.cells[column].textContent.trim();
    return numeric ? (text === "" ? Infinity : parseFloat(text)) : text;
  };
  rows.sort((a, b) => {
    const x = value(a), y = value(b);
    const order = numeric ? x - y : String(x).localeCompare(String(y));
    return ascending ? order : -order;
  });
  body.replaceChildren(...rows);
});

// --- the new-recipe form -------------------------------------------------------

function chooseTemplate() {
  const chosen = $("#template").value;
  document.querySelectorAll("fieldset.template-fields").forEach((set) => {
    const on = set.dataset.template === chosen;
    set.disabled = !on;
    set.hidden = !on;
  });
}

function blocksField() {
  return $("fieldset.template-fields:not([disabled]) [data-parameter=blocks]");
}

function slidersToField() {
  const field = blocksField();
  if (!field) return;
  const values = Array.from(document.querySelectorAll("#draft [data-block]")).map((s) => s.value);
  field.value = values.join(",");
  field.dispatchEvent(new Event("input", {bubbles: true}));
}

document.addEventListener("input", (e) => {
  if (e.target.matches && e.target.matches("#draft [data-block]")) {
    e.target.nextElementSibling.textContent = e.target.value;
  }
});
document.addEventListener("change", (e) => {
  const target = e.target;
  if (!target.matches) return;
  if (target.matches("select[data-submit]")) target.form.requestSubmit();
  else if (target.matches("#template")) chooseTemplate();
  else if (target.matches("#draft [data-block]")) slidersToField();
  else if (target.matches("#draft select.preset") && target.value) {
    const field = blocksField();
    if (field) {
      field.value = target.selectedOptions[0].textContent;
      field.dispatchEvent(new Event("input", {bubbles: true}));
    }
  }
});
document.addEventListener("click", (e) => {
  if (!(e.target.matches && e.target.matches("#write-recipe"))) return;
  const form = $("#draft-form");
  post("/api/recipes", {file: form.elements.file.value, text: form.elements.text.value})
    .then((data) => {
      $("#written").textContent = `Wrote ${data.written}.`;
      $("#written").className = "valid";
    })
    .catch((error) => {
      $("#written").textContent = error.message;
      $("#written").className = "error";
    });
});

if ($("#template")) chooseTemplate();
connect();
