"""A cascade vector index on faiss: narrow shortlist vectors plus full-width rerank vectors of one exit.

On disk an index is a folder written atomically (:func:`~matryoshka2d.io.atomic.atomic_dir`):

* ``manifest.json``: format version, model (the name given, its absolute path and fingerprint: see
  :mod:`matryoshka2d.search.provenance`), exit layer, pooling, dims, index type and parameters, and each
  file with its size and SHA-256 (checked on load; ``verify=False`` checks sizes only);
* ``ids.json``: the document ids, in row order;
* ``shortlist-<d>.faiss``: a faiss inner-product index of the L2-normalised ``[:d]`` prefix, one per
  shortlist dim (every dim of ``dims`` but the largest; for a non-flat type the largest too, since an
  approximate or compressed search at full width is a configuration of its own);
* ``vectors-<D>.npy``: the L2-normalised ``[:D]`` vectors at the largest dim ``D`` (float32 or float16),
  used to rerank a shortlist, and for exhaustive search at ``D``.

Because normalising a prefix of a normalised vector equals normalising the prefix of the raw vector, the
rerank can run at any dim ``<= D`` from the one stored matrix. ``kind`` selects the shortlist index: ``flat``
(exact, the default), ``hnsw`` (graph, ``M`` links, ``ef_search`` at query time), ``ivf`` (``nlist``
clusters, ``nprobe`` probed at query time), ``sq8`` / ``sq6`` / ``sq4`` (exhaustive over 8- / 6- / 4-bit
scalar-quantised vectors: 4x / 5.3x / 8x smaller than float32).

Needs the ``retrieval`` extra for faiss.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka2d.truncation import truncate
from matryoshka2d.vocab import INDEX_TYPES, RERANK_DTYPES, IndexType, RerankDtype, install_hint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: files carry SHA-256 digests (1: sizes only, still read)
INDEX_KIND = "m2d-cascade-index"
_SQ_BITS = {"sq8": "QT_8bit", "sq6": "QT_6bit", "sq4": "QT_4bit"}


def faiss_module() -> Any:
    """``import faiss`` with an install hint."""
    try:
        import faiss
    except ImportError:
        raise ImportError(f"indexes need faiss: {install_hint('retrieval')}") from None
    return faiss


def _check_dims(dims: Sequence[int], width: int) -> list[int]:
    out = sorted({int(d) for d in dims})
    if not out or out[0] < 1 or out[-1] > width:
        raise ValueError(f"dims {list(dims)} must be in 1..{width} (the vectors' width); pass e.g. 64,{width}")
    return out


def build_faiss(vectors: np.ndarray, kind: IndexType = "flat", *, hnsw_m: int = 32, ivf_nlist: int | None = None,
                seed: int = 0) -> Any:
    """A faiss inner-product index over ``vectors`` (already normalised), of type ``kind``.

    Raises:
        ValueError: an unknown ``kind`` or bad parameters.
    """
    faiss = faiss_module()
    n, d = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        if hnsw_m < 2:
            raise ValueError(f"hnsw_m {hnsw_m} must be >= 2; pass e.g. 32")
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
    elif kind == "ivf":
        nlist = int(ivf_nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1)))
        if not 1 <= nlist <= n:
            raise ValueError(f"ivf_nlist {nlist} must be in 1..{n} (the number of documents)")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(vectors)  # faiss's Python wrapper keeps ``quantizer`` alive with ``index``
    elif kind in _SQ_BITS:
        qtype = getattr(faiss.ScalarQuantizer, _SQ_BITS[kind])
        index = faiss.IndexScalarQuantizer(d, qtype, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        raise ValueError(f"index type {kind!r} is not one of {list(INDEX_TYPES)}")
    index.add(vectors)
    return index


def check_manifest(manifest: Any, man_path: Path) -> list[int]:
    """The dims of an index manifest, after checking the fields a load relies on.

    Raises:
        ValueError: not an index manifest, a newer format, or a field of the wrong type (named).
    """
    fix = "rebuild the index with m2d index"
    if not isinstance(manifest, dict) or manifest.get("kind") != INDEX_KIND:
        raise ValueError(f"{man_path}: not an m2d cascade index manifest (no 'kind': {INDEX_KIND!r}); {fix}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{man_path}: format_version {version!r} is not a positive integer; {fix}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{man_path}: index format_version {version} is newer than this library's "
                         f"{FORMAT_VERSION}; upgrade matryoshka2d")
    dims = manifest.get("dims")
    if (not isinstance(dims, list) or not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                                         for d in dims) or dims != sorted(set(dims))):
        raise ValueError(f"{man_path}: 'dims' is {dims!r}, not an ascending list of positive integers; {fix}")
    layer = manifest.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise ValueError(f"{man_path}: 'layer' is {layer!r}, not a positive integer; {fix}")
    files = manifest.get("files")
    entry = dict if version >= 2 else int
    if not isinstance(files, dict) or not all(isinstance(v, entry) and not isinstance(v, bool)
                                              for v in files.values()):
        want = "{name: {'size', 'sha256'}}" if version >= 2 else "{name: size}"
        raise ValueError(f"{man_path}: 'files' is a JSON {type(files).__name__}, not a table {want}; {fix}")
    return dims


def index_metadata(model: Any, layer: int, source: str | None) -> dict[str, Any]:
    """What an index records of the model that encoded its documents: the model (name, absolute path,
    fingerprint; :mod:`matryoshka2d.search.provenance`), its settings, and the document exit with the model's
    document space (which query exits search it)."""
    from matryoshka2d.search.provenance import model_record

    recorded = model_record(source) if source is not None else {"model": None}
    return {**recorded, "pooling": getattr(model, "pooling", None), "num_layers": model.num_layers,
            "hidden_size": model.hidden_size, "max_seq_length": getattr(model, "max_seq_length", None),
            "document_exit": layer, "document_space": getattr(model, "document_space", None)}


@dataclass
class CascadeIndex:
    """Shortlist indexes and rerank vectors of one exit, with the document ids.

    Attributes:
        ids: document ids in row order.
        vectors: ``(N, D)`` normalised rerank vectors at the largest dim (float32 or float16).
        shortlists: ``{d: faiss index}`` for every shortlist dim (``d < D``; ``D`` too unless flat).
        manifest: model, layer, dims, index type and parameters (see the module docstring).
        path: the folder it was loaded from or saved to.
    """

    ids: list[str]
    vectors: np.ndarray
    shortlists: dict[int, Any]
    manifest: dict[str, Any]
    path: Path | None = None
    _flat_full: Any = field(default=None, repr=False)

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    @property
    def dims(self) -> list[int]:
        return [int(d) for d in self.manifest["dims"]]

    @property
    def full_dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_vectors(cls, ids: Sequence[str], pooled: np.ndarray, dims: Sequence[int], *, layer: int,
                     kind: IndexType = "flat", hnsw_m: int = 32, ivf_nlist: int | None = None,
                     rerank_dtype: RerankDtype = "float32",
                     metadata: dict[str, Any] | None = None) -> CascadeIndex:
        """Index raw pooled vectors ``(N, >= max(dims))`` of the exit ``layer``.

        Raises:
            ValueError: mismatched ids, repeated ids, bad dims, index type or dtype.
        """
        ids = [str(i) for i in ids]
        if len(ids) != len(pooled) or not ids:
            raise ValueError(f"{len(ids)} ids for {len(pooled)} vectors; pass one id per document (at least one)")
        if len(set(ids)) != len(ids):
            raise ValueError("document ids repeat; every document needs a unique id")
        if kind not in INDEX_TYPES:
            raise ValueError(f"index type {kind!r} is not one of {list(INDEX_TYPES)}")
        if rerank_dtype not in RERANK_DTYPES:
            raise ValueError(f"rerank_dtype {rerank_dtype!r} is not one of {list(RERANK_DTYPES)}")
        dims = _check_dims(dims, pooled.shape[1])
        full = dims[-1]
        vectors = truncate(pooled, full).astype(rerank_dtype)
        short_dims = dims if kind != "flat" else dims[:-1]
        shortlists = {d: build_faiss(truncate(pooled, d), kind, hnsw_m=hnsw_m, ivf_nlist=ivf_nlist)
                      for d in short_dims}
        params: dict[str, Any] = {"hnsw_m": hnsw_m} if kind == "hnsw" else {}
        if kind == "ivf":
            params["ivf_nlist"] = int(next(iter(shortlists.values())).nlist) if shortlists else ivf_nlist
        manifest = {"format_version": FORMAT_VERSION, "kind": INDEX_KIND, "layer": int(layer), "dims": dims,
                    "num_docs": len(ids), "index_type": kind, "params": params, "rerank_dtype": rerank_dtype,
                    **(metadata or {})}
        return cls(ids, vectors, shortlists, manifest)

    @classmethod
    def build(cls, model: Any, ids: Sequence[str], texts: Sequence[str], *, layer: int, dims: Sequence[int],
              kind: IndexType = "flat", batch_size: int = 64, chunk_size: int = 2048, hnsw_m: int = 32,
              ivf_nlist: int | None = None, rerank_dtype: RerankDtype = "float32",
              show_progress_bar: bool | None = None, source: str | None = None) -> CascadeIndex:
        """Encode ``texts`` at exit ``layer`` (in chunks) and index them (see :meth:`from_vectors`).

        ``source`` is the name or folder ``model`` was loaded from: the manifest records it with its absolute
        path and fingerprint (:mod:`matryoshka2d.search.provenance`), so search can load and check the same
        model. Without it the index records no model, and search needs one named.

        Raises:
            ValueError: a bad layer / dim, or the errors of :meth:`from_vectors`.
        """
        from matryoshka2d.encoder.batching import embed_layers

        layer = model.check_layer(layer)
        dims = _check_dims(dims, model.hidden_size)
        pooled = np.empty((len(texts), dims[-1]), dtype=np.float32)
        for first in range(0, len(texts), chunk_size):
            part = embed_layers(model, list(texts[first:first + chunk_size]), [layer], dim=dims[-1],
                                batch_size=batch_size, show_progress_bar=show_progress_bar,
                                desc=f"index chunk {first // chunk_size + 1}")[layer]
            pooled[first:first + len(part)] = part
        return cls.from_vectors(ids, pooled, dims, layer=layer, kind=kind, hnsw_m=hnsw_m, ivf_nlist=ivf_nlist,
                                rerank_dtype=rerank_dtype, metadata=index_metadata(model, layer, source))

    # ----------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the index folder atomically; the manifest lists every file with its size and SHA-256.

        Raises:
            FileExistsError: ``path`` is a non-empty folder and ``overwrite`` is false.
        """
        from matryoshka2d.io.atomic import atomic_dir
        from matryoshka2d.io.manifest import file_entries

        faiss = faiss_module()
        with atomic_dir(path, overwrite=overwrite) as tmp:
            (tmp / "ids.json").write_text(json.dumps(self.ids), encoding="utf-8")
            np.save(tmp / f"vectors-{self.full_dim}.npy", self.vectors)
            for d, index in self.shortlists.items():
                faiss.write_index(index, str(tmp / f"shortlist-{d}.faiss"))
            files = file_entries(tmp)
            manifest = {**self.manifest, "format_version": FORMAT_VERSION, "files": files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        self.manifest, self.path = manifest, Path(path)
        logger.info("wrote index %s: %d documents, dims %s, %.1f MB", path, len(self), self.dims,
                    sum(f["size"] for f in files.values()) / 2**20)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = True, verify: bool = True) -> CascadeIndex:
        """Read an index folder written by :meth:`save`, checking every file against the manifest.

        Args:
            path: the index folder.
            mmap: memory-map the rerank vectors.
            verify: compare each file's SHA-256 with the manifest (``False``: sizes only; for huge indexes
                read often, see docs/retrieval.md for the cost).

        Raises:
            FileNotFoundError: no such folder.
            ValueError: not an index, a newer format, a damaged manifest, files that disagree with it
                (missing, truncated, altered), repeated or non-string ids, or unreadable faiss / numpy files.
        """
        from matryoshka2d.io.manifest import check_files

        faiss = faiss_module()
        path = Path(path)
        man_path = path / "manifest.json"
        if not man_path.is_file():
            raise FileNotFoundError(f"{man_path}: no such file; build an index with `m2d index`")
        try:
            manifest = json.loads(man_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{man_path}: not a JSON manifest ({e}); rebuild the index with m2d index") from None
        dims = check_manifest(manifest, man_path)
        fix = f"rebuild the index with m2d index --output {path} --overwrite, or copy it again"
        files = manifest["files"]
        if manifest["format_version"] < 2:  # sizes only
            logger.warning("%s: an index of format 1 records file sizes, not digests; rebuild it to have its "
                           "content checked", man_path)
            files = {name: {"size": size} for name, size in files.items()}
            verify = False
        check_files(path, files, digests=verify, fix=fix)
        needed = ["ids.json", f"vectors-{dims[-1]}.npy"]
        if any(name not in files for name in needed):
            raise ValueError(f"{man_path}: 'files' does not list {needed}; {fix}")
        try:
            ids = json.loads((path / "ids.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path / 'ids.json'}: not JSON ({e}); {fix}") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{path / 'ids.json'}: holds a JSON {type(ids).__name__}, not a list of id strings; "
                             f"{fix}")
        if len(set(ids)) != len(ids):
            first = next(i for i, c in collections.Counter(ids).items() if c > 1)
            raise ValueError(f"{path / 'ids.json'}: document id {first!r} appears more than once (ids must be "
                             f"unique); {fix}")
        try:
            vectors = np.load(path / f"vectors-{dims[-1]}.npy", mmap_mode="r" if mmap else None)
            shortlists = {d: faiss.read_index(str(path / f"shortlist-{d}.faiss")) for d in dims
                          if f"shortlist-{d}.faiss" in files}
        except Exception as e:  # noqa: BLE001 - numpy and faiss raise ValueError / RuntimeError / OSError
            raise ValueError(f"{path}: an index file cannot be read ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]}); {fix}") from None
        if vectors.ndim != 2 or vectors.shape[1] != dims[-1]:
            raise ValueError(f"{path}: vectors-{dims[-1]}.npy has shape {vectors.shape}, not (N, {dims[-1]}); {fix}")
        if len(ids) != len(vectors) or any(s.ntotal != len(ids) for s in shortlists.values()):
            raise ValueError(f"{path}: ids, vectors and shortlist indexes hold different numbers of documents; "
                             f"{fix}")
        return cls(ids, vectors, shortlists, manifest, path)

    def index_bytes(self, shortlist_dim: int, rerank_dim: int | None = None) -> int:
        """Bytes of the files a search configuration reads (shortlist index + rerank vectors, or one of them)."""
        shortlist_dim = self.check_shortlist(shortlist_dim)
        files = {k: v["size"] if isinstance(v, dict) else v for k, v in self.manifest.get("files", {}).items()}
        vec = int(files.get(f"vectors-{self.full_dim}.npy", self.vectors.nbytes))
        if shortlist_dim not in self.shortlists:  # exhaustive search over the stored full-width vectors
            return vec
        faiss_bytes = files.get(f"shortlist-{shortlist_dim}.faiss")
        if faiss_bytes is None:  # not saved yet: the vectors the index holds
            faiss_bytes = len(self) * shortlist_dim * 4
        return int(faiss_bytes) + (vec if rerank_dim else 0)

    def check_shortlist(self, dim: int) -> int:
        """``dim`` if the index stores it (a shortlist dim or the full dim).

        Raises:
            ValueError: it does not.
        """
        if int(dim) not in self.dims:
            raise ValueError(f"shortlist dim {dim} is not stored in this index; it has dims {self.dims} (build "
                             f"with --dims including {dim})")
        return int(dim)

    def full_index(self) -> Any:
        """An exact faiss index over the stored rerank vectors (built on first use)."""
        if self._flat_full is None:
            self._flat_full = build_faiss(np.ascontiguousarray(self.vectors, dtype=np.float32), "flat")
        return self._flat_full
