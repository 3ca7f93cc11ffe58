"""File names a checkpoint may use for the files it names (shards in an index): plain names inside its own
directory. Stdlib only, shared by the library's loader and the service's upload checks."""

from __future__ import annotations


def check_plain_name(name: object) -> str:
    """Return `name` if it is a plain file name (no folder part, no `..`, not absolute); else ValueError
    saying why."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"must be a non-empty file name, got {name!r}")
    if "/" in name or "\\" in name:
        raise ValueError(f"must be a plain file name inside the checkpoint directory, got {name!r}")
    if name in (".", "..") or "\x00" in name or (len(name) > 1 and name[1] == ":") or len(name) > 255:
        raise ValueError(f"is not a usable file name: {name!r}")
    return name
