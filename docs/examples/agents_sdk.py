"""An agent framework on ssrl: the OpenAI Agents SDK (`pip install openai-agents`) through its
Chat Completions model, with ssrl's routing options in `ModelSettings.extra_body`.

The Agents SDK converts responses into its own items, so the self-search trace is not on
`result`; read it with the `openai` SDK or ssrl's client when you need it.
"""

import os

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
from openai import AsyncOpenAI, OpenAI

set_tracing_disabled(True)  # the SDK's tracing would upload to OpenAI

base_url = os.environ.get("SSRL_BASE_URL", "http://127.0.0.1:8000").rstrip("/").removesuffix("/v1")
api_key = os.environ.get("SSRL_API_KEY", "unused")
with OpenAI(base_url=base_url + "/v1", api_key=api_key) as sync_client:
    model_name = sync_client.models.list().data[0].id  # the server's model
client = AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key)

agent = Agent(
    name="researcher",
    instructions="Answer the question briefly.",
    model=OpenAIChatCompletionsModel(model=model_name, openai_client=client),
    model_settings=ModelSettings(
        temperature=0, extra_body={"self_search": {"policy": "always", "max_turns": 1}}
    ),
)
result = Runner.run_sync(agent, "Who painted the Mona Lisa?")
print("agent answer:", result.final_output)
