"""Promise: with enable_request_affinity, requests of one shape stick to one backend while it has room.

GLiNER-style `/pooling` bodies: the free text varies, the labels and threshold
make the shape. Under overload the same shape spills to other backends instead
of queueing behind one; different label sets spread over the backends (NOTES.md
warns that hashing short, similar keys can cluster: the spread is printed).
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.harness.deploy import stand_in_args
from tests.harness.load import run_load

pytestmark = pytest.mark.live

CAP = 8
INSTANCES = 4
LABELS = ["person", "organization", "location", "date"]
# Realistic GLiNER label sets: short, similar lists, the case NOTES.md warns about.
LABEL_SETS = [
    ["person", "organization"], ["person", "location"], ["organization", "location"], ["date", "time"],
    ["person", "organization", "location"], ["disease", "drug", "symptom"], ["gene", "protein"],
    ["company", "product"], ["city", "country"], ["email", "phone number"], ["money", "percent"],
    ["event", "date"], ["law", "court"], ["movie", "actor", "director"], ["book", "author"],
    ["team", "player"], ["vehicle", "brand"], ["food", "ingredient"], ["skill", "job title"],
    ["university", "degree"], ["chemical", "reaction"], ["language", "nationality"],
    ["software", "version"], ["address", "postal code"],
]
TEXTS = [
    "Marie Curie worked at the University of Paris.", "Apple opened a store in Berlin on 3 May.",
    "Aspirin relieves headache and fever.", "The court ruled under the new privacy law.",
    "Call +1 555 0100 or mail info@example.com.", "Toyota unveiled a new Corolla in Tokyo.",
]


def gliner_body(text: str, labels: list[str]) -> dict:
    return {"model": "gliner", "data": {"text": text, "labels": labels, "threshold": 0.3}}


@pytest.fixture(scope="module")
def affinity(module_live_deploy):
    return module_live_deploy({"models": [{
        "model": "org/gliner", "served_model_name": "gliner", "instances": INSTANCES, "gpus": [0, 1, 2, 3],
        "max_batch_size": CAP, "enable_request_affinity": True, "extra_args": stand_in_args(latency=0.05),
    }]})


def test_one_shape_sticks_to_one_backend_while_it_has_room(affinity):
    affinity.reset_stats()
    result = run_load(f"{affinity.url}/pooling", count=200, concurrency=CAP // 2,
                      body=lambda i: gliner_body(f"{TEXTS[i % len(TEXTS)]} #{i}", LABELS), deadline=60)
    print(f"\nsame shape, concurrency {CAP // 2}: {result.summary()}")
    assert not result.failed, result.summary()
    assert len(result.per_backend) == 1, f"one shape went to several backends with room to spare: {result.summary()}"


def test_one_shape_spills_to_other_backends_under_overload(affinity):
    affinity.reset_stats()
    result = run_load(f"{affinity.url}/pooling", count=200, concurrency=8 * CAP,
                      body=lambda i: gliner_body(f"{TEXTS[i % len(TEXTS)]} #{i}", LABELS), deadline=60)
    print(f"\nsame shape, concurrency {8 * CAP}: {result.summary()}")
    assert not result.failed, result.summary()
    assert len(result.per_backend) >= 3, f"overload did not spill: {result.summary()}"


def test_label_sets_spread_over_backends(affinity):
    affinity.reset_stats()
    repeats = 3
    bodies = [gliner_body(f"{TEXTS[(i + r) % len(TEXTS)]} #{r}", labels)
              for i, labels in enumerate(LABEL_SETS) for r in range(repeats)]
    # Below every cap, so each request may go where its shape hashes.
    result = run_load(f"{affinity.url}/pooling", count=len(bodies), concurrency=CAP // 2,
                      body=lambda i: bodies[i], deadline=60)
    assert not result.failed, result.summary()
    home: dict[int, set[int]] = {}
    for reply in result.replies:
        home.setdefault(reply.index // repeats, set()).add(reply.backend)
    spread = Counter(next(iter(ports)) for ports in home.values() if len(ports) == 1)
    print(f"\n{len(LABEL_SETS)} label sets over {INSTANCES} backends: "
          f"{dict(sorted(spread.items()))} (label sets per backend)")
    unstable = {tuple(LABEL_SETS[k]): sorted(v) for k, v in home.items() if len(v) != 1}
    assert not unstable, f"label sets that did not stick to one backend: {unstable}"
    assert len(spread) >= 3, f"{len(LABEL_SETS)} label sets clustered on {len(spread)} backend(s): {dict(spread)}"
    assert max(spread.values()) <= len(LABEL_SETS) // 2, f"one backend took most label sets: {dict(spread)}"
