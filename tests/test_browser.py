"""The demo in a real browser: headless Chromium (Debian's, driven by Playwright) types a prompt,
presses generate, sees the text stream in, switches the labels to Chinese, and saves a screenshot.

Chromium comes from the system (`apt-get install chromium fonts-noto-cjk`, which .ci/run does);
Playwright never downloads a browser here. Without Chromium the test is skipped, except in CI,
where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from demo_release import PROMPT, tiny_release_store

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless in a sandboxed CI box with no network: no GPU, no sandbox (root), and none of
# Chromium's own background connections (each would be refused, many at a time).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def chromium_path() -> str:
    if not Path(CHROMIUM).is_file():
        message = f"no Chromium at {CHROMIUM}: apt-get install -y chromium fonts-noto-cjk"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory, prefect_api):
    from test_publish_demo import free_port

    from ember.deployments.app import launch

    demo = launch(tiny_release_store(tmp_path_factory) / "releases", port=free_port(), prevent_thread_lock=True,
                  quiet=True)
    yield demo.local_url
    demo.close()


def test_generate_and_switch_to_chinese(chromium_path, demo_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(locale="en-US", viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(demo_url)
            prompt = page.get_by_label("Prompt")
            expect(prompt).to_be_visible()
            expect(page.locator("#card")).to_contain_text("Ember model v0001")  # the model card beside it
            prompt.fill(PROMPT)
            page.get_by_role("button", name="Generate").click()
            output = page.locator("#output textarea")
            # The answer is the prompt plus new text, streamed in.
            expect(output).to_have_value(re.compile(rf"^{re.escape(PROMPT)}[\s\S]+"))
            # When it is done, the status line says what served it.
            expect(page.locator("#status")).to_contain_text(re.compile(r"v0001 · fp32 · \d+ tokens"))
            generated = output.input_value()
            assert len(generated) > len(PROMPT)
            page.screenshot(path=str(tmp_path / "demo-en.png"), full_page=True)

            page.get_by_text("中文", exact=True).click()
            for label in ("提示词", "最大长度", "温度"):
                expect(page.get_by_label(label).first).to_be_visible()
            expect(page.get_by_role("button", name="生成")).to_be_visible()
            expect(page.get_by_text("模型卡片")).to_be_visible()
            assert output.input_value() == generated  # switching labels keeps the answer
            shot = tmp_path / "demo-zh.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
            print(f"screenshots: {tmp_path / 'demo-en.png'} {shot}")

            # A browser that prefers Chinese gets Chinese labels without touching the toggle.
            zh = browser.new_page(locale="zh-CN")
            zh.goto(demo_url)
            expect(zh.get_by_label("提示词")).to_be_visible(timeout=30_000)
        finally:
            browser.close()
