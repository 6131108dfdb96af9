// Browse: the tenant's jobs as a gallery (filters, pages loaded as you scroll), one job's detail, and compare.
import { html, useEffect, useRef, useState } from "./vendor/preact-htm.js";
import { TERMINAL, call } from "./api.js";
import { prefill } from "./create.js";
import { ErrorBanner, JobWatch, Phase, between, go, randomSeed, seconds, when } from "./ui.js";

const PHASES = ["Pending", "Queued", "Running", "Succeeded", "Failed", "Cancelled"];
const HISTORY_PHASES = ["Succeeded", "Failed", "Cancelled"];

// Jobs ticked for comparing, kept across pages while the tab lives.
export const picked = new Set();

function Card({ job, onPick }) {
  const first = job.images[0];
  return html`<li class="card" data-job=${job.id} data-phase=${job.phase}>
    <a href=${`#/jobs/${job.id}`} class="thumb" aria-label=${`job ${job.id}: ${job.request.prompt}`}>
      ${first ? html`<img src=${first.url} alt="" loading="lazy" width=${first.width} height=${first.height} />`
        : html`<span class="placeholder">${job.phase}</span>`}
    </a>
    <div class="meta">
      <${Phase} phase=${job.phase} />
      <span class="muted">${job.images.length > 1 ? `${job.images.length} images · ` : ""}${job.model}</span>
      <p class="prompt" title=${job.request.prompt}>${job.request.prompt}</p>
      <span class="muted">${when(job.createdAt || job.finishedAt)}</span>
      ${first && html`<label class="check pick"><input type="checkbox" checked=${picked.has(job.id)}
        onChange=${(e) => onPick(job.id, e.target.checked)} /> Compare</label>`}
    </div>
  </li>`;
}

export function JobsPage({ me, models, query }) {
  const [filters, setFilters] = useState({
    model: query.get("model") || "",
    phase: query.get("phase") || "",
    since: query.get("since") || "",
    until: query.get("until") || "",
    source: query.get("source") || "live",
  });
  const [jobs, setJobs] = useState([]);
  const [token, setToken] = useState(null);
  const [loading, setLoading] = useState(false);
  const [error, setError] = useState(null);
  const [count, setCount] = useState(picked.size);
  const more = useRef(null);
  const generation = useRef(0);

  async function load(reset) {
    const mine = reset ? ++generation.current : generation.current;
    setLoading(true);
    setError(null);
    try {
      const history = filters.source === "history";
      const page = await call("/v1/jobs", {
        query: {
          limit: 24,
          model: filters.model,
          phase: filters.phase,
          source: filters.source,
          since: history && filters.since ? new Date(filters.since).toISOString() : "",
          until: history && filters.until ? new Date(filters.until).toISOString() : "",
          page_token: reset ? "" : token,
        },
      });
      if (mine !== generation.current) return;
      // The live list has no date filter in the API: the dates narrow the pages loaded here.
      const since = filters.since ? new Date(filters.since) : null;
      const until = filters.until ? new Date(filters.until) : null;
      const shown = page.data.filter((j) => {
        if (history) return true;
        const t = new Date(j.createdAt || j.finishedAt || 0);
        return (!since || t >= since) && (!until || t < until);
      });
      setJobs((old) => (reset ? shown : [...old, ...shown]));
      setToken(page.nextPageToken || null);
    } catch (e) {
      if (mine === generation.current) setError(e);
    } finally {
      if (mine === generation.current) setLoading(false);
    }
  }

  useEffect(() => {
    load(true);
  }, [filters]);

  // Infinite scroll: the next page loads when the end of the list comes into view.
  useEffect(() => {
    if (!more.current || !token) return;
    const seen = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting) && !loading) load(false);
    });
    seen.observe(more.current);
    return () => seen.disconnect();
  }, [token, loading]);

  function set(name) {
    return (e) => setFilters({ ...filters, [name]: e.target.value });
  }
  function pick(id, on) {
    if (on) picked.add(id);
    else picked.delete(id);
    setCount(picked.size);
  }

  const phases = filters.source === "history" ? HISTORY_PHASES : PHASES;
  return html`<section class="jobs">
    <h1>Jobs</h1>
    <form class="filters" role="search" onSubmit=${(e) => e.preventDefault()}>
      ${me.history && html`<label>Source <select name="source" value=${filters.source} onChange=${set("source")}>
        <option value="live">Live</option><option value="history">History</option></select></label>`}
      <label>Model <select name="model" value=${filters.model} onChange=${set("model")}>
        <option value="">All models</option>
        ${models.filter((m) => !m.alias_of).map((m) => html`<option value=${m.id}>${m.id}</option>`)}
      </select></label>
      <label>Phase <select name="phase" value=${filters.phase} onChange=${set("phase")}>
        <option value="">Any phase</option>
        ${phases.map((p) => html`<option value=${p}>${p}</option>`)}
      </select></label>
      <label>From <input type="date" name="since" value=${filters.since} onChange=${set("since")} /></label>
      <label>To <input type="date" name="until" value=${filters.until} onChange=${set("until")} /></label>
      <button type="button" class="secondary" onClick=${() => load(true)}>Refresh</button>
      <button type="button" disabled=${count < 2} onClick=${() => go(`/compare/${[...picked].join(",")}`)}>
        Compare ${count ? `(${count})` : ""}</button>
    </form>
    <${ErrorBanner} error=${error} />
    <ul class="gallery" aria-busy=${loading ? "true" : "false"}>
      ${jobs.map((j) => html`<${Card} key=${j.id} job=${j} onPick=${pick} />`)}
    </ul>
    ${!loading && !error && jobs.length === 0 && html`<p class="muted empty">No jobs here yet.</p>`}
    ${token && html`<div ref=${more} class="more"><button type="button" class="secondary" onClick=${() => load(false)} disabled=${loading}>
      ${loading ? "Loading…" : "Load more"}</button></div>`}
  </section>`;
}

function Row({ name, value }) {
  if (value === undefined || value === null || value === "") return null;
  return html`<tr><th scope="row">${name}</th><td>${typeof value === "object" ? JSON.stringify(value) : String(value)}</td></tr>`;
}

export function DetailPage({ id }) {
  const [job, setJob] = useState(null);
  const [error, setError] = useState(null);

  function fetchJob() {
    call(`/v1/jobs/${encodeURIComponent(id)}`).then(setJob, setError);
  }
  useEffect(fetchJob, [id]);

  if (error) return html`<section><h1>Job ${id}</h1><${ErrorBanner} error=${error} /></section>`;
  if (!job) return html`<section aria-busy="true"><h1>Job ${id}</h1><p class="muted">Loading…</p></section>`;

  const req = job.request;
  const queued = job.queueSeconds ?? between(job.queuedAt, job.startedAt);
  function again(extra) {
    prefill({ ...req, ...extra });
    go("/create");
  }
  return html`<section class="detail" data-job=${job.id} data-phase=${job.phase}>
    <header class="detail-head">
      <h1>Job <code>${job.id}</code></h1>
      <${Phase} phase=${job.phase} />
    </header>
    ${!TERMINAL.has(job.phase) && html`<${JobWatch} id=${job.id} initial=${job} onDone=${setJob} />`}
    ${job.phase === "Failed" && html`<p class="error-text" role="status">${job.reason}: ${job.message}</p>`}
    <div class="images">
      ${job.images.map((im) => html`<figure>
        <a href=${im.url} target="_blank" rel="noopener"><img src=${im.url} alt=${`image ${im.index}: ${req.prompt}`} width=${im.width} height=${im.height} /></a>
        <figcaption>${im.width}×${im.height} · seed ${im.seed} ·
          <a href=${im.url} download=${`${job.id}-${im.index}.${(req.outputFormat || "png").replace("jpeg", "jpg")}`}>Download</a></figcaption>
      </figure>`)}
    </div>
    <div class="actions">
      <button type="button" onClick=${() => again({})}>Use these settings again</button>
      <button type="button" class="secondary" onClick=${() => again({ seed: randomSeed() })}>Vary seed</button>
    </div>
    <div class="tables">
      <table>
        <caption>Request</caption>
        <tbody>
          <${Row} name="Prompt" value=${req.prompt} />
          <${Row} name="Negative prompt" value=${req.negativePrompt} />
          <${Row} name="Task" value=${req.task} />
          <${Row} name="Model" value=${job.model} />
          <${Row} name="Size" value=${`${req.width}×${req.height}`} />
          <${Row} name="Steps" value=${req.steps ?? "model default"} />
          <${Row} name="Guidance" value=${req.guidanceScale ?? "model default"} />
          <${Row} name="Seed" value=${job.seed} />
          <${Row} name="Images" value=${req.numImages} />
          <${Row} name="Strength" value=${req.strength} />
          <${Row} name="Reference images" value=${(req.referenceImages || []).length || null} />
          <${Row} name="Adapters" value=${(req.loras || []).map((l) => `${l.name} × ${l.scale ?? "default"}`).join(", ")} />
          <${Row} name="Priority" value=${req.priority} />
          <${Row} name="Format" value=${req.outputFormat} />
        </tbody>
      </table>
      <table>
        <caption>Run</caption>
        <tbody>
          <${Row} name="Phase" value=${job.reason ? `${job.phase} (${job.reason})` : job.phase} />
          <${Row} name="Created" value=${when(job.createdAt)} />
          <${Row} name="Queued" value=${when(job.queuedAt)} />
          <${Row} name="Started" value=${when(job.startedAt)} />
          <${Row} name="Finished" value=${when(job.finishedAt)} />
          <${Row} name="Queue time" value=${queued === null ? null : seconds(queued)} />
          <${Row} name="Run time" value=${job.runSeconds === null ? null : seconds(job.runSeconds)} />
          <${Row} name="Worker" value=${job.worker} />
          <${Row} name="Attempts" value=${job.attempts} />
          <${Row} name="GPU-seconds" value=${job.gpuSeconds} />
          <${Row} name="Cost" value=${job.cost !== null && job.cost !== undefined ? `${job.cost.toFixed(4)} ${job.currency || ""}` : null} />
          <${Row} name="Mode" value=${job.mode} />
        </tbody>
      </table>
    </div>
  </section>`;
}

export function ComparePage({ ids }) {
  const [jobs, setJobs] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    Promise.all(ids.map((id) => call(`/v1/jobs/${encodeURIComponent(id)}`))).then(setJobs, setError);
  }, [ids.join(",")]);
  if (error) return html`<section><h1>Compare</h1><${ErrorBanner} error=${error} /></section>`;
  if (!jobs) return html`<section aria-busy="true"><h1>Compare</h1><p class="muted">Loading…</p></section>`;
  const fields = ["prompt", "negativePrompt", "model", "width", "height", "steps", "guidanceScale", "seed", "strength"];
  const value = (j, f) => (f === "seed" ? j.seed : f === "model" ? j.model : j.request[f]);
  const differs = (f) => new Set(jobs.map((j) => JSON.stringify(value(j, f) ?? null))).size > 1;
  return html`<section class="compare">
    <h1>Compare</h1>
    <div class="compare-grid" style=${{ "--columns": jobs.length }}>
      ${jobs.map((j) => html`<figure data-job=${j.id}>
        ${j.images[0] ? html`<img src=${j.images[0].url} alt=${`${j.id}: ${j.request.prompt}`} />` : html`<span class="placeholder">${j.phase}</span>`}
        <figcaption><a href=${`#/jobs/${j.id}`}>${j.id}</a>
          <dl>${fields.map((f) => value(j, f) !== undefined && value(j, f) !== null &&
            html`<div class=${differs(f) ? "differs" : ""}><dt>${f}</dt><dd>${String(value(j, f))}</dd></div>`)}</dl>
        </figcaption>
      </figure>`)}
    </div>
  </section>`;
}
