"""What keep-alive clients see while nginx reloads: failed requests per client kind (issue 14).

    python -m bench.keepalive_reload --client raw --clients 8 --reloads 150 --interval 0.2
    python -m bench.keepalive_reload --client raw --http-directive 'keepalive_timeout 0;'
    python -m bench.keepalive_reload --client raw --main-directive 'worker_shutdown_timeout 10s;'

Runs a rendered deployment (2 stand-in backends with 50 ms per request, nginx with 2
workers, supervisord: tests/harness/deploy.py), starts `--clients` threads of one client
kind (tests/harness/keepalive.py: raw, requests, httpx2, openai, openai-noretry), reloads
nginx `--reloads` times with the command `vfgen apply` uses, `--interval` seconds apart,
and prints one JSON line: requests ok, failed (by error), responses that said
`Connection: close`, and the transport errors under the httpx2-based clients. A count,
not a timing: docs/operations.md records the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from tests.harness import keepalive as ka
from tests.harness.deploy import LiveDeployment, stand_in_args
from tests.harness.procs import ProcessGroup

KINDS = ("raw", "requests", "httpx2", "openai", "openai-noretry")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", choices=KINDS, default="raw")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--reloads", type=int, default=40)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds each stand-in takes per request")
    parser.add_argument("--http-directive", default="", help="added to nginx.conf's http {} block")
    parser.add_argument("--main-directive", default="", help="added to nginx.conf's main context")
    args = parser.parse_args(argv)

    procs = ProcessGroup()
    root = Path(tempfile.mkdtemp(prefix="vfgen-keepalive-"))
    d = LiveDeployment(root, procs, {"models": [{"model": "org/m", "served_model_name": "m", "instances": 2, "gpus": [0, 1],
                                                 "max_batch_size": 8, "extra_args": stand_in_args(latency=args.latency)}]})
    seen: Counter = Counter()
    lock = threading.Lock()
    try:
        d.start()
        if args.http_directive:
            ka.set_http_directive(d, args.http_directive)
        if args.main_directive:
            conf = d.root / "nginx.conf"
            conf.write_text(conf.read_text().replace("daemon off;\n", f"daemon off;\n{args.main_directive}\n", 1))
        if args.http_directive or args.main_directive:
            ka.reload_nginx(d)
            time.sleep(1.0)
        make = {
            "raw": lambda: ka.raw_keepalive(d.port),
            "requests": lambda: ka.requests_session(d.url),
            "httpx2": lambda: ka.httpx2_client(d.url, seen, lock),
            "openai": lambda: ka.openai_sdk(d.url, seen, lock),
            "openai-noretry": lambda: ka.openai_sdk(d.url, seen, lock, max_retries=0),
        }[args.client]()
        clients = ka.Clients(args.client, make, args.clients)
        try:
            time.sleep(1.0)
            for _ in range(args.reloads):
                ka.reload_nginx(d)
                time.sleep(args.interval)
            time.sleep(0.5)
        finally:
            clients.stop()
        print(json.dumps({**clients.record(), "clients": args.clients, "reloads": args.reloads, "interval": args.interval,
                          "http_directive": args.http_directive, "main_directive": args.main_directive,
                          "transport_errors": dict(seen)}))
    finally:
        d.stop()
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
