"""The web page in a real browser: Debian's chromium driven by Playwright, against the real
stack (gunicorn serving the API, a real Celery worker, Redis, SQLite and the bundled model).

Every request the page makes goes through a route handler that lets the service's own
host through and blocks and counts everything else: the page must work offline. Screenshots
go to tests/artifacts/browser/ (ignored by git); docs/webui.jpg was made from one of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from conftest import KEYS, Stack, make_database, png_bytes
from PIL import Image

from scripts.embedded_redis import free_port
from shared.jobs.job_status import TERMINAL, JobStatus
from shared.settings import REPO_ROOT

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO_ROOT / "tests" / "artifacts" / "browser"
SCENE_CLASSES = ("circle", "square", "triangle", "cross")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed (scripts/system-packages.txt)"
    ),
]
sync_api = pytest.importorskip("playwright.sync_api")


def _serve(stack: Stack, name: str, **env) -> tuple[subprocess.Popen, str]:
    """gunicorn serving the app from the stack's settings (plus `env`) on a free port."""
    port = free_port()
    log_path = stack.tmp_path / f"{name}.log"
    api = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "1", "--threads", "8", "-b", f"127.0.0.1:{port}", "api:create_app()"],
        cwd=REPO_ROOT,
        env=stack.env(**env),
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return api, base
        except requests.RequestException:
            pass
        assert api.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def web_stack(tmp_path_factory, redis_server):
    """The stack with API keys on, served over HTTP by gunicorn, with one warm worker; and a
    second API process over the same stack in open mode (no keys), as `make serve` runs."""
    tmp = tmp_path_factory.mktemp("browser")
    stack = Stack(tmp, make_database("sqlite", tmp), redis_server)
    stack.start_worker("web")
    # No VGG16 weights for the keyed server: vgg16 is listed unavailable (the form marks it).
    keyed, stack.base_url = _serve(stack, "gunicorn", KERAS_HOME=tmp / "keras-home")
    open_mode, stack.open_url = _serve(stack, "gunicorn-open", API_KEYS="")
    yield stack
    for api in (keyed, open_mode):
        api.terminate()
        api.wait(timeout=30)
    stack.close()


class Guard:
    """Route interception: the service's host goes through, every other host is blocked and
    counted; every request is recorded (method, URL, whether it carried the key)."""

    def __init__(self, base_url: str):
        self.host = urlsplit(base_url).netloc
        self.blocked: list[str] = []
        self.requests: list[tuple[str, str, str | None]] = []

    def __call__(self, route, request):
        self.requests.append((request.method, request.url, request.headers.get("x-api-key")))
        if urlsplit(request.url).netloc != self.host or urlsplit(request.url).scheme != "http":
            self.blocked.append(request.url)
            route.abort()
        else:
            route.continue_()


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, web_stack):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=web_stack.base_url)
    guard = Guard(web_stack.base_url)
    context.route("**/*", guard)
    page = context.new_page()
    page.guard = guard
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    page.console_lines = []
    page.bad_responses = []
    page.on("response", lambda r: r.status >= 400 and page.bad_responses.append((r.status, r.url)))
    page.on("console", lambda message: page.console_lines.append(f"{message.type}: {message.text}"))
    yield page
    context.close()
    assert guard.blocked == [], f"the page asked other hosts: {guard.blocked[:5]}"
    assert errors == [], errors


def _scene(tmp_path: Path):
    from shapes.scenes import generate_scene

    image, objects = generate_scene(896, 640, n_objects=4, seed=7, labels=SCENE_CLASSES, object_size=(34, 44))
    path = tmp_path / "scene.png"
    path.write_bytes(png_bytes(image))
    return path, objects


def _enter_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")


def _submit_scene(page, scene: Path) -> str:
    page.goto("/")
    page.wait_for_selector("#key-panel:not([hidden])")
    _enter_key(page, "not-a-key")
    page.wait_for_selector("#key-error:not([hidden])")
    assert "forbidden" in page.inner_text("#key-error")
    page.screenshot(path=ARTIFACTS / "wrong_key.png")
    _enter_key(page, KEYS["alice"])
    page.wait_for_selector("#submit-form:not([hidden])")
    page.set_input_files("#image", str(scene))
    page.select_option("#model", "shapes")
    for name in SCENE_CLASSES:
        page.check(f"input[name=class][value={name}]")
    page.screenshot(path=ARTIFACTS / "submit.png", full_page=True)
    page.click("#submit-button")
    page.wait_for_url("**/jobs/*")
    return page.url.rsplit("/", 1)[1]


