"""User-facing errors: printed as one line, exit status 2, no traceback."""


class UserError(Exception):
    """A problem the user can fix: a bad config key or value, a missing input, an unusable model."""
