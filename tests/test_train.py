"""The training loop (nested_reft.py): config handling, a tiny SFT + ReFT run, exact resume."""
import copy
import json
import math
import os
import re
import shutil
import subprocess
import weakref
import zlib
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import safetensors.torch
import torch

import nested_reft as nr
import qwen2
from data import Tokenizer, chat_prompt, load_dataset, sft_example, synthetic_tokenizer, train_tokenizer
from qwen2 import Qwen2, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]

# A toy GSM8K-format training set: "a plus b" with the CoT ending in #### answer.
PROBLEMS = [(a, b) for a in range(1, 7) for b in range(1, 5)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """data/gsm8k/train.jsonl, a trained byte-level BPE tokenizer and a random 4-layer Qwen2, all on disk."""
    root = tmp_path_factory.mktemp("ws")
    (root / "data" / "gsm8k").mkdir(parents=True)
    lines = [json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"})
             for a, b in PROBLEMS]
    (root / "data" / "gsm8k" / "train.jsonl").write_text("\n".join(lines) + "\n")
    texts = [l for l in lines] + [nr.chat_prompt("x") + "The answer is \\boxed{12}."]
    tok = train_tokenizer(texts, 300)
    tok.save(root / "tok")
    (root / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": list(tok.eos_token_ids)}))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2(cfg).save_pretrained(root / "model")
    return root


def tiny_config(ws: Path, out: Path, **kw) -> nr.Config:
    base = dict(model=str(ws / "model"), tokenizer=str(ws / "tok"), dataset="gsm8k", data_dir=str(ws / "data"),
                out_dir=str(out), sft_epochs=1, sft_batch_size=8, sft_micro_batch=4, steps=4, prompts_per_step=2,
                group_size=4, micro_batch=3, rollout_batch=5, max_new_tokens=6, temperature=1.0, lr=1e-3,
                skip_ratio=0.25, skip_border=1, variant="retrace", device="cpu", dtype="float32")
    base.update(kw)
    return nr.load_config("", {k: str(v) for k, v in base.items()})


@pytest.fixture
def coin_reward(monkeypatch):
    """A deterministic reward that is 1 for about half of all texts, so that a random tiny model gets non-zero
    advantages and gradients (the graders themselves are tested in test_graders.py)."""
    monkeypatch.setattr(nr, "reward", lambda text, gold: float(zlib.crc32(text.encode()) % 2))


def read_metrics(run: Path, stage: str = "reft") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["stage"] == stage]


# ---------------------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("name", nr.config_names())
def test_named_configs_load(name):
    cfg = nr.load_config(name)
    assert cfg.group_size >= 2


@pytest.mark.parametrize("name", ["gsm8k_1p5b", "svamp_1p5b", "math12k_1p5b", "gsm8k_7b", "svamp_7b", "math12k_7b"])
def test_paper_configs_keep_paper_settings(name):
    cfg = nr.load_config(name)
    assert (cfg.skip_border, cfg.beta, cfg.group_size, cfg.lr, cfg.fixed_length) == (1, 0.0, 8, 1e-6, True)
    assert ("7B" in cfg.model) == name.endswith("_7b")


@pytest.mark.parametrize("name", ["gsm8k_1p5b", "svamp_1p5b", "math12k_1p5b", "gsm8k_7b", "svamp_7b", "math12k_7b"])
def test_paper_configs_keep_the_spec_defaults(name):
    """Spec §6 (TRL GRPO defaults of 0.16-0.17 and the [U] stripped values) and §4 ([M] switches, default off):
    every paper config runs with them, whether its file sets them or the Config default does."""
    cfg = nr.load_config(name)
    trl = dict(lr_schedule="linear", warmup_steps=0, weight_decay=0.0, adam_betas="0.9,0.999", grad_clip=1.0,
               temperature=0.9, top_p=1.0, max_prompt_len=512, max_new_tokens=256, scale_rewards=True,
               aggregation="token_mean")
    unknown = dict(sft_epochs=2.0, sft_lr=1e-5, prompts_per_step=64, eval_max_new_tokens=3000, sft_skip_prob=0.0)
    plausible = dict(weight_grad="detached", lam=1.0, clip_eps=0.0)     # clip_eps 0 = off (TRL's 0.2 is a switch)
    paper = dict(skip_ratio=0.1, skip_border=1, beta=0.0, group_size=8, lr=1e-6, fixed_length=True)
    for key, value in {**trl, **unknown, **plausible, **paper}.items():
        assert getattr(cfg, key) == value, key
    assert nr.num_skipped(cfg.skip_ratio, 28) == 3                     # Table 1: r = 10 % of N = 28 -> k = 3


def test_named_config_runs_from_any_folder(tmp_path, monkeypatch):
    """configs/tiny.json names configs/tiny_model.json: found from outside the project folder too."""
    monkeypatch.chdir(tmp_path)
    model, _ = nr.load_model(nr.load_config("tiny"), torch.device("cpu"))
    assert model.config.num_hidden_layers == 12
    with pytest.raises(FileNotFoundError, match="nope.json"):
        nr.load_model(nr.load_config("tiny", {"model_config": "nope.json"}), torch.device("cpu"))


def test_overrides_are_type_checked():
    cfg, resume = nr.parse_args(["--config", "gsm8k_1p5b", "--skip_ratio=0.15", "--group-size", "4",
                                 "--fixed_length=false", "--variant=base"])
    assert (cfg.skip_ratio, cfg.group_size, cfg.fixed_length, cfg.variant, resume) == (0.15, 4, False, "base", "")
    with pytest.raises(nr.UserError, match="'group_size' expects int"):
        nr.parse_args(["--config=gsm8k_1p5b", "--group_size=four"])
    with pytest.raises(nr.UserError, match="unknown key '--learning_rate'"):
        nr.parse_args(["--config=gsm8k_1p5b", "--learning_rate=1"])
    with pytest.raises(nr.UserError, match="'variant'.*expected one of base, practical, retrace"):
        nr.parse_args(["--config=gsm8k_1p5b", "--variant=vtrace"])
    with pytest.raises(nr.UserError, match="skip_ratio"):
        nr.parse_args(["--config=gsm8k_1p5b", "--skip_ratio=1.5"])
    for argv, words in ((["--config=gsm8k_1p5b", "--out_dir="], "'out_dir' = ''"),     # not the working dir
                        (["--resume="], "--resume needs a value"), (["--config="], "--config needs a value")):
        with pytest.raises(nr.UserError, match=words):
            nr.parse_args(argv)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "m", "dataset": "gsm8k", "lrr": 1}')
    with pytest.raises(nr.UserError, match=r"bad.json: unknown key 'lrr'"):
        nr.load_config(str(bad))
    bad.write_text('{"model": "m",\n "steps": }')
    with pytest.raises(nr.UserError, match=r"bad.json: invalid JSON at line 2"):
        nr.load_config(str(bad))
    bad.write_text('{"model": "m", "steps": 10, "_c": 1, "lr": 1e-6, "steps": 20, "_c": 2}')   # not the last silently
    with pytest.raises(nr.UserError, match=r"bad.json: key 'steps' is given 2 times, expected once"):
        nr.load_config(str(bad))
    bad.write_text('{"_comment": "a", "model": "m", "_comment": "b"}')   # "_" keys are comments: repeats are fine
    assert nr.load_config(str(bad)).model == "m"
    bad.write_bytes(b'\xff\xfe{"steps": 1}')                          # not UTF-8 (e.g. saved as UTF-16): named
    with pytest.raises(nr.UserError, match=r"bad.json: not UTF-8 text \(.*\), expected a JSON config"):
        nr.load_config(str(bad))
    with pytest.raises(nr.UserError, match="config 'nope'.*not found"):
        nr.load_config("nope")
    (tmp_path / "dir.json").mkdir()                                   # said "not found" of a folder that is there
    with pytest.raises(nr.UserError, match=f"config '{tmp_path / 'dir.json'}': .* is a folder, expected a JSON config"):
        nr.load_config(str(tmp_path / "dir.json"))


def test_help_lists_every_field():
    text = nr.help_text()
    for f in fields(nr.Config):
        assert f"--{f.name}=" in text


