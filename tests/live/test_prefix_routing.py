"""Promise (issue 18): with `routing: prefix` (or `session`), a conversation stays on one backend
while that backend has room, so vLLM's prefix cache hits; past the cap it spills, never drops.

Stand-ins under real nginx. A conversation is a tenant's system prompt, a first
user message, and turns that append to the messages (or, for /v1/completions, to
the prompt). Every turn's body differs; only its start is shared. Checks:

- every turn of every conversation lands on one backend at concurrency <= cap,
  and the conversations spread over the backends;
- one conversation at 4x and 8x the cap: spills to the other backends, no backend
  over its cap while the ring has room, no request lost;
- a stopped backend's conversations move (to one other backend each), the others
  stay put, and they come back once it is restarted;
- a hot prefix (one system prompt for every conversation) still spreads, because
  the key includes the first user message; one key shared by every request (same
  system prompt, same "Hi") stays on one backend below the cap and, at the ring's
  capacity, puts no backend over its cap;
- session routing by header, by the `user` field, else by prefix;
- two models with `routing: prefix`: routing by model still holds;
- bodies built to make a regex backtrack are answered, with no PCRE error.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict

import pytest

from tests.harness.deploy import stand_in_args, wait_until
from tests.harness.load import run_load

pytestmark = pytest.mark.live

CAP = 4
INSTANCES = 4
FAIL_TIMEOUT = 2  # seconds nginx skips a failed backend before trying it again
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def system_prompt(tenant: int, length: int = 1200) -> str:
    """A tenant's long system prompt; tenants differ from the first line on."""
    rng = random.Random(tenant)
    text = f"You are the assistant of tenant {tenant}. Answer politely.\n"
    while len(text) < length:
        text += " ".join(rng.choice(WORDS) for _ in range(12)) + ".\n"
    return text


def chat_body(conv: int, turn: int, system: str, model: str = "m") -> dict:
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": f"Question {conv}: what does \"{WORDS[conv % 24]}\" mean?"}]
    for t in range(1, turn + 1):
        messages += [{"role": "assistant", "content": f"answer {conv}.{t} " + "blah " * t},
                     {"role": "user", "content": f"follow-up {t} of conversation {conv}"}]
    return {"model": model, "messages": messages, "max_tokens": 8}


def completion_body(conv: int, turn: int, system: str, model: str = "m") -> dict:
    prompt = system + f"User {conv}: hello\n" + "".join(f"Assistant: reply {t}\nUser: more {t}\n" for t in range(turn))
    return {"model": model, "prompt": prompt, "max_tokens": 8}


def conversations(count: int, turns: int, *, tenants: int, hot: bool = False, model: str = "m"):
    """(conversation, path, body) for every turn; even conversations chat, odd ones use completions."""
    jobs = []
    for conv in range(count):
        system = system_prompt(0 if hot else conv % tenants)
        for turn in range(turns):
            if conv % 2 == 0 or hot:
                jobs.append((conv, "/v1/chat/completions", chat_body(conv, turn, system, model)))
            else:
                jobs.append((conv, "/v1/completions", completion_body(conv, turn, system, model)))
    random.Random(1).shuffle(jobs)
    return jobs


def homes(result, jobs) -> dict[int, set[int]]:
    seen: dict[int, set[int]] = defaultdict(set)
    for reply in result.replies:
        seen[jobs[reply.index][0]].add(reply.backend)
    return seen


def run_jobs(d, jobs, concurrency: int, headers=None):
    return run_load(lambda i: f"{d.url}{jobs[i][1]}", count=len(jobs), concurrency=concurrency,
                    body=lambda i: jobs[i][2], headers=headers, deadline=90)


def spread_of(seen: dict[int, set[int]]) -> Counter:
    return Counter(next(iter(ports)) for ports in seen.values() if len(ports) == 1)


def model_spec(routing: str = "prefix", **extra) -> dict:
    return {"model": "org/m", "served_model_name": "m", "instances": INSTANCES, "gpus": [0, 1, 2, 3],
            "max_batch_size": CAP, "routing": routing, "extra_args": stand_in_args(latency=0.05), **extra}


