"""Sub-commands of the `nxtrec` CLI, one module each (see nxtrec/cli.py)."""
