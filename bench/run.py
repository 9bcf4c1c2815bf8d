"""Measure what Pi Agent Server costs on top of Ollama.

For each scenario the same load runs straight against a fast fake Ollama, then through the
gateway (gunicorn, gevent worker, the project's gunicorn.conf.py), then through the naive
reference proxy (if it is at hand) and the stack floor (bench/stack_floor.py, the smallest
proxy on the same stack), back to back in one run, ``--rounds`` times. The gateways are
pinned to the first CPU and the harness (fake Ollama and load generator) to the second, so
what is measured is the gateway's single worker.

    python -m bench.run [--quick] [--rounds N] [--only TEXT] [--compare DIR] [--out DIR]
                        [--no-naive] [--no-floor]

Writes DIR/latest.json and DIR/latest.md. It is a benchmark: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import asyncio
import compileall
import functools

import uvloop
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import threading
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.redis_server import RedisServer

from . import knowledge_search, memory_fill, pi_prefill, procstat
from .loadgen import Load, Result, Target, run_load

ROOT = Path(__file__).resolve().parent.parent
NAIVE_DIR = ROOT.parent / "shared" / "reference"
STARTUP_TIMEOUT = 30.0


@dataclass
class Scenario:
    key: str
    name: str
    stream: bool
    tokens: int
    token_delay: float
    clients: int
    requests_per_client: int
    quick_requests_per_client: int


SCENARIOS = [
    Scenario("nonstream-1", "non-stream 200 tokens, 1 client", False, 200, 0.0, 1, 600, 50),
    Scenario("nonstream-32", "non-stream 200 tokens, 32 clients", False, 200, 0.0, 32, 80, 10),
    Scenario("stream-1", "stream 200 tokens 2 ms apart, 1 client", True, 200, 0.002, 1, 60, 4),
    Scenario("stream-64", "stream 200 tokens 2 ms apart, 64 clients", True, 200, 0.002, 64, 4, 1),
    Scenario("held-500", "500 streams held (40 tokens 50 ms apart)", True, 40, 0.05, 500, 1, 1),
    Scenario("held-1200", "1,200 streams held (40 tokens 50 ms apart)", True, 40, 0.05, 1200, 1, 1),
]


# --- processes ----------------------------------------------------------------------


def _pin(cpu: int) -> None:
    """Run this process on ``cpu`` alone, on a machine with more than one."""
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu})


class Process:
    """A server in a subprocess, stopped by its own pid."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict[str, str],
                 log: Path, cpu: int) -> None:
        self.name = name
        self.log = log
        self.started = time.perf_counter()
        # A gateway is restarted per scenario: its log grows, and only the new part counts.
        self.log_start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=lambda: _pin(cpu),
            )
        self.port = 0
        self.startup_seconds = 0.0

    def ready(self, pattern: str, health: bool) -> Process:
        """Wait until the server listens (and answers /health); stop it if it never does."""
        try:
            self.wait_port(pattern)
            if health:
                self.wait_health()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_port(self, pattern: str) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()}")
            found = re.search(pattern, self.log_text())
            if found:
                self.port = int(found.group(1))
                return self.port
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} did not start:\n{self.log_text()}")

    def wait_health(self) -> None:
        """Wait for a 200 on /health; record the time from start to it."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if http_call(self.port, "GET", "/health")[0] == 200:
                    self.startup_seconds = time.perf_counter() - self.started
                    return
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"{self.name} /health never answered:\n{self.log_text()}")

    def log_text(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def pids(self) -> list[int]:
        return procstat.tree_pids(self.popen.pid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            # SIGINT is gunicorn's quick shutdown: every request of the scenario has ended,
            # and SIGTERM's graceful wait would add a second to each of the many restarts.
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def http_call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_fake(out: Path) -> Process:
    fake = Process("fake ollama", [sys.executable, "-m", "bench.fake_ollama", "--port", "0"],
                   ROOT, dict(os.environ), out / "fake.log", cpu=1)
    return fake.ready(r"listening on (\d+)", health=False)


def server_env(**extra: str) -> dict[str, str]:
    """The environment a gateway starts with: this one's, without PI_AGENT_* settings and
    without PYTHONDONTWRITEBYTECODE. An installed server has its bytecode cached (pip
    compiles it on install, and Python writes it on a first run); a shell that asks for no
    cache files must not make every start in the bench compile the gateway's sources anew."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PI_AGENT_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra)
    return env


