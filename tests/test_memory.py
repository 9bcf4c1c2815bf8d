"""The stores of memory, each held to the same tests: turns, TTL, LRU eviction, partial
answers, concurrent appends, the byte budget, the cap per key and the tokens of each day.
Every test runs against the in-process store, the SQLite store and the Redis store (a real
redis-server)."""
from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pi_agent.memory import MemoryStore, Store, Turn
from pi_agent.stores.redis import RedisStore
from pi_agent.stores.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


MakeStore = Callable[..., Store]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    """Make stores of the kind the test runs with (bounds as keywords); closed after it."""
    made: list[Store] = []

    def make(clock: Clock | None = None, **bounds: float) -> Store:
        settings = {"max_turns": 3, "ttl_seconds": 60, "max_conversations": 3, **bounds}
        store: Store
        if request.param == "memory":
            store = MemoryStore(clock=clock or Clock(), **settings)  # type: ignore[arg-type]
        elif request.param == "redis":
            server = request.getfixturevalue("redis_server")
            store = RedisStore(server.url, prefix=f"{uuid.uuid4().hex}:", sweep_seconds=0,
                               clock=clock or Clock(), **settings)  # type: ignore[arg-type]
        else:
            store = SqliteStore(str(tmp_path / f"store-{len(made)}" / "store.sqlite3"),
                                clock=clock or Clock(), **settings)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_unknown_conversation_is_empty(make_store: MakeStore) -> None:
    assert make_store().history("nope") == []


def test_past_max_turns_the_oldest_go_in_one_block(make_store: MakeStore) -> None:
    store = make_store()
    seen = []
    for i in range(7):
        store.append("c", Turn(f"q{i}", f"a{i}"))
        seen.append([t.user for t in store.history("c")])
    # Three turns at most; a fourth drops all but the newest at once, so that between two
    # drops every history begins with the one before (Ollama's cache reads only the rest).
    assert seen == [["q0"], ["q0", "q1"], ["q0", "q1", "q2"], ["q3"], ["q3", "q4"],
                    ["q3", "q4", "q5"], ["q6"]]
    two = make_store(keep_on_drop=2)
    for i in range(4):
        two.append("c", Turn(f"q{i}", f"a{i}"))
    assert [t.user for t in two.history("c")] == ["q2", "q3"]
    # The turn just remembered always stays, also with one turn at most.
    one = make_store(max_turns=1, keep_on_drop=5)
    for i in range(3):
        one.append("c", Turn(f"q{i}", f"a{i}"))
        assert [t.user for t in one.history("c")] == [f"q{i}"]


def test_an_append_drops_the_turns_its_call_left_out_first(make_store: MakeStore) -> None:
    store = make_store(max_turns=5)
    for i in range(3):
        store.append("c", Turn(f"q{i}", f"a{i}"))
    store.append("c", Turn("q3", "a3"), drop=2)
    assert [t.user for t in store.history("c")] == ["q2", "q3"]
    store.append("c", Turn("q4", "a4"), drop=5)
    assert [t.user for t in store.history("c")] == ["q4"]
    assert store.bytes_used == recount(store) == len(b"c") + 4


def test_partial_turn_is_marked(make_store: MakeStore) -> None:
    store = make_store()
    store.append("c", Turn("q", "half an ans", partial=True))
    (turn,) = store.history("c")
    assert turn.partial is True and turn.assistant == "half an ans"


def test_idle_conversations_expire(make_store: MakeStore) -> None:
    clock = Clock()
    store = make_store(clock)
    store.append("old", Turn("q", "a"))
    clock.now += 30
    store.append("young", Turn("q", "a"))
    clock.now += 31  # "old" idle for 61 s, "young" for 31 s
    assert store.history("old") == []
    assert len(store.history("young")) == 1
    assert "old" not in store and len(store) == 1


def test_new_turns_keep_a_conversation_alive(make_store: MakeStore) -> None:
    clock = Clock()
    store = make_store(clock)
    for i in range(3):
        store.append("c", Turn(f"q{i}", "a"))
        clock.now += 50
    assert len(store.history("c")) == 3


def test_reading_alone_does_not_count_as_use(make_store: MakeStore) -> None:
    clock = Clock()
    store = make_store(clock)
    store.append("c", Turn("q", "a"))
    clock.now += 50
    assert store.history("c")
    clock.now += 11
    assert store.history("c") == []


