"""A picture of the dashboard: headless Chromium (Debian's `chromium` and `chromedriver`) driven by
Selenium, which the dev extras install; for the README's picture and for `osd demo --screenshot`."""

from __future__ import annotations

import shutil
from pathlib import Path


def browser(width: int = 1400, height: int = 1800):
    """A headless Chromium session; raises RuntimeError with what to install when it cannot start."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        raise RuntimeError("the screenshot needs selenium: pip install -e '.[dev]'") from err
    if not (chromium and driver):
        raise RuntimeError("the screenshot needs Debian's chromium and chromium-driver (apt-get install)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(options=options, service=Service(driver))


def dashboard_screenshot(base_url: str, path: Path, time_range: str = "1h") -> None:
    """Open the dashboard, choose `time_range`, wait until its charts have data points, save a PNG;
    raises RuntimeError when that fails."""
    driver = browser()
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(f"{base_url}/dashboard")
        driver.find_element(By.CSS_SELECTOR, f'[data-range="{time_range}"]').click()
        WebDriverWait(driver, 30).until(
            lambda d: (
                d.find_elements(By.CSS_SELECTOR, "#acceptance .point")
                and d.find_elements(By.CSS_SELECTOR, "#throughput .point")
            )
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    except WebDriverException as err:
        raise RuntimeError(f"the dashboard screenshot failed: {err.msg}") from err
    finally:
        driver.quit()
