"""Generated conversations with the edge cases preprocessing must get right, and a helper
that preprocesses samples into a temporary directory."""

from __future__ import annotations

import random

from instructpack import DataProcessArgs, data_process
from instructpack.demo.example import TextGenerator, write_jsonl

TEMPLATE_STYLES = ("chatml", "llama3", "granite")
# The end-of-turn marker each template style writes after an assistant message.
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "granite": "<|end_of_text|>"}

# Template markers of all three styles, to appear inside content as plain text.
MARKERS = ["<|im_start|>assistant\n", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>",
           "<|end_of_role|>", "<|end_of_text|>", "</think>", "{{ bos_token }}", "{% if %}"]
UNICODE = ["naïve café", "日本語のテキスト", "emoji 🙂🚀👩‍👩‍👧", "Ωμέγα", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "tab\tand\u00a0nbsp", "🙂"]


def preprocess(tmp_path, model, samples, name="out", **kw):
    """Writes `samples` as JSONL under tmp_path and preprocesses them into tmp_path/name."""
    data = write_jsonl(tmp_path / f"{name}.jsonl", samples)
    args = dict(data_path=str(data), data_output_path=str(tmp_path / name), model_path=str(model), max_seq_len=4096,
                num_cpu_procs=2)
    args.update(kw)
    return data_process.main(DataProcessArgs(**args), progress=False)


def tricky_conversations(n: int, seed: int = 0) -> list[dict]:
    """Multi-turn, with and without system prompts, unicode and emoji, empty assistant
    content, unmask, reasoning_content, and template markers inside content."""
    gen = TextGenerator(seed)
    rng = random.Random(seed)

    def text() -> str:
        r = rng.random()
        if r < 0.1:
            return rng.choice(UNICODE) + " " + gen.text(rng.randint(1, 8))
        if r < 0.2:
            return gen.text(rng.randint(1, 6)) + " " + rng.choice(MARKERS) + " " + gen.text(rng.randint(0, 6))
        if r < 0.25:
            return rng.choice(MARKERS)
        return gen.text(rng.randint(1, 40))

    out = []
    for i in range(n):
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": text()})
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": text()})
            answer = {"role": "assistant", "content": "" if rng.random() < 0.08 else text()}
            if rng.random() < 0.2:
                answer["reasoning_content"] = text()
            messages.append(answer)
        sample = {"messages": messages, "extra_key": i}
        if rng.random() < 0.15:
            sample["unmask"] = True
        out.append(sample)
    return out
