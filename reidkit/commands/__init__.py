"""CLI subcommands, one module each (see reidkit.cli)."""
