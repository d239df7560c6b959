"""The GPU path: the properties test_qwen2.py and test_train.py prove on the CPU, checked again on a CUDA device
(fp32, and the training loop's bf16 autocast). Skipped without one, as in CI; on a GPU machine:
`python -m pytest -q tests/test_cuda.py`."""
import pytest
import torch

import eval as E
import nested_reft as nr
from data import load_dataset
from qwen2 import Qwen2
from test_qwen2 import PROMPTS, left_pad, ours, teacher_forced
from test_train import (coin_reward, fixed_rollouts, read_metrics, tiny_config,  # noqa: F401  (fixtures:
                        workspace)                                                 # coin_reward, workspace)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: these checks need a GPU")

DEV = torch.device("cuda")
CPU = torch.device("cpu")
SKIPS = [None, [False, True, False, False], [True, False, True, False]]


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """fp32 means fp32: TF32 matmuls (10-bit mantissa) would fail the 1e-4 parity bounds."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def both(seed):
    """The same random weights on the CPU and on the GPU."""
    m = ours(seed=seed)
    return m, ours(seed=seed).to(DEV)


@pytest.mark.parametrize("skip", SKIPS)
def test_logits_equal_the_cpu_model(skip):
    cpu, gpu = both(seed=1)
    ids, am = left_pad(PROMPTS)
    with torch.no_grad():
        a = cpu(ids, skip, am.bool())
        b = gpu(ids.to(DEV), skip, am.bool().to(DEV))
    assert b.device.type == "cuda" and b.dtype == torch.float32
    real = am.bool()                                       # padded positions are not defined, compare the rest
    torch.testing.assert_close(b.cpu()[real], a[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("skip", SKIPS)
def test_greedy_decoding_equals_full_forward_and_the_cpu(skip):
    cpu, gpu = both(seed=2)
    out = gpu.generate(PROMPTS, max_new_tokens=12, temperature=0.0, skip_mask=skip)
    assert out.tokens.device.type == "cuda" and out.tokens.shape == (3, 12)
    lp, logits = teacher_forced(gpu, out, skip, temperature=0.0)
    assert torch.equal(logits.argmax(-1), out.tokens)
    torch.testing.assert_close(out.logprobs, lp, atol=1e-4, rtol=0)
    ref = cpu.generate(PROMPTS, max_new_tokens=12, temperature=0.0, skip_mask=skip)
    assert torch.equal(out.tokens.cpu(), ref.tokens)
    torch.testing.assert_close(out.logprobs.cpu(), ref.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("skip, temperature, top_p", [(None, 1.0, 1.0), ([False, False, True, False], 0.7, 0.9)])
def test_sampled_logprobs_equal_teacher_forced(skip, temperature, top_p):
    _, gpu = both(seed=3)
    eos = (3, 11)
    kw = dict(temperature=temperature, top_p=top_p, valid_vocab_size=90)
    run = lambda seed: gpu.generate(PROMPTS * 3, max_new_tokens=16, min_new_tokens=2, skip_mask=skip,
                                    eos_token_ids=eos, generator=torch.Generator(DEV).manual_seed(seed), **kw)
    out = run(0)
    lp, _ = teacher_forced(gpu, out, skip, eos_token_ids=eos, min_new_tokens=2, **kw)
    torch.testing.assert_close(out.logprobs[out.mask], lp[out.mask], atol=1e-4, rtol=0)
    again, other = run(0), run(1)                          # a CUDA generator: same seed, same tokens
    assert torch.equal(again.tokens, out.tokens) and not torch.equal(other.tokens, out.tokens)
    with pytest.raises(ValueError, match="generator is on cpu"):
        gpu.generate(PROMPTS, max_new_tokens=2, generator=torch.Generator().manual_seed(0))


def test_bf16_autocast_sampling_tracks_a_full_forward():
    """The training loop's GPU rollouts: fp32 master weights under bf16 autocast, a bf16 KV cache; the recorded
    log-probs agree with a teacher-forced forward under the same autocast up to bf16 rounding."""
    _, gpu = both(seed=4)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert gpu.new_cache(2, 8).k.dtype == torch.bfloat16
        out = gpu.generate(PROMPTS * 2, max_new_tokens=10, temperature=1.0,
                           generator=torch.Generator(DEV).manual_seed(0))
        lp, _ = teacher_forced(gpu, out, None, temperature=1.0)
    assert out.logprobs.dtype == torch.float32 and torch.isfinite(out.logprobs).all()
    assert (out.logprobs - lp).abs().max() < 0.15 and (out.logprobs - lp).abs().mean() < 0.03


def test_checkpoint_loads_onto_the_gpu_in_bf16(tmp_path):
    cpu = ours(seed=5)
    cpu.save_pretrained(tmp_path / "m")
    gpu = Qwen2.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, device="cuda")
    p = next(gpu.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        a, b = cpu(ids), gpu(ids.to(DEV)).float().cpu()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reft_step_equals_the_cpu_step(workspace, tmp_path, dtype):
    """One reft_step on the same fixed rollouts (micro-batches, Retrace-λ), SGD at lr 1: the GPU moves the weights
    as the CPU does, to fp32 round-off, and under bf16 autocast in the direction of the fp32 step (cosine 0.9995
    for bf16 autocast on a CPU)."""
    cfg = tiny_config(workspace, tmp_path / "run", group_size=3, temperature=0.7, fixed_length=False, grad_clip=0,
                      micro_batch=4)
    steps = []
    for dev, dt in ((CPU, torch.float32), (DEV, dtype)):
        model, tok = nr.load_model(cfg, dev)
        with torch.no_grad():
            model.lm_head.weight.mul_(5)
        r, _ = fixed_rollouts(model.cpu(), tok, cfg.temperature)
        model.to(dev)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        out = nr.reft_step(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), r, cfg, tok, dev, dt)
        assert torch.isfinite(torch.tensor(out["loss"]))
        steps.append(torch.cat([(p0 - p.detach()).flatten().cpu() for p, p0 in zip(model.parameters(), before)]))
    ref, got = steps
    assert ref.abs().max() > 0
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-6)
    else:
        assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.98


def test_training_run_on_the_gpu(workspace, tmp_path):
    """SFT + plain ReFT end to end on the GPU with the default dtype (bf16 autocast on a bf16 GPU): finite metrics,
    a checkpoint that loads. Then r = 0 in fp32 is on-policy: every ratio is 1 up to round-off."""
    cfg = tiny_config(workspace, tmp_path / "bf16", device="cuda", dtype="auto", steps=2)
    nr.train(cfg, quiet=True)
    for row in read_metrics(tmp_path / "bf16"):
        assert all(v == v for v in row.values() if isinstance(v, float))     # no NaN
    assert Qwen2.from_pretrained(tmp_path / "bf16" / "checkpoint").config.num_hidden_layers == 4
    cfg = tiny_config(workspace, tmp_path / "fp32", device="cuda", skip_ratio=0, skip_border=0, sft_epochs=0,
                      steps=2, temperature=0.7)
    nr.train(cfg, quiet=True)
    for row in read_metrics(tmp_path / "fp32"):
        assert abs(row["ratio_min"] - 1) < 1e-4 and abs(row["ratio_max"] - 1) < 1e-4


def test_resume_on_the_gpu_goes_on_as_an_uninterrupted_run(workspace, tmp_path, coin_reward):  # noqa: F811
    """A GPU run's checkpoint: AdamW moments saved as CUDA tensors (read back through the CPU, map_location) and the
    CUDA sampling generator's state (16 bytes: seed, offset), restored into a CUDA generator. The resumed run draws
    the same masks and rollouts and takes the same steps as an uninterrupted one (to GPU round-off: the embedding
    backward sums with atomics)."""
    full, part = tmp_path / "full", tmp_path / "part"
    nr.train(tiny_config(workspace, full, device="cuda", dtype="auto"), quiet=True)
    nr.train(tiny_config(workspace, part, device="cuda", dtype="auto"), quiet=True, stop_after=2)
    state = torch.load(part / "checkpoint" / "trainer_state.pt", weights_only=True, map_location="cpu")
    assert state["sample_rng"].numel() == torch.Generator(DEV).get_state().numel()   # the GPU generator's
    nr.train(tiny_config(workspace, part, device="cuda", dtype="auto"), resume=str(part), quiet=True)
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4] and any(r["grad_norm"] > 0 for r in a)
    for ra, rb in zip(a, b):
        assert (ra["skip"], ra["reward_mean"], ra["completion_len"]) == (rb["skip"], rb["reward_mean"],
                                                                        rb["completion_len"])
        for key in ("loss", "ratio_mean", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key


def test_evaluate_on_the_gpu_grades_as_on_the_cpu(workspace):  # noqa: F811
    """eval.evaluate (greedy, batched, left-padded prompts sorted by length) with the model on the GPU: in fp32 the
    completions and grades of the CPU; under the training loop's bf16 autocast (run_eval) it runs and grades all."""
    cfg = tiny_config(workspace, workspace / "unused")
    examples = load_dataset("gsm8k", workspace / "data", "train")[:7]
    cpu, tok = nr.load_model(cfg, CPU)
    gpu, _ = nr.load_model(cfg, DEV)
    _, want = E.evaluate(cpu, tok, examples, batch_size=3, max_new_tokens=8)
    _, got = E.evaluate(gpu, tok, examples, batch_size=3, max_new_tokens=8)
    assert got == want
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, bf16 = E.evaluate(gpu, tok, examples, batch_size=3, max_new_tokens=8)
    assert [r["question"] for r in bf16] == [r["question"] for r in want] and all(r["num_tokens"] > 0 for r in bf16)
