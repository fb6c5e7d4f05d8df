"""What the server lets in, whoever sends it: no uploads at all, and a bounded share of the queue for each client.

The page takes no files, but Gradio serves an upload route on every app, taking up to 1,000 files a request and
writing each to its upload folder as it arrives. Here that route is answered before a byte of the body is read.

Gradio bounds the queue as a whole (`max_size`), not per client, so one script could take every place and make
everyone else wait behind it. `ClientLimit` bounds the jobs each page (its session) and each address may have
waiting; `limit_queue_per_client` applies it where every route's join goes through (the page, gradio_client and
/call all join Gradio's queue).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.responses import PlainTextResponse

UPLOAD_ROUTE = "/gradio_api/upload"
NO_UPLOADS = "This app takes no files: uploads are refused."

# A page has at most a Run's generation, a model switch and a preview or two waiting at once; a Run joins the queue
# only once its previous Run has ended (Gradio's trigger_mode "once").
PER_SESSION = 4
# A quarter of the queue (layout.QUEUE_SIZE = 64): one address, many pages or one script, leaves three quarters free.
PER_ADDRESS = 16


class RefuseUploads:
    """ASGI middleware: Gradio's upload route gets 403 and nothing is written; every other request passes as is."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith(UPLOAD_ROUTE):
            await PlainTextResponse(NO_UPLOADS, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class ClientLimit:
    """How many jobs one page (session) and one address may have waiting in the queue; None: no limit."""

    per_session: int | None = PER_SESSION
    per_address: int | None = PER_ADDRESS

    @classmethod
    def from_environment(cls, behind_proxy: bool = False) -> ClientLimit:
        """$SLERPVIZ_QUEUE_PER_SESSION and $SLERPVIZ_QUEUE_PER_ADDRESS (0: no limit). Behind a proxy (a Space's)
        every request arrives from the proxy's address, so an address limit would count every visitor as one: off
        there unless asked for."""
        def limit(variable: str, default: int | None) -> int | None:
            value = os.environ.get(variable)
            if value is None:
                return default
            number = int(value)
            if number < 0:
                raise ValueError(f"${variable} must be 0 (no limit) or more, not {value}")
            return number or None

        return cls(limit("SLERPVIZ_QUEUE_PER_SESSION", PER_SESSION),
                   limit("SLERPVIZ_QUEUE_PER_ADDRESS", None if behind_proxy else PER_ADDRESS))

    def refusal(self, waiting: Iterable[tuple[str | None, str | None]], session: str | None,
                address: str | None) -> str | None:
        """Why a client may not queue one more job, given the (session, address) of every job waiting; None if it
        may."""
        in_session = in_address = 0
        for job_session, job_address in waiting:
            in_session += session is not None and job_session == session
            in_address += address is not None and job_address == address
        if self.per_session is not None and in_session >= self.per_session:
            return (f"This page has {jobs(in_session)} waiting in the queue already (at most {self.per_session} a "
                    "page): wait for one to finish.")
        if self.per_address is not None and in_address >= self.per_address:
            return (f"Your address has {jobs(in_address)} waiting in the queue already (at most {self.per_address} "
                    "an address): wait for one to finish.")
        return None


def jobs(count: int) -> str:
    return f"{count} job" if count == 1 else f"{count} jobs"


def client_address(request) -> str | None:
    """The address a request came from, as the server sees it (behind a proxy, the proxy's unless the server is told
    to trust its forwarded address)."""
    client = getattr(request, "client", None)
    return client.host if client is not None else None


def limit_queue_per_client(queue, limit: ClientLimit) -> None:
    """Refuse a join, with `ClientLimit.refusal`'s message, when its client has its share of the queue waiting.

    `queue` is a Gradio Blocks' queue (`demo._queue`): Gradio has no per-client limit of its own, and its `push` is
    the one door every join goes through. A refused join answers as Gradio's own refusals do (HTTP 400, the message
    as its detail), which the page shows. The check and the join are one step, so two joins at once cannot both
    take the last place."""
    push = queue.push
    joining = asyncio.Lock()

    async def limited_push(body, request, username):
        async with joining:
            waiting = [(event.session_hash, client_address(event.request))
                       for events in queue.event_queue_per_concurrency_id.values() for event in events.queue]
            refusal = limit.refusal(waiting, body.session_hash, client_address(request))
            if refusal is not None:
                return False, refusal, "error"
            return await push(body, request, username)

    queue.push = limited_push
