"""Headless Chromium renders the dashboard and the HTML report: the plots are drawn and show data.

Chromium is Debian's `chromium` package: installed by the `chromium` fixture when missing (as root, with
apt-get; `make browser` does the same by hand). The tests skip, saying why, only where it cannot be installed.
No network: the report inlines plotly.js, and the dashboard is served by the API on loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from test_plots import _seed

from benchmarks.scratch_db import free_port
from converge.core.db.engine import get_engine, session_scope
from converge.core.db.migrate import upgrade
from converge.core.settings import Settings
from converge.service.api.app import create_app
from converge.service.report import build_report
from converge.studies.plots.dashboard import save_study_figures
from converge.studies.storage import storage_for

pytestmark = pytest.mark.slow  # starts a browser and a server


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=900, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, env=env)  # stale package lists
            subprocess.run(install, capture_output=True, timeout=900, env=env)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("no Chromium: `apt-get install chromium` needs root and a Debian mirror, and neither worked here")
    return found


def _render(chromium: str, url: str, screenshot: Path) -> str:
    """The DOM after the page's scripts ran (virtual time: plots drawn), and a screenshot of it."""
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=8000", "--window-size=1280,2400", "--hide-scrollbars"]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=60, check=True)
    done = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    url = f"sqlite:///{tmp_path_factory.mktemp('browser') / 'converge.db'}"
    upgrade(url)
    settings = Settings(database_url=url)
    _seed(settings, "browsed")
    save_study_figures(settings, "browsed")  # what a worker does after a trial
    return settings


@pytest.fixture(scope="module")
def served(seeded: Settings) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(seeded), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _assert_plots_with_data(dom: str, at_least: int) -> None:
    assert len(re.findall(r'class="main-svg"', dom)) >= at_least  # plotly drew its SVG layers
    assert len(re.findall(r'class="point"', dom)) >= 10  # markers: traces with data, not empty axes
    assert re.search(r'<path class="js-line"[^>]* d="M[^"]+L', dom)  # a line with at least two points


def test_the_dashboard_shows_the_study_figures_drawn(chromium: str, served: str, tmp_path: Path) -> None:
    shot = tmp_path / "dashboard.png"
    dom = _render(chromium, f"{served}/dashboard/studies/1", shot)
    assert "browsed" in dom
    for key in ("objective_history", "parallel_coordinates", "lr_vs_objective", "verdict_counts", "loss_curves"):
        assert f"converge-{key}" in dom, key  # Converge's figures, next to Optuna's own
    _assert_plots_with_data(dom, at_least=5)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_the_html_report_renders_offline(chromium: str, seeded: Settings, tmp_path: Path) -> None:
    with session_scope(get_engine(seeded.database_url)) as session:
        page, held = build_report(session, storage_for(seeded), "browsed")
    report = tmp_path / "report.html"
    report.write_text(page)
    shot = tmp_path / "report.png"
    dom = _render(chromium, report.as_uri(), shot)
    figures = 5 + len(held["unhealthy"])
    assert len(re.findall(r'class="plot-container plotly"', dom)) == figures  # every figure drawn
    _assert_plots_with_data(dom, at_least=figures)
    assert 'class="parcoords"' in dom and "Trial 0: overfitting" in dom
    assert shot.stat().st_size > 20_000
