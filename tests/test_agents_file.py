"""Agents from a TOML file (PI_AGENT_AGENTS_FILE): checked at startup, read again when it
changes, shown by /agents; and the tools they name."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from pi_agent.cli import main as cli
from pi_agent.config import ConfigError
from pi_agent.core.agent_file import AgentsFileError, load_agents
from pi_agent.core.agents import CHECK_SECONDS, AgentBook
from pi_agent.core.tools import BUILTIN, ToolError, resolve_tools, tool_from_function

from .agent_tools import add
from .fake_ollama import FakeOllama
from .live_server import ROOT, STARTUP_SECONDS, gunicorn_command, server_env, serving
from .test_security import Clock

GOOD = """
[defaults]
model = "qwen3:1.7b"
max_steps = 3
tool_timeout = 5

[agents.helper]
description = "Helps."
system = "You help."
model = "tiny:1b"
think = false
options = { temperature = 0.1 }

[agents.plain]
description = "Uses the default model."
system = "You are plain."

[agents.pi]
description = "Knows the time."
system = "Use a tool."
tools = ["time_now", "calculator", "pi_stats", "tests.agent_tools:add"]

[agents.docs]
system = "Answer from the sources."
knowledge = { paths = ["docs/**/*.md"], top_k = 2 }

[agents.router]
kind = "router"
fallback = "helper"
  [[agents.router.routes]]
  name = "unsafe"
  keywords = ["unsafe"]
  reply = "I can't help with that."
  [[agents.router.routes]]
  name = "help"
  agent = "helper"
  examples = ["help me"]
