"""Tests of matryoshka2d.io."""
