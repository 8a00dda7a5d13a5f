"""The one exception type for mistakes a user can fix.

The CLI turns a UserError into one line on stderr and exit status 2; anything else is a
bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A bad flag, file, key or value; the message names it and says what is wrong.

    quiet: the same error was already reported by rank 0; this rank exits 2 silently so a
    job prints the line once, not once per rank.
    """

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet
