"""The page in a real browser: Debian's chromium, headless, driven by Playwright against `sat serve` on loopback.

Upload a photo, wait for the caption, hover a word and check that its attention map is drawn over the photo;
a rejected file gets a clear message. The screenshot is left in test-artifacts/browser.png.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from playwright.sync_api import expect
from test_server import EXAMPLES, PHOTO, load_captioner

from show_attend_tell.captioner import SHIPPED_MODEL
from show_attend_tell.config import DEFAULT_BEAM_SIZE
from show_attend_tell.server import create_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts"
TIMEOUT_MS = 60_000  # a caption takes well under a second on an idle CPU; leave room for a busy machine
expect.set_options(timeout=TIMEOUT_MS)

# Sum and a coarse fingerprint of the overlay's opacity: zero when nothing is drawn.
OVERLAY_PIXELS = """() => {
  const canvas = document.getElementById("overlay");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let total = 0;
  const sample = [];
  for (let i = 3; i < data.length; i += 4) total += data[i];
  for (let i = 3; i < data.length; i += 4 * 509) sample.push(data[i]);
  return { total, sample };
}"""


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        reason = f"Debian's chromium is not installed at {CHROMIUM} (`make browser` installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires it")
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """`sat serve`'s app under uvicorn on a free loopback port, in a thread of this process."""
    import uvicorn

    app = create_app(load_captioner(tmp_path_factory.mktemp("model")), max_upload_bytes=2_000_000, queue_size=4)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(chromium, server_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        outside = []
        # Everything the page loads must come from the server itself.
        page.on(
            "request", lambda r: None if r.url.startswith((server_url, "blob:", "data:")) else outside.append(r.url)
        )
        page.goto(server_url)
        page.wait_for_selector("#health:has-text('Model loaded')")
        yield page
        assert outside == []
        browser.close()


def upload(page, path: Path) -> dict:
    """Choose `path` in the file input; returns the API's JSON once the page has shown it."""
    with page.expect_response(lambda r: "/api/caption" in r.url) as answer:
        page.set_input_files("#file", str(path))
    body = answer.value.json()
    expect(page.locator("#caption .word")).to_have_text(body["words"])
    return body


def test_caption_and_hovering_a_word_draws_its_attention_map(page):
    body = upload(page, PHOTO)
    words = page.locator("#caption .word")
    assert page.locator("#photo").evaluate("img => img.complete && img.naturalWidth") == body["width"]
    assert page.evaluate(OVERLAY_PIXELS)["total"] == 0  # nothing drawn before a word is chosen
    # the page asks for the product's default beam size; every other beam is listed
    assert body["beam_size"] == DEFAULT_BEAM_SIZE
    assert page.locator("#alternatives li").count() == len(body["alternatives"]) == DEFAULT_BEAM_SIZE - 1
    # each beam shows the score it was ranked by, then its log-probability
    first = body["alternatives"][0]
    shown = f"{first['score']:.2f} (log-probability {first['log_prob']:.2f})"
    assert page.locator("#alternatives li").first.inner_text().endswith(shown)
    assert f"score {body['score']:.2f} (log-probability {body['log_prob']:.2f})" in page.inner_text("#score")
    assert body["decoder"] == "lstm" and "LSTM decoder" in page.inner_text("#score")  # which decoder wrote it
    assert "LSTM decoder" in page.inner_text("#health")

    # the word the model looked at most narrowly makes the clearest picture
    peaks = [max(max(row) for row in alpha) for alpha in body["attention"]]
    index = peaks.index(max(peaks))
    words.nth(index).hover()
    assert page.get_attribute("#figure", "data-word") == body["words"][index]
    drawn = page.evaluate(OVERLAY_PIXELS)
    assert drawn["total"] > 0
    assert page.locator("#shown").inner_text() == body["words"][index]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)

    other = min(range(len(peaks)), key=lambda i: peaks[i])  # the most diffuse map differs from the sharpest
    words.nth(other).hover()
    assert page.evaluate(OVERLAY_PIXELS)["sample"] != drawn["sample"]

    # tapping pins a word: its map stays when the pointer leaves
    words.nth(index).click()
    page.mouse.move(5, 5)
    assert words.nth(index).get_attribute("aria-pressed") == "true"
    assert page.evaluate(OVERLAY_PIXELS)["sample"] == drawn["sample"]
    words.nth(index).click()
    page.mouse.move(5, 5)
    page.locator("#beam").focus()  # the word loses focus too: nothing pinned, nothing drawn
    assert page.evaluate(OVERLAY_PIXELS)["total"] == 0

    # another beam size captions the same photo again
    with page.expect_response(lambda r: "/api/caption?beam_size=5" in r.url) as answer:
        page.select_option("#beam", "5")
    body = answer.value.json()
    expect(page.locator("#alternatives li")).to_have_count(len(body["alternatives"]))
    assert 1 <= len(body["alternatives"]) <= 4


