"""``m2d serve``: an OpenAI-compatible embeddings server where each request picks its exit and width.

- :mod:`~matryoshka2d.serve.config`: the limits (:class:`ServeConfig`).
- :mod:`~matryoshka2d.serve.output`: truncation, normalisation, quantisation and encoding of vectors.
- :mod:`~matryoshka2d.serve.batcher`: the dynamic batcher (token budget, mixed-depth batches).
- :mod:`~matryoshka2d.serve.request`: a request parsed, checked and tokenised (plain functions).
- :mod:`~matryoshka2d.serve.errors`: every error as OpenAI's JSON with a code.
- :mod:`~matryoshka2d.serve.http`: the connection layer (middleware, timeouts, connection limit, shutdown).
- :mod:`~matryoshka2d.serve.app`: the FastAPI routes over the server's state (:func:`create_app`).

Needs the ``serve`` extra (``pip install -e '.[serve]'`` in the repository).
"""

from __future__ import annotations

from matryoshka2d.serve.config import ServeConfig

__all__ = ["ServeConfig"]
