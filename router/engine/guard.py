"""Engine calls that are aborted whenever their consumer stops early."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence

from router.engine.base import Engine, EngineDeadError, GenerationDelta, SamplingOptions


async def generate_or_abort(
    engine: Engine,
    prompt: str | Sequence[int],
    options: SamplingOptions,
    request_id: str,
    on_abort: Callable[[], None] | None = None,
) -> AsyncGenerator[GenerationDelta, None]:
    """`engine.generate`, plus an explicit abort when the stream is left unfinished.

    A client that disconnects cancels the task iterating this generator; the engine must
    then stop spending compute on a request nobody reads, whatever the engine does itself.
    """
    finished = False
    stream = engine.generate(prompt, options, request_id)
    try:
        async for delta in stream:
            if delta.finish_reason is not None:
                finished = True
            yield delta
    except EngineDeadError:
        finished = True  # nothing runs on a dead engine: no abort to send or count
        raise
    finally:
        # Close the engine's stream now, not when it is collected: a remote engine's request
        # ends when its HTTP stream is closed (the loop's single pass cuts requests this way).
        close = getattr(stream, "aclose", None)
        try:
            if close is not None:
                await close()
        finally:
            if not finished:
                await engine.abort(request_id)
                if on_abort is not None:
                    on_abort()