def compile_sources(*paths: Path) -> None:
    """Cache the bytecode of a gateway's own modules before its first start, as an install
    does: from the first start on, every start is measured the same way."""
    for path in paths:
        if path.is_dir():
            compileall.compile_dir(path, quiet=1)
        else:
            compileall.compile_file(path, quiet=1)


def start_gateway(name: str, root: Path, fake_port: int, out: Path, **settings: str) -> Process:
    """Start Pi Agent Server from the checkout at ``root`` with its own gunicorn.conf.py;
    ``settings`` are more environment variables."""
    compile_sources(root / "pi_agent", root / "wsgi.py", root / "gunicorn.conf.py")
    # Admission control stays on, with limits above the largest scenario: the bench measures
    # the cost of the gateway, not a queue in front of the fake.
    env = server_env(
        PI_AGENT_BIND="127.0.0.1:0", PI_AGENT_OLLAMA_URL=f"http://127.0.0.1:{fake_port}",
        PI_AGENT_MAX_CONCURRENT="5000", PI_AGENT_MAX_QUEUE="5000", PYTHONPATH=str(root),
        **settings,
    )
    log = out / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
    gateway = Process(name, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                             "wsgi:app"], root, env, log, cpu=0)
    return gateway.ready(r"Listening at: http://127\.0\.0\.1:(\d+)", health=True)


def start_with_sqlite(state: Path, fake_port: int, out: Path) -> Process:
    """Pi Agent Server from this checkout with the SQLite store, on a new file each start."""
    shutil.rmtree(state, ignore_errors=True)
    return start_gateway("pi-agent sqlite", ROOT, fake_port, out, PI_AGENT_STORE="sqlite",
                         PI_AGENT_STATE_DIR=str(state))


def start_with_redis(redis_url: str, fake_port: int, out: Path) -> Process:
    """Pi Agent Server from this checkout with the Redis store, under a new prefix each
    start (the redis-server of the run, on a Unix socket)."""
    return start_gateway("pi-agent redis", ROOT, fake_port, out, PI_AGENT_STORE="redis",
                         PI_AGENT_REDIS_URL=redis_url,
                         PI_AGENT_REDIS_PREFIX=f"bench-{time.monotonic_ns()}:")


def start_floor(fake_port: int, out: Path) -> Process:
    """Start the smallest proxy on the stack (bench/stack_floor.py) the way the naive one is:
    gunicorn's defaults and its stock gevent worker, from a folder without a gunicorn.conf.py
    (gunicorn would read one there), but with gunicorn.conf.py's 2,000 connections."""
    compile_sources(ROOT / "bench" / "stack_floor.py")
    env = server_env(UPSTREAM_URL=f"http://127.0.0.1:{fake_port}")
    floor = Process("stack floor", [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1",
                                    "--worker-connections", "2000", "-b", "127.0.0.1:0",
                                    "stack_floor:app"],
                    ROOT / "bench", env, out / "stack-floor.log", cpu=0)
    return floor.ready(r"Listening at: http://127\.0\.0\.1:(\d+)", health=True)


def start_naive(fake_port: int, out: Path) -> Process:
    # Nothing is written into ../shared: where the shell asks for no cache files, its one
    # small module is compiled at each start (a few ms).
    env = dict(os.environ, UPSTREAM_URL=f"http://127.0.0.1:{fake_port}")
    naive = Process("naive", [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1",
                              "-b", "127.0.0.1:0", "naive_proxy:app"],
                    NAIVE_DIR, env, out / "naive.log", cpu=0)
    return naive.ready(r"Listening at: http://127\.0\.0\.1:(\d+)", health=True)


# --- measuring ----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class MemorySampler(threading.Thread):
    """Sample the RSS and PSS of a process tree every 0.1 s, off the load generator's loop."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak_rss = 0
        self.peak_pss = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, procstat.rss_bytes(self.pids))
            self.peak_pss = max(self.peak_pss, procstat.pss_bytes(self.pids))
            if self.stopping.wait(0.1):
                return


def settled_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of ``pids`` once they have stopped working (at most 0.5 s from now): a
    gateway still stores turns and writes access logs after the last response is read.
    Idle, a gunicorn master and worker still tick now and then, so one clock tick of
    difference counts as stopped."""
    last = procstat.cpu_seconds(pids)
    for _ in range(5):
        time.sleep(0.1)
        now = procstat.cpu_seconds(pids)
        if now - last <= procstat.TICK_SECONDS:
            return now
        last = now
    return last


