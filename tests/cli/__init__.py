"""Tests of matryoshka2d.cli."""
