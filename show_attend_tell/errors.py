"""The one exception type for bad user input: its message names the file or field and what is wrong."""


class InputError(ValueError):
    """Bad input from the user (a file, a field, an argument). The CLI prints it as one line, no traceback."""


class TooManyPixelsError(InputError):
    """An image declaring more pixels than the caller allows (the server answers 413, not 422)."""


class Cancelled(Exception):
    """Work stopped early because its caller's `cancelled` said so (a server whose client hung up); nothing is
    returned."""
