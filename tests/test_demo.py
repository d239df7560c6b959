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

