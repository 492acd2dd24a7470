"""Tests of matryoshka2d.export."""
