"""Diagnostics of reproduction cells and base models; each module runs with `python -m` and says what it measures."""
