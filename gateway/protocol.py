"""OpenAI chat-completions request schema, as far as the gateway needs to understand it.

Permissive on input: fields the gateway does not model are kept (`extra="allow"`) and forwarded
to vLLM unchanged, so vLLM's own extensions (top_k, min_p, structured_outputs, ...) work. Strict
where safety depends on it: message roles, content-part types, and the fields that could move or
replace the safety prompt. A parsed `ChatCompletionRequest` is the gateway's one representation of
a request: the upstream body is built from it (`forwarded_fields`, `message_dicts`), never from the
raw JSON. Responses are relayed as vLLM writes them and are not modelled here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Content-part types a client may send. Anything else (notably `prompt_embeds`, `image_embeds`,
# `audio_embeds`, which vLLM decodes with torch.load) is refused: only the gateway sends tensors.
ALLOWED_PART_TYPES = frozenset({"text", "image_url", "input_audio", "video_url", "file", "refusal"})

# Request fields that would let a client change where or whether the safety prompt is applied, or
# hand tensors to vLLM. Refused with 400.
FORBIDDEN_FIELDS = frozenset(
    {
        "prompt_embeds",  # completions-style tensor input
        "chat_template",  # a client template could drop or move the system slot
        "return_token_ids",  # exposes vLLM's internal placeholder ids at soft-prompt positions
        "prompt_logprobs",  # unsupported with prompt embeds
    }
)

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


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
                if part_type not in ALLOWED_PART_TYPES:
                    raise ValueError(
                        f"content part {index} has type {part_type!r}; allowed types: "
                        f"{', '.join(sorted(ALLOWED_PART_TYPES))}"
                    )
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
        """Everything the client sent except `model` and `messages`, which the gateway rewrites."""
        return self.model_dump(exclude={"model", "messages"}, exclude_unset=True)

    def message_dicts(self) -> list[dict[str, Any]]:
        """The client's messages as it sent them (unmodelled fields included), as plain dicts."""
        return [message.model_dump(exclude_unset=True) for message in self.messages]


def iter_texts(value: Any) -> list[str]:
    """Every string anywhere inside a JSON value (used to find the reserved sentinel)."""
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def system_text(message: ChatMessage) -> str:
    """The text of a system message (string content, or its text parts joined by newlines)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.get("text", "") for part in message.content if part.get("type") == "text")
