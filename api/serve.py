"""`python -m api.serve`: the API as deployed: `api_workers` uvicorn processes (one per core), uvloop and
httptools, proxy headers. Each process applies its own admission control (`api.limits`)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from api.config import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m api.serve", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=settings.api_workers, help="processes (DISP_API_WORKERS)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    uvicorn.run(
        "api.main:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=True,
        log_level=args.log_level,
        access_log=False,  # one line per poll drowns the logs; request metrics are on /metrics
        # idle keep-alive connections stay open longer than clients keep theirs (httpx 5 s, browsers
        # ~60 s), so a client never sends on a connection the server is just closing
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
