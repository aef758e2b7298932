"""The types InstructLab's chat template modules declare their special tokens with."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class TokenInfo:
    token: str
    add_to_tokenizer: bool = False  # registered as a special token of the tokenizer


def _empty() -> TokenInfo:
    return TokenInfo("")


@dataclass
class SpecialTokens:
    """The tokens a template uses, by role (fields in InstructLab's order; "" when unused)."""
    system: TokenInfo = field(default_factory=_empty)
    user: TokenInfo = field(default_factory=_empty)
    assistant: TokenInfo = field(default_factory=_empty)
    eos: TokenInfo = field(default_factory=_empty)
    pad: TokenInfo = field(default_factory=_empty)
    bos: TokenInfo = field(default_factory=_empty)
    start_role: TokenInfo = field(default_factory=_empty)
    end_role: TokenInfo = field(default_factory=_empty)
    tool: TokenInfo = field(default_factory=_empty)

    def get_tokens_to_add(self) -> list[str]:
        """The tokens to register, in field order (repeats included, as InstructLab lists them)."""
        return [getattr(self, f.name).token for f in fields(self)
                if getattr(self, f.name).add_to_tokenizer and getattr(self, f.name).token]
