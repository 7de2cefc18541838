"""The one exception type for errors a user can cause (bad file, bad option, bad data)."""


class FoproError(Exception):
    """A user-facing error: a one-line message that names the file or option and the fix.

    The CLI prints it in red and exits with code 2, without a traceback.
    """
