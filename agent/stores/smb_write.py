"""A signed SMB2 WRITE sent without copying its payload.

smbprotocol builds every request as bytes: a 4 MiB WRITE is copied about
eight times (the request, the header, the signature's zeroed copy, the
signed header, the transport frame) before it reaches the socket, all under
the GIL. That capped SMB backups at a third of what `smbclient` moves
(bench/targets_bench.py). This module sends a WRITE the way the protocol lays it out: the
64-byte SMB2 header and the 48-byte WRITE fields are packed here, the
signature (AES-GMAC, AES-CMAC or HMAC-SHA256, as negotiated) is computed
over the header, the fields and the caller's buffer in place, and the
frame goes out as two `sendall` calls, the second straight from the buffer.

Everything else stays smbprotocol's: the message id and credits come from
its sequence window under its lock, the pending request is registered in
its table, and its receiver thread matches, verifies and hands back the
response. Encrypted sessions (smb_encrypt) take smbprotocol's own path.
Written against smbprotocol 1.17 (pinned in pyproject.toml);
`tests/test_targets.py` checks that both paths put the same bytes on the
server and that the server checks our signatures (it drops a session whose
signature is wrong).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from smbprotocol.connection import Request
from smbprotocol.header import Commands, Smb2Flags, SMB2HeaderRequest
from smbprotocol.open import SMB2WriteRequest

_HEADER = struct.Struct("<4sHHHHHHIIQIIQ16s")  # [MS-SMB2] 2.2.1.2, 64 bytes
_WRITE = struct.Struct("<HHIQ16sIIHHI")  # [MS-SMB2] 2.2.21 without the buffer, 48 bytes
_FRAME = struct.Struct(">I")  # Direct TCP transport length
_WRITE_CMD = 0x0009
_SIGNED = 0x00000008
_MAX_PAYLOAD = 65536
# smbprotocol.connection.SigningAlgorithms values
_HMAC_SHA256, _AES_CMAC, _AES_GMAC = 0, 1, 2
_SMB_3_0_0, _SMB_3_1_1 = 0x0300, 0x0311


class NoCredits(Exception):
    """The session has fewer credits than the WRITE needs (another writer
    took them); nothing was sent."""


def usable(fd) -> bool:
    """The fast path applies: a signed or plain session without encryption."""
    conn = fd.connection
    session = conn.session_table.get(fd.tree_connect.session.session_id)
    return bool(
        session is not None
        and not session.encrypt_data
        and not fd.tree_connect.encrypt_data
        and hasattr(conn, "sequence_lock")
        and hasattr(conn.transport, "_sock_lock")
    )


def _sign_id(conn) -> int:
    if conn.dialect >= _SMB_3_1_1 and conn.signing_algorithm_id is not None:
        return int(conn.signing_algorithm_id)
    return _AES_CMAC if conn.dialect >= _SMB_3_0_0 else _HMAC_SHA256


def signature(conn, key: bytes, message_id: int, parts) -> bytes:
    """The request signature over parts (the header with a zero signature
    first), each fed to the MAC in place."""
    sign_id = _sign_id(conn)
    if sign_id == _AES_GMAC:
        nonce = message_id.to_bytes(8, "little") + (0).to_bytes(4, "little")  # a request, not a cancel
        enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        for p in parts:
            enc.authenticate_additional_data(p)
        enc.finalize()
        return enc.tag
    if sign_id == _AES_CMAC:
        c = cmac.CMAC(algorithms.AES(key))
        for p in parts:
            c.update(p)
        return c.finalize()
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()[:16]


def send_write(fd, data: memoryview, offset: int, credit_request: int) -> Request:
    """Send one WRITE of data at offset on the open fd; the answer comes
    through smbprotocol (fd._write_response(request))."""
    conn = fd.connection
    tree = fd.tree_connect
    session = conn.session_table[tree.session.session_id]
    n = len(data)
    charge = (max(0, n - 1) // _MAX_PAYLOAD) + 1 if conn.supports_multi_credit else 0
    with conn.sequence_lock:
        low, high = conn.sequence_window["low"], conn.sequence_window["high"]
        if charge > high - low:
            raise NoCredits(f"a WRITE of {n} bytes needs {charge} credits, {high - low} are available")
        message_id = low
        conn.sequence_window["low"] += charge if charge > 0 else 1
    signed = bool(session.signing_required and session.signing_key)
    flags = _SIGNED if signed else 0
    credits = credit_request or charge
    fields = _WRITE.pack(49, 0x70, n, offset, fd.file_id, 0, 0, 0, 0, 0)

    def header(sig: bytes) -> bytes:
        return _HEADER.pack(
            b"\xfeSMB",
            64,
            charge,
            0,
            0,
            _WRITE_CMD,
            credits,
            flags,
            0,
            message_id,
            0,
            tree.tree_connect_id,
            session.session_id,
            sig,
        )

    sig = signature(conn, session.signing_key, message_id, (header(bytes(16)), fields, data)) if signed else bytes(16)

    # the pending request, as smbprotocol's own _send registers it
    h = SMB2HeaderRequest()
    h["credit_charge"] = charge
    h["command"] = Commands.SMB2_WRITE
    h["credit_request"] = credits
    h["message_id"] = message_id
    h["session_id"] = session.session_id
    h["tree_id"] = tree.tree_connect_id
    if signed:
        h["flags"].set_flag(Smb2Flags.SMB2_FLAGS_SIGNED)
    h["signature"] = sig
    h["data"] = fields
    request = Request(h, SMB2WriteRequest, conn, session_id=session.session_id)
    conn.outstanding_requests[message_id] = request
    conn._check_worker_running()
    frame = _FRAME.pack(64 + len(fields) + n) + header(sig) + fields
    with conn.transport._sock_lock:
        sock = conn.transport._sock
        sock.sendall(frame)
        sock.sendall(data)
    return request
