"""Built-in examples: a tiny byte-level BPE tokenizer with real-style chat templates, and
generated chat data. Used by the demo, the tests and the benchmarks, so nothing is ever
downloaded. Writing the tokenizer files needs only `tokenizers` (no transformers, no torch).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

# Templates in the style of three model families, written the way their Hub templates are:
# ChatML (Qwen3-like, renders reasoning_content in <think>), Llama-3 (trims content,
# ignores reasoning), Granite 3 (role markers, <|end_of_text|> ends every turn).
_ROLE_CHECK = (
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('Unknown role: ' + message['role']) }}{%- endif %}"
)
CHAT_TEMPLATES = {
    "chatml": (
        "{%- for message in messages %}" + _ROLE_CHECK +
        "{%- if message['role'] == 'assistant' and message.reasoning_content is defined"
        " and message.reasoning_content is not none %}"
        "{{- '<|im_start|>assistant\\n<think>\\n' + message.reasoning_content.strip('\\n')"
        " + '\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token }}{%- for message in messages %}" + _ROLE_CHECK +
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "granite": (
        "{%- for message in messages %}" + _ROLE_CHECK +
        "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content']"
        " + '<|end_of_text|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
    ),
}
_SPECIAL_TOKENS = {
    "chatml": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|endoftext|>"},
    "granite": {"eos_token": "<|end_of_text|>", "pad_token": "<|endoftext|>"},
}
ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>",
]

_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "an", "or", "el", "is", "um", "th",
              "st", "qu"]


def _word_list(rng: random.Random, size: int = 600) -> list[str]:
    words = {"the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "with", "as", "on", "be"}
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


class TextGenerator:
    """Deterministic pseudo-text with a Zipf word distribution, punctuation, numbers, code
    and some non-ASCII, so BPE training and tokenization behave like on real chat data."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.words = _word_list(self.rng)
        weights = [1.0 / (rank + 1) for rank in range(len(self.words))]
        total = sum(weights)
        self.cum = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cum.append(acc)

    def words_(self, n: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cum, k=n)

    def text(self, n_words: int) -> str:
        rng = self.rng
        out: list[str] = []
        for i, w in enumerate(self.words_(n_words)):
            r = rng.random()
            if r < 0.03:
                w = str(rng.randint(0, 99999))
            elif r < 0.04:
                w = rng.choice(["café", "naïve", "日本語", "привет", "🙂", "Δx", "→"])
            elif r < 0.05:
                w = f"`{w}_{rng.randint(0, 9)}()`"
            if i == 0 or out[-1].endswith((".", "?", "!")):
                w = w.capitalize()
            out.append(w)
            r = rng.random()
            if r < 0.08:
                out[-1] += "."
            elif r < 0.11:
                out[-1] += ","
            elif r < 0.112:
                out[-1] += ".\n\n"
        return " ".join(out).replace("\n\n ", "\n\n")


def generate_conversations(n: int, seed: int = 0, max_turns: int = 4, median_words: float = 60.0,
                           sigma: float = 1.1, max_words: int = 4000) -> Iterator[dict]:
    """Messages-format samples: optional system prompt, 1..max_turns user/assistant turns,
    heavy-tailed (log-normal) message lengths."""
    gen = TextGenerator(seed)
    rng = gen.rng

    def length() -> int:
        return max(1, min(max_words, int(math.exp(rng.gauss(math.log(median_words), sigma)))))

    for _ in range(n):
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": gen.text(rng.randint(5, 30))})
        for _turn in range(rng.randint(1, max_turns)):
            messages.append({"role": "user", "content": gen.text(max(1, length() // 3))})
            messages.append({"role": "assistant", "content": gen.text(length())})
        yield {"messages": messages}


def write_jsonl(path: str | Path, samples) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return path


def build_tokenizer(out_dir: str | Path, template: str = "chatml", vocab_size: int = 1000,
                    corpus_words: int = 200_000, seed: int = 0) -> Path:
    """Trains a byte-level BPE tokenizer on generated text and saves it in Hugging Face
    format (tokenizer.json, tokenizer_config.json, chat_template.jinja), loadable by
    `transformers.AutoTokenizer.from_pretrained(out_dir)`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if template not in CHAT_TEMPLATES:
        raise ValueError(f"template must be one of {sorted(CHAT_TEMPLATES)}, got {template!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = TextGenerator(seed)
    corpus = [gen.text(200) for _ in range(max(1, corpus_words // 200))]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=ADDED_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))

    specials = _SPECIAL_TOKENS[template]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATES[template])
    return out


# A fact table the model can learn in a few dozen steps: the answer depends only on which
# city the (otherwise random) question names, so a falling loss and the right greedy
# answer show that training works.
FACTS = {"Kalomi": "The river of Kalomi is Suta.", "Verida": "The river of Verida is Ormel.",
         "Tanepo": "The river of Tanepo is Quisan.", "Ristal": "The river of Ristal is Davek."}


def fact_question(city: str, filler: str = "") -> str:
    return f"{filler} Which river flows through {city}?".strip()


def generate_fact_conversations(n: int, seed: int = 0) -> Iterator[dict]:
    """Short conversations asking for the river of one of four cities, with random filler
    words before the question and the fixed answer from FACTS."""
    gen = TextGenerator(seed)
    rng = gen.rng
    cities = sorted(FACTS)
    for _ in range(n):
        city = rng.choice(cities)
        filler = gen.text(rng.randint(0, 12)) if rng.random() < 0.7 else ""
        yield {"messages": [{"role": "user", "content": fact_question(city, filler)},
                            {"role": "assistant", "content": FACTS[city]}]}


def build_tiny_model(out_dir: str | Path, tokenizer_dir: str | Path, *, hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, seed: int = 0, architecture: str = "llama",
                     initializer_range: float = 0.02, **config: object) -> Path:
    """A randomly initialised causal LM (`architecture`: a transformers model type such as
    "llama" or "qwen3") sized to the tokenizer, saved with the tokenizer files as a Hugging
    Face model directory that `from_pretrained` loads. A larger `initializer_range` gives
    an output layer whose logits can grow large without training it (frozen under LoRA).
    `config`: more fields of the model's config (the experts of a mixture-of-experts model)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(architecture, vocab_size=len(tokenizer), hidden_size=hidden_size,
                                  intermediate_size=hidden_size * 2, num_hidden_layers=layers,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  head_dim=hidden_size // heads, max_position_embeddings=4096,
                                  initializer_range=initializer_range,
                                  tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return out
