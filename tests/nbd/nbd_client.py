"""A minimal asyncio NBD client for the protocol tests: raw frames, no cleverness.

It speaks exactly what the tests need to poke at the server: the greeting, single options with
their replies, and pipelined transmission requests matched to simple replies by handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass

from guest_agent.nbd import protocol as p


@dataclass
class OptionReply:
    option: int
    type: int
    data: bytes


class RawNbdClient:
    """Connect with :meth:`connect`; then ``option`` / ``go`` / ``request`` / ``reply``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.handshake_flags = 0
        self.size = 0
        self.flags = 0
        self._handle = 0
        # handle -> expected read length (for replies that carry data)
        self._read_lengths: dict[int, int] = {}

    @classmethod
    async def connect(
        cls, port: int, *, client_flags: int | None = None, unix: str | None = None
    ) -> RawNbdClient:
        if unix is not None:
            reader, writer = await asyncio.open_unix_connection(unix)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        magic, opt, flags = p.SERVER_GREETING.unpack(await reader.readexactly(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        client.handshake_flags = flags
        if client_flags is None:
            client_flags = p.CLIENT_FIXED_NEWSTYLE | p.CLIENT_NO_ZEROES
        writer.write(p.CLIENT_FLAGS.pack(client_flags))
        await writer.drain()
        return client

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    # --- handshake ------------------------------------------------------------------------

    async def send_option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)
        await self.writer.drain()

    async def read_option_reply(self) -> OptionReply:
        magic, option, rtype, length = p.OPTION_REPLY.unpack(await self.reader.readexactly(20))
        assert magic == p.OPT_REPLY_MAGIC
        return OptionReply(option, rtype, await self.reader.readexactly(length))

    async def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option, collect replies up to the final one (ACK or an error)."""
        await self.send_option(option, data)
        replies = []
        while True:
            reply = await self.read_option_reply()
            replies.append(reply)
            if reply.type == p.REP_ACK or reply.type & (1 << 31):
                return replies

    @staticmethod
    def info_data(name: bytes, requests: tuple[int, ...] = ()) -> bytes:
        return (
            struct.pack(">I", len(name))
            + name
            + struct.pack(f">H{len(requests)}H", len(requests), *requests)
        )

    async def go(self, name: bytes = b"", requests: tuple[int, ...] = (p.INFO_BLOCK_SIZE,)) -> None:
        replies = await self.option(p.OPT_GO, self.info_data(name, requests))
        assert replies[-1].type == p.REP_ACK, replies
        for reply in replies:
            if reply.type == p.REP_INFO and struct.unpack(">H", reply.data[:2])[0] == 0:
                _, self.size, self.flags = p.INFO_EXPORT_BODY.unpack(reply.data)

    # --- transmission ---------------------------------------------------------------------

    def send(
        self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0
    ) -> int:
        """Queue a request (not drained); returns its handle."""
        self._handle += 1
        handle = self._handle
        if cmd == p.CMD_READ:
            self._read_lengths[handle] = length
        self.writer.write(
            p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data
        )
        return handle

    async def reply(self) -> tuple[int, int, bytes]:
        """The next simple reply: (handle, error, data)."""
        magic, error, handle = p.SIMPLE_REPLY.unpack(await self.reader.readexactly(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        length = self._read_lengths.pop(handle, 0)
        data = await self.reader.readexactly(length) if error == 0 and length else b""
        return handle, error, data

    async def call(
        self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0
    ) -> tuple[int, bytes]:
        handle = self.send(cmd, offset, length, data, flags)
        await self.writer.drain()
        got, error, payload = await self.reply()
        assert got == handle
        return error, payload

    async def read(self, offset: int, length: int) -> bytes:
        error, data = await self.call(p.CMD_READ, offset, length)
        assert error == 0, error
        return data

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        error, _ = await self.call(p.CMD_WRITE, offset, len(data), data, flags)
        assert error == 0, error
