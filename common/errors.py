"""The one exception for bad input, shared by every reader, script and study."""


class DataError(SystemExit):
    """Bad input: stops a script with this message and no traceback (exit status 2 under common.cli.run, the
    handler every entry point runs under; 1 where a script is called without it)."""

    def __init__(self, message):
        super().__init__(f"error: {message}")
