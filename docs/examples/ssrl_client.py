"""ssrl's own Python client: typed results and typed stream events, retries built in.

Reads SSRL_BASE_URL and SSRL_API_KEY; the model defaults to the server's first.
"""

from clients.client import AnswerDelta, ReasoningDelta, SearchDecided, SSRLClient, TraceEvent, Usage

with SSRLClient() as client:
    # One answer with its typed trace.
    result = client.chat("Who painted the Mona Lisa?", policy="always", max_turns=1, temperature=0)
    print("answer:", result.answer)
    assert result.trace is not None  # None only against a plain OpenAI-compatible server
    for search in result.trace.searches:
        print(
            f"search: {search.query!r} entropy mean={search.entropy.mean:.3f} "
            f"max={search.entropy.max:.3f} -> {search.decision}"
        )
        for doc in search.documents:
            print("  document:", doc.title, doc.url)
    print("citations:", [c.url for c in result.citations])
    print("usage:", result.usage.total_tokens if result.usage else None, "tokens")

    # The same, streamed as typed events.
    for event in client.stream("Who painted the Mona Lisa?", policy="never", max_turns=1, temperature=0):
        if isinstance(event, ReasoningDelta):
            pass  # event.text: the transcript as it is written
        elif isinstance(event, SearchDecided):
            print(f"stream: search decided {event.record.query!r} -> {event.record.decision}")
        elif isinstance(event, AnswerDelta):
            pass  # event.text: the answer as it is written
        elif isinstance(event, TraceEvent):
            print(f"stream: finished ({event.finish_reason}), {event.trace.turns} search(es)")
        elif isinstance(event, Usage):
            print("stream: usage", event.total_tokens, "tokens")

    # The server as a search engine and as Search-R1's retriever.
    hits = client.search("Mona Lisa", k=2)
    print("search endpoint:", hits.backend, [h.title for h in hits.data])
    docs = client.retrieve(["Mona Lisa", "capital of France"], topk=2)
    print("retrieve:", [[d.title for d in row] for row in docs])
