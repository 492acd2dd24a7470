"""Tests of matryoshka2d.evaluation."""
