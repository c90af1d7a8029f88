"""The small error hierarchy of the proxy, and the device protocol's error codes."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Error codes of the device protocol (docs/protocol.md, "Error codes")."""

    INTERNAL = 0
    MALFORMED = 9
    ACCOUNT_EXISTS = 10
    BAD_CREDENTIALS = 11
    INVALID_DEVICE_ID = 12
    PASV_TIMEOUT = 13
    CONNECT_FAILED = 14
    OVER_QUOTA = 15
    #: The device id is bound to a key and the login did not prove it holds it.
    IDENTITY = 16


class SwiftFTPError(Exception):
    """Base class of the proxy's own errors."""


class ProtocolError(SwiftFTPError):
    """A device broke the wire protocol; carries the error code to reply with."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(f"error {int(code)}: {text}")
        self.code = code
        self.text = text


class Busy(SwiftFTPError):
    """A cap was reached; the message says which, for the refusal."""


class PeerClosed(SwiftFTPError, ConnectionError):
    """The peer closed the connection before a complete message arrived."""


class ConfigError(SwiftFTPError, ValueError):
    """A configuration value is unknown or invalid; the message names the key.
    ``issues`` lists every problem found, one line each (the message is the first)."""

    def __init__(self, message: str, issues: list[str] | None = None) -> None:
        super().__init__(message)
        self.issues = issues or [message]


class FleetError(SwiftFTPError):
    """The fleet's S3 bucket could not be read or written."""


class RegistryError(ProtocolError):
    """The device registry cannot answer: damaged, unreadable, refused at start, or an
    SQLite error while running.  ``str()`` is one line naming the file and the problem
    (for the log and the command line).  A device whose request needed the registry is
    answered error 0 ("device registry unavailable; try again"), which is why this is a
    :class:`ProtocolError`: a handler that answers those answers this too."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL, "device registry unavailable; try again")
        self.message = message

    def __str__(self) -> str:
        return self.message
