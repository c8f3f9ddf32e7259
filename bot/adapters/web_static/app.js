// easelbot playground: a channel view over the HTTP API, live through Server-Sent Events.
//
// Who you are is the server's business: it gives this browser a private session cookie (HttpOnly),
// and every job says whether it is `mine`. The page only keeps your display name and, on servers
// that need one, your API key.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const feed = $("#feed");
const cards = new Map();
const store = window.localStorage;
const FINISHED = ["done", "failed", "cancelled"];

const me = {
  name: store.getItem("easelbot.name") || "guest-" + Math.floor(Math.random() * 9000 + 1000),
  key: store.getItem("easelbot.key") || "",
};
store.removeItem("easelbot.user"); // identities are server-issued now
store.setItem("easelbot.name", me.name);
$("#name").value = me.name;
$("#name").addEventListener("change", (event) => {
  me.name = event.target.value.trim() || me.name;
  event.target.value = me.name;
  store.setItem("easelbot.name", me.name);
});

class NeedsKey extends Error {}

function headers(extra = {}) {
  // Header values must be ISO-8859-1: the name travels as percent-encoded UTF-8.
  const out = { "X-Easelbot-Name": encodeURIComponent(me.name), ...extra };
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
    askForKey();
    throw new NeedsKey(data.error || "This server needs an API key.");
  }
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function notice(message) {
  const box = $("#notice");
  box.textContent = message;
  box.hidden = !message;
}

function announce(message) {
  $("#live").textContent = message;
}

function ago(seconds) {
  const date = new Date(seconds * 1000);
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (date.toDateString() === new Date().toDateString()) return time;
  return date.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
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
      const seconds = job.finished && job.started ? (job.finished - job.started).toFixed(1) : "";
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
      if (!(error instanceof NeedsKey)) notice(error.message);
    } finally {
      b.disabled = false;
    }
  });
  return b;
}

function nearBottom() {
  return feed.scrollHeight - feed.scrollTop - feed.clientHeight < 80;
}

function render(job, extra = {}, { scroll = false } = {}) {
  $("#empty").hidden = true;
  let card = cards.get(job.id);
  if (card && FINISHED.includes(card.dataset.state) && !FINISHED.includes(job.state)) return; // a stale copy
  if (!card) {
    const follow = scroll || nearBottom();
    card = $("#card").content.firstElementChild.cloneNode(true);
    card.dataset.id = job.id;
    card.dataset.created = job.created;
    cards.set(job.id, card);
    // In time order, whichever arrives first: the stream's news or the reloaded history.
    const later = [...cards.values()].find((other) => other.isConnected && Number(other.dataset.created) > job.created);
    feed.insertBefore(card, later || null);
    if (follow) card.scrollIntoView({ block: "end" });
  }
  if (job.mine && card.dataset.state && !FINISHED.includes(card.dataset.state) && FINISHED.includes(job.state)) {
    announce(`Your job ${job.id}: ${stateLabel(job)}`);
  }
  card.dataset.state = job.state;
  $(".who", card).textContent = job.user || "someone";
  $(".when", card).textContent = ago(job.created);
  $(".jobid", card).textContent = job.id;
  $(".text", card).textContent = commandText(job);
  const state = $(".state", card);
  state.className = "state " + job.state;
  $(".label", state).textContent = stateLabel(job, extra);
  const cancel = $(".cancel", card);
  cancel.hidden = !(job.mine && (job.state === "queued" || job.state === "running"));
  cancel.onclick = () => api("DELETE", `/api/v1/jobs/${job.id}`).catch((e) => e instanceof NeedsKey || notice(e.message));

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
    const act = (action, index) => async () => {
      const { job: made } = await api("POST", `/api/v1/jobs/${job.id}/actions`, { action, index });
      render(made, {}, { scroll: true });
    };
    const made = job.images.filter((image) => image.kind === "result");
    made.forEach((image) => buttons.appendChild(button("U" + image.index, "Upscale image " + image.index + " ×4", act("upscale", image.index))));
    made.forEach((image) => buttons.appendChild(button("V" + image.index, "Variation of image " + image.index, act("variation", image.index))));
    if (job.task !== "upscale") buttons.appendChild(button("↻ Reroll", "Same settings, new seed", act("reroll")));
    if (job.mine) buttons.appendChild(button("Delete", "Delete these images", () => api("DELETE", `/api/v1/jobs/${job.id}`), "danger"));
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
  remove.title = "Remove the " + label;
  remove.addEventListener("click", () => {
    input.value = "";
    span.remove();
    if (input.id === "image") clearMask(); // a mask without its image would be dropped silently
  });
  span.appendChild(remove);
  box.appendChild(span);
}