def test_a_rejected_file_gets_a_clear_message(page, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a photo")
    with page.expect_response(lambda r: "/api/caption" in r.url) as answer:
        page.set_input_files("#file", str(text))
    assert answer.value.status == 422
    expect(page.locator("#error")).to_contain_text("notes.jpg was rejected: notes.jpg: not an image")
    expect(page.locator("#result")).to_be_hidden()


def test_dropping_a_photo_with_greedy_decoding(page, server_url):
    page.goto(server_url)  # a fresh page: no photo yet, so choosing the beam size sends nothing
    page.select_option("#beam", "1")
    data = base64.b64encode((EXAMPLES / "coffee.jpg").read_bytes()).decode()
    with page.expect_response(lambda r: "/api/caption?beam_size=1" in r.url) as answer:
        page.evaluate(
            """(data) => {
              const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
              const transfer = new DataTransfer();
              transfer.items.add(new File([bytes], "coffee.jpg", { type: "image/jpeg" }));
              document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
            }""",
            data,
        )
    body = answer.value.json()
    assert answer.value.status == 200 and body["beam_size"] == 1
    expect(page.locator("#caption .word")).to_have_text(body["words"])
    # the shipped model's labels say espresso: the caption is the coffee template, and the one alternative is
    # what greedy decoding wrote (a random test decoder has no template words: no alternatives at beam 1)
    assert body["template"] == (SHIPPED_MODEL / "config.json").is_file()
    if body["template"]:
        (decoded,) = body["alternatives"]
        expect(page.locator("#alternatives li")).to_contain_text([decoded["caption"]])
        expect(page.locator("#guided")).to_contain_text("Written from a template for coffee (ImageNet label: espresso")
        expect(page.locator("#guided")).to_contain_text(f'The model\'s own caption: "{decoded["caption"]}"')
        # the box turns templates off: the decoder's caption, and beam size 1 has no other
        with page.expect_response(lambda r: "templates=false" in r.url) as answer:
            page.uncheck("#templates")
        body = answer.value.json()
        assert not body["template"] and body["caption"] == decoded["caption"]
        expect(page.locator("#caption .word")).to_have_text(body["words"])
        expect(page.locator("#guided")).not_to_contain_text("template")
        expect(page.locator("#alternatives li")).to_have_text(["none with beam size 1"])
        # without label guidance there are no templates to offer: the box is disabled until guidance is back
        with page.expect_response(lambda r: "guidance=false" in r.url):
            page.uncheck("#guidance")
        expect(page.locator("#templates")).to_be_disabled()
        with page.expect_response(lambda r: "guidance=true" in r.url):
            page.check("#guidance")
        expect(page.locator("#templates")).to_be_enabled()
        with page.expect_response(lambda r: "templates=true" in r.url):
            page.check("#templates")
    else:
        expect(page.locator("#alternatives li")).to_have_text(["none with beam size 1"])
    expect(page.locator("#error")).to_be_hidden()


def test_guided_words_are_marked_with_their_source_and_the_users_words_are_sent(page):
    body = upload(page, EXAMPLES / "chelsea.jpg")  # the encoder's labels say "Egyptian cat"
    (guide,) = body["guidance"]
    assert guide["source"] == "label" and body["words"][guide["position"]] in guide["forms"]
    marked = page.locator("#caption .word.guided")
    expect(marked).to_have_count(1)
    assert "Egyptian cat" in marked.get_attribute("title")
    expect(page.locator("#guided")).to_contain_text(f"{guide['word']} (ImageNet label: Egyptian cat")

    page.fill("#mention", "grass")
    with page.expect_response(lambda r: "mention=grass" in r.url) as answer:
        page.locator("#mention").press("Enter")
    body = answer.value.json()
    assert [g["source"] for g in body["guidance"]] == ["user", "label"]
    expect(page.locator("#caption .word")).to_have_text(body["words"])
    expect(page.locator("#caption .word.guided")).to_have_count(2)
    expect(page.locator("#guided")).to_contain_text("grass (your word)")

    page.fill("#mention", "zzzzq")
    with page.expect_response(lambda r: "mention=zzzzq" in r.url) as answer:
        page.locator("#mention").press("Enter")
    assert answer.value.status == 422
    expect(page.locator("#error")).to_contain_text("no word 'zzzzq'")
    page.fill("#mention", "")
