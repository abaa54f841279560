"""Request schemas of the OpenAI-compatible API (pydantic), with the vLLM-style extensions users send
(top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, chat_template_kwargs) and a
`thinking` switch for DeepSeek-V4's thinking mode. Unknown fields are ignored, as OpenAI's API does."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    skip_special_tokens: bool = True


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    thinking: bool | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def thinking_enabled(self) -> bool:
        """Thinking mode: `thinking: true` (or {"type": "enabled"}), chat_template_kwargs.thinking /
        enable_thinking, or a reasoning_effort other than "none"."""
        t = self.thinking
        if isinstance(t, dict):
            t = t.get("type") in ("enabled", "enable", True)
        if t is not None:
            return bool(t)
        kw = self.chat_template_kwargs or {}
        for k in ("thinking", "enable_thinking"):
            if k in kw:
                return bool(kw[k])
        return self.reasoning_effort not in (None, "none")
