// Create: the job form (text-to-image, image-to-image, inpaint with a mask painted here, edit with reference
// images), offering the tasks the chosen model does, and the jobs it started.
import { html, useEffect, useRef, useState } from "./vendor/preact-htm.js";
import { ApiError, call } from "./api.js";
import { ErrorBanner, JobWatch, randomSeed } from "./ui.js";

export const SIZES = [
  ["1024x1024", "Square 1024×1024"],
  ["1152x896", "Landscape 1152×896"],
  ["896x1152", "Portrait 896×1152"],
  ["1344x768", "Wide 1344×768"],
  ["768x1344", "Tall 768×1344"],
  ["512x512", "Small 512×512"],
  ["256x256", "Preview 256×256"],
  ["custom", "Custom…"],
];

export const TASKS = [
  ["text-to-image", "Text to image"],
  ["image-to-image", "Image to image"],
  ["inpaint", "Inpaint"],
  ["edit", "Edit"],
];

// The tasks a model does (GET /v1/models); one that does not say (a remote or function pool) is offered what a
// Z-Image model does.
function offered(m) {
  return TASKS.filter(([v]) => (m.tasks ? m.tasks.includes(v) : v !== "edit"));
}

// Settings handed over by "use these settings again" / "vary seed" (the detail page), read once by the form.
let handed = null;
export function prefill(request) {
  handed = request;
}

// Started jobs stay listed while the tab lives, across pages.
const started = [];

function fitted(w, h) {
  // The input's size, scaled into 64-2048 and rounded down to multiples of 16, as the API wants.
  const scale = Math.min(1, 2048 / Math.max(w, h));
  const r = (v) => Math.max(64, Math.floor((v * scale) / 16) * 16);
  return [r(w), r(h)];
}

function MaskPainter({ image, onMask }) {
  const canvas = useRef(null);
  const [brush, setBrush] = useState(48);
  const [erase, setErase] = useState(false);
  const drawing = useRef(false);
  const last = useRef(null);

  useEffect(() => {
    const c = canvas.current;
    c.width = image.naturalWidth;
    c.height = image.naturalHeight;
    onMask(null);
  }, [image]);

  function at(e) {
    const c = canvas.current;
    const r = c.getBoundingClientRect();
    return [((e.clientX - r.left) * c.width) / r.width, ((e.clientY - r.top) * c.height) / r.height];
  }

  function stroke(e) {
    const c = canvas.current;
    const g = c.getContext("2d");
    const [x, y] = at(e);
    const scale = c.width / c.getBoundingClientRect().width;
    g.globalCompositeOperation = erase ? "destination-out" : "source-over";
    g.strokeStyle = g.fillStyle = "#fff";
    g.lineWidth = brush * scale;
    g.lineCap = g.lineJoin = "round";
    g.beginPath();
    const [px, py] = last.current || [x, y];
    g.moveTo(px, py);
    g.lineTo(x, y);
    g.stroke();
    last.current = [x, y];
  }

  function down(e) {
    drawing.current = true;
    last.current = null;
    canvas.current.setPointerCapture(e.pointerId);
    stroke(e);
  }
  function move(e) {
    if (drawing.current) stroke(e);
  }
  function up() {
    if (!drawing.current) return;
    drawing.current = false;
    onMask(canvas.current);
  }
  function fill(all) {
    const c = canvas.current;
    const g = c.getContext("2d");
    g.globalCompositeOperation = "source-over";
    g.clearRect(0, 0, c.width, c.height);
    if (all) {
      g.fillStyle = "#fff";
      g.fillRect(0, 0, c.width, c.height);
    }
    onMask(all ? c : null);
  }

  return html`<div class="painter">
    <div class="canvas-wrap">
      <img src=${image.src} alt="the image to repaint" />
      <canvas ref=${canvas} aria-label="mask: paint where the image is repainted" data-testid="mask"
        onPointerDown=${down} onPointerMove=${move} onPointerUp=${up} onPointerCancel=${up}></canvas>
    </div>
    <div class="tools">
      <label>Brush <input type="range" min="4" max="200" value=${brush} onInput=${(e) => setBrush(+e.target.value)} /> ${brush}px</label>
      <label class="check"><input type="checkbox" checked=${erase} onChange=${(e) => setErase(e.target.checked)} /> Erase</label>
      <button type="button" class="secondary" onClick=${() => fill(false)}>Clear mask</button>
      <button type="button" class="secondary" onClick=${() => fill(true)}>Repaint all</button>
    </div>
  </div>`;
}

