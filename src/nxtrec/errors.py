"""One exception type for every user-facing error: the CLI prints its message as one line."""


class NxtrecError(Exception):
    """Bad input, a missing or wrong file, a bad config: the message says what and where."""
