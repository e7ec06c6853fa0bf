"""What every prediction route does with a request, whichever protocol it speaks: read the body under
its limit (and a 413 that a client still sending can read), decode and preprocess it off the event
loop when it is large, run it through a version's micro-batcher, and count where the time went."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager

from fastapi import Request

from ..codecs import Parsed
from ..errors import BadInput
from .repository import Version

log = logging.getLogger(__name__)

# Images with up to this many pixels in all are decoded on the event loop (a thread hop costs more
# than decoding them); larger ones in a thread. Decided from the header: a 60 KB PNG can hold 36 M
# pixels, and decoding those on the loop would stall every other request.
INLINE_DECODE_PIXELS = 256 * 256


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as more than ``limit`` bytes have arrived: the count
    is of the bytes read, so a chunked upload without Content-Length is held to it as well. What the
    client still sends after that is read and discarded by :class:`LingeringClose`."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise BadInput(400, "invalid_body", f"Content-Length {declared!r} is not a number")
    if declared is not None and int(declared) > limit:
        raise BadInput(413, "request_too_large", f"the request has {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise BadInput(413, "request_too_large", f"the request body passed {limit} bytes, the limit")
        body += chunk
    return bytes(body)


class LingeringClose:
    """Pure ASGI middleware: a 413 that a client still sending its body can read (nginx's lingering
    close). Past the limit the server stops buffering and answers; the client may still be sending,
    and closing now would reset the connection under it (urllib and ``requests`` send the whole body
    before they read, and get ``BrokenPipeError`` instead of the answer). So the answer goes out, and
    the rest of the body is read and thrown away, for at most ``max_seconds`` in all, ``idle_seconds``
    without a byte and ``max_bytes`` bytes, before the connection closes (``Connection: close``).
    Memory stays bounded: what is read is dropped at once."""

    def __init__(self, app, max_seconds: float = 10.0, idle_seconds: float = 2.0, max_bytes: int = 1 << 30):
        self.app, self.max_seconds, self.idle_seconds, self.max_bytes = app, max_seconds, idle_seconds, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_done, refused = [False], [False]

        async def tracked_receive():
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done[0] = True
            return message

        async def lingering_send(message):
            if message["type"] == "http.response.start" and message["status"] == 413 and not body_done[0]:
                refused[0] = True
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            if refused[0] and message["type"] == "http.response.body" and not message.get("more_body", False):
                await send({**message, "more_body": True})  # the answer is out; the connection stays open
                await self._discard(receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, tracked_receive, lingering_send)

    async def _discard(self, receive) -> None:
        deadline, discarded = time.monotonic() + self.max_seconds, 0
        while discarded <= self.max_bytes:
            left = min(self.idle_seconds, deadline - time.monotonic())
            if left <= 0:
                break
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                break
            discarded += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                break
        log.debug("413: discarded %d bytes the client still sent", discarded)


async def prepared(version: Version, parsed: Parsed):
    """A parsed request as the model's inputs: the tensor it sent, or its raw inputs decoded and
    preprocessed, on the event loop when small (a thread hop costs more than decoding a small
    image), else in a thread, so a huge one never stalls the requests beside it."""
    if parsed.batch is not None:
        return parsed.batch
    model, batcher = version.onnx, version.batcher

    def run():
        return model.preprocess([parsed.decode(item) for item in parsed.raw])

    if parsed.work <= INLINE_DECODE_PIXELS:
        return run()
    batcher.incoming += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(None, run)
    finally:
        batcher.incoming -= 1


@contextmanager
def holding(version: Version):
    """A request that uses ``version``, from routing to its answer: an unloaded version waits for it."""
    version.active += 1
    version.batcher.active += 1
    try:
        yield version
    finally:
        version.active -= 1
        version.batcher.active -= 1


@contextmanager
def timed(version: Version, kind: str):
    """Count the time of a block in the version's statistics (``compute_input``, ``compute_output``)."""
    start = time.perf_counter_ns()
    yield
    version.batcher.stats.add(kind, time.perf_counter_ns() - start)
