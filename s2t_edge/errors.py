"""User-facing errors: the CLI prints these as one line on stderr and exits non-zero."""


class S2TError(Exception):
    """An error the user can act on (bad path, wrong checksum, bad input line...)."""
