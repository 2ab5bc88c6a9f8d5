"""The one exception type that reaches a user: a mistake they can fix, said in one line that names the fix."""


class UserError(Exception):
    """A mistake the user can fix. Entry points print it as one line and exit 2."""
