"""One module per ``mlxmoe`` subcommand; each defines a click command named like the module."""