function toBlob(canvas, background) {
  // The mask as the API takes it: white where to repaint, black elsewhere.
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const g = out.getContext("2d");
  if (background) {
    g.fillStyle = background;
    g.fillRect(0, 0, out.width, out.height);
  }
  g.drawImage(canvas, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function upload(blob, purpose, name) {
  const form = new FormData();
  form.append("file", blob, name);
  form.append("purpose", purpose);
  return call("/v1/uploads", { method: "POST", form });
}

export function CreatePage({ me, models }) {
  const initial = handed || {};
  handed = null;
  const size0 = `${initial.width || 1024}x${initial.height || 1024}`;
  const [task, setTask] = useState(initial.task || "text-to-image");
  // An earlier job's input and mask (already in this tenant's storage), reused until another file is chosen.
  const [reused, setReused] = useState(
    initial.inputImage ? { image: initial.inputImage, mask: initial.maskImage, refs: initial.referenceImages || [] } : null,
  );
  const [prompt, setPrompt] = useState(initial.prompt || "");
  const [negative, setNegative] = useState(initial.negativePrompt || "");
  const [model, setModel] = useState(initial.model || "");
  const [size, setSize] = useState(SIZES.some(([v]) => v === size0) ? size0 : "custom");
  const [width, setWidth] = useState(initial.width || 1024);
  const [height, setHeight] = useState(initial.height || 1024);
  const [steps, setSteps] = useState(initial.steps ?? "");
  const [guidance, setGuidance] = useState(initial.guidanceScale ?? "");
  const [seed, setSeed] = useState(initial.seed ?? "");
  const [count, setCount] = useState(initial.numImages || 1);
  const [strength, setStrength] = useState(initial.strength ?? 0.8);
  // LoRA adapters of the chosen model: name -> scale, for the ticked ones.
  const [loras, setLoras] = useState(Object.fromEntries((initial.loras || []).map((l) => [l.name, l.scale ?? 1])));
  const [image, setImage] = useState(null); // an HTMLImageElement of the chosen file
  const [file, setFile] = useState(null);
  const [mask, setMask] = useState(null); // the painter's canvas once painted
  const [refs, setRefs] = useState([]); // the chosen reference image files (edit)
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const [jobs, setJobs] = useState(started.slice());
  const choices = models.filter((m) => !m.alias_of);
  const chosen = choices.find((m) => m.id === model) || {};
  const adapters = chosen.adapters || [];
  const tasks = offered(chosen);
  const maxRefs = chosen.max_reference_images || 0;

  useEffect(() => {
    if (!model && choices.length) setModel(choices[0].id);
  }, [models]);
  useEffect(() => {
    if (model && !tasks.some(([v]) => v === task)) setTask(tasks.length ? tasks[0][0] : "text-to-image");
  }, [model, models]);

  function choose(e) {
    const f = e.target.files[0];
    setFile(f || null);
    setReused(null);
    setImage(null);
    if (!f) return;
    const img = new Image();
    img.onload = () => {
      setImage(img);
      const [w, h] = fitted(img.naturalWidth, img.naturalHeight);
      setSize("custom");
      setWidth(w);
      setHeight(h);
    };
    img.src = URL.createObjectURL(f);
  }

  function chooseRefs(e) {
    setRefs([...e.target.files]);
    if (reused) setReused({ ...reused, refs: [] });
  }

  async function submit(e) {
    e.preventDefault();
    setError(null);
    setBusy(true);
    try {
      const [w, h] = size === "custom" ? [+width, +height] : size.split("x").map(Number);
      const body = { task, prompt, model, width: w, height: h, numImages: +count };
      if (negative) body.negativePrompt = negative;
      if (steps !== "") body.steps = +steps;
      if (guidance !== "") body.guidanceScale = +guidance;
      if (seed !== "") body.seed = +seed;
      const picked = Object.entries(loras).filter(([name]) => adapters.includes(name));
      if (picked.length) body.loras = picked.map(([name, scale]) => ({ name, scale: +scale }));
      if (task === "edit" && refs.length > maxRefs) {
        const message = `referenceImages: ${model} takes ${maxRefs ? `at most ${maxRefs}` : "none"}`;
        throw new ApiError(400, { error: { message, param: "referenceImages" } });
      }
      if (task === "image-to-image" || task === "inpaint") body.strength = +strength;
      if (task !== "text-to-image" && reused && !file) {
        body.inputImage = reused.image;
        if (task === "inpaint") body.maskImage = reused.mask;
      } else if (task !== "text-to-image") {
        if (!file) throw new ApiError(400, { error: { message: "inputImage: choose an image first", param: "inputImage" } });
        body.inputImage = (await upload(file, "image", file.name)).uri;
        if (task === "inpaint") {
          if (!mask) throw new ApiError(400, { error: { message: "maskImage: paint the area to repaint first", param: "maskImage" } });
          body.maskImage = (await upload(await toBlob(mask, "#000"), "mask", "mask.png")).uri;
        }
      }
      if (task === "edit") {
        const uris = refs.length ? await Promise.all(refs.map(async (f) => (await upload(f, "image", f.name)).uri)) : (maxRefs && reused && reused.refs) || [];
        if (uris.length) body.referenceImages = uris;
      }
      const job = await call("/v1/jobs", { method: "POST", json: body });
      started.unshift(job);
      setJobs(started.slice());
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  }

  const invalid = (name) => (error && error.param && error.param.startsWith(name) ? "true" : undefined);
  return html`<section class="create">
    <form onSubmit=${submit} aria-labelledby="create-title" novalidate>
      <h1 id="create-title">Create</h1>
      <fieldset class="tasks">
        <legend>Task</legend>
        ${tasks.map(
          ([v, label]) => html`<label class="check"><input type="radio" name="task" value=${v} checked=${task === v} onChange=${() => setTask(v)} /> ${label}</label>`,
        )}
      </fieldset>
      <label>Prompt <textarea name="prompt" rows="3" required maxlength="4000" aria-invalid=${invalid("prompt")}
        value=${prompt} onInput=${(e) => setPrompt(e.target.value)}></textarea></label>
      <label>Negative prompt <textarea name="negativePrompt" rows="2" maxlength="4000" aria-invalid=${invalid("negativePrompt")}
        value=${negative} onInput=${(e) => setNegative(e.target.value)}></textarea></label>
      ${task !== "text-to-image" && html`<div class="source">
        <label>${task === "edit" ? "Image to edit" : "Input image"} <input type="file" name="inputImage" accept="image/png,image/jpeg,image/webp" onChange=${choose} aria-invalid=${invalid("inputImage")} /></label>
        ${task !== "edit" && html`<label>Strength <input type="number" name="strength" min="0" max="1" step="0.05" value=${strength} onInput=${(e) => setStrength(e.target.value)} /></label>`}
        ${reused && !file && html`<p class="muted">Reusing the earlier job's input image${task === "inpaint" ? " and mask" : ""}; choose a file to replace it.</p>`}
        ${image && task === "inpaint" && html`<${MaskPainter} image=${image} onMask=${setMask} />`}
        ${image && task !== "inpaint" && html`<img class="preview" src=${image.src} alt=${task === "edit" ? "the image to edit" : "the input image"} />`}
        ${task === "edit" && maxRefs > 0 && html`<label>Reference images (up to ${maxRefs})
          <input type="file" name="referenceImages" multiple accept="image/png,image/jpeg,image/webp" onChange=${chooseRefs} aria-invalid=${invalid("referenceImages")} /></label>
          ${reused && reused.refs.length > 0 && !refs.length && html`<p class="muted">Reusing the earlier job's ${reused.refs.length} reference images; choose files to replace them.</p>`}`}
      </div>`}
      ${adapters.length > 0 && html`<fieldset class="adapters">
        <legend>Adapters</legend>
        ${adapters.map((name) => html`<div class="adapter">
          <label class="check"><input type="checkbox" name="lora" value=${name} checked=${name in loras}
            onChange=${(e) => { const next = { ...loras }; if (e.target.checked) next[name] = 1; else delete next[name]; setLoras(next); }} /> ${name}</label>
          ${name in loras && html`<label class="scale">Scale of ${name} <input type="number" min="-8" max="8" step="0.1" value=${loras[name]}
            onInput=${(e) => setLoras({ ...loras, [name]: e.target.value })} /></label>`}
        </div>`)}
      </fieldset>`}
      <div class="grid">
        <label>Model <select name="model" value=${model} onChange=${(e) => setModel(e.target.value)} aria-invalid=${invalid("model")}>
          ${choices.map((m) => html`<option value=${m.id}>${m.id} (${m.variant}${m.ready ? "" : ", scaled to zero"})</option>`)}
        </select></label>
        <label>Size <select name="size" value=${size} onChange=${(e) => setSize(e.target.value)}>
          ${SIZES.map(([v, label]) => html`<option value=${v}>${label}</option>`)}
        </select></label>
        ${size === "custom" && html`
          <label>Width <input type="number" name="width" min="64" max="2048" step="16" value=${width} aria-invalid=${invalid("width")} onInput=${(e) => setWidth(e.target.value)} /></label>
          <label>Height <input type="number" name="height" min="64" max="2048" step="16" value=${height} aria-invalid=${invalid("height")} onInput=${(e) => setHeight(e.target.value)} /></label>`}
        <label>Steps <input type="number" name="steps" min="1" max="100" placeholder="model default" value=${steps} aria-invalid=${invalid("steps")} onInput=${(e) => setSteps(e.target.value)} /></label>
        <label>Guidance <input type="number" name="guidanceScale" min="0" max="20" step="0.5" placeholder="model default" value=${guidance} aria-invalid=${invalid("guidanceScale")} onInput=${(e) => setGuidance(e.target.value)} /></label>
        <div class="seed">
          <label>Seed <input type="number" name="seed" min="0" placeholder="random" value=${seed} aria-invalid=${invalid("seed")} onInput=${(e) => setSeed(e.target.value)} /></label>
          <button type="button" class="secondary dice" aria-label="Roll a random seed" title="Roll a random seed" onClick=${() => setSeed(String(randomSeed()))}><svg viewBox="0 0 24 24" width="20" height="20" aria-hidden="true" class="die">
            <rect x="3" y="3" width="18" height="18" rx="4" fill="none" stroke="currentColor" stroke-width="2" />
            <circle cx="8.5" cy="8.5" r="1.6" /><circle cx="15.5" cy="15.5" r="1.6" /><circle cx="12" cy="12" r="1.6" />
            <circle cx="15.5" cy="8.5" r="1.6" /><circle cx="8.5" cy="15.5" r="1.6" /></svg></button>
        </div>
        <label>Images <input type="number" name="numImages" min="1" max="8" value=${count} aria-invalid=${invalid("numImages")} onInput=${(e) => setCount(e.target.value)} /></label>
      </div>
      <${ErrorBanner} error=${error} />
      <button type="submit" disabled=${busy}>${busy ? "Submitting…" : "Generate"}</button>
    </form>
    <section class="started" aria-label="started jobs">
      ${jobs.map((j) => html`<${JobWatch} key=${j.id} id=${j.id} initial=${j} />`)}
    </section>
  </section>`;
}
