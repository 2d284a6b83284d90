"""The ``spa3d`` command line: one subcommand per job."""
