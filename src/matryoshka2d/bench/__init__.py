"""Benchmarks: encoding speed per physically truncated exit against peers, timed side by side."""
