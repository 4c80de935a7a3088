"""A real headless browser for report tests: Playwright driving the system's Chromium.

Debian's ``chromium`` package (``.ci/run`` installs it when missing); Playwright's own browser
download is not used, so no network access beyond the package registries is needed.
"""

import os
import shutil
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    """The Chromium executable: ``$CHROMIUM`` or the first of ``CHROMIUM`` on the PATH."""
    found = os.environ.get("CHROMIUM") or next((p for p in map(shutil.which, CHROMIUM) if p), None)
    if not found:
        raise RuntimeError("no Chromium found: apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)")
    return found


def open_page(html_file: Path, screenshot: Path | None = None) -> dict:
    """Load a local page, wait for it, and report what the browser saw.

    Returns ``{"images": [{id, complete, width, height}], "thumbs": n, "headings": [h2 texts],
    "errors": [uncaught script errors and console errors]}``.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(Path(html_file).resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                """Array.from(document.images).map(i => ({id: i.id || i.className, complete: i.complete,
                   width: i.naturalWidth, height: i.naturalHeight}))"""
            )
            headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
            if screenshot:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {
        "images": images,
        "thumbs": sum(1 for i in images if i["id"] == "thumb"),
        "headings": headings,
        "errors": errors,
    }
