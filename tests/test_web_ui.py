"""The Temporal Web UI as an operator sees it, rendered by headless Chromium against a dev server with its UI.

A failed step must show as a failed activity with the step's name and exit code; a running one as a pending activity
with its summary. The screenshots are kept (their paths are printed) for people to look at.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import subprocess
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

from tardigrade.client import connect, start_pipeline
from tardigrade.devserver import EmbeddedTemporal
from tardigrade.plugin import TardigradePlugin
from tests.conftest import fast_timeouts, free_port, pipeline_from, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("TARDIGRADE_REQUIRE_EMULATORS") != "1",
    reason="no Chromium here (scripts/test.sh installs it)",
)


class Chromium:
    """Headless Chromium driven over the DevTools protocol: a live page (the UI long-polls a running workflow, so
    `--dump-dom` never returns for one) whose text can be read and screenshotted at any moment."""

    def __init__(self) -> None:
        assert CHROMIUM is not None, "Chromium is not installed: apt-get install -y chromium"
        self.profile = tempfile.mkdtemp()
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._ids = 0

    async def open(self, url: str) -> Any:
        """A DevTools session on a new tab showing ``url``."""
        active = Path(self.profile) / "DevToolsActivePort"
        port = (await wait_for(lambda: active.exists() and active.read_text().split("\n")[0], timeout=30)).strip()

        def new_tab() -> dict[str, Any]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?{url}", method="PUT")
            with urllib.request.urlopen(request, timeout=10) as response:
                return dict(json.loads(response.read()))

        tab = await asyncio.to_thread(new_tab)
        return await websockets.connect(tab["webSocketDebuggerUrl"], max_size=None)

    async def call(self, session: Any, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        await session.send(json.dumps({"id": self._ids, "method": method, "params": params}))
        while True:
            reply = json.loads(await session.recv())
            if reply.get("id") == self._ids:
                assert "error" not in reply, reply
                return dict(reply["result"])

    async def text_of(self, session: Any) -> str:
        found = await self.call(session, "Runtime.evaluate", expression="document.body.innerText", returnByValue=True)
        return str(found["result"].get("value") or "")

    async def html_of(self, session: Any) -> str:
        expression = "document.documentElement.outerHTML"
        found = await self.call(session, "Runtime.evaluate", expression=expression, returnByValue=True)
        return str(found["result"].get("value") or "")

    async def screenshot(self, session: Any, path: Path) -> None:
        shot = await self.call(session, "Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
async def ui_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedTemporal]:
    folder = tmp_path_factory.mktemp("ui-server")
    server = EmbeddedTemporal(
        db_file=folder / "t.db", port=free_port(), ui=True, ui_port=free_port(), log_file=folder / "server.log"
    )
    await server.start()
    yield server
    server.stop()


async def page_until(browser: Chromium, url: str, *texts: str, timeout: float = 60) -> tuple[Any, str]:
    """Open ``url`` and wait until the rendered page holds every text (the UI fetches state in the background).
    Texts are looked for in the page's HTML, which also holds the timeline's labels."""
    session = await browser.open(url)

    async def rendered() -> str | None:
        html = await browser.html_of(session)
        return html if all(t in html for t in texts) else None

    html: str = await wait_for(rendered, timeout=timeout, interval=0.5)
    return session, html


@pytest.fixture
def browser() -> Iterator[Chromium]:
    chromium = Chromium()
    yield chromium
    chromium.close()


async def test_a_failed_run_and_a_running_one_in_the_web_ui(
    ui_server: EmbeddedTemporal, browser: Chromium, tardigrade_home: Path, local_store: str, tmp_path: Path
) -> None:
    client: Client = await connect(ui_server.address, plugin=TardigradePlugin(state_dir=tardigrade_home / "ui"))
    steps = [{"name": "fine", "run": "true"}, {"name": "broken", "run": "echo bad thing; exit 4", "retries": 0}]
    failing = pipeline_from({"name": "failing", "timeouts": fast_timeouts(), "steps": steps}, tmp_path)
    steps = [{"name": "slow", "run": "sleep 120"}]
    running = pipeline_from({"name": "running", "timeouts": fast_timeouts(), "steps": steps}, tmp_path)
    shots = Path(os.environ.get("TARDIGRADE_SCREENSHOTS", tmp_path))
    async with Worker(client, task_queue="ui"):
        failed = await start_pipeline(client, failing, task_queue="ui", store_url=local_store)
        with pytest.raises(WorkflowFailureError):
            await failed.result()
        url = f"{ui_server.ui_url}/namespaces/default/workflows/{failed.id}"
        session, html = await page_until(browser, url, "tardigrade.run_step: Failed", "step 2/2 · broken")
        assert "exit code 4" in html, "the run's failure names the step's exit code"
        await browser.screenshot(session, shots / "failed-run.png")
        assert png_size(shots / "failed-run.png")[0] == 1400  # the window's width (its height loses the frame)
        await session.close()

        live = await start_pipeline(client, running, task_queue="ui", store_url=local_store)
        url = f"{ui_server.ui_url}/namespaces/default/workflows/{live.id}"
        session, html = await page_until(browser, url, "step 1/1 · slow", "Running")
        await browser.screenshot(session, shots / "running-run.png")
        assert png_size(shots / "running-run.png")[0] == 1400
        await session.close()
        await live.cancel()
    print(f"screenshots: {shots / 'failed-run.png'} {shots / 'running-run.png'}")
