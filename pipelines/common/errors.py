"""The one exception type for problems a user can fix (bad input, bad config, missing files)."""


class PipelineError(Exception):
    """A user-facing error: the message names the problem and where it is (file, line, row, key)."""


def describe_validation_error(exc) -> str:
    """A pydantic ValidationError as `key.path: problem; ...`, for messages that name the bad key."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors())
