"""The notebooks in a real browser: JupyterLab from this venv, driven by Playwright (issue 14).

``make lab`` is where learners live, and what nbval cannot see breaks there: a figure that does
not render, a slider that does not redraw, a widget that shows a stale figure. This test starts
JupyterLab on a free local port, opens notebook 00 in headless Chromium, runs it, checks that its
figures render and that moving the scene slider changes the displayed image, then runs notebook
01 up to its temperature explorer and checks that moving the τ slider redraws its one figure.

It drives Debian's ``chromium`` package through ``executable_path`` (no browser download) and is
skipped, with the reason, where chromium or Playwright is missing. Screenshots of the run are
kept in ``results/browser/`` (not committed). Notebooks run in copies in a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "results" / "browser"
CHROMIUM = os.environ.get("MINIKD_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
RUN_TIMEOUT_MS = 15 * 60 * 1000  # a whole quick-mode notebook on a busy 2-core CPU
TAU_CELL = "tau_slider = widgets.FloatSlider"  # the cell of notebook 01 that holds the explorer

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (Debian: apt-get install "
                       "chromium; or set MINIKD_CHROMIUM); .ci/run installs it where it can"),
    pytest.mark.skipif(os.environ.get("MINIKD_SMOKE") == "1", reason="not part of the smoke runs"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install playwright; no `playwright install` needed)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook_until(src: Path, dst: Path, marker: str) -> Path:
    """A copy of ``src`` without outputs, cut after the first code cell containing ``marker``."""
    nb = json.loads(src.read_text(encoding="utf-8"))
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
        if cell["cell_type"] == "code" and marker in "".join(cell["source"]):
            break
    else:
        raise AssertionError(f"{src.name} has no cell with {marker!r}")
    nb["cells"] = cells
    nb["metadata"].pop("widgets", None)
    dst.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return dst


def _write_settings(folder: Path) -> None:
    """User settings of the test's JupyterLab: every cell in the page (no virtual scrolling, so
    the test sees them all) and no news prompt over the notebook."""
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                           "apputils-extension/notification": {"fetchNews": "false"}}.items():
        path = folder / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving copies of notebooks 00 and 01 (cut at its τ explorer); yields its URL."""
    work = tmp_path_factory.mktemp("lab")
    nb_dir = work / "notebooks"
    nb_dir.mkdir()
    _notebook_until(ROOT / "notebooks/00_toycity_and_data.ipynb", nb_dir / "00.ipynb", "results = {")
    _notebook_until(ROOT / "notebooks/01_vanilla_kd_temperature.ipynb", nb_dir / "01.ipynb", TAU_CELL)
    port, token = _free_port(), "minikd-browser-test"
    settings = work / "lab-settings"
    _write_settings(settings)
    env = {**os.environ, "MINIKD_MODE": "quick", "HF_HUB_OFFLINE": "1",
           "MINIKD_RESULTS_DIR": str(work / "results"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTER_CONFIG_DIR": str(work / "config"), "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    env.pop("MPLBACKEND", None)  # the lab's inline backend, as a learner has it
    env.pop("TQDM_DISABLE", None)  # progress bars, as a learner sees them
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
           "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={nb_dir}", "--LabApp.news_url=", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    with open(work / "jupyter.log", "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=nb_dir)
        try:
            yield _wait_for(server, f"http://127.0.0.1:{port}", token, work / "jupyter.log"), token
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


def _wait_for(server: subprocess.Popen, url: str, token: str, log: Path) -> str:
    """Poll the server's status API until it answers; fail with its log if it dies or stalls."""
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return url
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited: {log.read_text()[-2000:]}")
            time.sleep(1)
    pytest.fail(f"JupyterLab did not start in 2 min: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


def _open_and_run_all(browser, lab, name: str):
    """Open notebook ``name`` in JupyterLab, run every cell, wait until all have finished."""
    url, token = lab
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(f"{url}/lab/tree/{name}?token={token}&reset")  # a fresh layout: only this notebook
    page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=120_000)
    page.wait_for_timeout(5000)  # the notebook model and its kernel session settle
    # Select every cell in command mode and run the selection (what Run All does).
    page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").first.click()
    page.keyboard.press("Escape")
    page.keyboard.press("Control+a")
    page.keyboard.press("Control+Enter")
    # Every code cell has a number in its prompt ([12]:) and none is queued or running ([*]:).
    page.wait_for_function(
        """() => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
                            .map(e => e.textContent);
                   return p.length > 0 && p.every(t => /\\[\\d+\\]/.test(t)); }""",
        timeout=RUN_TIMEOUT_MS, polling=2000)
    page.wait_for_timeout(1500)  # the last outputs and widget views settle
    return page


def _tracebacks(page) -> list[str]:
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    return [t[:500] for t in outputs if "Traceback (most recent call last)" in t]


def _src(images) -> str:
    """The data URL of the first image the locator finds now ("" if none)."""
    return images.first.get_attribute("src", timeout=30_000) or "" if images.count() else ""


def _move_and_wait(page, slider, images, before: str) -> str:
    """Move ``slider`` (keyboard on its handle, then a click on its track) until ``images`` shows
    another picture than ``before``; returns the new picture's data URL ("" if none came)."""
    handle = slider.locator(".noUi-handle").first
    handle.focus()
    for attempt in range(2):
        if attempt == 0:
            for _ in range(3):
                handle.press("ArrowRight")
        else:
            box = slider.locator(".noUi-target").first.bounding_box()
            page.mouse.click(box["x"] + 0.8 * box["width"], box["y"] + box["height"] / 2)
        for _ in range(60):
            page.wait_for_timeout(500)
            now = _src(images)
            if now and now != before:
                return now
    return ""


def test_notebook_00_figures_render_and_the_scene_slider_redraws(browser, lab):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = _open_and_run_all(browser, lab, "00.ipynb")
    page.screenshot(path=str(SHOTS / "00_after_run.png"))
    assert _tracebacks(page) == []
    n_images = page.locator(".jp-OutputArea-output img").count()
    assert n_images >= 8, f"only {n_images} figures rendered"
    explorer = page.locator(".jp-CodeCell").filter(has=page.locator(".widget-slider")).first
    explorer.scroll_into_view_if_needed()
    images = explorer.locator(".jp-OutputArea-output img")
    assert images.count() == 1, f"the scene explorer shows {images.count()} figures; expected one"
    before = _src(images)
    after = _move_and_wait(page, explorer.locator(".widget-slider").first, images, before)
    explorer.screenshot(path=str(SHOTS / "00_scene_slider.png"))
    assert after, "moving the scene slider did not change the displayed image"
    assert images.count() == 1, f"after moving the slider the cell shows {images.count()} figures"
    page.close()


def test_notebook_01_temperature_slider_redraws_one_figure(browser, lab):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = _open_and_run_all(browser, lab, "01.ipynb")
    assert _tracebacks(page) == []
    cell = page.locator(".jp-CodeCell").filter(has=page.locator(".widget-slider")).last
    cell.scroll_into_view_if_needed()
    images = cell.locator(".jp-OutputArea-output img")
    assert images.count() == 1, f"the τ explorer shows {images.count()} figures; expected one"
    before = _src(images)
    after = _move_and_wait(page, cell.locator(".widget-slider").first, images, before)
    cell.screenshot(path=str(SHOTS / "01_tau_slider.png"))
    assert after, "moving the τ slider did not redraw the figure"
    assert images.count() == 1, f"after moving τ the cell shows {images.count()} figures"
    page.close()
