"""The one exception type whose message is shown to the user as-is, without a traceback."""


class UserError(Exception):
    """Bad input or a missing prerequisite: the message says what is wrong and what to do."""


class Diverged(UserError):
    """Training stopped after a run of non-finite steps: for a sweeper, a failed trial, not a bad command."""
