"""Chat rendering and trained-span detection, without importing torch or transformers'
tokenizer classes (the preprocessing command must start fast).

Rendering goes through transformers' own `render_jinja_template` (a light import), with the
same keyword arguments `apply_chat_template` passes, so the text is exactly what the model
sees at inference.

Trained spans are found by rendering the conversation a second time with every content
replaced by a unique sentinel. That sentinel render shows where the template puts each
message; aligning it with the real render gives the exact character span of each content,
whatever the template does around it (role headers, trimming, reasoning blocks). The
sentinel renders depend only on the roles and fields present, so they are cached.
"""

from __future__ import annotations

import hashlib
import json
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateSyntaxError
from jinja2.sandbox import SecurityError

from ..errors import ChatTemplateError, ConfigError, PathNotFoundError, TemplateError, UnsafeTemplateError
from .messages import Conversation
from .template_module import TemplateModule, looks_like_module, read_template_module, setup_tokenizer

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SENTINEL_RE = re.compile("\ue000(\\d+)([cr])\ue001")


def _sentinel(index: int, field: str) -> str:
    # Private-use code points: no real text or template contains them, and trim/strip keep them.
    return f"\ue000{index}{field}\ue001"


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


@dataclass(frozen=True)
class RoleMarkers:
    """The token sequences that open each role's turn in an InstructLab template module's
    renders, and its end-of-text id: what InstructLab's label rule for such templates scans
    for (encode.py). A sequence is () when the module declares no such token."""

    user: tuple[int, ...]
    assistant: tuple[int, ...]
    system: tuple[int, ...]
    tool_response: tuple[int, ...]
    eos: int


@dataclass(frozen=True)
class TokenizerFiles:
    """What preprocessing needs from a model directory: the Rust tokenizer, the chat
    template and the special-token strings the template may use. With an InstructLab
    template module, `tokenizer_text` is the tokenizer as the module sets it up (its special
    tokens registered) and `role_markers` selects InstructLab's label rule for it."""

    tokenizer_json: Path
    chat_template: str
    special_tokens: dict
    vocab_size: int
    fingerprint: str
    template_fingerprint: str
    template_source: str = "the chat template"  # where it was read, for messages
    tokenizer_text: str | None = None
    role_markers: RoleMarkers | None = None

    def tokenizer(self):
        from tokenizers import Tokenizer

        if self.tokenizer_text is not None:
            return Tokenizer.from_str(self.tokenizer_text)
        return Tokenizer.from_file(str(self.tokenizer_json))


@dataclass(frozen=True)
class TokenizerIdentity:
    """The tokenizer part of a model directory, and the fingerprint preprocessing records:
    token ids depend on tokenizer.json and on the special-token strings."""

    tokenizer_json: Path
    config: dict  # tokenizer_config.json, {} when there is none
    special_tokens: dict
    vocab_size: int
    fingerprint: str


def tokenizer_identity(model_path: str | Path) -> TokenizerIdentity:
    """Reads the tokenizer of `model_path` without needing a chat template."""
    model = Path(model_path)
    if not model.is_dir():
        raise PathNotFoundError("", ("model_path",), "not a directory; give the path of a Hugging Face model or "
                                "tokenizer directory (containing tokenizer.json)", str(model_path))
    tokenizer_json = model / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise PathNotFoundError("", ("model_path",), f"{tokenizer_json} not found: instructpack needs a fast (Rust) "
                                "tokenizer; save one with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`",
                                str(model_path))
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    special = {k: _token_text(config.get(k)) for k in _SPECIAL_TOKEN_KEYS if _token_text(config.get(k)) is not None}

    raw = tokenizer_json.read_bytes()
    from tokenizers import Tokenizer

    # Ids are bounded by the largest id, not the count: added tokens may sit above the vocab.
    vocab_size = max(Tokenizer.from_str(raw.decode("utf-8")).get_vocab(with_added_tokens=True).values()) + 1
    h = hashlib.sha256(raw)
    h.update(json.dumps(special, sort_keys=True).encode())
    return TokenizerIdentity(tokenizer_json, config, special, vocab_size, h.hexdigest()[:16])


