"""Record shapes → one canonical LLaVA record (stdlib only, no torch).

The canonical record is LLaVA's: ``{"id", "image" (absent for a text-only record), "conversations":
[{"from": "system"?}, {"from": "human"}, {"from": "gpt"}, ...]}``; every other top-level field is kept.
Shapes read (`to_canonical` returns the shape's name beside the record):

- ``llava``: LLaVA ``conversations`` with ``from``/``value`` and roles human/gpt. Kept as it is.
- ``sharegpt``: the same with user/assistant/system roles (or a top-level ``system``). Kept as it is.
- ``openai-messages``: ``messages`` (or ``conversations``) of ``role``/``content``, the content a string or
  a list of parts (``text``; ``image_url``, ``input_image`` or ``image``, with a relative path or a
  ``{"type": "image"}`` that takes the next of the record's ``images``). Converted: each image part becomes
  ``<image>`` in the text, parts joined by newlines.
- ``cc-sbu-align``: an annotation ``{"image_id", "caption"}`` of CC-SBU-Align (MiniGPT-4's stage-2 data).
  Converted: the question is `CC_SBU_PROMPT`, the answer the caption, the image ``image/<image_id>.jpg``.

A record without an ``id`` gets its 0-based position as id. ``image`` may be one path or a list of one
path; a record with two or more images is refused by name (`MULTI_IMAGE`): DiSP scores and holds the
visual tokens of one image per sample.
"""

from __future__ import annotations

from typing import Any

from disp.constants import IMAGE_PLACEHOLDER
from disp.images import DataError, _record_error

CC_SBU_PROMPT = "Describe this image in detail."
CC_SBU_IMAGE_DIR = "image"
USER_ROLES, ASSISTANT_ROLES, SYSTEM_ROLES = ("human", "user"), ("gpt", "assistant"), ("system",)
MULTI_IMAGE = ("multi-image records are not supported: DiSP scores and holds the visual tokens of one image "
               "per sample; split the record into one record per image")
_ROLE_OUT = {"user": "human", "assistant": "gpt", "system": "system"}
_IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def _image_list(rec: dict, source: str, index: int, rid: Any) -> list[Any]:
    """The record's top-level image names (``image`` or ``images``), without checking them."""
    if rec.get("image") is not None and rec.get("images") is not None:
        raise _record_error(source, index, rid, "images", "is given beside 'image'; give one of them")
    key = "images" if rec.get("images") is not None else "image"
    value = rec.get(key)
    if value is None:
        return []
    if isinstance(value, list):
        if len(value) > 1:
            raise _record_error(source, index, rid, key, f"lists {len(value)} images; {MULTI_IMAGE}")
        return value
    return [value]


def _part_path(part: dict, source: str, index: int, rid: Any, field: str) -> str | None:
    """The image path an image content part names, or None for a bare ``{"type": "image"}``."""
    value = part.get("image_url", part.get("image", part.get("path", part.get("url"))))
    if isinstance(value, dict):
        value = value.get("url", value.get("path"))
    if value is None:
        return None
    if not isinstance(value, str):
        raise _record_error(source, index, rid, field, f"must name an image path, got {type(value).__name__}")
    lower = value[:16].lower()
    if lower.startswith("data:"):
        raise _record_error(source, index, rid, field, "is a data: URL; embedded images are read only from "
                            "parquet or Hugging Face datasets: write the image to a file and give its path")
    if lower.startswith(("http://", "https://")):
        raise _record_error(source, index, rid, field, "is a remote URL; images are not downloaded: put the "
                            "file beside the data and give its relative path")
    return value.removeprefix("file://")


