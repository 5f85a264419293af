"""Native mode on a model that writes the tags itself: the shipped adapter `smollm2-135m-ssrl`.

The session server serves it beside the embedded instruct model (vLLM's LoRA path). Native
mode inserts nothing before the model's first token and writes no opening tag: the model
opens `<search>` and writes its query; at `</search>` the loop decides on the entropy of those
query tokens, read from the stream of the same request, and either reads on while the model
writes its own `<information>` (one engine request for the whole trajectory), or aborts the
request, inserts documents and resumes with one new request; the model opens `<answer>`. Each
test reads one response (the engine is not deterministic across requests).
"""

from __future__ import annotations

import pytest

from router.engine.adapters import EMBEDDED_ADAPTER_NAME
from router.tags import extract_last_answer
from tests.e2e.test_self_search import StreamRead, information_blocks, search_queries, trace_of

pytestmark = pytest.mark.engine

NATIVE = EMBEDDED_ADAPTER_NAME
QUESTION = "Who painted the Mona Lisa?"


def ask(client, policy: str | None = None, **kwargs):
    self_search = {"policy": policy} if policy else {}
    self_search.update(kwargs.pop("self_search", {}))
    return client.chat.completions.create(
        model=NATIVE,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=200,
        extra_body={"self_search": self_search} if self_search else None,
        **kwargs,
    )


def test_models_lists_the_adapter_with_the_instruct_model_as_parent(openai_client, model_name):
    cards = {m.id: m for m in openai_client.models.list().data}
    assert NATIVE in cards
    assert cards[NATIVE].model_extra["parent"] == model_name
    assert cards[model_name].model_extra.get("parent") is None


def test_self_filled_search_is_written_by_the_model(openai_client):
    response = ask(openai_client, "never")
    assert response.model == NATIVE
    choice = response.choices[0]
    trace = trace_of(choice)
    reasoning = choice.message.model_extra["reasoning"]
    # Nothing precedes the model's own first token in native mode: it opened the search.
    assert reasoning.startswith("<search>"), reasoning[:200]
    (search, *_) = trace["searches"]
    assert search["decision"] == "internal" and search["documents"] == []
    assert search_queries(reasoning)[0] == search["query"] and "\n" not in search["query"]
    # The block between the tags is the model's own text, as the trace reports it.
    blocks = information_blocks(reasoning)
    assert blocks and blocks[0].strip() == search["information"] and search["information"]
    assert trace["answered"], trace["notes"]
    assert choice.message.content == extract_last_answer(reasoning)
    # The single pass: the model wrote its query, its block and its answer in one request.
    assert trace["engine_requests"] == 1, trace
    # Entropy was read on the query's own tokens: one value per token.
    entropy = search["entropy"]
    assert entropy["tokens"] >= 1 and len(entropy["per_token"]) == entropy["tokens"]


def test_external_search_inserts_documents_after_the_models_query(openai_client):
    response = ask(openai_client, "always")
    choice = response.choices[0]
    trace = trace_of(choice)
    search = trace["searches"][0]
    assert search["decision"] == "external" and search["fallback"] is None
    reasoning = choice.message.model_extra["reasoning"]
    assert reasoning.startswith("<search>")
    # The embedded adapter reads one short document, as it was trained to.
    assert len(search["documents"]) == 1
    assert information_blocks(reasoning)[0] == search["information"]
    assert search["information"].startswith("Doc 1(Title: ")
    # One request up to the query, one more after the documents per external search.
    assert trace["engine_requests"] == 1 + trace["external_calls"], trace
    assert [a.url_citation.url for a in choice.message.annotations] == [d["url"] for d in search["documents"]]


def test_threshold_policy_decides_on_the_query_entropy(openai_client):
    for tau in (0.0, 1e6):
        trace = trace_of(
            ask(openai_client, "threshold", self_search={"threshold": tau, "aggregate": "max"}).choices[0]
        )
        for search in trace["searches"]:
            expected = "external" if search["entropy"]["max"] > tau else "internal"
            assert search["decision"] == expected, (tau, search)


def test_stream_reassembles_into_its_trace(openai_client):
    read = StreamRead(ask(openai_client, "never", stream=True, stream_options={"include_usage": True}))
    assert read.models == {NATIVE}
    transcript, events = read.transcript, [event for event, _ in read.events]
    trace = events[-1]
    assert trace["type"] == "trace" and [e["type"] for e in events[:-1]] == ["search"] * len(
        trace["searches"]
    )
    assert search_queries(transcript) == [s["query"] for s in trace["searches"]]
    assert [b.strip() for b in information_blocks(transcript)] == [
        s["information"] for s in trace["searches"]
    ]
    assert read.content == extract_last_answer(transcript)


def test_the_native_prompt_has_no_worked_examples(openai_client, model_name):
    native = ask(openai_client, "never", self_search={"max_turns": 1})
    guided = openai_client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=200,
        extra_body={"self_search": {"policy": "never", "max_turns": 1}},
    )
    # Usage counts every engine call's prompt; the native trajectory's protocol prompt is the
    # short instruction alone, guided mode's carries six worked exchanges.
    assert native.usage.protocol_prompt_tokens * 4 < guided.usage.protocol_prompt_tokens
