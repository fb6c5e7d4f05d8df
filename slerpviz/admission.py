"""What the server lets in, whoever sends it: no uploads at all.

The page takes no files, but Gradio serves an upload route on every app, taking up to 1,000 files a request and
writing each to its upload folder as it arrives. Here that route is answered before a byte of the body is read.
"""

from __future__ import annotations

from starlette.responses import PlainTextResponse

UPLOAD_ROUTE = "/gradio_api/upload"
NO_UPLOADS = "This app takes no files: uploads are refused."


class RefuseUploads:
    """ASGI middleware: Gradio's upload route gets 403 and nothing is written; every other request passes as is."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith(UPLOAD_ROUTE):
            await PlainTextResponse(NO_UPLOADS, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)
