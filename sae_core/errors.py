"""One base class for every error a user can cause; the CLI prints its message as one line."""


class SaescopeError(ValueError):
    """Bad input from the user: the message says what was wrong and what to do."""
