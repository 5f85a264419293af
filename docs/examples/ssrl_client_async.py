"""ssrl's async client: stream one question while another completes."""

import asyncio

from clients.client import AnswerDelta, AsyncSSRLClient, SearchDecided


async def main() -> None:
    async with AsyncSSRLClient() as client:

        async def streamed() -> str:
            answer = []
            async for event in client.stream(
                "Who painted the Mona Lisa?", policy="always", max_turns=1, temperature=0
            ):
                if isinstance(event, SearchDecided):
                    print("async stream: search", repr(event.record.query), "->", event.record.decision)
                elif isinstance(event, AnswerDelta):
                    answer.append(event.text)
            return "".join(answer)

        answer, result = await asyncio.gather(
            streamed(), client.chat("Who painted the Mona Lisa?", policy="never", max_turns=1, temperature=0)
        )
        print("async stream answer:", answer)
        print(
            "async chat answer:", result.answer, "| decisions:", [s.decision for s in result.trace.searches]
        )


asyncio.run(main())
