"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class TasaError(Exception):
    """An error caused by bad input or an unmet requirement; message is one line for the user."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
