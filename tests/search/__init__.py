"""Tests of matryoshka2d.search."""
