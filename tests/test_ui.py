"""The chat page at /ui/, in a real browser: Debian's chromium driven by Playwright for
Python (no browser download), against gunicorn and the fake Ollama. A missing chromium or
Playwright fails these tests: .ci/run installs both."""
from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from pi_agent.web.page import STATIC

from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, RawStream, serving
from .test_security import create_key
from .test_steps import ANSWER, asks, call

AGENTS = """
[agents.general]
system = "You help."

[agents.pi]
description = "Has tools."
system = "Use a tool when you need one."
tools = ["calculator"]

[agents.docs]
description = "Answers from the notes."
system = "Answer only from the sources."
knowledge = { paths = ["notes/*.md"], top_k = 3 }
"""
# A source whose title holds HTML: the page must show it as text.
NOTES = """# Watering <img src=x onerror="window.pwned='source'"> tomatoes
Tomatoes want water at the roots every second day.
"""
# Typing waits: long enough for a loaded CI machine, bounded all the same.
WAIT_MS = 10_000


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (.ci/run does)")
    return found


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=chromium())
    try:
        yield browser
    finally:
        browser.close()


def folder_for(base: Path) -> Path:
    (base / "notes").mkdir(parents=True)
    (base / "notes" / "garden.md").write_text(NOTES)
    (base / "agents.toml").write_text(AGENTS)
    return base


