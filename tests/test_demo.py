"""The CPU demo (issue 5): the synthetic task, the FLOP model of the speed column, and a shortened demo run
(python demo.py --quick: the same code path with fewer steps) whose table must be produced and whose ReFT
baseline must move accuracy and reward in the right direction."""
import json
import re
import signal
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace
from pathlib import Path

import pytest

import data
import demo
from qwen2 import Qwen2Config

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------
# the task


def _solve(question: str) -> int:
    """Independent gold: the numbers of the question, combined as its template says."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if " finds " in question:
        return n[0] + n[1] - n[2]
    if " gave " in question:
        return n[0] - n[1]
    if " bags with " in question:
        return n[0] * n[1]
    return n[0] + n[1]


def test_synthetic_task_golds_flaw_and_split():
    train, test = data.load_dataset("synthetic", "ignored", "train"), data.load_dataset("synthetic", "", "test")
    assert (len(train), len(test)) == (2000, 200)
    assert not {ex.question for ex in train} & {ex.question for ex in test}        # held out
    assert len({ex.question for ex in train}) == len(train)
    for ex in train + test:
        assert ex.answer == str(_solve(ex.question)), ex                               # golds always correct
        assert ex.solution.endswith("}.") and "\\boxed{" in ex.solution
    boxed = lambda ex: re.search(r"\\boxed\{(\d+)\}", ex.solution).group(1)
    assert all(boxed(ex) == ex.answer for ex in test)                                  # test CoTs all correct
    two = [ex for ex in train if data.synthetic_template(ex.question) == "two"]
    assert len(two) == 800                                                             # 2 in every 5
    flawed = [ex for ex in two if boxed(ex) != ex.answer]
    assert 0.5 < len(flawed) / len(two) < 0.7                                          # ~ SYNTHETIC_FLAW_RATE
    for ex in flawed:                                                                  # the flaw: the
        a, b, c = map(int, re.findall(r"\d+", ex.question))                            # intermediate a + b
        assert boxed(ex) == str(a + b) and f"{a + b} - {c} = {a + b - c}." in ex.solution   # is boxed
    assert all(boxed(ex) == ex.answer for ex in train if data.synthetic_template(ex.question) != "two")


PRONOUNS = {"Mia": "she", "Tom": "he", "Ana": "she", "Ben": "he", "Eva": "she", "Sam": "he", "Lily": "she", "Max": "he"}
ROTATION = ["add", "two", "sub", "two", "mul"]                                        # problem i: ROTATION[i % 5]
QUESTION_RE = {
    "add": r"(\w+) has (\d) (\w+)\. (\w+) gets (\d) more\. How many \3 does (\w+) have now\?",
    "sub": r"(\w+) had (\d) (\w+) and gave (\d) away\. How many \3 does (\w+) have left\?",
    "mul": r"(\w+) buys (\d) bags with (\d) (\w+) in each bag\. How many \4 does (\w+) buy\?",
    "two": r"(\w+) has (\d) (\w+)\. (\w+) finds (\d) more, then loses (\d)\. How many \3 are left\?",
}


def test_synthetic_task_templates_numbers_and_pronouns():
    """Each question has its template's wording in the rotation, one-digit numbers (sums and the intermediate
    at most 9, products at most 16), and the pronoun of its name."""
    for split in ("train", "test"):
        for i, ex in enumerate(data.synthetic_dataset(split)):
            template = ROTATION[i % 5]
            assert data.synthetic_template(ex.question) == template, ex.question
            m = re.fullmatch(QUESTION_RE[template], ex.question)
            assert m, ex.question
            pronouns = {w.lower() for w in re.findall(r"\b(?:[Hh]e|[Ss]he)\b", ex.question)}
            assert pronouns == {PRONOUNS[m.group(1)]}, ex.question
            n = [int(x) for x in m.groups() if x.isdigit()]
            assert all(1 <= x <= 9 for x in n), ex.question
            assert 1 <= int(ex.answer) <= 16, ex                # a count: nobody ends with nothing
            if template in ("add", "two"):
                assert n[0] + n[1] <= 9, ex.question
            if template == "mul":
                assert n[0] * n[1] <= 16, ex.question


def test_synthetic_task_first_problems():
    """The task is fixed by its seed (the README's demo numbers depend on it): its first problems, checked by hand."""
    test = data.synthetic_dataset("test", 5)
    assert [(ex.question, ex.solution, ex.answer) for ex in test] == [
        ("Ana has 5 shells. She gets 4 more. How many shells does she have now?",
         "5 + 4 = 9. The answer is \\boxed{9}.", "9"),
        ("Mia has 6 pens. She finds 3 more, then loses 2. How many pens are left?",
         "6 + 3 = 9. 9 - 2 = 7. The answer is \\boxed{7}.", "7"),
        ("Eva had 6 cards and gave 2 away. How many cards does she have left?",
         "6 - 2 = 4. The answer is \\boxed{4}.", "4"),
        ("Lily has 2 eggs. She finds 5 more, then loses 1. How many eggs are left?",
         "2 + 5 = 7. 7 - 1 = 6. The answer is \\boxed{6}.", "6"),
        ("Mia buys 3 bags with 2 cards in each bag. How many cards does she buy?",
         "3 * 2 = 6. The answer is \\boxed{6}.", "6"),
    ]
    train = data.synthetic_dataset("train", 2)
    assert [(ex.question, ex.solution) for ex in train] == [
        ("Sam has 3 books. He gets 4 more. How many books does he have now?", "3 + 4 = 7. The answer is \\boxed{7}."),
        ("Lily has 7 apples. She finds 1 more, then loses 2. How many apples are left?",
         "7 + 1 = 8. 8 - 2 = 6. The answer is \\boxed{8}."),                        # a flawed one: 8 boxed
    ]


def test_synthetic_task_is_deterministic_and_checks_arguments():
    assert data.synthetic_dataset("train", 50) == data.synthetic_dataset("train")[:50]
    assert data.synthetic_dataset("test") == data.synthetic_dataset("test")
    assert data.synthetic_dataset("train", 20, seed=1) != data.synthetic_dataset("train", 20)
    clean = data.synthetic_dataset("train", 100, flaw_rate=0.0)
    assert [ex.question for ex in clean] == [ex.question for ex in data.synthetic_dataset("train", 100)]
    assert all(ex.solution.endswith(f"{{{ex.answer}}}.") for ex in clean)
    with pytest.raises(ValueError, match="no split 'dev'"):
        data.load_dataset("synthetic", "", "dev")
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="flaw_rate"):
            data.synthetic_dataset("train", 5, flaw_rate=bad)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="size n=.*expected a positive integer"):
            data.synthetic_dataset("train", bad)
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*synthetic"):
        data.load_dataset("nope", "", "train")