def _message_text(content: Any, role: str, source: str, index: int, rid: Any, field: str,
                  images: list[Any]) -> str:
    """Text of one message: a string as it is, a parts list joined by newlines with ``<image>`` per image."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _record_error(source, index, rid, field,
                            f"must be a string or a list of content parts, got {type(content).__name__}")
    pieces = []
    for p, part in enumerate(content):
        where = f"{field}[{p}]"
        if isinstance(part, str):
            pieces.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text", "output_text"):
            pieces.append(part.get("text"))
            if not isinstance(pieces[-1], str):
                raise _record_error(source, index, rid, f"{where}.text", "must be a string")
        elif kind in _IMAGE_PART_TYPES:
            if role != "user":
                raise _record_error(source, index, rid, where, f"is an image in a {role!r} message; only "
                                    "user messages may hold the image")
            images.append(_part_path(part, source, index, rid, where))
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise _record_error(source, index, rid, where, f"has unsupported type {kind!r}; expected text, "
                                "image_url, input_image or image")
    return "\n".join(pieces)


def _from_messages(rec: dict, key: str, source: str, index: int, rid: Any) -> dict:
    messages = rec[key]
    if not isinstance(messages, list):
        raise _record_error(source, index, rid, key, f"must be a list of messages, got {type(messages).__name__}")
    top = _image_list(rec, source, index, rid)
    named: list[Any] = []
    turns = []
    for m, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _record_error(source, index, rid, f"{key}[{m}]", f"must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in _ROLE_OUT:
            raise _record_error(source, index, rid, f"{key}[{m}].role",
                                f"must be 'system', 'user' or 'assistant', got {role!r}")
        text = _message_text(msg.get("content"), role, source, index, rid, f"{key}[{m}].content", named)
        turns.append({"from": _ROLE_OUT[role], "value": text})
    paths = [p for p in named if p is not None]
    bare = len(named) - len(paths)
    if bare > len(top):
        raise _record_error(source, index, rid, key, f"has {bare} image part(s) without a path but the record "
                            f"lists {len(top)} image(s)")
    names = list(dict.fromkeys(paths + top))
    if len(names) > 1 or len(named) > 1:
        raise _record_error(source, index, rid, key, f"holds {max(len(names), len(named))} images; {MULTI_IMAGE}")
    out = {k: v for k, v in rec.items() if k not in (key, "images", "image")}
    out.setdefault("id", rid if rid is not None else index)
    if names:
        out["image"] = names[0]
    out["conversations"] = turns
    return out


def _from_cc_sbu(rec: dict, source: str, index: int) -> dict:
    image_id = rec.get("image_id")
    if isinstance(image_id, bool) or not isinstance(image_id, str | int) or not str(image_id).strip():
        raise _record_error(source, index, None, "image_id", f"must be a non-empty string or integer, got {image_id!r}")
    out = {k: v for k, v in rec.items() if k not in ("image_id", "caption")}
    out.update({"id": rec.get("id", image_id), "image": f"{CC_SBU_IMAGE_DIR}/{image_id}.jpg", "conversations": [
        {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{CC_SBU_PROMPT}"},
        {"from": "gpt", "value": rec.get("caption")}]})
    return out


def to_canonical(rec: Any, index: int, source: str) -> tuple[dict, str]:
    """(canonical LLaVA record, shape name) of one record; DataError naming the record and field.

    A LLaVA or ShareGPT record comes back as the same object (with ``id`` added when it has none);
    the turn-by-turn checks are `disp.data`'s.
    """
    if not isinstance(rec, dict):
        raise DataError(f"{source}: record {index}: must be an object, got {type(rec).__name__}",
                        source=source, index=index)
    rid = rec.get("id")
    conv = rec.get("conversations")
    if isinstance(conv, list) and conv and all(isinstance(t, dict) and "role" in t for t in conv):
        return _from_messages(rec, "conversations", source, index, rid), "openai-messages"
    if "conversations" in rec:
        roles = {t.get("from") for t in conv if isinstance(t, dict)} if isinstance(conv, list) else set()
        shape = "sharegpt" if roles & {"user", "assistant", "system"} or "system" in rec else "llava"
        if "images" in rec or isinstance(rec.get("image"), list):
            names = _image_list(rec, source, index, rid)
            rec = {k: v for k, v in rec.items() if k not in ("images", "image")} | (
                {"image": names[0]} if names else {})
        return (rec if "id" in rec else {"id": index, **rec}), shape
    if "messages" in rec:
        return _from_messages(rec, "messages", source, index, rid), "openai-messages"
    if "caption" in rec and "image_id" in rec:
        return _from_cc_sbu(rec, source, index), "cc-sbu-align"
    raise _record_error(source, index, rid, "conversations", "is missing: a record needs 'conversations' (LLaVA, "
                        "ShareGPT), 'messages' (OpenAI) or 'image_id' and 'caption' (CC-SBU-Align)")
