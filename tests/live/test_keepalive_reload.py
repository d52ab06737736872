"""Keep-alive clients across nginx reloads (issue 14): what clients see, measured.

Every `vfgen apply` step reloads nginx (`nginx -s reload`, the very command apply runs).
A reload retires the old workers: each closes its idle keep-alive connections at once,
and the connections with a request in flight after that request (its response then says
`Connection: close`). A client that writes its next request on an idle connection at the
instant the old worker closes it gets a connection error: a reset or a close before any
byte of a response (HTTP/1.1's idle-close race). No stock nginx directive keeps those
connections open through a graceful shutdown; only a client retry, or no keep-alive,
avoids the error.

Under concurrent keep-alive load through the real nginx of a rendered deployment, with
nginx reloaded again and again:

- the official `openai` SDK (httpx2 pool, its default `max_retries=2`) fails no call;
  a counting transport under it shows how many connection errors it retried;
- a raw keep-alive client that never retries (`http.client`, one connection per
  thread, reused until nginx says close), at the same time through the same nginx,
  does fail now and then. The test reloads until the raw client failed at least once
  AND the SDK's transport met a connection error at least once (bounded), so the SDK's
  0 is measured while the race hit it, not in a run where it did not. The SDK meets
  it less often than the raw client: httpcore drops a pooled connection whose close
  already arrived, and only a close landing between that check and its write remains
  (with `max_retries=0`: 5 failed calls in 150 reloads, docs/operations.md).
- with `keepalive_timeout 0;` in nginx.conf's `http {}` (the operator's opt-out of
  keep-alive: every response says `Connection: close`), the raw client fails nothing
  over as many reloads.

The counts are printed (run with -s); docs/operations.md has the numbers.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from tests.harness.deploy import stand_in_args
from tests.harness.keepalive import (
    Clients,
    openai_sdk,
    raw_keepalive,
    reload_nginx,
    set_http_directive,
)

pytestmark = pytest.mark.live

RAW_CLIENTS, SDK_CLIENTS = 4, 8  # threads; the SDK meets the race less often, so more of them
RELOAD_INTERVAL = 0.2  # seconds between reloads: more races per second than apply's one reload a second
MIN_RELOADS, MAX_RELOADS = 40, 250


def test_keepalive_clients_across_nginx_reloads(live_deploy):
    d = live_deploy({"models": [{"model": "org/m", "served_model_name": "m", "instances": 2, "gpus": [0, 1],
                                 "max_batch_size": 8, "extra_args": stand_in_args(latency=0.05)}]})
    retried: Counter = Counter()  # connection errors under the SDK, which it retried
    lock = threading.Lock()
    raw = Clients("raw keep-alive (http.client, no retry)", raw_keepalive(d.port), RAW_CLIENTS)
    sdk = Clients("openai SDK (default max_retries=2)", openai_sdk(d.url, retried, lock), SDK_CLIENTS)
    reloads = 0
    try:
        time.sleep(1.0)
        while reloads < MAX_RELOADS:
            reload_nginx(d)
            reloads += 1
            time.sleep(RELOAD_INTERVAL)
            with lock:
                sdk_met = sum(retried.values())
            if raw.failures >= 1 and sdk_met >= 1 and reloads >= MIN_RELOADS:
                break
        time.sleep(0.5)
    finally:
        raw.stop()
        sdk.stop()
    print(f"\n[keep-alive] {reloads} reloads, one every {RELOAD_INTERVAL}s, {RAW_CLIENTS} raw and {SDK_CLIENTS} SDK clients:"
          f"\n  {sdk.summary()}; connection errors it retried: {dict(retried)}\n  {raw.summary()}")
    assert sdk.ok > 100 and raw.ok > 100, (sdk.summary(), raw.summary())
    assert not sdk.failed, f"the openai SDK failed calls across reloads: {sdk.summary()}"
    # The race happened under this load (else the SDK's 0 proves nothing): the raw client lost
    # requests to it, and the SDK met it too and retried.
    assert raw.failures >= 1 and sum(retried.values()) >= 1, (
        f"the idle-close race did not hit both clients in {reloads} reloads: {raw.summary()}; SDK retried {dict(retried)}")
    connection_errors = ("ConnectionResetError", "BrokenPipeError", "RemoteDisconnected")
    assert all(k.split(":")[0] in connection_errors for k in raw.failed), raw.failed  # never an HTTP error status

    # The operator's opt-out: no keep-alive at all. Same load, at least as many reloads: 0 failures.
    set_http_directive(d, "keepalive_timeout 0;")
    reload_nginx(d)
    time.sleep(1.0)
    off_reloads = max(reloads, 60)
    raw_off = Clients("raw client, keepalive_timeout 0", raw_keepalive(d.port), RAW_CLIENTS)
    try:
        time.sleep(0.5)
        for _ in range(off_reloads):
            reload_nginx(d)
            time.sleep(RELOAD_INTERVAL)
        time.sleep(0.5)
    finally:
        raw_off.stop()
    print(f"  {raw_off.summary()} over {off_reloads} reloads")
    assert raw_off.ok > 100 and raw_off.closes == raw_off.ok, raw_off.summary()
    assert not raw_off.failed, raw_off.summary()
