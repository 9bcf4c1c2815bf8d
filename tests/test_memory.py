"""MemoryStore: turns, TTL, LRU eviction, partial answers, concurrent appends, the byte
budget and the cap per key."""
from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

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


def test_past_max_turns_the_oldest_go_in_one_block() -> None:
    store = make_store()
    seen = []
    for i in range(7):
        store.append_turn("c", Turn(f"q{i}", f"a{i}"))
        seen.append([t.user for t in store.get_history("c")])
    # Three turns at most; a fourth drops all but the newest at once, so that between two
    # drops every history begins with the one before (Ollama's cache reads only the rest).
    assert seen == [["q0"], ["q0", "q1"], ["q0", "q1", "q2"], ["q3"], ["q3", "q4"],
                    ["q3", "q4", "q5"], ["q6"]]
    two = make_store(keep_on_drop=2)
    for i in range(4):
        two.append_turn("c", Turn(f"q{i}", f"a{i}"))
    assert [t.user for t in two.get_history("c")] == ["q2", "q3"]
    # The turn just remembered always stays, also with one turn at most.
    one = make_store(max_turns=1, keep_on_drop=5)
    for i in range(3):
        one.append_turn("c", Turn(f"q{i}", f"a{i}"))
        assert [t.user for t in one.get_history("c")] == [f"q{i}"]


def test_drop_oldest_forgets_a_block() -> None:
    store = make_store()
    for i in range(3):
        store.append_turn("c", Turn(f"q{i}", f"a{i}"))
    store.drop_oldest("c", 2)
    assert [t.user for t in store.get_history("c")] == ["q2"]
    store.drop_oldest("c", 5)
    store.drop_oldest("nope", 1)
    assert store.get_history("c") == [] and store.bytes_used == len(b"c")


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


def recount(store: MemoryStore) -> int:
    """The budget's bytes counted from scratch: messages and conversation ids in UTF-8."""
    total = 0
    for cid, _, _ in store.list_conversations():
        total += len(cid.encode())
        for turn in store.get_history(cid):
            total += len(turn.user.encode()) + len(turn.assistant.encode())
    return total


def test_bytes_are_counted_in_utf8() -> None:
    store = make_store()
    store.append_turn("c", Turn("ab", "😀"))  # 2 + 4 bytes, and 1 for the id
    assert store.bytes_used == 7 == recount(store)


def test_budget_evicts_least_recently_used_conversations() -> None:
    clock = Clock()
    store = make_store(clock, max_conversations=100, max_bytes=1000)
    for cid in ("a", "b", "c"):
        store.append_turn(cid, Turn("q" * 150, "x" * 149))  # 300 bytes with the id
        clock.now += 1
    store.append_turn("a", Turn("q", "x"))  # "b" is the least recently used now
    assert store.bytes_used == 902
    store.append_turn("d", Turn("q" * 150, "x" * 149))
    assert "b" not in store and all(cid in store for cid in "acd")
    assert store.bytes_used == recount(store) <= 1000


def test_emoji_fill_the_budget_four_times_as_fast() -> None:
    store = make_store(max_conversations=1000, max_turns=100, max_bytes=10_000)
    for i in range(200):
        store.append_turn(f"c{i}", Turn("😀" * 100, "🙂" * 100))  # 800 bytes a turn
    assert store.bytes_used == recount(store) <= 10_000
    assert len(store) == 12  # 12 conversations of 803 or 804 bytes fit, not 13


def test_one_conversation_over_the_budget_keeps_its_newest_turn() -> None:
    store = make_store(max_turns=10, max_bytes=1000)
    store.append_turn("other", Turn("q", "a"))
    for i in range(3):
        store.append_turn("big", Turn(f"q{i}", "x" * 600))
    assert "other" not in store
    assert [t.user for t in store.get_history("big")] == ["q2"]
    store.append_turn("big", Turn("q3", "x" * 5000))  # alone over the budget: still kept
    assert [t.user for t in store.get_history("big")] == ["q3"]
    assert store.bytes_used == recount(store)


