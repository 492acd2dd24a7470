"""Tests of matryoshka2d.bench."""
