"""User-facing errors: their message is the whole story (what is wrong and the fix)."""


class TandemError(Exception):
    """Bad input or configuration. The CLI prints the message on one line and exits 2."""
