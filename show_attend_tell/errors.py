"""The one exception type for bad user input: its message names the file or field and what is wrong."""

import errno

# OSErrors that are the user's file system, not a bug: a folder that cannot be written (permissions, read-only,
# full), an output path under a file or onto one. `sat` reports them as one line naming the path.
FILE_SYSTEM_ERRNOS = frozenset(
    (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)
)


class InputError(ValueError):
    """Bad input from the user (a file, a field, an argument). The CLI prints it as one line, no traceback."""


class TooManyPixelsError(InputError):
    """An image declaring more pixels than the caller allows (the server answers 413, not 422)."""


def file_system_error(error: OSError) -> str | None:
    """The one line for a FILE_SYSTEM_ERRNOS error that names its path ("PATH: cannot write (Permission
    denied)"), None for any other OSError."""
    if error.errno not in FILE_SYSTEM_ERRNOS or not error.filename:
        return None
    if error.errno == errno.EEXIST:
        return f"{error.filename}: already exists and is not a folder"
    if error.errno == errno.ENOTDIR:
        return f"{error.filename}: cannot be a folder (a part of it is a file)"
    return f"{error.filename}: cannot write ({error.strerror})"


class Cancelled(Exception):
    """Work stopped early because its caller's `cancelled` said so (a server whose client hung up); nothing is
    returned."""


def shown(text: str, limit: int = 40) -> str:
    """`text` quoted for an error message, cut after `limit` characters: a message names what was given without
    echoing all of it (an 8 KB word would make an 8 KB error line)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"