def _watch_progress(page) -> list[str]:
    seen = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = page.inner_text("#job-progress-text")
        if not seen or seen[-1] != text:
            seen.append(text)
        if page.inner_text("#job-status") in TERMINAL:
            seen.append(page.inner_text("#job-progress-text"))  # the poll that said so set both
            break
        time.sleep(0.1)
    assert page.inner_text("#job-status") == JobStatus.succeeded, (seen, page.inner_text("#job-status-panel"))
    return seen


def _wait_viewer(page) -> None:
    try:
        _wait_tiles(page)
    except sync_api.TimeoutError:
        page.screenshot(path=ARTIFACTS / "viewer_timeout.png", full_page=True)
        state = page.evaluate(
            "() => { const s = window.heatmapViewer; return s ? {ready: s.ready, layers: s.layers.length,"
            " items: s.viewer.world.getItemCount()} : null; }"
        )
        raise AssertionError(f"viewer not loaded: {state}; console: {page.console_lines[-10:]}") from None


def _wait_tiles(page) -> None:
    page.wait_for_function(
        """() => {
            const s = window.heatmapViewer;
            if (!s || !s.ready) return false;
            const world = s.viewer.world;
            for (let i = 0; i < world.getItemCount(); i++) if (!world.getItemAt(i).getFullyLoaded()) return false;
            return true;
        }""",
        timeout=60_000,
    )


def _viewer_pixels(page, opacity: int) -> np.ndarray:
    page.fill("#opacity", str(opacity))
    page.dispatch_event("#opacity", "input")
    page.wait_for_timeout(400)  # one animation frame is enough; leave room on a loaded machine
    path = ARTIFACTS / f"viewer_{opacity}.png"
    page.locator("#viewer").screenshot(path=path)
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def _to_screen(page, x: float, y: float) -> tuple[float, float]:
    return tuple(
        page.evaluate(
            """([x, y]) => {
                const item = window.heatmapViewer.viewer.world.getItemAt(0);
                const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
                return [p.x, p.y];
            }""",
            [x, y],
        )
    )


def _heat_contrast(page, objects, target) -> tuple[float, float]:
    """Mean colour change that switching the heat on makes inside the target object's box,
    and far (> 100 px) from every object, in screen pixels of the viewer."""
    plain, heat = _viewer_pixels(page, 0), _viewer_pixels(page, 100)
    change = np.abs(heat - plain).sum(axis=2)
    x0, y0, x1, y1 = target.bbox
    (sx0, sy0), (sx1, sy1) = _to_screen(page, x0, y0), _to_screen(page, x1, y1)
    inside = change[int(sy0) : int(sy1) + 1, int(sx0) : int(sx1) + 1].mean()
    ys, xs = np.mgrid[0 : change.shape[0], 0 : change.shape[1]]
    far = np.ones(change.shape, dtype=bool)
    for obj in objects:
        cx, cy = _to_screen(page, *obj.center)
        far &= (xs - cx) ** 2 + (ys - cy) ** 2 > 100**2
    nav = page.locator(".navigator").bounding_box()
    view = page.locator("#viewer").bounding_box()
    if nav:  # the navigator (a thumbnail with its own heat) is not the main image
        nx, ny = nav["x"] - view["x"], nav["y"] - view["y"]
        far &= ~((xs >= nx - 4) & (xs <= nx + nav["width"] + 4) & (ys >= ny - 4) & (ys <= ny + nav["height"] + 4))
    x_end, y_end = _to_screen(page, 896, 640)
    far &= (xs < x_end) & (ys < y_end) & (xs >= _to_screen(page, 0, 0)[0]) & (ys >= _to_screen(page, 0, 0)[1])
    return float(inside), float(change[far].mean())


