"""The page in a real browser: Debian's chromium, headless, driven by Playwright against `sat serve` on loopback.

Upload a photo, wait for the caption, hover a word and check that its attention map is drawn over the photo and
the COCO detector's boxes too; a rejected file gets a clear message. Screenshots are left in test-artifacts/
(browser.png, browser-boxes.png).
"""

from __future__ import annotations

import base64
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from helpers import EXAMPLES, PHOTO, load_captioner
from playwright.sync_api import expect

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
        # without label guidance there are no templates to offer and the detector guides nothing: their boxes are
        # disabled until guidance is back
        with page.expect_response(lambda r: "guidance=false" in r.url):
            page.uncheck("#guidance")
        expect(page.locator("#templates")).to_be_disabled()
        expect(page.locator("#detector")).to_be_disabled()
        with page.expect_response(lambda r: "guidance=true" in r.url):
            page.check("#guidance")
        expect(page.locator("#templates")).to_be_enabled()
        expect(page.locator("#detector")).to_be_enabled()
        with page.expect_response(lambda r: "templates=true" in r.url):
            page.check("#templates")
    else:
        expect(page.locator("#alternatives li")).to_have_text(["none with beam size 1"])
    # words may come twice only when asked: the box, unchecked by default, sends repeat_words
    expect(page.locator("#repeat-words")).not_to_be_checked()
    with page.expect_response(lambda r: "repeat_words=true" in r.url) as answer:
        page.check("#repeat-words")
    assert answer.value.status == 200
    with page.expect_response(lambda r: "repeat_words=false" in r.url):
        page.uncheck("#repeat-words")
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


def fresh(page, server_url) -> None:
    """A fresh page (every box back to its default), the model loaded."""
    page.goto(server_url)
    page.wait_for_selector("#health:has-text('Model loaded')")


def box_geometry(page) -> dict:
    """The displayed photo's rectangle and each drawn box's, in CSS pixels, in drawing order."""
    return page.evaluate(
        """() => {
          const rect = (element) => {
            const r = element.getBoundingClientRect();
            return [r.left, r.top, r.right, r.bottom];
          };
          return {
            photo: rect(document.getElementById("photo")),
            boxes: [...document.querySelectorAll("#boxes .box")].map(rect),
            labels: [...document.querySelectorAll("#boxes .box span")].map(rect),
          };
        }"""
    )


def assert_boxes_follow_the_photo(page, body: dict) -> None:
    geometry = box_geometry(page)
    left, top, right, bottom = geometry["photo"]
    sx, sy = (right - left) / body["width"], (bottom - top) / body["height"]
    # best first in the answer, drawn last (on top)
    for detection, drawn in zip(body["detections"], reversed(geometry["boxes"]), strict=True):
        x1, y1, x2, y2 = detection["box"]
        expected = [left + sx * x1, top + sy * y1, left + sx * x2, top + sy * y2]
        assert drawn == pytest.approx(expected, abs=1.5), detection
    # the labels of boxes that nearly coincide are stacked, not drawn over each other
    labels = geometry["labels"]
    for i, (l1, t1, r1, b1) in enumerate(labels):
        for l2, t2, r2, b2 in labels[:i]:
            assert not (l1 < r2 and l2 < r1 and t1 < b2 and t2 < b1), "two labels overlap"


def test_the_detectors_boxes_are_drawn_over_the_photo_and_the_toggle_hides_them(page, server_url):
    fresh(page, server_url)
    body = upload(page, EXAMPLES / "coffee.jpg")
    assert body["detector"] == "centernet"
    best = body["detections"][0]
    assert best["class"] == "cup" and best["score"] > 0.4  # the shipped detector sees the cup
    boxes = page.locator("#boxes .box")
    expect(boxes).to_have_count(len(body["detections"]))
    expect(boxes.last.locator("span")).to_have_text(f"cup {int(100 * best['score'] + 0.5)}%")
    expect(page.locator("#boxes-toggle")).to_have_text(f"show the COCO detector's {len(body['detections'])} boxes")
    page.evaluate("() => document.getElementById('photo').decode()")
    assert_boxes_follow_the_photo(page, body)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-boxes.png"), full_page=True)

    # the boxes scale with the photo as the window does
    left, _, right, _ = box_geometry(page)["photo"]
    page.set_viewport_size({"width": 560, "height": 600})
    page.wait_for_function(
        "(width) => document.getElementById('photo').getBoundingClientRect().width < width", arg=right - left - 100
    )
    assert_boxes_follow_the_photo(page, body)
    page.set_viewport_size({"width": 1100, "height": 900})

    # the toggle only hides and shows them: nothing is sent
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "/api/caption" in r.url else None)
    page.uncheck("#show-boxes")
    expect(page.locator("#boxes")).to_be_hidden()
    expect(boxes.first).to_be_hidden()
    page.check("#show-boxes")
    expect(boxes.first).to_be_visible()
    assert sent == []


