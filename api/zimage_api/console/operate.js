// Operate (admin keys): the ModelDeployments' replicas, queues, busy workers and recent throughput, refreshed
// every few seconds; the workflows and their step graphs.
import { html, useEffect, useState } from "./vendor/preact-htm.js";
import { call } from "./api.js";
import { ErrorBanner, Phase, when } from "./ui.js";

const REFRESH_MS = 5000;

function usePolled(path) {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    let stop = false;
    let timer = null;
    async function tick() {
      try {
        const got = await call(path);
        if (!stop) {
          setData(got);
          setError(null);
        }
      } catch (e) {
        if (!stop) setError(e);
      }
      if (!stop && !document.hidden) timer = setTimeout(tick, REFRESH_MS);
    }
    const wake = () => !document.hidden && !stop && (clearTimeout(timer), tick());
    document.addEventListener("visibilitychange", wake);
    tick();
    return () => {
      stop = true;
      clearTimeout(timer);
      document.removeEventListener("visibilitychange", wake);
    };
  }, [path]);
  return [data, error];
}

// Jobs finished per minute as an SVG bar chart (attributes, not inline styles: the CSP forbids those).
function Sparkline({ points, label }) {
  const w = 150;
  const h = 36;
  const top = Math.max(1, ...points.map((p) => p.jobs));
  const bar = w / Math.max(points.length, 1);
  const total = points.reduce((s, p) => s + p.jobs, 0);
  return html`<svg class="spark" viewBox=${`0 0 ${w} ${h}`} width=${w} height=${h} role="img"
      aria-label=${`${label}: ${total} jobs in the last ${points.length} minutes`}>
    ${points.map((p, i) => {
      const bh = (p.jobs / top) * (h - 2);
      return html`<rect x=${i * bar + 1} y=${h - bh} width=${bar - 2} height=${bh}><title>${when(p.minute)}: ${p.jobs} jobs, ${p.images} images</title></rect>`;
    })}
  </svg>`;
}

function Deployments() {
  const [data, error] = usePolled("/v1/deployments");
  return html`<section aria-labelledby="md-title">
    <h2 id="md-title">Model deployments</h2>
    <${ErrorBanner} error=${error} />
    ${data && html`<div class="table-wrap"><table class="deployments">
      <thead><tr>
        <th scope="col">Name</th><th scope="col">Variant</th><th scope="col">Replicas</th><th scope="col">Queue</th>
        <th scope="col">In flight</th><th scope="col">Workers busy / idle</th><th scope="col">Jobs per minute (15 min)</th><th scope="col">Ready</th>
      </tr></thead>
      <tbody>
        ${data.data.map((d) => {
          const ready = (d.conditions || []).find((c) => c.type === "Ready");
          const recent = d.throughput.reduce((s, p) => s + p.jobs, 0);
          return html`<tr data-deployment=${d.id}>
            <th scope="row">${d.id}</th>
            <td>${d.variant}</td>
            <td>${d.readyReplicas ?? 0}/${d.desiredReplicas ?? d.replicas ?? 0}</td>
            <td data-testid="queue">${d.queueLength}</td>
            <td>${d.inFlight}</td>
            <td>${d.workers.busy} / ${d.workers.idle}</td>
            <td><${Sparkline} points=${d.throughput} label=${d.id} /> <span class="muted" data-testid="recent">${recent} job${recent === 1 ? "" : "s"}</span></td>
            <td>${ready ? html`<span title=${ready.message}>${ready.status === "True" ? "yes" : ready.reason}</span>` : "—"}</td>
          </tr>`;
        })}
      </tbody>
    </table></div>`}
  </section>`;
}

// Steps in columns by depth: a step sits one column right of the deepest step it waits for.
function layers(steps) {
  const depth = {};
  const byName = Object.fromEntries(steps.map((s) => [s.name, s]));
  const visit = (s, seen = new Set()) => {
    if (depth[s.name] !== undefined) return depth[s.name];
    if (seen.has(s.name)) return 0;
    seen.add(s.name);
    const d = Math.max(-1, ...(s.dependsOn || []).filter((n) => byName[n]).map((n) => visit(byName[n], seen))) + 1;
    depth[s.name] = d;
    return d;
  };
  steps.forEach((s) => visit(s));
  const columns = [];
  for (const s of steps) (columns[depth[s.name]] ||= []).push(s);
  return columns;
}

function StepGraph({ workflow }) {
  return html`<ol class="graph" aria-label=${`steps of ${workflow.id}`}>
    ${layers(workflow.steps).map((column, i) => html`<li class="layer"><span class="sr-only">Stage ${i + 1}</span>
      <ul>${column.map((s) => html`<li class=${`step phase-${s.phase.toLowerCase()}`} data-step=${s.name}>
        <strong>${s.name}</strong> <${Phase} phase=${s.phase} />
        <span class="muted">${s.model}${s.count ? ` · ${s.succeeded}/${s.count}` : ""}</span>
        ${s.dependsOn && s.dependsOn.length > 0 && html`<span class="muted after">after ${s.dependsOn.join(", ")}</span>`}
        ${s.message && html`<span class="error-text">${s.message}</span>`}
      </li>`)}</ul></li>`)}
  </ol>`;
}

function Workflows() {
  const [data, error] = usePolled("/v1/workflows");
  const [open, setOpen] = useState(null);
  if (error && error.status === 404) return null; // no workflow capability in this API
  return html`<section aria-labelledby="wf-title">
    <h2 id="wf-title">Workflows</h2>
    <${ErrorBanner} error=${error} />
    ${data && data.data.length === 0 && html`<p class="muted">No workflows.</p>`}
    ${data && html`<ul class="workflows">${data.data.map((w) => html`<li data-workflow=${w.id}>
      <button type="button" class="link" aria-expanded=${open === w.id ? "true" : "false"} onClick=${() => setOpen(open === w.id ? null : w.id)}>
        ${w.id}</button> <${Phase} phase=${w.phase} /> <span class="muted">${w.progress.summary || ""} · ${when(w.createdAt)}</span>
      ${open === w.id && html`<${StepGraph} workflow=${w} />`}
    </li>`)}</ul>`}
  </section>`;
}

export function OperatePage({ me }) {
  if (!me.admin) return html`<section><h1>Operate</h1><p role="alert" class="error">This page needs an admin API key.</p></section>`;
  return html`<section class="operate"><h1>Operate</h1><${Deployments} /><${Workflows} /></section>`;
}