@pytest.fixture(scope="module")
def server(upstream: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """One generation at a time and one place in the queue: a third turn is refused (429)."""
    folder = folder_for(tmp_path_factory.mktemp("ui"))
    with serving(folder / "server.log", AGENTS_FILE=str(folder / "agents.toml"),
                 OLLAMA_URL=upstream.url, STATE_DIR=str(folder / "state"),
                 HEARTBEAT_SECONDS="0.5", MAX_CONCURRENT="1", MAX_QUEUE="1") as server:
        yield server


@pytest.fixture
def page(browser: Browser, server: Gunicorn) -> Iterator[Page]:
    """A page of its own (its own localStorage) that may load nothing from another site, and
    whose script must not fail."""
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    elsewhere: list[str] = []
    context.on("request", lambda request: None if request.url.startswith(server.url)
               else elsewhere.append(request.url))
    page = context.new_page()
    failures: list[str] = []
    page.on("pageerror", lambda error: failures.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert elsewhere == []
    assert failures == []


def words(count: int) -> list[str]:
    return [f"w{i} " for i in range(count)]


def send(page: Page, message: str) -> None:
    box = page.locator("#message")
    box.fill(message)
    box.press("Enter")


def last_reply(page: Page) -> Any:
    return page.locator(".msg.assistant .reply").last


def last_note(page: Page) -> Any:
    return page.locator(".msg.assistant .note").last


def stored(page: Page, name: str) -> Any:
    return page.evaluate("(name) => localStorage.getItem(name)", name)


# --- the page and its files -------------------------------------------------------------


def test_a_browser_at_the_root_is_sent_to_the_page_and_ollama_clients_are_not(
    server: Gunicorn
) -> None:
    browser_like = requests.get(server.url + "/", allow_redirects=False, timeout=10, headers={
        "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"})
    assert browser_like.status_code == 302
    assert browser_like.headers["Location"].endswith("/ui/")
    assert browser_like.headers["Vary"] == "Accept"
    for accept in ("TEXT/HTML", "text/html; charset=utf-8", "application/json, text/html;q=0.1"):
        named = requests.get(server.url + "/", allow_redirects=False, timeout=10,
                             headers={"Accept": accept})
        assert named.status_code == 302, accept
    for accept in ("*/*", None, "application/json", "text/*", "text/html;q=0"):
        heartbeat = requests.get(server.url + "/", allow_redirects=False, timeout=10,
                                 headers={"Accept": accept} if accept else {})
        assert (heartbeat.status_code, heartbeat.text) == (200, "Ollama is running"), accept
        assert heartbeat.headers["Vary"] == "Accept"
    head = requests.head(server.url + "/", timeout=10, headers={"Accept": "text/html"})
    assert head.status_code == 200
    page = requests.get(server.url + "/ui/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert requests.get(server.url + "/ui", allow_redirects=False,
                        timeout=10).headers["Location"].endswith("/ui/")
    for outside in ("/ui/..%2fapp.py", "/ui/nothing.js", "/ui/%2e%2e/__init__.py"):
        assert requests.get(server.url + outside, timeout=10).status_code == 404


def test_the_page_is_small_and_loads_nothing_from_elsewhere() -> None:
    files = sorted(path for path in STATIC.iterdir() if path.is_file())
    assert [path.name for path in files] == ["index.html", "page.css", "page.js"]
    assert sum(path.stat().st_size for path in files) < 150 * 1024
    for path in files:
        # No address of another site: no CDN, no font service (the Pi may be offline).
        assert not re.search(r"(?<![\w.])(https?:)?//[\w-]+\.", path.read_text()), path.name


# --- a turn in the browser --------------------------------------------------------------


def test_the_reply_grows_token_by_token_while_the_model_writes(
    page: Page, server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=words(12), token_delay=0.25)
    page.goto(server.url + "/")  # a browser at the root lands on the page
    assert page.url == server.url + "/ui/"
    expect(page.locator("#agent option")).to_have_count(3)
    # Shift+Enter is a new line, Enter sends.
    box = page.locator("#message")
    box.type("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"
    assert page.locator(".turn").count() == 0
    box.press("Enter")
    expect(page.locator(".msg.user").last).to_have_text("first line\nsecond line")
    seen: list[str] = []
    deadline = time.monotonic() + 15
    while fake.tokens_sent < 12 and time.monotonic() < deadline:
        text = last_reply(page).inner_text()
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            assert text.startswith("w0"), text
        page.wait_for_timeout(50)
    # Several different lengths, each one longer, all while the fake was still sending.
    assert len(seen) >= 4, seen
    assert all(len(a) < len(b) for a, b in zip(seen, seen[1:])), seen
    assert "w11" not in seen[-1]
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
    expect(last_reply(page)).to_have_text(" ".join(f"w{i}" for i in range(12)))
    expect(last_note(page)).to_have_text("")


def test_a_waiting_note_shows_until_the_first_token(
    page: Page, server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=["late ", "answer"], first_token_delay=1.5)
    page.goto(server.url + "/ui/")
    send(page, "hello")
    expect(last_note(page)).to_have_text("Waiting for the model…")
    expect(last_reply(page)).to_have_text("late answer", timeout=WAIT_MS)
    expect(last_note(page)).to_have_text("")


def test_stop_cancels_the_turn_and_keeps_the_partial_answer_across_a_reload(
    page: Page, server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=words(40), token_delay=0.25)
    page.goto(server.url + "/ui/")
    send(page, "tell me a long story")
    expect(last_reply(page)).to_contain_text("w2", timeout=WAIT_MS)
    with page.expect_response(re.compile(r"/chat/[^/]+/cancel$")) as cancel:
        page.locator("#stop").click()
    # The cancel itself worked (a hang-up, the page's fallback, would keep a partial answer
    # too), and the stream ended with its "cancelled" event: a note that is no error.
    assert cancel.value.status == 200 and cancel.value.json()["status"] == "cancelling"
    assert fake.client_closed.wait(5)  # the model's connection closed: it stops generating
    expect(last_note(page)).to_have_text("Stopped.")
    expect(last_note(page)).to_have_class("note")
    expect(page.locator("#stop")).to_be_hidden()
    shown = last_reply(page).inner_text()
    assert shown.startswith("w0 w1 w2") and "w39" not in shown
    conversation = stored(page, "pi-agent.conversation")
    remembered = requests.get(f"{server.url}/conversations/{conversation}", timeout=10).json()
    (turn,) = remembered["turns"]
    assert turn["partial"] is True and turn["user"] == "tell me a long story"
    assert turn["assistant"].startswith(shown.rstrip())

    page.reload()
    expect(page.locator(".msg.user")).to_have_text(["tell me a long story"])
    expect(last_reply(page)).to_have_text(turn["assistant"].strip())
    expect(last_note(page)).to_have_text("Stopped before the end.")


def test_a_reload_shows_the_conversation_and_the_list_opens_older_ones(
    page: Page, server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=["Hi ", "there."])
    page.goto(server.url + "/ui/")
    send(page, "first question")
    expect(last_reply(page)).to_have_text("Hi there.", timeout=WAIT_MS)
    expect(page.locator("#send")).to_be_enabled()
    send(page, "second question")
    expect(page.locator(".reply")).to_have_text(["Hi there.", "Hi there."], timeout=WAIT_MS)
    first = stored(page, "pi-agent.conversation")
    sent = [request["messages"][-1]["content"] for request in fake.chat_requests()]
    assert sent == ["first question", "second question"]
    assert len(fake.chat_requests()[-1]["messages"]) == 4  # the history went with it

    page.reload()
    expect(page.locator(".msg.user")).to_have_text(["first question", "second question"])
    page.locator("#new").click()
    expect(page.locator(".turn")).to_have_count(0)
    send(page, "another topic")
    expect(last_reply(page)).to_have_text("Hi there.", timeout=WAIT_MS)
    second = stored(page, "pi-agent.conversation")
    assert second != first
    listed = page.locator("#conversations button")
    expect(listed.filter(has_text="first question")).to_have_count(1)
    listed.filter(has_text="first question").click()
    expect(page.locator(".msg.user")).to_have_text(["first question", "second question"])
    assert stored(page, "pi-agent.conversation") == first


def test_tool_calls_and_sources_are_shown(
    page: Page, server: Gunicorn, fake: FakeOllama, tmp_path: Path
) -> None:
    page.goto(server.url + "/ui/")
    page.locator("#agent").select_option("pi")
    html = "<img src=x onerror=\"window.pwned='tool'\">"
    fake.steps.extend([asks(call("calculator", "c1", expression="6 * 7"),
                            call("calculator", "c2", expression=html)), ANSWER])
    send(page, "what is 6 * 7?")
    expect(last_reply(page)).to_have_text("The answer is 42.", timeout=WAIT_MS)
    row, failed = page.locator(".tools details").all()
    expect(row.locator("summary")).to_contain_text(re.compile(r"calculator ✓ \d+ ms"))
    row.locator("summary").click()
    expect(row.locator("pre").first).to_have_text(
        json.dumps({"expression": "6 * 7"}, indent=2))
    expect(row.locator("pre").last).to_contain_text("42")
    expect(failed.locator("summary")).to_contain_text(re.compile(r"calculator ✗ failed \d+ ms"))
    failed.locator("summary").click()
    expect(failed.locator("pre").first).to_have_text(
        json.dumps({"expression": html}, indent=2))
    expect(failed.locator("pre").last).to_contain_text("error:")
    assert page.locator(".tools img").count() == 0
    # The picture of a finished turn (docs/images/chat-page.png is one such).
    page.screenshot(path=str(tmp_path / "finished-turn.png"))
    assert (tmp_path / "finished-turn.png").stat().st_size > 1000

    page.locator("#new").click()
    page.locator("#agent").select_option("docs")
    fake.script = Script(tokens=["Every ", "second ", "day [1]."])
    send(page, "how often do tomatoes want water?")
    expect(last_reply(page)).to_have_text("Every second day [1].", timeout=WAIT_MS)
    sources = page.locator(".sources li")
    expect(sources).to_have_count(1)
    expect(sources.first).to_contain_text(
        "Watering <img src=x onerror=\"window.pwned='source'\"> tomatoes (notes/garden.md)")
    assert page.locator(".sources img").count() == 0
    assert page.evaluate("window.pwned") is None
    assert stored(page, "pi-agent.agent") == "docs"


def test_a_reply_holding_html_is_inert_and_markdown_is_drawn(
    page: Page, server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=[
        "<img src=x onerror=\"window.pwned='img'\"> ", "**bold** and `<b>code</b>`\n\n",
        "<script>window.pwned='script'</script>\n\n", "[a link](javascript:alert(1)) ",
        "[docs](http://127.0.0.1/docs)\n\n", "- one\n- two\n\n", "```\n<i>x</i>\n```"])
    page.goto(server.url + "/ui/")
    send(page, "show me html")
    reply = last_reply(page)
    expect(reply.locator("pre code")).to_have_text("<i>x</i>", timeout=WAIT_MS)
    assert page.evaluate("window.pwned") is None
    for tag in ("img", "script", "b", "i"):
        assert reply.locator(tag).count() == 0, tag
    expect(reply).to_contain_text("<img src=x onerror=\"window.pwned='img'\">")
    expect(reply).to_contain_text("<script>window.pwned='script'</script>")
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("p code")).to_have_text("<b>code</b>")
    expect(reply.locator("li")).to_have_text(["one", "two"])
    # Only http(s) links become links, and they open elsewhere without the page's reach.
    links = reply.locator("a")
    expect(links).to_have_count(1)
    assert links.get_attribute("href") == "http://127.0.0.1/docs"
    assert links.get_attribute("rel") == "noopener noreferrer nofollow"
    expect(reply).to_contain_text("[a link](javascript:alert(1))")


def test_the_place_in_the_queue_is_shown_then_the_reply(
    page: Page, server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=words(20), token_delay=0.25)
    page.goto(server.url + "/ui/")
    busy = RawStream(server, message="hold the model", conversation_id="elsewhere")
    try:
        busy.read_until(b"w0")
        send(page, "my turn")
        expect(last_note(page)).to_have_text(
            "Waiting in line: number 1. The model answers one request at a time.")
    finally:
        busy.close()  # the model's slot comes free: the page's turn runs
    expect(last_reply(page)).to_contain_text("w19", timeout=WAIT_MS)
    expect(last_note(page)).to_have_text("")


def test_a_429_is_shown_in_words_with_its_wait(
    page: Page, server: Gunicorn, fake: FakeOllama
) -> None:
    fake.script = Script(tokens=words(20), token_delay=0.25)
    page.goto(server.url + "/ui/")
    busy = RawStream(server, message="hold the model", conversation_id="elsewhere")
    waiting = RawStream(server, message="wait for it", conversation_id="waiting")
    try:
        busy.read_until(b"w0")
        waiting.read_until(b"event: queued")
        send(page, "my turn")
        expect(last_note(page)).to_have_text(re.compile(
            r"^The model is busy and the waiting line is full\. "
            r"Try again in \d+ (second|seconds|minutes)\.$"), timeout=WAIT_MS)
        expect(page.locator("#send")).to_be_enabled()
    finally:
        waiting.close()
        busy.close()


def test_the_phone_layout_is_one_column(browser: Browser, server: Gunicorn) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 760}, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(server.url + "/ui/")
        expect(page.locator("#agent option")).to_have_count(3)
        side = page.locator("aside").bounding_box()
        main = page.locator("main").bounding_box()
        composer = page.locator("#composer").bounding_box()
        assert side is not None and main is not None and composer is not None
        assert side["y"] + side["height"] <= main["y"] + 1  # above it, not beside it
        assert main["width"] >= 380
        assert composer["y"] + composer["height"] <= 760  # the message box is on screen
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    finally:
        context.close()


# --- keys -------------------------------------------------------------------------------


def test_the_key_prompt_appears_on_401_and_works(
    browser: Browser, upstream: FakeOllama, fake: FakeOllama, tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    folder = folder_for(tmp_path)
    key = create_key(folder / "keys.json", capsys, "--name", "phone")
    fake.script = Script(tokens=["Hello ", "phone."])
    with serving(folder / "server.log", AGENTS_FILE=str(folder / "agents.toml"),
                 KEYS_FILE=str(folder / "keys.json"), OLLAMA_URL=upstream.url,
                 STATE_DIR=str(folder / "state")) as keyed:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(keyed.url + "/")  # the redirect needs no key
            form = page.locator("#key-form")
            expect(form).to_be_visible()
            expect(page.locator("#key-why")).to_have_text(
                "This server needs an API key. Type yours in the field above.")
            page.locator("#key").fill("pi-not-a-key")
            page.locator("#key").press("Enter")
            expect(page.locator("#notice")).to_contain_text("needs an API key")
            expect(form).to_be_visible()
            page.locator("#key").fill(key)
            page.locator("#key").press("Enter")
            expect(form).to_be_hidden()
            expect(page.locator("#agent option")).to_have_count(3)
            send(page, "hi from my phone")
            expect(last_reply(page)).to_have_text("Hello phone.", timeout=WAIT_MS)
            assert stored(page, "pi-agent.key") == key
            page.reload()
            expect(page.locator(".msg.user")).to_have_text(["hi from my phone"])
            expect(form).to_be_hidden()
            # On a shared phone: the key goes, and the conversation shown with it; the
            # prompt is back, and a reload does not bring either back.
            assert stored(page, "pi-agent.titles")  # the first message, as the list's title
            page.locator("#forget-key").click()
            expect(form).to_be_visible()
            expect(page.locator(".msg")).to_have_count(0)
            expect(page.locator("#forget-key")).to_be_hidden()
            assert [stored(page, name) for name in
                    ("pi-agent.key", "pi-agent.conversation", "pi-agent.titles")] == [None] * 3
            page.reload()
            expect(form).to_be_visible()
            expect(page.locator(".msg")).to_have_count(0)
        finally:
            context.close()


def test_an_error_event_is_shown_in_words(page: Page, server: Gunicorn, fake: FakeOllama) -> None:
    fake.script = Script(status=500)
    page.goto(server.url + "/ui/")
    send(page, "hello")
    expect(last_note(page)).to_have_text("The model server failed while answering. Try again.",
                                         timeout=WAIT_MS)
    expect(last_note(page)).to_have_class("note error")
    expect(last_reply(page)).to_have_text("")
    expect(page.locator("#send")).to_be_enabled()
