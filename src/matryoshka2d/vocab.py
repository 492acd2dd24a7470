"""Every named choice of the library, once: each vocabulary is one ``Literal`` with its tuple of values.

Configs, the CLI's help, the objective, export and the benchmark all read their choices from here, and
:func:`check_choice` is the one check of a value against a vocabulary. Nothing here imports the rest of the
package (or torch), so any layer may use it.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

# ----------------------------------------------------------------------------------- the encoder
PoolingMode = Literal["cls", "mean", "cls_avg", "max", "last"]
POOLING_MODES: tuple[str, ...] = get_args(PoolingMode)

ExitHeadKind = Literal["linear"]
EXIT_HEAD_KINDS: tuple[str, ...] = get_args(ExitHeadKind)
# what a text is, as the Cohere and Voyage embedding APIs ask: a query may take an exit's own query path
InputType = Literal["document", "query"]
INPUT_TYPES: tuple[str, ...] = get_args(InputType)
# how m2d align gives query exits the full exit's space: heads only, heads + LoRA, or (the fair baseline)
# a separately fine-tuned copy of the first n layers
AlignMethod = Literal["head", "lora", "separate"]
ALIGN_METHODS: tuple[str, ...] = get_args(AlignMethod)
# the distance of embedding alignment between an exit and its teacher (1 - cos, or MSE of normalised vectors)
AlignDistance = Literal["cosine", "mse"]
ALIGN_DISTANCES: tuple[str, ...] = get_args(AlignDistance)

# sentence-transformers' Pooling mode names for each of ours (cls_avg = its CLS and mean, averaged by a Dense)
ST_POOLING_MODES: dict[str, tuple[str, ...]] = {
    "mean": ("mean",), "cls": ("cls",), "max": ("max",), "last": ("lasttoken",), "cls_avg": ("cls", "mean"),
}
# sentence-transformers' legacy 1_Pooling/config.json flag of each of its mode names (readable by every version)
ST_POOLING_FLAGS: dict[str, str] = {
    "cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken",
}


def st_pooling_name(mode: str) -> str | None:
    """sentence-transformers' single pooling mode equal to our ``mode``; ``None`` when it takes several."""
    modes = ST_POOLING_MODES.get(mode, ())
    return modes[0] if len(modes) == 1 else None


def pooling_from_st(name: str) -> PoolingMode | None:
    """Our pooling mode for sentence-transformers' mode ``name``; ``None`` when we have no equal one."""
    for ours, modes in ST_POOLING_MODES.items():
        if modes == (name,):
            return ours  # type: ignore[return-value]
    return None


