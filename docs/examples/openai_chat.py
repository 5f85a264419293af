"""The official `openai` SDK, sync: ask, then read the self-search trace from extension fields.

Run: SSRL_BASE_URL=http://127.0.0.1:8000 SSRL_API_KEY=... python docs/examples/openai_chat.py
"""

import os

import openai

base_url = os.environ.get("SSRL_BASE_URL", "http://127.0.0.1:8000").rstrip("/").removesuffix("/v1")
client = openai.OpenAI(base_url=base_url + "/v1", api_key=os.environ.get("SSRL_API_KEY", "unused"))
model = client.models.list().data[0].id

response = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}],
    temperature=0,
    # ssrl's request extension; the SDK sends extra_body fields as they are.
    extra_body={"self_search": {"policy": "always", "max_turns": 1}},
)
choice = response.choices[0]
trace = choice.model_extra["self_search"]  # the structured trace
reasoning = choice.message.model_extra["reasoning"]  # the whole tagged transcript

print("answer:", choice.message.content)
for search in trace["searches"]:
    entropy = search["entropy"]
    print(
        f"search: {search['query']!r} mean entropy {entropy['mean']:.3f} nats "
        f"-> {search['decision']} ({search['reason']})"
    )
    for doc in search["documents"]:
        print("  document:", doc["title"])
for annotation in choice.message.annotations or []:
    print("citation:", annotation.url_citation.url)
print(f"external calls: {trace['external_calls']}, self-filled: {trace['internal_fills']}")
print("reasoning starts with <search>:", reasoning.startswith("<search>"))
print("usage:", response.usage.total_tokens, "tokens")
