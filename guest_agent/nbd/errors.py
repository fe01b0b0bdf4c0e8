"""The NBD export's exceptions.

::

    NbdError                    anything the export raises on purpose
    ├── ProtocolError           the client broke the protocol: the connection is dropped
    └── BackendError            the block store failed (broker unreachable, fallback file I/O);
                                the requests it touched are answered with EIO
"""

from __future__ import annotations


class NbdError(Exception):
    """Base class of the export's errors."""


class ProtocolError(NbdError):
    """The client sent something the protocol forbids; the server hangs up."""


class BackendError(NbdError):
    """A block operation could not be carried out; the affected requests get ``EIO``."""