def template_fingerprint(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def load_tokenizer_files(model_path: str | Path, chat_tmpl_path: str | Path | None = None) -> TokenizerFiles:
    tok = tokenizer_identity(model_path)
    model = Path(model_path)
    if chat_tmpl_path is not None:
        tmpl_file = Path(chat_tmpl_path)
        if not tmpl_file.is_file():
            raise PathNotFoundError("", ("chat_tmpl_path",), "no such file; give a Jinja chat template file or an "
                                    "InstructLab template module (.py)", str(chat_tmpl_path))
        try:
            template = tmpl_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError("", ("chat_tmpl_path",), f"{tmpl_file} is not UTF-8 text; give a Jinja chat template "
                              "file or an InstructLab template module (.py)", str(chat_tmpl_path)) from None
        if looks_like_module(tmpl_file, template):
            return _module_tokenizer_files(tok, read_template_module(tmpl_file))
        if not _looks_like_jinja(template):
            raise ConfigError("", ("chat_tmpl_path",), f"{tmpl_file} is neither a Jinja chat template (it has no "
                              "{{ }} or {% %} tags) nor an InstructLab template module (a .py file assigning "
                              "SPECIAL_TOKENS and CHAT_TEMPLATE); give one of those", str(chat_tmpl_path))
        source = str(tmpl_file)
    elif (model / "chat_template.jinja").is_file():
        template = (model / "chat_template.jinja").read_text(encoding="utf-8")
        source = str(model / "chat_template.jinja")
    else:
        template = tok.config.get("chat_template")
        source = f"the chat_template of {model / 'tokenizer_config.json'}"
        if isinstance(template, list):  # named templates: the "default" one, as transformers does
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise ConfigError("", ("model_path",), "the tokenizer has no chat template; give one with chat_tmpl_path "
                          "(a Jinja file), or add chat_template.jinja to the model directory", str(model_path))
    return TokenizerFiles(
        tokenizer_json=tok.tokenizer_json,
        chat_template=template,
        special_tokens=tok.special_tokens,
        vocab_size=tok.vocab_size,
        fingerprint=tok.fingerprint,
        template_fingerprint=template_fingerprint(template),
        template_source=source,
    )


def _looks_like_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def _module_tokenizer_files(tok: TokenizerIdentity, module: TemplateModule) -> TokenizerFiles:
    """The tokenizer set up for an InstructLab template module as InstructLab sets it up
    (template_module.setup_tokenizer), and the role markers its label rule scans for."""
    from transformers.tokenization_utils_fast import PreTrainedTokenizerFast  # no torch, unlike AutoTokenizer

    where = f"{module.path}"
    if not module.token("eos"):
        raise ConfigError("", ("chat_tmpl_path",), f"{where}: SPECIAL_TOKENS has no eos token, which InstructLab's "
                          "rule for template modules needs (a sample must end with it)", str(module.path))
    hf = setup_tokenizer(PreTrainedTokenizerFast.from_pretrained(str(tok.tokenizer_json.parent)), module)
    text = hf.backend_tokenizer.to_str()
    from tokenizers import Tokenizer

    rust = Tokenizer.from_str(text)

    def ids(s: str) -> tuple[int, ...]:
        return tuple(rust.encode(s, add_special_tokens=False).ids) if s else ()

    markers = {role: ids(module.token(role)) for role in ("user", "assistant", "system")}
    tool_response: tuple[int, ...] = ()
    start, end = ids(module.token("start_role")), ids(module.token("end_role"))
    if start and end:  # Granite's <|start_of_role|>ROLE<|end_of_role|>
        markers = {role: start + ids(role) + end for role in ("user", "assistant", "system")}
        tool_response = start + ids("tool_response") + end
    eos = ids(module.token("eos"))
    special = {**tok.special_tokens, **{k: getattr(hf, k) for k in ("bos_token", "eos_token", "pad_token")
                                        if getattr(hf, k, None)}}
    vocab_size = max(rust.get_vocab(with_added_tokens=True).values()) + 1
    h = hashlib.sha256(text.encode())
    h.update(json.dumps(special, sort_keys=True).encode())
    return TokenizerFiles(
        tokenizer_json=tok.tokenizer_json,
        chat_template=module.chat_template,
        special_tokens=special,
        vocab_size=vocab_size,
        fingerprint=h.hexdigest()[:16],
        # The label rule differs from a Jinja template's, so the module's tokens count too.
        template_fingerprint=template_fingerprint("module\n" + module.chat_template + json.dumps(module.tokens)),
        template_source=str(module.path),
        tokenizer_text=text,
        role_markers=RoleMarkers(user=markers["user"], assistant=markers["assistant"], system=markers["system"],
                                 tool_response=tool_response, eos=eos[0]),
    )


# A conversation every chat template must render: one that fails on it is broken, whatever the data.
_PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]


