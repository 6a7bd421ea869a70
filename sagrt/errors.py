"""The one base class of every error sagrt raises for input a user can fix."""


class SagrtError(ValueError):
    """Bad input or a stale artifact; the message says what is wrong and how to fix it."""
