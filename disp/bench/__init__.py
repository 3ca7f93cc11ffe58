"""Benchmarks: a procedural visual-instruction data set for training and attacking a tiny model."""
