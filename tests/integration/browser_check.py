"""Open UI-format workflows in the real ComfyUI frontend, the way a user's drag-and-drop does, in headless Chromium.

The frontend is the one the server serves (comfyui-frontend-package). For each workflow the page is loaded fresh,
the JSON is dropped onto the canvas as a File in a DataTransfer (the browser's own drop event, handled by the
frontend's drop handler exactly as a dragged file), and then the check collects what a user would see:

- node types the frontend does not know (the "missing node types" dialog, nodes drawn as errors);
- error dialogs and toasts (any dialog or toast that appears: missing models, load errors, validation);
- JavaScript errors: uncaught exceptions, unhandled promise rejections and console errors after the drop;
- widget values the server would reject: combo values not among the widget's options and numbers outside
  min/max, as loaded into the frontend's widgets; and the API graph the frontend would queue
  (app.graphToPrompt()) is validated against /object_info (scripts/validate_workflow.py) and compared with the
  file's own values;
- nodes that overlap each other as drawn (bounding boxes with title bars, after the frontend sized them), and a
  graph so large that it opens zoomed out below the frontend's threshold for drawing node text (1920x1080).

It keeps a screenshot per workflow. Needs selenium and Debian's chromium and chromium-driver packages (works
offline: nothing is downloaded); ``unavailable()`` says why it cannot run.

    with BrowserCheck(server_url, screenshot_dir) as browser:
        report = browser.check(workflow_dict, "name")
        report.problems    # [] when the workflow opens cleanly
        report.screenshot  # PNG path
        report.prompt      # the API graph the frontend would queue
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from dataclasses import dataclass, field

from workflow_api import ui_to_api, validate_prompt

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver",)
# Settings of the test server's user (a temp dir): no first-run template browser, no minimap or canvas stats.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}

# Installed before any page script: records uncaught errors and unhandled rejections.
ERROR_HOOK = """
window.__softTokensErrors = [];
window.addEventListener('error', e => window.__softTokensErrors.push(
    'uncaught error: ' + (e.message || e) + (e.filename ? ' at ' + e.filename + ':' + e.lineno : '')));
window.addEventListener('unhandledrejection', e => window.__softTokensErrors.push(
    'unhandled rejection: ' + ((e.reason && (e.reason.stack || e.reason.message)) || e.reason)));
"""

READY = """
return !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
          && document.querySelector('#graph-canvas')
          && Object.keys(window.LiteGraph.registered_node_types || {}).length > 50
          && /ComfyUI/.test(document.title));
"""

DROP = """
const [text, name] = arguments;
const file = new File([text], name, {type: 'application/json'});
const data = new DataTransfer();
data.items.add(file);
const canvas = document.querySelector('#graph-canvas');
const rect = canvas.getBoundingClientRect();
const at = {clientX: rect.left + rect.width / 2, clientY: rect.top + rect.height / 2};
for (const type of ['dragenter', 'dragover', 'drop'])
    canvas.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true, ...at}));
"""

VISIBLE_UI = """
const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
const text = el => (el.innerText || '').replace(/\\s+/g, ' ').trim().slice(0, 400);
return {
  dialogs: Array.from(document.querySelectorAll('.p-dialog')).filter(visible).map(text),
  toasts: Array.from(document.querySelectorAll('.p-toast-message')).filter(visible).map(text),
};
"""

STATE = """
const known = LiteGraph.registered_node_types;
const values = w => {
  let v = w.options && w.options.values;
  if (typeof v === 'function') { try { v = v(); } catch (e) { v = null; } }
  return Array.isArray(v) ? v : null;
};
const nodes = app.graph.nodes.map(n => {
  const r = n.boundingRect;
  return {
    id: n.id, type: n.type, title: n.title, known: n.type in known, has_errors: !!n.has_errors,
    bounds: [r[0], r[1], r[2], r[3]],
    widgets: (n.widgets || []).map(w => ({
      name: w.name, type: w.type, value: w.value,
      options: values(w), min: w.options ? w.options.min : null, max: w.options ? w.options.max : null,
    })),
  };
});
// the drawn graph (nodes and group frames) in page pixels, for cropping screenshots
const boxes = nodes.map(n => n.bounds).concat(app.graph.groups.map(g => Array.from(g._bounding || g.bounding)));
const ds = app.canvas.ds, el = app.canvas.canvas.getBoundingClientRect();
const corner = (x, y) => [el.left + (x + ds.offset[0]) * ds.scale, el.top + (y + ds.offset[1]) * ds.scale];
const lo = corner(Math.min(...boxes.map(b => b[0])), Math.min(...boxes.map(b => b[1])));
const hi = corner(Math.max(...boxes.map(b => b[0] + b[2])), Math.max(...boxes.map(b => b[1] + b[3])));
return {nodes: nodes, errors: window.__softTokensErrors.slice(), title: document.title,
        scale: ds.scale, low_quality: !!app.canvas.low_quality, graph_box: [lo[0], lo[1], hi[0], hi[1]]};
