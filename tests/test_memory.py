"""MemoryStore: turns, TTL, LRU eviction, partial answers, concurrent appends."""
from __future__ import annotations

import threading

from pi_agent.memory import MemoryStore, Turn


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(clock: Clock | None = None, **bounds: float) -> MemoryStore:
    settings = {"max_turns": 3, "ttl_seconds": 60, "max_conversations": 3, **bounds}
    return MemoryStore(clock=clock or Clock(), **settings)  # type: ignore[arg-type]


def test_unknown_conversation_is_empty() -> None:
    assert make_store().get_history("nope") == []


def test_keeps_the_newest_turns_in_order() -> None:
    store = make_store()
    for i in range(5):
        store.append_turn("c", Turn(f"q{i}", f"a{i}"))
    assert [t.user for t in store.get_history("c")] == ["q2", "q3", "q4"]


def test_partial_turn_is_marked() -> None:
    store = make_store()
    store.append_turn("c", Turn("q", "half an ans", partial=True))
    (turn,) = store.get_history("c")
    assert turn.partial is True and turn.assistant == "half an ans"


def test_idle_conversations_expire() -> None:
    clock = Clock()
    store = make_store(clock)
    store.append_turn("old", Turn("q", "a"))
    clock.now += 30
    store.append_turn("young", Turn("q", "a"))
    clock.now += 31  # "old" idle for 61 s, "young" for 31 s
    assert store.get_history("old") == []
    assert len(store.get_history("young")) == 1
    assert "old" not in store and len(store) == 1


def test_new_turns_keep_a_conversation_alive() -> None:
    clock = Clock()
    store = make_store(clock)
    for i in range(3):
        store.append_turn("c", Turn(f"q{i}", "a"))
        clock.now += 50
    assert len(store.get_history("c")) == 3


def test_reading_alone_does_not_count_as_use() -> None:
    clock = Clock()
    store = make_store(clock)
    store.append_turn("c", Turn("q", "a"))
    clock.now += 50
    assert store.get_history("c")
    clock.now += 11
    assert store.get_history("c") == []


def test_least_recently_used_is_evicted_first() -> None:
    clock = Clock()
    store = make_store(clock)
    for cid in ("a", "b", "c"):
        store.append_turn(cid, Turn("q", "a"))
        clock.now += 1
    store.append_turn("a", Turn("q2", "a2"))  # "b" is now the least recently used
    store.get_history("b")  # reading does not change that
    store.append_turn("d", Turn("q", "a"))
    assert "b" not in store
    assert all(cid in store for cid in ("a", "c", "d"))
    assert len(store) == 3


def test_history_is_a_copy() -> None:
    store = make_store()
    store.append_turn("c", Turn("q", "a"))
    store.get_history("c").clear()
    assert len(store.get_history("c")) == 1


def test_concurrent_appends_lose_nothing() -> None:
    store = MemoryStore(max_turns=10_000, ttl_seconds=60, max_conversations=100)
    start = threading.Barrier(16)

    def append(worker: int) -> None:
        start.wait()
        for i in range(200):
            store.append_turn(f"c{worker % 4}", Turn(f"{worker}-{i}", "a"))
            store.get_history(f"c{(worker + 1) % 4}")

    threads = [threading.Thread(target=append, args=(w,)) for w in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    turns = [t.user for cid in ("c0", "c1", "c2", "c3") for t in store.get_history(cid)]
    assert len(turns) == 16 * 200 == len(set(turns))
