"""The self-search loop end to end: the real default model on vLLM, the default local index,
through the official `openai` SDK and raw SSE."""

from __future__ import annotations

import json
import re

import pytest

QUESTION = "Who painted the Mona Lisa?"


def ask(client, model: str, policy: str | None = None, **kwargs):
    extra = {"self_search": {"policy": policy}} if policy else {}
    extra.update(kwargs.pop("extra_body", {}))
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        extra_body=extra,
        **kwargs,
    )


def trace_of(choice) -> dict:
    trace = choice.model_extra.get("self_search")
    assert trace is not None, "self-search trace missing from the choice"
    return trace


def last_answer(transcript: str) -> str | None:
    found = re.findall(r"<answer>(.*?)</answer>", transcript, flags=re.S)
    return found[-1].strip() if found else None


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_forced_external_search_inserts_documents_and_citations(openai_client, model_name):
    response = ask(openai_client, model_name, "always")
    choice = response.choices[0]
    trace = trace_of(choice)
    searches = trace["searches"]
    assert len(searches) == 1
    search = searches[0]
    assert search["query"], "the model wrote no query"
    assert search["decision"] == "external" and search["fallback"] is None
    assert search["backend"] == "local"
    assert 1 <= len(search["documents"]) <= 3
    for doc in search["documents"]:
        assert doc["title"] and doc["snippet"]
        assert doc["url"].startswith("https://en.wikipedia.org/wiki/")
    assert trace["external_calls"] == 1 and trace["internal_fills"] == 0 and trace["turns"] == 1

    reasoning = choice.message.model_extra["reasoning"]
    assert reasoning.startswith("<search>")
    assert "<information>Doc 1(Title: " + search["documents"][0]["title"] in reasoning
    assert reasoning.count("</information>") == 1
    assert choice.message.content == last_answer(reasoning)

    urls = [a.url_citation.url for a in choice.message.annotations]
    assert urls == [d["url"] for d in search["documents"]]
    assert all(a.type == "url_citation" for a in choice.message.annotations)

    entropy = search["entropy"]
    assert entropy["tokens"] >= 1 and len(entropy["per_token"]) == entropy["tokens"]
    assert entropy["max"] >= entropy["mean"] >= 0
    assert 0 < entropy["min_prob"] <= 1
    assert entropy["kind"] in ("exact", "topk_lower_bound")


def test_forced_internal_search_is_self_filled(openai_client, model_name):
    response = ask(openai_client, model_name, "never")
    choice = response.choices[0]
    trace = trace_of(choice)
    search = trace["searches"][0]
    assert search["decision"] == "internal" and search["documents"] == []
    assert trace["external_calls"] == 0 and trace["internal_fills"] == 1
    reasoning = choice.message.model_extra["reasoning"]
    # The model wrote the information block itself: it is in the transcript, between the tags.
    block = re.search(r"<information>(.*?)</information>", reasoning, flags=re.S)
    assert block is not None and block.group(1).strip() == search["information"]
    assert not choice.message.annotations


def test_usage_sums_every_engine_call(openai_client, model_name):
    plain = openai_client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=8,
        extra_body={"self_search": {"enabled": False}},
    )
    looped = ask(openai_client, model_name, "never")
    # Query, information and answer are three engine calls, each re-reading a longer prompt.
    assert looped.usage.prompt_tokens > 3 * plain.usage.prompt_tokens
    assert looped.usage.completion_tokens >= 3
    assert looped.usage.total_tokens == looped.usage.prompt_tokens + looped.usage.completion_tokens


def test_disabled_self_search_is_plain_generation(openai_client, model_name):
    response = openai_client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=12,
        extra_body={"self_search": {"enabled": False}},
    )
    choice = response.choices[0]
    assert "self_search" not in (choice.model_extra or {})
    assert "<search>" not in (choice.message.content or "")


