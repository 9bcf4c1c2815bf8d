"""Settings: defaults, environment, overrides, and a clear stop on a bad value."""
from __future__ import annotations

import os

import pytest

from pi_agent import create_app
from pi_agent.config import ConfigError, load_settings


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert settings.ollama_url == "http://127.0.0.1:11434"
    assert settings.model == "llama3.2:1b"
    assert (settings.connect_timeout, settings.first_token_timeout) == (3, 300)
    assert (settings.idle_timeout, settings.total_timeout, settings.heartbeat_seconds) == (
        60, 600, 10)
    assert settings.enable_memory is True
    assert settings.bind == "127.0.0.1:8000"


def test_environment_then_overrides() -> None:
    env = {
        "PI_AGENT_MODEL": "qwen3:0.6b",
        "PI_AGENT_NUM_CTX": "4096",
        "PI_AGENT_ENABLE_MEMORY": "false",
        "PI_AGENT_OLLAMA_URL": "http://pi.local:11434/",
        "PI_AGENT_READ_TIMEOUT": "12.5",
        "OTHER_MODEL": "ignored",
    }
    settings = load_settings({"NUM_CTX": 1024, "TESTING": True}, environ=env)
    assert settings.model == "qwen3:0.6b"
    assert settings.num_ctx == 1024  # the caller's dict wins over the environment
    assert settings.enable_memory is False
    assert settings.ollama_url == "http://pi.local:11434"
    assert settings.first_token_timeout == 12.5  # PI_AGENT_READ_TIMEOUT, the old name


def test_create_app_reads_the_environment_when_called() -> None:
    os.environ["PI_AGENT_MODEL"] = "from-env:1b"
    app = create_app()
    try:
        assert app.extensions["pi_agent"].settings.model == "from-env:1b"
    finally:
        app.extensions["pi_agent"].provider.close()


@pytest.mark.parametrize(
    "keep_alive, expected",
    [("10m", "10m"), ("1h30m", "1h30m"), ("-1", -1), ("0", 0), ("300", 300), ("-1m", "-1m")],
)
def test_keep_alive(keep_alive: str, expected: int | str) -> None:
    assert load_settings(environ={"PI_AGENT_KEEP_ALIVE": keep_alive}).keep_alive == expected


@pytest.mark.parametrize(
    "var, value",
    [
        ("PI_AGENT_NUM_CTX", "abc"),
        ("PI_AGENT_NUM_PREDICT", "-5"),
        ("PI_AGENT_NUM_PREDICT", "0"),
        ("PI_AGENT_TEMPERATURE", "hot"),
        ("PI_AGENT_TEMPERATURE", "-1"),
        ("PI_AGENT_MEMORY_MAX_TURNS", "-1"),
        ("PI_AGENT_MEMORY_TTL_MINUTES", "0"),
        ("PI_AGENT_MEMORY_MAX_CONVERSATIONS", "many"),
        ("PI_AGENT_MEMORY_MAX_BYTES", "65535"),
        ("PI_AGENT_MEMORY_MAX_PER_KEY", "0"),
        ("PI_AGENT_CONNECT_TIMEOUT", "-3"),
        ("PI_AGENT_READ_TIMEOUT", "soon"),
        ("PI_AGENT_ENABLE_MEMORY", "maybe"),
        ("PI_AGENT_KEEP_ALIVE", "forever"),
        ("PI_AGENT_OLLAMA_URL", "localhost:11434"),
        ("PI_AGENT_PROVIDER", "openai"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={var: value})
    message = str(info.value)
    assert message.startswith(f"invalid setting {var}={value!r}: ")
    assert "\n" not in message


def test_memory_bounds_reach_the_store() -> None:
    defaults = load_settings(environ={})
    assert (defaults.memory_max_bytes, defaults.memory_max_per_key) == (32 * 1024 * 1024, 100)
    os.environ["PI_AGENT_MEMORY_MAX_BYTES"] = "65536"
    app = create_app({"MEMORY_MAX_PER_KEY": 3})
    try:
        memory = app.extensions["pi_agent"].memory
        assert (memory.max_bytes, memory.max_per_key) == (65536, 3)
    finally:
        app.extensions["pi_agent"].provider.close()


def test_bad_override_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"^invalid setting NUM_CTX='x': "):
        create_app({"NUM_CTX": "x"})


def test_new_name_wins_over_the_old_one() -> None:
    env = {"PI_AGENT_READ_TIMEOUT": "12", "PI_AGENT_FIRST_TOKEN_TIMEOUT": "34"}
    assert load_settings(environ=env).first_token_timeout == 34
    assert load_settings({"READ_TIMEOUT": 5}, environ=env).first_token_timeout == 5
