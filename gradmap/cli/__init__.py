"""The `gradmap` command line: one module per subcommand, dispatched by `main`."""
from gradmap.cli.app import main

__all__ = ["main"]