def test_stream_matches_non_stream(openai_client, model_name):
    reference = ask(openai_client, model_name, "always").choices[0]
    stream = ask(openai_client, model_name, "always", stream=True, stream_options={"include_usage": True})
    reasoning, content, events, usage = [], [], [], None
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        extra = choice.delta.model_extra or {}
        if extra.get("reasoning"):
            reasoning.append(extra["reasoning"])
        if choice.delta.content:
            content.append(choice.delta.content)
        if (choice.model_extra or {}).get("self_search"):
            events.append((choice.model_extra["self_search"], choice.finish_reason))
    assert "".join(reasoning) == reference.message.model_extra["reasoning"]
    assert "".join(content) == reference.message.content
    kinds = [e["type"] for e, _ in events]
    assert kinds == ["search", "trace"]
    assert events[0][0]["search"]["query"] == trace_of(reference)["searches"][0]["query"]
    assert events[1][1] == reference.finish_reason
    assert usage is not None and usage.completion_tokens > 0


def test_raw_sse_search_event_arrives_before_its_information(http, auth_headers, model_name):
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "stream": True,
        "self_search": {"policy": "always"},
    }
    seen_search_event = False
    information_before_event = False
    lines = []
    with http.stream("POST", "/v1/chat/completions", json=body, headers=auth_headers) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            lines.append(line)
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            for choice in chunk["choices"]:
                if choice.get("self_search", {}).get("type") == "search":
                    seen_search_event = True
                text = choice["delta"].get("reasoning") or ""
                if "<information>" in text and not seen_search_event:
                    information_before_event = True
    assert lines[-1] == "data: [DONE]"
    assert seen_search_event and not information_before_event


def test_two_choices_run_independent_loops(openai_client, model_name):
    response = openai_client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": QUESTION}],
        n=2,
        temperature=0.8,
        seed=7,
        extra_body={"self_search": {"policy": "never"}},
    )
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        trace = trace_of(choice)
        assert trace["turns"] == 1
        assert choice.message.content == last_answer(choice.message.model_extra["reasoning"])
    single = ask(openai_client, model_name, "never")
    assert response.usage.prompt_tokens > single.usage.prompt_tokens


def test_majority_vote_reports_every_sample(openai_client, model_name):
    response = ask(openai_client, model_name, "never", extra_body={"self_search": {"votes": 3}}, seed=3)
    trace = trace_of(response.choices[0])
    vote = trace["vote"]
    assert vote["votes"] == 3 and len(vote["samples"]) == 3
    assert sum(vote["counts"].values()) == 3
    assert vote["samples"][vote["winner"]]["answer"] == response.choices[0].message.content


def test_search_metrics_count_decisions(http, auth_headers, openai_client, model_name):
    before = http.get("/metrics").text
    ask(openai_client, model_name, "always")
    ask(openai_client, model_name, "never")
    after = http.get("/metrics").text
    for decision, outcome in (("external", "ok"), ("internal", "self_filled")):
        delta = metric_value(after, "ssrl_searches_total", decision=decision, outcome=outcome) - metric_value(
            before, "ssrl_searches_total", decision=decision, outcome=outcome
        )
        assert delta >= 1, (decision, outcome)
    assert metric_value(after, "ssrl_query_entropy_nats_count", decision="external") >= 1
    assert metric_value(after, "ssrl_search_turns_per_request_count") > metric_value(
        before, "ssrl_search_turns_per_request_count"
    )


@pytest.mark.parametrize(
    "extension, param",
    [
        ({"policy": "bogus"}, "self_search.policy"),
        ({"max_turns": 99}, "self_search.max_turns"),
        ({"unknown": 1}, "self_search.unknown"),
        ({"threshold": "abc"}, "self_search.threshold"),
    ],
)
def test_invalid_extension_is_a_400(http, auth_headers, model_name, extension, param):
    body = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "self_search": extension}
    response = http.post("/v1/chat/completions", json=body, headers=auth_headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]
