"""File I/O: RELION STAR files, MRC maps and stacks, atomic models."""
