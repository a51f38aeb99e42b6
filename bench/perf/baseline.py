"""The bare app lipia is measured against: Starlette serving one constant JSON body at lipia's
status path, run by uvicorn with ``lipia serve``'s options. It is the ceiling for this machine,
this server and this framework: the most a status endpoint could do with no work at all.

    python -m bench.perf.baseline --port 5600 --body-file body.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lipia.cli import SERVER_OPTIONS


def create_baseline(body: bytes) -> Starlette:
    async def status(request: Request) -> Response:
        return Response(body, media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[Route("/api/payments/status/{payment_ref}", status), Route("/health", health)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", type=Path, required=True)
    args = parser.parse_args()
    app = create_baseline(args.body_file.read_bytes())
    uvicorn.run(app, host="127.0.0.1", port=args.port, **SERVER_OPTIONS)


if __name__ == "__main__":
    main()
