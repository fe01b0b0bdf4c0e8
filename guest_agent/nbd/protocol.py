"""NBD wire constants and framing (NetworkBlockDevice/nbd ``doc/proto.md``).

Only what the export speaks: the fixed newstyle handshake with ``NBD_OPT_EXPORT_NAME``,
``ABORT``, ``LIST``, ``INFO``, ``GO`` and ``STRUCTURED_REPLY`` (declined: every reply is a
simple reply), and the transmission commands ``READ``, ``WRITE``, ``DISC``, ``FLUSH``, ``TRIM``
and ``WRITE_ZEROES`` with ``FUA``. Everything here is pure: struct layouts and small encoders the
server and the tests share.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# --- handshake -------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1
CLIENT_KNOWN_FLAGS = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags (sent with the export size)
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8

# --- transmission ----------------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# command flags each command accepts; anything else is EINVAL (proto.md "Error values")
ALLOWED_CMD_FLAGS = {
    CMD_READ: CMD_FLAG_FUA,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# --- block size constraints (NBD_INFO_BLOCK_SIZE) ---------------------------------------------

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_BLOCK = 32 * 1024 * 1024
"""Largest READ/WRITE/WRITE_ZEROES length served; the spec says any length below 2^25 must not
be treated as an attack, and qemu writes up to ~1 MiB, so 32 MiB leaves room."""

MAX_OPTION_DATA = 64 * 1024
"""Longest option payload read during the handshake (export names are at most 4 KiB)."""

# --- structs ---------------------------------------------------------------------------------

SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes unless NO_ZEROES)
INFO_EXPORT_BODY = struct.Struct(">HQH")
INFO_BLOCK_SIZE_BODY = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle


class Request(NamedTuple):
    """One transmission-phase request header."""

    flags: int
    type: int
    handle: int
    offset: int
    length: int


def parse_request(header: bytes) -> Request:
    """Decode a 28-byte request header; raises :class:`ValueError` on a bad magic."""
    magic, flags, type_, handle, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ValueError(f"bad request magic {magic:#x}")
    return Request(flags, type_, handle, offset, length)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply (header and data in one buffer)."""
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply_type, len(data)) + data


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header (the caller appends read data for a successful READ)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def transmission_flags(*, read_only: bool = False, multi_conn: bool = True) -> int:
    """The flags the export advertises: flush, FUA, trim and write-zeroes are always served."""
    flags = (
        TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
    )
    if read_only:
        flags |= TFLAG_READ_ONLY
    if multi_conn:
        # one dispatcher serves every connection of the export, so a FLUSH on any connection
        # covers the writes acknowledged on all of them
        flags |= TFLAG_CAN_MULTI_CONN
    return flags