@pytest.fixture(scope="module")
def prefix(module_live_deploy):
    return module_live_deploy({"timeouts": {"fail": FAIL_TIMEOUT}, "models": [model_spec()]})


def test_turns_of_a_conversation_land_on_one_backend(prefix):
    prefix.reset_stats()
    # 64 conversations of 4 turns, each with a system prompt of its own (so 64 distinct keys).
    jobs = conversations(64, 4, tenants=64)
    # At most CAP requests in flight: even if all hash to one backend, it has room.
    result = run_jobs(prefix, jobs, CAP)
    assert not result.failed, result.summary()
    seen = homes(result, jobs)
    moved = {c: sorted(p) for c, p in seen.items() if len(p) != 1}
    assert not moved, f"conversations whose turns went to several backends: {moved}"
    spread = spread_of(seen)
    print(f"\n64 conversations (chat and completions) over {INSTANCES} backends: {dict(sorted(spread.items()))} "
          f"(max/mean {max(spread.values()) / 16:.2f})")
    # 64 random keys over 4 equal ring shares: max/mean 1.26 on average, 1.5 at the 95th percentile.
    assert len(spread) == INSTANCES, f"conversations clustered: {dict(spread)}"
    assert max(spread.values()) <= 32, f"one backend took half of all conversations: {dict(spread)}"


@pytest.mark.parametrize("factor", [INSTANCES, 2 * INSTANCES])
def test_one_conversation_beyond_the_cap_spills_and_loses_nothing(prefix, factor):
    prefix.reset_stats()
    system = system_prompt(3)
    # One conversation, one key: every request hashes to the same backend.
    body = chat_body(7, 2, system)
    prefix_result = run_load(f"{prefix.url}/v1/chat/completions", count=CAP, concurrency=1, body=body, deadline=30)
    assert not prefix_result.failed and len(prefix_result.per_backend) == 1, prefix_result.summary()
    home = next(iter(prefix_result.per_backend))
    prefix.reset_stats()
    result = run_load(f"{prefix.url}/v1/chat/completions", count=20 * factor * CAP, concurrency=factor * CAP,
                      body=body, deadline=90)
    stats = prefix.all_stats()
    peaks = {port: s["max_in_flight"] for port, s in stats.items()}
    print(f"\none conversation at concurrency {factor * CAP} (cap {CAP} x {INSTANCES}): {result.summary()}; "
          f"home {home}; peak in flight per backend {peaks}")
    assert not result.failed, result.summary()
    assert len(result.replies) == 20 * factor * CAP
    assert len(result.per_backend) == INSTANCES, f"the overflow did not reach every backend: {result.summary()}"
    assert result.per_backend[home] == max(result.per_backend.values()), "the home backend is not the busiest"
    if factor == INSTANCES:
        # Exactly as many requests as the ring holds: the hash upstream bounds every backend.
        assert max(peaks.values()) <= CAP, f"a backend went over its cap {CAP}: {peaks}"


