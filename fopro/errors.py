"""The one exception type for errors a user can cause (bad file, bad option, bad data)."""


class FoproError(Exception):
    """A user-facing error: a one-line message that names the file or option and the fix.

    The CLI prints it in red and exits with code 2, without a traceback.
    """


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), for a one-line error."""
    text = str(err).strip().splitlines()
    return text[0][:limit] if text else type(err).__name__
