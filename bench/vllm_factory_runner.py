"""Run vllm-factory 0.2.1's Dispatcher in front of given backends, as its multi-instance mode does.

    python -m bench.vllm_factory_runner --port P --max-bs N http://127.0.0.1:B0 http://127.0.0.1:B1 ...

Same event loop setup as forge.multi_instance (a fresh default asyncio loop,
run_forever); stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from forge.dispatcher import Dispatcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-bs", type=int, default=32)
    parser.add_argument("backends", nargs="+")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    dispatcher = Dispatcher(backend_urls=args.backends, max_bs=args.max_bs, host=args.host, port=args.port)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_until_complete(dispatcher.start())
        loop.run_forever()
    finally:
        loop.run_until_complete(dispatcher.stop())
        loop.close()


if __name__ == "__main__":
    main()
