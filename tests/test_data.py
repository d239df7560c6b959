"""data.py: tokenizer parity with transformers, chat template, dataset loaders, SFT examples and collation."""

import json
import math
import os
import re
import unicodedata

import pytest
import torch

import data
from data import Example, Tokenizer, chat_prompt, collate_prompts, collate_sft, load_dataset, sft_example

# ----------------------------------------------------------------------------------------------------------
# Tokenizer: ids equal transformers' Qwen2 tokenizer

SAMPLE = [
    "Hello world!  It's   a test.\n\n\nNew paragraph\tTAB'S we'LL you've I'm they'd",
    "$\\frac{1}{2} + \\sqrt{x^2 + y^{10}}$ = 12345.678, 1,000,000 and -3.5e-7; \\boxed{\\dfrac{\\pi}{4}}",
    "def f(x):\n    return x ** 2  # comment\n\n\tif x != 0: print(f'{x:>10}')\n",
    "   leading and trailing whitespace   \n \n\n   \t  ",
    "Windows\r\nline\r\n\r\nendings",
    "中文测试，日本語のテキスト、한국어 🚀🎉👩‍👩‍👧 café naïve Ωμέγα ½ ² ٣ १२",
    "e\u0301 (decomposed accent; NFC-normalised) and \u00e9",
    "Natalia sold 48/2 = 24 clips in May.\nThe answer is \\boxed{72}.<|im_end|><|endoftext|>",
    "<|im_start|><|im_end|>x<|im_start|>assistant\n<think>\n</think><tool_call><|fim_prefix|>",
    "<|im_end |> <im_end> <|im_end|",  # near-misses are plain text
    "O'Sullivan, O'Malley and O'Doyle; D'Tre IT'S",  # (?i:'s|'t|'re|'ve|'m|'ll|'d): 'D of O'Doyle is split off
    "",
]


@pytest.fixture(scope="module")
def tok(data_dir):
    return Tokenizer.load(data_dir / "qwen2_tokenizer")


@pytest.fixture(scope="module")
def ref(data_dir):
    """transformers' Qwen2 tokenizer from vocab.json + merges.txt, with Qwen2's added-token table.

    The data folder has no tokenizer_config.json, so transformers only knows <|endoftext|>; the other added
    tokens are registered here, in id order, as the model's tokenizer_config.json does.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    t = transformers.Qwen2TokenizerFast.from_pretrained(str(data_dir / "qwen2_tokenizer"))
    for content, special in data.QWEN2_ADDED_TOKENS[1:]:
        t.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
    return t


def test_qwen2_special_ids(tok):
    assert tok.vocab_size == 151665                         # Qwen2.5's table: 22 added tokens, not Qwen3's 26
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.eos_token_ids == (151645, 151643) and tok.pad_token_id == 151643
    assert tok.token_to_id("<|file_sep|>") == 151664
    assert tok.token_to_id("!") == 0 and tok.encode("!") == [0]      # id 0 is a token like any other
    assert tok.encode("<think>") != [151667]                 # Qwen3's added token is plain text here
    assert tok.encode("48") == [19, 23]  # digits are split one per token
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_to_id("<|no_such_token|>")


# Qwen2.5's added-token table (its tokenizer_config.json, `added_tokens_decoder`): id -> (content, special).
# Written out here, not taken from data.QWEN2_ADDED_TOKENS (which the `ref` fixture reuses).
QWEN25_ADDED = {
    151646: ("<|object_ref_start|>", True), 151647: ("<|object_ref_end|>", True), 151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True), 151650: ("<|quad_start|>", True), 151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True), 151653: ("<|vision_end|>", True), 151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True), 151656: ("<|video_pad|>", True), 151657: ("<tool_call>", False),
    151658: ("</tool_call>", False), 151659: ("<|fim_prefix|>", False), 151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False), 151662: ("<|fim_pad|>", False), 151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
}


def test_qwen2_added_token_ids_and_special_flags(tok):
    for i, (content, special) in QWEN25_ADDED.items():
        assert tok.token_to_id(content) == i and tok.encode(content) == [i], content
        assert tok.decode([i]) == ("" if special else content), content      # skip_special_tokens drops specials


def test_added_tokens_are_matched_in_the_raw_text(tok, ref):
    """Qwen2's added tokens are normalized=False: matched in the text as written, not after NFC. A combining
    long solidus (U+0338) after '>' composes with it under NFC ('>' + U+0338 = U+226F), which would hide the
    closing '>' of <|im_end|>; the token must still be one id, as in transformers."""
    assert unicodedata.normalize("NFC", ">\u0338") == "\u226f"
    text = "<|im_end|>\u0338 and <|endoftext|>\u0338"
    ids = tok.encode(text)
    assert ids[0] == 151645 and 151643 in ids and ids == ref.encode(text, add_special_tokens=False)


def test_ids_match_transformers(tok, ref):
    assert len(ref) == tok.vocab_size
    texts = SAMPLE + [chat_prompt(SAMPLE[1]), chat_prompt("What is 1+1?") + "2<|im_end|>"]
    for t in texts:
        assert tok.encode(t) == ref.encode(t, add_special_tokens=False), repr(t)


def test_a_tokenizer_json_written_by_transformers_loads_with_the_same_ids(ref, tmp_path):
    """A real checkpoint ships the tokenizer.json transformers writes (not vocab.json + merges.txt): loaded from
    such a folder alone, the tokenizer has the same ids, special tokens and size as transformers' own."""
    ref.save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)          # only tokenizer.json (+ its config files) is left
    hf = Tokenizer.load(tmp_path)
    assert hf.vocab_size == len(ref) == 151665
    assert (hf.endoftext_id, hf.im_start_id, hf.im_end_id) == (151643, 151644, 151645)
    assert hf.eos_token_ids == (151645, 151643) and hf.pad_token_id == 151643
    texts = SAMPLE + [chat_prompt(SAMPLE[1]), chat_prompt("What is 1+1?") + "2<|im_end|>"]
    assert hf.encode_batch(texts) == [ref.encode(t, add_special_tokens=False) for t in texts]
    assert hf.decode(hf.encode(texts[-1]), skip_special_tokens=True) == ref.decode(
        ref.encode(texts[-1], add_special_tokens=False), skip_special_tokens=True)