def test_unchecking_the_detector_box_sends_detector_false(page, server_url):
    fresh(page, server_url)
    with page.expect_request(lambda r: "/api/caption" in r.url) as request:
        body = upload(page, EXAMPLES / "coffee.jpg")
    assert "detector=true" in request.value.url
    # no person in the photo: the note says people words were discouraged, and counts the rest
    assert "person" in body["discouraged"]
    others = len(body["discouraged"]) - 1
    expect(page.locator("#discouraged")).to_have_text(
        f"No person seen: people words discouraged. {others} other COCO objects not seen: their words discouraged."
    )
    assert page.get_attribute("#discouraged", "title") == f"discouraged: {', '.join(body['discouraged'])}"

    with page.expect_response(lambda r: "/api/caption" in r.url and "detector=false" in r.url) as answer:
        page.uncheck("#detector")
    body = answer.value.json()
    assert body["detections"] == [] and body["discouraged"] == []
    expect(page.locator("#caption .word")).to_have_text(body["words"])
    expect(page.locator("#boxes .box")).to_have_count(0)
    expect(page.locator("#boxes-toggle")).to_be_hidden()
    expect(page.locator("#discouraged")).to_be_hidden()
    with page.expect_response(lambda r: "detector=true" in r.url) as answer:
        page.check("#detector")
    expect(page.locator("#boxes .box")).to_have_count(len(answer.value.json()["detections"]))


MARKUP = '<img src="x" onerror="document.body.dataset.injected = 1">'


def test_detector_words_and_discouraged_classes_are_named_and_shown_as_text(page, server_url):
    """A detector guide word and the discouraged classes as the note gives them, and markup in an answer shown as
    text. The shipped examples have no detector word, so a real answer is rewritten and served to the page again
    (an intercepted request loses its file: Playwright does not carry a form's blob)."""
    fresh(page, server_url)
    body = upload(page, EXAMPLES / "coffee.jpg")
    body["words"][-1] = "giraffe"
    body["guidance"] = [
        {"word": "giraffe", "forms": ["giraffe"], "source": "detector", "label": "giraffe", "probability": 0.81}
        | {"position": len(body["words"]) - 1},
        {"word": MARKUP, "forms": [MARKUP], "source": "label", "label": MARKUP, "probability": 0.5, "position": None},
    ]
    body["template"] = False
    body["detections"] = [{"class": MARKUP, "score": 0.5, "box": [1, 2, 30, 40]}]
    body["discouraged"] = ["bowl", MARKUP]
    page.route("**/api/caption*", lambda route: route.fulfill(json=body))
    try:
        upload(page, EXAMPLES / "coffee.jpg")
    finally:
        page.unroute("**/api/caption*")
    guided = page.locator("#guided")
    expect(guided).to_contain_text("giraffe (detected giraffe, 81%)")
    expect(page.locator("#caption .word.guided")).to_have_attribute("title", "guided: detected giraffe, 81%")
    expect(guided).to_contain_text(f"{MARKUP} (ImageNet label: {MARKUP}, 50%) (no caption could use it)")
    expect(page.locator("#boxes .box span")).to_have_text(f"{MARKUP} 50%")
    # a person was seen here (not discouraged): the note names the few classes that were
    expect(page.locator("#discouraged")).to_have_text(f"Not seen: bowl, {MARKUP}, their words discouraged.")
    expect(page.locator("#result img")).to_have_count(1)  # the photo, and no other
    assert page.evaluate("() => document.body.dataset.injected") is None


def test_without_a_detector_on_the_server_its_box_is_disabled(page, server_url):
    def no_detector(route):
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "detector": None})

    page.route("**/api/health", no_detector)
    try:
        fresh(page, server_url)
    finally:
        page.unroute("**/api/health")
    expect(page.locator("#health")).to_contain_text("no COCO detector")
    expect(page.locator("#detector")).to_be_disabled()
    page.uncheck("#guidance")
    page.check("#guidance")  # guidance back: the detector box stays disabled
    expect(page.locator("#templates")).to_be_enabled()
    expect(page.locator("#detector")).to_be_disabled()
