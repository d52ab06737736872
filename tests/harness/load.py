"""Bounded concurrent HTTP load: N requests at concurrency C under one overall deadline.

`run_load()` blocks and returns a LoadResult; `start_load()` runs the same load in
a background thread so a test can break things while it runs. Every reply keeps
its status, which stand-in backend answered (the `X-Fake-Vllm-Port` header), the
model it served (`X-Fake-Vllm-Model`), when it started and how long it took. A
request that got no HTTP answer (connection error, client timeout, or the overall
deadline) has status 0 and an `error`, so it counts as a failure, never silently.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import aiohttp

Body = Union[bytes, Mapping[str, Any], None]
BodyFactory = Callable[[int], Body]
Url = Union[str, Callable[[int], str]]  # a URL, or the URL of request i


@dataclass(frozen=True)
class Reply:
    index: int
    status: int  # 0: no HTTP answer
    backend: int | None  # port of the stand-in that answered
    model: str | None  # first served name of that stand-in
    started: float  # seconds after the load began
    latency: float
    body: bytes
    headers: Mapping[str, str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class LoadResult:
    requested: int
    concurrency: int
    elapsed: float
    replies: list[Reply] = field(default_factory=list)

    @property
    def statuses(self) -> Counter:
        return Counter(r.status for r in self.replies)

    @property
    def failed(self) -> list[Reply]:
        return [r for r in self.replies if not r.ok]

    @property
    def per_backend(self) -> Counter:
        """Successful replies per stand-in port."""
        return Counter(r.backend for r in self.replies if r.ok and r.backend is not None)

    def latency(self, quantile: float) -> float:
        values = sorted(r.latency for r in self.replies if r.status)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(quantile * len(values)))]

    def summary(self) -> str:
        lat = [r.latency for r in self.replies if r.status]
        mean = statistics.fmean(lat) if lat else float("nan")
        errors = Counter(r.error for r in self.replies if r.error)
        return (
            f"{len(self.replies)}/{self.requested} requests at concurrency {self.concurrency} in {self.elapsed:.2f}s; "
            f"statuses {dict(sorted(self.statuses.items()))}; per backend {dict(sorted(self.per_backend.items()))}; "
            f"latency mean {mean * 1000:.0f} ms p50 {self.latency(0.5) * 1000:.0f} ms "
            f"p99 {self.latency(0.99) * 1000:.0f} ms max {max(lat, default=float('nan')) * 1000:.0f} ms"
            + (f"; errors {dict(errors)}" if errors else "")
        )


def _encode(body: Body) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return json.dumps(body, ensure_ascii=False).encode()


async def _load(
    url: Url, count: int, concurrency: int, body: BodyFactory, method: str,
    headers: Mapping[str, str], deadline: float, progress: list[int], stop: list[bool] | None = None,
    keepalive: bool = True,
) -> LoadResult:
    began = time.monotonic()
    replies: list[Reply | None] = [None] * count
    next_index = 0
    send_headers = {"Content-Type": "application/json", **headers}

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        data = _encode(body(index))
        started = time.monotonic()
        try:
            target = url(index) if callable(url) else url
            async with session.request(method, target, data=data, headers=send_headers) as resp:
                payload = await resp.read()
                port = resp.headers.get("X-Fake-Vllm-Port")
                replies[index] = Reply(
                    index, resp.status, int(port) if port else None, resp.headers.get("X-Fake-Vllm-Model"),
                    started - began, time.monotonic() - started, payload, dict(resp.headers),
                )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            replies[index] = Reply(index, 0, None, None, started - began, time.monotonic() - started, b"", {},
                                   f"{type(exc).__name__}: {exc}")
        progress[0] += 1

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < count and not (stop and stop[0]):
            index = next_index
            next_index += 1
            await one(session, index)

    # keepalive=False: one connection per request. An nginx reload closes every keep-alive
    # client connection after its current response; a client that reuses one at that instant
    # gets a connection error (measured in docs/operations.md), whatever the config says.
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, force_close=not keepalive)
    timeout = aiohttp.ClientTimeout(total=deadline)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        workers = [asyncio.ensure_future(worker(session)) for _ in range(min(concurrency, count))]
        _done, pending = await asyncio.wait(workers, timeout=deadline)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.monotonic() - began
    if stop and stop[0]:
        count = next_index  # stopped on purpose: requests never sent are not part of the run
        replies = replies[:count]
    result = LoadResult(count, concurrency, elapsed)
    for index, reply in enumerate(replies):
        # Not started or cut off by the overall deadline: a failure, not a gap.
        result.replies.append(reply or Reply(index, 0, None, None, elapsed, 0.0, b"", {}, "deadline"))
    return result


def _factory(body: Body | BodyFactory) -> BodyFactory:
    return body if callable(body) else (lambda _i: body)


def run_load(
    url: Url, *, count: int, concurrency: int, body: Body | BodyFactory = None, method: str = "POST",
    headers: Mapping[str, str] | None = None, deadline: float = 60.0,
) -> LoadResult:
    """Send `count` requests, at most `concurrency` at a time, all within `deadline` seconds."""
    return asyncio.run(_load(url, count, concurrency, _factory(body), method, dict(headers or {}), deadline, [0]))


class BackgroundLoad:
    """A run_load() in a thread; `completed` counts finished requests while it runs."""

    def __init__(self, url: Url, **kwargs: Any) -> None:
        self._progress = [0]
        self._stop = [False]
        self._future: Future = Future()
        args = (url, kwargs["count"], kwargs["concurrency"], _factory(kwargs.get("body")),
                kwargs.get("method", "POST"), dict(kwargs.get("headers") or {}), kwargs.get("deadline", 60.0),
                self._progress, self._stop, kwargs.get("keepalive", True))
        self.deadline = kwargs.get("deadline", 60.0)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True, name="vfgen-load")
        self._thread.start()

    def _run(self, *args: Any) -> None:
        try:
            self._future.set_result(asyncio.run(_load(*args)))
        except BaseException as exc:  # surfaced by result()
            self._future.set_exception(exc)

    @property
    def completed(self) -> int:
        return self._progress[0]

    def wait_for_progress(self, done: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.completed < done:
            if time.monotonic() > end or self._future.done():
                raise TimeoutError(f"load made only {self.completed}/{done} requests in {timeout}s")
            time.sleep(0.02)

    def stop(self) -> LoadResult:
        """Send no further request, let those in flight finish, and return the result."""
        self._stop[0] = True
        return self.result()

    def result(self) -> LoadResult:
        # The load bounds itself by its deadline; the margin covers cancellation.
        return self._future.result(timeout=self.deadline + 30)


def start_load(url: Url, **kwargs: Any) -> BackgroundLoad:
    """Same arguments as run_load(); returns at once."""
    return BackgroundLoad(url, **kwargs)
