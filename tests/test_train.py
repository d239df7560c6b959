"""The training loop (nested_reft.py): config handling, a tiny SFT + ReFT run, exact resume."""
import json
import math
import shutil
import subprocess
import zlib
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

import nested_reft as nr
from data import Tokenizer, train_tokenizer
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


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "m", "dataset": "gsm8k", "lrr": 1}')
    with pytest.raises(nr.UserError, match=r"bad.json: unknown key 'lrr'"):
        nr.load_config(str(bad))
    bad.write_text('{"model": "m",\n "steps": }')
    with pytest.raises(nr.UserError, match=r"bad.json: invalid JSON at line 2"):
        nr.load_config(str(bad))
    with pytest.raises(nr.UserError, match="config 'nope'.*not found"):
        nr.load_config("nope")


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
                              "loss_last": sft_rows[-1]["loss"]}
    assert json.loads((run / "summary.json").read_text())["sft"] == summary["sft"]
    for r in rows:
        assert len(r["skip"]) == 1 and r["skip"][0] in (1, 2)                # k = round(.25 * 4) = 1, e = 1
        for key in ("reward_mean", "zero_std_frac", "ratio_min", "ratio_mean", "ratio_max", "trunc_frac",
                    "ess_ratio", "kl_mu_pi", "entropy", "completion_len", "rollout_tok_s", "tok_s", "runtime"):
            assert key in r and r[key] == r[key], key                        # present and not NaN
        assert r["completion_len"] == 6                                      # fixed-length rollouts
        assert r["grad_norm"] > 0 and r["loss"] != 0
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


def test_resume_reproduces_an_uninterrupted_run(workspace, tmp_path, coin_reward):
    full, part = tmp_path / "full", tmp_path / "part"
    sa = nr.train(tiny_config(workspace, full), quiet=True)["sft"]
    nr.train(tiny_config(workspace, part), quiet=True, stop_after=2)
    assert len(read_metrics(part)) == 2
    cfg, resume = nr.parse_args(["--resume", str(part)])
    sb = nr.train(cfg, resume=resume, quiet=True)["sft"]                     # the warm-up ran before the stop
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
           "eval_benchmarks": "aime,nope"}
    for key, value in bad.items():
        with pytest.raises(nr.UserError, match=f"'{key}'"):
            nr.load_config("gsm8k_1p5b", {key: value})
    nr.load_config("gsm8k_1p5b", {"lam": "2", "variant": "base"})       # lambda is Retrace's only
    nr.load_config("gsm8k_1p5b", {"clip_eps": "0.2", "top_p": "1", "steps": "0"})


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
    assert not (run / "metrics.jsonl").exists() and not (run / "sft").exists()
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
    nr.train(tiny_config(workspace, run, sft_epochs=0, steps=1), quiet=True)
    with pytest.raises(nr.UserError, match="already holds a run: continue it with --resume"):
        nr.train(tiny_config(workspace, run, sft_epochs=0, steps=1), quiet=True)
    died = tmp_path / "died_in_sft"                                      # a log, but no sft/ and no checkpoint
    died.mkdir()
    (died / "metrics.jsonl").write_text('{"stage": "sft", "step": 1}\n')
    with pytest.raises(nr.UserError, match="already holds a run: nothing to resume in it"):
        nr.train(tiny_config(workspace, died), quiet=True)


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
    cfg, resume = nr.parse_args(["--resume", str(cut)])
    nr.train(cfg, resume=resume, quiet=True)
    a, b = read_metrics(full), read_metrics(cut)
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
    state = cut / "checkpoint" / "trainer_state.pt"
    for damaged in (state.read_bytes()[:1000], b"not a checkpoint"):
        state.write_bytes(damaged)
        with pytest.raises(nr.UserError, match="not a readable trainer state"):
            nr.train(cfg, resume=resume, quiet=True)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(workspace, tmp_path, data_dir):
    with pytest.raises(ValueError, match="has 151665 ids but the model has vocab_size 300"):
        nr.train(tiny_config(workspace, tmp_path / "run", tokenizer=str(data_dir / "qwen2_tokenizer")), quiet=True)