# ----------------------------------------------------------------------------------- training
Strategy = Literal["full", "mrl", "layers", "2dmse", "starbucks", "separate", "dense", "ese"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DepthWeighting = Literal["none", "linear", "log", "rising"]
DEPTH_WEIGHTINGS: tuple[str, ...] = get_args(DepthWeighting)
KLSpace = Literal["coordinates", "batch"]
KL_SPACES: tuple[str, ...] = get_args(KLSpace)
BaseLossName = Literal["cosent", "ibn", "angle", "angle-total"]
BASE_LOSSES: tuple[str, ...] = get_args(BaseLossName)
MixedPrecision = Literal["no", "fp16", "bf16"]
MIXED_PRECISIONS: tuple[str, ...] = get_args(MixedPrecision)
DataKind = Literal["scored", "pairs", "triplets"]
DATA_KINDS: tuple[str, ...] = get_args(DataKind)
ExitHeads = Literal["none", "linear"]  # the training config's choice: no heads, or one of EXIT_HEAD_KINDS
EXIT_HEADS: tuple[str, ...] = get_args(ExitHeads)

# ----------------------------------------------------------------------------------- evaluation, export, bench
Metric = Literal["spearman", "pearson"]
METRICS: tuple[str, ...] = get_args(Metric)
EvalTask = Literal["sts", "retrieval"]  # what an evaluation grid scores: sentence pairs, or queries over a corpus
EVAL_TASKS: tuple[str, ...] = get_args(EvalTask)
StsVariant = Literal["original", "senteval_tok"]  # the STS files as published, or SentEval's tokenised copies
STS_VARIANTS: tuple[str, ...] = get_args(StsVariant)
ExportFormat = Literal["hf", "sentence-transformers", "onnx", "openvino"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)
FORMAT_ALIASES: dict[str, str] = {"st": "sentence-transformers", "sentence_transformers": "sentence-transformers"}
Quantization = Literal["int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
Dtype = Literal["fp32", "bf16", "fp16"]
DTYPE_NAMES: tuple[str, ...] = get_args(Dtype)
# the implementation labels of m2d bench's records: ours, ours under torch.compile, and the peer library
OURS, COMPILED, PEER = "matryoshka2d", "matryoshka2d+compile", "sentence-transformers"
# peers of m2d bench: sentence-transformers on torch (in process) and on its ONNX / OpenVINO backends (in a venv)
Peer = Literal["sentence-transformers", "sentence-transformers:onnx", "sentence-transformers:onnx-int8",
               "sentence-transformers:openvino"]
PEERS: tuple[str, ...] = get_args(Peer)
# our backends in m2d bench: torch (every --dtype), and each exit exported to ONNX / OpenVINO; "-streams": OpenVINO
# with one stream per thread (batches in flight at once) instead of one batch on all threads
Backend = Literal["torch", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-streams",
                  "openvino-bf16-streams"]
BACKENDS: tuple[str, ...] = get_args(Backend)
Attention = Literal["auto", "sdpa", "eager"]
ATTENTIONS: tuple[str, ...] = get_args(Attention)
# the runtime precision of an exported OpenVINO folder (``auto``: bf16 where the CPU runs it natively)
RuntimePrecision = Literal["auto", "f32", "bf16"]
RUNTIME_PRECISIONS: tuple[str, ...] = get_args(RuntimePrecision)

# ----------------------------------------------------------------------------------- search, corpus, serving
IndexType = Literal["flat", "hnsw", "ivf", "sq8", "sq6", "sq4"]  # the shortlist index of a cascade index
INDEX_TYPES: tuple[str, ...] = get_args(IndexType)
RerankDtype = Literal["float32", "float16"]  # storage of a cascade index's rerank vectors
RERANK_DTYPES: tuple[str, ...] = get_args(RerankDtype)
StorageFormat = Literal["float32", "float16", "int8", "binary"]  # the vectors of a corpus's Parquet shards
STORAGE_FORMATS: tuple[str, ...] = get_args(StorageFormat)
CorpusEngine = Literal["local", "ray"]  # this process, or Ray Data
CORPUS_ENGINES: tuple[str, ...] = get_args(CorpusEngine)
Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]  # a served embedding's precision
PRECISIONS: tuple[str, ...] = get_args(Precision)
EncodingFormat = Literal["float", "base64"]  # OpenAI's encoding_format
ENCODING_FORMATS: tuple[str, ...] = get_args(EncodingFormat)
ServeBackend = Literal["torch", "onnx", "openvino"]  # what runs a server's batches ("auto" picks one of them)
SERVE_BACKENDS: tuple[str, ...] = get_args(ServeBackend)
ServeDtype = Literal["fp32", "bf16", "fp16"]  # the served backbone's dtype (a subset of DTYPE_NAMES; fp16 on GPUs)
SERVE_DTYPES: tuple[str, ...] = get_args(ServeDtype)


# ----------------------------------------------------------------------------------- packaging
# pyproject's optional dependencies: ``pip install matryoshka2d`` is the encoder, io, export (hf / st folders)
# and the CLI's inference commands; everything else is one of these
Extra = Literal["train", "plot", "st", "onnx", "openvino", "retrieval", "corpus", "ray", "serve", "dev"]
EXTRAS: tuple[str, ...] = get_args(Extra)


def install_hint(extra: Extra) -> str:
    """The command that installs ``extra``: from this repository's checkout (no release is on an index)."""
    return f"pip install -e '.[{extra}]' in the matryoshka2d repository"


def check_choice(name: str, value: Any, choices: tuple[str, ...], *, fix: str = "") -> str:
    """Return ``value`` if it is one of ``choices``.

    Args:
        name: what the value is, as the user wrote it (``strategy``, ``objective.strategy``, ``--format``).
        value: the value given.
        choices: the vocabulary.
        fix: an extra hint appended to the message.

    Raises:
        ValueError: ``"unknown {name} {value!r}; choose one of a, b, c"``.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}{fix}")
    return value
