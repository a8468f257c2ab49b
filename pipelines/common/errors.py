"""The one exception type for problems a user can fix (bad input, bad config, missing files)."""


class PipelineError(Exception):
    """A user-facing error: the message names the problem and where it is (file, line, row, key)."""
