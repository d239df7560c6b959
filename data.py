"""Tokenizer, qwen_math chat template, dataset loaders and SFT examples.

    tok = Tokenizer.load("path/to/qwen2_tokenizer")           # tokenizer.json, or vocab.json + merges.txt
    train = load_dataset("gsm8k", data_dir, "train")          # list[Example]
    ids, loss_mask = sft_example(tok, train[0])               # loss on the completion only
    batch = collate_sft([sft_example(tok, ex) for ex in train[:8]], tok.pad_token_id)

Dataset files are read from `data_dir` at the paths in DATA_FILES (formats: ../shared/data/README.md).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# ----------------------------------------------------------------------------------------------------------
# Tokenizer

# Qwen2 pre-tokenizer split pattern: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs (with trailing newlines), newline runs, and whitespace (the last space stays with the next word).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Added tokens of Qwen2 / Qwen2.5 / Qwen2.5-Math, ids 151643..151664 in this order, as (content, special): the
# `added_tokens_decoder` of their tokenizer_config.json (151,665 ids; Qwen3 appends <tool_response>, </tool_response>,
# <think>, </think>). `special` tokens are dropped by decode(skip_special_tokens=True).
QWEN2_ADDED_TOKENS = [
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]


def _byte_level_pipeline(tk: _HFTokenizer) -> None:
    """Qwen2's text pipeline: NFC, regex split, byte-level mapping (no prefix space), byte-level decoder."""
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()


def _add_tokens(tk: _HFTokenizer, tokens: list[tuple[str, bool]]) -> None:
    """Append added tokens in order (each gets the next free id); never normalised, always matched whole."""
    for content, special in tokens:
        t = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tk.add_special_tokens if special else tk.add_tokens)([t])