"""

PROMPT = """
const done = arguments[arguments.length - 1];
app.graphToPrompt().then(p => done({output: p.output})).catch(e => done({error: String(e && e.stack || e)}));
"""


def unavailable() -> str | None:
    """Why the browser check cannot run here (one line), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium; test-only, not in requirements.txt)"
    if not _find(CHROMIUM, "chromium"):
        return "Chromium not found (apt-get install chromium chromium-driver)"
    if not _find(CHROMEDRIVER, "chromedriver"):
        return "chromedriver not found (apt-get install chromium-driver)"
    return None


def _find(paths, name):
    return next((p for p in paths if os.path.isfile(p) and os.access(p, os.X_OK)), None) or shutil.which(name)


@dataclass
class Report:
    name: str
    problems: list = field(default_factory=list)
    screenshot: str | None = None
    prompt: dict | None = None
    nodes: list = field(default_factory=list)
    graph_box: tuple | None = None  # (left, top, right, bottom) of the drawn graph in the screenshot, in pixels

    def __str__(self):
        head = f"{self.name}: " + ("ok" if not self.problems else f"{len(self.problems)} problem(s)")
        return "\n  - ".join([head] + self.problems) + (f"\n  screenshot: {self.screenshot}" if self.screenshot else "")


class BrowserCheck:
    """One headless Chromium session on a ComfyUI server; check() opens one workflow on a freshly loaded page."""

    def __init__(self, server_url: str, screenshot_dir: str, size=(1920, 1080), timeout: float = 90):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.url = server_url.rstrip("/")
        self.screenshot_dir = screenshot_dir
        self.size = size
        self.timeout = timeout
        os.makedirs(screenshot_dir, exist_ok=True)
        self._post("/settings", SETTINGS)
        self.object_info = None  # fetched per check: combo options follow the server's files
        opts = webdriver.ChromeOptions()
        opts.binary_location = _find(CHROMIUM, "chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-extensions", "--no-first-run", "--disable-background-networking",
                    f"--window-size={size[0]},{size[1]}", "--hide-scrollbars", "--force-device-scale-factor=1"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(_find(CHROMEDRIVER, "chromedriver")), options=opts)
        self.driver.set_script_timeout(60)
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})
        self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOK})

    def _post(self, path, data):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.driver is not None:
            self.driver.quit()
            self.driver = None

    # --- one workflow ------------------------------------------------------------------------------------

    def _wait(self, script, timeout, *args):
        end = time.time() + timeout
        while time.time() < end:
            try:
                if self.driver.execute_script(script, *args):
                    return True
            except Exception:  # the page is still navigating
                pass
            time.sleep(0.2)
        return False

    def _settle(self, seconds=1.0):
        """Let the frontend finish what the load started (async dialogs, the first draws)."""
        time.sleep(seconds)
        self.driver.execute_async_script(
            "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(() => done()));")

    def open_page(self):
        """A fresh frontend: the open workflows the last page kept in local and session storage are forgotten."""
        if self.driver.current_url.startswith(self.url):
            self.driver.execute_script("localStorage.clear(); sessionStorage.clear();")
        self.driver.get(self.url + "/")
        if not self._wait(READY, self.timeout):
            raise RuntimeError(f"the ComfyUI frontend at {self.url} did not start within {self.timeout}s")
        self._settle(1.5)

    def check(self, workflow: dict, name: str) -> Report:
        """Open `workflow` as a dropped file `name`.json on a fresh page; the report lists what went wrong."""
        report = Report(name)
        self.object_info = json.loads(urllib.request.urlopen(self.url + "/object_info", timeout=60).read())
        self.open_page()
        before = self.driver.execute_script(VISIBLE_UI)
        for what in ("dialogs", "toasts"):
            report.problems += [f"before the drop, a {what[:-1]} was already open: {t}" for t in before[what]]
        self.driver.execute_script("window.__softTokensErrors = [];")
        self.driver.get_log("browser")  # drop what the page logged while starting
        self.driver.execute_script(DROP, json.dumps(workflow), name + ".json")
        loaded = self._wait("return document.title.includes(arguments[0]);", 30, name)
        self._settle()
        if not loaded:
            report.problems.append(f"the frontend did not open the dropped file (title {self.driver.title!r})")
        state = self.driver.execute_script(STATE)
        ui = self.driver.execute_script(VISIBLE_UI)
        report.nodes, report.graph_box = state["nodes"], tuple(state["graph_box"])
        report.problems += [f"dialog: {t}" for t in ui["dialogs"]]
        report.problems += [f"toast: {t}" for t in ui["toasts"]]
        report.problems += [f"JavaScript: {e}" for e in state["errors"]]
        for entry in self.driver.get_log("browser"):
            if entry["level"] == "SEVERE":
                report.problems.append(f"browser console ({entry['source']}): {entry['message']}")
        report.problems += self._node_problems(workflow, state["nodes"])
        if state["low_quality"]:
            report.problems.append(f"the graph opens zoomed out to {state['scale']:.0%} on a {self.size[0]}x"
                                   f"{self.size[1]} screen, below the frontend's threshold for drawing node text")
        prompt = self.driver.execute_async_script(PROMPT)
        if "error" in prompt:
            report.problems.append(f"app.graphToPrompt() failed: {prompt['error']}")
        else:
            report.prompt = prompt["output"]
            report.problems += [f"queued graph: {p}" for p in validate_prompt(report.prompt, self.object_info)]
            report.problems += self._drift(workflow, report.prompt)
        report.screenshot = os.path.join(self.screenshot_dir, name + ".png")
        self.driver.save_screenshot(report.screenshot)
        return report

    def _node_problems(self, workflow, nodes):
        problems = []
        want = len(workflow.get("nodes", []))
        if len(nodes) != want:
            problems.append(f"the frontend shows {len(nodes)} nodes, the file has {want}")
        for n in nodes:
            label = f"node {n['id']} {n['type']}"
            if not n["known"] or n["has_errors"]:
                problems.append(f"{label}: node type not known to the frontend (drawn as missing)")
            for w in n["widgets"]:
                if w["type"] == "combo" and w["options"] is not None and w["value"] not in w["options"]:
                    shown = w["options"][:12] + (["..."] if len(w["options"]) > 12 else [])
                    problems.append(f"{label}: widget {w['name']} = {w['value']!r} is not one of its options {shown}")
                if w["type"] == "number" and isinstance(w["value"], (int, float)):
                    if w["min"] is not None and w["value"] < w["min"]:
                        problems.append(f"{label}: widget {w['name']} = {w['value']} is below its minimum {w['min']}")
                    if w["max"] is not None and w["value"] > w["max"]:
                        problems.append(f"{label}: widget {w['name']} = {w['value']} is above its maximum {w['max']}")
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                if overlap(a["bounds"], b["bounds"]):
                    problems.append(f"node {a['id']} {a['type']} {rect(a['bounds'])} overlaps node {b['id']} "
                                    f"{b['type']} {rect(b['bounds'])} as drawn")
        return problems

    def _drift(self, workflow, prompt):
        """Values the frontend would queue that differ from the file's own (e.g. shifted or coerced widgets)."""
        try:
            mine = ui_to_api(workflow, self.object_info)
        except (ValueError, KeyError) as e:
            return [f"the file does not convert to an API graph: {e}"]
        problems = []
        if sorted(mine) != sorted(prompt):
            problems.append(f"the frontend queues nodes {sorted(prompt)}, the file has {sorted(mine)}")
        for node_id in sorted(set(mine) & set(prompt)):
            a, b = mine[node_id]["inputs"], prompt[node_id]["inputs"]
            for key in sorted(set(a) | set(b)):
                x, y = a.get(key), b.get(key)
                if isinstance(x, list) and isinstance(y, list):
                    same = [str(x[0]), x[1]] == [str(y[0]), y[1]]
                elif isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
                    same = abs(x - y) <= 1e-9 * max(1.0, abs(x))
                else:
                    same = x == y
                if not same:
                    problems.append(f"node {node_id} {mine[node_id]['class_type']}: input {key} is {x!r} in the "
                                    f"file but {y!r} as the frontend queues it")
        return problems


def crop_graph(report: Report, path: str, pad: int = 24, max_width: int | None = None, quality: int = 85) -> str:
    """Save the part of a report's screenshot that shows the graph (PNG, or JPEG for a .jpg path)."""
    from PIL import Image

    image = Image.open(report.screenshot).convert("RGB")
    left, top, right, bottom = report.graph_box
    box = (max(0, int(left) - pad), max(0, int(top) - pad), min(image.width, int(right) + pad),
           min(image.height, int(bottom) + pad))
    image = image.crop(box)
    if max_width and image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    image.save(path, quality=quality) if path.lower().endswith((".jpg", ".jpeg")) else image.save(path, optimize=True)
    return path


def overlap(a, b) -> bool:
    """Whether two [x, y, w, h] boxes share any area (touching edges do not count)."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def rect(r) -> str:
    return "[{:.0f}, {:.0f}, {:.0f} x {:.0f}]".format(*r)
