"""Run the benchmark once in --quick mode as a smoke test: it completes, the gateway and the
stack floor make no errors, and every streamed token reaches the client in its own chunk
frame. It asserts nothing about speed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_quick_benchmark_runs_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--no-naive", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.md").read_text().startswith("Run ")
    keys = {"nonstream-1", "nonstream-32", "stream-1", "stream-64", "held-500", "held-1200"}
    for target in ("ollama (direct)", "pi-agent", "stack floor"):
        rows = [r for r in report["rows"] if r["target"] == target]
        assert {r["key"] for r in rows} == keys
        for row in rows:
            assert row["errors"] == 0, row
            assert row["requests"] > 0 and row["requests"] % row["clients"] == 0
            assert row["every_request_tokens"] == [row["expected_tokens"]]
            if row["stream"] and target != "ollama (direct)":
                # One chunk frame per token, in every request: nothing was buffered.
                assert row["every_request_frames_equal_tokens"], row
    held = [r for r in report["rows"] if r["key"] == "held-1200" and r["target"] == "pi-agent"]
    assert held[0]["peak_open"] == 1200
    for server in ("pi-agent", "stack floor"):
        assert report["servers"][server]["warm_up_status"] == 200
    # Memory filled past its byte budget keeps no more than the budget, and close to it.
    assert [row["fill"] for row in report["memory_fill"]] == ["ascii", "emoji"]
    for row in report["memory_fill"]:
        assert row["errors"] == 0, row
        assert 0.9 * row["budget_mib"] <= row["kept_mib"] <= row["budget_mib"], row
        assert row["full_rss_mib"] > 0
    # Conversations against the fake's prefill model: between two drops of the history,
    # each prompt is the last one and its reply, so a conversation alone reads little more
    # than its new messages (the first turn reads the system prompt too).
    prefill = {row["run"]: row for row in report["prefill"] if row["gateway"] == "pi-agent"}
    assert list(prefill) == ["one conversation at a time", "three interleaved, one slot",
                             "three interleaved, three slots"]
    alone, shared = prefill["one conversation at a time"], prefill["three interleaved, one slot"]
    assert alone["cut"] == 0 and 1 <= alone["vs_ideal"] < 2, alone
    assert shared["read_mean"] > alone["read_mean"]  # one slot: they evict each other
    # The knowledge search ran over its 1,000 passages and found sources for its questions.
    searched = report["knowledge_search"]
    assert searched["passages"] == 1000 and searched["queries"] > 0
    assert 0 < searched["sources_per_query"] <= 4 and searched["query_p95_ms"] > 0
