"""Makes docs/serve-page.png: the try-it page of ``ldm-serve --model models/shapes-demo`` in Debian's Chromium
(Playwright), after four images of one prompt. Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python docs/serve_page_screenshot.py
"""

from __future__ import annotations

from playwright.sync_api import sync_playwright

from ldm_tools.serve_process import ServeProcess

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    server = ServeProcess("models/shapes-demo", "--max-steps", "50").wait_ready()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                                 args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.goto(f"{server.url}/")
            for field, value in (("#prompt", "a large red circle on a white background"), ("#steps", "25"),
                                 ("#guidance", "5"), ("#seed", "7"), ("#count", "4")):
                page.fill(field, value)
            page.click("#generate")
            page.locator("#images figure.done").nth(3).wait_for(timeout=300_000)
            page.locator("#queue-depth").filter(has_text="0").wait_for(timeout=30_000)
            page.screenshot(path="docs/serve-page.png", full_page=True)
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
