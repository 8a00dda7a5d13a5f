"""Every exit status the pipeline ends with (a scheduler and train.sbatch act on them;
docs/checkpointing.md has the table), and the one exception type for mistakes a user can fix.

The CLI turns a UserError into one line on stderr and exit status 2; anything else is a
bug and keeps its traceback.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # e.g. a checkpoint could not be written (disk full); earlier checkpoints are intact
EXIT_USER_ERROR = 2
EXIT_FAULT = 70  # debug.fault kind=exit: the rank leaves at once, as a crashed process would
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on a signal after a complete checkpoint; run again to resume
EXIT_STALLED = 76  # no progress within train.startup_timeout_s / step_timeout_s: a peer died or hangs
EXIT_STOP_INCOMPLETE = 77  # a stop signal arrived but the ranks could not stop together: a peer is gone


class UserError(Exception):
    """A bad flag, file, key or value; the message names it and says what is wrong.

    quiet: the same error was already reported by rank 0; this rank exits 2 silently so a
    job prints the line once, not once per rank.
    """

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet
