"""Tokenizer parity sweep over every text of every dataset in $NESTED_REFT_DATA (not a sample).

Compares data.Tokenizer (vocab.json + merges.txt) with two oracles on every string field of every record of
every dataset file, on every loaded question's chat prompt, and on every SFT sequence:
  * transformers' Qwen2TokenizerFast from the same files (+ Qwen2.5's added-token table);
  * an independent pure-Python byte-level BPE (regex split + NFC + merge ranks, as the original slow
    Qwen2Tokenizer), sharing no code with the `tokenizers` library;
checks decode(encode(x)) == NFC(x) (skip_special_tokens=False), and compares data.chat_prompt (and the SFT text)
with transformers' apply_chat_template under the Qwen2.5-Math-Instruct chat template (written out below: its
default system prompt is the spec's qwen_math one). Prints the mismatch counts (about 4 minutes on 2 cores).

    NESTED_REFT_DATA=../shared/data python bench/tokenizer_sweep.py
"""
import argparse
import csv
import json
import os
import sys
import time
import unicodedata
from functools import lru_cache
from pathlib import Path

import regex

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

# Qwen2's pre-tokenizer pattern, written out here (as in Qwen's own slow tokenizer), not taken from data.py
PAT = regex.compile(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def bytes_to_unicode():
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class PyBPE:
    """The slow GPT-2 / Qwen2 algorithm: split on added tokens, NFC, regex pre-tokens, byte map, rank merges."""

    def __init__(self, d: Path):
        self.vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        lines = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(l.split(" ")) for l in lines if l and not l.startswith("#version")]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.b2u = bytes_to_unicode()
        nxt = len(self.vocab)
        self.added = {}
        for content, _ in data.QWEN2_ADDED_TOKENS:
            self.added[content] = nxt
            nxt += 1
        self.added_re = regex.compile("(" + "|".join(regex.escape(t) for t in
                                                     sorted(self.added, key=len, reverse=True)) + ")")
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, token: str) -> tuple:
        word = list(token)
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            r, _ = min(pairs)
            if r == 1 << 60:
                break
            first, second = next((word[i], word[i + 1]) for rr, i in pairs if rr == r)
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
        return tuple(self.vocab[w] for w in word)

    def encode(self, text: str) -> list:
        out = []
        for k, piece in enumerate(self.added_re.split(text)):
            if k % 2:
                out.append(self.added[piece])
                continue
            for pt in PAT.findall(unicodedata.normalize("NFC", piece)):
                out.extend(self.bpe("".join(self.b2u[b] for b in pt.encode("utf-8"))))
        return out


# The non-tool branch of Qwen2.5-Math-Instruct's chat template (tokenizer_config.json): a given system message, else
# the default "Please reason step by step, ..." one; each turn <|im_start|>role\ncontent<|im_end|>\n.
QWEN25_MATH_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}."
    "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def raw_texts(root: Path):
    """(file, text) for every string field of every record of every dataset file."""
    for p in sorted(root.rglob("*")):
        if p.is_dir() or "qwen2_tokenizer" in p.parts or p.name.endswith(".md"):
            continue
        if p.suffix == ".jsonl":
            recs = [json.loads(l) for l in p.read_text(encoding="utf-8").split("\n") if l.strip()]
        elif p.suffix == ".json":
            recs = json.loads(p.read_text(encoding="utf-8"))
        elif p.suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                recs = list(csv.DictReader(f))
        elif p.suffix == ".parquet":     # its problem/answer are verbatim in math12k_train.jsonl (data README)
            print("skipped", p, "(covered by math/math12k_train.jsonl)")
            continue
        else:
            print("skipped", p)
            continue
        for r in recs:
            for s in strings(r):
                yield str(p.relative_to(root)), s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)                          # no options: --help, and a stray argument is a usage error
    data_dir = os.environ.get("NESTED_REFT_DATA", "")
    if not data_dir or not Path(data_dir, "qwen2_tokenizer").is_dir():
        p.error(f"$NESTED_REFT_DATA={data_dir!r}: expected the datasets folder, with qwen2_tokenizer/ (README 'Data')")
    root = Path(data_dir)
    import transformers
    from tokenizers import AddedToken
    ours = data.Tokenizer.load(root / "qwen2_tokenizer")
    hf = transformers.Qwen2TokenizerFast.from_pretrained(str(root / "qwen2_tokenizer"))
    for content, special in data.QWEN2_ADDED_TOKENS[1:]:
        hf.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    py = PyBPE(root / "qwen2_tokenizer")

    t0 = time.time()
    texts = list(dict.fromkeys(raw_texts(root)))        # (file, text), deduplicated per file
    groups = {}
    for f, s in texts:
        groups.setdefault(f, []).append(s)
    loaded = {(n, s): data.load_dataset(n, root, s) for n, sp in data.DATA_FILES.items() for s in sp}
    groups["<chat prompts of every loaded question>"] = [data.chat_prompt(e.question)
                                                         for exs in loaded.values() for e in exs]
    sft_exs = [e for exs in loaded.values() for e in exs if e.solution is not None]
    groups["<loaded solutions>"] = [e.solution for e in sft_exs]
    total = {"texts": 0, "hf": 0, "py": 0, "roundtrip": 0, "non_nfc": 0}
    for g, ss in groups.items():
        mine = ours.encode_batch(ss)
        theirs = [e.ids for e in hf._tokenizer.encode_batch(ss, add_special_tokens=False)]
        hf_bad = sum(a != b for a, b in zip(mine, theirs))
        py_bad = sum(a != py.encode(s) for a, s in zip(mine, ss))
        rt_bad = sum(ours.decode(a, skip_special_tokens=False) != unicodedata.normalize("NFC", s)
                     for a, s in zip(mine, ss))
        non_nfc = sum(unicodedata.normalize("NFC", s) != s for s in ss)
        print(f"{g:60s} texts {len(ss):6d}  vs HF {hf_bad}  vs pyBPE {py_bad}  roundtrip {rt_bad}  non-NFC {non_nfc}",
              flush=True)
        for k, v in zip(("texts", "hf", "py", "roundtrip", "non_nfc"), (len(ss), hf_bad, py_bad, rt_bad, non_nfc)):
            total[k] += v
    # SFT sequences: ids == oracle(prompt) + oracle(solution) + [<|im_end|>], mask covers exactly the completion
    sft_bad = 0
    for e in sft_exs:
        ids, mask = data.sft_example(ours, e)
        p = py.encode(data.chat_prompt(e.question))
        want = p + py.encode(e.solution) + [151645]
        sft_bad += ids != want or mask != [0] * len(p) + [1] * (len(want) - len(p))
    print(f"SFT sequences {len(sft_exs)}: mismatches vs pyBPE {sft_bad}")
    # chat template: chat_prompt == apply_chat_template (default and explicit system message); SFT text == the
    # template's text of (user, assistant) minus its final newline
    hf.chat_template = QWEN25_MATH_CHAT_TEMPLATE
    n = bad_default = bad_system = bad_sft_text = 0
    for exs in loaded.values():
        for e in exs:
            user = [{"role": "user", "content": e.question}]
            want = data.chat_prompt(e.question)
            bad_default += hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True) != want
            bad_system += hf.apply_chat_template([{"role": "system", "content": data.QWEN_MATH_SYSTEM}] + user,
                                                 tokenize=False, add_generation_prompt=True) != want
            if e.solution is not None:
                full = hf.apply_chat_template(user + [{"role": "assistant", "content": e.solution}], tokenize=False)
                ids, _ = data.sft_example(ours, e)
                bad_sft_text += ours.decode(ids, skip_special_tokens=False) + "\n" != full
            n += 1
    print(f"chat prompts {n}: != template (default system) {bad_default}, != template (explicit system) "
          f"{bad_system}; SFT texts != template text {bad_sft_text}")
    print("TOTAL", total, f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
