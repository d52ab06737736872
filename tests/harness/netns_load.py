"""tests.harness.load as a process, for a network namespace a thread cannot enter (a container's).

    nsenter -t PID --net -- python -m tests.harness.netns_load URL BODY_JSON CONCURRENCY STOP_FILE

sends requests (one connection each) until STOP_FILE exists, lets those in flight finish,
and prints one JSON object: requests, statuses, errors, per_backend. Bounded by --deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections import Counter

from tests.harness import load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("body")
    parser.add_argument("concurrency", type=int)
    parser.add_argument("stop_file")
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args()
    stop = [False]
    progress = [0]

    async def run() -> load.LoadResult:
        async def watch() -> None:
            while not os.path.exists(args.stop_file):
                await asyncio.sleep(0.05)
            stop[0] = True

        watcher = asyncio.ensure_future(watch())
        try:
            return await load._load(args.url, 1_000_000, args.concurrency, lambda _i: json.loads(args.body), "POST",
                                    {}, args.deadline, progress, stop, keepalive=False)
        finally:
            watcher.cancel()

    result = asyncio.run(run())
    print(json.dumps({
        "requests": len(result.replies),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "errors": dict(Counter(r.error for r in result.replies if r.error)),
        "failed": [{"status": r.status, "error": r.error, "body": r.body[:200].decode(errors="replace")}
                   for r in result.failed[:10]],
        "per_backend": {str(k): v for k, v in sorted(result.per_backend.items())},
        "summary": result.summary(),
    }))


if __name__ == "__main__":
    main()
