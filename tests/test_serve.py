"""`converge serve` as `make run` starts it: API, dashboard and a local worker on one port."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.scratch_db import free_port
from conftest import CLI, REPO, converge_env, tiny_spec

pytestmark = pytest.mark.slow


def test_serve_runs_the_demo_study_and_shows_it(db_url: str, tmp_path: Path) -> None:
    spec_path = tmp_path / "demo.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec("demo", n_trials=2)))
    port = free_port()
    server = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--demo-spec", str(spec_path)],
        cwd=REPO, env=converge_env(db_url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        study = None
        while time.monotonic() < deadline:
            try:
                study = httpx.get(f"{base}/v1/studies/demo", timeout=5).json()
            except httpx.TransportError:
                study = None
            if study and study.get("state") == "done":
                break
            time.sleep(0.5)
        assert study and study["state"] == "done", study
        assert httpx.get(f"{base}/v1/health").json()["status"] == "ok"
        # Open (no token): a page on a rebound host name cannot drive it; its own names still work.
        rebound = httpx.get(f"{base}/v1/studies", headers={"Host": f"rebind.attacker.example:{port}"})
        assert rebound.status_code == 400 and "CONVERGE_ALLOWED_HOSTS" in rebound.json()["detail"]
        assert httpx.get(f"{base}/v1/studies", headers={"Host": f"localhost:{port}"}).status_code == 200
        metrics = httpx.get(f"{base}/v1/studies/demo/trials/0/metrics").json()
        assert len(metrics["columns"]["epoch"]) >= 2
        assert "<html" in httpx.get(f"{base}/dashboard").text.lower()
        names = [s["study_name"] for s in httpx.get(f"{base}/api/studies").json()["study_summaries"]]
        assert names == ["demo"]
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    assert "submitted demo study 'demo'" in output