def test_synthetic_task_too_large_fails_instead_of_hanging():
    """The mul template has 576 distinct questions (8 names, 8 items, 9 products) and comes every 5th problem:
    asking for more problems than the templates can give raises ValueError (was an endless redraw loop). The
    30 s alarm only catches that hang; the error itself takes about 0.5 s."""
    def hang(signum, frame):
        raise TimeoutError("synthetic_dataset: no answer after 30 s (endless redraw loop)")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    try:
        assert len(data.synthetic_dataset("train", 2600)) == 2600                  # still fine below the limit
        for split, n in (("train", 2700), ("test", 3000)):
            with pytest.raises(ValueError, match="'mul' questions are used up.*ask for fewer problems"):
                data.synthetic_dataset(split, n)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_synthetic_redraw_budget_is_per_new_question(monkeypatch):
    """SYNTHETIC_MAX_REDRAWS counts repeats IN A ROW: the 2000 train problems meet at most 13 repeats in a row
    but 623 in all, so with a budget of 100 they still load, the same as with the default budget."""
    want = data.synthetic_dataset("train")
    monkeypatch.setattr(data, "SYNTHETIC_MAX_REDRAWS", 100)
    assert data.synthetic_dataset("train") == want
    # the border: 13 repeats in a row (after problem 1944) are within a budget of 14 and use up a budget of 13
    monkeypatch.setattr(data, "SYNTHETIC_MAX_REDRAWS", 14)
    assert data.synthetic_dataset("train") == want
    monkeypatch.setattr(data, "SYNTHETIC_MAX_REDRAWS", 13)
    with pytest.raises(ValueError, match="used up after 1944 problems .no new one in 13 draws"):
        data.synthetic_dataset("train")


def test_synthetic_corpus_is_every_problem_as_the_model_sees_it():
    corpus = data.synthetic_corpus()
    train, test = data.synthetic_dataset("train"), data.synthetic_dataset("test")
    assert len(corpus) == 2200
    assert corpus[0] == data.chat_prompt(train[0].question) + train[0].solution
    assert corpus[-1] == data.chat_prompt(test[-1].question) + test[-1].solution


def test_demo_tokenizer_fits_the_tiny_model():
    tok = data.synthetic_tokenizer()
    assert tok.tk.to_str() == data.synthetic_tokenizer().tk.to_str()                # same ids on every run
    cfg = Qwen2Config.from_json(ROOT / "configs" / "tiny_model.json")
    assert tok.vocab_size <= cfg.vocab_size
    ex = data.synthetic_dataset("train", 1)[0]
    assert tok.decode(tok.encode(ex.solution)) == ex.solution
    assert len(tok.encode(data.chat_prompt(ex.question))) < 60                       # template words merged
    assert cfg.num_hidden_layers == 12                                                # r = 0.15 -> k = 2


# ----------------------------------------------------------------------------------------------------------
# the FLOP model behind the "FLOP pred." column


def test_rollout_flops_golden():
    cfg = Qwen2Config(vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=2)
    # per token and layer: 2 * (q 64*64 + k, v 2 * 64*32 + o 64*64 + MLP 3 * 64*128) = 73728
    # prompt 2, 1 new token: 2 positions with 1 + 2 = 3 keys: 2 * 73728 + 4 * 64 * 3 = 148224 per layer;
    # LM head on the 1 new token: 2 * 64 * 448 = 57344
    assert demo.rollout_flops(cfg, 12, 2, 1) == 12 * 148224 + 57344
    assert demo.rollout_flops(cfg, 10, 2, 1) == 10 * 148224 + 57344
    assert demo.predicted_speedup(cfg, 2, 2, 1) == pytest.approx((12 * 148224 + 57344) / (10 * 148224 + 57344))
    assert demo.predicted_speedup(cfg, 0, 50, 24) == 1.0


