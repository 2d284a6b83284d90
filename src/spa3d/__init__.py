"""spa3d: single-particle cryo-EM from 2D particle images to 3D maps.

Reads and writes RELION 3.1 files (STAR, MRC) and follows RELION's
conventions (Euler angles, origins, CTF, symmetry axes); see docs/conventions.md.
"""

__version__ = "0.1.0"
