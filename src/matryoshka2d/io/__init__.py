"""The folder format: atomic writes, manifests, model folders (read and write) and model cards.

The bottom layer with :mod:`matryoshka2d.data`: it imports no other part of the package.
"""
