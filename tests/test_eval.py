"""eval.py evaluation: evaluate() / run_benchmarks() with a fake model, the CLI's user errors, and one
end-to-end run of `python eval.py` on a tiny random Qwen2 with a tiny trained tokenizer."""
import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import eval as E

ROOT = Path(__file__).resolve().parents[1]


class ByteTokenizer:
    """ids 0..2 are specials (pad, eos1, eos2); byte b has id b + 3."""
    eos_token_ids = (1, 2)
    pad_token_id = 0
    vocab_size = 259

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8")


def question_of(tok, prompt_ids):
    text = tok.decode(prompt_ids)
    return text.split("user\n", 1)[1].split("<|im_end|>", 1)[0]


class FakeModel:
    """generate() answers each prompt with a canned completion, then EOS, then junk the mask hides."""

    def __init__(self, tok, completions):
        self.tok, self.completions, self.calls = tok, completions, []

    def generate(self, prompts, max_new_tokens, min_new_tokens=0, temperature=1.0, top_p=1.0, skip_mask=None,
                 eos_token_ids=(), pad_token_id=0, generator=None, valid_vocab_size=None):
        self.calls.append(dict(lengths=[len(p) for p in prompts], max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, skip_mask=skip_mask,
                               eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, generator=generator,
                               valid_vocab_size=valid_vocab_size))
        junk = self.tok.encode("\\boxed{999}")              # after EOS: masked out, must be ignored
        rows = [self.tok.encode(self.completions[question_of(self.tok, p)])[:max_new_tokens - 1] +
                [eos_token_ids[0]] + junk for p in prompts]
        T = max(len(r) for r in rows)
        tokens = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            tokens[b, :len(r)] = torch.tensor(r)
            n_real = len(r) - len(junk)                      # completion + EOS
            mask[b, :n_real] = True
        return SimpleNamespace(tokens=tokens, mask=mask)


EXAMPLES = [
    data.Example("What is 1+1?", None, "2"),
    data.Example("A much longer question: what is half of one, written as a fraction?", None, "\\frac{1}{2}"),
    data.Example("Name the point.", None, "(1,2)"),
    data.Example("Give the wavelength.", None, ["9.6", "9.60"]),
    data.Example("Medium length question number five?", None, "142"),
]
COMPLETIONS = {
    "What is 1+1?": "1+1 = \\boxed{2}.",
    "A much longer question: what is half of one, written as a fraction?": "Half is $\\boxed{0.5}$",
    "Name the point.": "The point is \\boxed{(2,1)}",              # wrong order: incorrect
    "Give the wavelength.": "about \\boxed{9.6 \\text{ m}}",
    "Medium length question number five?": "no box, 142",          # no boxed answer: incorrect
}


def test_evaluate_grades_in_order_and_batches_by_length():
    tok = ByteTokenizer()
    model = FakeModel(tok, COMPLETIONS)
    g = torch.Generator().manual_seed(0)
    acc, records = E.evaluate(model, tok, EXAMPLES, batch_size=2, max_new_tokens=64, temperature=0.7, top_p=0.9,
                              skip_mask=[False, True], generator=g)
    assert acc == pytest.approx(3 / 5)
    assert [r["question"] for r in records] == [ex.question for ex in EXAMPLES]
    assert [r["correct"] for r in records] == [True, True, False, True, False]
    assert [r["extracted"] for r in records] == ["2", "0.5", "(2,1)", "9.6 \\text{ m}", None]
    assert records[0]["completion"] == "1+1 = \\boxed{2}."         # EOS and the junk after it are gone
    assert records[0]["num_tokens"] == len(tok.encode("1+1 = \\boxed{2}.")) + 1
    assert records[3]["gold"] == ["9.6", "9.60"]
    assert set(records[0]) == {"question", "gold", "completion", "extracted", "correct", "num_tokens"}
    # 3 batches of <= 2, longest prompts first
    lengths = [n for c in model.calls for n in c["lengths"]]
    assert [len(c["lengths"]) for c in model.calls] == [2, 2, 1]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(lengths) == sorted(len(tok.encode(data.chat_prompt(ex.question))) for ex in EXAMPLES)
    c = model.calls[0]
    assert (c["max_new_tokens"], c["temperature"], c["top_p"], c["skip_mask"]) == (64, 0.7, 0.9, [False, True])
    assert c["eos_token_ids"] == (1, 2) and c["pad_token_id"] == 0 and c["valid_vocab_size"] == 259
    assert c["generator"] is g


