"""One module per job (simulate, reconstruct, ...): the functions behind ``spa3d <job>``."""
