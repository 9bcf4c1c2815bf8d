"""Settings: defaults, then ``PI_AGENT_*`` environment variables, then a caller's overrides.

This is the one module that reads the environment. It uses the standard library only:
``gunicorn.conf.py`` reads the settings in the master process, which should stay small and
must not load ``ssl`` or ``requests`` before the gevent worker has patched the standard
library. (pydantic here cost the master about 10 MiB.)
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "PI_AGENT_"
# prometheus-client's own variable: the folder where several workers keep their metrics. Set
# by gunicorn.conf.py for its workers (metrics_folder.py), never by hand.
METRICS_FOLDER_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# The id of the one user of a server without API keys (local mode), who may do everything.
LOCAL_ID = "local"

DEFAULT_CONNECT_TIMEOUT = 3.0
# A cold model load on a Raspberry Pi takes minutes, and Ollama sends no byte before it ends.
DEFAULT_FIRST_TOKEN_TIMEOUT = 300.0

# Old names that newer settings took over, still accepted: new name -> old name.
ALIASES = {"first_token_timeout": "read_timeout"}

# Ollama takes keep_alive as seconds (a number) or a Go duration string such as "10m" or
# "1h30m". A bare "-1" string is rejected upstream, so integers are sent as numbers.
_GO_DURATION = re.compile(r"-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting has a value the server cannot run with; the message names the variable."""


Parser = Callable[[Any], Any]


def _integer(low: int, high: int) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("must be a whole number")
        try:
            number = int(value)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if not low <= number <= high:
            raise ValueError(f"must be from {low} to {high}")
        return number

    return parse


