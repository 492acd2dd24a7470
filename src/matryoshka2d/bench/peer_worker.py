"""The peer worker: sentence-transformers' ONNX / OpenVINO backends, run in their own venv.

Run as a script (``python -I peer_worker.py``) by :mod:`matryoshka2d.bench.peer_env` with the peer venv's
interpreter, because optimum pins a transformers older than ours. It imports nothing from matryoshka2d. It
reads one JSON request per line on stdin and answers one JSON line on stdout:

- ``{"op": "texts", "path": P}``: the sentences every ``encode`` embeds (a JSON list).
- ``{"op": "load", "key": K, "backend": "torch" | "onnx" | "onnx-int8" | "openvino", "folder": F, "width": D,
  "threads": t, "max_seq_length": L}``: load the sentence-transformers folder ``F`` (an exit already
  physically truncated to its depth, ``D`` wide) with that backend.
- ``{"op": "encode", "key": K, "batch_size": b, "dim": d, "out": P or null}``: embed the texts (cut to ``d``,
  then L2-normalised, by sentence-transformers' ``truncate_dim``); answers the call's ``wall`` and ``cpu``
  seconds and, with ``out``, saves the embeddings there.
- ``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INT8_CONFIG = "avx512_vnni"  # sentence-transformers' int8 preset for AVX-512 VNNI CPUs (this machine's kind)


def load(request: dict[str, Any]) -> Any:
    """A sentence-transformers model of ``request["folder"]`` on ``request["backend"]``."""
    import torch
    from sentence_transformers import SentenceTransformer

    threads = int(request["threads"])
    torch.set_num_threads(threads)
    backend, folder = request["backend"], request["folder"]
    if backend != "torch":  # transformers-only loading flags (add_pooling_layer) break optimum's loaders
        config_path = os.path.join(folder, "sentence_bert_config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config.pop("model_args", None)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f)
    kwargs: dict[str, Any] = {}
    if backend in ("onnx", "onnx-int8"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        kwargs = {"session_options": options, "provider": "CPUExecutionProvider"}
        if backend == "onnx-int8":
            from sentence_transformers import export_dynamic_quantized_onnx_model

            plain = SentenceTransformer(folder, device="cpu", backend="onnx", local_files_only=True)
            plain.save_pretrained(folder)  # writes onnx/model.onnx, which the quantizer reads
            export_dynamic_quantized_onnx_model(plain, INT8_CONFIG, folder)
            kwargs["file_name"] = f"onnx/model_qint8_{INT8_CONFIG}.onnx"
        st = SentenceTransformer(folder, device="cpu", backend="onnx", model_kwargs=kwargs, local_files_only=True)
    elif backend == "openvino":
        kwargs = {"ov_config": {"INFERENCE_NUM_THREADS": str(threads)}}  # OpenVINO's own default precision
        st = SentenceTransformer(folder, device="cpu", backend="openvino", model_kwargs=kwargs,
                                 local_files_only=True)
    elif backend == "torch":
        st = SentenceTransformer(folder, device="cpu", local_files_only=True)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    st.max_seq_length = int(request["max_seq_length"])
    return st


def main() -> int:
    import numpy as np
    import sentence_transformers

    answers = os.fdopen(os.dup(1), "w")  # the protocol's own channel; anything libraries print goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    models: dict[str, tuple[Any, int]] = {}
    texts: list[str] = []
    for line in sys.stdin:
        request = json.loads(line)
        try:
            op = request["op"]
            answer: dict[str, Any] = {"ok": True}
            if op == "quit":
                break
            if op == "texts":
                with open(request["path"], encoding="utf-8") as f:
                    texts = json.load(f)
            elif op == "load":
                models[request["key"]] = (load(request), int(request["width"]))
                answer["versions"] = {"sentence_transformers": sentence_transformers.__version__,
                                      "transformers": __import__("transformers").__version__}
            elif op == "encode":
                st, width = models[request["key"]]
                dim = int(request["dim"])
                wall, cpu = time.perf_counter(), time.process_time()
                emb = st.encode(texts, batch_size=int(request["batch_size"]), show_progress_bar=False,
                                convert_to_numpy=True, normalize_embeddings=True,
                                truncate_dim=dim if dim < width else None)
                answer.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)
                if request.get("out"):
                    np.save(request["out"], np.asarray(emb, dtype=np.float32))
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # every failure goes back to the benchmark, which raises it with this text
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
