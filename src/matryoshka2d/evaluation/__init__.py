"""Evaluation: metrics, the layer x dim grid, paired bootstrap comparisons and plots."""
