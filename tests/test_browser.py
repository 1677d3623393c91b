"""The demo in a real browser: headless Chromium (Debian's, driven by Playwright) types a prompt,
presses generate, sees the text stream in with the prompt marked apart, finds examples in the
model's language and the model card's tables inside their column, switches the labels to
Chinese, switches releases, and saves screenshots.

Chromium comes from the system (`apt-get install chromium fonts-noto-cjk`, which .ci/run does);
Playwright never downloads a browser here. Without Chromium the test is skipped, except in CI,
where it fails. With $EMBER_SCREENSHOTS set, demo-en.png and demo-zh.png are also written there
(the README shows them).
"""

from __future__ import annotations

import re

import pytest

from demo_release import PROMPT, tiny_release_store
from helpers import CHROMIUM_ARGS, screenshot

pytestmark = pytest.mark.slow

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")

# What "readable" means for the card, measured where the reader sees it: the card never scrolls
# sideways, no table needs its own sideways scroll, and no word or number in a table is wider
# than its cell (so none is broken in two or runs over the next one). Store keys (code) may wrap.
CARD_LAYOUT_JS = """card => {
  const ctx = document.createElement('canvas').getContext('2d');
  const split = [];
  for (const cell of card.querySelectorAll('th, td')) {
    if (cell.querySelector('code')) continue;
    const style = getComputedStyle(cell);
    ctx.font = style.font;
    const room = cell.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    for (const word of cell.textContent.trim().split(/\\s+/))
      if (ctx.measureText(word).width > room + 0.5) split.push(word);
  }
  return {card_overflow: card.scrollWidth - card.clientWidth,
          table_overflow: [...card.querySelectorAll('table')].map(t => t.scrollWidth - t.clientWidth),
          split};
}"""

# The prompt's and the model's text's looks, to check they differ where a reader sees them.
STYLES_JS = """output => ['.ember-prompt', '.ember-generated'].map(sel => {
  const style = getComputedStyle(output.querySelector(sel));
  return {weight: parseInt(style.fontWeight), background: style.backgroundColor,
          underline: parseFloat(style.borderBottomWidth)};
})"""


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory, prefect_api):
    from ember.deployments.app import launch
    from release_builders import free_port

    demo = launch(
        tiny_release_store(tmp_path_factory) / "releases", port=free_port(), prevent_thread_lock=True, quiet=True
    )
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def two_languages_url(tmp_path_factory, corpora):
    """A demo serving a Chinese model (latest) and an English one (v0001)."""
    from ember.deployments.app import launch
    from release_builders import free_port, publish_two_languages

    releases = publish_two_languages(tmp_path_factory.mktemp("languages"), corpora)
    demo = launch(releases, port=free_port(), prevent_thread_lock=True, quiet=True)
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
            card = page.locator("#card")
            expect(card).to_contain_text("Ember model v0001")  # the model card beside it

            # The model is English: so are the examples, its own evaluate prompt first.
            examples = page.locator("#examples button")
            expect(examples.first).to_have_text(PROMPT)
            shown = examples.all_inner_texts()
            assert len(shown) > 1 and not any(CJK.search(text) for text in shown), shown
            examples.nth(1).click()
            expect(prompt).to_have_value(shown[1])  # an example fills the prompt

            prompt.fill(PROMPT)
            page.get_by_role("button", name="Generate").click()
            # The prompt is shown apart, the new text streams in after it.
            output = page.locator("#output")
            expect(output.locator(".ember-prompt")).to_have_text(PROMPT)
            expect(output.locator(".ember-generated")).to_have_text(re.compile(r"\S"))
            # When it is done, the status line says what served it.
            expect(page.locator("#status")).to_contain_text(re.compile(r"v0001 · fp32 · \d+ tokens"))
            generated = output.locator(".ember-generated").text_content()
            assert generated is not None and generated.strip()
            mark, text = output.evaluate(STYLES_JS)
            assert mark["weight"] >= 600 > text["weight"], (mark, text)  # bold prompt, plain answer
            assert mark["underline"] >= 1 and text["underline"] == 0
            assert mark["background"] != text["background"]

            # The card's tables fit its column and read whole.
            layout = card.evaluate(CARD_LAYOUT_JS)
            assert layout["card_overflow"] <= 0 and layout["split"] == [], layout
            assert len(layout["table_overflow"]) >= 3 and max(layout["table_overflow"]) <= 0, layout
            screenshot(page, tmp_path, "demo-en.png")

            page.get_by_text("中文", exact=True).click()
            for label in ("提示词", "最大长度", "温度"):
                expect(page.get_by_label(label).first).to_be_visible()
            expect(page.get_by_role("button", name="生成")).to_be_visible()
            expect(page.get_by_text("模型卡片")).to_be_visible()
            expect(output).to_contain_text("高亮的是提示词")
            # Switching labels keeps the answer, and the examples (they follow the model, not the labels).
            assert output.locator(".ember-generated").text_content() == generated
            assert examples.all_inner_texts() == shown
            shot = screenshot(page, tmp_path, "demo-zh.png")
            print(f"screenshots: {tmp_path / 'demo-en.png'} {shot}")

            # A browser that prefers Chinese gets Chinese labels without touching the toggle.
            zh = browser.new_page(locale="zh-CN")
            zh.goto(demo_url)
            expect(zh.get_by_label("提示词")).to_be_visible(timeout=30_000)
        finally:
            browser.close()


def test_examples_follow_the_release(chromium_path, two_languages_url):
    from playwright.sync_api import expect, sync_playwright

    from release_builders import ZH_PROMPT

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(locale="en-US", viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(two_languages_url)
            examples = page.locator("#examples button")
            expect(examples.first).to_have_text(ZH_PROMPT)  # latest is the Chinese model
            assert all(CJK.search(text) for text in examples.all_inner_texts())

            page.get_by_text("Advanced").click()
            page.get_by_label("Release").click()
            page.get_by_role("option", name="v0001").click()
            expect(page.locator("#card")).to_contain_text("Ember model v0001")
            expect(examples.first).to_have_text("To be")  # the English model's own prompt
            assert not any(CJK.search(text) for text in examples.all_inner_texts())

            # Markup in a prompt is shown as typed, not rendered.
            typed = "<i>To be</i> & <b>or</b>"
            page.get_by_label("Prompt").fill(typed)
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#status")).to_contain_text(re.compile(r"v0001 · fp32 · \d+ tokens"))
            expect(page.locator("#output .ember-prompt")).to_have_text(typed)
            assert page.locator("#output i, #output b").count() == 0
        finally:
            browser.close()
