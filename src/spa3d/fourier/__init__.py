"""Fourier-space core: CTF, projection, back-projection, reconstruction, filters."""
