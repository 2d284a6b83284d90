"""Operations on 3D maps in real space: rotation, shifts, symmetrisation, symmetry-axis alignment."""