def test_submit_follow_and_view_the_heat(page, web_stack, tmp_path):
    scene, objects = _scene(tmp_path)
    job_id = _submit_scene(page, scene)
    seen = _watch_progress(page)
    assert seen[-1] == "100 %", seen
    _wait_viewer(page)
    page.screenshot(path=ARTIFACTS / "job.png", full_page=True)

    options = page.eval_on_selector_all("#class-select option", "els => els.map(e => e.textContent)")
    assert sorted(options) == sorted(SCENE_CLASSES)
    for obj in objects:
        page.select_option("#class-select", label=obj.label)
        page.wait_for_timeout(200)
        assert page.input_value("#class-select") == str(options.index(obj.label))
        inside, far = _heat_contrast(page, objects, obj)
        print(f"{obj.label}: colour change inside the object {inside:.1f}, far from objects {far:.1f}")
        # Heat drawn over the object (its class's score is near its maximum there), and
        # the image left alone far from every object.
        assert inside > 60 and inside > 5 * far, (obj.label, inside, far)
        # The colour bar shows the class's score range; the cursor reads the grid.
        assert page.inner_text("#bar-high") != ""
        cx, cy = _to_screen(page, *obj.center)
        page.locator("#viewer").hover(position={"x": cx, "y": cy})
        text = page.inner_text("#cursor-score")
        assert obj.label in text and float(text.rsplit(" ", 1)[1]) > 0.5, text
    page.select_option("#class-select", label=objects[0].label)
    page.fill("#opacity", "75")
    page.dispatch_event("#opacity", "input")
    cx, cy = _to_screen(page, *objects[0].center)
    page.locator("#viewer").hover(position={"x": cx + 6, "y": cy + 6})
    page.wait_for_timeout(400)
    assert page.inner_text("#cursor-score").split(":")[1].split()[0] == objects[0].label
    page.screenshot(path=ARTIFACTS / "viewer.png")

    # Every call carried the key in a header; none put it in a URL.
    api_calls = [r for r in page.guard.requests if "/api/v1/" in r[1]]
    keys = [key for _, _, key in api_calls]
    assert keys[0] == "not-a-key" and set(keys[1:]) == {KEYS["alice"]}, set(keys)
    assert not any(KEYS["alice"] in url for _, url, _ in page.guard.requests)
    tiles = [url for _, url, _ in api_calls if "/dzi/" in url]
    assert any("/dzi/image_files/" in url for url in tiles) and any("/dzi/heat_" in url for url in tiles)
    assert [bad for bad in page.bad_responses if "/dzi/" in bad[1]] == []  # every tile asked for exists

    # The jobs page lists it; the status filter works.
    page.goto("/jobs")
    page.wait_for_selector(f"a[href='/jobs/{job_id}']")
    page.select_option("#status-filter", JobStatus.failed.value)
    page.wait_for_selector(f"a[href='/jobs/{job_id}']", state="detached")
    page.select_option("#status-filter", JobStatus.succeeded.value)
    page.wait_for_selector(f"a[href='/jobs/{job_id}']")
    page.screenshot(path=ARTIFACTS / "jobs.png", full_page=True)


def test_another_key_sees_nothing_and_the_key_stays_in_the_tab(page, web_stack, tmp_path):
    client = web_stack.client("alice")
    response = web_stack.submit(client, png_bytes(np.full((96, 96, 3), 200, np.uint8)), model="shapes")
    job_id = response.json["id"]
    web_stack.wait_for(client, job_id)
    page.goto(f"/jobs/{job_id}")
    _enter_key(page, KEYS["bob"])
    page.wait_for_selector("#page-error:not([hidden])")
    assert "not_found" in page.inner_text("#page-error")
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("sessionStorage.getItem('heatmapApiKey')") == KEYS["bob"]
    page.goto("/jobs")
    page.wait_for_selector("#jobs-empty:not([hidden])")
    assert page.locator(f"a[href='/jobs/{job_id}']").count() == 0


def test_cancel_and_delete_buttons(page, web_stack):
    client = web_stack.client("alice")
    # A long job (tiled, 4-px stride): canceled from the page while it runs.
    slow = web_stack.submit(
        client, png_bytes(np.full((1024, 1024, 3), 60, np.uint8)), model="shapes", mode="tiled", stride=4
    )
    page.goto(f"/jobs/{slow.json['id']}")
    _enter_key(page, KEYS["alice"])
    page.wait_for_selector("#cancel-job:not([hidden])")
    page.click("#cancel-job")
    page.wait_for_selector(f"#job-status.status-{JobStatus.canceled}", timeout=60_000)
    assert web_stack.job_row(slow.json["id"]).status == JobStatus.canceled
    response = web_stack.submit(client, png_bytes(np.full((96, 96, 3), 90, np.uint8)), model="shapes")
    job_id = response.json["id"]
    web_stack.wait_for(client, job_id)
    page.goto(f"/jobs/{job_id}")  # the key is kept for this tab: not asked again
    page.wait_for_selector("#delete-job:not([hidden])")
    assert page.locator("#key-panel").is_hidden()
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-job")
    page.wait_for_url("**/jobs")
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 404


