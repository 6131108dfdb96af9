// Small pieces every page uses: the router, formatting, the error banner, phase badges, the job watcher.
import { html, useEffect, useState } from "./vendor/preact-htm.js";
import { ApiError, TERMINAL, call, events } from "./api.js";

export { html };

// -- routing: #/path?query --------------------------------------------------------------------------------------
export function parseRoute() {
  const raw = location.hash.replace(/^#/, "") || "/create";
  const [path, query = ""] = raw.split("?");
  return { path, parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(query) };
}

export function go(path) {
  location.hash = `#${path}`;
}

export function useRoute() {
  const [route, setRoute] = useState(parseRoute());
  useEffect(() => {
    const on = () => setRoute(parseRoute());
    window.addEventListener("hashchange", on);
    return () => window.removeEventListener("hashchange", on);
  }, []);
  return route;
}

// -- formatting --------------------------------------------------------------------------------------------------
export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function seconds(s) {
  if (s === null || s === undefined) return "—";
  return s < 60 ? `${s.toFixed(s < 10 ? 2 : 1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

export function between(a, b) {
  if (!a || !b) return null;
  return (new Date(b) - new Date(a)) / 1000;
}

export function randomSeed() {
  const a = new Uint32Array(1);
  crypto.getRandomValues(a);
  return a[0];
}

// -- pieces ------------------------------------------------------------------------------------------------------
export function ErrorBanner({ error }) {
  if (!error) return null;
  const text = error instanceof ApiError && error.param ? `${error.message}` : error.message || String(error);
  return html`<div class="error" role="alert" data-status=${error.status || ""}>${text}</div>`;
}

export function Phase({ phase }) {
  return html`<span class=${`phase phase-${(phase || "Pending").toLowerCase()}`}>${phase || "Pending"}</span>`;
}

export function ProgressBar({ step, total, label }) {
  const pct = total ? Math.round((100 * step) / total) : 0;
  return html`<div class="progress-row">
    <progress max="100" value=${pct} aria-label=${label}>${pct}%</progress>
    <span class="steps" data-testid="steps">${total ? `step ${step}/${total} · ${pct}%` : "waiting"}</span>
  </div>`;
}

// One job, followed live through its event stream: phase, step counter, progress, queue, cancel, thumbnails.
export function JobWatch({ id, initial, onDone }) {
  const [job, setJob] = useState(initial || null);
  const [progress, setProgress] = useState(initial ? initial.progress : { step: 0, totalSteps: 0 });
  const [queue, setQueue] = useState(null);
  const [error, setError] = useState(null);

  useEffect(() => {
    const abort = new AbortController();
    (async () => {
      for (let tries = 0; tries < 5 && !abort.signal.aborted; tries++) {
        try {
          for await (const { event, data } of events(`/v1/jobs/${encodeURIComponent(id)}/events`, abort.signal)) {
            if (event === "progress") setProgress({ step: data.step, totalSteps: data.totalSteps });
            else if (data && data.id) {
              setJob(data);
              if (data.progress && data.progress.totalSteps) setProgress(data.progress);
              if (TERMINAL.has(data.phase)) {
                if (onDone) onDone(data);
                return;
              }
            }
          }
          return;
        } catch (e) {
          if (abort.signal.aborted) return;
          if (e instanceof ApiError) return setError(e);
          await new Promise((r) => setTimeout(r, 1000 * (tries + 1))); // the stream dropped: open it again
        }
      }
    })();
    return () => abort.abort();
  }, [id]);

  const phase = job ? job.phase : "Pending";
  useEffect(() => {
    if (!job || !["Pending", "Queued"].includes(phase)) return;
    call("/v1/models")
      .then((m) => setQueue((m.data.find((x) => x.id === job.model) || {}).queue_length))
      .catch(() => {});
  }, [phase]);

  async function cancel() {
    try {
      setJob(await call(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" }));
    } catch (e) {
      setError(e);
    }
  }

  const done = TERMINAL.has(phase);
  const shown = phase === "Succeeded" ? { step: progress.totalSteps, totalSteps: progress.totalSteps } : progress;
  return html`<article class="watch" data-job=${id} data-phase=${phase} aria-live="polite">
    <header>
      <a href=${`#/jobs/${id}`} class="job-id">${id}</a>
      <${Phase} phase=${phase} />
    </header>
    ${job && html`<p class="prompt">${job.request.prompt}</p>`}
    ${(!done || phase === "Succeeded") && html`<${ProgressBar} step=${shown.step} total=${shown.totalSteps} label=${`progress of ${id}`} />`}
    ${!done && ["Pending", "Queued"].includes(phase) && queue !== null &&
      html`<p class="muted">${queue} job${queue === 1 ? "" : "s"} queued for ${job.model}</p>`}
    ${job && job.message && phase === "Failed" && html`<p class="error-text">${job.reason}: ${job.message}</p>`}
    ${done && job && job.images.length > 0 &&
      html`<div class="thumbs">${job.images.map(
        (im) => html`<a href=${`#/jobs/${id}`}><img src=${im.url} alt=${`image ${im.index} of ${id}`} width=${im.width} height=${im.height} /></a>`,
      )}</div>`}
    ${!done && html`<button type="button" class="secondary" onClick=${cancel}>Cancel</button>`}
    <${ErrorBanner} error=${error} />
  </article>`;
}
