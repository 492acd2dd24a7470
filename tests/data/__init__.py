"""Tests of matryoshka2d.data."""