class SpellingTokenizer(ByteTokenizer):
    """Like ByteTokenizer, but decode(..., skip_special_tokens=False) writes the special ids out."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(("" if skip_special_tokens else f"<{i}>") if i < 3 else bytes([i - 3]).decode("latin-1")
                       for i in ids)


def test_evaluate_decodes_without_special_tokens():
    tok = SpellingTokenizer()
    _, records = E.evaluate(FakeModel(tok, COMPLETIONS), tok, EXAMPLES[:1])
    assert records[0]["completion"] == "1+1 = \\boxed{2}."       # the EOS id is not written into the text
    assert tok.decode([5, 1], skip_special_tokens=False) == "\x02<1>"


def test_evaluate_defaults_are_greedy_and_progress_is_reported():
    tok = ByteTokenizer()
    model = FakeModel(tok, COMPLETIONS)
    seen = []
    acc, records = E.evaluate(model, tok, EXAMPLES[:3], batch_size=2, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(2, 3), (3, 3)]
    c = model.calls[0]
    assert (c["max_new_tokens"], c["temperature"], c["top_p"], c["skip_mask"]) == (3000, 0.0, 1.0, None)
    assert acc == pytest.approx(2 / 3)
    assert E.evaluate(model, tok, [])[0] == 0.0
    with pytest.raises(ValueError, match="batch_size"):
        E.evaluate(model, tok, EXAMPLES, batch_size=0)


def test_evaluate_stops_completions_at_the_context_length():
    """prompt + completion never exceeds max_position_embeddings (per row, as vLLM's max_model_len): the long
    prompt's row is cut after 5 tokens, the short one's completion is whole; a prompt that fills the context is
    an error naming the limit."""
    tok = ByteTokenizer()
    short, long = EXAMPLES[0], EXAMPLES[1]
    n_short, n_long = (len(tok.encode(data.chat_prompt(ex.question))) for ex in (short, long))
    model = FakeModel(tok, COMPLETIONS)
    model.config = SimpleNamespace(max_position_embeddings=n_long + 5, vocab_size=259)
    acc, records = E.evaluate(model, tok, [short, long], batch_size=2, max_new_tokens=64)
    assert model.calls[0]["max_new_tokens"] == min(64, n_long + 5 - n_short)
    assert records[1]["completion"] == "Half " and records[1]["num_tokens"] == 5
    assert records[0]["completion"] == "1+1 = \\boxed{2}." and records[0]["correct"] and acc == 0.5
    model.config.max_position_embeddings = n_long
    with pytest.raises(ValueError, match=f"a prompt has {n_long} tokens: no room .* max_position_embeddings = {n_long}"):
        E.evaluate(model, tok, [short, long], batch_size=2, max_new_tokens=64)


def write_suite(d: Path):
    """A small data folder in the layout of ../shared/data (understand-r1-zero JSON lines)."""
    suite = d / "eval_suite" / "understand-r1-zero_jsonl"
    suite.mkdir(parents=True)
    aime = [{"problem": "What is 1+1?", "answer": "2"},
            {"problem": "Name the point.", "answer": "(1,2)"}]
    amc = [{"problem": "Medium length question number five?", "answer": 142.0}]
    minerva = [{"problem": "Give the wavelength.", "answer": ["9.6\n"]},
               {"problem": "A much longer question: what is half of one, written as a fraction?",
                "answer": ["\\frac{1}{2}\n", "1/2"]}]
    for name, rows in [("aime", aime), ("amc", amc), ("minerva", minerva)]:
        (suite / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_run_benchmarks_table_and_jsonl(tmp_path, capsys):
    tok = ByteTokenizer()
    model = FakeModel(tok, dict(COMPLETIONS, **{"Medium length question number five?": "\\boxed{142}"}))
    data_dir = write_suite(tmp_path / "data")
    out = tmp_path / "preds" / "eval.jsonl"
    res = E.run_benchmarks(model, tok, data_dir, "aime,amc,minerva", out, batch_size=4, max_new_tokens=64)
    acc = {k: v["accuracy"] for k, v in res["benchmarks"].items()}
    assert acc == {"aime": 0.5, "amc": 1.0, "minerva": 1.0}
    assert res["macro"] == pytest.approx(2.5 / 3)                 # unweighted mean over benchmarks
    printed = capsys.readouterr().out
    assert "aime" in printed and "50.0%" in printed and "macro avg" in printed and "83.3%" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["benchmark"], r["index"]) for r in rows] == [("aime", 0), ("aime", 1), ("amc", 0),
                                                            ("minerva", 0), ("minerva", 1)]
    assert rows[1]["extracted"] == "(2,1)" and rows[1]["correct"] is False
    assert rows[2]["gold"] == "142" and rows[2]["correct"] is True
    assert rows[3]["gold"] == ["9.6"]
    assert os.listdir(out.parent) == ["eval.jsonl"]                # no temp file left behind
    # limit keeps the first N of each benchmark
    res = E.run_benchmarks(model, tok, data_dir, ["aime", "minerva"], None, limit=1, print_fn=lambda *a: None)
    assert {k: v["n"] for k, v in res["benchmarks"].items()} == {"aime": 1, "minerva": 1}
    # every benchmark file is read before the first evaluation: a missing one costs no generation
    calls = []
    with pytest.raises(FileNotFoundError, match="olympiad"):
        E.run_benchmarks(model, tok, data_dir, "aime,olympiad", None, evaluate_fn=lambda *a, **k: calls.append(1))
    assert calls == []


def test_format_table_golden():
    table = E.format_table({"aime": {"n": 30, "accuracy": 0.1}, "amc": {"n": 83, "accuracy": 0.5}})
    assert table.splitlines() == ["benchmark        n   pass@1",
                                  "aime            30    10.0%",
                                  "amc             83    50.0%",
                                  "macro avg             30.0%"]


def test_check_benchmarks():
    assert E.check_benchmarks("aime, amc") == ["aime", "amc"]
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        E.check_benchmarks("aime,gsm9k")
    with pytest.raises(ValueError, match="no benchmark"):
        E.check_benchmarks(" , ")


def test_write_jsonl_replaces_atomically(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("old\n")
    E.write_jsonl(p, [{"a": "π"}, {"b": [1, 2]}])
    assert p.read_text(encoding="utf-8") == '{"a": "π"}\n{"b": [1, 2]}\n'
    with pytest.raises(TypeError):
        E.write_jsonl(p, [{"a": object()}])
    assert p.read_text(encoding="utf-8") == '{"a": "π"}\n{"b": [1, 2]}\n'   # untouched by the failed write
    assert os.listdir(tmp_path) == ["x.jsonl"]


def test_eval_skip_mask():
    m = E.draw_eval_skip_mask(28, 0.1, 1, seed=3)
    assert len(m) == 28 and sum(m) == 3 and not m[0] and not m[27]   # k = round(0.1 * 28) = 3, border 1
    assert m == E.draw_eval_skip_mask(28, 0.1, 1, seed=3)
    assert sum(E.draw_eval_skip_mask(28, 0.05, 1, seed=0)) == 1


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
    (["--skip-ratio", "1.5"], "--skip-ratio 1.5"),
    (["--skip-border", "-1"], "--skip-border -1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--top-p", "0"], "--top-p 0.0"),
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--temperature", "inf"], "--temperature inf"),
    (["--skip-ratio", "1"], "--skip-ratio 1.0"),
    (["--limit", "0"], "--limit 0"),
    (["--seed", str(2**64)], f"--seed {2**64}: expected an integer in [-2^63, 2^64)"),   # not torch's bare overflow
    (["--benchmarks", "aime,foo"], "unknown benchmark 'foo'"),
    (["--data", "/nonexistent/data"], "--data /nonexistent/data"),
    (["--device", "tpu"], "--device = 'tpu'"),
    (["--device", "mps"], "--device = 'mps'"),
    (["--device", "meta"], "--device = 'meta'"),
    (["--device", "cuda:7"], "no such CUDA device"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, args, needle):
    base = {"--model": str(tmp_path), "--data": str(tmp_path)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = [x for kv in base.items() for x in kv]
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


@pytest.mark.parametrize("seed,ok", [(-2**63, True), (2**64 - 1, True), (-2**63 - 1, False), (2**64, False)])
def test_cli_seed_range_borders(tmp_path, capsys, seed, ok):
    """--seed takes what torch.Generator.manual_seed takes, [-2^63, 2^64): at the borders the next check (here a
    missing --model) is the one that fails."""
    assert E.main(["--model", str(tmp_path / "none"), "--data", str(tmp_path), "--seed", str(seed)]) == 2
    err = capsys.readouterr().err
    assert (f"--model {tmp_path / 'none'}" in err) is ok and (f"--seed {seed}:" in err) is not ok, err


def test_cli_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        E.main(["--model", "x", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-such-flag" in err


# ---------------------------------------------------------------------------------------------------------
# end to end: python eval.py on a tiny random Qwen2 + a tiny trained tokenizer


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import qwen2
    d = tmp_path_factory.mktemp("tiny")
    texts = [data.chat_prompt(q) + c for q, c in COMPLETIONS.items()] * 4
    tok = data.train_tokenizer(texts, 300)
    torch.manual_seed(0)
    cfg = qwen2.Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)
    qwen2.Qwen2(cfg).save_pretrained(d / "model")
    tok.save(d / "model")
    write_suite(d / "data")
    return d


def test_cli_end_to_end(tiny_checkpoint):
    d = tiny_checkpoint
    out = d / "preds.jsonl"
    cmd = [sys.executable, str(ROOT / "eval.py"), "--model", str(d / "model"), "--benchmarks", "aime,minerva",
           "--data", str(d / "data"), "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out),
           "--device", "cpu", "--skip-ratio", "0.25", "--skip-border", "1", "--seed", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "nested model: skipping layers [" in r.stdout           # k = round(0.25 * 4) = 1 of layers 1..2
    assert "macro avg" in r.stdout and "aime" in r.stdout and "minerva" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["benchmark"], x["index"]) for x in rows] == [("aime", 0), ("aime", 1), ("minerva", 0), ("minerva", 1)]
    assert all(0 < x["num_tokens"] <= 6 and isinstance(x["completion"], str) for x in rows)
    assert all(x["correct"] is E.grade(x["extracted"], x["gold"]) for x in rows)

    # the completions are exactly the model's greedy continuations of the qwen_math prompts (same skip mask)
    import qwen2
    model = qwen2.Qwen2.from_pretrained(d / "model")
    tok = data.Tokenizer.load(d / "model")
    mask = E.draw_eval_skip_mask(4, 0.25, 1, seed=1)
    q = rows[0]["question"]
    g = model.generate([tok.encode(data.chat_prompt(q))], max_new_tokens=6, temperature=0.0, skip_mask=mask,
                       eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id,
                       valid_vocab_size=tok.vocab_size)
    ids = g.tokens[0][g.mask[0]].tolist()
    assert rows[0]["completion"] == tok.decode(ids) and rows[0]["num_tokens"] == len(ids)


# ---------------------------------------------------------------------------------------------------------
# user mistakes found by a new-user walkthrough: each one a one-line error naming what is wrong


def one_line_error(capsys, argv) -> str:
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("size", ["half", 10])
def test_cli_truncated_checkpoint_is_one_line(tiny_checkpoint, tmp_path, capsys, size):
    import shutil
    model = shutil.copytree(tiny_checkpoint / "model", tmp_path / "model")
    f = model / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2 if size == "half" else size)
    err = one_line_error(capsys, ["--model", str(model), "--data", str(tiny_checkpoint / "data"),
                                  "--benchmarks", "aime", "--device", "cpu"])
    assert f"{f}: not a readable safetensors file (" in err, err


def _small_vocab_model(d: Path, vocab_size: int) -> Path:
    import qwen2
    cfg = qwen2.Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    qwen2.Qwen2(cfg).save_pretrained(d)
    return d


def test_cli_tokenizer_larger_than_the_vocabulary(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import qwen2
    model = _small_vocab_model(tmp_path / "small", 64)
    n = data.Tokenizer.load(tiny_checkpoint / "model").vocab_size
    monkeypatch.setattr(qwen2.Qwen2, "generate", lambda *a, **k: pytest.fail("generation started"))
    err = one_line_error(capsys, ["--model", str(model), "--tokenizer", str(tiny_checkpoint / "model"),
                                  "--data", str(tiny_checkpoint / "data"), "--benchmarks", "aime", "--device", "cpu"])
    assert err == (f"error: --tokenizer {tiny_checkpoint / 'model'}: the tokenizer has {n} ids but the model {model} "
                   f"has vocab_size 64; expected a tokenizer of at most 64 ids\n")
    # the tokenizer read from the model folder itself
    data.Tokenizer.load(tiny_checkpoint / "model").save(model)
    err = one_line_error(capsys, ["--model", str(model), "--data", str(tiny_checkpoint / "data"), "--device", "cpu"])
    assert f"--model {model}: its tokenizer has {n} ids but its config.json has vocab_size 64" in err, err


def test_cli_real_qwen2_tokenizer_with_a_tiny_model(data_dir, tiny_checkpoint, tmp_path, capsys):
    tok_dir = data_dir / "qwen2_tokenizer"
    if not tok_dir.is_dir():
        pytest.skip(f"{tok_dir} not found")
    model = _small_vocab_model(tmp_path / "small", 448)
    err = one_line_error(capsys, ["--model", str(model), "--tokenizer", str(tok_dir),
                                  "--data", str(tiny_checkpoint / "data"), "--benchmarks", "aime", "--device", "cpu"])
    assert "the tokenizer has 151665 ids but the model" in err and "at most 448 ids" in err, err


def test_evaluate_checks_the_tokenizer_before_generating():
    tok = ByteTokenizer()
    model = FakeModel(tok, COMPLETIONS)
    model.config = SimpleNamespace(vocab_size=200)                      # < 259 byte-tokenizer ids
    with pytest.raises(ValueError, match="the tokenizer has 259 ids but the model has vocab_size 200"):
        E.evaluate(model, tok, EXAMPLES)
    assert model.calls == []
    model.config.vocab_size = 259
    assert E.evaluate(model, tok, EXAMPLES[:1])[0] == 1.0


def test_cli_data_folder_fallback(tmp_path, capsys, monkeypatch):
    # the fallback is the developers' layout beside the project folder, not relative to the current directory
    assert E.DEFAULT_DATA_DIR == ROOT.parent / "shared" / "data"
    monkeypatch.delenv("NESTED_REFT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(E, "DEFAULT_DATA_DIR", tmp_path / "absent")
    err = one_line_error(capsys, ["--model", str(tmp_path)])
    assert err == "error: no data folder: pass --data DIR or set NESTED_REFT_DATA (see the README's Data section)\n"
    monkeypatch.setattr(E, "DEFAULT_DATA_DIR", tmp_path)
    assert E.resolve_data_dir(None) == str(tmp_path)
    monkeypatch.setenv("NESTED_REFT_DATA", str(tmp_path / "nope"))
    err = one_line_error(capsys, ["--model", str(tmp_path)])
    assert f"NESTED_REFT_DATA={tmp_path / 'nope'}: datasets folder not found" in err, err
    assert E.resolve_data_dir(str(tmp_path)) == str(tmp_path)       # --data wins over both


def test_cli_model_is_a_run_folder_or_a_file(tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "run1"
    (run / "checkpoint").mkdir(parents=True)
    argv = ["--data", str(tiny_checkpoint / "data")]
    err = one_line_error(capsys, ["--model", str(run)] + argv)
    assert err == f"error: --model {run}: is a run folder: pass {run / 'checkpoint'}\n"
    (run / "sft").mkdir()
    err = one_line_error(capsys, ["--model", str(run)] + argv)
    assert err == f"error: --model {run}: is a run folder: pass {run / 'checkpoint'} (or {run / 'sft'})\n"
    err = one_line_error(capsys, ["--model", str(tiny_checkpoint / "model"), "--tokenizer", str(run)] + argv)
    assert f"--tokenizer {run}: is a run folder" in err, err
    f = tiny_checkpoint / "model" / "model.safetensors"
    for flag in ("--model", "--tokenizer"):
        base = {"--model": str(tiny_checkpoint / "model"), flag: str(f)}
        err = one_line_error(capsys, [x for kv in base.items() for x in kv] + argv)
        assert f"{flag} {f}: is a file, expected a " in err and "directory" in err, err


def test_cli_out_is_checked_before_evaluating(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import qwen2
    monkeypatch.setattr(qwen2.Qwen2, "generate", lambda *a, **k: pytest.fail("generation started"))
    (tmp_path / "afile").write_text("x")
    argv = ["--model", str(tiny_checkpoint / "model"), "--data", str(tiny_checkpoint / "data"), "--device", "cpu"]
    err = one_line_error(capsys, argv + ["--out", str(tmp_path)])
    assert err == f"error: --out {tmp_path}: is a directory, expected a .jsonl file path\n"
    out = tmp_path / "afile" / "sub" / "p.jsonl"
    err = one_line_error(capsys, argv + ["--out", str(out)])
    assert err == f"error: --out {out}: {tmp_path / 'afile'} is a file, expected a directory\n"



def test_check_out_walks_up_to_the_first_existing_folder(tmp_path):
    """--out may lie in folders not made yet (write_jsonl creates them): the check climbs to the nearest existing
    ancestor, which must be a folder, and names that one; a relative path is read from the working directory."""
    assert E._check_out(str(tmp_path / "new" / "a" / "b" / "p.jsonl")) is None
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "a" / "b" / "p.jsonl"
    with pytest.raises(NotADirectoryError, match=re.escape(f"--out {out}: {tmp_path / 'afile'} is a file")):
        E._check_out(str(out))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import eval\n"   # a subprocess: a climb that never
            "for p in ('p.jsonl', 'new/p.jsonl', 'afile/p.jsonl'):\n"       # reaches '/' fails, not hangs
            "    try: eval._check_out(p); print('ok')\n"
            "    except NotADirectoryError as e: print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.splitlines() == ["ok", "ok", f"--out afile/p.jsonl: {tmp_path / 'afile'} is a file, "
                                                 "expected a directory"], r.stderr

def test_default_out_path_names_the_run():
    t = time.mktime((2026, 12, 2, 16, 5, 9, 0, 0, -1))
    out = lambda stem: os.path.join("runs", f"eval-{stem}-20261202-160509.jsonl")
    assert E.default_out_path("runs/run1/checkpoint", t) == out("run1-checkpoint")
    assert E.default_out_path("runs/run2/sft/", t) == out("run2-sft")
    assert E.default_out_path("ckpt/Qwen2.5-Math-1.5B", t) == out("Qwen2.5-Math-1.5B")
    assert "runs/eval-RUN-checkpoint-<time>.jsonl" in " ".join(E.build_parser().format_help().split())


# ---------------------------------------------------------------------------------------------------------
# mutation-testing round: behaviour no test above pinned (each test fails on the mutant named in its docstring)


def test_run_benchmarks_keeps_the_order_the_benchmarks_are_given_in(tmp_path, capsys):
    """Results, table rows and prediction lines follow the order of `names` ("minerva,aime"), not the alphabet (the
    test above asks for names already in alphabetical order: a run_benchmarks that sorted them passed it)."""
    tok = ByteTokenizer()
    data_dir = write_suite(tmp_path / "data")
    out = tmp_path / "eval.jsonl"
    res = E.run_benchmarks(FakeModel(tok, COMPLETIONS), tok, data_dir, "minerva,aime", out, batch_size=4,
                           max_new_tokens=64)
    assert list(res["benchmarks"]) == ["minerva", "aime"]
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table if line.startswith(("minerva ", "aime "))] == ["minerva", "aime"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["benchmark"], r["index"]) for r in rows] == [("minerva", 0), ("minerva", 1), ("aime", 0), ("aime", 1)]


def test_format_table_of_no_benchmark_is_the_header_alone():
    """No results: the header and no macro line (a macro average over zero benchmarks divided by zero)."""
    assert E.format_table({}) == "benchmark        n   pass@1"


def test_eval_skip_mask_is_drawn_from_a_generator_seeded_with_the_seed():
    """The nested model of `--seed s` is nested_reft.draw_skip_mask from a CPU generator seeded with s, as the docstring
    says (seeds 3 and 4 give different masks here, so a generator seeded with s + 1 fails)."""
    import nested_reft
    for seed in (3, 4):
        want = nested_reft.draw_skip_mask(28, 0.1, 1, torch.Generator().manual_seed(seed))
        assert E.draw_eval_skip_mask(28, 0.1, 1, seed) == want
    assert E.draw_eval_skip_mask(28, 0.1, 1, 3) != E.draw_eval_skip_mask(28, 0.1, 1, 4)


def test_cli_passes_every_option_to_the_evaluation(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Each evaluation flag reaches run_benchmarks, at its smallest legal value where it has one (--limit 1,
    --batch-size 1, --max-new-tokens 1, --skip-border 0): the limit, the generation settings, the nested model of
    --seed 5 (N = 4, r = 0.25, e = 0: k = 1 of layers 0..3; seed 0 and seed 6 would skip another layer) and a
    sampling generator seeded with --seed (temperature > 0). A file given as --data is refused."""
    seen = {}

    def fake_run_benchmarks(model, tokenizer, data_dir, names, out, **kw):
        seen.update(model=model, data_dir=data_dir, names=names, out=out, **kw)
    monkeypatch.setattr(E, "run_benchmarks", fake_run_benchmarks)
    out = tmp_path / "p.jsonl"
    argv = ["--model", str(tiny_checkpoint / "model"), "--data", str(tiny_checkpoint / "data"), "--benchmarks",
            "minerva,aime", "--limit", "1", "--batch-size", "1", "--max-new-tokens", "1", "--temperature", "0.5",
            "--top-p", "0.8", "--skip-ratio", "0.25", "--skip-border", "0", "--seed", "5", "--out", str(out),
            "--device", "cpu"]
    assert E.main(argv) == 0, capsys.readouterr().err
    assert (seen["names"], seen["out"], seen["data_dir"]) == (["minerva", "aime"], str(out), str(tiny_checkpoint / "data"))
    assert (seen["limit"], seen["batch_size"], seen["max_new_tokens"], seen["temperature"], seen["top_p"]) == \
        (1, 1, 1, 0.5, 0.8)
    assert seen["skip_mask"] == [False, False, False, True]
    assert "nested model: skipping layers [3] of 4" in capsys.readouterr().out
    assert torch.equal(seen["generator"].get_state(), torch.Generator().manual_seed(5).get_state())
    assert next(seen["model"].parameters()).dtype == torch.float32          # --dtype auto on the CPU
    # greedy (the default temperature 0) needs no generator; no --skip-ratio: the full model
    assert E.main(argv[:argv.index("--temperature")] + ["--device", "cpu"]) == 0
    assert seen["generator"] is None and seen["skip_mask"] is None and seen["temperature"] == 0.0
    err = one_line_error(capsys, ["--model", str(tiny_checkpoint / "model"),
                                  "--data", str(tiny_checkpoint / "model" / "config.json")])
    assert "config.json: datasets folder not found" in err, err


def test_cli_permission_error_is_one_line(tiny_checkpoint, monkeypatch, capsys):
    """The predictions file cannot be written (no permission): one line naming it, exit status 2, no traceback."""
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "runs/eval.jsonl")
    monkeypatch.setattr(E, "run_benchmarks", denied)
    err = one_line_error(capsys, ["--model", str(tiny_checkpoint / "model"), "--data", str(tiny_checkpoint / "data"),
                                  "--device", "cpu"])
    assert "Permission denied: 'runs/eval.jsonl'" in err, err