def _number(low: float, high: float, low_open: bool = False) -> Parser:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError("must be a number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError("must be a number") from None
        if math.isnan(number) or number > high or number < low or (low_open and number == low):
            raise ValueError(f"must be {'above' if low_open else 'at least'} {low:g} "
                             f"and at most {high:g}")
        return number

    return parse


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError("must be true or false")


def _text(max_length: int) -> Parser:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not 1 <= len(value.strip()) <= max_length:
            raise ValueError(f"must be text of 1 to {max_length} characters")
        return value.strip()

    return parse


def _choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        text = str(value).strip()
        for choice in choices:
            if text.lower() == choice.lower():
                return choice
        raise ValueError(f"must be one of {', '.join(choices)}")

    return parse


def _url(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL such as http://127.0.0.1:11434")
    return value.rstrip("/")


def _urls(value: Any) -> str:
    """One URL, or several separated by commas (several Ollama servers); kept as one string,
    without spaces and trailing slashes, in the order given."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    urls = [_url(str(item).strip()) for item in items if str(item).strip()]
    if not urls:
        raise ValueError("must be an http:// or https:// URL such as http://127.0.0.1:11434")
    # An upstream is known by its host and port (in answers, logs and Redis's slot counts).
    hosts = [re.sub(r"^https?://([^/]+).*$", r"\1", url).lower() for url in urls]
    if len(set(hosts)) != len(hosts):
        raise ValueError("names one host:port twice")
    return ",".join(urls)


def _redis_url(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^(rediss?://[^/\s]+|unix:///\S+)", value):
        raise ValueError("must be a redis://host:port/db, rediss:// or unix:///path URL")
    return value.strip()


def _keep_alive(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if not _GO_DURATION.fullmatch(text):
        raise ValueError("must be seconds (an integer) or a duration such as 10m, 1h30m, -1m")
    return text


def _path(value: Any) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise ValueError("must be a file path, or empty for none")
    return value.strip()


_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(:\d{1,5})?")


def _origins(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    origins = tuple(str(item).strip().rstrip("/") for item in items if str(item).strip())
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ValueError(f"{origin!r} is not an origin such as https://example.org:8443")
    return origins


def _setting(default: Any, parse: Parser) -> Any:
    return field(default=default, metadata={"parse": parse})


@dataclass(frozen=True)
class Settings:
    """Every setting of the server, checked; read-only once built."""

    provider: str = _setting("ollama", _choice("ollama"))
    # One Ollama, or several separated by commas (see providers/pool.py).
    ollama_url: str = _setting("http://127.0.0.1:11434", _urls)
    model: str = _setting("llama3.2:1b", _text(200))
    temperature: float = _setting(0.7, _number(0, 2))
    num_ctx: int = _setting(2048, _integer(128, 1_048_576))
    num_predict: int = _setting(512, _integer(1, 1_048_576))
    keep_alive: int | str = _setting("30m", _keep_alive)
    enable_memory: bool = _setting(True, _boolean)
    memory_max_turns: int = _setting(10, _integer(1, 1000))
    memory_keep_on_drop: int = _setting(1, _integer(1, 1000))
    memory_ttl_minutes: float = _setting(60.0, _number(0, 10**6, low_open=True))
    memory_max_conversations: int = _setting(1000, _integer(1, 1_000_000))
    memory_max_bytes: int = _setting(32 * 1024 * 1024, _integer(64 * 1024, 1 << 40))
    memory_max_per_key: int = _setting(100, _integer(1, 1_000_000))
    # Where memory and the daily token counts live: this process, or a SQLite file in
    # state_dir that survives restarts (see stores/sqlite.py).
    store: str = _setting("memory", _choice("memory", "sqlite", "redis"))
    sqlite_sync: str = _setting("normal", _choice("normal", "full"))
    sqlite_busy_seconds: float = _setting(5.0, _number(0, 600, low_open=True))
    redis_url: str = _setting("redis://127.0.0.1:6379/0", _redis_url)
    redis_prefix: str = _setting("pi-agent:", _text(100))
    # How long a claim on a conversation and a generation slot hold in Redis without being
    # renewed (every third of it): what a gateway that died holds is free again after it. At
    # least 3 s: a renewal that meets a failure tries again after the breaker's second.
    redis_lease_seconds: float = _setting(30.0, _number(3, 3600))
    # gunicorn's worker processes; more than one needs the Redis store.
    workers: int = _setting(1, _integer(1, 64))
    connect_timeout: float = _setting(DEFAULT_CONNECT_TIMEOUT, _number(0, 600, low_open=True))
    first_token_timeout: float = _setting(DEFAULT_FIRST_TOKEN_TIMEOUT,
                                          _number(0, 86_400, low_open=True))
    idle_timeout: float = _setting(60.0, _number(0, 86_400, low_open=True))
    total_timeout: float = _setting(600.0, _number(0, 7 * 86_400, low_open=True))
    heartbeat_seconds: float = _setting(10.0, _number(0, 3600, low_open=True))
    max_body_bytes: int = _setting(64 * 1024, _integer(1024, 64 * 1024 * 1024))
    # A body must arrive within body_timeout seconds, plus one for each body_min_rate bytes.
    body_timeout: float = _setting(20.0, _number(0, 3600, low_open=True))
    body_min_rate: int = _setting(4096, _integer(1, 1 << 30))
    max_concurrent: int = _setting(1, _integer(1, 100_000))
    max_queue: int = _setting(8, _integer(0, 100_000))
    ready_cache_seconds: float = _setting(5.0, _number(0, 3600))
    bind: str = _setting("127.0.0.1:8000", _text(200))
    log_level: str = _setting("INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"))
    # "json": every log line one JSON object (logformat.py); prompts and replies go into a
    # turn's line only with log_prompts.
    log_format: str = _setting("text", _choice("text", "json"))
    log_prompts: bool = _setting(False, _boolean)
    # Security (see security/keys.py and web/auth.py). No keys file: no keys, and loopback only.
    keys_file: str = _setting("", _path)
    auth: str = _setting("on", _choice("on", "off"))
    cors_origins: tuple[str, ...] = _setting((), _origins)
    # The agents (see core/agent_file.py); empty: the built-in ones.
    agents_file: str = _setting("", _path)
    # What the server keeps on disk (knowledge indexes, the SQLite store); empty: see
    # default_state_dir.
    state_dir: str = _setting("", _path)
    # Bounds on what a request may ask, checked before any call to Ollama.
    max_message_chars: int = _setting(4000, _integer(1, 1_000_000))
    max_messages: int = _setting(64, _integer(1, 10_000))
    max_tools: int = _setting(32, _integer(0, 1000))
    max_num_ctx: int = _setting(8192, _integer(128, 1_048_576))

    @property
    def ollama_urls(self) -> tuple[str, ...]:
        """The Ollama servers, in the order given."""
        return tuple(self.ollama_url.split(","))


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
    given = {key.lower(): (key, value) for key, value in (overrides or {}).items()}
    values: dict[str, Any] = {}
    for setting in fields(Settings):
        found = _find([setting.name, *ALIASES.get(setting.name, "").split()], given, env)
        if found is None:
            continue
        where, raw = found
        try:
            values[setting.name] = setting.metadata["parse"](raw)
        except ValueError as exc:
            raise ConfigError(f"invalid setting {where}={raw!r}: {exc}") from None
    if not values.get("state_dir"):
        values["state_dir"] = default_state_dir(env)
    return Settings(**values)


def metrics_folder(environ: Mapping[str, str] | None = None) -> str:
    """The folder of several workers' metrics that gunicorn.conf.py made; "" for one
    process."""
    return (os.environ if environ is None else environ).get(METRICS_FOLDER_VARIABLE, "")


def default_state_dir(env: Mapping[str, str]) -> str:
    """Where the server keeps its files without PI_AGENT_STATE_DIR: pi-agent in the user's
    state folder ($XDG_STATE_HOME, else ~/.local/state), created when first needed."""
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "pi-agent")


def _find(
    names: list[str], given: Mapping[str, tuple[str, Any]], env: Mapping[str, str]
) -> tuple[str, Any] | None:
    """Find a setting under its name or its old one: the caller's dict first, then the
    environment; return where it was found and its raw value."""
    for name in names:
        if name in given:
            return given[name]
    for name in names:
        var = ENV_PREFIX + name.upper()
        if var in env:
            return var, env[var]
    return None


def setting_keys() -> set[str]:
    """Return the upper-case names of all settings, as ``create_app`` overrides use them."""
    names = [setting.name for setting in fields(Settings)] + list(ALIASES.values())
    return {name.upper() for name in names}
