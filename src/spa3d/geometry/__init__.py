"""Geometry: RELION Euler angles, point groups, orientation and translation sampling."""
