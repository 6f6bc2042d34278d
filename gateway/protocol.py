"""OpenAI chat-completions request schema, as far as the gateway needs to understand it.

Strict where safety depends on it: message roles, content-part types, and which unmodelled fields
may reach vLLM. Fields the gateway does not model are kept (`extra="allow"`) but only those on an
allow-list are forwarded (`FORWARDED_EXTRA_FIELDS`, plus what an operator enables per model); the
fields that could move, cut or replace the safety prompt or hand tensors to vLLM
(`FORBIDDEN_FIELDS`) can never be enabled. A parsed `ChatCompletionRequest` is the gateway's one
representation of a request: the upstream body is built from it (`forwarded_fields`,
`message_dicts`), never from the raw JSON. Responses are relayed as vLLM writes them and are not
modelled here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Content-part types a client may send. Anything else (notably `prompt_embeds`, `image_embeds`,
# `audio_embeds`, which vLLM decodes with torch.load) is refused: only the gateway sends tensors.
ALLOWED_PART_TYPES = frozenset({"text", "image_url", "input_audio", "video_url", "file", "refusal"})

# Unmodelled request fields that are forwarded to vLLM (vLLM's ChatCompletionRequest, 0.32): the
# OpenAI chat fields and vLLM's sampling extensions that shape the answer but cannot move, cut or
# replace the safety prompt. Anything else is refused with 400 naming the field, unless the model's
# `allowed_extra_fields` enables it (e.g. `logit_bias`, refused by default because it can suppress
# refusal tokens and skew the refusal metric).
FORWARDED_EXTRA_FIELDS = frozenset(
    {
        # OpenAI
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "top_logprobs",
        "stop",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        "metadata",  # ignored by vLLM; OpenAI clients may send it
        "store",  # ignored by vLLM; OpenAI clients may send it
        # vLLM sampling and output extensions
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "structured_outputs",
        "include_reasoning",
        "thinking_token_budget",
    }
)

# Fields that change where or whether the safety prompt is applied, or hand tensors to vLLM. Refused
# with 400 and never enabled by configuration.
FORBIDDEN_FIELDS = frozenset(
    {
        "prompt_embeds",  # completions-style tensor input
        "chat_template",  # a client template could drop or move the system slot
        "chat_template_kwargs",  # template variables: can drop the system slot or the generation prompt
        "continue_final_message",  # the client writes the start of the answer ("Sure, here are the steps")
        "add_generation_prompt",  # with it off, the model continues the client's text, not an answer
        "add_special_tokens",  # changes the tokens around the trained soft-prompt positions
        "truncate_prompt_tokens",  # keeps only the last N tokens: cuts the safety prompt away
        "truncation_side",
        "return_token_ids",  # exposes vLLM's internal placeholder ids at soft-prompt positions
        "prompt_logprobs",  # unsupported with prompt embeds
    }
)

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
# Roles that instruct the model with system authority (OpenAI's `developer` replaces `system` for
# newer models): the system-message policy applies to every message with one of them.
SYSTEM_ROLES = frozenset({"system", "developer"})


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _check_parts(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(value, list):
            for index, part in enumerate(value):
                part_type = part.get("type")
                # The type must be a string before the set lookup: a list is unhashable (a 500).
                if not isinstance(part_type, str) or part_type not in ALLOWED_PART_TYPES:
                    raise ValueError(
                        f"content part {index} has type {part_type!r}; allowed types: "
                        f"{', '.join(sorted(ALLOWED_PART_TYPES))}"
                    )
                if part_type == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {index} has type 'text' but no string 'text'")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    user: str | None = Field(default=None, max_length=256)

    @property
    def wants_usage(self) -> bool:
        """The client asked for the usage chunk at the end of a stream."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def forwarded_fields(self) -> dict[str, Any]:
        """Everything the client sent except `model` and `messages`, which the gateway rewrites.

        Unmodelled fields are included as sent: `gateway.safety.check_extra_fields` refuses the
        ones not allowed before the body is built."""
        return self.model_dump(exclude={"model", "messages"}, exclude_unset=True)

    def extra_field_names(self) -> list[str]:
        """The unmodelled top-level fields the client sent, sorted."""
        return sorted(self.model_extra or {})

    def message_dicts(self) -> list[dict[str, Any]]:
        """The client's messages as it sent them (unmodelled fields included), as plain dicts."""
        return [message.model_dump(exclude_unset=True) for message in self.messages]


def iter_strings(value: Any) -> list[str]:
    """Every string anywhere inside a JSON value, dict keys included (to find the reserved sentinel:
    a key such as a tool schema's property name reaches the chat template too)."""
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            found.extend(key for key in item if isinstance(key, str))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def text_parts(content: str | list[dict[str, Any]] | None) -> list[str]:
    """The texts of a message's content: the string itself, or each text part's text in order."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    return [part["text"] for part in content if part.get("type") == "text" and isinstance(part.get("text"), str)]
