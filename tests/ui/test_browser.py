"""End to end in a real headless browser: Debian's Chromium driven by Selenium through
chromedriver (`make browser` installs both). A run shows with its stages, a chart draws its
data points (checked in the page and in the canvas, and saved as a screenshot), a running
stage's chart takes a new metrics row by itself, an annotator labels 5 pairs with the
keyboard, the server is killed and started again, the annotator resumes at pair 6, the
preference file holds exactly the 5 labels with their positions, and `lmforge dpo` trains on
it.

Screenshots go to $LMFORGE_TEST_ARTIFACTS (default: test-artifacts/ at the repository root)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, spawn
from tests.ui.conftest import SFT_LOSS, make_runs, make_session

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install -e '.[dev]')")
if not (CHROMIUM and DRIVER):
    pytest.skip("no headless browser: `make browser` installs Debian's chromium and "
                "chromium-driver", allow_module_level=True)
pytest.importorskip("fastapi")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
WAIT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ui:
    """`lmforge ui` in its own process, as a user starts it."""

    def __init__(self, runs: Path, labels: Path, port: int) -> None:
        self.args = [sys.executable, "-m", "lmforge.cli", "ui", "--runs", str(runs),
                     "--labels", str(labels), "--port", str(port)]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self) -> Ui:
        self.proc = spawn(self.args, cwd=ROOT)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lmforge ui exited: {self.proc.communicate()[1][-2000:]}")
            try:
                with urllib.request.urlopen(self.base + "/api/stages", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError("lmforge ui did not answer in time")

    def kill(self) -> None:  # no clean shutdown: what was acknowledged must already be on disk
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.communicate(timeout=WAIT_S)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # the flags a closed network needs: no background fetches, no update checks, no sync
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(driver, what, message: str):
    return WebDriverWait(driver, WAIT_S).until(lambda d: what(d), message)


def _index(driver) -> int | None:
    return driver.execute_script(
        "const p = document.querySelector('.progress'); return p ? Number(p.dataset.index) : null")


def test_dashboard_chart_and_five_keyboard_labels_that_survive_a_restart(
        browser, tiny_run: Path, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    runs, labels = make_runs(tmp_path / "runs"), tmp_path / "labels"
    make_session(labels)
    ui = Ui(runs, labels, _free_port()).start()
    name = "Ana <QA>"  # escaped in the page, quoted in the URL
    keys = [Keys.ARROW_LEFT, Keys.ARROW_RIGHT, "1", "2", Keys.ARROW_LEFT]
    sides = ["left", "right", "left", "right", "left"]
    reason = "clearer; typing t, b or s here is text, not a label"
    try:
        browser.get(ui.base + "/")
        badge = browser.find_element(By.CSS_SELECTOR, 'span[data-stage="demo/sft"] .badge')
        assert badge.text == "finished"
        assert browser.find_element(By.CSS_SELECTOR, 'span[data-stage="demo/grpo"] .badge').text == "failed"
        browser.save_screenshot(str(ARTIFACTS / "ui-runs.png"))

        browser.get(ui.base + "/stage/demo/sft")
        _wait(browser, lambda d: d.execute_script(
            "const p = document.querySelector('.panel[data-metric=\"loss\"]');"
            "return p && p.dataset.points"), "the loss chart never drew")
        raw = browser.execute_script(
            "return window.lmforgeCharts.find(p => p.metric === 'loss').plot.data.slice(0, 2)")
        assert raw == [[s for s, _ in SFT_LOSS], [v for _, v in SFT_LOSS]]
        # pixels of the series colour (#2b6cb0) in the loss chart's canvas: the line is drawn
        painted = browser.execute_script("""
            const c = document.querySelector('.panel[data-metric="loss"] canvas');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < px.length; i += 4)
              if (px[i + 3] > 200 && px[i + 2] > px[i] + 80 && px[i + 2] > 120) n++;
            return n;""")
        assert painted > 100, painted
        browser.save_screenshot(str(ARTIFACTS / "ui-stage-chart.png"))

        # a stage at work (no summary, just written): its chart follows new rows by itself
        live = runs / "demo" / "live"
        live.mkdir()
        (live / "config.yaml").write_text("x: 1\n")
        (live / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        browser.get(ui.base + "/stage/demo/live")
        points = "return document.querySelector('.panel[data-metric=\"loss\"]')?.dataset.points"
        _wait(browser, lambda d: d.execute_script(points) == "1", "the live chart never drew")
        with open(live / "metrics.jsonl", "a") as f:
            f.write('{"step": 2, "loss": 0.5}\n')
        _wait(browser, lambda d: d.execute_script(points) == "2", "the live chart never updated")

        browser.get(ui.base + "/annotate/s1")
        field = browser.find_element(By.ID, "annotator")
        field.send_keys(name, Keys.ENTER)
        for i, key in enumerate(keys):
            _wait(browser, lambda d, i=i: _index(d) == i, f"pair {i + 1} never showed")
            if i == 2:
                box = browser.find_element(By.NAME, "reason")
                box.send_keys(reason)
                assert _index(browser) == 2  # the letters were text
                box.send_keys(Keys.ESCAPE)
            ActionChains(browser).send_keys(key).perform()
        _wait(browser, lambda d: _index(d) == 5, "the fifth label never landed")
        ui.kill()

        ui.start()  # the same port, a new process: only the disk remembers
        browser.get(ui.base + "/annotate/s1?annotator=" + urllib.request.quote(name))
        assert _index(browser) == 5
        progress = browser.find_element(By.CSS_SELECTOR, ".progress").text
        assert progress.startswith("pair 6 of 12") and "Ana <QA>" in progress
        browser.save_screenshot(str(ARTIFACTS / "ui-annotate-resumed.png"))
        browser.get(ui.base + "/annotate/s1/results")
        browser.save_screenshot(str(ARTIFACTS / "ui-results.png"))
    finally:
        ui.kill()

    rows = [json.loads(x) for x in (labels / "s1" / "preferences.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and len((labels / "s1" / "labels.jsonl").read_text().splitlines()) == 5
    assert [r["chosen_position"] for r in rows] == sides
    assert [r["reason"] for r in rows] == ["", "", reason, "", ""]
    assert {r["annotator"] for r in rows} == {name}
    r = run_cli("dpo", "configs/dpo/tiny.yaml", f"model.path={tiny_run / 'sft'}",
                f"data.train={labels / 's1' / 'preferences.jsonl'}", f"run.dir={tmp_path / 'dpo'}",
                "train.max_steps=1", "eval.task=null", "log.progress=off")
    assert r.returncode == 0, r.stderr[-2000:]
    read = json.loads((tmp_path / "dpo" / "summary.json").read_text())["data"]["rows"]
    assert read["rows"] == 5 and read["kept"] == 5
