// easelbot playground: a channel view over the HTTP API, live through Server-Sent Events.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const feed = $("#feed");
const cards = new Map();
const store = window.localStorage;

const me = {
  id: store.getItem("easelbot.user") || (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2)),
  name: store.getItem("easelbot.name") || "guest-" + Math.floor(Math.random() * 9000 + 1000),
  key: store.getItem("easelbot.key") || "",
};
store.setItem("easelbot.user", me.id);
store.setItem("easelbot.name", me.name);
$("#name").value = me.name;
$("#name").addEventListener("change", (event) => {
  me.name = event.target.value.trim() || me.name;
  store.setItem("easelbot.name", me.name);
});

function headers(extra = {}) {
  const out = { "X-Easelbot-User": me.id, "X-Easelbot-Name": me.name, ...extra };
  if (me.key) out.Authorization = "Bearer " + me.key;
  return out;
}

function withKey(url) {
  return me.key ? url + (url.includes("?") ? "&" : "?") + "key=" + encodeURIComponent(me.key) : url;
}

async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    const key = window.prompt("This server needs an API key:");
    if (key) {
      me.key = key.trim();
      store.setItem("easelbot.key", me.key);
      return api(method, path, body);
    }
  }
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function notice(message) {
  const box = $("#notice");
  box.textContent = message;
  box.hidden = !message;
}