# The Hugging Face files that travel with a tokenizer: Tokenizer.load reads them and save writes them back, so a
# checkpoint folder of a run is a drop-in replacement for the model it started from (the chat template and special
# tokens for transformers' AutoTokenizer and vLLM; generation_config.json holds the model's EOS ids and defaults).
# chat_template.jinja: where transformers' save_pretrained writes the chat template since mid-2025 (5.x too), no
# longer inside tokenizer_config.json, so a model saved by current transformers carries its template only there.
HF_TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "added_tokens.json",
                      "generation_config.json", "vocab.json", "merges.txt")


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` that knows the chat special tokens.

    eos_token_ids = (<|im_end|>, <|endoftext|>) and pad_token_id = <|endoftext|>, resolved by name, so the
    same code serves the real Qwen2 tokenizer (151645, 151643) and a small demo tokenizer.
    `hf_files`: name -> text of the HF_TOKENIZER_FILES found beside it (load), written back by save.
    It reads `tk` once, when built: vocab_size, the special ids and what save writes do not follow later changes
    to `tk` (added tokens, ...); wrap the changed one anew, Tokenizer(tk), which save then serialises.
    """

    def __init__(self, tk: _HFTokenizer, source: str = "<memory>", hf_files: dict[str, str] | None = None,
                 tokenizer_json: str | None = None):
        self.tk, self.hf_files = tk, dict(hf_files or {})
        self.tokenizer_json = tokenizer_json    # the text of the tokenizer.json it was read from, written back as is
        vocab = tk.get_vocab(with_added_tokens=True)
        missing = [t for t in (ENDOFTEXT, IM_START, IM_END) if t not in vocab]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks the special tokens {missing}")
        self.vocab_size = max(vocab.values()) + 1  # valid ids are 0..vocab_size-1 (151665 for Qwen2.5)
        self.endoftext_id, self.im_start_id, self.im_end_id = (vocab[t] for t in (ENDOFTEXT, IM_START, IM_END))
        self.eos_token_ids = (self.im_end_id, self.endoftext_id)
        self.pad_token_id = self.endoftext_id

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """tokenizer.json if present, else the Qwen2 byte-level BPE built from vocab.json + merges.txt."""
        d = Path(path)
        tj, vj, mt = d / "tokenizer.json", d / "vocab.json", d / "merges.txt"
        if not (tj.is_file() or (vj.is_file() and mt.is_file())):
            raise FileNotFoundError(f"{d}: no tokenizer found; expected tokenizer.json, or vocab.json + merges.txt")
        text = None
        try:
            if tj.is_file():
                text = tj.read_text(encoding="utf-8")
                tk = _HFTokenizer.from_str(text)
            else:
                tk = _HFTokenizer(BPE.from_file(str(vj), str(mt)))
                _byte_level_pipeline(tk)
                _add_tokens(tk, QWEN2_ADDED_TOKENS)
        except Exception as e:  # tokenizers raises plain Exceptions on malformed files
            raise ValueError(f"{d}: could not read the tokenizer files: {e}") from None
        hf_files = {}
        for name in (n for n in HF_TOKENIZER_FILES if (d / n).is_file()):
            try:
                hf_files[name] = (d / name).read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{d / name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls(tk, str(tj if tj.is_file() else d), hf_files, tokenizer_json=text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_end|>) become their ids."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or 1-D tensor); ids outside the vocabulary are dropped (the tokenizers library drops
        those >= its size, e.g. Qwen's padded embedding rows; a negative one would be an OverflowError there)."""
        return self.tk.decode([i for i in map(int, ids) if i >= 0], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    def save(self, path: str | os.PathLike) -> None:
        """Write `path`/tokenizer.json and the hf_files, each atomically (temp file in the same dir, then
        os.replace). A tokenizer read from a tokenizer.json writes that file's text back unchanged: re-serialised by
        tokenizers >= 0.20, the BPE merges of a released file ("a b" strings) would become ["a", "b"] pairs, which
        tokenizers < 0.20 (transformers < 4.45, and the vLLM releases built on it) cannot read."""
        text = self.tokenizer_json if self.tokenizer_json is not None else self.tk.to_str()
        write_text_atomic(Path(path) / "tokenizer.json", text)                 # creates `path` if missing
        for name, text in self.hf_files.items():
            write_text_atomic(Path(path) / name, text)


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """Train a small byte-level BPE with Qwen2's pipeline (for the CPU demo).

    The learned vocabulary (256 bytes + merges) has at most vocab_size - 3 entries; <|endoftext|>,
    <|im_start|>, <|im_end|> follow right after it, so `.vocab_size <= vocab_size`.
    """
    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size={vocab_size}: must be at least 259 (256 bytes + 3 special tokens)")
    tk = _HFTokenizer(BPE())
    _byte_level_pipeline(tk)
    trainer = BpeTrainer(vocab_size=vocab_size - 3, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    tk.train_from_iterator(texts, trainer)
    _add_tokens(tk, [(ENDOFTEXT, True), (IM_START, True), (IM_END, True)])
    return Tokenizer(tk)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically, as UTF-8 (write_bytes_atomic). The one place the project writes text files."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, content: bytes) -> None:
    """Write `content` to `path` atomically: a temp file in the same folder (created if missing), then os.replace,
    so a reader never sees a half-written file (text files through write_text_atomic; the demo's PNG plots)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)           # the mode open() would give (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------
# Chat template (spec §6, "qwen_math")

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def chat_prompt(question: str) -> str:
    """The qwen_math prompt: system + user turns, then the opened assistant turn the model completes."""
    if not isinstance(question, str):             # chat_prompt(example) would put its solution in the prompt
        raise TypeError(f"question: expected a string (e.g. example.question), got {type(question).__name__}")
    return (f"{IM_START}system\n{QWEN_MATH_SYSTEM}{IM_END}\n"
            f"{IM_START}user\n{question}{IM_END}\n"
            f"{IM_START}assistant\n")


# ----------------------------------------------------------------------------------------------------------
# Datasets

@dataclass
class Example:
    question: str
    solution: str | None  # chain-of-thought ending in \boxed{...}; None for evaluation-only sets
    answer: str | list[str]  # gold answer; a list (Minerva, OlympiadBench) matches if any element does


# name -> split -> file, relative to data_dir (layout of ../shared/data).
DATA_FILES = {
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "svamp": {"train": "svamp/reft/svamp_nl.json", "test": "svamp/SVAMP.json"},
    "math12k": {"train": "math/math12k_train.jsonl"},
    "math500": {"test": "math/math500_test.jsonl"},
    "aime": {"test": "eval_suite/understand-r1-zero_jsonl/aime.jsonl"},
    "amc": {"test": "eval_suite/understand-r1-zero_jsonl/amc.jsonl"},
    "minerva": {"test": "eval_suite/understand-r1-zero_jsonl/minerva.jsonl"},
    "olympiad": {"test": "eval_suite/understand-r1-zero_jsonl/olympiad_bench.jsonl"},
}
TRAIN_SETS = tuple(name for name, splits in DATA_FILES.items() if "train" in splits)   # gsm8k, svamp, math12k
# Where the files come from (printed when one is missing; details in ../shared/data/README.md).
DATA_SOURCES = {
    "gsm8k": "github.com/openai/grade-school-math grade_school_math/data/{train,test}.jsonl",
    "svamp": "train: github.com/lqtrung1998/mwp_ReFT data/svamp_nl.json; test: github.com/arkilpatel/SVAMP SVAMP.json",
    "math12k": "MATH train+test minus MATH500 with solutions: hiyouga/math12k joined with the MATH json files",
    "math500": "github.com/openai/prm800k prm800k/math_splits/test.jsonl",
    **{n: "github.com/sail-sg/understand-r1-zero datasets/evaluation_suite, converted to JSON lines"
       for n in ("aime", "amc", "minerva", "olympiad")},
}


def load_dataset(name: str, data_dir: str | os.PathLike, split: str) -> list[Example]:
    """Load one split of a dataset as Examples (question, CoT solution or None, gold answer).

    gsm8k    train/test  CoT without <<calc>> annotations, '#### N' replaced by 'The answer is \\boxed{N}.';
                         gold N with thousands commas removed.
    svamp    train       ReFT's 3076 GPT-written CoTs; their final 'the answer is <X>' becomes '\\boxed{X}'
                         (X as the CoT wrote it, e.g. 3.33 or 6%); gold = answer_value as a clean number.
             test        the 1000-item SVAMP.json; question = Body + " " + Question; gold 51.0 -> "51".
    math12k  train       problem / solution / answer, as given, except the 4 records whose source gold is
                         missing ("" at lines 1166 and 8126, "None" at 4013 and 10892; their solutions end in an
                         empty or brace-less box): they are dropped, so 11,996 of the file's 12,000 records load
                         (no completion could be rewarded on them; eval.grade also never rewards an empty gold).
    math500  test        same fields, all 500 records.
    aime, amc test       solution None; AMC's float golds (142.0) are stored as clean number strings ("142").
    minerva, olympiad    solution None; gold = list of strings, whitespace stripped ("9.6\\n" -> "9.6").
    synthetic train/test the generated demo task (synthetic_dataset): no files, data_dir is ignored.
    """
    if name == "synthetic":
        return synthetic_dataset(split)
    if name not in DATA_FILES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted([*DATA_FILES, 'synthetic'])}")
    if split not in DATA_FILES[name]:
        raise ValueError(f"dataset {name!r} has no split {split!r}; expected one of {sorted(DATA_FILES[name])}")
    if not data_dir:                                       # e.g. an unset $NESTED_REFT_DATA passed through
        raise ValueError(f"data_dir={data_dir!r}: expected the datasets folder (see the README's data section)")
    path = Path(data_dir) / DATA_FILES[name][split]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset file not found (get it from {DATA_SOURCES[name]}; "
                                f"see the README's data section)")
    parse = _PARSERS[(name, split)] if (name, split) in _PARSERS else _PARSERS[name]
    examples = (parse(rec, _Where(path, where)) for where, rec in _records(path))
    examples = [ex for ex in examples if ex is not None]   # a parser drops a record by returning None
    if not examples:                                       # training would wait forever for a first prompt
        raise ValueError(f"{path}: no records, expected at least one (get it from {DATA_SOURCES[name]}; "
                         f"see the README's data section)")
    return examples


class _Where:
    """Location of one record for error messages: 'FILE: line N' (JSON lines) or 'FILE: record N' (JSON list)."""

    def __init__(self, path: Path, where: str):
        self.path, self.where = path, where

    def error(self, msg: str) -> ValueError:
        return ValueError(f"{self.path}: {self.where}: {msg}")

    def get(self, rec: dict, key: str, types=str):
        if key not in rec:
            raise self.error(f"missing field {key!r}")
        v = rec[key]
        if not isinstance(v, types) or isinstance(v, bool):
            raise self.error(f"field {key!r} has type {type(v).__name__}, expected {_type_names(types)}")
        return v


def _type_names(types) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _records(path: Path):
    """Yield (location, dict) from a JSON-lines file (blank lines skipped) or a file holding one JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: bad JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        items = ((f"record {i}", rec) for i, rec in enumerate(data))
    else:
        items = _jsonl_items(path, text)
    for where, rec in items:
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: {where}: expected a JSON object, got {type(rec).__name__}")
        yield where, rec


def _jsonl_items(path: Path, text: str):
    # split at "\n" only: str.splitlines() also splits at U+2028, U+2029, U+0085, ..., legal raw in JSON strings
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n}: bad JSON ({e.msg})") from None


def _clean_number(x, w: _Where) -> str:
    """A gold number as a clean string: 51.0 / "51.0" -> "51"; "0.6666666666666666" and 3.5 stay as written."""
    try:
        v = float(x)
    except ValueError:
        raise w.error(f"answer {x!r} is not a number") from None
    if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return x.strip() if isinstance(x, str) else repr(x)


_CALC = re.compile(r"<<[^\n]*?>>")  # GSM8K calculator annotations, e.g. <<48/2=24>>


def _gsm8k(rec: dict, w: _Where) -> Example:
    cot, sep, gold = w.get(rec, "answer").rpartition("####")
    if not sep:
        raise w.error("field 'answer' has no '#### <answer>' line")
    gold = gold.strip().replace(",", "")
    if not gold:
        raise w.error("empty answer after '####'")
    cot = _CALC.sub("", cot).rstrip()
    return Example(w.get(rec, "question"), f"{cot}\nThe answer is \\boxed{{{gold}}}.", gold)


_REFT_ANSWER = re.compile(r"answer is <([^<>\n]*)>")  # ReFT CoTs end with 'Therefore, the answer is <203>.'


def _svamp_reft(rec: dict, w: _Where) -> Example:
    cot, gold = w.get(rec, "answer_cot"), _clean_number(w.get(rec, "answer_value"), w)
    matches = list(_REFT_ANSWER.finditer(cot))
    if not matches:
        cot = f"{cot.rstrip()}\nThe answer is \\boxed{{{gold}}}."
    else:
        m = matches[-1]
        cot = f"{cot[:m.start()]}answer is \\boxed{{{m.group(1).strip()}}}{cot[m.end():]}".rstrip()
    return Example(w.get(rec, "question"), cot, gold)


def _svamp_test(rec: dict, w: _Where) -> Example:
    body, q = w.get(rec, "Body").strip(), w.get(rec, "Question").strip()
    return Example(f"{body} {q}", None, _clean_number(w.get(rec, "Answer", (int, float, str)), w))


def _math(rec: dict, w: _Where) -> Example:
    return Example(w.get(rec, "problem"), w.get(rec, "solution"), w.get(rec, "answer").strip())


MISSING_GOLDS = ("", "None")  # source golds that stand for "no answer" (4 Math12k records; see load_dataset)


def _math_train(rec: dict, w: _Where) -> Example | None:
    """A Math12k record, or None (dropped) when its gold is missing: no answer could ever earn a reward."""
    ex = _math(rec, w)
    return None if ex.answer in MISSING_GOLDS else ex


def _scalar_gold(rec: dict, w: _Where) -> Example:
    a = w.get(rec, "answer", (str, int, float))
    return Example(w.get(rec, "problem"), None, a.strip() if isinstance(a, str) else _clean_number(a, w))


def _list_gold(rec: dict, w: _Where) -> Example:
    a = w.get(rec, "answer", (list, str))
    a = [a] if isinstance(a, str) else a
    if not a or not all(isinstance(x, str) for x in a):
        raise w.error("field 'answer' must be a non-empty list of strings")
    return Example(w.get(rec, "problem"), None, [x.strip() for x in a])


_PARSERS = {
    "gsm8k": _gsm8k, ("svamp", "train"): _svamp_reft, ("svamp", "test"): _svamp_test,
    "math12k": _math_train, "math500": _math, "aime": _scalar_gold, "amc": _scalar_gold,
    "minerva": _list_gold, "olympiad": _list_gold,
}


# ----------------------------------------------------------------------------------------------------------
# SFT examples and batching

def sft_example(tokenizer: Tokenizer, ex: Example, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for chat_prompt(question) + solution + <|im_end|>.

    Prompt and completion are tokenized separately (the prompt ids are exactly those the sampler is given).
    loss_mask[t] = 1 iff token t is part of the completion (solution and the closing <|im_end|>), i.e. a
    target of the next-token loss. With max_len, both are cut to the first max_len tokens.
    """
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0):
        raise ValueError(f"max_len={max_len!r}: expected None or an integer >= 0")   # -1 dropped the last token
    if ex.solution is None:
        raise ValueError(f"example has no solution, so it cannot be an SFT example: {ex.question[:60]!r}")
    prompt = tokenizer.encode(chat_prompt(ex.question))
    completion = tokenizer.encode(ex.solution) + [tokenizer.im_end_id]
    ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
    return (ids[:max_len], mask[:max_len]) if max_len is not None else (ids, mask)


def pad_batch(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad sequences to the longest with `value` on the right (or left) -> [B, T] long."""
    T = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            t = torch.tensor(s, dtype=torch.long)
            if left:
                out[i, T - len(s):] = t
            else:
                out[i, :len(s)] = t
    return out


def collate_sft(batch: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad SFT examples: input_ids [B, T] long, attention_mask [B, T] long (1 = real), loss_mask [B, T] float."""
    for i, (ids, loss_mask) in enumerate(batch):    # else loss_mask came out shorter than input_ids, silently
        if len(ids) != len(loss_mask):
            raise ValueError(f"batch[{i}]: {len(ids)} ids but {len(loss_mask)} loss_mask entries, expected as many")
    ids = pad_batch([b[0] for b in batch], pad_token_id)
    attention_mask = pad_batch([[1] * len(b[0]) for b in batch], 0)
    loss_mask = pad_batch([b[1] for b in batch], 0).float()
    return {"input_ids": ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate_prompts(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: (input_ids [B, T] long, attention_mask [B, T] long, 0 on padding)."""
    return pad_batch(prompts, pad_token_id, left=True), pad_batch([[1] * len(p) for p in prompts], 0, left=True)


# ----------------------------------------------------------------------------------------------------------
# Synthetic demo task (the CPU demo, issue 5)
#
# Grade-school word problems with one-digit arithmetic and a one-line chain of thought ending in \boxed{N},
# generated deterministically from a seed: no files, no downloads. Four templates, drawn in the rotation
# SYNTHETIC_TEMPLATES (40 % two-step problems):
#
#   add  "Mia has 3 pens. She gets 4 more. How many pens does she have now?"     3 + 4 = 7. The answer is \boxed{7}.
#   sub  "Tom had 6 eggs and gave 2 away. How many eggs does he have left?"       6 - 2 = 4. ...\boxed{4}.
#   mul  "Eva buys 4 bags with 2 coins in each bag. How many coins does she buy?" 4 * 2 = 8. ...\boxed{8}.
#   two  "Sam has 6 cards. He finds 3 more, then loses 4. How many cards are left?"
#                                                                  6 + 3 = 9. 9 - 4 = 5. The answer is \boxed{5}.
#
# The deliberate flaw (what RL has to fix): in a share SYNTHETIC_FLAW_RATE (60 %) of the TRAIN solutions of the
# two-step template the arithmetic is right but the INTERMEDIATE result is boxed ("... 9 - 4 = 5. The answer is
# \boxed{9}."); the gold answer stays correct. Imitation learns to box the intermediate more often than not, so
# greedy decoding gets many two-step problems wrong after SFT, while sampling still boxes the final result often
# enough for a 0/1 verifiable reward to find mixed groups and fix it. Every number is at most 9 (products 16)
# so that a 0.5M-parameter model learns the arithmetic in about a thousand SFT steps.
# The test split has only correct solutions, and no test question appears in train.
# ----------------------------------------------------------------------------------------------------------

SYNTHETIC_SEED = 20250814          # fixed: load_dataset("synthetic", ...) is the same everywhere
SYNTHETIC_SIZES = {"train": 2000, "test": 200}
SYNTHETIC_FLAW_RATE = 0.6          # share of the two-step train solutions that box the intermediate result
SYNTHETIC_TEMPLATES = ("add", "two", "sub", "two", "mul")   # problem i uses template i % 5
SYNTHETIC_VOCAB_SIZE = 512         # BPE budget of the demo tokenizer (it learns 442 ids: all merges there are)

_NAMES = [("Mia", "she"), ("Tom", "he"), ("Ana", "she"), ("Ben", "he"), ("Eva", "she"), ("Sam", "he"),
          ("Lily", "she"), ("Max", "he")]
_ITEMS = ["apples", "pens", "coins", "cards", "books", "eggs", "shells", "stickers"]


def _synthetic_problem(rng, template: str) -> tuple[str, list[str], int, int]:
    """One problem -> (question, correct CoT steps, answer, intermediate result or -1)."""
    (name, he), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    He = he.capitalize()
    if template == "add":
        a = rng.randint(2, 7)
        b = rng.randint(1, 9 - a)                                     # sum <= 9
        q = f"{name} has {a} {item}. {He} gets {b} more. How many {item} does {he} have now?"
        return q, [f"{a} + {b} = {a + b}."], a + b, -1
    if template == "sub":
        a = rng.randint(3, 9)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} away. How many {item} does {he} have left?"
        return q, [f"{a} - {b} = {a - b}."], a - b, -1
    if template == "mul":
        a, b = rng.randint(2, 4), rng.randint(2, 4)
        q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {he} buy?"
        return q, [f"{a} * {b} = {a * b}."], a * b, -1
    if template == "two":
        a = rng.randint(2, 7)
        b = rng.randint(1, 9 - a)
        s = a + b                                                     # intermediate, <= 9
        c = rng.randint(1, s - 1)
        q = f"{name} has {a} {item}. {He} finds {b} more, then loses {c}. How many {item} are left?"
        return q, [f"{a} + {b} = {s}.", f"{s} - {c} = {s - c}."], s - c, s
    raise ValueError(f"unknown synthetic template {template!r}; expected one of {sorted(set(SYNTHETIC_TEMPLATES))}")


SYNTHETIC_MAX_REDRAWS = 100_000   # repeated questions in a row before a template counts as used up


def _synthetic_stream(seed: int, flaw_rate: float, exclude: set):
    """Endless (question, solution, answer) triples of the stream `seed`: distinct questions, none in `exclude`.
    Every candidate costs the same random draws, flawed or not, so the questions of a stream do not depend on
    flaw_rate. A template has finitely many questions (mul: 8 names * 8 items * 9 (a, b) pairs = 576): once it has
    drawn SYNTHETIC_MAX_REDRAWS repeats in a row, ValueError (was an endless loop; with one unused question left
    of 576, a false alarm has probability (575/576)^100000 ~ e^-173)."""
    rng, seen, i, redraws = random.Random(seed), set(exclude), 0, 0
    while True:
        template = SYNTHETIC_TEMPLATES[i % len(SYNTHETIC_TEMPLATES)]
        question, steps, answer, intermediate = _synthetic_problem(rng, template)
        flawed = rng.random() < flaw_rate and intermediate >= 0       # one draw per candidate
        if question in seen:
            redraws += 1
            if redraws >= SYNTHETIC_MAX_REDRAWS:
                raise ValueError(f"synthetic dataset: the {template!r} questions are used up after {i} problems "
                                 f"(no new one in {redraws} draws); ask for fewer problems")
            continue                                                  # same template again: i unchanged
        seen.add(question)
        redraws = 0
        i += 1
        boxed = intermediate if flawed else answer                    # the flaw: box the intermediate result
        yield question, " ".join(steps) + f" The answer is \\boxed{{{boxed}}}.", str(answer)


def synthetic_dataset(split: str, n: int | None = None, seed: int = SYNTHETIC_SEED,
                      flaw_rate: float = SYNTHETIC_FLAW_RATE) -> list[Example]:
    """The synthetic demo task: the first `n` problems (default SYNTHETIC_SIZES[split]) of `split`.

    train: stream `seed`, a share `flaw_rate` of the two-step solutions flawed (see the section comment), and
           every question of the full test split skipped.
    test:  stream `seed + 1`, all solutions correct.
    Deterministic in (split, n, seed, flaw_rate); a smaller n is a prefix of a larger one. Gold answers are
    always correct. Arithmetic facts (3 + 4) recur across questions, as in any word-problem set. n is bounded by
    the 576 distinct mul questions (every 5th problem): ValueError beyond (about 2,680 train / 2,880 test problems
    with the default seed).
    """
    if split not in SYNTHETIC_SIZES:
        raise ValueError(f"dataset 'synthetic' has no split {split!r}; expected one of {sorted(SYNTHETIC_SIZES)}")
    n = SYNTHETIC_SIZES[split] if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"synthetic dataset size n={n!r}: expected a positive integer")
    if isinstance(flaw_rate, bool) or not isinstance(flaw_rate, (int, float)) or not 0.0 <= flaw_rate <= 1.0:
        raise ValueError(f"synthetic flaw_rate={flaw_rate!r}: expected a number in [0, 1]")
    if split == "test":
        stream = _synthetic_stream(seed + 1, 0.0, set())
    else:
        held_out = {q for q, _, _ in islice(_synthetic_stream(seed + 1, 0.0, set()), SYNTHETIC_SIZES["test"])}
        stream = _synthetic_stream(seed, flaw_rate, held_out)
    return [Example(q, sol, ans) for q, sol, ans in islice(stream, n)]


def synthetic_template(question: str) -> str:
    """Which template a synthetic question comes from: add, sub, mul or two (for per-template accuracy)."""
    if " finds " in question:
        return "two"
    if " gave " in question:
        return "sub"
    if " bags with " in question:
        return "mul"
    return "add"


def synthetic_corpus() -> list[str]:
    """Texts the demo tokenizer is trained on: every train and test problem as the model sees it (chat prompt +
    solution), so the fixed text of the template is frequent enough to become whole-word tokens."""
    return [chat_prompt(ex.question) + ex.solution for split in SYNTHETIC_SIZES for ex in synthetic_dataset(split)]


def synthetic_tokenizer(vocab_size: int = SYNTHETIC_VOCAB_SIZE) -> Tokenizer:
    """The demo tokenizer: train_tokenizer on synthetic_corpus() (deterministic: same ids on every run)."""
    return train_tokenizer(synthetic_corpus(), vocab_size)

