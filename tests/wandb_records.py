"""Read the history rows of an offline W&B run from its `.wandb` transaction log.

The file starts with a 7-byte header (`:W&B`, magic 0xBEE1, version 0). LevelDB-style
log records follow in 32 KiB blocks. Each record has a 4-byte checksum, a 2-byte
little-endian length, a 1-byte type (1 full, 2 first, 3 middle, 4 last) and the
payload, a serialised `wandb_internal_pb2.Record`. wandb 0.31 ships no Python
reader for it, so the tests use this one.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

_HEADER_SIZE = 7
_BLOCK_SIZE = 32 * 1024
_RECORD_HEADER_SIZE = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    position = _HEADER_SIZE
    pending = b""
    while position + _RECORD_HEADER_SIZE <= len(data):
        block_left = _BLOCK_SIZE - (position % _BLOCK_SIZE)
        if block_left < _RECORD_HEADER_SIZE:
            position += block_left  # trailer padding of a block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + _RECORD_HEADER_SIZE])
        position += _RECORD_HEADER_SIZE
        payload = data[position : position + length]
        position += length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            yield pending + payload
            pending = b""
        elif kind == 0 and length == 0:
            continue


def _wait_until_written(path: Path, timeout: float = 20.0) -> None:
    # wandb-core may still be appending the last records when `wandb.finish()`
    # returns; wait until the file has stopped growing.
    deadline = time.monotonic() + timeout
    size = -1
    while time.monotonic() < deadline:
        current = path.stat().st_size
        if current == size:
            return
        size = current
        time.sleep(0.5)


def records(run_file: str | Path, kind: str) -> list:
    """Return the payloads of the run's records of type `kind` (`"history"`, `"metric"`, `"alert"`, ...)."""
    from wandb.proto import wandb_internal_pb2

    _wait_until_written(Path(run_file))
    found = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == kind:
            found.append(getattr(record, kind))
    return found


def history_rows(run_file: str | Path) -> list[dict[str, str]]:
    """Return every history row of the run as `{key: value_json}`."""
    return [
        {item.key or "/".join(item.nested_key): item.value_json for item in history.item}
        for history in records(run_file, "history")
    ]


def summary_items(run_file: str | Path) -> dict[str, str]:
    """Return the run's summary as `{key: value_json}`, later updates replacing earlier ones."""
    items = {}
    for summary in records(run_file, "summary"):
        for item in summary.update:
            items[item.key or "/".join(item.nested_key)] = item.value_json
    return items


def config_items(run_file: str | Path) -> dict[str, str]:
    """Return the run's config as `{key: value_json}`, later updates replacing earlier ones.

    Config updates are recorded as `config` records and as the `config` of the `run`
    record that opens the run.
    """
    from wandb.proto import wandb_internal_pb2

    _wait_until_written(Path(run_file))
    items = {}
    for payload in _payloads(Path(run_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            updates = record.config.update
        elif kind == "run":
            updates = record.run.config.update
        else:
            continue
        for item in updates:
            items[item.key or "/".join(item.nested_key)] = item.value_json
    return items
