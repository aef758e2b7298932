"""The legacy Granite format: <|system|>, <|user|> and <|assistant|> headers on their own
line; an assistant message ends with <|endoftext|>. (`use_legacy_tmpl=True` selects it.)"""

from instructpack.chat_templates.utils import SpecialTokens, TokenInfo

SPECIAL_TOKENS = SpecialTokens(
    system=TokenInfo("<|system|>", add_to_tokenizer=True),
    user=TokenInfo("<|user|>", add_to_tokenizer=True),
    assistant=TokenInfo("<|assistant|>", add_to_tokenizer=True),
    eos=TokenInfo("<|endoftext|>", add_to_tokenizer=True),
    pad=TokenInfo("<|pad|>", add_to_tokenizer=True),
    bos=TokenInfo("<|begginingoftext|>", add_to_tokenizer=True),  # sic: InstructLab's spelling
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = message['role'] %}"
    "{% if role == 'pretraining' %}"
    "{{ '<|pretrain|>' + message['content'] + '<|endoftext|><|/pretrain|>' }}"
    "{% elif role in ['system', 'user'] %}"
    "{{ '<|' + role + '|>\n' + message['content'] + '\n' }}"
    "{% elif role == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|endoftext|>' + ('' if loop.last else '\n') }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)