def test_swagger_ui_is_served_locally(page, web_stack):
    violations = []  # issue 20: the page now has a CSP; Swagger UI must still start under it
    page.on("console", lambda message: "Content Security Policy" in message.text and violations.append(message.text))
    page.goto("/api/v1/docs")
    page.wait_for_selector(".swagger-ui .information-container .title", timeout=30_000)
    assert "Heatmap jobs" in page.inner_text(".swagger-ui .information-container .title")
    page.wait_for_selector(".opblock-summary-path")
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
    assert "/api/v1/jobs/{job_id}/viewer" in [path.replace("\u200b", "") for path in paths], paths
    page.screenshot(path=ARTIFACTS / "docs.png")
    assert violations == [], violations


def test_open_mode_asks_for_no_key(browser, web_stack):
    context = browser.new_context(base_url=web_stack.open_url)
    guard = Guard(web_stack.open_url)
    context.route("**/*", guard)
    page = context.new_page()
    page.goto("/")
    page.wait_for_selector("#submit-form:not([hidden])")
    assert page.locator("#key-panel").is_hidden() and page.locator("#key-status").is_hidden()
    assert "shapes" in page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
    assert page.input_value("#top_k") == "3" and page.get_attribute("#batch_size", "max") == "256"
    page.goto("/jobs")
    page.wait_for_selector("#jobs-empty:not([hidden])")  # alice's jobs are not the open mode's
    context.close()
    assert guard.blocked == [] and all(key is None for _, _, key in guard.requests)


