"""Headless Chromium for the report tests (Debian's ``chromium`` and ``chromium-driver``,
driven through Selenium). Without them the browser tests skip, unless
``SAVEPOINTS_REQUIRE_BROWSER=1`` (CI sets it, after installing them) makes that a failure.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest


def chromium_paths() -> tuple[str, str] | None:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(n)), None)  # fmt: skip
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_browser(width: int = 1280, height: int = 1000) -> Any:
    paths = chromium_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        paths = None
    if paths is None:
        why = "headless Chromium is not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("SAVEPOINTS_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(paths[1]), options=options)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[str]:
    """Console errors and uncaught exceptions since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def ink(png: bytes) -> tuple[float, int]:
    """(share of pixels that are not the background, number of distinct colours)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    small = image.resize((image.width // 2, image.height // 2))
    colours = small.getcolors(maxcolors=small.width * small.height) or []
    total = sum(n for n, _ in colours)
    background = max(n for n, _ in colours)
    return (total - background) / total, len(colours)
