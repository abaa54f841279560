"""Request schemas of the OpenAI-compatible API (pydantic), with the vLLM-style extensions users send
(top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, chat_template_kwargs) and a
`thinking` switch for DeepSeek-V4's thinking mode.

Fields are checked as OpenAI's API checks them: an unknown field is a 400 ("Unrecognized request
argument supplied"), a known OpenAI field this server cannot honour (audio output, predicted outputs,
the legacy `functions`) is a 400 that says so, and only fields that change nothing about the tokens
generated (`user`, `store`, `metadata`, `service_tier`, ...) are accepted and ignored."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


# OpenAI fields accepted and ignored: they change nothing about the tokens generated here
IGNORED_FIELDS = frozenset({"store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                            "safety_identifier", "user"})


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    # known OpenAI fields that would change the output but are not supported: field -> what to do instead
    UNSUPPORTED: ClassVar[dict[str, str]] = {}
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
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None

    def field_error(self) -> tuple[str, str] | None:
        """(field, message) for the first field this server must refuse, or None."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED_FIELDS or (name == "modalities" and value == ["text"]):
                continue
            if name in self.UNSUPPORTED:
                return name, f"{name} is not supported by this server ({self.UNSUPPORTED[name]})"
            return name, f"Unrecognized request argument supplied: {name}"
        return None


class CompletionRequest(_Sampling):
    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "guided_json": "no guided decoding", "guided_regex": "no guided decoding",
        "guided_choice": "no guided decoding", "structured_outputs": "no guided decoding"}
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    skip_special_tokens: bool = True


class ChatCompletionRequest(_Sampling):
    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "functions": "use tools", "function_call": "use tool_choice", "audio": "text output only",
        "modalities": "text output only", "prediction": "no predicted outputs",
        "web_search_options": "no web search", "guided_json": "no guided decoding",
        "guided_regex": "no guided decoding", "guided_choice": "no guided decoding",
        "structured_outputs": "no guided decoding"}
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
