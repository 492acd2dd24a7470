"""Tests of matryoshka2d.training."""
