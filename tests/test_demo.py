"""The demo's second half on the tiny model: the same texts at two exits, timed, and one search at each."""

from __future__ import annotations

import re

from matryoshka2d.demo import what_an_exit_buys

TEXTS = ["a man plays the guitar", "a woman reads a book", "the dog runs in the park", "a cat sleeps",
         "a man is playing a guitar", "children play football"]


class _Grid:
    def spearman(self, set_name: str, layer: int, dim: int) -> float:
        return 10.0 * layer + dim / 100


def test_what_an_exit_buys_times_and_searches_each_exit(tiny_model):
    text = what_an_exit_buys(tiny_model, TEXTS, [(1, 16), (4, 32)], _Grid(), "stsb", query="a man plays guitar")
    lines = text.splitlines()
    assert lines[0].startswith("What an exit buys: the same 6 texts at each exit")
    assert re.search(r"^- layer 1, dim 16: [\d,]+ texts/s \([\d.]+ s\), STS-B Spearman 10\.2, 64 bytes a vector; "
                     r"top hit: '.+' \(-?[\d.]+\)$", lines[2])
    assert lines[3].startswith("- layer 4, dim 32:") and "128 bytes a vector" in lines[3]
    assert re.fullmatch(r"- the top 3 at layer 1 and at layer 4 share [0-3] of 3 texts", lines[4])
