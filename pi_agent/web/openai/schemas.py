"""The bodies of the OpenAI-compatible API (``/v1``), as pydantic models.

Requests accept and ignore fields they do not know, as OpenAI's API does: SDKs send
``user``, ``metadata``, ``store``, ``logprobs`` and newer fields freely. Responses follow the
Chat Completions wire format to the letter (see shared/protocols/openai-chat.md); they are
dumped with ``exclude_unset``, so an optional field is on the wire only when it was given,
while a field given as None is sent as ``null``.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

# Models in OpenAI's own terms; a name longer than this is not a model name.
MAX_MODEL_CHARS = 200
# The most texts one embeddings request may hold, as in OpenAI's API.
MAX_EMBEDDING_INPUTS = 2048


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    detail: str | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Request):
    name: str
    arguments: str  # a JSON text, in OpenAI's API


class MessageToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(_Request):
    type: Literal["text"]


class JSONObjectFormat(_Request):
    type: Literal["json_object"]


class JSONSchema(_Request):
    name: str
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class JSONSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat,
                           Field(discriminator="type")]


class StreamOptions(_Request):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # Above 64 bits no model server can take it: refused, where a large one is capped.
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**63 - 1)
    max_tokens: int | None = Field(default=None, ge=1, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``. ``input`` is one text or a list of them, read as a list;
    token ids, which OpenAI also takes, are refused: the model server has a tokenizer of its
    own, and the gateway none to turn them back into text."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    input: list[str]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=2**63 - 1)

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        texts = [value] if isinstance(value, str) else value
        if isinstance(texts, list) and any(
                isinstance(t, list) or (isinstance(t, int) and not isinstance(t, bool))
                for t in texts):
            raise ValueError("must be text, not token ids: send the text itself (with "
                             "langchain's OpenAIEmbeddings, check_embedding_ctx_length=False)")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError("must be a string or a list of strings")
        # What OpenAI's API refuses too.
        if not texts or len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"must be 1 to {MAX_EMBEDDING_INPUTS} texts")
        if not all(texts):
            raise ValueError("must not be an empty string")
        return texts


# --- responses -------------------------------------------------------------------------


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ResponseFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[ResponseToolCall] | None = None
    reasoning: str | None = None  # not in OpenAI's API: what Ollama's own /v1 adds


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: CompletionUsage


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class Embedding(BaseModel):
    object: Literal["embedding"]
    embedding: list[float] | str  # a string: base64 of the little-endian float32 values
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError
