"""The history that goes into a call: it always fits its token budget, it is dropped in one
block when it would not, and between two drops every prompt begins with the one before
(followed by its answer), so that Ollama reads only the new message. Properties over random
conversations (Hypothesis), then the same through the server."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pi_agent.core.context import history_budget, history_start, turn_tokens
from pi_agent.core.prompt import Prompt
from pi_agent.memory import MemoryStore, Turn
from pi_agent.providers.base import ChatCall

from .fake_ollama import FakeOllama, Script
from .test_events import parse_sse


@settings(deadline=None)  # a stalled machine is no failure of the property
@given(costs=st.lists(st.integers(1, 600), max_size=40), budget=st.integers(-50, 4000),
       keep=st.integers(0, 3))
def test_the_history_kept_always_fits(costs: list[int], budget: int, keep: int) -> None:
    start = history_start(costs, budget, keep)
    assert 0 <= start <= len(costs)
    assert sum(costs[start:]) <= max(budget, 0)
    if start:  # a drop: one block, the newest `keep` at most stay
        assert sum(costs) > budget and len(costs) - start <= keep
    else:
        assert sum(costs) <= budget or not costs


texts = st.integers(1, 900).map(lambda n: "w" * n)


@settings(max_examples=150, deadline=None)
@given(turns=st.lists(st.tuples(texts, texts, st.integers(0, 300)), min_size=1, max_size=30),
       num_ctx=st.integers(512, 4096), num_predict=st.integers(16, 400),
       max_turns=st.integers(1, 12), keep=st.integers(1, 3))
def test_prompts_stay_prefixes_between_block_drops(
    turns: list[tuple[str, str, int]], num_ctx: int, num_predict: int, max_turns: int,
    keep: int,
) -> None:
    store = MemoryStore(max_turns=max_turns, ttl_seconds=3600, max_conversations=10,
                        max_bytes=1 << 30, keep_on_drop=keep)
    system = {"role": "system", "content": "You are brief."}
    previous: list[dict[str, Any]] | None = None
    previous_answer = ""
    previous_sent = 0
    for message, answer, answer_tokens in turns:
        call = ChatCall("m", [system, {"role": "user", "content": message}],
                        {"num_ctx": num_ctx, "num_predict": num_predict}, "5m")
        history = store.history("c")
        fitted = Prompt(call, history_at=1).with_history(history, store.keep_on_drop)
        sent = fitted.call.messages
        kept = history[fitted.dropped:]
        # The budget holds: the kept turns fit beside the call's own messages and the reply.
        budget = history_budget(call.messages, num_ctx, num_predict)
        assert sum(t.tokens for t in kept) <= max(budget, 0)
        assert fitted.turns == len(kept) == (len(sent) - 2) // 2
        # No drop, here or in the store when the last answer was remembered: this prompt is
        # the last one, its answer, and the new message.
        if previous is not None and not fitted.dropped and len(history) == previous_sent + 1:
            event("the prompt extends the one before")
            assert sent[:len(previous)] == previous
            assert sent[len(previous)] == {"role": "assistant", "content": previous_answer}
            assert sent[len(previous) + 1:] == [{"role": "user", "content": message}]
        previous, previous_answer, previous_sent = sent, answer, fitted.turns
        # As a turn remembers its answer: with the turns its call left out dropped.
        store.append("c", Turn(message, answer, tokens=turn_tokens(message, answer,
                                                                   answer_tokens)),
                     drop=fitted.dropped)


def test_a_turn_counts_its_answer_as_the_model_did_unless_thinking_inflated_it() -> None:
    answer = "a" * 300  # a high estimate of 100 tokens
    assert turn_tokens("q", answer, 60) == turn_tokens("q", "") + 60
    assert turn_tokens("q", answer, 900) == turn_tokens("q", answer)  # thinking: the estimate
    assert turn_tokens("q", answer) == turn_tokens("q", "") + 100


def test_images_tool_calls_and_an_unlimited_reply_take_room() -> None:
    plain = [{"role": "user", "content": "look"}]
    seen = [{"role": "user", "content": "look", "images": ["aGk="]}]
    assert history_budget(seen, 4096, 256) == history_budget(plain, 4096, 256) - 768
    called = [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "add", "arguments": {"a": 1}}}]}]
    empty = [{"role": "assistant", "content": ""}]
    assert history_budget(called, 4096, 256) < history_budget(empty, 4096, 256)
    assert history_budget(plain, 4096, -1) == history_budget(plain, 4096, 1024)


def test_a_fixed_reply_in_a_conversation_with_history(
    make_app: Callable[..., Flask], fake_ollama: FakeOllama
) -> None:
    client = make_app().test_client()
    for message in ("hello", "how to make a bomb", "how to make a bomb"):
        response = client.post("/chat", json={"message": message, "agent": "router",
                                              "conversation_id": "fixed"})
        assert response.status_code == 200, response.get_json()
    assert response.get_json()["steps"] == 0
    stream = client.post("/chat/stream", json={"message": "how to make a bomb",
                                               "agent": "router", "conversation_id": "fixed"})
    assert parse_sse(stream.get_data(as_text=True))[-1][0] == "done"


def test_the_history_through_the_server(make_app: Callable[..., Flask],
                                        fake_ollama: FakeOllama) -> None:
    # A small context: a few turns fit beside the general agent's prompt, then a drop.
    client = make_app(NUM_CTX=640, NUM_PREDICT=128).test_client()
    fake_ollama.script = Script(tokens=["An answer", " of a few words."])
    seen = []
    for i in range(12):
        response = client.post("/chat/stream", json={
            "message": f"question {i}: " + "tell me more " * 8, "conversation_id": "h1"})
        done = parse_sse(response.get_data(as_text=True))[-1]
        assert done[0] == "done"
        seen.append((done[1]["history"]["turns"], done[1]["history"]["dropped"]))
    assert seen[0] == (0, 0) and seen[1] == (1, 0)
    drops = [i for i, (_, dropped) in enumerate(seen) if dropped]
    assert drops, seen
    first = drops[0]
    # Up to the drop, one more turn each time; at it, all but the newest go at once.
    assert [turns for turns, _ in seen[:first]] == list(range(first))
    assert seen[first] == (1, first - 1)
    prompts = [request["messages"] for request in fake_ollama.chat_requests()]
    for i in range(1, len(prompts)):
        if seen[i][1] == 0 and seen[i][0] == seen[i - 1][0] + 1:
            assert prompts[i][:len(prompts[i - 1])] == prompts[i - 1]
    # A turn that fails forgets nothing: the same turns are left out of the next call.
    before = client.get("/conversations/h1").get_json()["turns"]
    fake_ollama.script = Script(status=500)
    assert client.post("/chat", json={"message": "x", "conversation_id": "h1"}).status_code \
        == 502
    assert client.get("/conversations/h1").get_json()["turns"] == before
    fake_ollama.script = Script(tokens=["An answer", " of a few words."])
    whole = client.post("/chat", json={"message": "and now?", "conversation_id": "h1"})
    assert whole.get_json()["history"]["turns"] >= 1
    remembered = client.get("/conversations/h1").get_json()["turns"]
    assert len(remembered) == whole.get_json()["history"]["turns"] + 1  # the drops are forgotten
