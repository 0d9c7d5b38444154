"""Exceptions raised by the library; tasks turn them into one-line exits."""


class FbmVpnError(Exception):
    """Root of every error this library raises on purpose.

    The message states what went wrong and what to do about it.
    """


class BadInput(FbmVpnError):
    """A value given by the user (peer id, key, path, option) is not acceptable."""


class StateError(FbmVpnError):
    """On-disk or live state contradicts the request (exists already, missing...)."""


class EngineError(FbmVpnError):
    """Docker, Compose or a container did not do what was asked."""
