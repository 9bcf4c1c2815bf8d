"""A turn answered as plain text (``Turn.start``, then ``Turn.relay``): the upstream call
is open before the response starts, so what fails before the first byte keeps its status;
then each chunk is written as it arrives. Nothing is written while the model is silent, so
the watchdog (``TurnWatch``) looks after the turn's timeouts and its client meanwhile."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Protocol

from ..errors import PiAgentError, ProviderError, ServerShuttingDown, TurnCancelled
from ..providers.base import Abort, ChatChunk, ChatStream
from .events import Done, Encoder, Failed
from .turn_log import TurnLog
from .watch import STOPPED, TurnWatch

logger = logging.getLogger(__name__)


class TextTurn(Protocol):
    """What the text relay needs of its turn (a ``turn.Turn``)."""

    conversation_id: str
    abort: Abort

    def record(self, answer: str, partial: bool, done_reason: str,
               answer_tokens: int = 0, prompt_tokens: int = 0) -> None: ...

    def count_tokens(self, tokens: int) -> None: ...

    log: TurnLog  # its log line's notes

    def release(self) -> None: ...


def relay_text(turn: TextTurn, stream: ChatStream, watch: TurnWatch,
               encoder: Encoder) -> Iterator[bytes]:
    """Yield the reply's chunks as ``encoder`` writes them, as they arrive; a failure after
    the first byte is the encoder's ``Failed`` event. A client that goes away shows up here
    as ``GeneratorExit`` at the next write, or, between tokens, as the call that the watch
    stopped: the answer so far is remembered as partial."""
    encode, write_chunk = encoder.encode, encoder.chunk_writer()
    pieces: list[str] = []
    chunks = 0
    last: ChatChunk | None = None
    failed = False
    try:
        for chunk in stream:
            chunks += 1
            watch.last_chunk = now = time.monotonic()
            if last is None:
                turn.log.saw_first_token()
            last = chunk
            if chunk.content:
                pieces.append(chunk.content)
            data = encode(Done(chunk, turn.conversation_id, {})) if chunk.done \
                else write_chunk(chunk)
            if data:
                watch.last_write = now
                # A client that reads slowly holds the write up; that is not Ollama idling.
                watch.writing = True
                yield data
                watch.writing = False
    except ProviderError as exc:
        failure = _failure(turn.abort, exc)
        failed = failure is not None and not isinstance(
            failure, (TurnCancelled, ServerShuttingDown))
        if failure is not None:
            turn.log.failed(failure)
            yield encode(Failed(failure))
        else:
            turn.log.cut_short("disconnected")
    except GeneratorExit:  # the client left: its write failed
        turn.log.cut_short("disconnected")
        raise
    finally:
        _close(turn, pieces, chunks, last, failed)
        turn.release()  # now, not when the WSGI server closes the body


def _failure(abort: Abort, exc: ProviderError) -> PiAgentError | None:
    """Why a relay ended early, as its client is told; None when the client left."""
    reason = abort.reason if abort.requested else ""
    if reason == "client_gone":
        logger.info("client went away between tokens")
        return None
    if reason in STOPPED:
        # Cancelled or cut by a shutdown, the answer so far was seen and is remembered as
        # partial, as on a disconnect; a timeout is a failed turn.
        return STOPPED[reason]()
    logger.warning("stream to the client ended by %s", type(exc).__name__)
    return exc


def _close(turn: TextTurn, pieces: list[str], chunks: int, last: ChatChunk | None,
           failed: bool) -> None:
    # Remembered before the slot is given back (release, which also closes the stream), so
    # that the conversation's next turn finds this one in its history.
    # The tokens first: they are written with the answer.
    if last is not None and last.done and last.done_reason:
        turn.count_tokens(last.completion_tokens)
        turn.record("".join(pieces), False, last.done_reason, last.completion_tokens,
                    last.prompt_tokens)
        return
    turn.count_tokens(chunks)  # cut short, it counts as what it relayed
    if not failed:
        turn.record("".join(pieces), True, "")
