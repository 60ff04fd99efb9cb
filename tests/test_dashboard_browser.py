"""The dashboard in headless Chromium (Debian's `chromium` and `chromedriver`, via Selenium)
against a real server on loopback: charts with data points, a publish marker, a drift alert
after a forced domain shift, the trainer's panel, and a rollback refused without the admin token."""

from __future__ import annotations

import shutil
import time
from collections import Counter

import httpx
import pytest
from http_server import serving
from polling import PATIENCE
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.demo.screenshot import browser as headless_chromium
from serving.http.api import create_app
from store.registry import Registry

pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver (make test installs them)",
)


@pytest.fixture
def browser():
    driver = headless_chromium()
    yield driver
    driver.quit()


class ColdTrainer:
    """The trainer as the panel sees it (its status), on a cold start: a neighbour of the dashboard."""

    def status(self) -> dict:
        return {
            "state": "idle", "activity": "waiting for held-out traces: 312 of 500 positions", "step": 33,
            "trained_traces": 98, "held_out_positions": 312,
            "history": [{"kind": "gate", "step": 30, "publish": True, "reason": "gain +0.1000 over live",
                         "candidate": 0.3, "live": 0.2, "positions": 312, "replay": {"scores": [0.2, 0.3]}}],
        }  # fmt: skip

    def pause(self) -> None: ...

    def resume(self) -> None: ...


@pytest.fixture
def site(tiny_replica):
    make, models = tiny_replica
    replica = make("browser")
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    app = create_app(replica, tokenizer, "demo", admin_token="secret", trainer=ColdTrainer())
    with serving(app) as base:
        yield base, replica, models


def count(driver, selector: str) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, selector))


def trainer_panel(driver) -> dict[str, str]:
    """The trainer panel's rows: status key -> the text shown."""
    rows = driver.find_elements(By.CSS_SELECTOR, "#trainer tr[data-key]")
    return {row.get_attribute("data-key"): row.find_element(By.TAG_NAME, "td").text for row in rows}


def test_the_dashboard_renders_data_markers_alerts_and_guards_rollback(site, browser, tmp_path):
    base, replica, models = site
    weights = AutoModelForCausalLM.from_pretrained(models.draft).state_dict()
    Registry(replica.client).publish("draft", {n: t.clone() for n, t in weights.items()})
    for i in range(4):
        body = {"model": "demo", "prompt": f"def f{i}():", "max_tokens": 12, "temperature": 0,
                "metadata": {"domain": "python"}}  # fmt: skip
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=PATIENCE).status_code == 200
    now = time.time()  # a forced domain shift: "shift" acceptance falls from 0.6 to 0.2
    for i in range(100):
        accepted = 180 if i < 90 else 60
        replica.recorder.record(
            "draft:v1", "shift", Counter(accepted=accepted, drafted=300), at=now - (100 - i) * 10
        )
    assert replica.recorder.flush()

    browser.get(f"{base}/dashboard")
    # The page redraws every 3 s, replacing its elements: an element found in one drawing may be
    # gone by the next command, so a stale one is looked up again.
    wait = WebDriverWait(browser, PATIENCE, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: count(d, "#acceptance .point") > 0 and count(d, "#throughput .point") > 0)
    assert count(browser, "#acceptance .marker-publish") == 1  # the publish, with its tooltip
    wait.until(lambda d: count(d, '#alerts .alert[data-kind="drop"]') == 1)
    assert "shift" in browser.find_element(By.CSS_SELECTOR, "#alerts").text
    panel = wait.until(lambda d: trainer_panel(d))  # it says what the trainer waits for
    assert panel["activity"] == "waiting for held-out traces: 312 of 500 positions"
    assert panel["held_out_positions"] == "312" and "replay rounds: 1" in panel["history"]
    browser.save_screenshot(str(tmp_path / "dashboard.png"))

    wait.until(lambda d: d.find_element(By.ID, "rollback").click() or True)  # no token typed
    wait.until(expected_conditions.alert_is_present()).accept()  # "Roll back the live draft version...?"
    wait.until(lambda d: "refused (401)" in d.find_element(By.ID, "message").text)
    assert Registry(replica.client).live_version("draft") == 1  # nothing rolled back