function ago(seconds) {
  const date = new Date(seconds * 1000);
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function commandText(job) {
  const name = { txt2img: "/imagine", img2img: "/edit", inpaint: "/edit", upscale: "/upscale" }[job.task];
  const parts = [name, job.prompt];
  if (job.negative_prompt) parts.push("--no " + job.negative_prompt);
  if (job.task !== "upscale") parts.push(`--size ${job.width}x${job.height}`);
  if (job.count > 1) parts.push("--n " + job.count);
  parts.push("--seed " + job.seed);
  return parts.filter(Boolean).join(" ");
}

function stateLabel(job, extra = {}) {
  switch (job.state) {
    case "queued": {
      const position = extra.position ?? job.position;
      const eta = extra.eta ?? job.eta;
      return `Queued${position ? " #" + position : ""}${eta ? ` · about ${Math.max(1, Math.round(eta))} s` : ""}`;
    }
    case "running":
      return extra.total ? `Running · step ${extra.step}/${extra.total}` : "Running…";
    case "done": {
      const seconds = job.finished && job.created ? (job.finished - job.created).toFixed(1) : "";
      return job.images.length ? `Done${seconds ? " in " + seconds + " s" : ""}` : job.message || "Done";
    }
    case "cancelled":
      return "Cancelled";
    default:
      return "Failed: " + (job.message || job.reason || "unknown error");
  }
}

function button(label, title, onClick, className = "") {
  const b = document.createElement("button");
  b.textContent = label;
  b.title = title;
  if (className) b.className = className;
  b.addEventListener("click", async () => {
    b.disabled = true;
    try {
      await onClick();
    } catch (error) {
      notice(error.message);
    } finally {
      b.disabled = false;
    }
  });
  return b;
}

function render(job, extra = {}) {
  $("#empty").hidden = true;
  let card = cards.get(job.id);
  if (!card) {
    card = $("#card").content.firstElementChild.cloneNode(true);
    card.dataset.id = job.id;
    cards.set(job.id, card);
    feed.appendChild(card);
    feed.scrollTop = feed.scrollHeight;
  }
  $(".who", card).textContent = job.user || "someone";
  $(".when", card).textContent = ago(job.created);
  $(".jobid", card).textContent = job.id;
  $(".text", card).textContent = commandText(job);
  const state = $(".state", card);
  state.className = "state " + job.state;
  $(".label", state).textContent = stateLabel(job, extra);
  const mine = job.user_id === me.id || job.user_id.startsWith("key-");
  const cancel = $(".cancel", card);
  cancel.hidden = !(mine && (job.state === "queued" || job.state === "running"));
  cancel.onclick = () => api("DELETE", `/api/v1/jobs/${job.id}`).catch((e) => notice(e.message));

  const bar = $(".bar", card);
  const preview = $(".preview", card);
  if (job.state === "running" && extra.total) {
    bar.hidden = false;
    $(".fill", bar).style.width = Math.round((100 * extra.step) / extra.total) + "%";
  } else if (job.state !== "running") {
    bar.hidden = true;
  }
  if (extra.preview) {
    preview.src = extra.preview;
    preview.hidden = false;
  }
  if (job.state !== "running") preview.hidden = true;

  const results = $(".results", card);
  const buttons = $(".buttons", card);
  if (job.state === "done" && results.childElementCount !== job.images.length) {
    results.replaceChildren();
    buttons.replaceChildren();
    for (const image of job.images) {
      const figure = document.createElement("figure");
      if (image.nsfw) figure.className = "nsfw";
      const img = document.createElement("img");
      img.src = withKey(image.url);
      img.alt = `${job.task} result ${image.index}`;
      img.loading = "lazy";
      img.addEventListener("click", () => window.open(withKey(image.url), "_blank"));
      const caption = document.createElement("figcaption");
      caption.textContent = `${image.index} · ${image.width}×${image.height} · seed ${image.seed}` +
        (image.kind === "bicubic" ? " · plain bicubic" : "") + (image.nsfw ? " · flagged" : "");
      figure.append(img, caption);
      results.appendChild(figure);
    }
    const act = (action, index) => () => api("POST", `/api/v1/jobs/${job.id}/actions`, { action, index });
    const made = job.images.filter((image) => image.kind === "result");
    made.forEach((image) => buttons.appendChild(button("U" + image.index, "Upscale image " + image.index + " ×4", act("upscale", image.index))));
    made.forEach((image) => buttons.appendChild(button("V" + image.index, "Variation of image " + image.index, act("variation", image.index))));
    if (job.task !== "upscale") buttons.appendChild(button("↻ Reroll", "Same settings, new seed", act("reroll")));
    if (mine) buttons.appendChild(button("Delete", "Delete these images", () => api("DELETE", `/api/v1/jobs/${job.id}`), "danger"));
  }
  if (job.state === "done" && job.images.length === 0) {
    results.replaceChildren();
    buttons.replaceChildren();
  }
}

function attachment(input, label) {
  const box = $("#attachments");
  const tag = box.querySelector(`[data-for="${input.id}"]`);
  if (tag) tag.remove();
  if (!input.files.length) return;
  const span = document.createElement("span");
  span.dataset.for = input.id;
  span.textContent = `${label}: ${input.files[0].name}`;
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "✕";
  remove.addEventListener("click", () => {
    input.value = "";
    span.remove();
  });
  span.appendChild(remove);
  box.appendChild(span);
}

$("#image").addEventListener("change", (event) => {
  attachment(event.target, "image");
  $(".attach.mask").hidden = !event.target.files.length;
  const command = $("#command");
  if (event.target.files.length && !/^\/(edit|upscale)/.test(command.value)) command.value = "/edit " + command.value.replace(/^\/imagine\s*/, "");
});
$("#mask").addEventListener("change", (event) => attachment(event.target, "mask"));

$("#form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const command = $("#command");
  let text = command.value.trim();
  if (!text) return;
  if (!text.startsWith("/")) text = "/imagine " + text;
  const image = $("#image").files[0];
  const mask = $("#mask").files[0];
  let body = { command: text };
  if (image) {
    body = new FormData();
    body.append("command", text);
    body.append("image", image);
    if (mask) body.append("mask", mask);
  }
  $("#send").disabled = true;
  try {
    const { job } = await api("POST", "/api/v1/jobs", body);
    render(job);
    notice("");
    command.value = "";
    for (const id of ["image", "mask"]) {
      $("#" + id).value = "";
      attachment($("#" + id), id);
    }
    $(".attach.mask").hidden = true;
  } catch (error) {
    notice(error.message);
  } finally {
    $("#send").disabled = false;
    command.focus();
  }
});

async function refreshQueue() {
  try {
    const queue = await api("GET", "/api/v1/queue");
    const engine = $("#engine");
    engine.textContent = queue.engine_ready ? "engine ready" : "engine starting…";
    engine.className = "pill " + (queue.engine_ready ? "ready" : "");
    $("#queue").textContent = `${queue.queued} waiting · ${queue.running} running`;
  } catch (error) {
    $("#engine").textContent = "offline";
    $("#engine").className = "pill down";
  }
}

function connect() {
  const events = new EventSource(withKey("/api/v1/events"));
  events.addEventListener("update", (event) => {
    const update = JSON.parse(event.data);
    render(update.job, update);
    if (["queued", "started", "done", "failed", "cancelled"].includes(update.kind)) refreshQueue();
  });
  events.addEventListener("error", () => {
    $("#engine").textContent = "reconnecting…";
    $("#engine").className = "pill down";
  });
  events.addEventListener("open", refreshQueue);
}

(async function start() {
  try {
    const { jobs } = await api("GET", "/api/v1/jobs");
    jobs.forEach((job) => render(job));
  } catch (error) {
    notice(error.message);
  }
  connect();
  refreshQueue();
  setInterval(refreshQueue, 10000);
})();
