"""The settings that decide the output of a corpus encode: :class:`CorpusJob` (recorded in ``run.json``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matryoshka2d.corpus.readers import CorpusReader, resolve_inputs
from matryoshka2d.corpus.shards import Exit, StorageFormat, check_format, parse_exits
from matryoshka2d.io.manifest import file_sha256
from matryoshka2d.vocab import INPUT_TYPES, InputType, check_choice

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusJob:
    """Everything that decides the output of a corpus encode (recorded in ``run.json``).

    The engine, workers and threads are not part of it: they change the speed, not the output.
    """

    model: str
    inputs: tuple[str, ...]
    exits: tuple[Exit, ...]
    format: StorageFormat = "float32"
    normalize: bool = True
    id_column: str | None = None
    text_column: str | None = None
    skip_empty: bool = False
    shard_size: int = 100_000
    batch_size: int = 64
    pooling: str | None = None
    trust_remote_code: bool = False
    input_type: InputType = "document"  # "query": the own query path of exits aligned by m2d align
    input_sizes: tuple[int, ...] = field(default=())
    input_sha256: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see :meth:`from_dict`)."""
        d = asdict(self)
        d["inputs"] = self.input_records()
        d.pop("input_sizes")
        d.pop("input_sha256")
        d["exits"] = [[e.layer, e.dim] for e in self.exits]
        if d["input_type"] == "document":  # the default is left out, so records written before it still resume
            d.pop("input_type")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusJob:
        """Inverse of :meth:`to_dict`."""
        d = dict(data)
        inputs = d.pop("inputs")
        d["inputs"] = tuple(i["path"] for i in inputs)
        d["input_sizes"] = tuple(int(i["size"]) for i in inputs)
        d["input_sha256"] = tuple(str(i.get("sha256", "")) for i in inputs)
        d["exits"] = tuple(Exit(int(a), int(b)) for a, b in d["exits"])
        return cls(**d)

    def input_records(self) -> list[dict[str, Any]]:
        """``[{"path", "size", "sha256"}]``: each input file and its content (what a resume is checked against)."""
        return [{"path": p, "size": s, "sha256": h}
                for p, s, h in zip(self.inputs, self.input_sizes, self.input_sha256, strict=True)]

    def changed_inputs(self, recorded: Any) -> list[str]:
        """The input files whose size or SHA-256 differ from ``recorded`` (an earlier run's ``inputs``)."""
        if not isinstance(recorded, list):
            return list(self.inputs)
        old = {r.get("path"): r for r in recorded if isinstance(r, dict)}
        return [r["path"] for r in self.input_records() if r["path"] in old and (
            old[r["path"]].get("size") != r["size"] or old[r["path"]].get("sha256", r["sha256"]) != r["sha256"])]

    def reader(self) -> CorpusReader:
        """A reader of this job's inputs."""
        return CorpusReader(self.inputs, id_column=self.id_column, text_column=self.text_column,
                            skip_empty=self.skip_empty)

    def load_model(self) -> Any:
        """The encoder, in eval mode."""
        from matryoshka2d.encoder.model import MatryoshkaEncoder

        return MatryoshkaEncoder.from_pretrained(self.model, pooling=self.pooling,  # type: ignore[arg-type]
                                                 trust_remote_code=self.trust_remote_code).eval()


def make_job(model: Any, model_name: str, inputs: Sequence[str], exits: str, *, fmt: str = "float32",
             normalize: bool = True, id_column: str | None = None, text_column: str | None = None,
             skip_empty: bool = False, shard_size: int = 100_000, batch_size: int = 64,
             pooling: str | None = None, trust_remote_code: bool = False,
             input_type: str = "document") -> CorpusJob:
    """Check the arguments of a corpus encode against the loaded ``model`` and the files; return the job.

    Raises:
        ValueError / FileNotFoundError: bad exits, format, sizes or inputs (one line naming the value).
    """
    files = resolve_inputs(inputs)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size!r} must be a positive integer; pass e.g. 64")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"--shard-size {shard_size!r} must be a positive integer; pass e.g. 100000")
    check_choice("--input-type", input_type, INPUT_TYPES)
    local = Path(model_name)
    return CorpusJob(
        model=str(local.resolve()) if local.exists() else str(model_name),
        inputs=tuple(str(f.resolve()) for f in files),
        exits=tuple(parse_exits(exits, model)), format=check_format(fmt, normalize), normalize=normalize,
        id_column=id_column, text_column=text_column, skip_empty=skip_empty, shard_size=shard_size,
        batch_size=batch_size, pooling=pooling, trust_remote_code=trust_remote_code,
        input_type=input_type,  # type: ignore[arg-type]
        input_sizes=tuple(f.stat().st_size for f in files),
        input_sha256=tuple(file_sha256(f) for f in files),
    )
