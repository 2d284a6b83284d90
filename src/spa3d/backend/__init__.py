"""Execution backend: device choice (CPU, CUDA), threads, batch sizing."""