def test_flop_ceiling_of_the_spec_for_the_1p5b_model():
    # Spec §7: with the LM head included, about 3.0 / 9.1 / 12.1 % less compute per decoded token for k = 1 / 3 / 4
    # on Qwen2.5-Math-1.5B (W 1536, I 8960, 2 KV heads of 128, V 151936, N 28). One decoded token (1 key):
    # layer 2 * (1536^2 + 2 * 1536 * 256 + 1536^2 + 3 * 1536 * 8960) + 4 * 1536 = 93591552, head 2 * 1536 * 151936
    # = 466747392, total 28 * 93591552 + 466747392 = 3087310848; k layers save k * 93591552 of it.
    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2)
    assert demo.rollout_flops(cfg, 28, 1, 1) == 3087310848
    saved = [1 - 1 / demo.predicted_speedup(cfg, k, 1, 1) for k in (1, 3, 4)]
    assert saved == pytest.approx([k * 93591552 / 3087310848 for k in (1, 3, 4)], rel=1e-12)
    assert [round(100 * x, 1) for x in saved] == [3.0, 9.1, 12.1]


# ----------------------------------------------------------------------------------------------------------
# what the demo says: repetitions of the speed sweep, an earlier demo it replaces


def test_speed_sweep_reports_its_repetitions():
    assert demo.reps_label(1) == "best of 1 rep"
    assert demo.reps_note(1) == "best of 1 rep: noisy, see the table's rollout tok/s"
    assert demo.reps_label(3) == demo.reps_note(3) == "best of 3 interleaved reps"
    assert demo.SETTINGS["full"]["speed_reps"] == 3                        # the module docstring says so


@pytest.mark.parametrize("reps", [1, 3])
def test_speed_plot_legend_names_the_repetitions(tmp_path, monkeypatch, reps):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    legends = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: legends.extend(
        t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()))
    run = {"label": "ReFT baseline", "skip_ratio": 0.0, "reward": [0.5, 0.7], "rollout_tok_s": 100.0,
           "accuracy_curve": [{"step": 0, "accuracy": 0.5}, {"step": 2, "accuracy": 0.6}]}
    res = {"settings": {"speed_reps": reps}, "runs": [run], "sft": {"accuracy": 0.5},
           "speed_sweep": [{"skip_ratio": 0.0, "tok_s": 100.0, "predicted_speedup": 1.0},
                           {"skip_ratio": 0.15, "tok_s": 110.0, "predicted_speedup": 1.2}]}
    demo.plot(res, tmp_path)
    assert f"generate(), warm-up model ({demo.reps_label(reps)})" in legends, legends