def test_a_failed_job_shows_its_error(page, web_stack):
    client = web_stack.client("alice")
    jpeg = png_bytes(np.random.default_rng(2).integers(0, 255, (160, 160, 3), dtype=np.uint8), "JPEG")
    job_id = web_stack.submit(client, jpeg[: len(jpeg) // 2], model="shapes").json["id"]  # header intact, data cut
    web_stack.wait_for(client, job_id)
    page.goto(f"/jobs/{job_id}")
    _enter_key(page, KEYS["alice"])
    page.wait_for_selector("#job-error:not([hidden])")
    assert page.inner_text("#job-status") == JobStatus.failed
    assert page.inner_text("#job-error").startswith("corrupt_image: ")
    assert page.locator("#result").is_hidden() and page.locator("#delete-job").is_visible()
    page.screenshot(path=ARTIFACTS / "failed.png")


# --------------------------------------------------------------------------- a newcomer's first hour (issue 19)
DOCS = REPO_ROOT / "docs"


def _form(page) -> None:
    page.goto("/")
    _enter_key(page, KEYS["alice"])
    page.wait_for_selector("#submit-form:not([hidden])")


def test_the_form_guides(page, web_stack):
    """Fields per mode (batch size in tiled mode only, stride in both), an advanced section
    (mask as a choice with a file input), the model's stride, window and top-k bounds, an
    unavailable model marked with its whole reason, and the error next to its field."""
    _form(page)
    assert page.input_value("#model") == "shapes"
    assert page.is_visible("#stride") and not page.is_visible("#batch_size")  # direct mode
    page.select_option("#mode", "tiled")
    assert page.is_visible("#batch_size") and page.is_visible("#stride")
    assert "1 to 64 (the window)" in page.inner_text("#stride-limits")
    page.select_option("#mode", "direct")
    info = page.inner_text("#model-info")
    assert "window 64x64 px" in info and "output stride 16 px" in info and "null" not in info
    assert "background (skipped by top-k and the first view): background" in info
    # Five classes, one of them background: top-k runs 1 to 4.
    assert page.get_attribute("#top_k", "max") == "4" and page.inner_text("#top_k-limits").startswith("1 to 4")
    # The advanced section is folded; the mask is a choice, with a file input for a picture.
    for name in ("level", "mpp", "mask", "image_url", "callback_url", "precision", "threshold"):
        assert not page.is_visible(f"#{name}"), name
    page.click("#advanced summary")
    assert page.is_visible("#mask") and not page.is_visible("#mask_image")
    page.select_option("#mask", "image")
    assert page.is_visible("#mask_image")
    page.fill("#mpp", "0.25")
    page.dispatch_event("#mpp", "input")
    assert "at 0.25 µm/px the window covers 16.0 x 16.0 µm" in page.inner_text("#model-info")
    page.select_option("#mask", "none")
    # An unavailable model: marked in the list, its reason in full, submitting disabled.
    label = page.eval_on_selector("#model option[value=vgg16]", "o => o.textContent")
    assert label == "vgg16 (unavailable)"
    page.select_option("#model", "vgg16")
    reason = page.inner_text("#model-unavailable")
    served = web_stack.client("alice").get("/api/v1/models").json
    full = next(m["reason"] for m in served["models"] if m["name"] == "vgg16")
    assert reason == "Unavailable here: " + full and page.is_disabled("#submit-button")
    page.select_option("#model", "shapes")
    assert page.is_enabled("#submit-button")
    # An error about one field is shown next to that field (image_url is off on this service).
    page.fill("#image_url", "file:///data/slide.svs")
    page.click("#submit-button")
    page.wait_for_selector("#image_url-error:not([hidden])")
    assert "INPUT_URL_PREFIXES" in page.inner_text("#image_url-error")
    assert page.is_hidden("#classes-error") and page.is_hidden("#image-error")
    assert page.is_hidden("#key-panel")  # a 403 about the input is not a key problem
    page.screenshot(path=ARTIFACTS / "form.png", full_page=True)


def test_the_first_view_shows_the_objects(page, web_stack, tmp_path):
    """The default top-3 of the bundled model skips `background`; asked for explicitly, the
    viewer still opens on the strongest other class; the page offers every download."""
    scene, objects = _scene(tmp_path)
    client = web_stack.client("alice")
    default = web_stack.submit(client, scene.read_bytes(), model="shapes").json["id"]
    everything = web_stack.submit(
        client, scene.read_bytes(), model="shapes", classes="background,circle,square,triangle,cross"
    ).json["id"]
    for job_id in (default, everything):
        assert web_stack.wait_for(client, job_id)["status"] == JobStatus.succeeded
    page.goto(f"/jobs/{everything}")
    _enter_key(page, KEYS["alice"])
    _wait_viewer(page)
    manifest = client.get(f"/api/v1/jobs/{everything}/viewer").json
    names = [c["name"] for c in manifest["classes"]]
    assert names[0] == "background"
    others = [c for c in manifest["classes"] if c["name"] != "background"]
    strongest = max(others, key=lambda c: c["max"])
    assert page.input_value("#class-select") == str(names.index(strongest["name"]))
    assert page.evaluate("window.heatmapViewer.channel") == names.index(strongest["name"])
    page.goto(f"/jobs/{default}")
    _wait_viewer(page)
    options = page.eval_on_selector_all("#class-select option", "els => els.map(e => e.textContent)")
    assert "background" not in options and len(options) == 3
    labels = page.eval_on_selector_all("#downloads a", "els => els.map(e => e.textContent)")
    assert any(label.startswith("heatmap.tif") for label in labels)
    assert any(label.startswith("regions.geojson") for label in labels)
    assert page.is_hidden("#chance-note")
    assert "each model window covers 64x64 level-0 px" in page.inner_text("#job-scale")
    page.locator("main").screenshot(path=ARTIFACTS / "first-view.png")


def test_canceled_is_neutral_and_retry_makes_a_new_job(page, web_stack):
    client = web_stack.client("alice")
    slow = web_stack.submit(
        client, png_bytes(np.full((1024, 1024, 3), 60, np.uint8)), model="shapes", mode="tiled", stride=4
    ).json["id"]
    assert client.post(f"/api/v1/jobs/{slow}/cancel").status_code == 202
    page.goto(f"/jobs/{slow}")
    _enter_key(page, KEYS["alice"])
    page.wait_for_selector("#job-error:not([hidden])")
    assert page.get_attribute("#job-error", "class") == "notice"  # not the red error box
    assert page.is_visible("#retry-job")
    page.click("#retry-job")
    page.wait_for_url(lambda url: url.rstrip("/").rsplit("/", 1)[1] not in (slow, "jobs"))
    retry = page.url.rsplit("/", 1)[1]
    assert client.get(f"/api/v1/jobs/{retry}").json["retry_of"] == slow
    client.post(f"/api/v1/jobs/{retry}/cancel")


def test_form_submits_a_finer_direct_stride(page, web_stack, tmp_path):
    """Direct mode at half the output stride is one form field away: stride is shown in
    direct mode with the model's choices, and the job runs with it."""
    page.goto("/")
    page.wait_for_selector("#key-panel:not([hidden])")
    _enter_key(page, KEYS["alice"])
    page.wait_for_selector("#submit-form:not([hidden])")
    picture = tmp_path / "flat.png"
    picture.write_bytes(png_bytes(np.full((128, 128, 3), 120, np.uint8)))
    page.set_input_files("#image", str(picture))
    page.select_option("#model", "shapes")
    page.select_option("#mode", "direct")
    assert page.is_visible("#stride")
    assert "direct: 16, 8, 4, 2" in page.inner_text("#stride-limits")
    page.fill("#stride", "8")
    page.click("#submit-button")
    page.wait_for_url("**/jobs/*")
    job = web_stack.client().get(f"/api/v1/jobs/{page.url.rsplit('/', 1)[1]}").json
    assert job["params"]["mode"] == "direct" and job["params"]["stride"] == 8
