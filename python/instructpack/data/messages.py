"""The messages-format input: one JSON object per line, decoded by msgspec into typed
structs. Extra keys (on the sample or on a message) are kept out of the way, not an error."""

from __future__ import annotations

import msgspec

from ..errors import SampleError


class Message(msgspec.Struct, frozen=True):
    role: str
    content: str
    reasoning_content: str | None = None


class Conversation(msgspec.Struct, frozen=True):
    messages: list[Message]
    unmask: bool = False

    def as_dicts(self) -> list[dict]:
        out = []
        for m in self.messages:
            d = {"role": m.role, "content": m.content}
            if m.reasoning_content is not None:
                d["reasoning_content"] = m.reasoning_content
            out.append(d)
        return out


_decoder = msgspec.json.Decoder(Conversation)


_BOM = b"\xef\xbb\xbf"


def decode_line(raw: bytes) -> Conversation:
    """Decodes one JSONL line; raises SampleError with a reason a person can act on."""
    if raw.startswith(_BOM):  # editors on Windows start UTF-8 files with one; it is not JSON
        raw = raw[len(_BOM):]
    elif raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SampleError("not_utf8", "the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                          "re-encode it as UTF-8")
    if not raw.strip():
        raise SampleError("malformed_json", "empty line; a line must hold one JSON object")
    if b"\x00" in raw and _looks_like_utf16(raw):
        raise SampleError("not_utf8", "the file looks like UTF-16 without a byte-order mark (every other byte is "
                          "0); re-encode it as UTF-8")
    try:
        conv = _decoder.decode(raw)
    except UnicodeDecodeError:
        # msgspec's offset is relative to the string it was decoding; report the line's.
        try:
            raw.decode("utf-8")
            where = ""
        except UnicodeDecodeError as e:
            where = f" (byte {e.start} of the line)"
        raise SampleError("not_utf8", f"not valid UTF-8{where}; re-encode the file as UTF-8") from None
    except RecursionError:  # msgspec recurses per nesting level, also in keys it skips
        raise SampleError("malformed_json", "JSON nested too deeply to decode (in the sample or one of its "
                          "extra keys); flatten or remove the deeply nested value") from None
    except msgspec.ValidationError as e:
        raise SampleError("invalid_sample", f"invalid sample: {e} "
                          '(expected {"messages": [{"role": str, "content": str}, ...]})') from None
    except msgspec.DecodeError as e:
        raise SampleError("malformed_json", f"malformed JSON: {e}") from None
    if not conv.messages:
        raise SampleError("invalid_sample",
                          'invalid sample: "messages" is empty; a sample needs at least one message')
    _check_roles(conv)
    if _may_repeat_a_key(raw, len(conv.messages)):
        _refuse_repeated_keys(raw)
    return conv


ROLES = ("system", "user", "assistant", "tool")


def _check_roles(conv: Conversation) -> None:
    """A role that is a known one in another case ("Assistant") may render, but it would
    not be trained as that role: say so rather than drop the sample as untrained."""
    for i, m in enumerate(conv.messages):
        if m.role not in ROLES and m.role.lower() in ROLES:
            raise SampleError("invalid_sample", f"invalid sample: message {i} has role {m.role!r}; roles are "
                              f"lowercase: write {m.role.lower()!r}")


def _looks_like_utf16(raw: bytes) -> bool:
    # ASCII text in UTF-16 has a 0 byte beside every character; UTF-8 text has none.
    sample = raw[:4096]
    return max(sample[0::2].count(0), sample[1::2].count(0)) * 4 >= len(sample)


_KEYS = (b'"messages"', b'"unmask"', b'"role"', b'"content"')


def _may_repeat_a_key(raw: bytes, messages: int) -> bool:
    """A cheap test, in C (bytes.count), that no key we read appears more often than the
    sample can hold it once; when it does (or the text merely contains such a word), the
    exact test below decides."""
    return (raw.count(b'"messages"') > 1 or raw.count(b'"unmask"') > 1 or raw.count(b'"role"') > messages
            or raw.count(b'"content"') > messages or raw.count(b'"reasoning_content"') > messages)


def _refuse_repeated_keys(raw: bytes) -> None:
    """JSON allows a key twice in one object and keeps the last; a sample with two
    "content"s or two "messages" is ambiguous, so it is refused, naming the key."""
    import json

    def pairs(items: list) -> dict:
        seen = set()
        for key, _ in items:
            if key in seen:
                raise SampleError("invalid_sample", f"invalid sample: the key {key!r} appears twice in one object; "
                                  "JSON keeps the last, which may not be what was meant: keep one")
            seen.add(key)
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