def test_plots_are_written_atomically(tmp_path, monkeypatch):
    """An interrupted savefig (Ctrl-C, full disk) leaves the earlier demo's plot in place and no temp file (was:
    a truncated PNG where the plot was), as results.json and table.md (data.write_text_atomic)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    (tmp_path / "reward_accuracy.png").write_bytes(b"the earlier plot")

    def interrupted(fig, fname, *a, **k):
        with open(fname, "wb") if isinstance(fname, (str, Path)) else nullcontext(fname) as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Figure, "savefig", interrupted)
    run = {"label": "ReFT baseline", "skip_ratio": 0.0, "reward": [0.5, 0.7], "rollout_tok_s": 100.0,
           "accuracy_curve": [{"step": 0, "accuracy": 0.5}, {"step": 2, "accuracy": 0.6}]}
    res = {"settings": {"speed_reps": 1}, "runs": [run], "sft": {"accuracy": 0.5},
           "speed_sweep": [{"skip_ratio": 0.0, "tok_s": 100.0, "predicted_speedup": 1.0}]}
    with pytest.raises(KeyboardInterrupt):
        demo.plot(res, tmp_path)
    assert (tmp_path / "reward_accuracy.png").read_bytes() == b"the earlier plot"
    assert [p.name for p in tmp_path.iterdir()] == ["reward_accuracy.png"]


def test_rerun_in_the_same_out_says_it_replaces_the_earlier_demo(tmp_path, monkeypatch, capsys):
    def stop(*a, **k):
        raise demo.nested_reft.UserError("stopped after the opening lines")
    monkeypatch.setattr(demo, "build_task_and_model", stop)
    monkeypatch.setattr(demo.torch, "set_num_threads", lambda n: None)
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "earlier demo" not in capsys.readouterr().out                    # an empty folder: nothing to say
    for name in ("nested-retrace", "sft", "init", "unrelated"):
        (tmp_path / name).mkdir()
    assert demo.earlier_demo(tmp_path) == ["init", "sft", "nested-retrace"]
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 2
    lines = [x for x in capsys.readouterr().out.splitlines() if "earlier demo" in x]
    assert lines == [f"[demo] {tmp_path}/ holds an earlier demo: this run replaces its run folders "
                     f"(init, sft, nested-retrace)"], lines


def test_out_that_is_or_is_under_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out, words in ((tmp_path / "afile", "is a file, expected an output folder"),
                       (tmp_path / "afile" / "sub", "cannot create the output folder (Not a directory")):
        with pytest.raises(SystemExit) as e:
            demo.main(["--quick", "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"error: --out {out}: {words}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("seed", [-1, 2**62, 10**23])
def test_seed_out_of_range_is_a_usage_error_before_any_file(tmp_path, capsys, seed):
    """A seed the run configs refuse is named before out/ is created and out/init written (a huge one was a
    torch overflow traceback, a negative one a config error after the initial model was saved)."""
    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--out", str(tmp_path / "out"), "--seed", str(seed)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --seed {seed}: expected an integer in [0, 2^62)" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# the shortened demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_quick")
    for name in ("sft", "baseline"):                  # leftovers of an earlier demo run: a re-run replaces them
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text('{"stage": "stale", "step": 0}\n')
    proc = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_demo_produces_the_table(quick_demo):
    out, stdout = quick_demo
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "quick"
    assert [r["name"] for r in res["runs"]] == ["baseline", "nested-base", "nested-practical", "nested-retrace"]
    assert [(r["skip_ratio"], r["skip_border"], r["k"], r["variant"]) for r in res["runs"]] == [
        (0.0, 0, 0, "base"), (0.15, 1, 2, "base"), (0.15, 1, 2, "practical"), (0.15, 1, 2, "retrace")]
    steps = res["settings"]["steps"]
    for r in res["runs"]:
        assert len(r["reward"]) == steps
        assert [c["step"] for c in r["accuracy_curve"]][0] == 0 and r["accuracy_curve"][-1]["step"] == steps
        assert r["rollout_tok_s"] > 0 and r["tok_s"] > 0 and r["runtime"] > 0
        assert all(len(s) == r["k"] for s in r["skips"])                 # k layers skipped at every step
        assert all(1 <= i <= 10 for s in r["skips"] for i in s)          # never layer 0 or 11 (e = 1)
    nested = res["runs"][1]
    assert nested["predicted_speedup"] > 1.1                              # 2 of 12 layers: ~1.2x
    table = (out / "table.md").read_text()
    for label in ["SFT warm-up"] + [r["label"] for r in res["runs"]]:
        assert label in table and label in stdout
    for column in ("held-out acc.", "Δ vs baseline", "δ vs baseline", "rollout tok/s", "total tok/s", "runtime"):
        assert column in table
    assert all("stale" not in (out / name / "metrics.jsonl").read_text() for name in ("sft", "baseline"))
    assert f"{out}/ holds an earlier demo: this run replaces its run folders (sft, baseline)" in stdout
    assert "generate() tok/s of the warm-up model (best of 1 rep: noisy, see the table's rollout tok/s)" in stdout
    for name in ("sft/sft", "init", "baseline/checkpoint", "nested-retrace/checkpoint"):
        assert (out / name / "config.json").is_file() and (out / name / "tokenizer.json").is_file()
    try:
        import matplotlib  # noqa: F401
        assert (out / "reward_accuracy.png").stat().st_size > 0 and (out / "speed_vs_skip.png").stat().st_size > 0
    except ImportError:
        assert "pip install matplotlib" in stdout


def test_quick_demo_reft_moves_accuracy_the_right_way(quick_demo):
    """ReFT must raise held-out accuracy clearly above the SFT warm-up (the flaw it learned by imitation is
    fixed by the verifiable reward), for the baseline and for Nested-ReFT Retrace-lambda, and the baseline's
    rollout reward must rise: the mean of the last third of the steps above the first third. RL that did
    nothing (reward flat) or that hurt would fail this. (Measured here: SFT 82 % -> 99 % for every run.)"""
    out, _ = quick_demo
    res = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in res["runs"]}
    for name in ("baseline", "nested-retrace"):
        assert runs[name]["accuracy"] >= res["sft"]["accuracy"] + 0.05, (name, runs[name]["accuracy_curve"])
    rew, third = runs["baseline"]["reward"], len(runs["baseline"]["reward"]) // 3
    assert sum(rew[-third:]) / third > sum(rew[:third]) / third


# ----------------------------------------------------------------------------------------------------------
# the stages and the report without training: fake models, runs and clocks (each check below was added because a
# hand-made mutant of demo.py passed every fast test and was caught, if at all, only by the minutes-long quick demo)


def test_findings_report_the_targets_with_the_boundaries_included():
    """gain = baseline - SFT in points (>= 10 meets), speed = rollout tok/s over the baseline's (not total tok/s),
    Retrace's |gap| <= 3 is within, on both sides. Accuracies are counts over 200 problems: 0.85 -> 0.95 is
    exactly +10.0 points and 0.99 -> 0.96 exactly -3.0 (in floats 9.999999999999998 and -3.0000000000000027: the
    verdicts were 'MISSES' and 'NOT within' beside a printed +10.0 and -3.0)."""
    def run(name, acc, roll, tok, pred=1.2):
        return {"name": name, "label": name.upper(), "accuracy": acc, "rollout_tok_s": roll, "tok_s": tok,
                "predicted_speedup": pred}
    res = {"sft": {"accuracy": 0.85}, "runs": [run("baseline", 0.95, 2000.0, 3000.0, 1.0),
                                               run("nested-base", 0.96, 2400.0, 3100.0),
                                               run("nested-retrace", 0.92, 2300.0, 3200.0, 1.196)]}
    assert demo.findings(res) == [
        "ReFT over the SFT warm-up: +10.0 points of held-out accuracy (meets the >= 10 target)",
        "NESTED-BASE: rollouts 1.20x the baseline's tok/s (FLOP prediction 1.20x), accuracy +1.0 points vs the "
        "baseline",
        "NESTED-RETRACE: rollouts 1.15x the baseline's tok/s (FLOP prediction 1.20x), accuracy -3.0 points vs the "
        "baseline (within 3)"]
    res["sft"]["accuracy"], res["runs"][0]["accuracy"], res["runs"][2]["accuracy"] = 0.86, 0.99, 0.96
    out = demo.findings(res)
    assert out[0] == "ReFT over the SFT warm-up: +13.0 points of held-out accuracy (meets the >= 10 target)"
    assert out[2].endswith("accuracy -3.0 points vs the baseline (within 3)"), out
    res["runs"][0]["accuracy"], res["runs"][2]["accuracy"] = 0.955, 0.99             # +9.5; +3.5: outside
    out = demo.findings(res)
    assert "+9.5 points of held-out accuracy (MISSES the >= 10 target)" in out[0]
    assert out[2].endswith("accuracy +3.5 points vs the baseline (NOT within 3)"), out
    res["runs"][0]["accuracy"], res["runs"][2]["accuracy"] = 0.99, 0.955              # -3.5: outside too
    assert demo.findings(res)[2].endswith("accuracy -3.5 points vs the baseline (NOT within 3)")


def test_fmt_templates_and_f_names():
    assert demo.fmt_templates({"add": 1.0, "two": 0.6, "mul": 0.25}) == "add 100% two 60% mul 25%"
    assert [demo.f_name(v, r) for v, r in (("base", 0.0), ("base", 0.15), ("practical", 0.0), ("retrace", 0.15))] \
        == ["ρ (= 1 at r = 0)", "ρ", "1", "λ·min(1,ρ)"]


def test_evaluate_dir_per_template_accuracy(monkeypatch):
    """Per-template accuracy is the share correct WITHIN each template (not over all problems)."""
    import eval as eval_mod
    test = data.synthetic_dataset("test", 10)                    # templates add two sub two mul, twice
    correct = [True, False, True, True, False, True, True, True, True, True]
    records = [{"question": ex.question, "correct": c, "completion": f"c{i}"}
               for i, (ex, c) in enumerate(zip(test, correct))]
    seen = {}
    monkeypatch.setattr(demo.Qwen2, "from_pretrained", lambda d: SimpleNamespace(eval=lambda: "model"))
    monkeypatch.setattr(eval_mod, "evaluate", lambda model, tok, ex, **kw: (seen.update(kw) or 0.8, records))
    ev = demo.evaluate_dir(Path("ignored"), None, test, 48)
    assert ev["accuracy"] == 0.8 and seen == {"batch_size": 10, "max_new_tokens": 48}
    assert ev["per_template"] == {"add": 1.0, "mul": 0.5, "sub": 1.0, "two": 0.75}


def test_build_task_and_model_checks_the_vocab_and_the_reload(tmp_path, monkeypatch):
    """The tokenizer must fit the model's vocab (equal fits, one id more does not), and a reloaded checkpoint
    that differs from the saved model is an error."""
    import torch
    cfg = Qwen2Config.from_json(demo.MODEL_CONFIG)
    tok = SimpleNamespace(vocab_size=cfg.vocab_size + 1, save=lambda d: None)
    monkeypatch.setattr(demo.data, "synthetic_tokenizer", lambda: tok)
    with pytest.raises(ValueError, match=f"vocab_size={cfg.vocab_size} is smaller than the demo tokenizer's "
                                         f"{cfg.vocab_size + 1} ids"):
        demo.build_task_and_model(tmp_path, 0)
    tok.vocab_size = cfg.vocab_size
    load = demo.Qwen2.from_pretrained

    def corrupted(d):
        m = load(d)
        with torch.no_grad():
            m.model.norm.weight[0] += 1
        return m
    monkeypatch.setattr(demo.Qwen2, "from_pretrained", corrupted)
    with pytest.raises(RuntimeError, match="the reloaded checkpoint differs from the saved model"):
        demo.build_task_and_model(tmp_path, 0)
    monkeypatch.setattr(demo.Qwen2, "from_pretrained", load)
    assert demo.build_task_and_model(tmp_path, 0) == (tok, tmp_path / "init")


def test_reft_runs_start_from_the_warm_up_with_k_of_the_12_layers(tmp_path):
    """Each run: the warm-up checkpoint as its model, no SFT of its own, its (r, e, f) and k = round(12 r)."""
    runs = [demo.ReftRun(name, label, kw, tmp_path, tmp_path / "init", tmp_path / "sft", 4, 0.8, {"seed": 3})
            for name, label, kw in demo.RUNS]
    assert [r.describe() for r in runs] == [
        "ReFT baseline: r = 0, e = 0 (k = 0 layers skipped per step), f(ρ) = ρ (= 1 at r = 0)",
        "Nested-ReFT Base: r = 0.15, e = 1 (k = 2 layers skipped per step), f(ρ) = ρ",
        "Nested-ReFT Practical: r = 0.15, e = 1 (k = 2 layers skipped per step), f(ρ) = 1",
        "Nested-ReFT Retrace-λ: r = 0.15, e = 1 (k = 2 layers skipped per step), f(ρ) = λ·min(1,ρ)"]
    for r, (name, _, _) in zip(runs, demo.RUNS):
        assert (r.cfg.model, r.cfg.sft_epochs, r.cfg.steps, r.cfg.seed) == (str(tmp_path / "sft"), 0.0, 4, 3)
        assert r.dir == tmp_path / name and r.curve == [{"step": 0, "accuracy": 0.8}]


def _fake_run(tmp_path, steps=10):
    """A ReftRun without __init__'s config loading: its fields as __init__ and advance() set them."""
    r = demo.ReftRun.__new__(demo.ReftRun)
    r.name, r.label, r.dir, r.k, r.step = "nested-base", "Nested-ReFT Base", tmp_path, 2, 0
    r.cfg = SimpleNamespace(skip_ratio=0.15, skip_border=1, variant="base", steps=steps, max_new_tokens=48)
    r.curve, r.summary, r.last_eval = [{"step": 0, "accuracy": 0.8}], {}, {}
    return r


