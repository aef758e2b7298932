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
    return conv