async def measure(
    target: Target, load: Load, server: Process | None, fake: Process
) -> dict[str, Any]:
    server_pids = server.pids() if server else []
    fake_pids = fake.pids()
    sampler = MemorySampler(server_pids)
    sampler.start()
    cpu_server = procstat.cpu_seconds(server_pids)
    cpu_fake = procstat.cpu_seconds(fake_pids)
    cpu_self = time.process_time()
    wall = await run_load(target, load)
    cpu_self = time.process_time() - cpu_self
    cpu_server = settled_cpu_seconds(server_pids) - cpu_server if server_pids else 0.0
    cpu_fake = procstat.cpu_seconds(fake_pids) - cpu_fake
    sampler.stopping.set()
    sampler.join()
    return summarize(load.results, wall, cpu_server, cpu_fake, cpu_self,
                     sampler.peak_rss, sampler.peak_pss)


def peak_open(results: list[Result]) -> int:
    """The most requests in flight at once: sent, and their response not yet complete."""
    events = sorted([(r.sent_at, 1) for r in results] + [(r.sent_at + r.total, -1)
                                                         for r in results])
    open_now = peak = 0
    for _, change in events:
        open_now += change
        peak = max(peak, open_now)
    return peak


def summarize(results: list[Result], wall: float, cpu_server: float, cpu_fake: float,
              cpu_loadgen: float, peak_rss: int, peak_pss: int) -> dict[str, Any]:
    ok = [r for r in results if not r.error]
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    tokens = sum(r.tokens for r in ok)
    per_k = 1000 / tokens if tokens else float("nan")
    ms = 1000.0
    return {
        "requests": len(results),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "wall_s": wall,
        "req_per_s": len(ok) / wall if wall else 0.0,
        "ttfb_p50_ms": percentile([r.ttfb for r in ok], 50) * ms,
        "ttft_p50_ms": percentile([r.ttft for r in ok], 50) * ms,
        "ttft_p99_ms": percentile([r.ttft for r in ok], 99) * ms,
        "total_p50_ms": percentile([r.total for r in ok], 50) * ms,
        "tokens_per_request": statistics.fmean(r.tokens for r in ok) if ok else 0.0,
        "frames_per_request": statistics.fmean(r.frames for r in ok) if ok else 0.0,
        # Reads of the socket that brought tokens: a gateway that buffered would need few.
        "token_reads_per_request": statistics.fmean(r.token_reads for r in ok) if ok else 0.0,
        "every_request_frames_equal_tokens": all(r.frames == r.tokens for r in ok),
        "every_request_tokens": sorted({r.tokens for r in ok}),
        "peak_open": peak_open(results),
        "tokens": tokens,
        "server_cpu_s": cpu_server,
        "server_cpu_s_per_1k_tokens": cpu_server * per_k,
        "harness_cpu_s_per_1k_tokens": (cpu_fake + cpu_loadgen) * per_k,
        "fake_cpu_s": cpu_fake,
        "loadgen_cpu_s": cpu_loadgen,
        "peak_rss_mib": peak_rss / 2**20,
        "peak_pss_mib": peak_pss / 2**20,
    }


def chat_body(stream: bool) -> bytes:
    return json.dumps({"message": "Hello there", "stream": stream}).encode()


def direct_body(stream: bool) -> bytes:
    return json.dumps({"model": "m", "stream": stream,
                       "messages": [{"role": "user", "content": "Hello there"}]}).encode()


Starter = Callable[[], Process]


def configure_fake(fake: Process, tokens: int, token_delay: float) -> None:
    config = json.dumps({"tokens": tokens, "token_delay": token_delay}).encode()
    assert http_call(fake.port, "POST", "/_bench/config", config)[0] == 200


