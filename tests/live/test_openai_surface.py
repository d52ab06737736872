"""Promise (issue 16): the OpenAI/vLLM surface through the dispatcher (stand-ins; tests/vllm repeats it on real vLLM).

- every path vLLM 0.32 lists in its /openapi.json (tests/fixtures/vllm-openapi)
  either reaches a backend of the model the body names, or gets a clear JSON answer;
- /v1/models and /v1/models/{id} give vLLM's model card, max_model_len included
  when vfgen knows it (--max-model-len, or the model's local config.json);
- /tokenize and /detokenize route by model; /metrics names each instance's /metrics.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest

from tests.harness.deploy import assert_json_error, stand_in_args
from tests.harness.openai_surface import check_every_path

pytestmark = pytest.mark.live

UNICODE = "gämma/模型"


@pytest.fixture(scope="module")
def surface(module_live_deploy, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("local-model")
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "max_position_embeddings": 384}))
    return module_live_deploy({"models": [
        {"model": "org/gen", "served_model_name": "gen", "aliases": ["org/gen-v1", UNICODE], "max_model_len": 1024,
         "instances": 2, "gpus": [0, 1], "extra_args": stand_in_args()},
        {"model": str(model_dir), "name": "pool", "served_model_name": "pool", "instances": 1, "gpus": [1],
         "extra_args": stand_in_args()},
    ]})


def test_every_vllm_path_routes_or_gets_a_clear_json_answer(surface):
    problems = check_every_path(surface, {"gen": "generate", "pool": "pooling", UNICODE: "generate"})
    assert not problems, "\n".join(problems)


def test_models_list_is_vllms_card_with_max_model_len(surface):
    before = int(time.time())
    resp = surface.http.get(f"{surface.url}/v1/models")
    after = int(time.time())
    assert resp.status_code == 200
    cards = {m["id"]: m for m in resp.json()["data"]}
    assert sorted(cards) == sorted(["gen", "org/gen-v1", UNICODE, "pool"])
    assert cards["gen"]["max_model_len"] == 1024 and cards[UNICODE]["max_model_len"] == 1024  # --max-model-len
    assert cards["pool"]["max_model_len"] == 384  # from the local config.json
    for card in cards.values():
        assert card["object"] == "model" and card["owned_by"] == "vllm" and card["parent"] is None
        assert before <= card["created"] <= after  # the request time, as vLLM gives it


@pytest.mark.parametrize("name", ["gen", "org/gen-v1", UNICODE, "pool"])
def test_models_retrieve_gives_the_card_of_each_served_name(surface, name):
    resp = surface.http.get(f"{surface.url}/v1/models/{quote(name)}")
    assert resp.status_code == 200, resp.text
    card = resp.json()
    assert card["id"] == name and card["object"] == "model"
    listed = {m["id"]: m for m in surface.http.get(f"{surface.url}/v1/models").json()["data"]}[name]
    assert {k: v for k, v in card.items() if k != "created"} == {k: v for k, v in listed.items() if k != "created"}


@pytest.mark.parametrize("path", ["/v1/models/gpt-4", "/v1/models/gen/extra", "/v1/models/GEN", "/v1/models/"])
def test_models_retrieve_of_an_unknown_id_is_not_found(surface, path):
    resp = surface.http.get(f"{surface.url}{path}")
    error = assert_json_error(resp.status_code, resp.headers, resp.content, 404)
    assert "gen, org/gen-v1" in error["message"], error


@pytest.mark.parametrize("name", ["gen", UNICODE, "pool"])
def test_tokenize_and_detokenize_route_by_model(surface, name):
    for path, body in (("/tokenize", {"model": name, "prompt": "a b c"}), ("/detokenize", {"model": name, "tokens": [1, 2]})):
        resp = surface.http.post(f"{surface.url}{path}", json=body)
        assert resp.status_code == 200, (path, resp.text)
        backend = surface.backend_by_port(int(resp.headers["x-fake-vllm-port"]))
        assert backend.served_name == ("pool" if name == "pool" else "gen"), (path, name, backend)
    assert sum(s["misrouted"] for s in surface.all_stats().values()) == 0


def test_metrics_names_every_instances_metrics(surface):
    resp = surface.http.get(f"{surface.url}/metrics")
    error = assert_json_error(resp.status_code, resp.headers, resp.content, 404)
    for b in surface.backends:
        assert f"{b.url}/metrics" in error["message"], error
    assert "/nginx_status" in error["message"]
