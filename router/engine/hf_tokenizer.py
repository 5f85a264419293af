"""What both real engines share: a Hugging Face tokenizer and a context length."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

from router.engine.base import PromptTooLongError, Tokenizer


def _token_ids(encoded: Any) -> list[int]:
    """`apply_chat_template(tokenize=True)` returns a list or a BatchEncoding by version."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return list(encoded)


class HFTokenizerEngine:
    """Prompt handling for engines that hold a Hugging Face tokenizer."""

    _tokenizer: Any
    _max_model_len: int

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @cached_property
    def max_chars_per_token(self) -> int:
        """The most characters one token stands for: the longest vocabulary entry (a
        byte-level entry has one character per byte, so this bounds text characters too).
        A prompt longer than `max_model_len` times this cannot fit, whatever it says."""
        vocab = self._tokenizer.get_vocab()
        return max((len(piece) for piece in vocab), default=1)

    @property
    def tokenizer(self) -> Tokenizer:
        tokenizer: Tokenizer = self._tokenizer
        return tokenizer

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        return _token_ids(
            self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True
            )
        )

    def prompt_ids(self, prompt: str | Sequence[int], max_tokens: int) -> list[int]:
        """The prompt as token ids, refused when it and `max_tokens` exceed the context."""
        ids = (
            self._tokenizer.encode(prompt, add_special_tokens=True)
            if isinstance(prompt, str)
            else list(prompt)
        )
        if len(ids) + max_tokens > self._max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self._max_model_len} tokens. "
                f"However, you requested {len(ids) + max_tokens} tokens "
                f"({len(ids)} in the prompt, {max_tokens} in the completion)."
            )
        return ids
