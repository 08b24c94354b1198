"""One module per ``streamstore`` subcommand (see :mod:`streamstore.cli`)."""