@pytest.mark.parametrize("err", [OSError(errno.EROFS, "Read-only file system", "runs/eval.jsonl"),
                                 OSError(errno.ENOSPC, "No space left on device", "runs/eval.jsonl")])
def test_cli_any_os_error_is_one_line(tiny_checkpoint, monkeypatch, capsys, err):
    """An OSError that is none of FileNotFoundError / PermissionError / ... (a read-only filesystem, a full disk, a
    name too long) is one line too, as in nested_reft.main."""
    def fails(*a, **k):
        raise err
    monkeypatch.setattr(E, "run_benchmarks", fails)
    out = one_line_error(capsys, ["--model", str(tiny_checkpoint / "model"), "--data", str(tiny_checkpoint / "data"),
                                  "--device", "cpu"])
    assert f"{err.strerror}: 'runs/eval.jsonl'" in out, out


def test_default_out_path_of_the_root_folder():
    """A model folder without a name (the filesystem root) is called 'model' in the file name."""
    t = time.mktime((2026, 12, 2, 16, 5, 9, 0, 0, -1))
    assert E.default_out_path("/", t) == os.path.join("runs", "eval-model-20261202-160509.jsonl")


def test_a_tensor_gold_is_a_type_error():
    """grade('5', torch.tensor(5)) graded the text 'tensor(5)' against '5': reward 0 for every completion, silently."""
    for gold in (torch.tensor(5), torch.tensor(5.0), [torch.tensor(5)]):
        with pytest.raises(TypeError, match="gold answer tensor"):
            E.reward("\\boxed{5}", gold)
    assert E.reward("\\boxed{5}", torch.tensor(5).item()) == 1.0
