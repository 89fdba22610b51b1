// What every workbench page shares: the navigation, the model's name, calls to the JSON API,
// the status line and the polling of a background job.
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(2));
const PAGES = ["lens", "edit", "erase", "trace", "neurons"];

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function say(text, error = false) {
  $("status").className = error ? "error" : "";
  $("status").textContent = text;
}

async function call(url, options) {
  const r = await fetch(url, options);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function post(url, body) {
  return call(url, { method: "POST", headers: { "content-type": "application/json" },
                     body: JSON.stringify(body) });
}

// Start a job with POST `url` and wait for it, showing its phase and a progress bar;
// resolves to the job's result, rejects with its error.
async function runJob(url, body) {
  const { job } = await post(url, body);
  for (;;) {
    const j = await call(`/api/jobs/${job}`);
    if (j.state === "done") { say(`done in ${j.seconds} s`); return j.result; }
    if (j.state === "error") throw new Error(j.error);
    const bar = Object.assign(document.createElement("progress"), { max: j.steps + 1,
                                                                    value: j.step });
    $("status").replaceChildren(bar, ` ${j.phase || "waiting for the model"} (${j.seconds} s)`);
    await new Promise((ok) => setTimeout(ok, 400));
  }
}

// Settings typed as JSON into the textarea `id`, or undefined when it is empty.
function settings(id) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  try { return JSON.parse(text); } catch (e) { throw new Error(`settings are not JSON: ${e.message}`); }
}

// The navigation bar and the model's name; returns /api/info.
async function page() {
  const nav = document.createElement("nav");
  for (const p of PAGES) nav.append(Object.assign(el("a", p), { href: `/${p}` }));
  document.body.prepend(nav);
  const info = await call("/api/info");
  $("model").textContent = `· ${info.model}`;
  return info;
}
