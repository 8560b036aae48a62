"""Export files edited on purpose, for the tests of the header checks."""

import json

from seedslot.checkpoints import frame
from seedslot.export import EXPORT_MAGIC, EXPORT_VERSION


def reframe(good: bytes, edit) -> bytes:
    """The export with its JSON header edited and the hash recomputed: a deliberate tamper."""
    body = good[56:]
    n = int.from_bytes(body[:4], "little")
    header = edit(json.loads(body[4 : 4 + n]))
    head = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return b"".join(frame(EXPORT_MAGIC, EXPORT_VERSION, [len(head).to_bytes(4, "little") + head, body[4 + n :]]))