async def run_scenarios(
    starters: dict[str, Starter], fake: Process, quick: bool, scenarios: list[Scenario],
    rounds: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run each scenario against the fake, then against each gateway in turn, ``rounds``
    times over, the targets taking turns within each round.

    Each gateway is started fresh for each scenario and round and stopped after it, so one
    runs at a time and what a scenario measures (peak RSS above all) does not carry earlier
    ones. Every start also measures the startup time and the idle memory after a warm-up.
    """
    rows = []
    starts: dict[str, list[dict[str, Any]]] = {name: [] for name in starters}

    def configure(tokens: int, token_delay: float) -> None:
        configure_fake(fake, tokens, token_delay)

    for scenario in scenarios:
        requests = scenario.quick_requests_per_client if quick else scenario.requests_per_client
        for round_ in range(rounds):
            # The gateways take turns at going first, so that what depends on the place in a
            # round (a warm cache, the fake's state) does not always favour the same one.
            names = list(starters)
            turn = round_ % len(names) if names else 0
            for name in ["ollama (direct)", *names[turn:], *names[:turn]]:
                server = None
                if name == "ollama (direct)":
                    target = Target("127.0.0.1", fake.port, "/api/chat",
                                    direct_body(scenario.stream))
                else:
                    server = starters[name]()
                    # Warm up both paths, so that no scenario pays for first-use work.
                    configure(5, 0.0)
                    status, _ = http_call(server.port, "POST", "/chat", chat_body(False))
                    http_call(server.port, "POST", "/chat", chat_body(True))
                    starts[name].append({
                        "startup_s": server.startup_seconds, "warm_up_status": status,
                        "idle_rss_mib": procstat.rss_bytes(server.pids()) / 2**20,
                        "idle_pss_mib": procstat.pss_bytes(server.pids()) / 2**20,
                    })
                    target = Target("127.0.0.1", server.port, "/chat", chat_body(scenario.stream))
                configure(scenario.tokens, scenario.token_delay)
                try:
                    load = Load(clients=scenario.clients, requests_per_client=requests)
                    row = {"scenario": scenario.name, "key": scenario.key, "target": name,
                           "round": round_, "clients": scenario.clients,
                           "stream": scenario.stream, "expected_tokens": scenario.tokens}
                    row.update(await measure(target, load, server, fake))
                finally:
                    if server is not None:
                        server.stop()
                print(f"{scenario.name:44} {name:16} {row['req_per_s']:8.1f} req/s  "
                      f"ttft p50 {row['ttft_p50_ms']:7.2f} ms  errors {row['errors']}  "
                      f"cpu: server {row['server_cpu_s']:.2f} s, fake {row['fake_cpu_s']:.2f} s,"
                      f" load {row['loadgen_cpu_s']:.2f} s, wall {row['wall_s']:.2f} s",
                      flush=True)
                rows.append(row)
                await asyncio.sleep(0.2)  # let closed connections settle between targets
    return rows, {name: summarize_starts(runs) for name, runs in starts.items()}


def summarize_starts(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A gateway's startup time and idle memory: the median over its starts in the run."""
    statuses = [run["warm_up_status"] for run in runs]
    return {
        "startup_s": statistics.median(run["startup_s"] for run in runs),
        # 200 if every warm-up was answered, else the first status that was not.
        "warm_up_status": next((status for status in statuses if status != 200), 200),
        "idle_rss_mib": statistics.median(run["idle_rss_mib"] for run in runs),
        "idle_pss_mib": statistics.median(run["idle_pss_mib"] for run in runs),
        "starts": runs,
    }


# --- reporting ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    names = ("flask", "gunicorn", "gevent", "requests", "pydantic")
    versions = {name: metadata.version(name) for name in names}
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "kernel": platform.release(), **versions}


# The figures of a row that compare() carries over, each the median over the rounds.
FIGURES = ("ttft_overhead_p50_ms", "ttft_overhead_p99_ms", "req_per_s",
           "server_cpu_s_per_1k_tokens", "peak_rss_mib", "peak_pss_mib",
           "frames_per_request", "tokens_per_request")


def compare(rows: list[dict[str, Any]], servers: list[str]) -> list[dict[str, Any]]:
    """For each scenario and gateway, the difference to the direct run of the same round;
    over several rounds, the median of each figure (errors and requests are summed), with
    the figures of each round kept in ``by_round``."""
    out = []
    by_key = {(r["scenario"], r["target"], r.get("round", 0)): r for r in rows}
    rounds = sorted({r.get("round", 0) for r in rows})
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        for name in servers:
            by_round = []
            for round_ in rounds:
                direct = by_key[(scenario, "ollama (direct)", round_)]
                row = by_key[(scenario, name, round_)]
                item = {
                    "round": round_, "key": row["key"],
                    "ttft_overhead_p50_ms": row["ttft_p50_ms"] - direct["ttft_p50_ms"],
                    "ttft_overhead_p99_ms": row["ttft_p99_ms"] - direct["ttft_p99_ms"],
                    **{f: row[f] for f in FIGURES if f in row},
                    "errors": row["errors"],
                    "requests": row["requests"],
                }
                naive = by_key.get((scenario, "naive proxy", round_))
                if naive and name != "naive proxy" and naive["req_per_s"]:
                    item["req_per_s_vs_naive"] = row["req_per_s"] / naive["req_per_s"]
                by_round.append(item)
            summary: dict[str, Any] = {
                "scenario": scenario, "key": by_round[0]["key"], "target": name,
                **{f: statistics.median(i[f] for i in by_round) for f in FIGURES},
                "errors": sum(i["errors"] for i in by_round),
                "requests": sum(i["requests"] for i in by_round),
            }
            if all("req_per_s_vs_naive" in i for i in by_round):
                summary["req_per_s_vs_naive"] = statistics.median(
                    i["req_per_s_vs_naive"] for i in by_round)
            summary["by_round"] = by_round
            out.append(summary)
    return out


@dataclass
class Goal:
    """A target of issue #4: a figure, the bound, and the naive proxy's figure on the machine
    where the bound was set, so that the bound can also be read as a ratio to naive."""

    figure: str
    key: str  # scenario key, or "server" for the per-server figures
    field: str
    scale: float
    bound: float
    lower_is_better: bool
    naive_reference: float | None


GOALS = [
    Goal("stream TTFT overhead p50, 1 client (ms)", "stream-1", "ttft_overhead_p50_ms",
         1, 1.5, True, 2.2),
    Goal("CPU s per 1k streamed tokens, 64 clients", "stream-64", "server_cpu_s_per_1k_tokens",
         1, 0.035, True, 0.0445),
    Goal("non-stream req/s, 32 clients (one core)", "nonstream-32", "req_per_s",
         1, 1.15, False, None),
    Goal("500 streams: errors", "held-500", "errors", 1, 0, True, None),
    Goal("500 streams: TTFT overhead p99 (s)", "held-500", "ttft_overhead_p99_ms",
         0.001, 0.3, True, 0.6),
    Goal("1,200 streams: errors", "held-1200", "errors", 1, 0, True, None),
    Goal("idle RSS (MiB)", "server", "idle_rss_mib", 1, 60, True, 72),
    Goal("RSS at 500 streams (MiB)", "held-500", "peak_rss_mib", 1, 90, True, 106),
    Goal("startup to first 200 on /health (s)", "server", "startup_s", 1, 0.5, True, 0.3),
]


def _ratios(ours: dict[str, Any], other: dict[str, Any] | None, field: str) -> list[float]:
    """Ours over the other's ``field``, round by round (a scenario's rounds, or a gateway's
    starts, pair up in the order they ran), sorted."""
    if other is None:
        return []
    # A ratio to nothing, or to a negative overhead (the gateway beat the direct run in a
    # noisy round), says nothing.
    return sorted(a[field] / b[field] for a, b in zip(ours["by_round"], other["by_round"])
                  if b[field] > 0)