function clearMask() {
  $("#mask").value = "";
  attachment($("#mask"), "mask");
  $(".attach.mask").hidden = true;
}

$("#image").addEventListener("change", (event) => {
  attachment(event.target, "image");
  if (!event.target.files.length) clearMask();
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
    render(job, {}, { scroll: true });
    notice("");
    command.value = "";
    $("#image").value = "";
    attachment($("#image"), "image");
    clearMask();
  } catch (error) {
    if (!(error instanceof NeedsKey)) notice(error.message);
  } finally {
    $("#send").disabled = false;
    command.focus();
  }
});

// ---- the API key, asked for in the page (never a blocking prompt) --------------------------------

function askForKey() {
  stopLive();
  const box = $("#keybox");
  if (!box.hidden) return;
  notice("");
  $("#keyhint").textContent = me.key ? "That API key was not accepted; enter another." : "This server needs an API key.";
  box.hidden = false;
  $("#engine").textContent = "needs a key";
  $("#engine").className = "pill down";
  $("#key").focus();
}

$("#keybox").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#key").value.trim();
  if (!key) return;
  me.key = key;
  store.setItem("easelbot.key", key);
  $("#key").value = "";
  $("#keybox").hidden = true;
  startLive();
});

// ---- live updates ---------------------------------------------------------------------------------

const live = { events: null, timer: null };

async function refreshQueue() {
  try {
    const queue = await api("GET", "/api/v1/queue");
    const engine = $("#engine");
    engine.textContent = queue.engine_ready ? "engine ready" : "engine starting…";
    engine.className = "pill " + (queue.engine_ready ? "ready" : "");
    $("#queue").textContent = `${queue.queued} waiting · ${queue.running} running`;
  } catch (error) {
    if (error instanceof NeedsKey) return;
    $("#engine").textContent = "offline";
    $("#engine").className = "pill down";
  }
}

// Reload every job the server would show, and every unfinished card it would not, then re-render:
// the updates sent while the stream was down are lost, so after each (re)connection the page asks.
async function resync() {
  const { jobs } = await api("GET", "/api/v1/jobs");
  const listed = new Set();
  for (const job of jobs) {
    listed.add(job.id);
    render(job);
  }
  for (const [id, card] of cards) {
    if (listed.has(id) || FINISHED.includes(card.dataset.state)) continue;
    try {
      render((await api("GET", `/api/v1/jobs/${id}`)).job);
    } catch (error) {
      if (error instanceof NeedsKey) return;
    }
  }
}

function connect() {
  const events = new EventSource(withKey("/api/v1/events"));
  live.events = events;
  events.addEventListener("update", (event) => {
    const update = JSON.parse(event.data);
    render(update.job, update);
    if (["queued", "started", "done", "failed", "cancelled"].includes(update.kind)) refreshQueue();
  });
  events.addEventListener("error", () => {
    $("#engine").textContent = "reconnecting…";
    $("#engine").className = "pill down";
    // A closed EventSource (e.g. a 401) does not retry by itself: ask the API why, then try again.
    if (events.readyState === EventSource.CLOSED && live.events === events) {
      live.events = null;
      setTimeout(() => live.timer && refreshQueue().then(() => live.timer && !live.events && connect()), 3000);
    }
  });
  events.addEventListener("open", async () => {
    refreshQueue();
    try {
      await resync();
      notice("");
    } catch (error) {
      if (!(error instanceof NeedsKey)) notice(error.message);
    }
  });
}

function stopLive() {
  if (live.events) live.events.close();
  if (live.timer) clearInterval(live.timer);
  live.events = null;
  live.timer = null;
}

function startLive() {
  stopLive();
  live.timer = setInterval(refreshQueue, 10000);
  refreshQueue();
  connect();
}

startLive();