def test_a_stopped_backends_conversations_move_and_come_back(prefix):
    jobs = conversations(24, 1, tenants=24)
    before = homes(run_jobs(prefix, jobs, CAP), jobs)
    assert all(len(p) == 1 for p in before.values()), before
    home = {c: next(iter(p)) for c, p in before.items()}
    victim = prefix.backend_by_port(Counter(home.values()).most_common(1)[0][0])
    program = prefix.program(victim)
    prefix.supervisorctl("stop", program)
    try:
        during_result = run_jobs(prefix, jobs, CAP)
        assert not during_result.failed, during_result.summary()
        # A second pass, after nginx marked the victim failed: the same answer.
        again_result = run_jobs(prefix, jobs, CAP)
        assert not again_result.failed, again_result.summary()
    finally:
        prefix.supervisorctl("start", program)
    during, again = homes(during_result, jobs), homes(again_result, jobs)
    orphans = [c for c, port in home.items() if port == victim.port]
    print(f"\nstopped {program}: its {len(orphans)} conversations went to "
          f"{ {c: sorted(during[c]) for c in orphans} }")
    assert orphans
    for c in home:
        assert victim.port not in during[c] | again[c]
        assert len(during[c]) == 1 and during[c] == again[c], (c, during[c], again[c])
        if home[c] != victim.port:
            assert during[c] == {home[c]}, f"conversation {c} moved from a live backend: {home[c]} -> {during[c]}"
    wait_until(lambda: prefix.backend_ready(victim), timeout=30, what=f"{program} healthy again")

    # Once fail_timeout has passed, nginx tries the victim again and its conversations return.
    def returned():
        result = run_jobs(prefix, [j for j in jobs if j[0] in orphans], CAP)
        assert not result.failed, result.summary()
        back = homes(result, [j for j in jobs if j[0] in orphans])
        return all(p == {victim.port} for p in back.values())

    wait_until(returned, timeout=30, interval=0.5, what=f"conversations back on {program}")


