"""``GET /metrics``: Prometheus' text format, read back with prometheus-client's own parser,
from gunicorn over real HTTP: a turn's times and tokens, requests by route and status,
cancellations by phase, upstream errors by kind, tool calls, router decisions, knowledge
searches, the gauges of turns running and waiting, who may read it, and several workers
counted as one."""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client import Gauge
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from pi_agent.core.turn_log import model_label
from pi_agent.metrics_folder import forget_worker

from .fake_ollama import FakeOllama, Script
from .live_server import Gunicorn, RawStream, serving
from .redis_server import RedisServer
from .test_security import create_key

MODEL = "llama3.2:1b"
AGENTS = """
[agents.general]
system = "You help."

[agents.pi]
system = "Use a tool."
tools = ["time_now"]

[agents.docs]
system = "Answer only from the sources."
knowledge = { paths = ["*.md"] }

[agents.router]
kind = "router"
fallback = "general"
  [[agents.router.routes]]
  name = "pi"
  agent = "pi"
  keywords = ["temperature"]
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: Gunicorn, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of ``/metrics``, by name and labels."""
    answer = requests.get(server.url + "/metrics", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for one that is not there (a series not begun yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(server: Gunicorn, check: Callable[[Samples], bool], seconds: float = 10) -> Samples:
    """Scrape until ``check`` holds: a turn is counted when it is released, just after its
    response ended."""
    deadline = time.monotonic() + seconds
    while True:
        samples = scrape(server)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def chat(server: Gunicorn, **body: str) -> requests.Response:
    return requests.post(server.url + "/chat", json=body, timeout=30)


@pytest.fixture
def agents_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.md").write_text("# Garden\nTomatoes are a fruit.\n")
    (tmp_path / "agents.toml").write_text(AGENTS)
    return tmp_path / "agents.toml"


def test_a_turn_its_requests_and_its_agents_events_are_counted(
    fake: FakeOllama, tmp_path: Path, agents_file: Path
) -> None:
    fake.scripts["boom"] = Script(status=500)
    with serving(tmp_path / "server.log", OLLAMA_URL=fake.url, AGENTS_FILE=str(agents_file),
                 STATE_DIR=str(tmp_path / "state")) as server:
        assert chat(server, message="hi", agent="general").status_code == 200
        assert chat(server, message="boom", agent="general").status_code == 502
        assert requests.get(server.url + "/nowhere/42", timeout=10).status_code == 404
        assert requests.get(server.url + "/conversations/none-such",
                            timeout=10).status_code == 404
        fake.steps.extend([Script(tokens=[], tool_calls=[
            {"function": {"name": "time_now", "arguments": {}}},
            {"function": {"name": "made_up", "arguments": {}}}]),
            Script(tokens=["It", " is", " noon."])])
        routed = chat(server, message="what temperature is it", agent="router")
        assert routed.status_code == 200 and routed.json()["reply"] == "It is noon."
        assert chat(server, message="are tomatoes a fruit", agent="docs").status_code == 200
        samples = eventually(server, lambda s: value(
            s, "pi_agent_turns_total", agent="docs", outcome="done") == 1)

    # The finished turn: its times (one observation each) and its tokens, by agent and model.
    assert value(samples, "pi_agent_turns_total", agent="general", outcome="done") == 1
    assert value(samples, "pi_agent_turns_total", agent="general", outcome="failed") == 1
    assert value(samples, "pi_agent_first_token_seconds_count", agent="general") == 1
    assert value(samples, "pi_agent_turn_seconds_count", agent="general") == 2
    assert value(samples, "pi_agent_turn_seconds_count", agent="router") == 1
    assert value(samples, "pi_agent_prompt_tokens_total", agent="general", model=MODEL) == 12
    assert value(samples, "pi_agent_completion_tokens_total", agent="general",
                 model=MODEL) == 4
    assert value(samples, "pi_agent_completion_tokens_total", agent="docs", model=MODEL) == 4
    # Requests by the route's rule, never by its path; one that matched none as "unmatched".
    assert value(samples, "pi_agent_requests_total", route="/chat", status="200") == 3
    assert value(samples, "pi_agent_requests_total", route="/chat", status="502") == 1
    assert value(samples, "pi_agent_requests_total", route="unmatched", status="404") == 1
    assert value(samples, "pi_agent_requests_total", route="/conversations/<conversation_id>",
                 status="404") == 1
    assert not any(name == "pi_agent_requests_total" and ("route", "/nowhere/42") in labels
                   for name, labels in samples)
    # The failed turn's upstream error, by its code.
    assert value(samples, "pi_agent_upstream_errors_total", kind="upstream_error") == 1
    # The router's decision, the tool calls (a tool the model made up, as "unknown"), the
    # search of the docs agent's notes.
    assert value(samples, "pi_agent_router_decisions_total", route="pi", by="keyword") == 1
    assert value(samples, "pi_agent_tool_calls_total", tool="time_now", outcome="ok") == 1
    assert value(samples, "pi_agent_tool_calls_total", tool="unknown", outcome="error") == 1
    assert value(samples, "pi_agent_knowledge_search_seconds_count", agent="docs") == 1
    assert value(samples, "pi_agent_turns_running") == 0
    assert value(samples, "pi_agent_turns_waiting") == 0


def test_each_front_counts_its_turns_once_under_their_agent_and_embeddings_are_none(
    fake: FakeOllama, tmp_path: Path
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with serving(tmp_path / "server.log", OLLAMA_URL=fake.url) as server:
        for stream in (False, True):
            answer = requests.post(server.url + "/v1/chat/completions", timeout=30, json={
                "model": "agent:general", "messages": messages, "stream": stream})
            assert answer.status_code == 200, answer.text
        assert requests.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": messages}).status_code == 200
        assert requests.post(server.url + "/api/chat", timeout=30, json={
            "model": MODEL, "messages": messages, "stream": False}).status_code == 200
        # A model the client named that is not there: its mistake, not the model server's.
        assert requests.post(server.url + "/api/chat", timeout=30, json={
            "model": "nosuch", "messages": messages}).status_code == 404
        for path in ("/api/embed", "/v1/embeddings"):
            embedded = requests.post(server.url + path, timeout=30,
                                     json={"model": MODEL, "input": "hi"})
            assert embedded.status_code == 200, embedded.text
        # A stream's turn is released just after its response: wait for the five turns.
        samples = eventually(server, lambda s: sum(
            count for (name, _), count in s.items() if name == "pi_agent_turns_total") == 5)

    turns = {labels: count for (name, labels), count in samples.items()
             if name == "pi_agent_turns_total"}
    assert turns == {frozenset({("agent", "general"), ("outcome", "done")}): 2,
                     frozenset({("agent", "none"), ("outcome", "done")}): 2,
                     frozenset({("agent", "none"), ("outcome", "failed")}): 1}
    assert value(samples, "pi_agent_completion_tokens_total", agent="general", model=MODEL) == 8
    assert value(samples, "pi_agent_prompt_tokens_total", agent="none", model=MODEL) == 24
    assert not any(name == "pi_agent_upstream_errors_total" for name, _ in samples)


def test_a_model_is_labelled_as_ollama_matches_it() -> None:
    for spelling in ("Llama3.2", "llama3.2:latest", "registry.ollama.ai/library/LLAMA3.2",
                     "library/llama3.2:LATEST"):
        assert model_label(spelling) == "llama3.2:latest"
    assert model_label("hf.co/someone/model:Q4") == "hf.co/someone/model:q4"
    assert model_label("") == ""


def test_gauges_and_cancellations_by_phase(fake: FakeOllama, tmp_path: Path) -> None:
    fake.script = Script(tokens=[f"t{i} " for i in range(100)], token_delay=0.1)
    fake.scripts["slow start"] = Script(first_token_delay=5)
    with serving(tmp_path / "server.log", OLLAMA_URL=fake.url, MAX_CONCURRENT="1",
                 MAX_QUEUE="2", HEARTBEAT_SECONDS="0.5") as server:
        running = RawStream(server, conversation_id="a")
        queued = RawStream(server, conversation_id="b")
        try:
            running.read_until(b"event: token")
            queued.read_until(b"event: queued")
            samples = scrape(server)
            assert value(samples, "pi_agent_turns_running") == 1
            assert value(samples, "pi_agent_turns_waiting") == 1
            # The queued one first, and ended before the other frees the slot: it stays queued.
            for conversation, stream in (("b", queued), ("a", running)):
                assert requests.post(f"{server.url}/chat/{conversation}/cancel",
                                     timeout=10).status_code == 200
                stream.read_until(b"event: error")
        finally:
            running.close()
            queued.close()
        eventually(server, lambda s: value(s, "pi_agent_turns_running") == 0)
        waiting = RawStream(server, message="slow start", conversation_id="c")
        try:
            waiting.read_until(b"event: start")
            time.sleep(0.3)  # it has its slot and waits for its first token
            assert requests.post(f"{server.url}/chat/c/cancel", timeout=10).status_code == 200
            waiting.read_until(b"event: error")
        finally:
            waiting.close()
        samples = eventually(server, lambda s: value(
            s, "pi_agent_cancellations_total", phase="before_first_token", how="cancelled") == 1)
    assert value(samples, "pi_agent_cancellations_total", phase="queued", how="cancelled") == 1
    assert value(samples, "pi_agent_cancellations_total", phase="streaming",
                 how="cancelled") == 1
    assert value(samples, "pi_agent_cancellations_total", phase="before_first_token",
                 how="cancelled") == 1
    assert value(samples, "pi_agent_turns_total", agent="general", outcome="cancelled") == 3
    assert value(samples, "pi_agent_turns_running") == 0
    assert value(samples, "pi_agent_turns_waiting") == 0
    assert value(samples, "pi_agent_upstream_errors_total", kind="upstream_timeout") == 0


def test_with_keys_only_an_admin_key_reads_the_metrics(
    fake: FakeOllama, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.json"
    user = create_key(keys, capsys, "--name", "user")
    admin = create_key(keys, capsys, "--name", "admin", "--admin")
    with serving(tmp_path / "server.log", OLLAMA_URL=fake.url, KEYS_FILE=str(keys)) as server:
        anonymous = requests.get(server.url + "/metrics", timeout=10)
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "invalid_api_key"
        refused = requests.get(server.url + "/metrics", headers={"X-API-Key": user}, timeout=10)
        assert refused.status_code == 403
        assert refused.json() == {"error": {
            "code": "permission_denied",
            "message": "this API key may not use the metrics (an admin key may)"}}
        samples = scrape(server, {"Authorization": f"Bearer {admin}"})
    assert value(samples, "pi_agent_requests_total", route="/metrics", status="401") == 1
    assert value(samples, "pi_agent_requests_total", route="/metrics", status="403") == 1


def test_without_keys_the_metrics_are_answered_on_loopback(
    fake: FakeOllama, tmp_path: Path
) -> None:
    with serving(tmp_path / "server.log", OLLAMA_URL=fake.url) as server:
        assert value(scrape(server), "pi_agent_turns_running") == 0
        forwarded = requests.get(server.url + "/metrics", timeout=10,
                                 headers={"X-Forwarded-For": "203.0.113.9"})
        assert forwarded.status_code == 403
        assert forwarded.json()["error"]["code"] == "local_only"


WORKER_LINE = re.compile(r"\[(\d+)\] \[INFO\] pi_agent.turns: turn ")


def test_two_workers_are_counted_in_one_scrape(
    fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with serving(log, OLLAMA_URL=fake.url, STORE="redis", REDIS_URL=redis_server.url,
                 REDIS_PREFIX=f"{uuid.uuid4().hex}:", WORKERS="2") as server:
        folder = re.search(r"the workers' metrics in (\S+)", log.read_text())
        assert folder is not None and Path(folder[1]).is_dir()
        turns = 0
        while len(set(WORKER_LINE.findall(log.read_text()))) < 2:  # until both served one
            assert turns < 60, "one worker took every request"
            assert chat(server, message=f"q{turns}").status_code == 200
            turns += 1
        samples = eventually(server, lambda s: value(
            s, "pi_agent_turns_total", agent="general", outcome="done") == turns)
        assert value(samples, "pi_agent_turns_total", agent="general", outcome="done") == turns
        assert value(samples, "pi_agent_completion_tokens_total", agent="general",
                     model=MODEL) == 4 * turns
        assert value(samples, "pi_agent_requests_total", route="/chat",
                     status="200") == turns
        assert value(samples, "pi_agent_turns_running") == 0
        # Turns held open, wherever they landed: one has the upstream's one slot (shared
        # through Redis), two wait; the gauges are the workers' counts added up.
        fake.script = Script(tokens=[f"t{i} " for i in range(40)], token_delay=0.25)
        streams = [RawStream(server, message="hold", conversation_id=f"held-{i}")
                   for i in range(3)]
        try:
            for stream in streams:
                stream.read_until(b"event: start")
            samples = eventually(server, lambda s: value(s, "pi_agent_turns_waiting") == 2)
            assert value(samples, "pi_agent_turns_running") == 1
            assert value(samples, "pi_agent_turns_waiting") == 2
        finally:
            for stream in streams:
                stream.close()
        samples = eventually(server, lambda s: value(s, "pi_agent_turns_running") == 0
                             and value(s, "pi_agent_turns_waiting") == 0, seconds=20)
        assert value(samples, "pi_agent_turns_running") == 0
        assert value(samples, "pi_agent_turns_waiting") == 0
    assert not Path(folder[1]).exists()  # the master removed it


def test_a_dead_workers_gauges_go_as_the_library_has_them_go(tmp_path: Path) -> None:
    """forget_worker is mark_process_dead, written out for gunicorn's master."""
    for folder in (tmp_path / "ours", tmp_path / "library"):
        folder.mkdir()
        for mode in sorted(Gauge._MULTIPROC_MODES):
            (folder / f"gauge_{mode}_41.db").touch()
            (folder / f"gauge_{mode}_42.db").touch()
        (folder / "counter_41.db").touch()
    forget_worker(str(tmp_path / "ours"), 41)
    mark_process_dead(41, str(tmp_path / "library"))
    left = sorted(path.name for path in (tmp_path / "ours").iterdir())
    assert left == sorted(path.name for path in (tmp_path / "library").iterdir())
    assert "counter_41.db" in left and "gauge_livesum_41.db" not in left