def test_ids_match_transformers_on_real_records(tok, ref, data_dir):
    texts = [e.question + "\n" + e.solution for e in load_dataset("gsm8k", data_dir, "test")[:150]]
    texts += [e.question + "\n" + e.solution for e in load_dataset("math500", data_dir, "test")[:150]]
    texts += [e.question for e in load_dataset("olympiad", data_dir, "test")[:100]]
    assert tok.encode_batch(texts) == [ref.encode(t, add_special_tokens=False) for t in texts]


def test_decode_round_trip(tok, ref):
    for t in SAMPLE:
        ids = tok.encode(t)
        assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", t)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == tok.decode(ids)  # tensors are accepted
    ids = tok.encode(chat_prompt("Q?") + "A.<|im_end|>")
    assert tok.decode(ids) == f"system\n{data.QWEN_MATH_SYSTEM}\nuser\nQ?\nassistant\nA."
    assert tok.decode(tok.encode("<think>x</think>")) == "<think>x</think>"  # non-special added tokens stay
    ids = tok.encode("A.")
    assert tok.decode([-1] + ids + [tok.vocab_size, 10**6]) == "A."    # outside the vocabulary: dropped, as documented


def test_hf_tokenizer_files_travel_with_the_tokenizer(tmp_path):
    """A model folder's tokenizer_config.json (chat template, special tokens) and generation_config.json (EOS ids)
    are written back beside tokenizer.json by save, so a saved checkpoint is a drop-in replacement for it:
    transformers' AutoTokenizer then knows the EOS token and formats the chat as chat_prompt does."""
    src, out = tmp_path / "src", tmp_path / "out"
    tok = data.train_tokenizer([chat_prompt("What is 2 plus 3?") + "5 \\boxed{5}"], 300)
    tok.save(src)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    files = {"tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                  "chat_template": template}),
             "generation_config.json": json.dumps({"eos_token_id": [tok.im_end_id, tok.endoftext_id]}),
             "special_tokens_map.json": json.dumps({"eos_token": "<|im_end|>"}),
             "added_tokens.json": json.dumps({"<|endoftext|>": tok.endoftext_id, "<|im_start|>": tok.im_start_id,
                                              "<|im_end|>": tok.im_end_id})}
    for name, text in files.items():
        (src / name).write_text(text)
    (src / "README.md").write_text("not a tokenizer file")
    Tokenizer.load(src).save(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["tokenizer.json", *files])
    assert all((out / name).read_text() == text for name, text in files.items())
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf.eos_token_id == tok.im_end_id and hf.pad_token_id == tok.endoftext_id
    msgs = [{"role": "system", "content": data.QWEN_MATH_SYSTEM}, {"role": "user", "content": "What is 2 plus 3?"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == chat_prompt("What is 2 plus 3?")


def test_a_chat_template_in_chat_template_jinja_travels_with_the_tokenizer(tmp_path):
    """transformers (since mid-2025, 5.x too) saves the chat template to chat_template.jinja, not into
    tokenizer_config.json: a run started from a model saved that way must write it into its checkpoints too, or
    AutoTokenizer (and vLLM's chat API) loses the template there."""
    src, out = tmp_path / "src", tmp_path / "out"
    tok = data.train_tokenizer([chat_prompt("What is 2 plus 3?") + "5 \\boxed{5}"], 300)
    tok.save(src)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (src / "chat_template.jinja").write_text(template)
    Tokenizer.load(src).save(out)
    assert (out / "chat_template.jinja").read_text() == template
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "system", "content": data.QWEN_MATH_SYSTEM}, {"role": "user", "content": "What is 2 plus 3?"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == chat_prompt("What is 2 plus 3?")


def test_save_and_load_tokenizer_json(tok, tmp_path, data_dir):
    tok.save(tmp_path)
    # tokenizer.json plus the files found beside the source, unchanged; no temp file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "tokenizer.json", "vocab.json"]
    for name in ("merges.txt", "vocab.json"):
        assert (tmp_path / name).read_bytes() == (data_dir / "qwen2_tokenizer" / name).read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "tokenizer.json").stat().st_mode & 0o777 == 0o666 & ~umask   # as open() would make it
    tok2 = Tokenizer.load(tmp_path)
    assert (tok2.vocab_size, tok2.eos_token_ids, tok2.pad_token_id) == (tok.vocab_size, tok.eos_token_ids,
                                                                        tok.pad_token_id)
    for t in SAMPLE:
        assert tok2.encode(t) == tok.encode(t)


def test_a_released_tokenizer_json_is_written_back_unchanged(demo_tok, tmp_path):
    """The released Qwen2.5 tokenizer.json stores its BPE merges as "a b" strings; tokenizers >= 0.20 re-serialises
    them as ["a", "b"] pairs, which tokenizers < 0.20 (transformers < 4.45, vLLM built on it) cannot read. A run's
    checkpoint must be a drop-in replacement for the model it started from: the file is written back byte for byte."""
    d = json.loads(demo_tok.tk.to_str())
    d["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in d["model"]["merges"]]   # legacy form
    text = json.dumps(d, ensure_ascii=False, indent=2) + "\n"   # indented, as the released file; the last byte kept too
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "tokenizer.json").write_text(text, encoding="utf-8")
    tok = Tokenizer.load(src)
    assert tok.encode(CORPUS[7]) == demo_tok.encode(CORPUS[7])
    tok.save(out)
    assert (out / "tokenizer.json").read_text(encoding="utf-8") == text
    assert all(isinstance(m, str) for m in json.loads(text)["model"]["merges"])


def test_a_changed_tokenizer_is_saved_once_wrapped_anew(demo_tok, tmp_path):
    """Tokenizer reads its `tk` once: a token added to `tk` afterwards changes neither its vocab_size nor what it
    saves (the loaded file, as documented); Tokenizer(tk) wraps the changed one, and its save writes the new token."""
    demo_tok.save(tmp_path / "src")
    tok = Tokenizer.load(tmp_path / "src")
    size = tok.vocab_size
    tok.tk.add_tokens(["<|my_tool|>"])
    assert tok.vocab_size == size
    tok.save(tmp_path / "stale")
    assert Tokenizer.load(tmp_path / "stale").tk.token_to_id("<|my_tool|>") is None
    fresh = Tokenizer(tok.tk)
    fresh.save(tmp_path / "new")
    back = Tokenizer.load(tmp_path / "new")
    assert back.vocab_size == fresh.vocab_size == size + 1 and back.token_to_id("<|my_tool|>") == size
    assert back.encode("a <|my_tool|> b") == fresh.encode("a <|my_tool|> b")


def test_tokenizer_json_wins_over_vocab_and_merges(demo_tok, data_dir, tmp_path):
    """A folder with tokenizer.json AND vocab.json + merges.txt (a transformers save_pretrained of a slow+fast
    tokenizer) is read from tokenizer.json, the complete description: here the small demo tokenizer, not the
    151,665-id Qwen2 BPE that vocab.json + merges.txt alone would give."""
    demo_tok.save(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((data_dir / "qwen2_tokenizer" / name).read_bytes())
    t = Tokenizer.load(tmp_path)
    assert t.vocab_size == demo_tok.vocab_size < 500 and t.im_end_id == demo_tok.im_end_id
    assert t.encode(CORPUS[7]) == demo_tok.encode(CORPUS[7])


def test_a_tokenizer_without_the_chat_tokens_is_refused(tmp_path):
    """<|endoftext|>, <|im_start|> and <|im_end|> are resolved by name: a tokenizer lacking one is a one-line
    ValueError naming the file and the missing tokens (not a KeyError from the constructor)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    HFTokenizer(WordLevel({"a": 0, "<|endoftext|>": 1, "<|im_start|>": 2}, unk_token="a")).save(
        str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: tokenizer lacks the special "
                                                   "tokens ['<|im_end|>']")):
        Tokenizer.load(tmp_path)


def test_a_tokenizer_file_that_is_not_utf8_is_a_value_error(demo_tok, tmp_path):
    demo_tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_bytes(b'{"eos_token": "\xff"}')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tokenizer_config.json'}: not UTF-8 text (")):
        Tokenizer.load(tmp_path)                                            # names the file, not only the folder


def test_encode_never_adds_special_tokens(demo_tok):
    """A tokenizer.json whose post-processor adds a BOS-like token (as many models' do) still encodes the text
    alone: the prompt ids are exactly those of chat_prompt, in encode and encode_batch."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing
    tk = HFTokenizer.from_str(demo_tok.tk.to_str())
    tk.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", demo_tok.endoftext_id)])
    assert tk.encode("2 + 3").ids[0] == demo_tok.endoftext_id                 # the post-processor is active
    t = Tokenizer(tk)
    assert t.encode("2 + 3") == demo_tok.encode("2 + 3") == t.encode_batch(["2 + 3"])[0]
    assert demo_tok.endoftext_id not in t.encode("2 + 3")


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ".*tokenizer.json.*vocab.json.*merges"):
        Tokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt still missing
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        Tokenizer.load(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Demo tokenizer (no data needed)

CORPUS = [f"Tom has {a} apples and buys {b} more. How many apples does he have?\n"
          f"Tom has {a} + {b} = {a + b} apples.\nThe answer is \\boxed{{{a + b}}}."
          for a in range(30) for b in range(7)]


@pytest.fixture(scope="module")
def demo_tok():
    return train_demo()


def train_demo():
    return data.train_tokenizer(CORPUS + [chat_prompt("")], vocab_size=400)


def test_train_tokenizer(demo_tok, tmp_path):
    t = demo_tok
    assert t.vocab_size <= 400
    # special tokens come right after the learned vocabulary, resolved by name
    assert (t.endoftext_id, t.im_start_id, t.im_end_id) == (t.vocab_size - 3, t.vocab_size - 2, t.vocab_size - 1)
    assert t.eos_token_ids == (t.im_end_id, t.endoftext_id) and t.pad_token_id == t.endoftext_id
    assert t.tk.get_vocab_size(with_added_tokens=False) == t.vocab_size - 3
    text = chat_prompt(CORPUS[5]) + "17<|im_end|>"
    ids = t.encode(text)
    assert t.im_start_id in ids and ids[-1] == t.im_end_id
    assert t.decode(ids, skip_special_tokens=False) == text
    assert len(t.encode("123")) == 3  # Qwen2 split: one digit per pre-token
    assert len(t.encode(" apples")) == 1  # merges were learned (the space belongs to the word)
    assert t.decode(t.encode("unseen: Zürich 東京 ∑")) == "unseen: Zürich 東京 ∑"  # byte-level covers any text
    t.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode(text) == ids
    assert train_demo().encode(text) == ids  # deterministic
    assert t.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")  # specials are special
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(CORPUS, vocab_size=100)


def test_train_tokenizer_vocabulary_budget():
    """vocab_size counts the 3 special tokens: with more merges available than the budget, the ids are exactly
    0..vocab_size-1 (vocab_size - 3 learned + 3 special); 259 = 256 bytes + 3 is the smallest size, 258 fails."""
    t = data.train_tokenizer(CORPUS, vocab_size=300)
    assert t.vocab_size == 300 and t.im_end_id == 299
    smallest = data.train_tokenizer(CORPUS[:3], vocab_size=259)
    assert smallest.vocab_size == 259 and len(smallest.encode("apples")) == 6         # bytes only, no merge
    with pytest.raises(ValueError, match="vocab_size=258: must be at least 259"):
        data.train_tokenizer(CORPUS, vocab_size=258)


# ----------------------------------------------------------------------------------------------------------
# Chat template

def test_chat_prompt_exact():
    assert data.QWEN_MATH_SYSTEM == "Please reason step by step, and put your final answer within \\boxed{}."
    assert chat_prompt("What is 1+1?") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("question", [Example("What is 1+1?", "1+1=2. \\boxed{2}", "2"), None, ["What is 1+1?"]])
def test_chat_prompt_refuses_what_is_not_a_question_string(question):
    """chat_prompt(example) instead of chat_prompt(example.question) formatted the Example's repr, solution and
    gold answer included, into the prompt without a word."""
    with pytest.raises(TypeError, match="question: expected a string"):
        chat_prompt(question)


# ----------------------------------------------------------------------------------------------------------
# Loaders on fixture files

def write(root, name, split, content):
    p = root / data.DATA_FILES[name][split]
    p.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(content, str):  # list of records -> JSON lines, or one JSON list for .json files
        content = json.dumps(content) if p.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in content)
    p.write_text(content, encoding="utf-8")
    return p


def test_gsm8k_fixture(tmp_path):
    write(tmp_path, "gsm8k", "train", [
        {"question": "Q1?",
         "answer": "She has 3+4 = <<3+4=7>>7 apples.\nThen 1,000 more: <<7+1000=1007>>1007.\n#### 1,007"},
        {"question": "Q2?", "answer": "It drops by 10.\n#### -10"},
        {"question": "Q3?", "answer": "2*3 = <<2*3=6>>6 and 6+1 = <<6+1=7>>7 (not #### 6).\n#### 7"},
    ])
    a, b, c = load_dataset("gsm8k", tmp_path, "train")
    assert a == Example("Q1?", "She has 3+4 = 7 apples.\nThen 1,000 more: 1007.\nThe answer is \\boxed{1007}.", "1007")
    assert b == Example("Q2?", "It drops by 10.\nThe answer is \\boxed{-10}.", "-10")
    # two annotations on one line each go; the gold follows the last "####"
    assert c == Example("Q3?", "2*3 = 6 and 6+1 = 7 (not #### 6).\nThe answer is \\boxed{7}.", "7")
    # an annotation never spans lines: a '<<' here and a '>>' on a later line are text, kept
    write(tmp_path, "gsm8k", "test", [{"question": "Q4?", "answer": "1 << 3 = 8\nand 8 >> 1 = 4.\n#### 4"}])
    (d,) = load_dataset("gsm8k", tmp_path, "test")
    assert d.solution == "1 << 3 = 8\nand 8 >> 1 = 4.\nThe answer is \\boxed{4}."
    p = write(tmp_path, "gsm8k", "test", [{"question": "Q5?", "answer": "No number.\n####  \n"}])
    with pytest.raises(ValueError, match=re.escape(f"{p}: line 1: empty answer after '####'")):
        load_dataset("gsm8k", tmp_path, "test")


def test_svamp_fixture(tmp_path):
    write(tmp_path, "svamp", "train", [
        {"item_id": "a", "question": "q a", "answer_cot": "10 / 3 = 3.33\n\nTherefore, the answer is <3.33>.",
         "answer_value": "3.3333333333333335"},
        {"item_id": "b", "question": "q b", "answer_cot": "Therefore, the answer is <14>.", "answer_value": "14.0"},
        {"item_id": "c", "question": "q c", "answer_cot": "Already answered.", "answer_value": "5.0"},
        {"item_id": "d", "question": "q d", "answer_cot": "Not the answer is <2>; the answer is < 7 >.",
         "answer_value": "7.0"},
    ])
    a, b, c, d = load_dataset("svamp", tmp_path, "train")
    assert d == Example("q d", "Not the answer is <2>; the answer is \\boxed{7}.", "7")   # the last one, stripped
    assert a == Example("q a", "10 / 3 = 3.33\n\nTherefore, the answer is \\boxed{3.33}.", "3.3333333333333335")
    assert b == Example("q b", "Therefore, the answer is \\boxed{14}.", "14")
    assert c == Example("q c", "Already answered.\nThe answer is \\boxed{5}.", "5")
    write(tmp_path, "svamp", "train", [     # trailing whitespace of the CoT goes, with or without an answer tag
        {"question": "q e", "answer_cot": "Therefore, the answer is <14>.\n", "answer_value": "14"},
        {"question": "q f", "answer_cot": "Already answered.\n\n", "answer_value": " 2.5 "},
    ])
    e, f = load_dataset("svamp", tmp_path, "train")
    assert e == Example("q e", "Therefore, the answer is \\boxed{14}.", "14")
    assert f == Example("q f", "Already answered.\nThe answer is \\boxed{2.5}.", "2.5")
    write(tmp_path, "svamp", "test", [
        {"ID": "chal-1", "Body": "Each pack costs 76 dollars. ", "Question": "How much for 2?", "Answer": 152.0},
        {"ID": "chal-2", "Body": "B", "Question": "Q", "Answer": 0.5},
    ])
    a, b = load_dataset("svamp", tmp_path, "test")
    assert a == Example("Each pack costs 76 dollars. How much for 2?", None, "152")
    assert b == Example("B Q", None, "0.5")
    write(tmp_path, "svamp", "test", [{"Body": "B", "Question": "Q", "Answer": 152}])    # a JSON integer
    assert load_dataset("svamp", tmp_path, "test") == [Example("B Q", None, "152")]
    p = write(tmp_path, "svamp", "test", [{"Body": "B", "Question": "Q", "Answer": True}])
    with pytest.raises(ValueError, match=re.escape(f"{p}: record 0: field 'Answer' has type bool, expected int or "
                                                   "float or str")):   # bool is an int in Python, not a number here
        load_dataset("svamp", tmp_path, "test")


def test_gold_numbers_are_cleaned_without_losing_digits(tmp_path):
    """_clean_number drops a float's '.0' only where that is exact: below 1e15 (int(float(x)) of a 20-digit
    string would change its last digits), never for inf / nan (int() of them raises); otherwise the gold stays
    as written, whitespace stripped."""
    values = ["12345678901234567890", "1e20", "999999999999999.0", " 7.0\n", "-0.25", "inf"]
    write(tmp_path, "svamp", "train", [{"question": "q", "answer_cot": "c", "answer_value": v} for v in values])
    assert [e.answer for e in load_dataset("svamp", tmp_path, "train")] == [
        "12345678901234567890", "1e20", "999999999999999", "7", "-0.25", "inf"]
    write(tmp_path, "amc", "test", '{"problem": "p", "answer": Infinity}\n{"problem": "q", "answer": 1e20}\n'
                                   '{"problem": "r", "answer": 142}\n')        # JSON numbers: float, float, int
    assert [e.answer for e in load_dataset("amc", tmp_path, "test")] == ["inf", "1e+20", "142"]


def test_math_and_eval_suite_fixtures(tmp_path):
    rec = {"problem": "P", "solution": "so $\\boxed{\\frac12}$", "answer": "\\frac12", "level": 3}
    for name, split in [("math12k", "train"), ("math500", "test")]:
        write(tmp_path, name, split, [rec])
        assert load_dataset(name, tmp_path, split) == [Example("P", "so $\\boxed{\\frac12}$", "\\frac12")]
    write(tmp_path, "aime", "test", [{"problem": "A", "answer": "025", "difficulty": 1.0},
                                     {"problem": "A2", "answer": " 17\n"}])
    assert load_dataset("aime", tmp_path, "test") == [Example("A", None, "025"),   # kept as written
                                                       Example("A2", None, "17")]    # whitespace stripped
    write(tmp_path, "amc", "test", [{"problem": "B", "answer": 142.0}, {"problem": "C", "answer": 2.5}])
    assert [e.answer for e in load_dataset("amc", tmp_path, "test")] == ["142", "2.5"]
    for name in ("minerva", "olympiad"):
        write(tmp_path, name, "test", [{"problem": "D", "answer": ["9.6\n", " $2^{10}$ "]}])
        assert load_dataset(name, tmp_path, "test") == [Example("D", None, ["9.6", "$2^{10}$"])]
        write(tmp_path, name, "test", [{"problem": "E", "answer": "9.6\n"}])      # a lone string: a 1-list
        assert load_dataset(name, tmp_path, "test") == [Example("E", None, ["9.6"])]


@pytest.mark.parametrize("content, where, what", [
    ('{"question": "a", "answer": "x\\n#### 1"}\n\n{"question": "b", "answer": "#### 2"}\n{"question": \n',
     "line 4", "bad JSON"),  # blank lines count
    ('{"question": "a", "answer": "x\\n#### 1"}\n{"question": "b"}\n', "line 2", "missing field 'answer'"),
    ('{"question": "a", "answer": "no marker"}\n', "line 1", "####"),
    ('{"question": 7, "answer": "#### 1"}\n', "line 1", "'question' has type int"),
    ('["question", "answer"]\n', "line 1", "JSON object"),
])
def test_malformed_jsonl(tmp_path, content, where, what):
    p = write(tmp_path, "gsm8k", "test", content)
    with pytest.raises(ValueError, match=re.escape(f"{p}: {where}: ") + ".*" + re.escape(what)):
        load_dataset("gsm8k", tmp_path, "test")


def test_jsonl_splits_at_newlines_only(tmp_path):
    """U+2028 / U+2029 / U+0085 / U+000B / U+000C are legal raw inside JSON strings; only \n (with an optional
    \r before it) ends a record, and the line numbers of later errors stay right."""
    odd = "a\u2028b\u2029c\u0085d\x0be\x0cf\x1cg"
    good = json.dumps({"question": odd, "answer": "#### 1"}, ensure_ascii=False)
    assert "\u2028" in good and len(good.splitlines()) > 1          # str.splitlines() would cut this record
    p = write(tmp_path, "gsm8k", "test", good + "\r\n\r\n" + good + "\n \t\r\n" + good + "\n")   # blank: space/tab too
    assert [e.question for e in load_dataset("gsm8k", tmp_path, "test")] == [odd, odd, odd]
    write(tmp_path, "gsm8k", "test", good + "\r\n" + good + "\n\n" + '{"question": \n')
    with pytest.raises(ValueError, match=re.escape(f"{p}: line 4: bad JSON")):
        load_dataset("gsm8k", tmp_path, "test")


def test_math12k_drops_missing_golds(tmp_path):
    recs = [{"problem": p, "solution": "s \\boxed{}", "answer": a}
            for p, a in [("P1", "5"), ("P2", ""), ("P3", "None"), ("P4", " "), ("P5", "\\text{none}")]]
    write(tmp_path, "math12k", "train", recs)
    assert [e.question for e in load_dataset("math12k", tmp_path, "train")] == ["P1", "P5"]
    write(tmp_path, "math500", "test", recs)                  # MATH500 keeps every record, as written
    assert [e.answer for e in load_dataset("math500", tmp_path, "test")] == ["5", "", "None", "", "\\text{none}"]


def test_malformed_json_list_and_values(tmp_path):
    p = write(tmp_path, "svamp", "test", '[{"Body": "a", "Question": "b", "Answer": 1.0},\n {"Body": "a"}]')
    with pytest.raises(ValueError, match=re.escape(f"{p}: record 1: missing field 'Question'")):
        load_dataset("svamp", tmp_path, "test")
    p = write(tmp_path, "svamp", "test", '[{"Body": "a",\n "Question": }]')
    with pytest.raises(ValueError, match=re.escape(f"{p}: line 2: bad JSON")):
        load_dataset("svamp", tmp_path, "test")
    p = write(tmp_path, "svamp", "train", [{"question": "q", "answer_cot": "c", "answer_value": "many"}])
    with pytest.raises(ValueError, match=re.escape(f"{p}: record 0: answer 'many' is not a number")):
        load_dataset("svamp", tmp_path, "train")
    p = write(tmp_path, "gsm8k", "test", "")
    p.write_bytes(b'{"question": "\xff"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{p}: not UTF-8")):
        load_dataset("gsm8k", tmp_path, "test")
    for unset in (None, ""):                         # an unset $NESTED_REFT_DATA passed straight through
        with pytest.raises(ValueError, match=f"data_dir={unset!r}: expected the datasets folder"):
            load_dataset("gsm8k", unset, "test")
    for content in ("", "\n\n", []):                # an empty file: training waited forever for a first prompt
        p = write(tmp_path, "svamp" if content == [] else "gsm8k", "test", content)
        with pytest.raises(ValueError, match=re.escape(f"{p}: no records, expected at least one")):
            load_dataset("svamp" if content == [] else "gsm8k", tmp_path, "test")
    write(tmp_path, "math12k", "train", [{"problem": "P", "solution": "s", "answer": ""}])   # all dropped
    with pytest.raises(ValueError, match="math12k_train.jsonl: no records"):
        load_dataset("math12k", tmp_path, "train")
    for answer in ([], ["9.6", 2]):
        p = write(tmp_path, "minerva", "test", [{"problem": "p", "answer": answer}])
        with pytest.raises(ValueError, match=re.escape(f"{p}: line 1: field 'answer' must be a non-empty list of "
                                                       "strings")):
            load_dataset("minerva", tmp_path, "test")
    p = write(tmp_path, "svamp", "test", '{"Body": "a", "Question": "b", "Answer": 1.0}')   # one record, no list
    with pytest.raises(ValueError, match=re.escape(f"{p}: expected a JSON list of records, got dict")):
        load_dataset("svamp", tmp_path, "test")


def test_missing_file_and_bad_names(tmp_path):
    missing = re.escape(str(tmp_path / "gsm8k" / "test.jsonl"))
    with pytest.raises(FileNotFoundError, match=missing + ".*grade-school-math"):
        load_dataset("gsm8k", tmp_path, "test")
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'.*aime.*svamp"):
        load_dataset("gsm9k", tmp_path, "test")
    with pytest.raises(ValueError, match="'math12k' has no split 'test'.*train"):
        load_dataset("math12k", tmp_path, "test")
    assert set(data.DATA_FILES) >= {"gsm8k", "svamp", "math12k", "math500", "aime", "amc", "minerva", "olympiad"}


def test_every_registered_split_has_a_source_and_a_parser():
    """What the README's "Another training set" registers, checked for every set (one added too): a source for the
    missing-file message and a parser for each split (a missing one was a bare KeyError, or hid that message)."""
    assert set(data.DATA_SOURCES) == set(data.DATA_FILES)
    for name, splits in data.DATA_FILES.items():
        for split in splits:
            assert (name, split) in data._PARSERS or name in data._PARSERS, (name, split)


# ----------------------------------------------------------------------------------------------------------
# Loaders on the real files

COUNTS = {("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("svamp", "train"): 3076, ("svamp", "test"): 1000,
          ("math12k", "train"): 11996, ("math500", "test"): 500, ("aime", "test"): 30, ("amc", "test"): 83,
          ("minerva", "test"): 272, ("olympiad", "test"): 675}


@pytest.fixture(scope="module")
def real(data_dir):
    return {(n, s): load_dataset(n, data_dir, s) for n, s in COUNTS}


def test_real_counts(real):
    assert {k: len(v) for k, v in real.items()} == COUNTS
    for (name, split), exs in real.items():
        for e in exs:
            assert isinstance(e.question, str) and e.question.strip(), (name, e)
            if name in ("minerva", "olympiad"):
                assert e.answer and all(isinstance(a, str) and a == a.strip() and a for a in e.answer), e.answer
            else:
                assert isinstance(e.answer, str) and e.answer == e.answer.strip(), (name, e.answer)
            if name in ("gsm8k", "math12k", "math500") or (name, split) == ("svamp", "train"):
                assert "\\boxed" in e.solution, (name, e.solution[-100:])


def test_real_flawed_math12k_golds(real, data_dir):
    """Four Math12k records have a missing gold in the source: two solutions end in an empty \\boxed{} (gold ""),
    two in '\\boxed 2' / '\\boxed 9' without braces (gold "None"). load_dataset drops exactly these four."""
    with open(data_dir / data.DATA_FILES["math12k"]["train"], encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    bad = {i + 1: r["answer"] for i, r in enumerate(raw) if r["answer"].strip() in data.MISSING_GOLDS}
    assert bad == {1166: "", 4013: "None", 8126: "", 10892: "None"}
    kept = real["math12k", "train"]
    assert len(kept) == len(raw) - 4 == 11996
    assert [e.question for e in kept] == [r["problem"] for i, r in enumerate(raw) if i + 1 not in bad]
    assert all(e.answer.strip() not in data.MISSING_GOLDS for exs in real.values() for e in exs
               if isinstance(e.answer, str))


def test_real_gsm8k_cots(real):
    for e in real["gsm8k", "train"] + real["gsm8k", "test"]:
        assert "<<" not in e.solution and ">>" not in e.solution and "####" not in e.solution
        assert e.solution.endswith(f"\\boxed{{{e.answer}}}.")
        assert re.fullmatch(r"-?\d+", e.answer), e.answer  # GSM8K golds are integers once commas are removed


def test_real_svamp(real):
    for e in real["svamp", "train"]:
        boxed = re.search(r"\\boxed\{([^{}]*)\}\.?$", e.solution)
        assert boxed, e.solution[-80:]
        x, gold = float(boxed.group(1).rstrip("%").replace(",", "")), float(e.answer)
        assert abs(x - gold) <= 1e-2 * max(1.0, abs(gold)), (boxed.group(1), e.answer)  # CoT rounds e.g. 3.33
    for e in real["svamp", "train"] + real["svamp", "test"]:
        assert not e.answer.endswith(".0") and math.isfinite(float(e.answer))
    first = real["svamp", "test"][0]
    assert first == Example("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
                            "How much do you have to pay to buy each pack?", None, "51")


def test_real_eval_golds(real):
    assert real["amc", "test"][0].answer == "142"
    assert real["minerva", "test"][0].answer == ["9.6"]
    assert real["aime", "test"][0].answer == "204"
    assert real["math500", "test"][0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


# ----------------------------------------------------------------------------------------------------------
# SFT examples and collation

EX = Example("What is 2+3?", "2 + 3 = 5.\nThe answer is \\boxed{5}.", "5")


def check_sft(t, ex):
    ids, mask = sft_example(t, ex)
    prompt = t.encode(chat_prompt(ex.question))
    assert len(ids) == len(mask) and ids[: len(prompt)] == prompt
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))  # exactly the completion
    assert ids[-1] == t.im_end_id
    assert t.decode(ids[len(prompt):], skip_special_tokens=False) == ex.solution + "<|im_end|>"
    assert t.decode(ids[: len(prompt)], skip_special_tokens=False) == chat_prompt(ex.question)
    ids8, mask8 = sft_example(t, ex, max_len=len(prompt) + 2)
    assert (ids8, mask8) == (ids[: len(prompt) + 2], mask[: len(prompt) + 2]) and sum(mask8) == 2
    assert sft_example(t, ex, max_len=0) == ([], [])


def test_sft_example_demo(demo_tok):
    check_sft(demo_tok, EX)
    with pytest.raises(ValueError, match="no solution"):
        sft_example(demo_tok, Example("q", None, "1"))
    for bad in (-1, -20, 5.0, True):                 # -1 silently dropped the last token (a slice ids[:-1])
        with pytest.raises(ValueError, match=f"max_len={bad!r}: expected None or an integer >= 0"):
            sft_example(demo_tok, EX, max_len=bad)


def test_sft_example_qwen2(tok, real):
    check_sft(tok, EX)
    check_sft(tok, real["gsm8k", "train"][0])
    check_sft(tok, real["math12k", "train"][0])


def test_sft_example_tokenizes_prompt_and_completion_separately(tok):
    """A solution starting with newlines: tokenized together with the prompt, 'assistant\\n' + '\\n\\n' would merge
    into one '\\n\\n\\n' token (Qwen2 id 1406) and change the prompt's last id; separately, the prompt ids are
    exactly chat_prompt's (what the sampler is given) and the completion starts with '\\n\\n' (id 271)."""
    ex = Example("Q?", "\n\nStep 1: 5.", "5")
    prompt = tok.encode(chat_prompt(ex.question))
    assert prompt[-2:] == [77091, 198] and tok.encode(chat_prompt(ex.question) + "\n\n")[-2:] == [77091, 1406]
    ids, mask = sft_example(tok, ex)
    assert ids[len(prompt) - 2:len(prompt) + 1] == [77091, 198, 271] and ids[-1] == tok.im_end_id
    check_sft(tok, ex)


def test_collate():
    b = collate_sft([([5, 6, 7], [0, 1, 1]), ([8], [1])], pad_token_id=9)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]] and b["input_ids"].dtype == torch.long
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["loss_mask"].tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]] and b["loss_mask"].dtype == torch.float32
    ids, att = collate_prompts([[1, 2, 3], [4], []], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert att.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    # tolist() compares True == 1 and 1.0 == 1: the dtypes are checked apart
    assert b["attention_mask"].dtype == ids.dtype == att.dtype == torch.long
    ids, att = collate_prompts([], pad_token_id=0)                       # an empty batch: [0, 0], no error
    assert ids.shape == att.shape == (0, 0) and ids.dtype == att.dtype == torch.long
    assert all(v.shape == (0, 0) for v in collate_sft([], pad_token_id=9).values())
    with pytest.raises(ValueError, match=r"batch\[1\]: 3 ids but 2 loss_mask entries"):   # was a shorter loss_mask
        collate_sft([([5], [1]), ([5, 6, 7], [0, 1])], pad_token_id=9)


def test_write_text_atomic_never_leaves_a_half_written_file(tmp_path):
    p = tmp_path / "new" / "dir" / "f.txt"                       # missing folders are created
    data.write_text_atomic(p, "first\n")
    assert p.read_text() == "first\n"
    with pytest.raises(UnicodeEncodeError):                       # fails inside the write (a lone surrogate)
        data.write_text_atomic(p, "second \ud800\n")
    assert p.read_text() == "first\n" and os.listdir(p.parent) == ["f.txt"]   # old content, no temp file left


def test_write_bytes_atomic_cleans_up_after_a_failure_inside_the_write(tmp_path, monkeypatch):
    """A failure after the temp file exists (write_text_atomic's encoding error above happens before it) leaves
    the old file and no temp file, for an exception (TypeError from the write) and for Ctrl-C alike; the temp
    file is in the target's folder, so the rename never crosses file systems."""
    p = tmp_path / "f.bin"
    data.write_bytes_atomic(p, b"old")
    with pytest.raises(TypeError):
        data.write_bytes_atomic(p, "text, not bytes")                   # mkstemp done, f.write raises
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    renames = []

    def interrupted(src, dst):
        renames.append((os.path.dirname(src), os.path.dirname(dst)))
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.write_text_atomic(p, "new")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    assert renames == [(str(tmp_path), str(tmp_path))]


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """0o666 minus the umask, like open(): checked under a umask other than the usual 022."""
    old = os.umask(0o027)
    try:
        data.write_text_atomic(tmp_path / "atomic.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640
