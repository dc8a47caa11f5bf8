"""OpenAI request bodies, validated strictly.

Strict on purpose: a wrong type (``"max_tokens": "10"``) or an unknown parameter
(``"max_token": 10``, ``"logprobs": 5``) is a 400 naming the field, never silently ignored — a
client that believes it asked for something must learn that it did not get it. Parameters
OpenAI defines that this server does not implement are unknown parameters here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Temperature = Annotated[StrictFloat | StrictInt, Field(ge=0.0, le=2.0)]
TopP = Annotated[StrictFloat | StrictInt, Field(gt=0.0, le=1.0)]
TokenId = Annotated[StrictInt, Field(ge=0)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
#: Stop strings: at most MAX_STOPS of at most MAX_STOP_CHARS characters each. The engine
#: checks every stop at every token; unbounded, 16 stops of 60 KB cost 0.095 s per token on
#: the engine thread, for every sequence in the batch.
MAX_STOPS = 16
MAX_STOP_CHARS = 256
StopString = Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class SamplingFields(_Strict):
    """Fields shared by both endpoints (OpenAI's, plus vLLM's ``top_k``, ``ignore_eos`` and
    ``stop_token_ids``)."""

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = -1
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    ignore_eos: StrictBool = False
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class CompletionRequest(SamplingFields):
    prompt: StrictStr | Annotated[list[TokenId], Field(min_length=1)] | Annotated[
        list[StrictStr], Field(min_length=1, max_length=64)] | Annotated[
        list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=64)]


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    add_generation_prompt: StrictBool = True
