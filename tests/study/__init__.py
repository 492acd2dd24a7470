"""Tests of matryoshka2d.study."""
