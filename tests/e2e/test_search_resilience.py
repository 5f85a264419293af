"""Search providers end to end: an ssrl router on the real model (through vLLM's own server)
calling loopback fakes of the providers' wire formats, through their failure modes.

The user's request never fails because search did: retries are observed at the provider,
the chain and the self-fill fallback are recorded in the trace and the metrics, the breaker
opens and closes, results are cached, and the provider key appears nowhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from router.tags import extract_last_answer
from tests.conftest import RunningServer, _stop, start_router
from tests.fake_providers import FAKE_KEYS, FAKE_SECRETS, FakeProviders, hang, running_fake, status

SECRET = FAKE_KEYS["serper"]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviders]:
    providers = FakeProviders()
    with running_fake(providers):
        yield providers


@pytest.fixture(scope="module")
def router(upstream, server, fake, tmp_path_factory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("resilience") / "ssrl.log"
    running = start_router(
        upstream,
        server.api_key,
        log,
        "--search",
        "serper",
        "--search-option",
        f"serper.base_url={fake.url('serper')}",
        "--search-option",
        "serper.timeout=1",
        "--search-max-attempts",
        "3",
        "--search-breaker-failures",
        "4",
        "--search-breaker-reset",
        "2",
        "--search-timeout",
        "8",
        env={"SERPER_API_KEY": FAKE_SECRETS["SERPER_API_KEY"]},
    )
    try:
        yield running
    finally:
        _stop(running.process)


@pytest.fixture(autouse=True)
def _reset(fake: FakeProviders) -> None:
    fake.reset()


def search(router: RunningServer, q: str) -> httpx.Response:
    return httpx.get(
        router.base_url + "/v1/search", params={"q": q, "k": 2}, headers=router.auth_headers, timeout=60
    )


def metrics(router: RunningServer) -> str:
    return httpx.get(router.base_url + "/metrics", timeout=10).text


def value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_serper_wire_format_and_documents(router, fake):
    response = search(router, "mona lisa painter")
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["backend"] == "serper" and len(payload["data"]) == 2
    sent = fake.requests_for("serper")[-1]
    assert sent.method == "POST" and sent.json == {"q": "mona lisa painter", "num": 2}
    assert sent.headers["x-api-key"] == SECRET


def test_retries_on_5xx_and_honours_retry_after(router, fake):
    before = metrics(router)
    fake.script(status(503), status(429, retry_after=1), provider="serper")
    response = search(router, "retry me please")
    assert response.status_code == 200, response.text
    assert len(fake.requests_for("serper")) == 3  # two failures, then the answer
    after = metrics(router)
    for reason in ("server_error", "rate_limited"):
        assert (
            value(after, "ssrl_search_retries_total", backend="serper", reason=reason)
            == value(before, "ssrl_search_retries_total", backend="serper", reason=reason) + 1
        )


def test_no_retry_on_401(router, fake):
    fake.script(status(401), provider="serper")
    response = search(router, "unauthorised query")
    assert response.status_code == 502
    assert len(fake.requests_for("serper")) == 1
    assert SECRET not in response.text


def test_failed_search_falls_back_to_self_fill_in_chat(router, fake, model_name):
    # Every attempt of every search fails: the chat still succeeds, filled by the model.
    fake.script(*[status(500)] * 3, provider="serper")
    client = openai.OpenAI(
        base_url=router.base_url + "/v1", api_key=router.api_key, max_retries=0, timeout=120
    )
    before = metrics(router)
    response = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}],
        temperature=0,
        extra_body={"self_search": {"policy": "always"}},
    )
    choice = response.choices[0]
    search_record = choice.model_extra["self_search"]["searches"][0]
    assert search_record["decision"] == "external"
    assert search_record["fallback"] and "500" in search_record["fallback"]
    assert search_record["attempts"] == 3
    assert search_record["information"]  # the model wrote it
    assert choice.model_extra["self_search"]["fallbacks"] == 1
    # The answer is read from this response's own transcript (whatever the model wrote).
    assert choice.message.content == extract_last_answer(choice.message.model_extra["reasoning"])
    assert choice.model_extra["self_search"]["answered"]
    after = metrics(router)
    assert (
        value(after, "ssrl_searches_total", decision="external", outcome="fallback")
        == value(before, "ssrl_searches_total", decision="external", outcome="fallback") + 1
    )


def test_a_read_that_never_finishes_times_out(router, fake):
    fake.script(*[hang(4.0)] * 3, provider="serper")
    response = search(router, "hanging provider")
    assert response.status_code == 502
    assert (
        "timed out" in response.json()["error"]["message"].lower()
        or "transport" in response.json()["error"]["message"].lower()
    )


def recovered(router: RunningServer, query: str) -> httpx.Response:
    """Search until the breaker lets a trial call through and it succeeds (bounded)."""
    for _ in range(60):
        response = search(router, query)
        if response.status_code == 200:
            return response
        time.sleep(0.25)
    return response


def test_breaker_opens_then_closes(router, fake):
    # Earlier tests' failures may have opened it: start from a closed breaker.
    assert recovered(router, "breaker warm-up").status_code == 200
    fake.reset()
    fake.script(*[status(500)] * 6, provider="serper")
    assert search(router, "breaker one").status_code == 502  # 3 attempts
    assert search(router, "breaker two").status_code == 502  # 4th failure opens it
    calls = len(fake.requests_for("serper"))
    assert calls == 4
    refused = search(router, "breaker three")
    assert refused.status_code == 502 and "circuit" in refused.json()["error"]["message"].lower()
    assert len(fake.requests_for("serper")) == calls  # the open breaker sent nothing
    assert value(metrics(router), "ssrl_search_breaker_open", backend="serper") == 1.0
    fake.reset()
    # After the 2 s reset period one trial call goes through, succeeds, and closes it.
    assert recovered(router, "breaker recovered").status_code == 200
    assert value(metrics(router), "ssrl_search_breaker_open", backend="serper") == 0.0


def test_malformed_and_huge_answers_are_failed_searches(router, fake):
    from tests.fake_providers import huge_body, malformed_json

    fake.script(malformed_json(), malformed_json(), malformed_json(), provider="serper")
    assert search(router, "malformed answer").status_code == 502
    fake.script(huge_body(8 * 1024 * 1024), provider="serper")
    assert search(router, "huge answer").status_code == 502


def test_cache_hit_skips_the_provider(router, fake):
    before = metrics(router)
    assert search(router, "Cached Query?").status_code == 200
    first = len(fake.requests_for("serper"))
    again = search(router, "  cached query ")
    assert again.status_code == 200 and again.json()["cache_hit"] is True
    assert len(fake.requests_for("serper")) == first
    after = metrics(router)
    assert (
        value(after, "ssrl_search_cache_total", backend="serper", result="hit")
        >= value(before, "ssrl_search_cache_total", backend="serper", result="hit") + 1
    )


def test_the_key_never_leaks(router, fake):
    fake.script(status(401), provider="serper")  # the fake echoes the key in its 401 body
    texts = [search(router, "leak check").text, metrics(router), router.log_tail(10_000)]
    for text in texts:
        assert SECRET not in text