def test_least_recently_used_is_evicted_first(make_store: MakeStore) -> None:
    clock = Clock()
    store = make_store(clock)
    for cid in ("a", "b", "c"):
        store.append(cid, Turn("q", "a"))
        clock.now += 1
    store.append("a", Turn("q2", "a2"))  # "b" is now the least recently used
    store.history("b")  # reading does not change that
    store.append("d", Turn("q", "a"))
    assert "b" not in store
    assert all(cid in store for cid in ("a", "c", "d"))
    assert len(store) == 3


def test_history_is_a_copy(make_store: MakeStore) -> None:
    store = make_store()
    store.append("c", Turn("q", "a"))
    store.history("c").clear()
    assert len(store.history("c")) == 1


def test_concurrent_appends_lose_nothing(make_store: MakeStore) -> None:
    store = make_store(max_turns=10_000, max_conversations=100)
    start = threading.Barrier(8)

    def append(worker: int) -> None:
        start.wait()
        for i in range(100):
            store.append(f"c{worker % 4}", Turn(f"{worker}-{i}", "a"))
            store.history(f"c{(worker + 1) % 4}")

    threads = [threading.Thread(target=append, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    turns = [t.user for cid in ("c0", "c1", "c2", "c3") for t in store.history(cid)]
    assert len(turns) == 8 * 100 == len(set(turns))


def recount(store: Store) -> int:
    """The budget's bytes counted from scratch: messages and conversation ids in UTF-8."""
    total = 0
    for cid, _, _ in store.conversations():
        total += len(cid.encode())
        for turn in store.history(cid):
            total += len(turn.user.encode()) + len(turn.assistant.encode())
    return total


def test_bytes_are_counted_in_utf8(make_store: MakeStore) -> None:
    store = make_store()
    store.append("c", Turn("ab", "😀"))  # 2 + 4 bytes, and 1 for the id
    assert store.bytes_used == 7 == recount(store)


def test_budget_evicts_least_recently_used_conversations(make_store: MakeStore) -> None:
    clock = Clock()
    store = make_store(clock, max_conversations=100, max_bytes=1000)
    for cid in ("a", "b", "c"):
        store.append(cid, Turn("q" * 150, "x" * 149))  # 300 bytes with the id
        clock.now += 1
    store.append("a", Turn("q", "x"))  # "b" is the least recently used now
    assert store.bytes_used == 902
    store.append("d", Turn("q" * 150, "x" * 149))
    assert "b" not in store and all(cid in store for cid in "acd")
    assert store.bytes_used == recount(store) <= 1000


def test_emoji_fill_the_budget_four_times_as_fast(make_store: MakeStore) -> None:
    store = make_store(max_conversations=1000, max_turns=100, max_bytes=10_000)
    for i in range(200):
        store.append(f"c{i}", Turn("😀" * 100, "🙂" * 100))  # 800 bytes a turn
    assert store.bytes_used == recount(store) <= 10_000
    assert len(store) == 12  # 12 conversations of 803 or 804 bytes fit, not 13


def test_one_conversation_over_the_budget_keeps_its_newest_turn(make_store: MakeStore) -> None:
    store = make_store(max_turns=10, max_bytes=1000)
    store.append("other", Turn("q", "a"))
    for i in range(3):
        store.append("big", Turn(f"q{i}", "x" * 600))
    assert "other" not in store
    assert [t.user for t in store.history("big")] == ["q2"]
    store.append("big", Turn("q3", "x" * 5000))  # alone over the budget: still kept
    assert [t.user for t in store.history("big")] == ["q3"]
    assert store.bytes_used == recount(store)


def test_a_key_over_its_cap_loses_only_its_own_conversations(make_store: MakeStore) -> None:
    clock = Clock()
    store = make_store(clock, max_conversations=100, max_per_key=3)
    store.append("b-1", Turn("q", "a"), owner="key_b")
    for i in range(10):
        clock.now += 1
        store.append(f"a-{i}", Turn("q", "a"), owner="key_a")
    kept = [(cid, owner) for cid, owner, _ in store.conversations()]
    assert kept == [("a-9", "key_a"), ("a-8", "key_a"), ("a-7", "key_a"), ("b-1", "key_b")]
    assert store.bytes_used == recount(store)


def test_a_conversation_belongs_to_the_key_that_made_it(make_store: MakeStore) -> None:
    store = make_store()
    assert store.owner("c") is None
    store.append("c", Turn("q", "a"), owner="key_a")
    store.append("c", Turn("q", "a"), owner="key_b")  # the views refuse this; the store
    assert store.owner("c") == "key_a"               # keeps the first owner regardless
    assert store.conversations() == [("c", "key_a", 2)]
    assert store.forget("c") and store.owner("c") is None and not store.forget("c")


def test_the_local_user_is_bounded_by_the_store_alone(make_store: MakeStore) -> None:
    store = make_store(max_conversations=20, max_per_key=3)
    for i in range(10):
        store.append(f"c{i}", Turn("q", "a"))
    assert len(store) == 10


def test_forget_expiry_and_turn_bound_give_bytes_back(make_store: MakeStore) -> None:
    clock = Clock()
    store = make_store(clock, max_turns=2, max_conversations=10)
    for i in range(5):
        store.append("c", Turn(f"q{i}", "answer"))
    store.append("d", Turn("q", "a"))
    # c keeps one turn (q4: the drops went in blocks), d its one.
    assert store.bytes_used == recount(store) == 1 + 8 + 1 + 2
    assert store.forget("d") and store.bytes_used == 9
    clock.now += 61
    assert len(store) == 0 and store.bytes_used == 0


def test_the_key_that_keeps_the_most_gives_way_first(make_store: MakeStore) -> None:
    clock = Clock()
    store = make_store(clock, max_turns=100, max_conversations=100, max_bytes=2000)
    store.append("b-old", Turn("q", "a" * 200), owner="key_b")  # the least recent
    for i in range(3):
        clock.now += 1
        store.append(f"a-{i}", Turn("q", "x" * 500), owner="key_a")
    clock.now += 1
    store.append("a-2", Turn("q", "x" * 500), owner="key_a")  # over: a's oldest go
    assert [cid for cid, _, _ in store.conversations()] == ["a-2", "a-1", "b-old"]
    for _ in range(5):
        store.append("a-2", Turn("q", "x" * 500), owner="key_a")
    assert [cid for cid, _, _ in store.conversations()] == ["a-2", "b-old"]
    assert len(store.history("a-2")) == 3
    assert store.bytes_used == recount(store) <= 2000


@pytest.mark.parametrize("seed", range(5))
def test_running_total_matches_a_recount_whatever_happens(make_store: MakeStore, seed: int) -> None:
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
            store.append(cid, Turn(text, text[::-1]), owner=owner)
        kept = store.conversations()
        assert store.bytes_used == recount(store)
        assert store.bytes_used <= 3000 or len(kept) == 1
        assert len(kept) <= 12 and all(turns <= 4 for _, _, turns in kept)
        assert max(Counter(owner for _, owner, _ in kept).values(), default=0) <= 5
    clock.now += 51
    assert len(store) == 0 and store.bytes_used == 0


def test_tokens_are_counted_by_key_and_day(make_store: MakeStore) -> None:
    store = make_store()
    assert store.tokens_used("key_a", "2026-12-05") == 0
    store.append("c", Turn("q", "a"), owner="key_a", spent={("key_a", "2026-12-05"): 30})
    store.spend({("key_a", "2026-12-05"): 12, ("key_b", "2026-12-05"): 7})
    store.spend({})
    assert store.tokens_used("key_a", "2026-12-05") == 42
    assert store.tokens_used("key_b", "2026-12-05") == 7
    store.spend({("key_a", "2026-12-06"): 5})  # a new day starts from nothing
    assert store.tokens_used("key_a", "2026-12-06") == 5


def test_tokens_stay_when_their_conversation_goes(make_store: MakeStore) -> None:
    clock = Clock()
    store = make_store(clock)
    store.append("c", Turn("q", "a"), owner="key_a", spent={("key_a", "2026-12-05"): 9})
    assert store.forget("c")
    clock.now += 3600
    assert store.tokens_used("key_a", "2026-12-05") == 9


def test_lone_surrogates_are_kept_as_they_came(make_store: MakeStore) -> None:
    """JSON lets a message carry half of a surrogate pair; it comes back as it went in."""
    store = make_store()
    turn = Turn("half \ud83d of an emoji", "and \ude00 the other")
    store.append("c", turn)
    assert store.history("c") == [turn]
    assert store.bytes_used == 1 + len(("half \ud83d of an emoji" "and \ude00 the other")
                                       .encode("utf-8", "surrogatepass"))
