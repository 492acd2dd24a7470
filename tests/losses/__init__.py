"""Tests of matryoshka2d.losses."""
