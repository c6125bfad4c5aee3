"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class TpuctlError(Exception):
    """A problem the user can fix: the message names the field or flag and the fix.

    `exit_code` lets commands distinguish "you asked for something impossible" (2)
    from "the thing you asked for failed" (1).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
