// The public REST API, as the console calls it: the key from this tab's session storage as a bearer token on
// every request, errors as the API words them, and a job's Server-Sent Events read through fetch (EventSource
// cannot send an Authorization header, and the key must never go into a URL).

const KEY = "zimage.apiKey";
// The API's root, wherever the console is mounted: the page is <root>/ui/.
export const ROOT = new URL("..", new URL(".", document.baseURI)).pathname.replace(/\/$/, "");

export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  set(key) {
    sessionStorage.setItem(KEY, key);
  },
  clear() {
    sessionStorage.removeItem(KEY);
  },
};

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.param = e.param || null;
    this.code = e.code || null;
  }
}

function headers(extra) {
  const h = { Accept: "application/json", ...extra };
  if (session.key) h.Authorization = `Bearer ${session.key}`;
  return h;
}

async function failure(r) {
  let body = null;
  try {
    body = await r.json();
  } catch {
    /* not JSON: the status says it */
  }
  return new ApiError(r.status, body);
}

export async function call(path, { method = "GET", json, form, query, signal } = {}) {
  let url = ROOT + path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
    if ([...q].length) url += `?${q}`;
  }
  const extra = {};
  let body;
  if (json !== undefined) {
    extra["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const r = await fetch(url, { method, headers: headers(extra), body, signal, cache: "no-store" });
  if (r.status === 401 && session.key) window.dispatchEvent(new CustomEvent("zimage:unauthorized"));
  if (!r.ok) throw await failure(r);
  return r.status === 204 ? null : r.json();
}

// Yields {event, data} for each Server-Sent Event of `path` until the stream ends or `signal` aborts.
export async function* events(path, signal) {
  const r = await fetch(ROOT + path, { headers: headers({ Accept: "text/event-stream" }), signal, cache: "no-store" });
  if (!r.ok) throw await failure(r);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

export const TERMINAL = new Set(["Succeeded", "Failed", "Cancelled"]);
