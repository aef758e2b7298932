"""The messages-format input: one JSON object per line, decoded by msgspec into typed
structs. Extra keys (on the sample or on a message) are kept out of the way, not an error."""

from __future__ import annotations

import msgspec


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


class SampleError(ValueError):
    """Why one sample cannot be used; `kind` names the class of problem for reports."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class InputError(ValueError):
    """A bad input line. The message names the file and line, what is wrong and the fix."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


_decoder = msgspec.json.Decoder(Conversation)


def decode_line(raw: bytes) -> Conversation:
    """Decodes one JSONL line; raises SampleError with a reason a person can act on."""
    try:
        conv = _decoder.decode(raw)
    except UnicodeDecodeError as e:
        raise SampleError("not_utf8", f"not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    except msgspec.ValidationError as e:
        raise SampleError("invalid_sample", f"invalid sample: {e} (expected {{\"messages\": [{{\"role\": str, \"content\": str}}, ...]}})") from None
    except msgspec.DecodeError as e:
        raise SampleError("malformed_json", f"malformed JSON: {e}") from None
    if not conv.messages:
        raise SampleError("invalid_sample", "invalid sample: \"messages\" is empty; a sample needs at least one message")
    return conv
