"""Studies: a TOML of strategies x seeds, run resumably by several workers, and their report."""
