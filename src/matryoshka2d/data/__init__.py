"""Reading data: file formats (TSV/CSV/JSONL) and the named datasets. The only place that reads data files."""
