"""The official `openai` SDK, streaming: reasoning deltas, search events, answer, trace, usage.

ssrl streams `delta.reasoning` as the model writes, one `choices[i].self_search` event of type
"search" as soon as a search is decided, answer deltas as `delta.content`, the trace (type
"trace") on the finish chunk, then usage.
"""

import os
import sys

import openai

base_url = os.environ.get("SSRL_BASE_URL", "http://127.0.0.1:8000").rstrip("/").removesuffix("/v1")
client = openai.OpenAI(base_url=base_url + "/v1", api_key=os.environ.get("SSRL_API_KEY", "unused"))
model = client.models.list().data[0].id

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}],
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"self_search": {"policy": "always", "max_turns": 1}},
)
answer = []
for chunk in stream:
    if chunk.usage is not None:
        print("\nusage:", chunk.usage.total_tokens, "tokens")
    for choice in chunk.choices:
        reasoning = (choice.delta.model_extra or {}).get("reasoning")
        if reasoning:
            sys.stdout.write(reasoning)  # the transcript, tags included
        if choice.delta.content:
            answer.append(choice.delta.content)
        event = (choice.model_extra or {}).get("self_search")
        if event and event["type"] == "search":
            search = event["search"]
            print(
                f"\n[search] {search['query']!r} -> {search['decision']}, "
                f"{len(search['documents'])} document(s)"
            )
        elif event and event["type"] == "trace":
            print(
                f"\n[trace] {event['turns']} search(es), {event['external_calls']} external, "
                f"finish_reason={choice.finish_reason}"
            )
print("answer:", "".join(answer))
