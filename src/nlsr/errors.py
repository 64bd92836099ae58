"""The one exception type for mistakes a user can make (paths, flags, checkpoints, images)."""


class UserError(Exception):
    """A problem in the user's input, reported as one line; main() prints it and exits 1."""
