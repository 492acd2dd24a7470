"""Request and response bodies of the OpenAI-compatible API (they also make the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr

from matryoshka2d.vocab import EncodingFormat, Precision


def json_integer(value: Any) -> Any:
    """JSON's integers: ``3`` and ``3.0`` yes; ``true``, ``"3"`` and ``3.5`` no.

    Raises:
        ValueError: a boolean, a string or a number with a fraction.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(json_integer)]
EmbeddingInput = StrictStr | list[StrictStr] | list[Integer] | list[list[Integer]]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's fields plus the extensions ``layer``, ``precision`` and ``truncate``."""

    model_config = ConfigDict(extra="forbid")

    input: EmbeddingInput = Field(description="a string, a list of strings, a list of token ids or a list of "
                                              "token-id lists (ids without the special tokens, which the "
                                              "server adds)")
    model: StrictStr | None = Field(default=None, description="the served model id (GET /v1/models)")
    dimensions: Integer | None = Field(default=None, description="keep the first `dimensions` coordinates, "
                                                                   "1..D (default: the model's default width)")
    encoding_format: EncodingFormat = Field(
        default="float", description="float: JSON numbers; base64: the little-endian bytes of the array")
    user: StrictStr | None = Field(default=None, description="an end-user id (logged, not used)")
    layer: Integer | None = Field(default=None, description="extension: the exit layer 1..N (default: the "
                                                              "model's default exit); blocks after it never run")
    precision: Precision = Field(default="float32", description="extension: float32, int8, uint8, binary or "
                                                                "ubinary, as sentence-transformers' "
                                                                "quantize_embeddings (int8/uint8 ranges [-1, 1])")
    truncate: StrictBool | None = Field(default=None, description="extension: cut inputs over the model's "
                                                                  "token limit (default: the server's setting)")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the model ran, special tokens included")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorBody


class Status(BaseModel):
    status: str