def check_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Read each goal off the report: ours, naive's in the same run, and whether it is met.

    A ratio to naive is the median of the ratios of each round; ``ratio_range`` gives the
    lowest and highest. The same is given against the smallest proxy on the stack (the
    "stack floor"), when it ran.
    """
    by = {(c["key"], c["target"]): c for c in report["comparison"]}
    for name, server in report["servers"].items():
        by[("server", name)] = {**server, "by_round": server["starts"]}
    out = []
    for goal in GOALS:
        ours = by.get((goal.key, "pi-agent"))
        naive = by.get((goal.key, "naive proxy"))
        floor = by.get((goal.key, "stack floor"))
        if ours is None:
            continue
        value = ours[goal.field] * goal.scale
        naive_value = naive[goal.field] * goal.scale if naive else None
        item: dict[str, Any] = {"figure": goal.figure, "pi_agent": value, "naive": naive_value}
        if floor is not None:
            item["floor"] = floor[goal.field] * goal.scale
            to_floor = _ratios(ours, floor, goal.field)
            if to_floor:
                item["ratio_to_floor"] = statistics.median(to_floor)
        ratios = _ratios(ours, naive, goal.field)
        ratio = statistics.median(ratios) if ratios else None
        if ratios:
            item["ratio_range"] = [ratios[0], ratios[-1]]
        if goal.figure.startswith("non-stream req/s"):
            # The bound is a ratio to naive measured in the same run.
            item.update(bound=f">= {goal.bound}x naive", ratio=ratio,
                        met=ratio is not None and ratio >= goal.bound)
        else:
            sign = "<=" if goal.lower_is_better else ">="
            item["bound"] = f"{sign} {goal.bound:g}"
            item["met"] = value <= goal.bound if goal.lower_is_better else value >= goal.bound
            if ratio is not None and goal.naive_reference:
                item["ratio"] = ratio
                item["ratio_bound"] = goal.bound / goal.naive_reference
                item["met_as_ratio"] = ratio <= item["ratio_bound"]
        out.append(item)
    return out


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if abs(value) < 0.1 and value != 0 else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Run {report['date']} ({'quick' if report['quick'] else 'full'}) on {m['cpu']}, "
        f"{m['cores']} cores, Python {m['python']}, gunicorn {m['gunicorn']}, "
        f"gevent {m['gevent']}, Flask {m['flask']}.",
    ]
    rounds = report.get("rounds", 1)
    if rounds > 1:
        lines.append(
            f"{rounds} rounds, the targets taking turns within each: a figure is the median "
            "over the rounds (startup and idle memory: over every start of the gateway), a "
            "ratio to naive the median of the ratios of each round, their range in parentheses."
        )
    floor = any("floor" in g for g in report["goals"])
    lines += [
        "",
        "| figure | pi-agent | naive proxy | " + ("stack floor | " if floor else "")
        + "pi-agent / naive | " + ("pi-agent / floor | " if floor else "")
        + "target | met | target as a ratio to naive | met as a ratio |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if floor else ""),
    ]
    for g in report["goals"]:
        ratio_bound = g.get("ratio_bound")
        ratio = _number(g.get("ratio"))
        if rounds > 1 and ratio and "ratio_range" in g:
            low, high = g["ratio_range"]
            ratio += f" ({_number(low)} to {_number(high)})"
        floor_cells = (f"{_number(g.get('floor'))} | " if floor else "")
        to_floor = (f"{_number(g.get('ratio_to_floor'))} | " if floor else "")
        lines.append(
            f"| {g['figure']} | {_number(g['pi_agent'])} | {_number(g['naive'])} | "
            f"{floor_cells}{ratio} | {to_floor}{g['bound']} | {'yes' if g['met'] else 'no'} | "
            f"{'<= ' + _number(ratio_bound) if ratio_bound else ''} | "
            f"{'' if 'met_as_ratio' not in g else 'yes' if g['met_as_ratio'] else 'no'} |"
        )
    lines += [
        "",
        "| scenario | gateway | TTFT overhead p50 / p99 (ms) | req/s | vs naive | "
        "CPU s / 1k tokens | peak RSS / PSS (MiB) | errors | frames / tokens per request |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["comparison"]:
        vs = f"{c['req_per_s_vs_naive']:.2f}x" if "req_per_s_vs_naive" in c else ""
        lines.append(
            f"| {c['scenario']} | {c['target']} | {c['ttft_overhead_p50_ms']:+.2f} / "
            f"{c['ttft_overhead_p99_ms']:+.2f} | {c['req_per_s']:.1f} | {vs} | "
            f"{c['server_cpu_s_per_1k_tokens']:.4f} | "
            f"{c['peak_rss_mib']:.0f} / {c['peak_pss_mib']:.0f} | "
            f"{c['errors']}/{c['requests']} | "
            f"{c['frames_per_request']:.1f} / {c['tokens_per_request']:.1f} |"
        )
    lines += ["", "| gateway | startup to first 200 on /health (s) | idle RSS / PSS (MiB) |",
              "|---|---|---|"]
    for name, server in report["servers"].items():
        lines.append(f"| {name} | {server['startup_s']:.2f} | "
                     f"{server['idle_rss_mib']:.0f} / {server['idle_pss_mib']:.0f} |")
    direct: dict[str, list[float]] = {}
    for r in report["rows"]:
        if r["target"] == "ollama (direct)":
            direct.setdefault(r["scenario"], []).append(r["harness_cpu_s_per_1k_tokens"])
    harness = ", ".join(f"{scenario}: {statistics.median(values):.4f}"
                        for scenario, values in direct.items())
    lines += ["", f"Harness CPU s per 1k tokens (fake Ollama + load generator, direct runs): "
                  f"{harness}."]
    if report.get("memory_fill"):
        lines += memory_fill.markdown(report["memory_fill"])
    if report.get("prefill"):
        lines += pi_prefill.markdown(report["prefill"])
    if report.get("knowledge_search"):
        lines += knowledge_search.markdown(report["knowledge_search"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: under a minute")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-naive", action="store_true", help="leave out the naive proxy")
    parser.add_argument("--no-floor", action="store_true",
                        help="leave out the smallest proxy on the stack (bench/stack_floor.py)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every scenario this many times, the targets taking turns; "
                             "figures are medians over the rounds")
    parser.add_argument("--only", default="", help="run the scenarios whose name has this text")
    parser.add_argument("--compare", type=Path, action="append", default=[], metavar="DIR",
                        help="also measure the checkout in DIR (e.g. a git worktree of an "
                             "older commit), in the same run")
    parser.add_argument("--sqlite", action="store_true",
                        help="also measure this checkout with PI_AGENT_STORE=sqlite")
    parser.add_argument("--redis", action="store_true",
                        help="also measure this checkout with PI_AGENT_STORE=redis "
                             "(a redis-server of its own for the run)")
    args = parser.parse_args()
    scenarios = [s for s in SCENARIOS if args.only in s.name]
    extra_names = ("memory", "knowledge", "prefill")
    if not scenarios and not any(args.only in extra for extra in extra_names):
        parser.error(f"no scenario has {args.only!r} in its name")
    args.out.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _pin(1)  # the harness; the gateways pin themselves to CPU 0

    started = time.perf_counter()
    fake = start_fake(args.out)
    redis_server = RedisServer() if args.redis else None
    try:
        starters: dict[str, Starter] = {}
        for name, root in [("pi-agent", ROOT)] + [(f"pi-agent@{d.name}", d) for d in args.compare]:
            starters[name] = functools.partial(start_gateway, name, root.resolve(), fake.port,
                                               args.out)
        if args.sqlite:
            starters["pi-agent sqlite"] = functools.partial(
                start_with_sqlite, args.out / "sqlite-state", fake.port, args.out)
        if redis_server is not None:
            starters["pi-agent redis"] = functools.partial(
                start_with_redis, redis_server.url, fake.port, args.out)
        if not args.no_naive and (NAIVE_DIR / "naive_proxy.py").exists():
            starters["naive proxy"] = functools.partial(start_naive, fake.port, args.out)
        if not args.no_floor:
            starters["stack floor"] = functools.partial(start_floor, fake.port, args.out)
        rounds = max(1, args.rounds)
        rows: list[dict[str, Any]] = []
        info: dict[str, dict[str, Any]] = {}
        if scenarios:
            rows, info = uvloop.run(run_scenarios(starters, fake, args.quick, scenarios, rounds))
        prefilled: list[dict[str, Any]] = []
        if args.only in "prefill":  # the gateways alone: the proxies keep no memory
            prefilled = pi_prefill.measure(
                {name: start for name, start in starters.items() if name.startswith("pi-agent")},
                lambda config: http_call(fake.port, "POST", "/_bench/config",
                                         json.dumps(config).encode()) and None,
                lambda: json.loads(http_call(fake.port, "GET", "/_bench/stats")[1]),
                http_call, args.quick)
        filled = []
        if args.only in "memory":  # also with no --only: "" is in every name
            filled = memory_fill.measure(starters["pi-agent"],
                                         functools.partial(configure_fake, fake), http_call,
                                         memory_fill.QUICK_BUDGET if args.quick else 0)
    finally:
        fake.stop()
        if redis_server is not None:
            redis_server.stop()
    searched = knowledge_search.measure(args.quick) if args.only in "knowledge" else {}

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "rounds": rounds,
        "machine": machine(),
        "scenarios": [asdict(s) for s in scenarios],
        "servers": info,
        "rows": rows,
        "comparison": compare(rows, list(info)),
        "memory_fill": filled,
        "prefill": prefilled,
        "knowledge_search": searched,
        "elapsed_s": time.perf_counter() - started,
    }
    extras = ((memory_fill.markdown(filled) if filled else [])
              + (pi_prefill.markdown(prefilled) if prefilled else [])
              + (knowledge_search.markdown(searched) if searched else []))
    if not rows:  # --only memory, --only prefill, --only knowledge
        (args.out / "extras.json").write_text(json.dumps(report, indent=2))
        print("\n".join(extras))
        return
    report["goals"] = check_goals(report)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2))
    (args.out / "latest.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
