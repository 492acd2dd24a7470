"""A cascade vector index on faiss: narrow shortlist vectors plus full-width rerank vectors of one exit.

On disk an index is a folder written atomically (:func:`~matryoshka2d.io.atomic.atomic_dir`):

* ``manifest.json``: format version, model, exit layer, pooling, dims, index type and parameters, and
  each file with its size in bytes;
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

FORMAT_VERSION = 1
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
              show_progress_bar: bool | None = None) -> CascadeIndex:
        """Encode ``texts`` at exit ``layer`` (in chunks) and index them (see :meth:`from_vectors`).

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
        meta = {"model": str(getattr(model, "metadata", {}).get("source") or type(model).__name__),
                "pooling": getattr(model, "pooling", None), "num_layers": model.num_layers,
                "hidden_size": model.hidden_size, "max_seq_length": getattr(model, "max_seq_length", None)}
        return cls.from_vectors(ids, pooled, dims, layer=layer, kind=kind, hnsw_m=hnsw_m, ivf_nlist=ivf_nlist,
                                rerank_dtype=rerank_dtype, metadata=meta)

    # ----------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the index folder atomically; the manifest lists every file with its bytes.

        Raises:
            FileExistsError: ``path`` is a non-empty folder and ``overwrite`` is false.
        """
        from matryoshka2d.io.atomic import atomic_dir

        faiss = faiss_module()
        files: dict[str, int] = {}
        with atomic_dir(path, overwrite=overwrite) as tmp:
            (tmp / "ids.json").write_text(json.dumps(self.ids), encoding="utf-8")
            np.save(tmp / f"vectors-{self.full_dim}.npy", self.vectors)
            for d, index in self.shortlists.items():
                faiss.write_index(index, str(tmp / f"shortlist-{d}.faiss"))
            for f in sorted(tmp.iterdir()):
                files[f.name] = f.stat().st_size
            manifest = {**self.manifest, "files": files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        self.manifest, self.path = manifest, Path(path)
        logger.info("wrote index %s: %d documents, dims %s, %.1f MB", path, len(self), self.dims,
                    sum(files.values()) / 2**20)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = True) -> CascadeIndex:
        """Read an index folder written by :meth:`save`.

        Raises:
            FileNotFoundError: no such folder or a listed file is missing.
            ValueError: not an index, a newer format, or files that disagree with the manifest.
        """
        faiss = faiss_module()
        path = Path(path)
        man_path = path / "manifest.json"
        if not man_path.is_file():
            raise FileNotFoundError(f"{man_path}: no such file; build an index with `m2d index`")
        try:
            manifest = json.loads(man_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{man_path}: not a JSON manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != INDEX_KIND:
            raise ValueError(f"{man_path}: not an m2d cascade index manifest")
        if manifest.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(f"{man_path}: index format_version {manifest['format_version']} is newer than this "
                             f"library's {FORMAT_VERSION}; upgrade matryoshka2d")
        for name, size in manifest.get("files", {}).items():
            f = path / name
            if not f.is_file() or f.stat().st_size != size:
                raise ValueError(f"{f}: missing or not {size} bytes as the manifest says; rebuild the index")
        dims = [int(d) for d in manifest["dims"]]
        ids = json.loads((path / "ids.json").read_text(encoding="utf-8"))
        vectors = np.load(path / f"vectors-{dims[-1]}.npy", mmap_mode="r" if mmap else None)
        shortlists = {d: faiss.read_index(str(path / f"shortlist-{d}.faiss")) for d in dims
                      if (path / f"shortlist-{d}.faiss").is_file()}
        if len(ids) != len(vectors) or any(s.ntotal != len(ids) for s in shortlists.values()):
            raise ValueError(f"{path}: ids, vectors and shortlist indexes hold different numbers of documents")
        return cls(ids, vectors, shortlists, manifest, path)

    def index_bytes(self, shortlist_dim: int, rerank_dim: int | None = None) -> int:
        """Bytes of the files a search configuration reads (shortlist index + rerank vectors, or one of them)."""
        shortlist_dim = self.check_shortlist(shortlist_dim)
        files = self.manifest.get("files", {})
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
