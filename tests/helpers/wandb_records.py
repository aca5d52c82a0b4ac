"""Read a wandb offline run file (run-<id>.wandb) back: wandb's transaction log is a LevelDB-style
log (32 KiB blocks of records with a 7-byte header) after a 7-byte ':W&B' file header, each record
one protobuf `wandb.proto.wandb_internal_pb2.Record`. wandb ships no Python reader any more."""

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def history(path: Path) -> list[dict]:
    """The logged rows: {key: value} (values JSON-decoded)."""
    import json

    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def of_type(path: Path, kind: str) -> list:
    return [getattr(r, kind) for r in records(path) if r.WhichOneof("record_type") == kind]


def wait_until_closed(path: Path, timeout: float = 60.0) -> None:
    """wandb-core writes the log from its own process: wait for the run's exit record."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if of_type(path, "exit"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} got no exit record within {timeout:.0f} s")
