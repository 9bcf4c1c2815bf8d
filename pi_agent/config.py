"""Settings: defaults, then ``PI_AGENT_*`` environment variables, then a caller's overrides.

This is the one module that reads the environment. It imports nothing that loads ``ssl`` or
``requests``, because ``gunicorn.conf.py`` reads the settings in the master process, before
the gevent worker has patched the standard library.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "PI_AGENT_"

DEFAULT_CONNECT_TIMEOUT = 3.0
# A cold model load on a Raspberry Pi takes minutes, and Ollama sends no byte before it ends.
DEFAULT_READ_TIMEOUT = 300.0

# Ollama takes keep_alive as seconds (a number) or a Go duration string such as "10m" or
# "1h30m". A bare "-1" string is rejected upstream, so integers are sent as numbers.
_GO_DURATION = re.compile(r"^-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


class ConfigError(ValueError):
    """A setting has a value the server cannot run with; the message names the variable."""


class Settings(BaseModel):
    """Every setting of the server, validated; read-only once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["ollama"] = "ollama"
    ollama_url: str = "http://127.0.0.1:11434"
    model: str = Field("llama3.2:1b", min_length=1, max_length=200)
    temperature: float = Field(0.7, ge=0, le=2)
    num_ctx: int = Field(2048, ge=128, le=1_048_576)
    num_predict: int = Field(512, ge=1, le=1_048_576)
    keep_alive: int | str = "30m"
    enable_memory: bool = True
    memory_max_turns: int = Field(10, ge=1, le=1000)
    memory_ttl_minutes: float = Field(60, gt=0)
    memory_max_conversations: int = Field(1000, ge=1, le=1_000_000)
    connect_timeout: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0, le=600)
    read_timeout: float = Field(DEFAULT_READ_TIMEOUT, gt=0, le=86_400)
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024)
    bind: str = Field("127.0.0.1:8000", min_length=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("ollama_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL such as http://127.0.0.1:11434")
        return value.rstrip("/")

    @field_validator("keep_alive")
    @classmethod
    def _check_keep_alive(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            return value
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if not _GO_DURATION.match(text):
            raise ValueError("must be seconds (an integer) or a duration such as 10m, 1h30m, -1m")
        return text

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from the defaults, the environment and then ``overrides``.

    ``overrides`` uses the setting names in upper case without the prefix (``"MODEL"``);
    keys that are not settings are ignored here, so a caller may pass Flask's own keys too.

    :raise ConfigError: with one line that names the variable and what is wrong.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in Settings.model_fields:
        var = ENV_PREFIX + name.upper()
        if var in env:
            values[name] = env[var]
            sources[name] = var
    for key, value in (overrides or {}).items():
        name = key.lower()
        if name in Settings.model_fields:
            values[name] = value
            sources[name] = key
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from None


def setting_keys() -> set[str]:
    """Return the upper-case names of all settings, as ``create_app`` overrides use them."""
    return {name.upper() for name in Settings.model_fields}


def _describe(exc: ValidationError, sources: Mapping[str, str]) -> str:
    first = exc.errors(include_url=False)[0]
    name = str(first["loc"][0]) if first["loc"] else "?"
    where = sources.get(name, ENV_PREFIX + name.upper())
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid setting {where}={first.get('input')!r}: {message}"
