"""A ``POST /v1/embeddings`` request parsed, checked and tokenised: plain functions, no web framework.

:func:`parse` checks the body's options against the served model (404 for another model, 400 for a layer or
width out of range) and says what to run; :func:`token_rows` checks every input as ``m2d encode`` checks its
texts (:func:`~matryoshka2d.encoder.tokenization.check_texts`: lone surrogates, NUL characters, blank texts)
and turns it into token ids with the special tokens, within the model's token limit. Both raise
:class:`~matryoshka2d.serve.errors.APIError`, so the app only maps it to a response.

:func:`token_rows` may take seconds on a multi-megabyte input, so the app runs it in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from matryoshka2d.encoder.tokenization import TextError, check_texts, tokenize_unpadded
from matryoshka2d.serve.errors import APIError

if TYPE_CHECKING:
    from matryoshka2d.encoder.model import MatryoshkaEncoder
    from matryoshka2d.serve.config import ServeConfig
    from matryoshka2d.serve.schemas import EmbeddingRequest


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's tokens (e.g. ``[CLS]`` and ``[SEP]``).

    Raises:
        ValueError: the tokenizer's special tokens cannot be located around a probe token.
    """
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(probe) + 1):
        if full[start : start + len(probe)] == probe:
            return list(full[:start]), list(full[start + len(probe):])
    raise ValueError("cannot tell where this tokenizer puts its special tokens, so token-id inputs cannot be "
                     "served; use a standard BERT/MPNet/DistilBERT tokenizer")


@dataclass(frozen=True)
class Tokens:
    """What inputs are checked and tokenised against: the model's tokenizer and limits."""

    tokenizer: Any
    max_len: int  # tokens per row, special tokens included
    vocab: int
    prefix: list[int]
    suffix: list[int]
    max_client_batch: int

    @classmethod
    def of(cls, model: MatryoshkaEncoder, max_client_batch: int) -> Tokens:
        """The tokens of ``model`` (its tokenizer, ``max_seq_length`` and special tokens)."""
        prefix, suffix = special_tokens(model.tokenizer)
        return cls(model.tokenizer, model.max_seq_length, len(model.tokenizer), prefix, suffix, max_client_batch)


@dataclass(frozen=True)
class Parsed:
    """A checked request: its inputs (texts or token-id lists, one per row) and what to compute."""

    items: list[str] | list[list[int]]
    layer: int
    route: int  # what the rows run: ``layer`` (the shared path) or ``-layer`` (the exit's own query path)
    dim: int
    truncate: bool
    precision: str
    encoding_format: str


def parse(body: EmbeddingRequest, model: MatryoshkaEncoder, config: ServeConfig) -> Parsed:
    """Check ``body``'s options against the served model and server.

    Raises:
        APIError: 404 another model; 400 a layer or ``dimensions`` out of range, an empty input, more inputs
            than ``max_client_batch``.
    """
    if body.model is not None and body.model != config.model_name:
        raise APIError(404, f"model {body.model!r} does not exist here; this server serves {config.model_name!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")
    try:
        layer = model.check_layer(body.layer)
    except ValueError as e:
        raise APIError(400, str(e), param="layer", code="invalid_layer") from None
    try:
        dim = model.check_dim(body.dimensions)
    except ValueError as e:
        raise APIError(400, str(e).replace("dim ", "dimensions ", 1), param="dimensions",
                       code="invalid_dimensions") from None
    items: Any = body.input
    if isinstance(items, str):
        items = [items]
    if len(items) == 0:
        raise APIError(400, "input is empty: send a string, a non-empty list of strings or of token ids",
                       param="input", code="empty_input")
    if isinstance(items[0], int):
        items = [items]
    if len(items) > config.max_client_batch:
        raise APIError(400, f"input has {len(items)} items, over the limit of {config.max_client_batch} per "
                       "request (--max-client-batch); split it into several requests", param="input",
                       code="too_many_inputs")
    truncate = config.truncate if body.truncate is None else body.truncate
    return Parsed(list(items), layer, query_route(model, layer, body.input_type), dim, truncate, body.precision,
                  body.encoding_format)


def query_route(model: MatryoshkaEncoder, layer: int, input_type: str | None) -> int:
    """``-layer`` for queries at an exit with its own query path (``m2d align``), else ``layer``: documents,
    and queries at an exit that shares the document path, run the shared blocks (as ``encode`` does)."""
    path = model.query_path
    return -layer if input_type == "query" and path is not None and layer in path.layers else layer


def token_rows(items: list[str] | list[list[int]], truncate: bool, tokens: Tokens) -> list[list[int]]:
    """Token ids (special tokens included) of every input, checked against the limits.

    Raises:
        APIError: 400 naming the input's index: a text ``m2d encode`` would refuse, an empty token list, a
            token id outside the vocabulary, or (``truncate`` off) an input over the token limit.
    """
    if isinstance(items[0], str):
        return text_rows(cast("list[str]", items), truncate, tokens)
    return id_rows(cast("list[list[int]]", items), truncate, tokens)


def id_rows(items: list[list[int]], truncate: bool, tokens: Tokens) -> list[list[int]]:
    """Token-id inputs with the special tokens added, checked against the vocabulary and the token limit.

    Raises:
        APIError: 400 naming the input's index.
    """
    rows = []
    specials = len(tokens.prefix) + len(tokens.suffix)
    for i, ids in enumerate(items):
        if len(ids) == 0:
            raise APIError(400, f"input[{i}] is an empty token list; send at least one token id", param="input",
                           code="empty_input")
        bad = next((t for t in ids if not 0 <= t < tokens.vocab), None)
        if bad is not None:
            raise APIError(400, f"input[{i}] holds token id {bad}, out of range: this model's vocabulary has ids "
                           f"0..{tokens.vocab - 1}", param="input", code="invalid_token_id")
        if len(ids) + specials > tokens.max_len:
            if not truncate:
                raise APIError(400, f"input[{i}] has {len(ids) + specials} tokens with the special tokens, over "
                               f"the model's limit of {tokens.max_len}, and truncation is off; shorten it or send "
                               "truncate=true", param="input", code="context_length_exceeded")
            ids = ids[: tokens.max_len - specials]
        rows.append([*tokens.prefix, *ids, *tokens.suffix])
    return rows


def text_rows(texts: list[str], truncate: bool, tokens: Tokens) -> list[list[int]]:
    """Token ids of ``texts``, checked as ``m2d encode`` checks its texts.

    Raises:
        APIError: 400 naming the input's index.
    """
    try:
        check_texts(texts, name="input", blank=False)
    except TextError as e:
        raise APIError(400, str(e), param="input", code="invalid_input") from None
    max_len = tokens.max_len
    rows = tokenize_unpadded(tokens.tokenizer, texts, max_len if truncate else max_len + 1).input_ids
    if not truncate:
        for i, ids in enumerate(rows):
            if len(ids) > max_len:
                raise APIError(400, f"input[{i}] has more than {max_len} tokens, the model's limit, and truncation "
                               "is off; shorten it or send truncate=true", param="input",
                               code="context_length_exceeded")
    return [list(ids) for ids in rows]
