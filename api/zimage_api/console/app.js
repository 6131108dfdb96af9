// The console's shell: sign-in, navigation, theme, and the page the location's hash names.
import { html, render, useEffect, useState } from "./vendor/preact-htm.js";
import { call, session } from "./api.js";
import { CreatePage } from "./create.js";
import { ComparePage, DetailPage, JobsPage } from "./jobs.js";
import { OperatePage } from "./operate.js";
import { ErrorBanner, go, useRoute } from "./ui.js";

const THEME = "zimage.theme";

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
}
applyTheme(localStorage.getItem(THEME) || "auto");

function ThemeSwitch() {
  const [theme, setTheme] = useState(localStorage.getItem(THEME) || "auto");
  function change(e) {
    setTheme(e.target.value);
    localStorage.setItem(THEME, e.target.value);
    applyTheme(e.target.value);
  }
  return html`<label class="theme">Theme <select value=${theme} onChange=${change}>
    <option value="auto">System</option><option value="light">Light</option><option value="dark">Dark</option>
  </select></label>`;
}

function SignIn({ onSignedIn, reason }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState(reason || null);
  const [busy, setBusy] = useState(false);
  async function submit(e) {
    e.preventDefault();
    setBusy(true);
    setError(null);
    session.set(key.trim());
    try {
      onSignedIn(await call("/v1/me"));
    } catch (err) {
      session.clear();
      setError(err);
    } finally {
      setBusy(false);
    }
  }
  return html`<main class="signin">
    <form onSubmit=${submit} aria-labelledby="signin-title">
      <h1 id="signin-title">zimage console</h1>
      <p class="muted">Sign in with an API key. It stays in this tab only and is sent to this API, nowhere else.</p>
      <label>API key <input type="password" name="apiKey" autocomplete="off" spellcheck="false" required
        value=${key} onInput=${(e) => setKey(e.target.value)} /></label>
      <${ErrorBanner} error=${error} />
      <button type="submit" disabled=${busy || !key.trim()}>${busy ? "Signing in…" : "Sign in"}</button>
    </form>
  </main>`;
}

function Nav({ me, route, onSignOut }) {
  const links = [["/create", "Create"], ["/jobs", "Jobs"]];
  if (me.admin) links.push(["/operate", "Operate"]);
  const here = `/${route.parts[0] || "create"}`;
  return html`<header class="top">
    <a class="brand" href="#/create">zimage</a>
    <nav aria-label="main">
      ${links.map(([path, label]) => html`<a href=${`#${path}`} aria-current=${here === path ? "page" : undefined}>${label}</a>`)}
    </nav>
    <div class="who">
      <span class="tenant" data-testid="tenant" title=${`key ${me.keyId}`}>${me.tenant}${me.admin ? " · admin" : ""}</span>
      <${ThemeSwitch} />
      <button type="button" class="secondary" onClick=${onSignOut}>Sign out</button>
    </div>
  </header>`;
}

function Page({ me, models, route }) {
  const [first, second] = route.parts;
  if (first === "jobs" && second) return html`<${DetailPage} key=${second} id=${second} />`;
  if (first === "jobs") return html`<${JobsPage} me=${me} models=${models} query=${route.query} />`;
  if (first === "compare") return html`<${ComparePage} ids=${(second || "").split(",").filter(Boolean)} />`;
  if (first === "operate") return html`<${OperatePage} me=${me} />`;
  return html`<${CreatePage} me=${me} models=${models} />`;
}

function App() {
  const route = useRoute();
  const [me, setMe] = useState(null);
  const [models, setModels] = useState([]);
  const [checking, setChecking] = useState(Boolean(session.key));
  const [reason, setReason] = useState(null);

  useEffect(() => {
    if (session.key) call("/v1/me").then(setMe, (e) => (session.clear(), setReason(e))).finally(() => setChecking(false));
    const expired = () => {
      session.clear();
      setMe(null);
      setReason(new Error("The API key was refused: sign in again."));
    };
    window.addEventListener("zimage:unauthorized", expired);
    return () => window.removeEventListener("zimage:unauthorized", expired);
  }, []);

  useEffect(() => {
    if (me) call("/v1/models").then((m) => setModels(m.data), () => setModels([]));
  }, [me]);

  function signOut() {
    session.clear();
    setMe(null);
    setReason(null);
    go("/create");
  }

  if (checking) return html`<p class="boot">Signing in…</p>`;
  if (!me) return html`<${SignIn} onSignedIn=${setMe} reason=${reason} />`;
  return html`<${Nav} me=${me} route=${route} onSignOut=${signOut} />
    <main id="main"><${Page} me=${me} models=${models} route=${route} /></main>`;
}

const root = document.getElementById("app");
root.textContent = "";
render(html`<${App} />`, root);
