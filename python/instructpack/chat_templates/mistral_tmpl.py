"""Mistral's instruction format: <s>, then [INST] user [/INST] and the assistant's reply with
</s> for each exchange; an optional system message goes before the first user message."""

from instructpack.chat_templates.utils import SpecialTokens, TokenInfo

SPECIAL_TOKENS = SpecialTokens(
    bos=TokenInfo("<s>", add_to_tokenizer=True),
    eos=TokenInfo("</s>", add_to_tokenizer=True),
    user=TokenInfo("[INST]", add_to_tokenizer=False),
    assistant=TokenInfo("[/INST]", add_to_tokenizer=False),
)

CHAT_TEMPLATE = (
    "{%- set has_system = messages[0]['role'] == 'system' %}"
    "{%- set turns = messages[1:] if has_system else messages %}"
    "{{ '<s>' }}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set prefix = messages[0]['content'] + '\n\n' if loop.first and has_system else '' %}"
    "{{- ' [INST] ' + prefix + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'pretraining' %}"
    "{{- '<|pretrain|>' + message['content'] + '</s><|/pretrain|>' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + '</s>' }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)