"""


def write(tmp_path: Path, text: str, name: str = "agents.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_built_in_agents_come_from_the_package_file(client: Any) -> None:
    agents = ["general", "coder", "poet", "pi", "router"]
    assert client.get("/agents").get_json() == {"agents": agents}
    assert client.get("/agents/pi").get_json()["tools"] == ["time_now", "calculator",
                                                            "pi_stats"]
    body = client.get("/agents/poet").get_json()
    assert body["kind"] == "chat" and body["tools"] == [] and body["knowledge"] is None
    assert body["model"] == "llama3.2:1b"  # no model named: PI_AGENT_MODEL


def test_a_file_replaces_the_built_in_agents(make_app: Callable[..., Flask],
                                             tmp_path: Path) -> None:
    client = make_app(AGENTS_FILE=write(tmp_path, GOOD)).test_client()
    assert client.get("/agents").get_json()["agents"] == ["helper", "plain", "pi", "docs",
                                                          "router"]
    helper = client.get("/agents/helper").get_json()
    assert helper["model"] == "tiny:1b" and helper["options"]["temperature"] == 0.1
    assert helper["options"]["num_ctx"] == 2048  # always the configured one
    assert client.get("/agents/plain").get_json()["model"] == "qwen3:1.7b"  # [defaults]
    pi = client.get("/agents/pi").get_json()
    assert pi["tools"] == ["time_now", "calculator", "pi_stats", "add"]
    assert client.get("/agents/docs").get_json()["knowledge"] == ["docs/**/*.md"]
    router = client.get("/agents/router").get_json()
    assert router["kind"] == "router" and router["tools"] == []
    assert client.get("/agents/general").status_code == 404


def test_a_chat_agent_from_a_file_sends_its_prompt_model_and_think(
    make_app: Callable[..., Flask], tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models |= {"tiny:1b", "qwen3:1.7b"}
    client = make_app(AGENTS_FILE=write(tmp_path, GOOD)).test_client()
    reply = client.post("/chat", json={"message": "hi", "agent": "helper"})
    assert reply.status_code == 200, reply.get_json()
    sent = fake_ollama.chat_requests()[-1]
    assert sent["model"] == "tiny:1b" and sent["think"] is False
    assert sent["messages"][0] == {"role": "system", "content": "You help."}
    assert sent["options"]["temperature"] == 0.1
    openai = client.post("/v1/chat/completions", json={
        "model": "agent:plain", "messages": [{"role": "user", "content": "hi"}]})
    assert openai.status_code == 200
    assert fake_ollama.chat_requests()[-1]["model"] == "qwen3:1.7b"
    assert "think" not in fake_ollama.chat_requests()[-1]


def test_an_agent_with_tools_offers_them_on_chat_and_v1(
    make_app: Callable[..., Flask], tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models |= {"qwen3:1.7b"}  # the defaults' model in GOOD
    client = make_app(AGENTS_FILE=write(tmp_path, GOOD)).test_client()
    reply = client.post("/chat", json={"message": "hi", "agent": "pi"})
    assert reply.status_code == 200 and reply.get_json()["tool_calls"] == []
    sent = fake_ollama.chat_requests()[-1]
    assert [tool["function"]["name"] for tool in sent["tools"]] == [
        "time_now", "calculator", "pi_stats", "add"]
    assert sent["tools"][3]["function"]["description"] == "Add two whole numbers."
    assert sent["think"] is False  # tool calls send think: false unless the agent says
    openai = client.post("/v1/chat/completions", json={
        "model": "agent:pi", "messages": [{"role": "user", "content": "hi"}]})
    assert openai.status_code == 200
    assert len(fake_ollama.chat_requests()[-1]["tools"]) == 4


BAD = [
    ("not TOML", "[agents.x\n", r"agents\.toml: .*line 1"),
    ("unknown key", '[agents.x]\nsystem = "s"\ntols = []\n', r"agents\.x\.tols: unknown key"),
    ("unknown built-in tool", '[agents.x]\ntools = ["clock"]\n',
     r"agents\.x\.tools: unknown built-in tool 'clock'"),
    ("cannot be imported", '[agents.x]\ntools = ["no_such_module:f"]\n',
     r"cannot import 'no_such_module'"),
    ("not a function", '[agents.x]\ntools = ["tests.agent_tools:NOT_A_FUNCTION"]\n',
     r"has no function 'NOT_A_FUNCTION'"),
    ("two tools, one name", '[agents.x]\ntools = ["calculator", "tests.agent_tools:add",'
     ' "tests.agent_tools:add"]\n', r"two tools are named 'add'"),
    ("agent and reply", '[agents.c]\n[agents.r]\nkind = "router"\nfallback = "c"\n'
     '[[agents.r.routes]]\nname = "x"\nagent = "c"\nreply = "no"\n',
     r"route 'x' needs either agent or reply, not both"),
    ("route to nowhere", '[agents.r]\nkind = "router"\nfallback = "ghost"\n'
     '[[agents.r.routes]]\nname = "x"\nreply = "no"\n', r"'ghost' is not a chat agent"),
    ("num_ctx", '[agents.x]\noptions = { num_ctx = 8192 }\n', r"options\.num_ctx"),
    ("an undescribable argument", '[agents.x]\ntools = ["tests.agent_tools:takes_opaque"]\n',
     r"takes_opaque: its arguments cannot be described"),
    ("no agents", '[defaults]\nmax_steps = 2\n', r"agents: Field required"),
    ("a bad name", '[agents."a b"]\n', r"a name is 1 to 64 letters"),
]


@pytest.mark.parametrize("text, problem", [(t, p) for _, t, p in BAD],
                         ids=[name for name, _, _ in BAD])
def test_a_bad_file_stops_the_app_with_one_line(
    make_app: Callable[..., Flask], tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        make_app(AGENTS_FILE=path)
    message = str(raised.value)
    assert message.startswith(f"invalid setting PI_AGENT_AGENTS_FILE: {path}: ")
    assert re.search(problem, message) and "\n" not in message


def test_a_missing_file_stops_the_app(make_app: Callable[..., Flask], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        make_app(AGENTS_FILE=str(tmp_path / "nowhere.toml"))


def test_a_change_is_read_again_and_a_bad_one_keeps_the_agents(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, '[agents.one]\nsystem = "1"\n')
    clock = Clock()
    book = AgentBook(lambda: load_agents(path), path, clock=clock)
    assert list(book) == ["one"]
    write(tmp_path, '[agents.two]\nsystem = "2"\n')
    os.utime(path, ns=(1, 1))  # a change of stamp even within the clock's resolution
    assert list(book) == ["one"]  # not looked at before CHECK_SECONDS
    clock.now += CHECK_SECONDS
    assert list(book) == ["two"]
    caplog.set_level(logging.INFO, logger="pi_agent.core.agents")
    write(tmp_path, '[agents.three]\ntools = ["clock"]\n')
    os.utime(path, ns=(2, 2))
    for _ in range(3):
        clock.now += CHECK_SECONDS
        assert list(book) == ["two"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and path in errors[0] and "unknown built-in tool" in errors[0]
    write(tmp_path, '[agents.four]\n')
    os.utime(path, ns=(3, 3))
    clock.now += CHECK_SECONDS
    assert list(book) == ["four"]


def test_own_tools_are_described_by_their_signature_and_docstring() -> None:
    (tool,) = resolve_tools(["tests.agent_tools:add"])
    assert tool.definition() == {"type": "function", "function": {
        "name": "add", "description": "Add two whole numbers.",
        "parameters": {"type": "object", "additionalProperties": False,
                       "properties": {"a": {"type": "integer"},
                                      "b": {"type": "integer", "default": 1}},
                       "required": ["a"]}}}
    assert tool.call({"a": 2, "b": 3}) == "5" and tool.call({"a": 2}) == "3"
    with pytest.raises(ToolError, match="bad arguments: a: "):
        tool.call({"a": "two"})
    with pytest.raises(ToolError, match="bad arguments: c: "):
        tool.call({"a": 1, "c": 1})
    (fails,) = resolve_tools(["tests.agent_tools:fails"])
    with pytest.raises(ToolError, match="RuntimeError: out of luck"):
        fails.call({"reason": "out of luck"})
    assert tool_from_function(add).name == "add"


@pytest.mark.parametrize("expression, answer", [
    ("2 + 3 * 4", "14"), ("(1 + 2) ** 10", "59049"), ("7 / 2", "3.5"), ("7 // 2", "3"),
    ("-3 % 5", "2"), ("0.1 + 0.2", "0.30000000000000004"), ("10 ** 100", str(10**100)),
])
def test_the_calculator_does_arithmetic(expression: str, answer: str) -> None:
    assert BUILTIN["calculator"].call({"expression": expression}) == answer


@pytest.mark.parametrize("expression, problem", [
    ("__import__('os').system('id')", "only numbers"), ("2 ** 1000", "exponents are at most"),
    ("9 ** 9 ** 9", "exponents are at most"), ("10 ** 100 * 10", "too large"),
    ("1 / 0", "division by zero"), ("x + 1", "only numbers"), ("1 +", "not an arithmetic"),
    ("(-8) ** 0.5", "not a real number"), ("1" * 201, "longer than 200"),
    ("True + 1", "only numbers"),
])
def test_the_calculator_refuses_what_is_not_arithmetic(expression: str, problem: str) -> None:
    with pytest.raises(ToolError, match=problem):
        BUILTIN["calculator"].call({"expression": expression})


def test_time_now_and_pi_stats() -> None:
    now = BUILTIN["time_now"].call({})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", now), now
    stats = json.loads(BUILTIN["pi_stats"].call({}))
    assert set(stats) == {"cpu_temperature_c", "load_1_5_15", "memory_mib", "disk_mib",
                          "uptime_s"}
    for value in stats.values():  # a number or a dict where the machine tells; else unknown
        assert value == "unknown" or isinstance(value, (int, float, list, dict))
    assert isinstance(stats["memory_mib"]["total"], int)  # Linux has /proc/meminfo


def test_gunicorn_stops_with_one_line_on_a_bad_agents_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[agents.x]\ntools = ["clock"]\n')
    result = subprocess.run(
        gunicorn_command(), cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_SECONDS,
        env=server_env(BIND="127.0.0.1:0", AGENTS_FILE=path),
    )
    assert result.returncode != 0
    told = [line for line in result.stderr.splitlines() if "PI_AGENT_AGENTS_FILE" in line]
    assert told == [f"pi-agent: invalid setting PI_AGENT_AGENTS_FILE: {path}: agents.x.tools: "
                    "unknown built-in tool 'clock' (the built-in tools: calculator, "
                    "pi_stats, time_now)"]
    assert "Traceback" not in result.stderr


def test_gunicorn_reads_a_changed_file_within_5_seconds(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    path = write(tmp_path, '[agents.one]\nsystem = "1"\n')
    with serving(tmp_path / "server.log", AGENTS_FILE=path,
                 OLLAMA_URL=fake_ollama.url) as server:
        assert requests.get(server.url + "/agents", timeout=5).json() == {"agents": ["one"]}
        write(tmp_path, '[agents.two]\nsystem = "2"\n')
        changed = time.monotonic()
        seen: list[str] = []
        while time.monotonic() - changed < 5 and seen != ["two"]:
            seen = requests.get(server.url + "/agents", timeout=5).json()["agents"]
            time.sleep(0.1)
        assert seen == ["two"]
        reply = requests.post(server.url + "/chat", json={"message": "hi", "agent": "two"},
                              timeout=10)
        assert reply.status_code == 200
        assert fake_ollama.chat_requests()[-1]["messages"][0]["content"] == "2"


def test_the_cli_knows_the_agents_of_the_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PI_AGENT_AGENTS_FILE", write(tmp_path, GOOD))
    keys = str(tmp_path / "keys.json")
    assert cli(["keys", "--file", keys, "create", "--name", "a", "--agents", "pi"]) == 0
    assert cli(["keys", "--file", keys, "create", "--name", "b", "--agents", "general"]) == 1


def test_a_bad_built_in_file_is_impossible() -> None:
    # The package's own file is the documented example: it must load.
    assert list(load_agents()) == ["general", "coder", "poet", "pi", "router"]
    with pytest.raises(AgentsFileError):
        load_agents("/nonexistent/agents.toml")
