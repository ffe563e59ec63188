"""One exception type for bad user input: the CLI prints its message on one line and exits 2."""


class IsynthError(Exception):
    """A problem with the user's input (data, config, run directory, checkpoint)."""
