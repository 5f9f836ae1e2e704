"""The one exception type for user mistakes, printed by the CLI as a single line."""


class UserError(Exception):
    """A mistake in the user's input (file, folder, flag); the CLI prints it without a traceback."""
