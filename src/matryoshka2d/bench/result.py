"""The benchmark's result: one record per timed configuration, the run's facts, a markdown table and the
speed targets.

Records are written by :mod:`matryoshka2d.bench.timing`; :func:`matryoshka2d.bench.runner.run_benchmark`
returns them as a :class:`BenchmarkResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from matryoshka2d.vocab import COMPILED, OURS, PEER

__all__ = ["COMPILED", "OURS", "PEER", "BenchmarkResult", "exact_enough", "impl_name"]
MIN_COSINE, MAX_SPEARMAN_DROP = 0.999, 0.2  # a number-changing mode counts toward a target only within these
PEER_GOAL = 1.5  # our best exact-enough mode / the fastest exact-enough peer, at every exit


def impl_name(impl: str, dtype: str) -> str:
    """One label per implementation and precision, e.g. ``matryoshka2d:onnx int8``."""
    return f"{impl} {dtype}"


def exact_enough(record: dict[str, Any]) -> bool:
    """Our torch fp32 (the reference), or within :data:`MIN_COSINE` of fp32 and :data:`MAX_SPEARMAN_DROP` of
    its STS-B Spearman (x100) where measured."""
    if (record["impl"], record["dtype"]) == (OURS, "fp32"):
        return True
    cosine = record.get("cosine_to_fp32_mean")
    return cosine is not None and cosine >= MIN_COSINE and abs(record.get("stsb_spearman_delta") or 0.0) <= \
        MAX_SPEARMAN_DROP


@dataclass
class BenchmarkResult:
    """One record per implementation x dtype x layer x dim x batch size, and the run's facts."""

    meta: dict[str, Any]
    records: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "records": self.records, "targets": self.targets(),
                "peer_targets": self.peer_targets()}

    def find(self, **keys: Any) -> list[dict[str, Any]]:
        """Records whose fields equal ``keys``."""
        return [r for r in self.records if all(r.get(k) == v for k, v in keys.items())]

    def to_markdown(self, metric: Literal["wall", "cpu"] = "wall") -> str:
        """A row per (batch size, our impl, dtype, layer, dim), with the peer's throughput beside it."""
        cpu = "_cpu" if metric == "cpu" else ""
        unit = "sent/cpu-s" if cpu else "sent/s (min-max)"
        head = ["batch", "impl", "dtype", "layer", "dim", f"ours {unit}", "vs full", "ideal N/n"]
        peer = bool(self.meta.get("peer"))
        head += [f"ST {unit}", "ours/ST", "ours/ST fp32"] * peer + ["cos to fp32", "STS-B rho (delta)", "RSS MB"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in (r for r in self.records if r["impl"].startswith(OURS)):  # peers only in their own columns
            row = [r["batch_size"], r["impl"], r["dtype"], r["layer"], r["dim"], _rate(r, cpu),
                   _x(r[f"speedup_vs_full{cpu}"]), _x(r["ideal_speedup"])]
            if peer:
                theirs = self.find(impl=PEER, dtype=r["dtype"], layer=r["layer"], dim=r["dim"],
                                   batch_size=r["batch_size"])
                row += [_rate(theirs[0], cpu) if theirs else "-", _x(r.get(f"ratio_vs_peer{cpu}")),
                        _x(r.get(f"ratio_vs_peer_fp32{cpu}"))]
            rho, delta = r.get("stsb_spearman"), r.get("stsb_spearman_delta")
            row += [_num(r.get("cosine_to_fp32_mean"), 5),
                    _num(rho, 2) + ("" if delta is None else f" ({delta:+.2f})"), _num(r.get("peak_rss_mb"), 0)]
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        return "\n".join(lines)

    def targets(self, metric: Literal["wall", "cpu"] = "wall") -> list[dict[str, Any]]:
        """The issue's speed targets at each batch size: the measured median ratio and whether it is met."""
        cpu = "_cpu" if metric == "cpu" else ""
        n_full, width, out = self.meta["num_layers"], self.meta["hidden_size"], []
        for bs in self.meta["batch_sizes"]:
            full = {(r["impl"], r["dtype"]): r for r in self.find(layer=n_full, dim=width, batch_size=bs)}
            checks = [("full depth fp32: ours / ST fp32", full.get((OURS, "fp32"), {}).get(f"ratio_vs_peer{cpu}"),
                       1.0, "")]
            modes = [r for (impl, dtype), r in full.items() if impl != PEER and (impl, dtype) != (OURS, "fp32")
                     and (dtype == "fp32" or self._quality_ok(impl, dtype, bs))]
            best = max(modes, key=lambda r: r.get(f"ratio_vs_peer_fp32{cpu}") or 0.0, default=None)
            if best is not None:
                checks.append((f"best mode ({best['impl']} {best['dtype']}): ours / ST fp32",
                               best.get(f"ratio_vs_peer_fp32{cpu}"), 2.5, ""))
            for (impl, dtype) in (k for k in full if k[0] == OURS):
                for layer, goal in ((max(1, n_full // 2), 1.9), (1, 0.8 * n_full)):
                    rec = self.find(impl=impl, dtype=dtype, layer=layer, dim=width, batch_size=bs)
                    if rec and layer < n_full:
                        checks.append((f"early exit n={layer} ({dtype}): speedup vs full",
                                       rec[0][f"speedup_vs_full{cpu}"], round(goal, 2), ""))
            out += [{"target": name, "batch_size": bs, "metric": metric, "value": round(value, 3), "goal": goal,
                     "met": value >= goal} for name, value, goal, _ in checks if value is not None]
        return out

    def to_markdown_all(self) -> str:
        """Every implementation (ours on each backend, every peer) at each batch size, layer and dim: sentences/s
        (median, min-max), speed relative to sentence-transformers on torch fp32, cosine to fp32, STS-B."""
        head = ["batch", "layer", "dim", "implementation", "sent/s (min-max)", "vs ST torch fp32",
                "cos to fp32 mean (min)", "STS-B rho (delta)", "exact enough"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        order = {name: i for i, name in enumerate(self.meta.get("implementations") or [])}
        records = sorted(self.records, key=lambda r: (r["batch_size"], r["layer"], r["dim"],
                                                      order.get(impl_name(r["impl"], r["dtype"]), 99)))
        for r in records:
            st = self.find(impl=PEER, dtype="fp32", layer=r["layer"], dim=r["dim"], batch_size=r["batch_size"])
            ratio = _round_ratio(r, st[0]) if st else None
            cos, low = r.get("cosine_to_fp32_mean"), r.get("cosine_to_fp32_min")
            rho, delta = r.get("stsb_spearman"), r.get("stsb_spearman_delta")
            row = [r["batch_size"], r["layer"], r["dim"], impl_name(r["impl"], r["dtype"]), _rate(r, ""), _x(ratio),
                   "1 (reference)" if cos is None and (r["impl"], r["dtype"]) == (OURS, "fp32")
                   else f"{_num(cos, 5)} ({_num(low, 4)})",
                   _num(rho, 2) + ("" if delta is None else f" ({delta:+.2f})"),
                   "yes" if exact_enough(r) else "no"]
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        return "\n".join(lines)

    def peer_targets(self) -> list[dict[str, Any]]:
        """At each batch size and timed exit (full width): our fastest exact-enough mode over the fastest
        exact-enough peer (median of per-round ratios); goal :data:`PEER_GOAL`."""
        out = []
        width = self.meta["hidden_size"]
        for bs in self.meta["batch_sizes"]:
            for layer in self.meta["layers"]:
                recs = [r for r in self.find(batch_size=bs, layer=layer, dim=width) if exact_enough(r)]
                ours = [r for r in recs if r["impl"].startswith(OURS)]
                peers = [r for r in recs if r["impl"].startswith(PEER)]
                if not ours or not peers:
                    continue
                best = max(ours, key=lambda r: r["sentences_per_s"])
                rival = max(peers, key=lambda r: r["sentences_per_s"])
                value = _round_ratio(best, rival)
                out.append({"target": f"layer {layer}: ours ({impl_name(best['impl'], best['dtype'])}) / fastest "
                                      f"exact-enough peer ({impl_name(rival['impl'], rival['dtype'])})",
                            "batch_size": bs, "layer": layer, "metric": "wall", "value": round(value, 3),
                            "goal": PEER_GOAL, "met": value >= PEER_GOAL,
                            "ours_sentences_per_s": round(best["sentences_per_s"], 1),
                            "peer_sentences_per_s": round(rival["sentences_per_s"], 1)})
        return out

    def _quality_ok(self, impl: str, dtype: str, batch_size: int) -> bool:
        recs = self.find(impl=impl, dtype=dtype, batch_size=batch_size)
        return bool(recs) and all(r.get("cosine_to_fp32_mean", 0.0) >= MIN_COSINE
                                  and abs(r.get("stsb_spearman_delta") or 0.0) <= MAX_SPEARMAN_DROP for r in recs)


def _round_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over rounds of ``a``'s rate / ``b``'s (the configs of a round ran side by side)."""
    x, y = a.get("sentences_per_s_rounds"), b.get("sentences_per_s_rounds")
    if x and y and len(x) == len(y):
        return float(np.median(np.asarray(x) / np.asarray(y)))
    return a["sentences_per_s"] / b["sentences_per_s"]


def _rate(r: dict[str, Any], cpu: str) -> str:
    if cpu:
        return f"{r['sentences_per_cpu_s']:.0f}"
    return f"{r['sentences_per_s']:.0f} ({r['sentences_per_s_min']:.0f}-{r['sentences_per_s_max']:.0f})"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"
