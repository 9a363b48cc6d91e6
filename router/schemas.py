"""The parts of OpenAI request bodies that the gateway reads. Every other field passes through untouched."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.errors import InvalidRequest

T = TypeVar("T", bound=BaseModel)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: str = Field(min_length=1)
    content: str | list[Any] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    model: str = Field(min_length=1, examples=["router"])
    messages: list[ChatMessage] = Field(min_length=1, examples=[[{"role": "user", "content": "What is 17*23?"}]])
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Open):
    model: str = Field(min_length=1, examples=["router"])
    prompt: str | list[str] | list[int] | list[list[int]] = Field(examples=["The capital of France is"])
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200, description="x-router-request-id or the completion's id")
    correct: bool | None = None
    score: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _one_rating(self) -> FeedbackRequest:
        if (self.correct is None) == (self.score is None):
            raise ValueError("give exactly one of 'correct' (true/false) or 'score' (0 to 1)")
        return self

    def value(self) -> float:
        return float(self.correct) if self.correct is not None else float(self.score or 0.0)


def parse_body(raw: bytes, schema: type[T]) -> tuple[dict[str, Any], T]:
    """Raw JSON → (the body as a dict, to forward; the fields we read, validated). Bad input → InvalidRequest."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    try:  # the body is re-encoded to be forwarded; orjson refuses nesting deeper than it reads (254 vs 1024)
        orjson.dumps(body)
    except orjson.JSONEncodeError as e:
        raise InvalidRequest(f"request body cannot be forwarded: {e}", code="invalid_json") from e
    try:
        return body, schema.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value") from e
