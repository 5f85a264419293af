"""The official `openai` SDK, async: two routing policies side by side, concurrently."""

import asyncio
import os

import openai


async def main() -> None:
    base_url = os.environ.get("SSRL_BASE_URL", "http://127.0.0.1:8000").rstrip("/").removesuffix("/v1")
    async with openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key=os.environ.get("SSRL_API_KEY", "unused")
    ) as client:
        model = (await client.models.list()).data[0].id

        async def ask(policy: str):
            return await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Who painted the Mona Lisa?"}],
                temperature=0,
                extra_body={"self_search": {"policy": policy, "max_turns": 1}},
            )

        for policy, response in zip(
            ("always", "never"), await asyncio.gather(ask("always"), ask("never")), strict=False
        ):
            choice = response.choices[0]
            trace = choice.model_extra["self_search"]
            decisions = [s["decision"] for s in trace["searches"]]
            print(f"policy {policy}: decisions {decisions}, answer {choice.message.content!r}")


asyncio.run(main())
