"""Several Ollama servers behind one gateway (``PI_AGENT_OLLAMA_URL`` with commas).

The pool keeps, for each upstream, what a background poll last saw: whether it answers, the
models it has installed (``/api/tags``, every minute and after a "model not found") and
those it has loaded (``/api/ps``, every few seconds). Requests never wait for a poll. It
ranks the upstreams for a turn (``rank``): among those that answer and have the model, the
one that served the conversation's previous turn (its prompt is in that Ollama's cache: a Pi
reads a long history again slowly), then those with the model loaded, then those with the
most free slots, ties at random. An upstream that failed a call is left out for a short
cooldown. It is a ``Provider`` itself, for what is not a turn: the model lists are the union
of every upstream's, and other requests go to an upstream that has the model they name.

With one upstream nothing is polled and every call goes to it, as before the pool.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from ..config import Settings
from ..errors import (
    ModelNotFound,
    ProviderError,
    ProviderUnavailable,
    UpstreamError,
    UpstreamProtocolError,
)
from .base import Abort, ChatCall, Forwarded, ModelInfo
from .ollama import OllamaProvider, OllamaStream
from .ollama_replies import full_model_name

logger = logging.getLogger(__name__)

PS_SECONDS = 5.0  # how often each upstream is asked which models it has loaded
TAGS_SECONDS = 60.0  # ... and which it has installed
COOLDOWN_SECONDS = 10.0  # an upstream that failed a call is left out this long
# Conversations whose upstream is remembered, for the next turn's; the oldest are forgotten.
AFFINITY_SIZE = 10_000


def name_upstream(url: str) -> str:
    """How an upstream is named in answers and logs: its host and port."""
    parts = urlsplit(url)
    return parts.netloc or url


@dataclass
class Upstream:
    """One Ollama server and what the last poll saw of it."""

    name: str
    provider: OllamaProvider
    answers: bool = True  # until a poll says otherwise
    problem: str = ""  # why it does not answer
    installed: frozenset[str] | None = None  # None: not known yet
    loaded: frozenset[str] = frozenset()
    cool_until: float = 0.0
    failures: int = 0  # calls that failed in a row, each before its first chunk
    tags_due: float = 0.0  # when /api/tags is asked next
    changed: threading.Event = field(default_factory=threading.Event)  # poll it now
    # Polls begun and ended: what ended after a change was begun after it, if ``ended`` has
    # passed what ``begun`` was at the change (a poll under way may hold answers from before).
    begun: int = 0
    ended: int = 0

    def has(self, model: str) -> bool:
        return self.installed is None or full_model_name(model) in self.installed


class UpstreamPool:
    """The Ollama servers at ``urls``, each a ``OllamaProvider`` made by ``make``."""

    name = "ollama"

    def __init__(self, urls: Sequence[str], make: Callable[[str], OllamaProvider],
                 clock: Callable[[], float] = time.monotonic,
                 cooldown: float = COOLDOWN_SECONDS, ps_seconds: float = PS_SECONDS,
                 tags_seconds: float = TAGS_SECONDS, poll: bool = True) -> None:
        """``poll`` False: nothing is asked in the background (what each has stays as set)."""
        self.upstreams = [Upstream(name_upstream(url), make(url)) for url in urls]
        self._by_name = {upstream.name: upstream for upstream in self.upstreams}
        self._clock = clock
        self.cooldown = cooldown
        self._ps_seconds, self._tags_seconds = ps_seconds, tags_seconds
        self._affinity: OrderedDict[str, str] = OrderedDict()  # conversation -> upstream
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # The process whose threads poll (a thread does not survive a fork); -1: none does.
        self._polling = 0 if poll else -1

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamPool:
        # The socket timeout covers the wait for the first token (Ollama sends nothing
        # before it) and each wait between tokens: past it a turn moves to the next
        # upstream, before its first token only.
        def make(url: str) -> OllamaProvider:
            return OllamaProvider(
                url, settings.connect_timeout, settings.first_token_timeout,
                whole_reply_timeout=max(settings.first_token_timeout, settings.total_timeout))

        return cls(settings.ollama_urls, make)

    @property
    def names(self) -> list[str]:
        return [upstream.name for upstream in self.upstreams]

    @property
    def several(self) -> bool:
        return len(self.upstreams) > 1

    def provider(self, name: str) -> OllamaProvider:
        return self._by_name[name].provider

    # -- which upstream a turn goes to

    def rank(self, model: str, conversation_id: str, free: Mapping[str, int]) -> list[str]:
        """The upstreams with a free slot (``free``: slots by name) that may take a turn of
        ``model``, best first (see the module's docstring). Upstreams known to lack the
        model come only when none that answers has it (Ollama then says what is missing),
        those that do not answer or cool down only when none answers: a turn that no
        upstream can serve fails as it would with one, instead of waiting for ever."""
        if not self.several:
            return [name for name, slots in free.items() if slots > 0]
        self.start_polling()
        now = self._clock()
        with self._lock:
            previous = self._affinity.get(conversation_id)
        usable = [u for u in self.upstreams if u.answers and now >= u.cool_until]
        if not usable:
            return [name for name in self.names if free.get(name, 0) > 0]
        having = [u for u in usable if u.has(model)] or usable
        candidates = [u for u in having if free.get(u.name, 0) > 0]
        wanted = full_model_name(model)
        random.shuffle(candidates)  # ties at random; sort keeps the shuffled order
        candidates.sort(key=lambda u: (u.name != previous, wanted not in u.loaded,
                                       -free[u.name]))
        return [u.name for u in candidates]

    def served(self, name: str, model: str, conversation_id: str = "") -> None:
        """A turn got its first chunk from ``name``: the model is loaded there now, and the
        conversation's next turn (if it has one that is remembered) goes there too."""
        if not self.several:
            return
        upstream = self._by_name[name]
        upstream.failures = 0
        upstream.loaded |= {full_model_name(model)}
        if conversation_id:
            with self._lock:
                self._affinity[conversation_id] = name
                self._affinity.move_to_end(conversation_id)
                while len(self._affinity) > AFFINITY_SIZE:
                    self._affinity.popitem(last=False)

    def failed(self, name: str, exc: ProviderError) -> None:
        """A call to ``name`` failed before its first chunk: leave it out for the cooldown
        when it cannot be reached or answered garbage, or failed twice in a row otherwise
        (a 5xx or a slow first token may be the request's own doing: a long prompt, a large
        context). For a model it lacks, its list is asked again instead."""
        upstream = self._by_name[name]
        if isinstance(exc, ModelNotFound):
            upstream.tags_due = 0.0
            upstream.changed.set()
            return
        upstream.failures += 1
        if upstream.failures < 2 and not isinstance(exc, (ProviderUnavailable,
                                                          UpstreamProtocolError)):
            return
        upstream.cool_until = self._clock() + self.cooldown
        logger.warning("upstream %s left out for %.0f s: %s", name, self.cooldown,
                       exc.description)

    # -- the Provider interface, for what is not a turn

    def stream_chat(self, call: ChatCall, abort: Abort | None = None) -> OllamaStream:
        """A call outside a turn: to the best upstream for its model."""
        ranked = self.rank(call.model, "", {name: 1 for name in self.names})
        return self.provider(ranked[0]).stream_chat(call, abort)

    def list_models(self) -> list[ModelInfo]:
        """Every model installed in an upstream that answers, each once (the newest).

        :raise ProviderError: none answers; the first one's error.
        """
        if not self.several:
            return self.upstreams[0].provider.list_models()
        found: dict[str, ModelInfo] = {}
        failure: ProviderError | None = None
        answered = False
        for upstream in self._answering():
            try:
                models = upstream.provider.list_models()
            except ProviderError as exc:
                failure = failure or exc
                continue
            answered = True
            for model in models:
                known = found.get(model.name)
                if known is None or model.modified_at > known.modified_at:
                    found[model.name] = model
        if not answered and failure is not None:
            raise failure
        return sorted(found.values(), key=lambda model: model.name)

    def forward(
        self, method: str, path: str, body: bytes | None = None, *,
        wait: Literal["quick", "stream", "whole"] = "quick", abort: Abort | None = None,
    ) -> Forwarded:
        """Ollama's own API: the model lists as one, other requests to an upstream that
        answers and has the model the body names (the next one, if it says it has not or
        cannot be reached)."""
        if not self.several:
            return self.upstreams[0].provider.forward(method, path, body, wait=wait, abort=abort)
        if method == "GET" and path in ("/api/tags", "/api/ps"):
            return self._list_union(path)
        model = _named_model(body)
        ranked = self.rank(model, "", {name: 1 for name in self.names}) if model else [
            u.name for u in self.upstreams if u.answers] or self.names
        for name in ranked[:-1]:
            try:
                answer = self.provider(name).forward(method, path, body, wait=wait,
                                                     abort=abort)
            except ProviderError as exc:  # not polled since it went away: the next one
                self.failed(name, exc)
                continue
            if answer.status != 404 or not model:
                return answer
            answer.close()  # its list is older than the model: the next may have it
            self.failed(name, ModelNotFound(model))
        return self.provider(ranked[-1]).forward(method, path, body, wait=wait, abort=abort)

    def close(self) -> None:
        self._closed.set()
        for upstream in self.upstreams:
            upstream.changed.set()
            upstream.provider.close()

    def _answering(self) -> list[Upstream]:
        """The upstreams that answered their last poll (all, if none did): a Pi that is off
        would add its connect timeout to every model list."""
        self.start_polling()
        return [u for u in self.upstreams if u.answers] or self.upstreams

    def _list_union(self, path: str) -> Listing:
        """The ``models`` of every upstream that answers, each name once; with none, the
        first one's answer as it is.

        :raise ProviderError: no upstream answered at all; the first one's error.
        """
        models: dict[str, Any] = {}
        first: Listing | None = None
        failure: ProviderError | None = None
        for upstream in self._answering():
            try:
                answer = upstream.provider.forward("GET", path)
                try:
                    content = b"".join(answer)
                finally:
                    answer.close()
            except ProviderError as exc:
                failure = failure or exc
                continue
            try:
                listed = json.loads(content)["models"] if answer.status == 200 else None
            except (ValueError, TypeError, KeyError):
                listed = None
            if not isinstance(listed, list):
                first = first or Listing(answer.status, content, answer.content_type)
                continue
            for model in listed:
                if isinstance(model, dict) and isinstance(model.get("name"), str):
                    models.setdefault(model["name"], model)
        if not models:
            if first is not None:
                return first
            if failure is not None:
                raise failure
        body = json.dumps({"models": sorted(models.values(), key=lambda m: m["name"])},
                          separators=(",", ":")).encode()
        return Listing(200, body, "application/json; charset=utf-8")

    # -- the background poll

    def start_polling(self) -> None:
        """Poll each upstream in the background, once per process (a thread does not
        survive a fork); the first turn starts it too."""
        if self._polling in (os.getpid(), -1) or self._closed.is_set():
            return
        with self._lock:
            if self._polling == os.getpid():
                return
            self._polling = os.getpid()
            for upstream in self.upstreams:
                threading.Thread(target=self._poll, args=(upstream,), daemon=True,
                                 name=f"pi-agent-poll-{upstream.name}").start()

    def _poll(self, upstream: Upstream) -> None:
        """Ask one upstream what it has, every ``ps_seconds`` (a greenlet under gevent)."""
        while not self._closed.is_set():
            upstream.begun += 1
            try:
                installed = upstream.installed
                if self._clock() >= upstream.tags_due:
                    installed = frozenset(
                        full_model_name(m.name) for m in upstream.provider.list_models())
                    upstream.tags_due = self._clock() + self._tags_seconds
                # Both lists are set together, after both answers: a turn routed between
                # them would see the first poll half done (installed, nothing loaded).
                upstream.loaded, upstream.installed = self._loaded(upstream), installed
                if not upstream.answers:
                    logger.warning("upstream %s answers again", upstream.name)
                upstream.answers, upstream.problem = True, ""
            except ProviderError as exc:
                if upstream.answers:
                    logger.warning("upstream %s does not answer: %s", upstream.name,
                                   exc.description)
                upstream.answers = False
                upstream.problem = f"ollama at {upstream.name}: {exc.description}"
                upstream.tags_due = 0.0  # what it has may have changed while it was away
            except Exception:  # the poll must outlive a bug
                logger.exception("polling upstream %s failed", upstream.name)
            upstream.ended = upstream.begun
            upstream.changed.wait(self._ps_seconds)
            upstream.changed.clear()

    @staticmethod
    def _loaded(upstream: Upstream) -> frozenset[str]:
        """The models it has loaded; those known before when only /api/ps is refused (a
        proxy in front of Ollama that lets /api/tags through): it still answers turns.

        :raise ProviderError: it cannot be reached, or does not answer in time.
        """
        try:
            return frozenset(full_model_name(name) for name in upstream.provider.list_running())
        except (UpstreamError, UpstreamProtocolError):
            return upstream.loaded


class Listing:
    """An answer made here (the union of the upstreams' model lists), as a ``Forwarded``."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status = status
        self.content_type = content_type
        self._body = body

    def __iter__(self) -> Iterator[bytes]:
        yield self._body

    def close(self) -> None:
        pass


def _named_model(body: bytes | None) -> str:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return ""
    name = data.get("model") or data.get("name") if isinstance(data, dict) else ""
    return name if isinstance(name, str) else ""