def test_cli_user_error_is_one_line():
    p = subprocess.run([sys.executable, "nested_reft.py", "--config=gsm8k_1p5b", "--steps=x"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "'steps' expects int" in p.stderr


def test_cli_os_error_is_one_line(monkeypatch, capsys):
    """A full disk or a folder without write permission mid-run: one line naming the file, exit status 2."""
    def full_disk(cfg, resume=""):
        raise OSError(28, "No space left on device", "runs/x/metrics.jsonl")
    monkeypatch.setattr(nr, "train", full_disk)
    assert nr.main(["--config=tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device: 'runs/x/metrics.jsonl'" in err


def test_cli_value_error_is_one_line(tmp_path, monkeypatch, capsys):
    """A value found wrong only once the model is read (k = round(0.9 * 12) = 11 > |V| = 10 on the tiny model): a
    one-line error, exit status 2, before any training."""
    monkeypatch.delenv("NESTED_REFT_DEBUG", raising=False)
    assert nr.main(["--config=tiny", "--skip_ratio=0.9", f"--out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: skip ratio r=0.9 gives k=round(r*N)=11"), err
    assert not (tmp_path / "run").exists()


def test_sft_examples_cut_by_max_seq_len_are_counted_and_announced(workspace, tmp_path, capsys):
    """An SFT example longer than max_seq_len loses its end (the boxed answer, <|im_end|>): the run says how many
    (one note line; the first SFT row and summary.json's sft record them) instead of training on them silently."""
    tok = Tokenizer.load(workspace / "tok")
    examples = load_dataset("gsm8k", workspace / "data", "train")
    L = sorted(len(sft_example(tok, ex)[0]) for ex in examples)[len(examples) // 2]     # the median length
    want = sum(len(sft_example(tok, ex)[0]) > L for ex in examples)
    summary = nr.train(tiny_config(workspace, tmp_path / "run", max_seq_len=L, steps=1))
    assert 0 < want < len(examples) and summary["sft"]["cut"] == want and summary["sft"]["examples"] == len(examples)
    assert f"note: {want} of {len(examples)} SFT examples are longer than max_seq_len={L} tokens" in \
        capsys.readouterr().out
    rows = read_metrics(tmp_path / "run", "sft")
    assert rows[0]["cut"] == want and len(rows) > 1 and not any("cut" in r for r in rows[1:])   # the first row only
    cfg = tiny_config(workspace, tmp_path / "again", max_seq_len=L, sft_epochs=0.5)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    for log in (nr.MetricsLog(tmp_path / "q.jsonl", quiet=True), nr.MetricsLog(tmp_path / "r1.jsonl", enabled=False)):
        nr.sft(model, tok, examples, cfg, torch.device("cpu"), torch.float32, log)   # quiet; a torchrun rank > 0
        assert "note:" not in capsys.readouterr().out


def test_data_order_reshuffles_each_epoch_and_resumes():
    a = nr.DataOrder(5, seed=3)
    first, second = a.take(5), a.take(5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    b = nr.DataOrder(5, seed=3)
    b.take(7)
    c = nr.DataOrder(5, seed=3)
    c.load_state_dict(b.state_dict())
    assert b.take(6) == c.take(6)


# ---------------------------------------------------------------------------------------------------------- runs

def test_end_to_end_sft_then_nested_reft(workspace, tmp_path, coin_reward):
    cfg = tiny_config(workspace, tmp_path / "run")
    summary = nr.train(cfg, quiet=True)
    run = tmp_path / "run"
    sft_rows, rows = read_metrics(run, "sft"), read_metrics(run)
    assert len(sft_rows) == 3 and len(rows) == 4 and summary["steps"] == 4   # ceil(24 * 1 / 8) SFT steps
    assert summary["sft"] == {"steps": 3, "runtime": sft_rows[-1]["runtime"], "loss_first": sft_rows[0]["loss"],
                              "loss_last": sft_rows[-1]["loss"], "examples": 24, "cut": 0}
    assert json.loads((run / "summary.json").read_text())["sft"] == summary["sft"]
    for r in rows:
        assert len(r["skip"]) == 1 and r["skip"][0] in (1, 2)                # k = round(.25 * 4) = 1, e = 1
        for key in ("reward_mean", "zero_std_frac", "ratio_min", "ratio_mean", "ratio_max", "trunc_frac",
                    "ess_ratio", "kl_mu_pi", "entropy", "completion_len", "rollout_tok_s", "tok_s", "runtime"):
            assert key in r and r[key] == r[key], key                        # present and not NaN
        assert r["completion_len"] == 6                                      # fixed-length rollouts
        assert r["grad_norm"] > 0 and r["loss"] != 0
    # a fresh skip mask every step, drawn from the sampler seeded with cfg.seed (this seed's masks differ over the run)
    sampler = nr.SkipSampler(4, 0.25, 1, seed=cfg.seed)
    expected = [nr.skipped_layers(sampler.next()) for _ in rows]
    assert [r["skip"] for r in rows] == expected and len({tuple(s) for s in expected}) > 1
    # learning rates: SFT at sft_lr, ReFT at lr, each decaying linearly over its own steps
    assert [r["lr"] for r in sft_rows] == pytest.approx([cfg.sft_lr * f for f in (1, 2 / 3, 1 / 3)])
    assert [r["lr"] for r in rows] == pytest.approx([cfg.lr * f for f in (1, 3 / 4, 2 / 4, 1 / 4)])
    # the nested behaviour model differs from the full model: some ratio is not 1
    assert any(abs(r["ratio_max"] - 1) > 1e-6 or abs(r["ratio_min"] - 1) > 1e-6 for r in rows)
    loaded = Qwen2.from_pretrained(run / "checkpoint")
    assert loaded.config.num_hidden_layers == 4 and (run / "sft" / "config.json").is_file()
    # both checkpoints are self-contained folders: the tokenizer the run used is saved beside the weights
    tok = Tokenizer.load(workspace / "tok")
    text = "Tom has 3 apples. \\boxed{7}"
    for d in (run / "checkpoint", run / "sft"):
        assert Tokenizer.load(d).encode(text) == tok.encode(text)
        assert (d / "generation_config.json").read_text() == (workspace / "tok" / "generation_config.json").read_text()


def test_plain_reft_is_on_policy(workspace, tmp_path):
    """r = 0, e = 0: mu = pi_theta_old, so every recorded ratio is 1 (same logit processing on both sides: at a
    temperature other than 1, pi_theta's logits are divided by it too, spec §3.6)."""
    cfg = tiny_config(workspace, tmp_path / "run", skip_ratio=0, skip_border=0, sft_epochs=0, steps=2,
                      temperature=0.7)
    assert nr.train(cfg, quiet=True)["sft"] is None                          # no warm-up, nothing to report
    for r in read_metrics(tmp_path / "run"):
        assert r["skip"] == []
        assert abs(r["ratio_min"] - 1) < 1e-4 and abs(r["ratio_max"] - 1) < 1e-4


def test_plain_reft_scores_pi_theta_with_the_samplers_top_p(workspace, tmp_path):
    """r = 0, top_p = 0.8, temperature 0.7: the recorded log mu (nucleus of mu = pi_theta_old) and reft_step's log pi_theta
    agree (|rho - 1| < 1e-4 on every token) only if pi_theta is scored with the same top-p truncation (spec §3.4)."""
    cfg = tiny_config(workspace, tmp_path / "run", skip_ratio=0, skip_border=0, sft_epochs=0, steps=2,
                      temperature=0.7, top_p=0.8)
    nr.train(cfg, quiet=True)
    for r in read_metrics(tmp_path / "run"):
        assert abs(r["ratio_min"] - 1) < 1e-4 and abs(r["ratio_max"] - 1) < 1e-4 and r["outside_frac"] == 0


def test_plain_reft_is_the_same_run_for_every_variant(workspace, tmp_path, coin_reward):
    """r = 0, e = 0 is exactly standard ReFT (spec §2, §3): mu_t = pi_theta_old = pi_theta, so the loss's rho is 1
    exactly (not 1 up to the sampler's round-off) and f(rho) = rho = 1 = min(1, rho): Base, Practical and Retrace-λ
    take bit-for-bit the same steps (losses, gradient norms, final weights)."""
    runs = {}
    for variant in ("base", "practical", "retrace"):
        out = tmp_path / variant
        nr.train(tiny_config(workspace, out, skip_ratio=0, skip_border=0, sft_epochs=0, steps=2, temperature=0.7,
                             lr=1e-2, variant=variant), quiet=True)
        runs[variant] = ([(r["loss"], r["grad_norm"]) for r in read_metrics(out)],
                         Qwen2.from_pretrained(out / "checkpoint").state_dict())
    rows, weights = runs["base"]
    assert all(g > 0 for _, g in rows)                                       # the steps did learn
    for variant in ("practical", "retrace"):
        assert runs[variant][0] == rows, variant
        assert all(torch.equal(runs[variant][1][k], weights[k]) for k in weights), variant


def test_token_speed_is_total_tokens_over_runtime(workspace, tmp_path, coin_reward):
    """Spec §6: token speed = total tokens processed / total runtime. Tokens of a step = every rollout row's prompt
    tokens (left-truncated to max_prompt_len = 20 of 89, padding excluded) + its completion tokens: 2 prompts x G = 4
    = 8 rows, fixed-length completions of 6 tokens, so 8 * 20 + 8 * 6 = 208 per step. tok_s of step s = the tokens
    of steps 1..s / the runtime of steps 1..s; rollout_tok_s = the step's completion tokens / its rollout time."""
    cfg = tiny_config(workspace, tmp_path / "run", sft_epochs=0, steps=2, max_prompt_len=20)
    summary = nr.train(cfg, quiet=True)
    rows = read_metrics(tmp_path / "run")
    tok = Tokenizer.load(workspace / "tok")
    examples = load_dataset("gsm8k", workspace / "data", "train")
    assert min(len(tok.encode(chat_prompt(e.question))) for e in examples) == 89    # every prompt is truncated
    for s, r in enumerate(rows, 1):
        assert r["tok_s"] == pytest.approx(208 * s / r["runtime"], rel=1e-12)
        assert r["rollout_tok_s"] == pytest.approx(48 / r["rollout_s"], rel=1e-12)
    assert summary["tokens"] == 2 * 208 and summary["rollout_tokens"] == 2 * 48
    assert summary["runtime"] == rows[-1]["runtime"] == pytest.approx(sum(r["step_s"] for r in rows), rel=1e-12)
    assert summary["tok_s"] == pytest.approx(2 * 208 / summary["runtime"], rel=1e-12)
    assert summary["rollout_tok_s"] == pytest.approx(2 * 48 / sum(r["rollout_s"] for r in rows), rel=1e-12)


def test_a_ratio_that_skips_no_layer_is_announced(workspace, tmp_path, capsys):
    """r = 0.1 on N = 4 layers: k = round(0.4) = 0, so the 'nested' run is plain ReFT; the run says so."""
    nr.train(tiny_config(workspace, tmp_path / "run", skip_ratio=0.1, sft_epochs=0, steps=1))
    assert "k = round(r*N) = 0: no layer is ever skipped" in capsys.readouterr().out
    assert read_metrics(tmp_path / "run")[0]["skip"] == []
    nr.train(tiny_config(workspace, tmp_path / "run2", skip_ratio=0.25, sft_epochs=0, steps=1))
    assert "no layer is ever skipped" not in capsys.readouterr().out
    nr.train(tiny_config(workspace, tmp_path / "run3", skip_ratio=0, skip_border=0, sft_epochs=0, steps=1))
    assert "no layer is ever skipped" not in capsys.readouterr().out   # r = 0 asked for plain ReFT: nothing to say
    nr.train(tiny_config(workspace, tmp_path / "run4", skip_ratio=0.1, sft_epochs=0, steps=1), quiet=True)
    assert capsys.readouterr().out == ""                              # quiet: not even the note


def test_eval_every_logs_held_out_accuracy_along_the_run(workspace, tmp_path, monkeypatch, coin_reward):
    """eval_every = 2 over 4 steps: a metrics row of stage 'eval' at steps 2 and 4, each the pass@1 of the weights
    of that step (the step-2 checkpoint evaluated on its own gives the same), the last one summary.json's; a run
    stopped at step 2 and resumed logs the same rows, once each. Reward and grade are two hashes of the completion
    (a random tiny model boxes nothing), so the accuracies move with the weights: 0.75 / 1.0 / 0.0 at steps 0 / 2 /
    4 on the CPUs this was written on."""
    import eval as E
    monkeypatch.setattr(E, "extract_answer", lambda text, fallback=False: text)
    monkeypatch.setattr(E, "grade", lambda pred, gold: zlib.crc32(f"{pred}|{gold}".encode()) % 2 == 1)
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    (data / "gsm8k" / "test.jsonl").write_text("".join(
        json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b}\n#### {a + b}"}) + "\n"
        for a in range(7, 10) for b in range(1, 5)))
    model = Qwen2.from_pretrained(workspace / "model")
    with torch.no_grad():                                     # large random weights: greedy completions that
        for p in model.parameters():                          # differ by problem and change with every step
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.save_pretrained(tmp_path / "model")
    kw = dict(model=str(tmp_path / "model"), data_dir=str(data), sft_epochs=0, eval_every=2, eval_benchmarks="gsm8k",
              eval_max_new_tokens=6, lr=0.003)
    summary = nr.train(tiny_config(workspace, tmp_path / "run", **kw), quiet=True)
    evals = read_metrics(tmp_path / "run", "eval")
    assert [(r["step"], r["steps"]) for r in evals] == [(2, 4), (4, 4)]
    assert evals[-1]["macro"] == evals[-1]["acc_gsm8k"] == summary["eval"]["macro"]
    assert all(r["eval_s"] >= 0 for r in evals)

    half = tmp_path / "half"
    assert nr.train(tiny_config(workspace, half, **kw), quiet=True, stop_after=2)["interrupted"]
    model, tok = Qwen2.from_pretrained(half / "checkpoint"), Tokenizer.load(half / "checkpoint")
    alone = E.run_benchmarks(model, tok, data, "gsm8k", None, print_fn=lambda *a: None, max_new_tokens=6)
    assert alone["macro"] == evals[0]["acc_gsm8k"]
    nr.train(tiny_config(workspace, half, **kw), resume=str(half), quiet=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "eval_s"} for r in rows]
    assert strip(read_metrics(half, "eval")) == strip(evals)


def test_resume_reproduces_an_uninterrupted_run(workspace, tmp_path, coin_reward):
    full, part = tmp_path / "full", tmp_path / "part"
    summary_a = nr.train(tiny_config(workspace, full), quiet=True)
    nr.train(tiny_config(workspace, part), quiet=True, stop_after=2)
    assert len(read_metrics(part)) == 2
    cfg, resume = nr.parse_args(["--resume", str(part)])
    summary_b = nr.train(cfg, resume=resume, quiet=True)
    sa, sb = summary_a["sft"], summary_b["sft"]                              # the warm-up ran before the stop
    for key in ("steps", "tokens", "rollout_tokens"):                       # the token totals go on from the stop
        assert summary_b[key] == summary_a[key], key
    assert (sb["steps"], sb["loss_first"], sb["loss_last"]) == (sa["steps"], sa["loss_first"], sa["loss_last"])
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["skip"] == rb["skip"]
        assert ra["reward_mean"] == rb["reward_mean"]
        assert ra["loss"] == rb["loss"]
        assert ra["ratio_mean"] == rb["ratio_mean"]
    assert any(r["grad_norm"] > 0 for r in a)                                # the steps did change the model
    wa = Qwen2.from_pretrained(full / "checkpoint").state_dict()
    wb = Qwen2.from_pretrained(part / "checkpoint").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("major", [7, 8, 9])
def test_auto_dtype_is_bf16_on_a_gpu_that_has_it_in_hardware(workspace, tmp_path, monkeypatch, major):
    """dtype auto: bf16 autocast from Ampere (compute capability 8) on; a V100 (7.0) runs bf16 only emulated (torch's
    is_bf16_supported() says True there, after allocating a test tensor on cuda:0): float32 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or major >= 8)
    cfg = tiny_config(workspace, tmp_path / "run", device="auto", dtype="auto")
    assert nr.resolve_device(cfg) == (torch.device("cuda"), torch.bfloat16 if major >= 8 else torch.float32)
    assert nr.resolve_device(replace(cfg, dtype="float32"))[1] == torch.float32


def test_a_state_saved_on_a_gpu_resumes_on_the_cpu(workspace, tmp_path, coin_reward, monkeypatch):
    """A GPU run's trainer_state.pt holds its AdamW moments as cuda:0 tensors (emulated here: the same file with every
    storage tagged cuda:0). torch.load maps them to the CPU and load_state_dict moves them to the parameters: the run
    resumes on a machine without that GPU, as it would have gone on, and no torchrun rank piles its copy onto cuda:0.
    A sampling state of the other device type's generator (a CUDA one is 16 bytes) is one line, not set_state's."""
    full, part = tmp_path / "full", tmp_path / "part"
    nr.train(tiny_config(workspace, full), quiet=True)
    nr.train(tiny_config(workspace, part), quiet=True, stop_after=2)
    f = part / "checkpoint" / "trainer_state.pt"
    state = torch.load(f, weights_only=True)
    for rng in (torch.zeros(16, dtype=torch.uint8), torch.cat([state["sample_rng"]] * 2)):   # shorter, longer
        torch.save({**state, "sample_rng": rng}, f)
        with pytest.raises(nr.UserError, match="not one of a cpu generator.*device type it ran on"):
            nr.train(tiny_config(workspace, part), resume=str(part), quiet=True)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, f)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA device"):
            torch.load(f, weights_only=True)                                # what resume read it with before
    nr.train(tiny_config(workspace, part), resume=str(part), quiet=True)
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [(r["loss"], r["ratio_mean"], r["grad_norm"]) for r in a] == [(r["loss"], r["ratio_mean"], r["grad_norm"])
                                                                         for r in b]


def test_resume_with_more_steps_decays_over_the_new_total(workspace, tmp_path, coin_reward):
    """README: --steps given with --resume goes further and a linear schedule then decays over the new total, and
    the other optimizer keys given with it apply too, from the first resumed step on (it ran at the saved
    schedule's next rate, 0 after a finished run, and with the saved lr / betas). The reft and eval rows an earlier,
    killed attempt logged after the checkpoint are dropped; run_config.json records the overrides."""
    run = tmp_path / "run"
    nr.train(tiny_config(workspace, run, sft_epochs=0, steps=2), quiet=True)            # lr 1e-3
    with open(run / "metrics.jsonl", "a") as f:    # an earlier --steps=4 resume, killed after logging step 3 (its
        for stage in ("reft", "eval"):             # reft row and an eval_every row) but before any checkpoint of it
            f.write(json.dumps({"stage": stage, "step": 3, "steps": 4, "lr": 1.0, "macro": 0.0}) + "\n")
    cfg, resume = nr.parse_args(["--resume", str(run), "--steps=4", "--lr=2e-3", "--adam_betas=0.5,0.6"])
    nr.train(cfg, resume=resume, quiet=True)
    lrs = [r["lr"] for r in read_metrics(run)]
    assert lrs == pytest.approx([1e-3, 0.5e-3, 2e-3 * 2 / 4, 2e-3 * 1 / 4])            # (T - s) / T, T = 2 then 4
    assert read_metrics(run, "eval") == []                  # the killed attempt's rows after the checkpoint: dropped
    saved = json.loads((run / "run_config.json").read_text())   # a later plain --resume goes on with the overrides
    assert (saved["steps"], saved["lr"], saved["adam_betas"]) == (4, 2e-3, "0.5,0.6")
    assert all(r["grad_norm"] > 0 for r in read_metrics(run))
    groups = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.5, 0.6) for g in groups)


def test_kl_penalty_uses_a_frozen_reference(workspace, tmp_path, coin_reward):
    """beta > 0 loads a reference (the start model) and the loss gains beta * k3 KL; resume reloads it.
    Step 1: pi_theta = pi_ref, so KL = 0 and its gradient (1 - e^0) = 0: the beta and beta = 0 runs take the same
    step 1 and sample the same step-2 rollouts, where their losses differ by exactly beta * kl_ref."""
    kw = dict(sft_epochs=0, lr=1e-2)
    nr.train(tiny_config(workspace, tmp_path / "b0", beta=0.0, steps=2, **kw), quiet=True)
    nr.train(tiny_config(workspace, tmp_path / "full", beta=0.5, steps=3, **kw), quiet=True)
    nr.train(tiny_config(workspace, tmp_path / "run", beta=0.5, steps=3, **kw), quiet=True, stop_after=2)
    cfg2, resume = nr.parse_args(["--resume", str(tmp_path / "run")])
    nr.train(cfg2, resume=resume, quiet=True)
    b0, full, rows = read_metrics(tmp_path / "b0"), read_metrics(tmp_path / "full"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and "kl_ref" not in b0[0]
    assert full[0]["kl_ref"] == 0 and full[0]["loss"] == b0[0]["loss"]
    assert full[1]["kl_ref"] > 1e-6 and full[1]["reward_mean"] == b0[1]["reward_mean"]
    assert full[1]["loss"] - b0[1]["loss"] == pytest.approx(0.5 * full[1]["kl_ref"], rel=1e-4, abs=1e-7)
    for a, b in zip(full, rows):                       # the resumed run reloaded the same reference
        assert (a["kl_ref"], a["loss"]) == (b["kl_ref"], b["loss"])


def test_config_values_are_checked_before_any_work():
    """Every out-of-range value is a one-line UserError at load time, not a failure after the SFT warm-up."""
    bad = {"lam": "0", "clip_eps": "1.5", "top_p": "0", "temperature": "0", "beta": "-1", "sft_batch_size": "0",
           "sft_micro_batch": "0", "max_prompt_len": "0", "save_every": "-1", "skip_border": "-1", "lr": "nan",
           "adam_betas": "0.9", "grad_clip": "-1", "sft_epochs": "-1", "log_every": "0",
           "eval_benchmarks": "aime,nope", "eval_every": "-1"}
    for key, value in bad.items():
        with pytest.raises(nr.UserError, match=f"'{key}'"):
            nr.load_config("gsm8k_1p5b", {key: value})
    with pytest.raises(nr.UserError, match="'eval_every' = 5: expected eval_benchmarks too"):
        nr.load_config("gsm8k_1p5b", {"eval_every": "5", "eval_benchmarks": ""})
    nr.load_config("gsm8k_1p5b", {"lam": "2", "variant": "base"})       # lambda is Retrace's only
    nr.load_config("gsm8k_1p5b", {"clip_eps": "0.2", "top_p": "1", "steps": "0"})


class Planted:
    """An object whose unpickling runs code (here: creates a file), as a tampered trainer_state.pt could."""
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_random_model_on_a_real_dataset_names_the_demo_tokenizer(tmp_path):
    """The tiny model on another dataset (the first thing a new training set is tried on): the demo's tokenizer
    comes only with dataset 'synthetic', and the error says how to get it for any other."""
    cfg = nr.Config(model_config="configs/tiny_model.json", dataset="gsm8k", out_dir=str(tmp_path / "run"))
    with pytest.raises(nr.UserError, match=r"set 'tokenizer'.*data.synthetic_tokenizer\(\).save\('DIR'\)"):
        nr.load_model(cfg, torch.device("cpu"))
    synthetic_tokenizer().save(tmp_path / "tok")                         # ... and the way it names works
    model, tok = nr.load_model(replace(cfg, tokenizer=str(tmp_path / "tok")), torch.device("cpu"))
    assert tok.vocab_size <= model.config.vocab_size


def test_run_folder_errors(workspace, tmp_path):
    """k > |V| fails before the SFT warm-up; --resume needs a checkpoint; a fresh run never reuses a run folder."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="k=round"):
        nr.train(tiny_config(workspace, run, skip_ratio=0.75, skip_border=1), quiet=True)   # k = 3 > |V| = 2
    assert not (run / "metrics.jsonl").exists() and not (run / "sft").exists()
    for kw, words in ((dict(max_prompt_len=32000, max_new_tokens=1000), "max_prompt_len \\+ max_new_tokens = 33000"),
                      (dict(max_seq_len=40000), "max_seq_len = 40000")):            # the model's context: 32768
        with pytest.raises(nr.UserError, match=words + " exceeds the model's max_position_embeddings = 32768"):
            nr.train(tiny_config(workspace, run, **kw), quiet=True)
    with pytest.raises(FileNotFoundError, match="aime"):                   # a benchmark file is checked up front
        nr.train(tiny_config(workspace, run, eval_benchmarks="aime"), quiet=True)
    assert not run.exists()                                              # a failed start leaves no folder
    with pytest.raises(nr.UserError, match="no checkpoint/trainer_state.pt and no finished sft/"):
        nr.train(tiny_config(workspace, run), resume=str(run), quiet=True)
    for key, value, words in (("device", "tpu", "'device' = 'tpu'"), ("device", "cuda:7", "no such CUDA device"),
                              ("dataset", "aime", "'dataset' = 'aime'")):
        with pytest.raises(nr.UserError, match=words):
            nr.train(tiny_config(workspace, tmp_path / "other", **{key: value}), quiet=True)
    with pytest.raises(nr.UserError, match="'model' = '/nonexistent/ckpt': checkpoint folder not found"):
        nr.train(tiny_config(workspace, tmp_path / "other", model="/nonexistent/ckpt"), quiet=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(nr.UserError, match="is a file"):
        nr.train(tiny_config(workspace, tmp_path / "afile"), quiet=True)
    with pytest.raises(nr.UserError, match=f"out_dir {tmp_path / 'afile' / 'run'}: cannot create the run folder"):
        nr.train(tiny_config(workspace, tmp_path / "afile" / "run"), quiet=True)
    nr.train(tiny_config(workspace, run, sft_epochs=0, steps=1), quiet=True)
    with pytest.raises(nr.UserError, match="already holds a run: continue it with --resume"):
        nr.train(tiny_config(workspace, run, sft_epochs=0, steps=1), quiet=True)
    done = tmp_path / "done"                                   # a finished run: --resume returns its summary.json
    nr.train(tiny_config(workspace, done, sft_epochs=0, steps=1), quiet=True)
    assert nr.train(tiny_config(workspace, done, steps=1), resume=str(done), quiet=True)["steps"] == 1
    (done / "summary.json").write_text("{")
    with pytest.raises(nr.UserError, match=f"{done / 'summary.json'}: bad JSON .*: delete it and --resume again"):
        nr.train(tiny_config(workspace, done, steps=1), resume=str(done), quiet=True)
    (done / "summary.json").write_bytes(b"\xff")
    with pytest.raises(nr.UserError, match=f"{done / 'summary.json'}: bad JSON \\(not UTF-8: .*: delete it"):
        nr.train(tiny_config(workspace, done, steps=1), resume=str(done), quiet=True)
    (done / "summary.json").unlink()                           # ... which writes it anew
    assert nr.train(tiny_config(workspace, done, steps=1), resume=str(done), quiet=True)["steps"] == 1
    state = torch.load(done / "checkpoint" / "trainer_state.pt", weights_only=False)
    for bad in ({k: v for k, v in state.items() if k != "skip_sampler"}, [1, 2]):
        torch.save(bad, done / "checkpoint" / "trainer_state.pt")
        with pytest.raises(nr.UserError, match="trainer_state.pt: not a trainer state of this project "
                                               "\\(no '(skip_sampler|data_order)'; expected the keys"):
            nr.train(tiny_config(workspace, done, steps=1), resume=str(done), quiet=True)
    torch.save({**state, "step": Planted(tmp_path / "ran")}, done / "checkpoint" / "trainer_state.pt")
    with pytest.raises(nr.UserError, match="trainer_state.pt: not a readable trainer state .*Weights only load"):
        nr.train(tiny_config(workspace, done, steps=1), resume=str(done), quiet=True)   # a run folder from elsewhere
    assert not (tmp_path / "ran").exists()                                     # its pickled code never ran
    died = tmp_path / "died_in_sft"                                      # a log, but no sft/ and no checkpoint
    died.mkdir()
    (died / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    with pytest.raises(nr.UserError, match="already holds a run: nothing to resume in it"):
        nr.train(tiny_config(workspace, died), quiet=True)


def test_trainer_state_keys_and_a_checkpoint_without_its_log(workspace, tmp_path):
    """Each key the trainer reads back from trainer_state.pt, missing alone, is named (not a KeyError mid-resume);
    a folder whose checkpoint/ outlived its metrics.jsonl still holds a run: a fresh start refuses it."""
    run = tmp_path / "run"
    nr.train(tiny_config(workspace, run, sft_epochs=0, steps=1), quiet=True)
    path = run / "checkpoint" / "trainer_state.pt"
    state = torch.load(path, weights_only=False)
    for key in ("optimizer", "scheduler", "step", "totals", "data_order", "skip_sampler", "sample_rng"):
        torch.save({k: v for k, v in state.items() if k != key}, path)
        with pytest.raises(nr.UserError, match=f"trainer_state.pt: not a trainer state of this project \\(no '{key}';"):
            nr.train(tiny_config(workspace, run, steps=2), resume=str(run), quiet=True)
    torch.save(state, path)
    (run / "metrics.jsonl").unlink()
    with pytest.raises(nr.UserError, match=f"out_dir {run} already holds a run: continue it with --resume {run}"):
        nr.train(tiny_config(workspace, run, sft_epochs=0, steps=1), quiet=True)

def test_top_p_rollouts_train_with_finite_losses(workspace, tmp_path, coin_reward):
    """top_p < 1 with a nested behaviour model: some sampled tokens fall outside pi_theta's nucleus (rho = 0);
    every logged statistic and every update stays finite."""
    nr.train(tiny_config(workspace, tmp_path / "run", sft_epochs=0, steps=3, top_p=0.5, lr=1e-2), quiet=True)
    rows = read_metrics(tmp_path / "run")
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    assert any(r["outside_frac"] > 0 for r in rows) and all(r["grad_norm"] > 0 for r in rows)
    assert all(torch.isfinite(p).all() for p in Qwen2.from_pretrained(tmp_path / "run" / "checkpoint").parameters())


def test_resume_before_the_first_checkpoint_restarts_reft_from_sft(workspace, tmp_path, coin_reward, capsys):
    """A run killed after its SFT warm-up but before its first checkpoint: --resume runs ReFT again from sft/ (no
    second SFT), exactly as the uninterrupted run did. --resume keeps the run's folder; a finished run says so."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    nr.train(tiny_config(workspace, full), quiet=True)
    nr.train(tiny_config(workspace, cut), quiet=True, stop_after=2)
    shutil.rmtree(cut / "checkpoint")                                   # only sft/ survived
    with open(cut / "metrics.jsonl", "a") as f:                         # an eval_every row of the lost ReFT steps
        f.write(json.dumps({"stage": "eval", "step": 2, "steps": 4, "macro": 0.5, "acc_gsm8k": 0.5}) + "\n")
    cfg, resume = nr.parse_args(["--resume", str(cut)])
    nr.train(cfg, resume=resume, quiet=True)
    a, b = read_metrics(full), read_metrics(cut)
    assert read_metrics(cut, "eval") == []                              # dropped with the ReFT rows
    assert [r["step"] for r in b] == [1, 2, 3, 4] and len(read_metrics(cut, "sft")) == 3   # SFT not run again
    assert [(r["loss"], r["skip"], r["reward_mean"]) for r in a] == [(r["loss"], r["skip"], r["reward_mean"])
                                                                      for r in b]
    with pytest.raises(nr.UserError, match="drop --out_dir"):
        nr.parse_args(["--resume", str(cut), "--out_dir=elsewhere"])
    cfg, resume = nr.parse_args(["--resume", str(cut)])
    assert cfg.out_dir == str(cut)
    nr.train(cfg, resume=resume)
    assert "already at step 4 of steps=4" in capsys.readouterr().out
    # killed between save_checkpoint's two renames: checkpoint.old + the complete checkpoint.tmp, no checkpoint/
    (cut / "checkpoint").rename(cut / "checkpoint.old")
    shutil.copytree(cut / "checkpoint.old", cut / "checkpoint.tmp")
    nr.train(cfg, resume=resume)
    assert "already at step 4" in capsys.readouterr().out and (cut / "checkpoint" / "trainer_state.pt").is_file()
    assert not (cut / "checkpoint.old").exists() and not (cut / "checkpoint.tmp").exists()
    # a resume that fails while loading leaves run_config.json as it was
    saved = (cut / "run_config.json").read_text()
    bad, resume = nr.parse_args(["--resume", str(cut), "--skip_ratio=0.75", "--steps=6"])   # k = 3 > |V| = 2
    with pytest.raises(ValueError, match="k=round"):
        nr.train(bad, resume=resume, quiet=True)
    assert (cut / "run_config.json").read_text() == saved
    metrics = (cut / "metrics.jsonl").read_text()                   # a torn last line (a kill, a full disk):
    (cut / "metrics.jsonl").write_text(metrics + '{"stage": "reft", "st')   # dropped, the resume goes on
    nr.train(cfg, resume=resume, quiet=True)
    assert (cut / "metrics.jsonl").read_text() == metrics
    state = cut / "checkpoint" / "trainer_state.pt"
    for damaged in (state.read_bytes()[:1000], b"not a checkpoint", b"garbage\n"):   # "g...": pickle GET
        state.write_bytes(damaged)
        with pytest.raises(nr.UserError, match="not a readable trainer state"):
            nr.train(cfg, resume=resume, quiet=True)


@pytest.mark.parametrize("damaged", [b"hello world", b"abc", b"r", b"c\xff\nx\n", b"garbage\n", b"(", b""])
def test_a_damaged_trainer_state_is_the_one_line_error(tmp_path, damaged):
    """torch.load's weights-only unpickler raises whatever the bytes lead it to on a damaged trainer_state.pt:
    KeyError ("hello world"), IndexError ("abc"), struct.error ("r"), UnicodeDecodeError, UnpicklingError, EOFError.
    --resume refuses each with the one-line error (KeyError, IndexError and struct.error were tracebacks)."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.pt").write_bytes(damaged)
    with pytest.raises(nr.UserError, match="trainer_state.pt: not a readable trainer state"):
        nr.open_run_dir(tmp_path, str(tmp_path), 1, True)


def test_a_kill_while_appending_to_metrics_jsonl_does_not_block_resume(workspace, tmp_path, coin_reward):
    """Killed (or out of disk) in the middle of a metrics.jsonl append, after the step-2 checkpoint: the torn last
    line is a row that was never logged; --resume drops it and goes on (it refused the line as bad JSON, so the
    folder was stuck until the file was edited by hand)."""
    run = tmp_path / "run"
    nr.train(tiny_config(workspace, run, sft_epochs=0), quiet=True, stop_after=2)
    row = json.dumps({"stage": "reft", "step": 3, "steps": 4, "loss": 0.5})
    with open(run / "metrics.jsonl", "a") as f:
        f.write(row[:len(row) // 2])
    nr.train(tiny_config(workspace, run, sft_epochs=0), resume=str(run), quiet=True)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(workspace, tmp_path, data_dir):
    with pytest.raises(ValueError, match="has 151665 ids but the model has vocab_size 300"):
        nr.train(tiny_config(workspace, tmp_path / "run", tokenizer=str(data_dir / "qwen2_tokenizer")), quiet=True)


# ---------------------------------------------------------------------------------------------------------- the math
# of the loop, re-derived independently on the tiny model: the learning-rate schedule, gradient clipping, the SFT loss,
# one ReFT step (advantages, log-probs, f(rho), aggregation, gradient) and the rollout bookkeeping.

def test_metrics_log_rows_skip_blank_lines_and_name_a_bad_one(tmp_path):
    """metrics.jsonl read back: blank lines (a hand edit) are skipped, a bad line is named by its 1-based number; a
    torn last line (no newline: an append killed midway) is a row never logged, dropped."""
    log = nr.MetricsLog(tmp_path / "metrics.jsonl", quiet=True)
    assert log.rows() == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n\n  \n{"step": 2}\n\n')
    assert log.rows() == [{"step": 1}, {"step": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2')     # torn last line: an append cut short
    assert log.rows() == [{"step": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}')     # whole, without its newline: kept
    assert log.rows() == [{"step": 1}, {"step": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n\n{"step": 2\n')
    with pytest.raises(nr.UserError, match=r"metrics.jsonl: line 3: bad JSON \(.*\), expected one JSON object a line"):
        log.rows()
    for bad in ('[1, 2]', '{"stage": "reft"}', '{"stage": "reft", "step": "3"}',    # JSON, but not a row: named
                '{"stage": "reft", "step": true}'):
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n' + bad + '\n')
        with pytest.raises(nr.UserError, match=r"metrics.jsonl: line 2: expected a JSON object with an integer 'step'"):
            log.rows()
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(nr.UserError, match=r"metrics.jsonl: not UTF-8 text"):
        log.rows()


def test_metrics_log_prints_every_evaluation(tmp_path, capsys):
    """log_every thins the step lines only: an eval row (eval_every = 3 here, log_every = 2) is always printed."""
    log = nr.MetricsLog(tmp_path / "metrics.jsonl", log_every=2)
    log({"stage": "eval", "step": 3, "steps": 10, "macro": 0.5, "acc_gsm8k": 0.5, "eval_s": 1.0})
    assert capsys.readouterr().out == "[eval] step 3/10  pass@1 macro 50.0%  (gsm8k 50.0%)\n"


def test_lr_schedule_by_hand():
    """lr factor: warm-up (s + 1) / (w + 1) for s < w, then linear (T - s) / (T - w) down to 1/(T - w), or 1."""
    def lrs(total, **kw):
        opt, sched = nr.make_optimizer(torch.nn.Linear(1, 1), replace(nr.Config(), **kw), 2.0, total)
        assert opt.param_groups[0]["initial_lr"] == 2.0
        return [sched.lr_lambdas[0](s) for s in range(total)]       # the factor of steps 0 .. total - 1
    assert lrs(4) == pytest.approx([1, 3 / 4, 2 / 4, 1 / 4])
    assert lrs(6, warmup_steps=2) == pytest.approx([1 / 3, 2 / 3, 1, 3 / 4, 2 / 4, 1 / 4])
    assert lrs(5, warmup_steps=2, lr_schedule="constant") == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])


def test_optimizer_step_clips_the_global_norm():
    """grad = (3, 4): norm 5. grad_clip 1 scales it to (0.6, 0.8); grad_clip 0 is no clipping. SGD, lr 1."""
    for clip, step in ((1.0, [0.6, 0.8]), (0.0, [3.0, 4.0]), (10.0, [3.0, 4.0])):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        p.grad = torch.tensor([3.0, 4.0])
        norm = nr.optimizer_step(torch.nn.ParameterList([p]), opt, sched, clip)
        assert norm == pytest.approx(5.0) and p.grad is None
        assert torch.allclose(p.detach(), -torch.tensor(step)), clip


@pytest.mark.parametrize("bad, clip", [(float("nan"), 1.0), (float("inf"), 1.0), (float("nan"), 0.0)])
def test_optimizer_step_stops_a_diverged_run_before_the_update(bad, clip):
    """A NaN / inf gradient: a UserError naming the stage and the step about to be taken (the second here), and
    no update: the weights, AdamW's state and the schedule stay as after step 1; the gradients are dropped."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p.grad = torch.tensor([1.0, 2.0])
    assert nr.optimizer_step(torch.nn.ParameterList([p]), opt, sched, clip, "ReFT") == pytest.approx(5 ** 0.5)
    before, exp_avg = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    p.grad = torch.tensor([bad, 1.0])
    with pytest.raises(nr.UserError, match=rf"^ReFT step 2: the gradient norm is {bad} \(a NaN or inf loss"):
        nr.optimizer_step(torch.nn.ParameterList([p]), opt, sched, clip, "ReFT")
    assert torch.equal(p.detach(), before) and not torch.equal(before, torch.ones(2)) and p.grad is None
    assert int(opt.state[p]["step"]) == 1 and torch.equal(opt.state[p]["exp_avg"], exp_avg) and sched.last_epoch == 1


def test_a_diverged_run_stops_and_keeps_its_last_checkpoint(workspace, tmp_path, monkeypatch):
    """The loss turns NaN in ReFT step 2 (3 micro-batches a step: the 4th policy_loss call on): the run stops there
    with the one-line error, and checkpoint/ still holds step 1's finite weights, which --resume can go on from."""
    calls, real = [], nr.policy_loss

    def nan_from_step_2(*a, **kw):
        calls.append(1)
        loss, stats = real(*a, **kw)
        return (loss * float("nan") if len(calls) > 3 else loss), stats
    monkeypatch.setattr(nr, "policy_loss", nan_from_step_2)
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, sft_epochs=0, save_every=1)
    with pytest.raises(nr.UserError, match=r"^ReFT step 2: the gradient norm is nan"):
        nr.train(cfg, quiet=True)
    assert len(calls) == 6 and [r["step"] for r in read_metrics(run)] == [1]
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 1
    model = Qwen2.from_pretrained(run / "checkpoint")                   # refuses NaN / inf weights
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sft_loss_is_the_mean_over_completion_tokens(workspace, tmp_path):
    """Step 1's logged SFT loss = -(1 / #completion targets) * sum of log pi over the completion targets of its batch
    (prompt tokens excluded, target t predicted from tokens < t), computed here one unpadded sequence at a time.
    24 examples, batch 10, micro-batch 4 (ragged micro-batches with padding): ceil(2.4) = 3 steps."""
    cfg = tiny_config(workspace, tmp_path / "run", sft_batch_size=10, sft_micro_batch=4, sft_epochs=1)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    examples = load_dataset("gsm8k", workspace / "data", "train")
    num = den = 0.0
    with torch.no_grad():
        for i in nr.DataOrder(len(examples), cfg.seed).take(10):       # the first batch
            ids, mask = sft_example(tok, examples[i], max_len=cfg.max_seq_len)
            ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            logp = torch.log_softmax(model(ids[None, :-1])[0].double(), -1).gather(1, ids[1:, None])[:, 0]
            assert not mask[0] and mask[1:].sum() < len(ids) - 1       # the prompt is never a target
            num, den = num + logp[mask[1:]].sum().item(), den + mask[1:].sum().item()
    rows = []
    nr.sft(model, tok, examples, cfg, torch.device("cpu"), torch.float32, rows.append)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(-num / den, rel=1e-5)
    assert [r["lr"] for r in rows] == pytest.approx([cfg.sft_lr * 3 / 3, cfg.sft_lr * 2 / 3, cfg.sft_lr / 3])


def test_sft_logits_start_at_the_first_completion_target_and_are_freed_before_backward(workspace, tmp_path, monkeypatch):
    """No logits before the micro-batch's first completion target (LM head compute and logits memory): each SFT
    forward gets logits_from = its shortest prompt - 1, the position that predicts that prompt's first completion
    token (the loss values themselves: test_sft_loss_is_the_mean_over_completion_tokens); and the logits are freed
    before the backward."""
    cfg = tiny_config(workspace, tmp_path / "run", sft_batch_size=10, sft_micro_batch=4, sft_epochs=1)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    examples = [replace(ex, question=ex.question + " Why?" * (i % 7))                 # prompts of 7 lengths
                for i, ex in enumerate(load_dataset("gsm8k", workspace / "data", "train"))]
    prompt_len = [sft_example(tok, ex, max_len=cfg.max_seq_len)[1].index(1) for ex in examples]
    order = nr.DataOrder(len(examples), cfg.seed)
    expected = []
    for _ in range(3):                                                  # 3 steps of 10: micro-batches of 4, 4, 2
        batch = order.take(10)
        expected += [min(prompt_len[i] for i in batch[j:j + 4]) - 1 for j in range(0, 10, 4)]
    seen, forward = [], Qwen2.forward
    made, alive, backward = [], [], nr.distributed.backward
    monkeypatch.setattr(Qwen2, "forward", lambda self, *a, **kw: seen.append(kw["logits_from"])
                        or made.append(weakref.ref(out := forward(self, *a, **kw))) or out)
    monkeypatch.setattr(nr.distributed, "backward", lambda loss: alive.append(made[-1]() is not None) or backward(loss))
    nr.sft(model, tok, examples, cfg, torch.device("cpu"), torch.float32, lambda row: None)
    assert seen == expected and min(seen) > 0 and len(set(seen)) > 1
    assert alive == [False] * 9                                         # each backward runs without its logits


def sgd_reft_step(model, r, cfg, tok, dtype=torch.float32):
    """One reft_step on rollouts r with plain SGD at lr 1 and a constant schedule, so each weight moves by exactly
    minus its (clipped) gradient -> (the step's output, [p_before - p_after] per parameter)."""
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    out = nr.reft_step(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), r, cfg, tok,
                       torch.device("cpu"), dtype)
    return out, [p0 - p.detach() for p, p0 in zip(params, before)]


def fixed_rollouts(model, tok, temperature):
    """2 prompts x G = 3 rows, ragged left-padded prompts (Tp = 5) and ragged completions (Tn = 4), random tokens;
    log mu = the full model's log pi (computed here, one unpadded row at a time) + N(0, 0.5^2) noise, so that rho
    lies on both sides of 1 and outside [0.8, 1.2]. Returns the rollouts and log pi with gradient [6, 4] (float64)."""
    g = torch.Generator().manual_seed(0)
    plen, clen = [5, 3, 4, 5, 2, 3], [4, 2, 3, 1, 4, 3]
    pmask = torch.arange(5)[None, :] >= 5 - torch.tensor(plen)[:, None]
    mask = torch.arange(4)[None, :] < torch.tensor(clen)[:, None]
    prompt = torch.where(pmask, torch.randint(0, tok.vocab_size, (6, 5), generator=g), tok.pad_token_id)
    tokens = torch.where(mask, torch.randint(0, tok.vocab_size, (6, 4), generator=g), tok.pad_token_id)
    logp = torch.zeros(6, 4, dtype=torch.float64)
    for b in range(6):
        ids = torch.cat([prompt[b, pmask[b]], tokens[b, :clen[b]]])
        z = model(ids[None, :-1])[0, plen[b] - 1:].double() / temperature          # predicts tokens[b, :clen[b]]
        logp = logp.index_put((torch.tensor([b]), torch.arange(clen[b])),
                              torch.log_softmax(z, -1).gather(1, tokens[b, :clen[b], None])[:, 0])
    logp_mu = torch.where(mask, logp.detach() + 0.5 * torch.randn(6, 4, generator=g, dtype=torch.float64), 0.0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    return nr.Rollouts(prompt, pmask, tokens, mask, logp_mu.float(), rewards, [""] * 6), logp


@pytest.mark.parametrize("kw", [
    dict(variant="retrace", lam=0.5, weight_grad="surrogate", aggregation="token_mean", scale_rewards=True),
    dict(variant="base", clip_eps=0.2, aggregation="seq_mean", scale_rewards=False),
    dict(variant="practical", aggregation="dr_grpo", scale_rewards=True, micro_batch=5),
    dict(variant="retrace", lam=0.5, weight_grad="surrogate", aggregation="token_mean", scale_rewards=True,
         grad_checkpointing=True),
], ids=["retrace-surrogate-token_mean", "base-clip-seq_mean-unscaled", "practical-dr_grpo", "retrace-checkpointing"])
def test_reft_step_loss_and_gradient_by_hand(workspace, tmp_path, kw):
    """One reft_step on fixed rollouts (micro-batches of 4 or 5 rows) against the loss written out here from log pi,
    log mu and the rewards: A = (R - mean_g R) / (std_g R + 1e-4) (or R - mean_g R), rho = pi / mu, f(rho), the
    aggregation over completion tokens (dr_grpo: B * max_new_tokens = 6 * 6), pi at temperature 0.7. With SGD at
    lr 1 and no clipping the step moves every parameter by exactly minus the gradient of that loss."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=3, temperature=0.7, fixed_length=False,
                      max_new_tokens=6, grad_clip=0, **{"micro_batch": 4, **kw})
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    with torch.no_grad():                      # logits 5x sharper than the random init's (entropy 4.8 instead of
        model.lm_head.weight.mul_(5)           # ln 300 = 5.7 everywhere): per-position entropies differ
    r, logp = fixed_rollouts(model, tok, cfg.temperature)
    m = r.mask.double()
    R = r.rewards.double().view(2, 3)
    A = R - R.mean(1, keepdim=True)
    if cfg.scale_rewards:
        A = A / (R.std(1, keepdim=True) + 1e-4)
    A = A.reshape(6, 1)
    rho = torch.exp(logp - r.logp_mu.double())
    if cfg.variant == "retrace":               # surrogate: the gradient goes through lam * min(1, rho)
        per_token = -cfg.lam * torch.clamp(rho, max=1.0) * A
    elif cfg.variant == "base":                # TRL's clipped objective, gradient through rho
        per_token = -torch.min(rho * A, torch.clamp(rho, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * A)
    else:                                      # f = 1: -A log pi in gradient, -A in value
        per_token = -torch.exp(logp - logp.detach()) * A
    if cfg.aggregation == "token_mean":
        expect = (per_token * m).sum() / m.sum()
    elif cfg.aggregation == "seq_mean":
        expect = ((per_token * m).sum(1) / m.sum(1)).mean()
    else:
        expect = (per_token * m).sum() / (6 * cfg.max_new_tokens)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(expect, params)
    with torch.no_grad():                      # entropy of pi(. | s_t) at the temperature, over completion tokens
        ent = []
        for b in range(6):
            ids = torch.cat([r.prompt_tokens[b, r.prompt_mask[b]], r.tokens[b, r.mask[b]]])
            z = model(ids[None, :-1])[0, int(r.prompt_mask[b].sum()) - 1:].double() / cfg.temperature
            ent.append(-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1))
        ent = torch.cat(ent).mean().item()

    out, moved = sgd_reft_step(model, r, cfg, tok)
    assert out["loss"] == pytest.approx(expect.item(), rel=1e-5, abs=1e-7)
    for step, gr in zip(moved, grads):
        assert torch.allclose(step, gr.float(), rtol=1e-4, atol=1e-7)
    assert out["entropy"] == pytest.approx(ent, rel=1e-5)
    assert out["ratio_max"] == pytest.approx(rho[r.mask].max().item(), rel=1e-5)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "dr_grpo"])
def test_reft_step_is_invariant_to_group_order_duplication_and_micro_batches(workspace, tmp_path, aggregation):
    """Metamorphic: the step's loss and gradient do not change when the prompt groups (and the rows inside a group)
    are permuted, when every group is duplicated (each aggregation is a mean), or with micro-batches of 1 row.
    Breaks if the advantages, rows and log mu of a micro-batch fall out of step, or a normaliser counts the wrong
    rows (a micro-batch's own, the groups instead of the sequences)."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=3, fixed_length=False, grad_clip=0, micro_batch=4,
                      variant="base", aggregation=aggregation)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    r, _ = fixed_rollouts(model, tok, cfg.temperature)
    rows = lambda idx: replace(r, prompt_tokens=r.prompt_tokens[idx], prompt_mask=r.prompt_mask[idx],  # noqa: E731
                               tokens=r.tokens[idx], mask=r.mask[idx], logp_mu=r.logp_mu[idx], rewards=r.rewards[idx])
    out, moved = sgd_reft_step(copy.deepcopy(model), r, cfg, tok)
    for name, rr, c in [("groups and rows permuted", rows(torch.tensor([4, 3, 5, 2, 0, 1])), cfg),
                        ("every group twice", rows(torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5])), cfg),
                        ("micro-batches of 1", r, replace(cfg, micro_batch=1))]:
        o, m = sgd_reft_step(copy.deepcopy(model), rr, c, tok)
        assert o["loss"] == pytest.approx(out["loss"], rel=1e-5, abs=1e-8), name
        for a, b in zip(m, moved):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=name)


def test_the_final_evaluation_runs_without_the_optimizer_and_the_reference(workspace, tmp_path, monkeypatch):
    """Once the last checkpoint is written, the AdamW state (twice the fp32 weights: 12 GB at 1.5B) and the KL
    reference model are freed before the final evaluation, which needs the memory for its long generations."""
    made, make_optimizer = [], nr.make_optimizer
    monkeypatch.setattr(nr, "make_optimizer", lambda *a: made.extend(map(weakref.ref, out := make_optimizer(*a)))
                        or out)
    monkeypatch.setattr(nr.distributed, "frozen_copy", lambda *a, _f=nr.distributed.frozen_copy:
                        made.append(weakref.ref(out := _f(*a))) or out)
    seen = []
    monkeypatch.setattr(nr, "run_eval", lambda *a, **kw: seen.append([r() is None for r in made]) or
                        {"benchmarks": {"gsm8k": {"n": 2, "accuracy": 0.5, "seconds": 0.0}}, "macro": 0.5})
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    (data / "gsm8k" / "test.jsonl").write_text((data / "gsm8k" / "train.jsonl").read_text())
    nr.train(tiny_config(workspace, tmp_path / "run", data_dir=str(data), steps=2, beta=0.1,
                         eval_benchmarks="gsm8k"), quiet=True)
    assert len(made) == 5 and seen == [[True] * 5]          # SFT's AdamW + schedule, ReFT's, the reference model


def test_bf16_autocast_step_and_run_on_the_cpu(workspace, tmp_path, coin_reward):
    """dtype=bfloat16 is the GPU's training path (fp32 master weights and AdamW state, bf16 autocast for the
    matmuls, a bf16 KV cache for the rollouts), and autocast runs the same code on the CPU: one reft_step on fixed
    rollouts moves the weights in the direction of the fp32 step, and a short SFT + ReFT run keeps fp32 weights
    with finite metrics, rolling out from a bf16 cache."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=3, temperature=0.7, fixed_length=False, grad_clip=0,
                      micro_batch=4)
    steps = []
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = nr.load_model(cfg, torch.device("cpu"))
        with torch.no_grad():
            model.lm_head.weight.mul_(5)
        r, _ = fixed_rollouts(model, tok, cfg.temperature)
        _, moved = sgd_reft_step(model, r, cfg, tok, dtype)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        steps.append(torch.cat([d.flatten() for d in moved]))
    ref, got = steps
    assert ref.abs().max() > 0 and not torch.equal(got, ref)                # bf16 did run, and rounds
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.98           # 0.999996 measured
    caches = []
    real_new_cache = Qwen2.new_cache
    def spy(self, *a, **kw):
        caches.append(real_new_cache(self, *a, **kw))
        return caches[-1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Qwen2, "new_cache", spy)
        nr.train(tiny_config(workspace, tmp_path / "bf16", dtype="bfloat16", steps=2), quiet=True)
    assert caches and {c.k.dtype for c in caches} == {torch.bfloat16}
    rows = read_metrics(tmp_path / "bf16") + read_metrics(tmp_path / "bf16", "sft")
    assert len(rows) > 2 and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    saved = Qwen2.from_pretrained(tmp_path / "bf16" / "checkpoint")
    assert json.loads((tmp_path / "bf16" / "checkpoint" / "config.json").read_text())["torch_dtype"] == "float32"
    assert saved.dtype == torch.float32


@pytest.mark.parametrize("fixed_length", [False, True])
def test_reft_step_frees_the_logits_before_the_backward(workspace, tmp_path, monkeypatch, fixed_length):
    """The [b, Tn, V] logits of a micro-batch (the loss pass's largest tensor) are gone when its backward runs: the
    autograd graph keeps log pi, not them, and the entropy is taken before (fixed length: EOS banned too)."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=3, temperature=0.7, fixed_length=fixed_length,
                      max_new_tokens=6, micro_batch=4)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    r, _ = fixed_rollouts(model, tok, cfg.temperature)
    made, alive = [], []
    policy_logits, backward = nr.policy_logits, nr.distributed.backward
    monkeypatch.setattr(nr, "policy_logits", lambda *a: made.append(weakref.ref(out := policy_logits(*a))) or out)
    monkeypatch.setattr(nr.distributed, "backward", lambda loss: alive.append(made[-1]() is not None) or backward(loss))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = nr.reft_step(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), r, cfg, tok,
                       torch.device("cpu"), torch.float32)
    assert len(made) == 2 and alive == [False, False] and out["grad_norm"] > 0 and out["entropy"] > 0


def test_reft_step_that_skips_no_layer_is_on_policy(workspace, tmp_path):
    """A step whose skip mask skips no layer (k = 0: mu = pi_theta_old = pi_theta) takes log mu = sg[log pi_theta]:
    rho = 1 exactly whatever log mu the sampler recorded (here log pi + noise), and the gradient flows through rho
    (base variant, clipped objective: -A grad log pi). The recorded log mu still feeds the ratio statistics."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=3, temperature=0.7, fixed_length=False,
                      max_new_tokens=6, grad_clip=0, micro_batch=4, variant="base", clip_eps=0.2)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    r, logp = fixed_rollouts(model, tok, cfg.temperature)
    r = replace(r, skip=[False] * 4)
    m = r.mask.double()
    R = r.rewards.double().view(2, 3)
    A = ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + 1e-4)).reshape(6, 1)
    expect = -(torch.exp(logp - logp.detach()) * A * m).sum() / m.sum()          # rho = 1, gradient A grad log pi
    params = list(model.parameters())
    grads = torch.autograd.grad(expect, params)
    out, moved = sgd_reft_step(model, r, cfg, tok)
    assert out["loss"] == pytest.approx(expect.item(), rel=1e-5, abs=1e-7)
    for step, gr in zip(moved, grads):
        assert torch.allclose(step, gr.float(), rtol=1e-4, atol=1e-7)
    assert out["ratio_max"] == pytest.approx(torch.exp(logp - r.logp_mu.double())[r.mask].max().item(), rel=1e-5)


def test_save_checkpoint_replaces_a_stale_checkpoint_old(workspace, tmp_path):
    """A checkpoint.old left beside checkpoint/ (an earlier deletion failed or was cut short) is deleted before
    checkpoint/ is renamed onto it: a rename onto a non-empty folder raises OSError 'Directory not empty'."""
    cfg = tiny_config(workspace, tmp_path / "run")
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    opt, sched = nr.make_optimizer(model, cfg, cfg.lr, 4)
    for step in (1, 2):
        (tmp_path / "checkpoint.old").mkdir(exist_ok=True)
        (tmp_path / "checkpoint.old" / "model.safetensors").write_text("stale")
        nr.save_checkpoint(tmp_path, model, tok, opt, sched, {"step": step})
    assert torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_run_eval_in_the_compute_dtype_and_a_slice_per_rank(workspace, tmp_path, monkeypatch):
    """run_eval evaluates under the rollouts' autocast (bf16 here, on the CPU) and, under torchrun, with
    evaluate_sharded (a slice per rank, not every rank all problems); eval_row sums the benchmarks' seconds."""
    seen = []

    def fake(model, tok, data_dir, names, out_path, **kw):
        seen.append((names, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"), kw["evaluate_fn"]))
        return {"macro": 0.5, "benchmarks": {"gsm8k": {"accuracy": 0.25, "seconds": 1.5},
                                             "svamp": {"accuracy": 0.75, "seconds": 2.0}}}
    monkeypatch.setattr(nr, "run_benchmarks", fake)
    cfg = tiny_config(workspace, tmp_path / "run", eval_benchmarks="gsm8k,svamp")
    model = Qwen2.from_pretrained(workspace / "model")
    result = nr.run_eval(model, None, None, cfg, torch.device("cpu"), torch.bfloat16, None, print_fn=print)
    monkeypatch.setattr(nr.distributed, "world_size", lambda: 2)
    nr.run_eval(model, None, None, cfg, torch.device("cpu"), torch.float32, None, print_fn=print)
    assert seen == [("gsm8k,svamp", torch.bfloat16, nr.evaluate), ("gsm8k,svamp", False, nr.evaluate_sharded)]
    assert nr.eval_row(result, 3, 10) == {"stage": "eval", "step": 3, "steps": 10, "macro": 0.5, "acc_gsm8k": 0.25,
                                          "acc_svamp": 0.75, "eval_s": 3.5}


def test_reft_step_clips_the_global_gradient_norm(workspace, tmp_path):
    """Step 9 clips the global gradient norm at grad_clip (the paper's 1.0, TRL's default): on fixed rollouts whose
    gradient norm |g| is 2.47 (> 1), SGD at lr 1 moves the parameters by g / |g|, a step of norm 1 (its direction,
    minus the gradient, is test_reft_step_loss_and_gradient_by_hand's); the logged grad_norm is |g|, before clipping."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=3, temperature=0.7, fixed_length=False, max_new_tokens=6,
                      grad_clip=1.0)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    r, _ = fixed_rollouts(model, tok, cfg.temperature)
    out, moved = sgd_reft_step(model, r, cfg, tok)
    step = torch.cat([d.flatten() for d in moved])
    assert out["grad_norm"] == pytest.approx(2.47, abs=0.01)
    assert step.norm().item() == pytest.approx(1.0, rel=1e-4)


def test_rollout_rows_follow_their_prompts(workspace, tmp_path, monkeypatch):
    """G consecutive rows per prompt: row i is scored against prompt i // G's gold, holds that prompt (truncated on
    the left to max_prompt_len, as TRL) and its decoded completion; two generate() calls are concatenated."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=3, rollout_batch=4, max_new_tokens=3, max_prompt_len=8)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    batch = load_dataset("gsm8k", workspace / "data", "train")[:2]
    assert batch[0].answer != batch[1].answer
    seen = []
    monkeypatch.setattr(nr, "reward", lambda text, gold: seen.append((text, gold)) or float(gold == batch[0].answer))
    r = nr.rollout(model, tok, batch, [False, True, False, False], cfg, torch.Generator().manual_seed(0),
                   torch.device("cpu"), torch.float32)
    assert [gold for _, gold in seen] == [batch[0].answer] * 3 + [batch[1].answer] * 3
    assert r.rewards.tolist() == [1.0] * 3 + [0.0] * 3
    for i in range(6):
        assert r.prompt_tokens[i][r.prompt_mask[i]].tolist() == tok.encode(chat_prompt(batch[i // 3].question))[-8:]
        assert r.texts[i] == seen[i][0] == tok.decode(r.tokens[i][r.mask[i]].tolist())
    assert r.tokens.shape == r.mask.shape == r.logp_mu.shape == (6, 3)
    # skip_mask=None (no skipping, as generate() takes it) failed in list(None) after all the rollouts were drawn;
    # it is the all-False mask, so reft_step treats the batch as on-policy; a tensor mask is stored as bools
    for skip, stored in ((None, [False] * 4), (torch.tensor([0, 1, 0, 0]), [False, True, False, False])):
        r = nr.rollout(model, tok, batch, skip, cfg, torch.Generator().manual_seed(0), torch.device("cpu"),
                       torch.float32)
        assert r.skip == stored and all(type(s) is bool for s in r.skip)


def test_rollout_frees_the_decode_packing(workspace, tmp_path, monkeypatch):
    """On CPU generate() packs a copy of the weights for its decode steps (max_new_tokens >= PACK_MIN_NEW_TOKENS)
    and keeps it for later calls with the same weights: both generate() calls of a rollout share it, but the step's
    update changes the weights, so rollout() frees it rather than keep it through the loss pass (it was dropped only
    by the optimizer step: a 1.8 GiB copy held through the loss pass of a 0.5B-shape run in fp32)."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=2, rollout_batch=2,
                      max_new_tokens=qwen2.PACK_MIN_NEW_TOKENS)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    packings, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: (generate(*a, **k), packings.append(
        qwen2.decode_packing(model)))[0])
    batch = load_dataset("gsm8k", workspace / "data", "train")[:2]
    nr.rollout(model, tok, batch, [False, True, False, False], cfg, torch.Generator().manual_seed(0),
               torch.device("cpu"), torch.float32)
    assert len(packings) == 2
    if packings[0] is None:
        pytest.skip("generate() does not pack on this CPU (no oneDNN)")
    assert packings[1] is packings[0]                       # shared by the rollout's two generate() calls (2 rows)
    assert qwen2.decode_packing(model) is None              # and freed before the loss pass


def test_reft_step_entropy_is_that_of_the_sampled_distribution(workspace, tmp_path):
    """Fixed-length rollouts (the paper's setting) are drawn with EOS banned at every position, and pi_theta is scored
    on that distribution: the logged entropy is its entropy (EOS logit -inf), not that of the raw logits. Computed
    here one unpadded row at a time at temperature 0.7, over the completion tokens."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=3, temperature=0.7, fixed_length=True, max_new_tokens=6)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
    r, _ = fixed_rollouts(model, tok, cfg.temperature)
    eos = list(tok.eos_token_ids)
    with torch.no_grad():
        banned, raw = [], []
        for b in range(6):
            ids = torch.cat([r.prompt_tokens[b, r.prompt_mask[b]], r.tokens[b, r.mask[b]]])
            z = model(ids[None, :-1])[0, int(r.prompt_mask[b].sum()) - 1:].double() / cfg.temperature
            raw.append(-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1))
            z[:, eos] = -math.inf                                  # every position t < min_new_tokens = 6
            p = torch.softmax(z, -1)
            banned.append(-(p * torch.log_softmax(z, -1)).nan_to_num().sum(-1))
        banned, raw = torch.cat(banned).mean().item(), torch.cat(raw).mean().item()
    assert abs(banned - raw) > 1e-4                                # the two differ: the test can tell them apart
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = nr.reft_step(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), r, cfg, tok,
                       torch.device("cpu"), torch.float32)
    assert out["entropy"] == pytest.approx(banned, rel=1e-5)


def test_a_save_killed_while_deleting_the_old_checkpoint_does_not_block_the_next_save(workspace, tmp_path):
    """save_checkpoint killed after its renames, during the deletion of checkpoint.old: checkpoint/ is whole and a
    partly deleted checkpoint.old is left. The resumed run's next save replaces it (rename onto a non-empty folder
    raised OSError 'Directory not empty', a traceback after the step's work)."""
    run = tmp_path / "run"
    nr.train(tiny_config(workspace, run, sft_epochs=0, steps=1), quiet=True)
    shutil.copytree(run / "checkpoint", run / "checkpoint.old")
    (run / "checkpoint.old" / "model.safetensors").unlink()                     # rmtree got this far
    cfg, resume = nr.parse_args(["--resume", str(run), "--steps=2"])
    nr.train(cfg, resume=resume, quiet=True)
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 2
    assert not (run / "checkpoint.old").exists()


def test_sft_step_count_is_exact_for_the_decimal_written(workspace, tmp_path):
    """steps = ceil(n * E_sft / batch) on the decimal the user wrote: 25 examples x 1.12 epochs / 4 = 7 exactly
    (25 * 1.12 is 28.000000000000004 in floats, which made it 8 steps: 4 sequences beyond E_sft epochs)."""
    cfg = tiny_config(workspace, tmp_path / "run", sft_batch_size=4, sft_micro_batch=4, sft_epochs=1.12)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    examples = load_dataset("gsm8k", workspace / "data", "train")
    examples = examples + examples[:1]                                          # 25
    rows = []
    nr.sft(model, tok, examples, cfg, torch.device("cpu"), torch.float32, rows.append)
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[0]["steps"] == 7
    assert nr.sft_steps(2000, 4.03, 2) == 4030 and nr.sft_steps(2000, 6.0, 2) == 6000   # the demo prints this one


def test_sft_clips_the_global_gradient_norm(workspace, tmp_path, monkeypatch):
    """The SFT warm-up clips the global gradient norm at grad_clip too: with the optimizer swapped for SGD at lr 1,
    one SFT step moves the parameters by g * min(1, grad_clip / |g|), a step of norm grad_clip when |g| exceeds it
    and |g| itself with grad_clip 0 (off); the logged grad_norm is |g|, before clipping, in both runs."""
    def sgd(model, cfg, lr, total_steps):
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    monkeypatch.setattr(nr, "make_optimizer", sgd)
    examples = load_dataset("gsm8k", workspace / "data", "train")[:4]
    steps = {}
    for clip in (0.0, 0.05):
        cfg = tiny_config(workspace, tmp_path / "run", sft_batch_size=4, sft_micro_batch=2, grad_clip=clip)
        model, tok = nr.load_model(cfg, torch.device("cpu"))
        before = [p.detach().clone() for p in model.parameters()]
        rows = []
        nr.sft(model, tok, examples, cfg, torch.device("cpu"), torch.float32, rows.append)
        assert len(rows) == 1
        moved = torch.cat([(p0 - p.detach()).flatten() for p, p0 in zip(model.parameters(), before)])
        steps[clip] = (moved, rows[0]["grad_norm"])
    (free, g_norm), (clipped, g_norm_c) = steps[0.0], steps[0.05]
    assert g_norm == pytest.approx(g_norm_c, rel=1e-5) and g_norm > 0.5            # the same |g|, well above 0.05
    assert free.norm().item() == pytest.approx(g_norm, rel=1e-4)
    assert clipped.norm().item() == pytest.approx(0.05, rel=1e-4)
    assert torch.nn.functional.cosine_similarity(clipped, free, 0) > 1 - 1e-6           # the same direction


def test_sft_folder_with_a_model_always_has_its_tokenizer(workspace, tmp_path, monkeypatch):
    """sft/ is written tokenizer first, then the model's atomic folder swap takes it in: a run killed in between
    leaves no sft/ with a model but without a tokenizer (eval.py --model <run>/sft needs both)."""
    def killed(self, path):
        raise KeyboardInterrupt
    monkeypatch.setattr(nr.Tokenizer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        nr.train(tiny_config(workspace, tmp_path / "run", steps=1), quiet=True)
    sft = tmp_path / "run" / "sft"
    assert not (sft / "config.json").exists() or (sft / "tokenizer.json").exists()
    monkeypatch.undo()
    nr.train(tiny_config(workspace, tmp_path / "ok", steps=1), quiet=True)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in (tmp_path / "ok" / "sft").iterdir()}


@pytest.mark.parametrize("seed", [-1, 2**62, 2**64])
def test_seed_out_of_range_is_a_config_error(seed):
    with pytest.raises(nr.UserError, match="config key 'seed'"):
        nr.load_config("tiny", {"seed": str(seed)})


# ---------------------------------------------------------------------------------------------------------- config,
# mutation-testing round: every validation rule at its border, the coercion of each JSON / command-line type

# key: (values refused, values accepted at the border); a rule loosened or dropped accepts a refused value, one
# tightened refuses an accepted one
RANGES = {
    **{k: (["0"], ["1"]) for k in ("prompts_per_step", "micro_batch", "rollout_batch", "max_new_tokens",
                                   "max_prompt_len", "sft_batch_size", "sft_micro_batch", "max_seq_len", "log_every",
                                   "eval_max_new_tokens", "eval_batch_size")},
    "group_size": (["1"], ["2"]),
    **{k: (["-1"], ["0"]) for k in ("steps", "warmup_steps", "save_every", "skip_border", "eval_limit", "eval_every")},
    **{k: (["0", "inf", "nan", "-1e-9"], ["1e-12"]) for k in ("lr", "sft_lr", "temperature")},
    **{k: (["-1e-9", "inf", "nan"], ["0"]) for k in ("sft_epochs", "weight_decay", "grad_clip", "beta")},
    "top_p": (["0", "1.0000001", "nan"], ["1", "1e-9"]),
    "seed": (["-1", str(2**62)], ["0", str(2**62 - 1)]),
    "sft_skip_prob": (["-0.1", "1.1", "nan"], ["0", "1"]),
    "skip_ratio": (["1", "-0.1", "nan"], ["0", "0.99"]),
    "clip_eps": (["1", "-0.1", "nan"], ["0", "0.5"]),
    "lam": (["0", "1.5", "nan"], ["1", "0.01"]),
    "adam_betas": (["0.9", "0.9,0.99,0.5", "0.9,1", "-0.1,0.9", "a,b", ""], ["0,0", "0.999999,0.5"]),
    "variant": (["vtrace", ""], ["base", "practical", "retrace"]),
    "weight_grad": (["through"], ["detached", "surrogate"]),
    "aggregation": (["mean"], ["token_mean", "seq_mean", "dr_grpo"]),
    "lr_schedule": (["cosine"], ["linear", "constant"]),
    "dtype": (["float16", "bf16"], ["auto", "float32", "bfloat16"]),
    "parallel": (["none", "tp"], ["ddp", "fsdp"]),
    "dataset": (["aime", "math500"], ["gsm8k", "svamp", "math12k", "synthetic"]),
}


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_config_rule_at_its_border(key):
    """Each range / choice rule of validate(): every refused value is a UserError naming the key (at load time, before
    any work), every accepted one loads. The accepted values are the borders (1 for counts, 0 for counts that may be
    0, the smallest positive rate, top_p = 1, a sure LayerDrop sft_skip_prob = 1, ...)."""
    bad, good = RANGES[key]
    for value in bad:
        with pytest.raises(nr.UserError, match=f"config key '{key}' = "):
            nr.load_config("gsm8k_1p5b", {key: value})
    for value in good:
        nr.load_config("gsm8k_1p5b", {key: value})


def test_a_run_needs_a_model_or_a_model_config():
    with pytest.raises(nr.UserError, match="set 'model' \\(a checkpoint dir\\) or 'model_config'"):
        nr.load_config("gsm8k_1p5b", {"model": ""})
    assert nr.load_config("gsm8k_1p5b", {"model": "", "model_config": "configs/tiny_model.json"}).model == ""


def test_config_values_are_coerced_to_the_field_type(tmp_path):
    """The command line gives strings: booleans are true/false, 1/0, yes/no in any case; a JSON file gives typed
    values: an int key refuses 2.5 (not truncated to 2) and true (a bool is not a number), a float key takes an int;
    a file that is not one JSON object is named."""
    for text, want in (("yes", True), ("No", False), ("1", True), ("0", False), ("TRUE", True), ("false", False)):
        assert nr.load_config("gsm8k_1p5b", {"fixed_length": text}).fixed_length is want, text
    with pytest.raises(nr.UserError, match="key 'fixed_length' expects bool, got '2'"):
        nr.load_config("gsm8k_1p5b", {"fixed_length": "2"})
    f = tmp_path / "c.json"
    for raw, words in (('{"steps": 2.5}', "key 'steps' expects int, got 2.5"),
                       ('{"steps": true}', "key 'steps' expects int, got True"),
                       ('{"lr": true}', "key 'lr' expects float, got True"),
                       ('{"fixed_length": 1}', "key 'fixed_length' expects bool, got 1"),
                       ('{"dataset": 3}', "key 'dataset' expects str, got 3"),
                       ('[{"steps": 2}]', "expected a JSON object of config keys")):
        f.write_text(raw)
        with pytest.raises(nr.UserError, match=re.escape(f"{f}: ") + ".*" + re.escape(words)):
            nr.load_config(str(f), {"model": "m"})
    f.write_text('{"model": "m", "lr": 1, "steps": 3, "_note": "ignored"}')
    cfg = nr.load_config(str(f))
    assert (cfg.lr, cfg.steps) == (1.0, 3) and type(cfg.lr) is float


def test_command_line_shapes(tmp_path):
    """--key value at the very end without its value is named; --resume continues the run's own folder, where it lies
    now (a run folder that was moved since), and takes neither --config nor --out_dir."""
    with pytest.raises(nr.UserError, match="--steps needs a value"):
        nr.parse_args(["--config=gsm8k_1p5b", "--steps"])
    moved = tmp_path / "moved"
    moved.mkdir()
    nr.write_json_atomic(moved / "run_config.json", {**asdict(nr.load_config("gsm8k_1p5b")),
                                                     "out_dir": str(tmp_path / "where_it_ran")})
    cfg, resume = nr.parse_args(["--resume", str(moved), "--steps", "7"])
    assert (cfg.out_dir, resume, cfg.steps, cfg.dataset) == (str(moved), str(moved), 7, "gsm8k")
    for extra in (["--config", "svamp_1p5b"], ["--out_dir", str(tmp_path)]):
        with pytest.raises(nr.UserError, match="drop --out_dir / --config"):
            nr.parse_args(["--resume", str(moved)] + extra)


def test_check_context_borders():
    """A rollout of max_prompt_len + max_new_tokens tokens may fill the context exactly (768 of 768), not one more;
    max_seq_len is the SFT's, unchecked when there is no SFT warm-up."""
    cfg = replace(nr.Config(), max_prompt_len=512, max_new_tokens=256, max_seq_len=768)
    nr.check_context(cfg, 768)
    with pytest.raises(nr.UserError, match="max_prompt_len \\+ max_new_tokens = 768 exceeds the model's "
                                           "max_position_embeddings = 767"):
        nr.check_context(cfg, 767)
    nr.check_context(replace(cfg, max_prompt_len=100, max_seq_len=40000, sft_epochs=0), 768)
    with pytest.raises(nr.UserError, match="max_seq_len = 40000"):
        nr.check_context(replace(cfg, max_prompt_len=100, max_seq_len=40000, sft_epochs=0.5), 768)


def test_data_folder_is_needed_except_for_the_synthetic_task(monkeypatch, tmp_path):
    monkeypatch.delenv("NESTED_REFT_DATA", raising=False)
    with pytest.raises(nr.UserError, match="no data folder: set --data_dir=DIR or \\$NESTED_REFT_DATA"):
        nr.resolve_data_dir(nr.Config(dataset="gsm8k"))
    assert nr.resolve_data_dir(nr.Config(dataset="synthetic")) == Path("")       # the demo task is generated
    monkeypatch.setenv("NESTED_REFT_DATA", str(tmp_path))
    assert nr.resolve_data_dir(nr.Config(dataset="gsm8k")) == tmp_path
    assert nr.resolve_data_dir(nr.Config(dataset="gsm8k", data_dir="elsewhere")) == Path("elsewhere")


# ---------------------------------------------------------------------------------------------------------- setup,
# mutation-testing round: the random model's seed, the optimizer's settings, the data order, the SFT's LayerDrop

def test_random_model_is_seeded_by_the_config(tmp_path):
    """With no checkpoint, load_model builds `model_config` from torch.manual_seed(cfg.seed): the same weights whatever
    the global RNG did before, other weights for another seed; grad_checkpointing is set on the model it returns."""
    cfg = nr.load_config("tiny", {"grad_checkpointing": "true"})
    torch.manual_seed(123)
    a, _ = nr.load_model(cfg, torch.device("cpu"))
    torch.rand(1000)
    b, _ = nr.load_model(cfg, torch.device("cpu"))
    c, _ = nr.load_model(replace(cfg, seed=1), torch.device("cpu"))
    wa, wb, wc = (m.state_dict()["model.layers.0.mlp.up_proj.weight"] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.grad_checkpointing is True and c.grad_checkpointing is True
    assert nr.load_model(replace(cfg, grad_checkpointing=False), torch.device("cpu"))[0].grad_checkpointing is False


def test_tokenizer_defaults_to_the_model_folder(workspace, tmp_path):
    """tokenizer = '' reads the tokenizer saved in the checkpoint folder (README: 'empty: same as model')."""
    model = shutil.copytree(workspace / "model", tmp_path / "model")
    Tokenizer.load(workspace / "tok").save(model)
    cfg = tiny_config(workspace, tmp_path / "run", model=str(model), tokenizer="")
    _, tok = nr.load_model(cfg, torch.device("cpu"))
    assert tok.encode("What is 2 plus 3?") == Tokenizer.load(workspace / "tok").encode("What is 2 plus 3?")


def test_optimizer_and_resumed_optimizer_take_the_configs_settings():
    """make_optimizer: AdamW with the config's betas and weight decay at the stage's rate. resume_optimizer: the saved
    moments come back, the param groups take the (possibly overridden) config's lr, betas and weight decay, and the
    schedule goes on at step s = 1 of 4: factor (4 - 1) / 4."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cfg = replace(nr.Config(), adam_betas="0.5,0.6", weight_decay=0.1)
    opt, sched = nr.make_optimizer(model, cfg, 2.0, 4)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (2.0, (0.5, 0.6), 0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    saved = opt.state_dict()
    new = replace(cfg, adam_betas="0.7,0.8", weight_decay=0.2)
    opt2, _ = nr.make_optimizer(model, cfg, 2.0, 4)
    sched2 = nr.resume_optimizer(model, opt2, saved, new, 3.0, 4, step=1)
    g = opt2.param_groups[0]
    assert (g["initial_lr"], g["betas"], g["weight_decay"]) == (3.0, (0.7, 0.8), 0.2)
    assert sched2.get_last_lr()[0] == pytest.approx(3.0 * 3 / 4) and g["lr"] == pytest.approx(3.0 * 3 / 4)
    for p in model.parameters():
        assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_lr_schedule_with_warmup_as_long_as_the_run():
    """warmup_steps >= steps is legal: every step is a warm-up step ((s + 1) / (w + 1)) and stepping the scheduler
    past the last step does not divide by T - w = 0."""
    for total, warmup in ((2, 2), (2, 5)):
        opt, sched = nr.make_optimizer(torch.nn.Linear(1, 1), replace(nr.Config(), warmup_steps=warmup), 1.0, total)
        lrs = []
        for _ in range(total):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        assert lrs == pytest.approx([(s + 1) / (warmup + 1) for s in range(total)])


def test_data_order_pass_e_is_randperm_seeded_with_seed_plus_e():
    """DataOrder's contract (its docstring): pass e over the n items is torch.randperm(n) from a generator seeded with
    seed + e, and a batch runs across the end of a pass into the next one."""
    perm = lambda seed: torch.randperm(5, generator=torch.Generator().manual_seed(seed)).tolist()
    order = nr.DataOrder(5, seed=3)
    assert order.take(3) + order.take(9) == perm(3) + perm(4) + perm(5)[:2]
    assert order.state_dict() == {"epoch": 2, "pos": 2}


def sft_rows(ws, tmp_path, **kw):
    cfg = tiny_config(ws, tmp_path / "run", sft_batch_size=4, sft_micro_batch=4, **kw)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    examples = load_dataset("gsm8k", ws / "data", "train")
    rows = []
    nr.sft(model, tok, examples, cfg, torch.device("cpu"), torch.float32, rows.append)
    return rows


def test_sft_layerdrop_trains_the_logged_nested_model(workspace, tmp_path):
    """sft_skip_prob = 1: every SFT step trains the nested model of a fresh mask (k = round(0.25 * 4) = 1 of layers
    1..2), logged in the row's skip; step 1's loss is the nested model's SFT loss on its batch, recomputed here one
    sequence at a time with that mask (the full model's loss differs). sft_skip_prob = 0.5: a seeded coin per step,
    the same steps skipped whatever the global RNG does; some steps skip, some do not."""
    rows = sft_rows(workspace, tmp_path, sft_skip_prob=1)
    assert len(rows) == 6 and all(len(r["skip"]) == 1 and r["skip"][0] in (1, 2) for r in rows)
    cfg = tiny_config(workspace, tmp_path / "run", sft_skip_prob=1)
    model, tok = nr.load_model(cfg, torch.device("cpu"))                   # the weights step 1 ran with
    examples = load_dataset("gsm8k", workspace / "data", "train")
    losses = {}
    for name, skip in (("nested", [i in rows[0]["skip"] for i in range(4)]), ("full", None)):
        num = den = 0.0
        with torch.no_grad():
            for i in nr.DataOrder(len(examples), cfg.seed).take(4):        # step 1's batch
                ids, m = sft_example(tok, examples[i], max_len=cfg.max_seq_len)
                ids, m = torch.tensor(ids), torch.tensor(m[1:], dtype=torch.bool)
                logp = torch.log_softmax(model(ids[None, :-1], skip_mask=skip)[0].double(), -1)
                logp = logp.gather(1, ids[1:, None])[:, 0]
                num, den = num + logp[m].sum().item(), den + m.sum().item()
        losses[name] = -num / den
    assert rows[0]["loss"] == pytest.approx(losses["nested"], rel=1e-5)
    assert abs(losses["full"] - losses["nested"]) > 1e-3
    half = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        half.append([r["skip"] for r in sft_rows(workspace, tmp_path, sft_skip_prob=0.5)])
    assert half[0] == half[1] and {len(s) for s in half[0]} == {0, 1}


# ---------------------------------------------------------------------------------------------------------- runs,
# mutation-testing round: checkpoint folder swap, resume bookkeeping, the metrics log, the rollout streams

def test_metrics_log_prints_every_log_every_and_the_last_step(tmp_path, capsys):
    """log_every = 3 over 4 steps: lines for steps 3 and 4 (the last step always shows), every row in the file; the
    ETA is the mean step time so far times the steps left (10 s for 2 steps -> 5 s per step, 2 left: 10 s)."""
    log = nr.MetricsLog(tmp_path / "metrics.jsonl", log_every=3)
    for step in range(1, 5):
        log({"stage": "sft", "step": step, "steps": 4, "loss": 0.5, "runtime": 5.0 * step})
    assert capsys.readouterr().out.splitlines() == ["[sft] step 3/4  loss +0.5000  15s  ETA 5s",
                                                    "[sft] step 4/4  loss +0.5000  20s  ETA 0s"]
    assert [r["step"] for r in log.rows()] == [1, 2, 3, 4]
    assert nr.progress_line({"stage": "sft", "step": 2, "steps": 4, "loss": -1.25, "runtime": 10.0}) == \
        "[sft] step 2/4  loss -1.2500  10s  ETA 10s"


def test_recover_checkpoint_takes_the_newer_folder(tmp_path):
    """Killed between save_checkpoint's renames: checkpoint.old (the previous save) and checkpoint.tmp (the new one,
    complete) -> checkpoint/ is the new one and the old one is deleted; with checkpoint/ present it stays, and a
    checkpoint.old beside it (killed while deleting it) is deleted."""
    for name, step in (("checkpoint.old", 1), ("checkpoint.tmp", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "step").write_text(str(step))
    nr.recover_checkpoint(tmp_path)
    assert (tmp_path / "checkpoint" / "step").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    (tmp_path / "checkpoint.old").mkdir()                       # killed while deleting checkpoint.old: deleted
    nr.recover_checkpoint(tmp_path)
    assert (tmp_path / "checkpoint" / "step").read_text() == "2" and not (tmp_path / "checkpoint.old").exists()
    shutil.rmtree(tmp_path / "checkpoint")                      # the first save killed while writing checkpoint.tmp
    (tmp_path / "checkpoint.tmp").mkdir()                       # (no checkpoint.old: it may be partial): not taken
    nr.recover_checkpoint(tmp_path)
    assert not (tmp_path / "checkpoint").exists()


def test_recover_checkpoint_deletes_only_the_temp_copies_of_killed_saves(tmp_path):
    """What recover_checkpoint deletes, and only that: the save_pretrained temp folders of checkpoint.tmp and sft
    (.checkpoint.tmp.tmp-*, .sft.tmp-*) and the .NAME.*.tmp files of killed atomic writes in the run folder,
    checkpoint/ and sft/. Other dot folders, a user's *.tmp file, a folder named like a temp file and a temp file
    deeper down are not the saves' to delete."""
    for d in ("checkpoint", "sft", "notes", ".sft-backup", ".sft.tmp-x1", ".checkpoint.tmp.tmp-y2", ".keep.tmp"):
        (tmp_path / d).mkdir()
    gone = [".run_config.json.a1.tmp", "checkpoint/.trainer_state.pt.b2.tmp", "sft/.tokenizer.json.c3.tmp"]
    kept = ["notes.tmp", "checkpoint/step", "sft/config.json", "notes/.draft.d4.tmp"]
    for f in gone + kept:
        (tmp_path / f).write_text("x")
    nr.recover_checkpoint(tmp_path)
    assert not any((tmp_path / f).exists() for f in gone + [".sft.tmp-x1", ".checkpoint.tmp.tmp-y2"])
    assert all((tmp_path / f).is_file() for f in kept)
    assert all((tmp_path / d).is_dir() for d in (".sft-backup", ".keep.tmp"))


def test_resume_deletes_the_copies_a_killed_save_leaves(workspace, tmp_path, monkeypatch):
    """The last step's save killed after its renames (checkpoint.old beside checkpoint/) and a save killed inside
    Qwen2.save_pretrained (its temp folder .checkpoint.tmp.tmp-*, weights half written), before summary.json:
    --resume deletes both. No later save came to do it: each such kill left a copy of the weights (and of the AdamW
    state) in the run folder for good."""
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, sft_epochs=0, steps=1)
    nr.train(cfg, quiet=True)
    (run / "summary.json").unlink()
    shutil.copytree(run / "checkpoint", run / "checkpoint.old")
    model, tok = Qwen2.from_pretrained(run / "checkpoint"), Tokenizer.load(run / "checkpoint")
    opt, sched = nr.make_optimizer(model, cfg, 1e-3, 1)

    def killed(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:                            # a SIGKILL runs no finally block: no rmtree
        m.setattr(shutil, "rmtree", lambda *a, **kw: None)
        m.setattr(safetensors.torch, "save_file", killed)
        with pytest.raises(KeyboardInterrupt):
            nr.save_checkpoint(run, model, tok, opt, sched, {"step": 1})
    assert len(list(run.glob(".checkpoint.tmp.tmp-*"))) == 1
    nr.train(cfg, resume=str(run), quiet=True)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint", "metrics.jsonl", "run_config.json",
                                                     "summary.json"]


def test_the_sft_save_is_one_rename_and_resume_cleans_what_a_kill_leaves(workspace, tmp_path, monkeypatch):
    """sft/ (weights + tokenizer) appears in one rename of a complete temp folder: killed at any os.replace of the
    save, the run folder holds a whole sft/ or none (the tokenizer was written into sft/ first, then the folders
    swapped: a kill there left an sft/ without weights, or the finished warm-up only in .sft.tmp-*). --resume then
    deletes the temp folder and any half-written .NAME.*.tmp file of the run folder."""
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, steps=1)
    replaces, os_replace = [], os.replace

    def killed(src, dst):
        if "sft" in Path(dst).parent.name + Path(dst).name:
            replaces.append(Path(dst).name)
            if len(replaces) == kill_at:
                raise KeyboardInterrupt
        return os_replace(src, dst)
    for kill_at in range(1, 10):
        shutil.rmtree(run, ignore_errors=True)
        replaces.clear()
        with monkeypatch.context() as m:                    # a SIGKILL runs no finally block: no rmtree
            m.setattr(os, "replace", killed)
            m.setattr(shutil, "rmtree", lambda *a, **kw: None)
            try:
                nr.train(cfg, quiet=True)
            except KeyboardInterrupt:
                pass
        assert not (run / "sft").exists() or Qwen2.from_pretrained(run / "sft") and Tokenizer.load(run / "sft")
        if len(replaces) < kill_at:                         # the save finished: every rename was tried
            break
        assert not (run / "sft").exists(), replaces          # the last rename is the folder's
        (run / ".metrics.jsonl.x1y2.tmp").write_text("{")    # a killed atomic write elsewhere
        with pytest.raises(nr.UserError, match="nothing to continue"):
            nr.train(cfg, resume=str(run), quiet=True)
        assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl", "run_config.json"]
    assert kill_at > 2 and replaces[-1] == "sft"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_a_run_folder_in_use_by_another_process_is_refused(workspace, tmp_path):
    """train holds <run>/.lock while it runs: another process's --resume of the same folder (or a new run in a
    folder another one holds) is the one-line error naming that process, and deletes nothing of its (the
    checkpoint.old beside checkpoint/ of a save in progress stays); once the lock is free the resume goes on."""
    import fcntl
    run, new = tmp_path / "run", tmp_path / "new"
    cfg = tiny_config(workspace, run, sft_epochs=0, steps=1)
    nr.train(cfg, quiet=True)
    new.mkdir()
    for d in (run, new):
        with open(d / ".lock", "a+") as f:                  # another process's lock (flock: per open file)
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.truncate(0)
            f.write("4242\n")
            f.flush()
            (run / "checkpoint.old").mkdir(exist_ok=True)    # its save, between the renames
            with pytest.raises(nr.UserError, match=rf"out_dir {re.escape(str(d))}: in use by another process "
                                                   r"\(pid 4242\)"):
                nr.train(cfg, resume=str(run), quiet=True) if d == run else nr.train(replace(cfg, out_dir=str(new)))
            assert (run / "checkpoint.old").is_dir()
    nr.train(cfg, resume=str(run), quiet=True)              # free again: the resume runs (and tidies up)
    assert not (run / "checkpoint.old").exists() and (run / ".lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_lock_run_dir_holds_an_exclusive_lock_until_its_stack_closes(tmp_path, monkeypatch):
    """lock_run_dir: exclusive (a second taker, even a shared one, is refused), the pid readable by others while it is
    held (flushed), held until the ExitStack closes, not only until the call returns. Where the file system has no
    locks (flock's OSError) the run goes on without one."""
    import contextlib
    import fcntl
    with contextlib.ExitStack() as hold:
        nr.lock_run_dir(tmp_path, hold)
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(nr.UserError, match=rf"in use by another process \(pid {os.getpid()}\)"):
            nr.lock_run_dir(tmp_path, contextlib.ExitStack())
        with open(tmp_path / ".lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    with open(tmp_path / ".lock") as f:                         # released by the stack
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        monkeypatch.setattr(fcntl, "flock", lambda *a: (_ for _ in ()).throw(OSError(37, "No locks available")))
        with contextlib.ExitStack() as hold:
            nr.lock_run_dir(tmp_path, hold)                     # no lock here: no error either


def test_a_failed_train_releases_the_run_folder_at_once(workspace, tmp_path):
    """train's lock is released when it returns or raises, not when the exception (which keeps train's frame) is
    collected: a retry in the same process (a notebook holds the last traceback) is not "in use". A new run in an
    existing empty folder locks it once (not as a resume and again as a new run)."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(workspace, run, sft_epochs=0, steps=1)
    with pytest.raises(nr.UserError, match="nothing to continue") as e:
        nr.train(cfg, resume=str(run), quiet=True)
    nr.train(cfg, quiet=True)                                   # e (and its traceback) alive
    assert e.value and (run / "summary.json").is_file()


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_save_killed_at_any_rename_leaves_a_checkpoint(workspace, tmp_path, monkeypatch, kill_at):
    """save_checkpoint over an existing checkpoint, killed at its first or second rename: after recover_checkpoint
    (what --resume does first) checkpoint/ holds a whole checkpoint, the previous (step 1) or the new (step 2) one.
    A save that deleted the old checkpoint before moving the new one into place would leave none."""
    model = Qwen2.from_pretrained(workspace / "model")
    tok = Tokenizer.load(workspace / "tok")
    opt, sched = nr.make_optimizer(model, nr.Config(), 1e-3, 4)
    nr.save_checkpoint(tmp_path, model, tok, opt, sched, {"step": 1})
    renames, rename = [], Path.rename

    def killed(self, target):
        renames.append(Path(target).name)
        if len(renames) == kill_at:
            raise KeyboardInterrupt
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        nr.save_checkpoint(tmp_path, model, tok, opt, sched, {"step": 2})
    monkeypatch.undo()
    nr.recover_checkpoint(tmp_path)
    state = torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == (1 if kill_at == 1 else 2)
    assert Qwen2.from_pretrained(tmp_path / "checkpoint").config.num_hidden_layers == 4


def test_checkpoints_every_save_every_steps_and_at_the_end(workspace, tmp_path, monkeypatch):
    """save_every = 2 over 3 steps: checkpoints after steps 2 and 3 (the end), each with its own step."""
    saved, save = [], nr.save_checkpoint
    monkeypatch.setattr(nr, "save_checkpoint", lambda run, model, tok, opt, sched, state:
                        saved.append(state["step"]) or save(run, model, tok, opt, sched, state))
    nr.train(tiny_config(workspace, tmp_path / "run", sft_epochs=0, steps=3, save_every=2), quiet=True)
    assert saved == [2, 3]


def test_resume_of_an_evaluated_run_evaluates_once_per_step(workspace, tmp_path, monkeypatch):
    """eval_every = 1 over 1 step: the last step is evaluated once (by the final evaluation, not by eval_every as
    well). A run whose summary.json is missing (killed after its final evaluation's metrics row) evaluates again on
    --resume: metrics.jsonl keeps one eval row for the last step, the new one. With summary.json in place a resume of
    the finished run evaluates nothing."""
    calls = []

    def fake_eval(model, tok, data_dir, cfg, device, dtype, out_path, print_fn):
        calls.append(1)
        return {"benchmarks": {"gsm8k": {"n": 4, "accuracy": 0.25 * len(calls), "seconds": 0.0}},
                "macro": 0.25 * len(calls)}
    monkeypatch.setattr(nr, "run_eval", fake_eval)
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    (data / "gsm8k" / "test.jsonl").write_text((data / "gsm8k" / "train.jsonl").read_text())
    run = tmp_path / "run"
    cfg = tiny_config(workspace, run, data_dir=str(data), sft_epochs=0, steps=1, eval_benchmarks="gsm8k",
                      eval_every=1)
    nr.train(cfg, quiet=True)
    assert len(calls) == 1
    nr.train(cfg, resume=str(run), quiet=True)
    assert len(calls) == 1                                      # summary.json stands: nothing evaluated again
    (run / "summary.json").unlink()
    assert nr.train(cfg, resume=str(run), quiet=True)["eval"]["macro"] == 0.5
    assert [(r["step"], r["macro"]) for r in read_metrics(run, "eval")] == [(1, 0.5)]


def test_resume_from_a_folder_whose_sft_has_only_the_tokenizer(workspace, tmp_path):
    """Killed while writing sft/ (its tokenizer goes first, the model after): nothing to continue from, a UserError,
    not a failed model load."""
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    Tokenizer.load(workspace / "tok").save(run / "sft")
    with pytest.raises(nr.UserError, match="no checkpoint/trainer_state.pt and no finished sft/ in it"):
        nr.train(tiny_config(workspace, run), resume=str(run), quiet=True)


def test_kl_reference_on_resume_is_the_sft_model(workspace, tmp_path):
    """On resume the KL reference is the model ReFT started from: the run's sft/ when it had a warm-up (not the
    `model` it was warmed up from), else `model`."""
    run = tmp_path / "run"
    torch.manual_seed(1)
    sft = Qwen2(Qwen2.from_pretrained(workspace / "model").config)
    sft.save_pretrained(run / "sft")
    cfg = tiny_config(workspace, run, beta=0.1)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(nr.load_reference(cfg, run, torch.device("cpu")).state_dict()[key], sft.state_dict()[key])
    base = Qwen2.from_pretrained(workspace / "model").state_dict()[key]
    assert torch.equal(nr.load_reference(cfg, tmp_path / "no_sft", torch.device("cpu")).state_dict()[key], base)


def test_reft_rollouts_follow_the_data_order_the_mask_and_the_sampling_seed(workspace, tmp_path, monkeypatch):
    """ReFT step 1 (no warm-up, so the weights are `model`'s): its prompts are the first prompts_per_step items of the
    data order of `seed` (pass 0: randperm seeded with seed), G rows each, sampled from the nested model of the
    skip sampler's first mask with the sampling generator seeded with seed + 1 (README: seed + 1 + rank); step 2
    takes the next items of the order. Recomputed here with model.generate."""
    seen = []
    monkeypatch.setattr(nr, "reward", lambda text, gold: seen.append((text, gold)) or 0.0)
    cfg = tiny_config(workspace, tmp_path / "run", sft_epochs=0, steps=2, seed=5)
    nr.train(cfg, quiet=True)
    examples = load_dataset("gsm8k", workspace / "data", "train")
    idx = torch.randperm(len(examples), generator=torch.Generator().manual_seed(5)).tolist()[:4]
    assert [g for _, g in seen] == [examples[i].answer for i in idx for _ in range(4)]
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    mask = nr.draw_skip_mask(4, 0.25, 1, torch.Generator().manual_seed(5))
    prompts = [tok.encode(chat_prompt(examples[i].question)) for i in idx[:2] for _ in range(4)]
    out = model.generate(prompts[:5], max_new_tokens=6, skip_mask=mask, pad_token_id=tok.pad_token_id,
                         generator=torch.Generator().manual_seed(6), **nr.sampling_kwargs(cfg, tok))
    texts = [tok.decode(t[m].tolist()) for t, m in zip(out.tokens, out.mask)]
    assert [t for t, _ in seen[:5]] == texts
