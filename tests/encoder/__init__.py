"""Tests of matryoshka2d.encoder."""
