"""Exceptions for bad user input and for training that cannot go on: the CLI prints the message on one line
and exits with the exception's status (2 for bad input, 3 for divergence)."""


class IsynthError(Exception):
    """A problem with the user's input (data, config, run directory, checkpoint)."""

    exit_code = 2


class Diverged(IsynthError):
    """Training met a non-finite loss or gradient norm; the last good checkpoint is kept."""

    exit_code = 3
