"""Tests of matryoshka2d.corpus."""
