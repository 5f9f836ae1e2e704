"""The one exception type for user mistakes, printed by the CLI as a single line."""

# How torch's DataLoader re-raises a worker's exception: the type with a message holding the
# worker's whole traceback, whose last line is "pirl.errors.UserError: <our message>".
_WORKER_PREFIX = "Caught UserError in DataLoader worker"
_OWN_LINE = "pirl.errors.UserError: "


class UserError(Exception):
    """A mistake in the user's input (file, folder, flag); the CLI prints it without a traceback.

    Raised in a DataLoader worker, it reaches the main process with the same one-line message,
    whatever the number of workers.
    """

    def __init__(self, message: str = "") -> None:
        if message.startswith(_WORKER_PREFIX) and _OWN_LINE in message:
            message = message.rsplit(_OWN_LINE, 1)[1].strip()
        super().__init__(message)
