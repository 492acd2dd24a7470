"""Tests of matryoshka2d.serve."""