def test_a_key_over_its_cap_loses_only_its_own_conversations() -> None:
    clock = Clock()
    store = make_store(clock, max_conversations=100, max_per_key=3)
    store.append_turn("b-1", Turn("q", "a"), owner="key_b")
    for i in range(10):
        clock.now += 1
        store.append_turn(f"a-{i}", Turn("q", "a"), owner="key_a")
    kept = [(cid, owner) for cid, owner, _ in store.list_conversations()]
    assert kept == [("a-9", "key_a"), ("a-8", "key_a"), ("a-7", "key_a"), ("b-1", "key_b")]
    assert store.bytes_used == recount(store)


def test_the_local_user_is_bounded_by_the_store_alone() -> None:
    store = make_store(max_conversations=20, max_per_key=3)
    for i in range(10):
        store.append_turn(f"c{i}", Turn("q", "a"))
    assert len(store) == 10


def test_forget_expiry_and_turn_bound_give_bytes_back() -> None:
    clock = Clock()
    store = make_store(clock, max_turns=2, max_conversations=10)
    for i in range(5):
        store.append_turn("c", Turn(f"q{i}", "answer"))
    store.append_turn("d", Turn("q", "a"))
    # c keeps one turn (q4: the drops went in blocks), d its one.
    assert store.bytes_used == recount(store) == 1 + 8 + 1 + 2
    assert store.forget("d") and store.bytes_used == 9
    clock.now += 61
    assert len(store) == 0 and store.bytes_used == 0


def test_the_key_that_keeps_the_most_gives_way_first() -> None:
    clock = Clock()
    store = make_store(clock, max_turns=100, max_conversations=100, max_bytes=2000)
    store.append_turn("b-old", Turn("q", "a" * 200), owner="key_b")  # the least recent
    for i in range(3):
        clock.now += 1
        store.append_turn(f"a-{i}", Turn("q", "x" * 500), owner="key_a")
    clock.now += 1
    store.append_turn("a-2", Turn("q", "x" * 500), owner="key_a")  # over: a's oldest go
    assert [cid for cid, _, _ in store.list_conversations()] == ["a-2", "a-1", "b-old"]
    for _ in range(5):
        store.append_turn("a-2", Turn("q", "x" * 500), owner="key_a")
    assert [cid for cid, _, _ in store.list_conversations()] == ["a-2", "b-old"]
    assert len(store.get_history("a-2")) == 3
    assert store.bytes_used == recount(store) <= 2000


@pytest.mark.parametrize("seed", range(5))
def test_running_total_matches_a_recount_whatever_happens(seed: int) -> None:
    """Every way a turn goes (turn bound, expiry, cap per key, store cap, budget, forget)
    gives its bytes back, and no bound is passed."""
    rng = random.Random(seed)
    clock = Clock()
    store = make_store(clock, max_turns=4, ttl_seconds=50, max_conversations=12,
                       max_bytes=3000, max_per_key=5)
    owners = ["key_a", "key_b", "key_c"]
    for _ in range(600):
        clock.now += rng.choice([0, 1, 2, 5])
        cid = f"c{rng.randrange(30)}"
        if rng.random() < 0.1:
            store.forget(cid)
        else:
            # Mostly short turns, which reach the caps; now and then one of up to 3,200 bytes.
            length = rng.randrange(1, 400 if rng.random() < 0.2 else 20)
            text = rng.choice(["a", "é", "😀"]) * length
            owner = store.owner(cid) or rng.choice(owners)  # as the views check ownership
            store.append_turn(cid, Turn(text, text[::-1]), owner=owner)
        kept = store.list_conversations()
        assert store.bytes_used == recount(store)
        assert store.bytes_used <= 3000 or len(kept) == 1
        assert len(kept) <= 12 and all(turns <= 4 for _, _, turns in kept)
        assert max(Counter(owner for _, owner, _ in kept).values(), default=0) <= 5
    clock.now += 51
    assert len(store) == 0 and store.bytes_used == 0