def test_reft_run_result_reads_the_reft_rows_of_its_metrics(tmp_path):
    r = _fake_run(tmp_path)
    rows = [{"stage": "sft", "step": 1, "reward_mean": 9.0, "skip": [], "completion_len": 99.0},
            {"stage": "reft", "step": 1, "reward_mean": 0.5, "skip": [3, 7], "completion_len": 18.0},
            {"stage": "reft", "step": 2, "reward_mean": 0.75, "skip": [2, 9], "completion_len": 21.0},
            {"stage": "reft", "step": 3, "reward_mean": 0.625, "skip": [1, 4], "completion_len": 24.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n\n")
    r.curve += [{"step": 5, "accuracy": 0.95}, {"step": 10, "accuracy": 0.9}]      # the last, not the best
    r.last_eval = {"per_template": {"add": 1.0}}
    r.summary = {"rollout_tok_s": 2300.0, "tok_s": 3100.0, "runtime": 120.5, "rollout_s": 60.0}
    res = r.result()
    assert res["accuracy"] == 0.9 and res["accuracy_curve"] == r.curve
    assert res["reward"] == [0.5, 0.75, 0.625] and res["skips"] == [[3, 7], [2, 9], [1, 4]]
    assert res["completion_len"] == 21.0                                          # (18 + 21 + 24) / 3
    assert (res["rollout_tok_s"], res["tok_s"], res["runtime"], res["rollout_s"]) == (2300.0, 3100.0, 120.5, 60.0)
    assert (res["skip_ratio"], res["skip_border"], res["k"], res["variant"]) == (0.15, 1, 2, "base")


def test_reft_run_advance_resumes_and_keeps_the_totals_of_the_last_chunk(tmp_path, monkeypatch):
    """The first chunk starts fresh, later ones resume from the run's folder; only the last runs to the end
    (stop_after None) and its result (the run's totals) is the summary; every chunk's checkpoint is evaluated."""
    calls, evals = [], []
    monkeypatch.setattr(demo.nested_reft, "train",
                        lambda cfg, resume="", stop_after=None: calls.append((resume, stop_after)) or {"n": len(calls)})
    monkeypatch.setattr(demo, "evaluate_dir", lambda d, tok, test, n: evals.append((d, n)) or
                        {"accuracy": 0.1 * len(evals), "per_template": {}})
    r = _fake_run(tmp_path)
    for stop in (4, 8, 10):
        r.advance(stop, None, [])
        assert r.summary == ({"n": 3} if stop == 10 else {})
    assert calls == [("", 4), (str(tmp_path), 8), (str(tmp_path), None)]
    assert evals == [(tmp_path / "checkpoint", 48)] * 3
    assert r.curve == [{"step": 0, "accuracy": 0.8}, {"step": 4, "accuracy": 0.1}, {"step": 8, "accuracy": 0.2},
                       {"step": 10, "accuracy": pytest.approx(0.3)}] and r.step == 10


def test_run_all_reft_interleaves_chunks_up_to_the_last_step(monkeypatch):
    """steps 10, eval_every 4: every run advances to 4, then 8, then 10 (a last short chunk, never past 10)."""
    log = []

    class Fake:
        def __init__(self, name, label, kw, out, init, sft_dir, steps, sft_acc, cfg_kw):
            self.name, self.cfg = name, SimpleNamespace(steps=steps, prompts_per_step=2, group_size=4, lr=1e-6)
            log.append(("init", name, cfg_kw))

        def describe(self):
            return self.name

        def advance(self, stop, tok, test):
            log.append((self.name, stop))

        def result(self):
            return self.name
    monkeypatch.setattr(demo, "ReftRun", Fake)
    s = {"steps": 10, "eval_every": 4, "reft_overrides": {"warmup_steps": 0}}
    assert demo.run_all_reft(None, None, None, s, None, [], 0.8, {"seed": 3}) == [n for n, _, _ in demo.RUNS]
    names = [n for n, _, _ in demo.RUNS]
    assert log[:4] == [("init", n, {"seed": 3, "warmup_steps": 0}) for n in names]
    assert log[4:] == [(n, stop) for stop in (4, 8, 10) for n in names]


class _FakeSweepModel:
    """generate() of a fake warm-up model: 4 rows with 2 + 3 + 3 + 4 = 12 real new tokens (mean 3) at any ratio."""
    config = Qwen2Config.from_json(ROOT / "configs" / "tiny_model.json")
    calls = []

    def eval(self):
        return self

    def generate(self, prompts, skip_mask=None, **kw):
        import torch
        self.calls.append(sum(skip_mask))
        mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
        return SimpleNamespace(mask=mask)


def test_speed_sweep_keeps_the_best_rep_and_predicts_at_the_mean_lengths(monkeypatch):
    """tok/s = real new tokens / seconds, the BEST of the reps per ratio; the prediction at the mean prompt length
    (chat-prompt tokens of the first rollout_batch = 4 test problems: 2, 4, 4, 6 -> 4, not the padded 6) and the
    mean real new tokens per row (12 / 4 = 3, not the padded 4). predicted_speedup(k = 2, Tp = 4, T = 3) by hand:
      positions 4 + 3 - 1 = 6; keys 4*5/2 + 2*4 + 3*2/2 = 10 + 8 + 3 = 21
      per layer 6 * 73728 + 256 * 21 = 442368 + 5376 = 447744;  LM head 3 * 57344 = 172032
      F(12) = 5372928 + 172032 = 5544960;  F(10) = 4477440 + 172032 = 4649472 -> 1.192600..."""
    test = data.synthetic_dataset("test", 6)
    lens = {data.chat_prompt(ex.question): n for ex, n in zip(test, (2, 4, 4, 6, 8, 8))}
    tok = SimpleNamespace(encode=lambda s: [0] * lens[s], eos_token_ids=[1], pad_token_id=0, vocab_size=400)
    _FakeSweepModel.calls = []
    monkeypatch.setattr(demo.Qwen2, "from_pretrained", lambda d: _FakeSweepModel())
    ticks = iter([0.0, 0.1, 1.0, 1.2,          # rep 0: r = 0 in 0.1 s, r = 0.15 in 0.2 s
                  2.0, 2.3, 3.0, 3.05])        # rep 1: 0.3 s, 0.05 s
    monkeypatch.setattr(demo, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    draw = demo.nested_reft.draw_skip_mask
    borders = []
    monkeypatch.setattr(demo.nested_reft, "draw_skip_mask", lambda n, r, e, g: borders.append(e) or draw(n, r, e, g))
    cfg = SimpleNamespace(rollout_batch=4, max_new_tokens=4, temperature=1.0)
    out = demo.speed_sweep(Path("ignored"), tok, test, (0.0, 0.15), 2, cfg)
    assert _FakeSweepModel.calls == [0, 2, 0, 2]                        # k = round(12 * 0.15) = 2
    assert borders == [0, 1, 0, 1]                                      # e = 1 where layers are skipped
    assert [(p["skip_ratio"], p["k"]) for p in out] == [(0.0, 0), (0.15, 2)]
    assert [p["tok_s"] for p in out] == pytest.approx([12 / 0.1, 12 / 0.05])
    assert out[0]["predicted_speedup"] == 1.0
    assert out[1]["predicted_speedup"] == pytest.approx(5544960 / 4649472)


def test_main_reports_what_its_stages_measured(tmp_path, monkeypatch, capsys):
    """main() with its stages faked: each run's FLOP prediction at the mean chat-prompt length (every prompt 49
    tokens here) and that run's mean completion length (30), results.json and table.md (the table and the
    findings) written atomically, the sweep's measured ratios over r = 0. Prediction for k = 2, Tp = 49, T = 30:
      positions 78; keys 49*50/2 + 29*49 + 30*29/2 = 1225 + 1421 + 435 = 3081
      per layer 78 * 73728 + 256 * 3081 = 5750784 + 788736 = 6539520;  LM head 30 * 57344 = 1720320
      F(12) = 80194560, F(10) = 67115520 -> 1.194874 (1.196 at the 20 new tokens of another run length)"""
    tok = SimpleNamespace(encode=lambda s: [0] * 49)
    monkeypatch.setattr(demo.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(demo, "build_task_and_model", lambda out, seed: (tok, out / "init"))
    monkeypatch.setattr(demo, "run_sft", lambda *a: (tmp_path / "sft", {"accuracy": 0.845, "runtime": 192.0}))
    monkeypatch.setattr(demo, "run_config", lambda *a, **k: None)
    monkeypatch.setattr(demo, "plot", lambda res, out: [])

    def run(name, label, kw):
        k = 2 if kw["skip_ratio"] else 0
        return {"name": name, "label": label, "k": k, "completion_len": 30.0, "accuracy": 0.995 if k else 0.99,
                "rollout_tok_s": 2400.0 if k else 2000.0, "tok_s": 3000.0, "runtime": 100.0, **kw}
    monkeypatch.setattr(demo, "run_all_reft", lambda *a: [run(*x) for x in demo.RUNS])
    monkeypatch.setattr(demo, "speed_sweep", lambda *a: [
        {"skip_ratio": 0.0, "k": 0, "tok_s": 2000.0, "predicted_speedup": 1.0},
        {"skip_ratio": 0.15, "k": 2, "tok_s": 2500.0, "predicted_speedup": 1.196}])
    atomic = []
    write = data.write_text_atomic
    monkeypatch.setattr(demo.data, "write_text_atomic", lambda p, t: atomic.append(Path(p).name) or write(p, t))
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--out", str(tmp_path), "--threads", "0"])         # a usage error, before any stage
    assert "--threads 0: expected an integer >= 1" in capsys.readouterr().err
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["prompt_len"] for r in res["runs"]] == [49.0] * 4
    assert [r["predicted_speedup"] for r in res["runs"]] == pytest.approx([1.0] + [80194560 / 67115520] * 3)
    assert res["findings"][0] == "ReFT over the SFT warm-up: +14.5 points of held-out accuracy (meets the >= 10 target)"
    assert res["findings"][1].startswith(
        "Nested-ReFT Base: rollouts 1.20x the baseline's tok/s (FLOP prediction 1.19x)")
    assert sorted(atomic) == ["results.json", "table.md"]
    assert (tmp_path / "table.md").read_text() == (demo.make_table(res) + "\n\n"
                                                   + "".join(f"- {f}\n" for f in res["findings"]))
    assert "[demo]   r = 0.15 (k = 2): 2500 tok/s, 1.25x measured, 1.20x FLOP-predicted" in stdout
    assert "| Nested-ReFT Base | 0.15 | 1 | ρ | 99.5% | +0.5 | +0.5% | 2400 | 1.20x (1.19x) | 3000 | 100.0 |" in stdout


def test_plots_show_the_smoothed_reward_and_the_scaled_prediction(tmp_path, monkeypatch):
    """reward_accuracy: the 5-step moving average (over the steps so far at the start) beside the raw reward;
    speed_vs_skip: the FLOP prediction scaled to the measured r = 0 tok/s (100 * 1.2 = 120 at r = 0.15)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    lines = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: lines.update(
        {(ax.get_title(), ln.get_label()): list(ln.get_ydata()) for ax in fig.axes for ln in ax.get_lines()}))
    run = {"label": "ReFT baseline", "skip_ratio": 0.0, "reward": [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
           "rollout_tok_s": 100.0, "accuracy_curve": [{"step": 0, "accuracy": 0.5}, {"step": 7, "accuracy": 0.6}]}
    res = {"settings": {"speed_reps": 3}, "runs": [run], "sft": {"accuracy": 0.5},
           "speed_sweep": [{"skip_ratio": 0.0, "tok_s": 100.0, "predicted_speedup": 1.0},
                           {"skip_ratio": 0.15, "tok_s": 90.0, "predicted_speedup": 1.2}]}
    (tmp_path / "speed_vs_skip.png").write_bytes(b"the earlier plot")
    earlier = (tmp_path / "speed_vs_skip.png").stat().st_ino
    demo.plot(res, tmp_path)
    # replaced by a rename (a new file), not rewritten in place: a reader never sees a half-written plot
    assert (tmp_path / "speed_vs_skip.png").stat().st_ino != earlier
    smooth = lines["Training reward (5-step average; raw faint)", "ReFT baseline"]
    assert smooth == pytest.approx([0.0, 0.5, 2 / 3, 0.75, 0.8, 1.0, 0.8])
    assert lines["Held-out accuracy", "ReFT baseline"] == pytest.approx([50.0, 60.0])
    assert lines["Rollout speed against the skip ratio", "FLOP prediction (scaled to r = 0)"] == pytest.approx(
        [100.0, 120.0])


def test_fresh_empties_an_earlier_run_folder(tmp_path):
    (tmp_path / "baseline" / "checkpoint").mkdir(parents=True)
    (tmp_path / "baseline" / "metrics.jsonl").write_text('{"stage": "stale"}\n')
    assert demo.fresh(tmp_path / "baseline") == tmp_path / "baseline"
    assert not (tmp_path / "baseline").exists()
    assert demo.fresh(tmp_path / "new") == tmp_path / "new"                   # nothing there: nothing to do
