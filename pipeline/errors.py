"""The one exception type for mistakes a user can fix.

The CLI turns a UserError into one line on stderr and exit status 2; anything else is a
bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A bad flag, file, key or value; the message names it and says what is wrong."""
