"""Request and response bodies of the OpenAI-compatible API (they also make the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr

from matryoshka2d.vocab import EncodingFormat, InputType, Precision


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
    """``POST /v1/embeddings``: OpenAI's fields plus the extensions ``layer``, ``precision``, ``truncate`` and
    ``input_type``."""

    model_config = ConfigDict(extra="forbid")

    input: EmbeddingInput = Field(description="a string, a list of strings, a list of token ids or a list of "
                                              "token-id lists (ids without the special tokens, which the "
                                              "server adds)")
    model: StrictStr | None = Field(default=None, description="the served model id (GET /v1/models)")
    dimensions: Integer | None = Field(default=None, description="keep the first `dimensions` coordinates, "
                                                                   "1..D (default: the model's default width)")
    encoding_format: EncodingFormat = Field(
        default="float", description="float: JSON numbers; base64: the little-endian float32 bytes of each "
                                     "vector (quantised codes as float32 numbers), as OpenAI's clients decode")
    user: StrictStr | None = Field(default=None, description="an end-user id (logged, not used)")
    layer: Integer | None = Field(default=None, description="extension: the exit layer 1..N (default: the "
                                                              "model's default exit); blocks after it never run")
    precision: Precision = Field(default="float32", description="extension: float32, int8, uint8, binary or "
                                                                "ubinary, as sentence-transformers' "
                                                                "quantize_embeddings (int8/uint8 ranges [-1, 1])")
    truncate: StrictBool | None = Field(default=None, description="extension: cut inputs over the model's "
                                                                  "token limit (default: the server's setting)")
    input_type: InputType | None = Field(
        default=None, description="extension, as Cohere's and Voyage's APIs: query takes the own query path of "
                                  "an exit aligned by m2d align (GET /info: document_space), so shallow queries "
                                  "search the index built at the document exit; document (the default) takes "
                                  "the shared path, what an index holds")


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
    param: str | None = Field(default=None, description="the request field at fault, or null")
    code: str = Field(description="a machine-readable code, e.g. invalid_layer, empty_input, queue_full")


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorBody


class Status(BaseModel):
    status: str


TEXT_PATTERN = r"^[^\x00]*[^\s\x00][^\x00]*$"  # what check_texts(blank=False) accepts: no NUL, not blank


def tighten_schema(properties: dict[str, Any], *, layers: int, dims: int, vocab: int, max_items: int) -> None:
    """Write this model's bounds into the ``EmbeddingRequest`` JSON schema (layer 1..N, dimensions 1..D, token
    ids 0..vocab-1, non-empty inputs, at most ``max_items`` of them, texts with a visible character and no NUL),
    so the schema says what the server accepts.
    """
    text, texts, ids, id_lists = properties["input"]["anyOf"]
    text.update(minLength=1, pattern=TEXT_PATTERN)
    texts.update(minItems=1, maxItems=max_items)
    texts["items"].update(minLength=1, pattern=TEXT_PATTERN)
    token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    ids.update(minItems=1, items=dict(token))
    id_lists.update(minItems=1, maxItems=max_items, items={"type": "array", "minItems": 1, "items": dict(token)})
    for name, upper in (("layer", layers), ("dimensions", dims)):
        for option in properties[name]["anyOf"]:
            if option.get("type") == "integer":
                option.update(minimum=1, maximum=upper)