class ChatRenderer:
    """Renders conversations with a chat template and finds the trained character spans.
    Building one renders a plain user/assistant exchange: a template that fails on it (a
    syntax error, a bug) is a ChatTemplateError naming the template and its line, before
    any data is read, never an error of every data line."""

    def __init__(self, chat_template: str, special_tokens: dict, source: str = "the chat template"):
        from transformers.utils.chat_template_utils import render_jinja_template

        self._render_jinja = render_jinja_template
        self.chat_template = chat_template
        self.source = source
        self.special_tokens = dict(special_tokens)
        self._sentinel_cache: dict[tuple, tuple] = {}
        try:
            self.render(_PROBE)
        except TemplateError as e:
            raise ChatTemplateError(f"{e}; it fails on a plain exchange of one user and one assistant message "
                                    f"({_PROBE}), so it would fail on every sample: fix the template, or give "
                                    "another with chat_tmpl_path") from None

    def render(self, messages: list[dict]) -> str:
        try:
            rendered = self._render_jinja(conversations=[messages], chat_template=self.chat_template,
                                          add_generation_prompt=False, **self.special_tokens)
        except SecurityError as e:  # the template, not the data, is at fault: no line can be skipped past it
            raise UnsafeTemplateError(f"the chat template tried an unsafe operation, which its sandbox stopped "
                                      f"({e}); use a template you trust (chat_tmpl_path)") from None
        except Exception as e:  # jinja raises TemplateError, but templates can raise anything
            raise TemplateError(f"chat template failed: {e} ({self._where(e)})") from None
        return rendered[0][0]

    def _where(self, error: Exception) -> str:
        """The line of the template that raised, and the template."""
        line = error.lineno if isinstance(error, TemplateSyntaxError) else next(
            (f.lineno for f in reversed(traceback.extract_tb(error.__traceback__)) if f.filename == "<template>"),
            None)
        return f"at line {line} of {self.source}" if line else f"in {self.source}"

    def _sentinel_parts(self, shape: tuple) -> tuple:
        """The sentinel render of a conversation of this shape, split into literal text
        (str) and field markers ((message index, 'c'|'r'))."""
        parts = self._sentinel_cache.get(shape)
        if parts is None:
            messages = []
            for i, (role, has_reasoning) in enumerate(shape):
                m = {"role": role, "content": _sentinel(i, "c")}
                if has_reasoning:
                    m["reasoning_content"] = _sentinel(i, "r")
                messages.append(m)
            pieces = _SENTINEL_RE.split(self.render(messages))
            parts = []
            for k, piece in enumerate(pieces):
                if k % 3 == 0:
                    if piece:
                        parts.append(piece)
                elif k % 3 == 1:
                    parts.append((int(piece), pieces[k + 1]))
            parts = tuple(parts)
            self._sentinel_cache[shape] = parts
        return parts

    def _end_of_turn(self, shape: tuple, index: int) -> str:
        """What the template writes right after message `index` when the conversation ends
        there, without trailing whitespace: the end-of-turn marker(s)."""
        parts = self._sentinel_parts(shape[: index + 1])
        last = max((k for k, p in enumerate(parts) if isinstance(p, tuple) and p[0] == index), default=None)
        if last is None:
            return ""
        return "".join(p for p in parts[last + 1:] if isinstance(p, str)).rstrip()

    def render_with_spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """Returns the rendered text and the sorted, disjoint trained character spans."""
        messages = conv.as_dicts()
        text = self.render(messages)
        shape = tuple((m.role, m.reasoning_content is not None) for m in conv.messages)
        parts = self._sentinel_parts(shape)

        # Walk the real render along the sentinel render.
        field_spans: list[tuple[int, int, int]] = []  # (message index, start, end) in render order
        pos = 0
        for k, part in enumerate(parts):
            if isinstance(part, str):
                if not text.startswith(part, pos):
                    raise TemplateError(_misaligned(text, pos, part))
                pos += len(part)
                continue
            index, field = part
            m = conv.messages[index]
            value = m.content if field == "c" else m.reasoning_content
            following = parts[k + 1] if k + 1 < len(parts) and isinstance(parts[k + 1], str) else ""
            for candidate in _rendered_variants(value):
                if text.startswith(candidate, pos) and text.startswith(following, pos + len(candidate)):
                    break
            else:
                raise TemplateError(_misaligned(text, pos, value))
            field_spans.append((index, pos, pos + len(candidate)))
            pos += len(candidate)
        if pos != len(text):
            raise TemplateError(_misaligned(text, pos, ""))

        trained = _trained_messages(conv)
        spans = []
        k = 0
        while k < len(field_spans):
            index, start, end = field_spans[k]
            # Fields of one message rendered back to back (reasoning, then content) form one
            # span, so the template text between them (e.g. "</think>") is trained too.
            while k + 1 < len(field_spans) and field_spans[k + 1][0] == index:
                k += 1
                end = field_spans[k][2]
            if index in trained:
                # An assistant turn trains its end-of-turn (the model must learn to stop);
                # other turns trained with "unmask" train their content only, as InstructLab does.
                tail = 0
                if conv.messages[index].role == "assistant":
                    tail = _common_prefix_len(self._end_of_turn(shape, index), text, end)
                spans.append((start, end + tail))
            k += 1
        return text, _merge(spans)


def _trained_messages(conv: Conversation) -> set[int]:
    if conv.unmask:
        return {i for i, m in enumerate(conv.messages) if m.role != "system"}
    return {i for i, m in enumerate(conv.messages) if m.role == "assistant"}


def _rendered_variants(value: str) -> list[str]:
    """How templates commonly print a field: as is, or trimmed."""
    out = []
    for v in (value, value.strip(), value.strip("\n"), value.lstrip(), value.rstrip()):
        if v not in out:
            out.append(v)
    return out


def _common_prefix_len(prefix: str, text: str, pos: int) -> int:
    n = 0
    while n < len(prefix) and pos + n < len(text) and text[pos + n] == prefix[n]:
        n += 1
    return n


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _misaligned(text: str, pos: int, expected: str) -> str:
    return (f"the chat template renders this conversation differently from its structure (at character {pos}: "
            f"expected {expected[:40]!r}, found {text[pos:pos + 40]!r}); the template changes message content "
            "in a way instructpack cannot map to tokens")
