"""InstructLab's chat template modules as chat_tmpl_path: a .py file that assigns
`SPECIAL_TOKENS = SpecialTokens(name=TokenInfo("<tok>", add_to_tokenizer=True), ...)` and
`CHAT_TEMPLATE = "..."` (InstructLab's chat_templates/ and instructpack.chat_templates hold
such modules). It is read, not run: the module is parsed and only those two assignments,
made of literals, are taken; anything else in them is an error naming the file and line.

The tokenizer is then set up as InstructLab sets it up for such a template (its
`setup_tokenizer_from_new_chat_template`): bos, eos and pad (eos when the module has none)
become its special tokens, every token marked add_to_tokenizer is registered as an extra
special token, automatic bos/eos insertion is off, and the module's template replaces the
tokenizer's. Labels then follow InstructLab's rule for these templates (encode.py): after a
role's marker tokens, everything up to the next role marker is trained, for assistant
messages (and every non-system one with "unmask").
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

TOKEN_FIELDS = ("system", "user", "assistant", "eos", "pad", "bos", "start_role", "end_role", "tool")


@dataclass(frozen=True)
class TemplateModule:
    path: Path
    chat_template: str
    tokens: dict[str, tuple[str, bool]]  # field -> (token, add_to_tokenizer), every field ("" if unset)

    def token(self, name: str) -> str:
        return self.tokens[name][0]

    def tokens_to_add(self) -> list[str]:
        return [token for token, add in self.tokens.values() if add and token]


def looks_like_module(path: Path, text: str) -> bool:
    """A Python template module rather than a Jinja template."""
    if path.suffix == ".py":
        return True
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return False
    return any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CHAT_TEMPLATE" for t in node.targets)
               for node in tree.body)


def read_template_module(path: Path) -> TemplateModule:
    text = path.read_text(encoding="utf-8")

    def fail(node: ast.AST | None, problem: str):
        line = f", line {node.lineno}" if node is not None and hasattr(node, "lineno") else ""
        raise ConfigError("", ("chat_tmpl_path",), f"{path}{line}: {problem}; an InstructLab template module assigns "
                          "SPECIAL_TOKENS = SpecialTokens(role=TokenInfo(\"<token>\", add_to_tokenizer=True), ...) "
                          "and CHAT_TEMPLATE = \"<a Jinja template>\", with literal values", str(path))

    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        fail(e, f"not valid Python ({e.msg})")
    assigned = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            assigned[node.targets[0].id] = node.value
    if "CHAT_TEMPLATE" not in assigned:
        fail(None, "no CHAT_TEMPLATE assignment")
    if "SPECIAL_TOKENS" not in assigned:
        fail(None, "no SPECIAL_TOKENS assignment")
    template = _string(assigned["CHAT_TEMPLATE"], fail)
    call = assigned["SPECIAL_TOKENS"]
    if not (isinstance(call, ast.Call) and _name(call.func) == "SpecialTokens") or call.args:
        fail(call, "SPECIAL_TOKENS is not a SpecialTokens(...) call with keyword arguments")
    tokens = {name: ("", False) for name in TOKEN_FIELDS}
    for keyword in call.keywords:
        if keyword.arg not in TOKEN_FIELDS:
            fail(keyword.value, f"SpecialTokens has no field {keyword.arg!r} (fields: {', '.join(TOKEN_FIELDS)})")
        tokens[keyword.arg] = _token_info(keyword.value, fail)
    return TemplateModule(path=path, chat_template=template, tokens=tokens)


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _string(node: ast.AST, fail) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _string(node.left, fail) + _string(node.right, fail)
    fail(node, "CHAT_TEMPLATE must be a string literal (or literals joined with +)")


def _token_info(node: ast.AST, fail) -> tuple[str, bool]:
    if not (isinstance(node, ast.Call) and _name(node.func) == "TokenInfo"):
        fail(node, "each special token must be TokenInfo(\"<token>\", add_to_tokenizer=...)")
    values = {"token": None, "add_to_tokenizer": ast.Constant(False)}
    for name, arg in zip(("token", "add_to_tokenizer"), node.args):
        values[name] = arg
    for keyword in node.keywords:
        values[keyword.arg] = keyword.value
    token, add = values.get("token"), values.get("add_to_tokenizer")
    if not (isinstance(token, ast.Constant) and isinstance(token.value, str)):
        fail(node, "a TokenInfo's token must be a string literal")
    if not (isinstance(add, ast.Constant) and isinstance(add.value, bool)):
        fail(node, "a TokenInfo's add_to_tokenizer must be True or False")
    return token.value, add.value


def setup_tokenizer(tokenizer, module: TemplateModule):
    """`tokenizer` (a transformers tokenizer) set up for the module's template, as InstructLab
    does it; returned for convenience."""
    from transformers import __version__ as transformers_version

    eos = module.token("eos")
    pad = module.token("pad") or eos
    tokenizer.add_special_tokens({"bos_token": module.token("bos"), "eos_token": eos, "pad_token": pad})
    key = "extra_special_tokens" if int(transformers_version.split(".")[0]) >= 5 else "additional_special_tokens"
    tokenizer.add_special_tokens({key: module.tokens_to_add()})
    for flag in ("add_bos_token", "add_eos_token"):
        if getattr(tokenizer, flag, False):
            setattr(tokenizer, flag, False)
    tokenizer.chat_template = module.chat_template
    return tokenizer