def test_hot_prefix_spreads_and_one_hot_key_is_bounded_by_the_cap(prefix):
    prefix.reset_stats()
    # Every conversation shares one 1200-byte system prompt; first user messages differ.
    jobs = conversations(64, 2, tenants=1, hot=True)
    result = run_jobs(prefix, jobs, CAP)
    assert not result.failed, result.summary()
    seen = homes(result, jobs)
    assert all(len(p) == 1 for p in seen.values())
    spread = spread_of(seen)
    mean = 64 / INSTANCES
    print(f"\nhot system prompt, 64 conversations: {dict(sorted(spread.items()))} per backend "
          f"(max/mean {max(spread.values()) / mean:.2f})")
    assert len(spread) == INSTANCES, f"a hot system prompt left backends idle: {dict(spread)}"
    assert max(spread.values()) <= 2 * mean, f"a hot system prompt overloads one backend: {dict(spread)}"

    # Same system prompt AND same first user message ("Hi"): one key for all of them.
    # Below the cap they share one backend (and its cache); at the ring's capacity no
    # backend holds more than its cap, and nothing is dropped.
    system = system_prompt(0)
    hot = [{"model": "m", "max_tokens": 8, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": f"question {i}"}]} for i in range(400)]
    low = run_load(f"{prefix.url}/v1/chat/completions", count=40, concurrency=CAP, body=lambda i: hot[i], deadline=30)
    assert not low.failed and len(low.per_backend) == 1, low.summary()
    prefix.reset_stats()
    high = run_load(f"{prefix.url}/v1/chat/completions", count=len(hot), concurrency=INSTANCES * CAP,
                    body=lambda i: hot[i], deadline=60)
    peaks = {port: s["max_in_flight"] for port, s in prefix.all_stats().items()}
    print(f"one hot key at concurrency {INSTANCES * CAP}: {high.summary()}; peak in flight {peaks}")
    assert not high.failed, high.summary()
    assert len(high.per_backend) == INSTANCES
    assert max(peaks.values()) <= CAP, f"a backend went over its cap {CAP} under one hot key: {peaks}"


@pytest.fixture(scope="module")
def session(module_live_deploy):
    return module_live_deploy({"models": [model_spec("session", session_header="X-Session-ID")]})


def test_session_routing_by_header_then_user_field_then_prefix(session):
    system = system_prompt(1)
    # Header: the same session id sticks whatever the body says.
    by_header = {}
    for sid in range(12):
        result = run_load(f"{session.url}/v1/chat/completions", count=6, concurrency=2,
                          body=lambda i: chat_body(100 + i, i, system_prompt(i)), headers={"X-Session-ID": f"s-{sid}"},
                          deadline=30)
        assert not result.failed, result.summary()
        assert len(result.per_backend) == 1, f"session s-{sid} moved: {result.summary()}"
        by_header[sid] = next(iter(result.per_backend))
    print(f"\n12 sessions by header: {dict(Counter(by_header.values()))}")
    assert len(set(by_header.values())) >= 3
    # The `user` field, no header.
    by_user = {}
    for uid in range(12):
        bodies = [{**chat_body(200 + i, i, system_prompt(i)), "user": f"user-{uid}"} for i in range(6)]
        result = run_load(f"{session.url}/v1/chat/completions", count=6, concurrency=2, body=lambda i: bodies[i],
                          deadline=30)
        assert not result.failed and len(result.per_backend) == 1, f"user-{uid}: {result.summary()}"
        by_user[uid] = next(iter(result.per_backend))
    assert len(set(by_user.values())) >= 3, by_user
    # Neither: the prefix key, so a conversation's turns stick and conversations spread.
    jobs = conversations(24, 3, tenants=6)
    result = run_jobs(session, jobs, CAP)
    assert not result.failed, result.summary()
    seen = homes(result, jobs)
    assert all(len(p) == 1 for p in seen.values()), seen
    assert len(spread_of(seen)) >= 3
    # A completions request with a session header follows the header too.
    result = run_load(f"{session.url}/v1/completions", count=6, concurrency=2, headers={"X-Session-ID": "s-3"},
                      body=lambda i: completion_body(i, i, system), deadline=30)
    assert not result.failed and set(result.per_backend) == {by_header[3]}, result.summary()


@pytest.fixture(scope="module")
def two_models(module_live_deploy):
    models = []
    for name, gpus in (("alpha", [0, 1]), ("beta", [2, 3])):
        models.append({"model": f"org/{name}", "served_model_name": name, "instances": 2, "gpus": gpus,
                       "max_batch_size": CAP, "routing": "prefix", "extra_args": stand_in_args(latency=0.02)})
    return module_live_deploy({"models": models})


def test_routing_by_model_holds_with_prefix_routing(two_models):
    two_models.reset_stats()
    jobs = []
    for name in ("alpha", "beta"):
        # The same conversations for both models: only "model" tells them apart.
        jobs += [(f"{name}/{c}", path, body) for c, path, body in conversations(16, 3, tenants=16, model=name)]
    random.Random(2).shuffle(jobs)
    result = run_jobs(two_models, jobs, CAP)
    assert not result.failed, result.summary()
    wrong = [(jobs[r.index][0], r.model) for r in result.replies if r.model != jobs[r.index][0].split("/")[0]]
    assert not wrong, f"{len(wrong)} replies from the wrong model: {wrong[:5]}"
    seen = homes(result, jobs)
    assert all(len(p) == 1 for p in seen.values()), {c: p for c, p in seen.items() if len(p) != 1}
    stats = two_models.all_stats()
    assert sum(s["misrouted"] for s in stats.values()) == 0
    assert all(stats[b.port]["requests"] > 0 for b in two_models.backends), stats


def test_bodies_made_to_backtrack_are_answered(prefix):
    nasty = [
        # Thousands of messages without a user role: the user regex scans them all once.
        {"model": "m", "messages": [{"role": "assistant", "content": "{[\"" * 50}] * 5000},
        # An unterminated-looking system prompt of escapes and braces, 1 MB.
        {"model": "m", "messages": [{"role": "system", "content": "\\\"{}[]" * 170000},
                                    {"role": "user", "content": "\\" * 100000}]},
        # Many "content" keys in the first object, none followed by a string.
        {"model": "m", "messages": [{"role": "user", **{f"content{i}": i for i in range(20000)}}]},
        {"model": "m", "prompt": [[1, 2, 3]] * 50000},
    ]
    for body in nasty:
        data = json.dumps(body).encode()
        resp = prefix.http.post(f"{prefix.url}/v1/chat/completions", content=data,
                                headers={"Content-Type": "application/json"}, timeout=30)
        assert resp.status_code == 200 and "x-fake-vllm-port" in resp.headers, (len(data), resp.status_code,
                                                                                resp.text[:200])
    log = prefix.nginx_error_log()
    assert "pcre2_match" not in log and "pcre_exec" not in log, log[-2000:]
