"""Multi-process training (distributed.py and the torchrun hooks of nested_reft.py) on CPU with gloo, DDP and FSDP2.

One spawn of 2 processes with the environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) runs every 2-rank scenario (starting processes is the slow part); the tests check its
outputs. Rollouts differ between ranks by design (each rank has its own sampling stream), so the 1-vs-2-process
parity of the optimizer step is checked on FIXED rollouts fed to reft_step (and on SFT, whose batches are fixed
by the data order); the full train() loop on 2 ranks is checked for identical skip masks, rank-0-only files,
merged evaluation and exact resume. The helpers' rank arithmetic (orders, paddings, flags) is also checked in ONE
process on a simulated rank (world_size / rank patched, the collectives replaced by the other rank's part).
"""
import contextlib
import json
import os
import socket
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import distributed
import nested_reft as nr
from data import Example, load_dataset
from eval import run_benchmarks
from qwen2 import Qwen2
from test_train import read_metrics, tiny_config, workspace  # noqa: F401  (workspace is a fixture)

WORLD = 2
SLOW_ROLLOUT = 0.3  # s: rank 1 rolls out this much slower in the run with evaluation
GSM8K_TEST = [(a, b) for a in range(7, 10) for b in range(2, 5)]  # 9 toy test problems


def spawn(fn, *args) -> None:
    """Run fn(rank, *args) in WORLD fresh processes joined into one gloo group, as torchrun would."""
    with socket.socket() as s:                                    # a free localhost port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(port, fn, args), nprocs=WORLD, join=True)


def _entry(rank: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        fn(rank, *args)
    finally:
        distributed.cleanup()


@contextlib.contextmanager
def one_thread():
    """Tiny matmuls: extra intra-op threads only contend (badly, on a busy CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def coin(text: str, gold) -> float:
    """test_train's deterministic reward (patched into nested_reft inside each process)."""
    return float(zlib.crc32(text.encode()) % 2)


# ------------------------------------------------------------------------------------------------ one step, exact

def fixed_rollouts(tokenizer, step: int, prompts: int = 4, G: int = 4) -> nr.Rollouts:
    """A deterministic rollout batch with ragged prompts and completions (so the ranks hold different token
    counts and the global token-mean normaliser matters) and log mu near log pi (ratios on both sides of 1).
    No EOS in the completions: fixed-length sampling bans it (log pi = -inf)."""
    g = torch.Generator().manual_seed(100 + step)
    S, Tp, Tn = prompts * G, 7, 6
    ok = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in tokenizer.eos_token_ids])
    pad = tokenizer.pad_token_id
    pmask = torch.arange(Tp) >= Tp - torch.randint(2, Tp + 1, (S,), generator=g)[:, None]     # left-padded
    mask = torch.arange(Tn) < torch.randint(1, Tn + 1, (S,), generator=g)[:, None]
    prompt = torch.where(pmask, ok[torch.randint(0, len(ok), (S, Tp), generator=g)], pad)
    completion = torch.where(mask, ok[torch.randint(0, len(ok), (S, Tn), generator=g)], pad)
    logp_mu = torch.where(mask, -5.7 + 0.5 * torch.randn(S, Tn, generator=g), 0.0)   # log(1/300) = -5.7
    rewards = torch.randint(0, 2, (S,), generator=g).float()
    return nr.Rollouts(prompt, pmask, completion, mask, logp_mu, rewards, [""] * S)


def my_rows(r: nr.Rollouts) -> nr.Rollouts:
    """This rank's contiguous share of the rows (whole GRPO groups); everything in one process."""
    rows = distributed.shard(list(range(r.tokens.shape[0])))
    sl = slice(rows[0], rows[-1] + 1)
    return nr.Rollouts(r.prompt_tokens[sl], r.prompt_mask[sl], r.tokens[sl], r.mask[sl], r.logp_mu[sl],
                       r.rewards[sl], r.texts[sl])


def train_a_bit(ws: Path, parallel: str, grad_checkpointing: bool = False) -> dict:
    """3 ReFT steps on fixed rollouts (this rank's rows of each), then 3 SFT steps (this rank's share of each
    batch), from the workspace model. In one process: the whole batches."""
    cfg = tiny_config(ws, ws / "unused", parallel=parallel, prompts_per_step=4, micro_batch=3, lr=1e-2,
                      sft_batch_size=8, sft_micro_batch=3, sft_lr=1e-2, sft_epochs=1,
                      grad_checkpointing=grad_checkpointing)
    device, dtype = torch.device("cpu"), torch.float32
    model, tok = nr.load_model(cfg, device)
    model = distributed.wrap(model, parallel, device, dtype)
    opt, sched = nr.make_optimizer(model, cfg, cfg.lr, 10)
    out = {"reft": [], "sft": []}
    for step in range(3):
        r = my_rows(fixed_rollouts(tok, step))
        out["reft"].append(nr.reft_step(model, opt, sched, r, cfg, tok, device, dtype))
    nr.sft(model, tok, load_dataset("gsm8k", ws / "data", "train"), cfg, device, dtype, out["sft"].append)
    if parallel == "fsdp" and distributed.world_size() > 1:
        out.update(fsdp_checks(model, device, dtype))
    full = distributed.full_model(model)
    out["params"] = full.state_dict() if full is not None else None
    out["tied"] = full is None or full.lm_head.weight is full.model.embed_tokens.weight   # tie_word_embeddings
    return out


def fsdp_checks(model, device, dtype) -> dict:
    """Sampling inside gathered() (16 tokens: the packed CPU decode path, PACK_MIN_NEW_TOKENS) and the sharded
    frozen copy (KL reference) under FSDP."""
    prompts = [[5, 6, 7, 8], [9, 10]]
    with distributed.gathered(model):
        sampled = model.generate(prompts, max_new_tokens=16, generator=torch.Generator().manual_seed(3)).tokens
        unsharded = not any(isinstance(p, DTensor) for p in model.parameters())
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    ref = distributed.frozen_copy(model, device, dtype)
    x = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with torch.no_grad(), distributed.gathered(model):
        same = torch.equal(ref(x), model(x))
    with torch.no_grad():            # after gathered(): the layers reshard after a forward again; the frozen
        model(x), ref(x)             # copy (no backward to free it) reshards its root too
    layers_reshard = all(isinstance(p, DTensor) for p in distributed.unwrap(model).model.layers.parameters())
    ref_reshards = all(isinstance(p, DTensor) for p in ref.parameters())
    return {"sampled": sampled, "unsharded_inside": unsharded, "resharded_after": resharded,
            "layers_reshard_after_forward": layers_reshard, "frozen_copy_reshards": ref_reshards,
            "frozen_copy_same_logits": same,
            "frozen_copy_no_grad": not any(p.requires_grad for p in ref.parameters())}


@pytest.fixture(scope="module")
def one_process(workspace):  # noqa: F811
    with one_thread():
        return train_a_bit(workspace, "ddp")      # not under torchrun: wrap() is the identity


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_take_the_step_of_one_process(workspace, one_process, two_ranks, parallel):  # noqa: F811
    """Same losses, gradient norms, whole-batch statistics and parameters as one process with the whole batch:
    the token-mean normaliser is the global token count and the rank-averaged gradients are rescaled to a sum
    (a factor-2 or a per-rank normaliser error changes grad_norm; Adam alone would hide a uniform scale).
    The two ranks recompute their layers in the backward (grad_checkpointing, under DDP and FSDP2), the one
    process does not: the same steps either way."""
    two = torch.load(two_ranks / f"steps_{parallel}.pt", weights_only=False)
    for stage in ("reft", "sft"):
        assert len(two[stage]) == len(one_process[stage]) == 3
        for a, b in zip(one_process[stage], two[stage]):
            for key, va in a.items():
                if key != "runtime":          # 'stage' is a string: pytest >= 9.2's approx refuses one
                    expect = va if isinstance(va, str) else pytest.approx(va, rel=1e-5, abs=1e-6)
                    assert b[key] == expect, (stage, key)
    assert any(r["grad_norm"] > 0 for r in two["reft"]) and len({r["ratio_max"] for r in two["reft"]}) > 1
    pa, pb = one_process["params"], two["params"]
    assert pa.keys() == pb.keys()
    for k in pa:  # 6 AdamW steps move weights by ~5e-2; reduction-order noise on a ~0 gradient can move one by ~1e-5
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=2e-4, msg=k)
        assert (pb[k] - pa[k]).abs().mean() < 1e-6, k
    assert any(not torch.equal(pa[k], v) for k, v in Qwen2.from_pretrained(workspace / "model").state_dict().items())
    assert two["tied"]
    if parallel == "fsdp":
        assert two["unsharded_inside"] and two["resharded_after"]
        assert two["layers_reshard_after_forward"] and two["frozen_copy_reshards"]
        assert two["frozen_copy_same_logits"] and two["frozen_copy_no_grad"]
        full = Qwen2(Qwen2.from_pretrained(workspace / "model").config)       # the same weights, not sharded
        full.load_state_dict(pb)
        want = full.generate([[5, 6, 7, 8], [9, 10]], max_new_tokens=16, generator=torch.Generator().manual_seed(3))
        assert torch.equal(two["sampled"], want.tokens)


# ------------------------------------------------------------------------------------------------ train() on 2 ranks

def train_loop(rank: int, ws: Path, base: Path, parallel: str) -> None:
    """train() on 2 ranks: a bad split, a run with evaluation, and an interrupted + resumed run."""
    masks, draw = [], nr.SkipSampler.next
    nr.SkipSampler.next = lambda self: masks.append(draw(self)) or masks[-1]
    batches, roll, slow = [], nr.rollout, [0.0]         # the questions each rank rolls out, step by step

    def rollout(m, tok, batch, *a):
        batches.append([e.question for e in batch])
        time.sleep(slow[0])                              # a straggler's rollouts (rank 1 in the run in own<rank>)
        return roll(m, tok, batch, *a)
    nr.rollout = rollout
    report = {}
    try:                                   # an uneven split is a one-line user error on every rank
        nr.train(tiny_config(ws, base / "bad", parallel=parallel, prompts_per_step=3), quiet=True)
    except nr.UserError as e:
        report["uneven"] = str(e)
    # every rank gets its OWN out_dir: anything a rank other than 0 wrote would show up in base/own<rank>
    # ... and its 3 SFT steps all train a nested model (sft_skip_prob=1: DDP must accept layers without a gradient)
    own = tiny_config(ws, base / f"own{rank}", parallel=parallel, steps=3, skip_border=0, eval_benchmarks="gsm8k",
                      eval_limit=7, eval_max_new_tokens=4, eval_batch_size=2, sft_skip_prob=1.0)
    slow[0] = SLOW_ROLLOUT if rank == 1 else 0.0
    report["summary"] = nr.train(own, quiet=True)
    slow[0] = 0.0
    # exact resume with the same world size
    kw = dict(parallel=parallel, sft_epochs=0, skip_ratio=0.5, skip_border=0)   # masks: 2 of 4 layers
    nr.train(tiny_config(ws, base / "full", **kw), quiet=True)
    nr.train(tiny_config(ws, base / "part", **kw), quiet=True, stop_after=2)
    cfg, resume = nr.parse_args(["--resume", str(base / "part")])
    nr.train(cfg, resume=resume, quiet=True)
    nr.SkipSampler.next, nr.rollout = draw, roll
    report["masks"], report["batches"] = masks, batches
    (base / f"report{rank}.json").write_text(json.dumps(report))


def _worker(rank: int, ws: Path, base: Path) -> None:
    """Everything the tests below check on 2 ranks, in ONE spawn (starting processes is the slow part)."""
    distributed.init(torch.device("cpu"))
    nr.reward = coin
    for parallel in ("ddp", "fsdp"):
        result = train_a_bit(ws, parallel, grad_checkpointing=True)     # the one-process reference: without
        if rank == 0:
            torch.save(result, base / f"steps_{parallel}.pt")
        (base / parallel).mkdir(exist_ok=True)
        train_loop(rank, ws, base / parallel, parallel)


@pytest.fixture(scope="module")
def with_test_set(workspace):  # noqa: F811
    lines = [json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
             for a, b in GSM8K_TEST]
    (workspace / "data" / "gsm8k" / "test.jsonl").write_text("\n".join(lines) + "\n")
    return workspace


@pytest.fixture(scope="module")
def two_ranks(with_test_set, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("two_ranks")
    spawn(_worker, with_test_set, base)
    return base


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_train_on_two_ranks(with_test_set, two_ranks, tmp_path, parallel):
    ws, base = with_test_set, two_ranks / parallel
    reports = [json.loads((base / f"report{r}.json").read_text()) for r in range(WORLD)]
    assert all("'prompts_per_step' = 3" in r["uneven"] and "(2)" in r["uneven"] for r in reports)

    # the same skip mask on every rank at every step (3 nested SFT steps, then 3 + 4 + 2 + 2 ReFT steps of 4
    # train() calls; 1 or 2 of the 4 layers each, so masks drawn independently per rank would differ somewhere)
    assert reports[0]["masks"] == reports[1]["masks"] and len(reports[0]["masks"]) == 3 + 3 + 4 + 2 + 2
    # each rank rolls out its own contiguous half of every step's prompts (rank 0 first), none twice
    assert all(len(b) == 1 for r in reports for b in r["batches"]) and len(reports[0]["batches"]) == 3 + 4 + 2 + 2
    train_set = load_dataset("gsm8k", ws / "data", "train")
    order = nr.DataOrder(len(train_set), tiny_config(ws, tmp_path).seed)
    for step in range(3):                                                   # the run in own<rank>
        want = [train_set[i].question for i in order.take(2)]
        assert reports[0]["batches"][step] + reports[1]["batches"][step] == want, step
    # only rank 0 wrote files
    assert not (base / "own1").exists()
    run = base / "own0"
    assert {p.name for p in run.iterdir()} >= {"run_config.json", "metrics.jsonl", "sft", "checkpoint",
                                               "eval.jsonl", "summary.json"}
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and len(read_metrics(run, "sft")) == 3
    assert [r["skip"] for r in rows] == [[i for i, s in enumerate(m) if s] for m in reports[0]["masks"][3:6]]
    assert all(r["completion_len"] == 6 for r in rows)                 # fixed length, over both ranks' rows
    # the rollout phase lasts until the slowest rank is done: rank 1's straggling counts in rank 0's metrics
    assert all(r["rollout_s"] >= SLOW_ROLLOUT and r["rollout_tok_s"] <= 2 * 4 * 6 / SLOW_ROLLOUT for r in rows)
    assert reports[0]["summary"]["rollout_s"] >= 3 * SLOW_ROLLOUT
    # the per-rank sampling streams differ (else the two halves would duplicate rollouts of equal prompts)
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and not torch.equal(*state["sample_rng_ranks"])
    # evaluation: the ranks' slices merged back in order == one process evaluating the final checkpoint
    records = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    model, tok = Qwen2.from_pretrained(run / "checkpoint"), nr.Tokenizer.load(ws / "tok")
    with one_thread():
        want = run_benchmarks(model, tok, ws / "data", "gsm8k", tmp_path / "one.jsonl", limit=7, batch_size=2,
                              max_new_tokens=4, print_fn=lambda *a: None)
    assert [r["index"] for r in records] == list(range(7))
    wrecs = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [(r["question"], r["completion"]) for r in records] == [(r["question"], r["completion"]) for r in wrecs]
    assert reports[0]["summary"]["eval"]["macro"] == reports[1]["summary"]["eval"]["macro"] == want["macro"]

    # resume on 2 ranks reproduces the uninterrupted 2-rank run
    a, b = read_metrics(base / "full"), read_metrics(base / "part")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("skip", "reward_mean", "loss", "ratio_mean", "grad_norm"):
            assert ra[key] == rb[key], key
    wa = Qwen2.from_pretrained(base / "full" / "checkpoint").state_dict()
    wb = Qwen2.from_pretrained(base / "part" / "checkpoint").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # ... and a different world size is refused
    cfg, resume = nr.parse_args(["--resume", str(base / "part")])
    with pytest.raises(nr.UserError, match="written by 2 process"):
        nr.train(cfg, resume=resume, quiet=True)


def test_configs_choose_the_engine():
    assert nr.load_config("gsm8k_7b").parallel == "fsdp" and nr.load_config("gsm8k_1p5b").parallel == "ddp"
    with pytest.raises(nr.UserError, match="'parallel'.*expected one of ddp, fsdp"):
        nr.parse_args(["--config=gsm8k_1p5b", "--parallel=zero3"])


def test_single_process_helpers_are_identities():
    x = torch.arange(6).view(3, 2)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_rows(x) is x and distributed.all_reduce_sum(5) == 5
    assert distributed.shard([1, 2]) == [1, 2] and distributed.all_gather("a") == ["a"]
    assert distributed.init(torch.device("cpu")) == torch.device("cpu") and distributed.world_size() == 1
    distributed.barrier()                                     # no process group: nothing to wait for, no error
    net = torch.nn.Linear(3, 2)
    for parallel in ("ddp", "fsdp"):                          # either engine: the model itself
        assert distributed.wrap(net, parallel, torch.device("cpu"), torch.float32) is net
    assert distributed.unwrap(net) is net and distributed.full_model(net) is net
    with distributed.gathered(net), distributed.grad_sync(net, last=False):
        pass


def test_frozen_copy_is_a_detached_snapshot():
    """The KL reference in one process / DDP: a deep copy of the current weights that takes no gradient and does
    not follow later updates of the trained model (which keeps its own requires_grad)."""
    net = torch.nn.Linear(3, 2)
    ref = distributed.frozen_copy(net, torch.device("cpu"), torch.float32)
    assert ref is not net and torch.equal(ref.weight, net.weight) and torch.equal(ref.bias, net.bias)
    assert not any(p.requires_grad for p in ref.parameters()) and all(p.requires_grad for p in net.parameters())
    before = ref.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    assert torch.equal(ref.weight, before)


def test_init_joins_the_group_torchrun_describes(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1): on GPUs the device is cuda:LOCAL_RANK (RANK is global: rank 3 of a
    2-node job is GPU 1 of its node), made current BEFORE an nccl group bound to it is created; on CPU a gloo
    group; a group that exists already is joined once only. The collectives are recorded, not run."""
    calls, initialized = [], [False]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: initialized[0])
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    gpu1 = torch.device("cuda", 1)
    assert distributed.init(torch.device("cuda")) == gpu1
    assert calls == [("set_device", gpu1), ("nccl", {"device_id": gpu1})]
    calls.clear()
    assert distributed.init(torch.device("cpu")) == torch.device("cpu")
    assert calls == [("gloo", {"device_id": None})]
    calls.clear()
    initialized[0] = True
    assert distributed.init(torch.device("cpu")) == torch.device("cpu") and calls == []


# ------------------------------------------------------------------------------------------------ 2 ranks, simulated
# The helpers' rank arithmetic in ONE process: world_size / rank patched, the collectives replaced by what the
# other rank would contribute. Catches what the spawned run cannot see (orders and paddings it never exercises,
# performance-only contracts such as no_sync and per-layer FSDP units).

@pytest.fixture
def rank_of_two(monkeypatch):
    """Pretend to be rank `r` of 2: call the returned function with r."""
    def be(r: int) -> None:
        monkeypatch.setattr(distributed, "world_size", lambda: WORLD)
        monkeypatch.setattr(distributed, "rank", lambda: r)
    return be


def test_shard_and_gather_rows_on_a_simulated_rank(rank_of_two, monkeypatch):
    for r in range(WORLD):                    # contiguous blocks in rank order, the order gather_rows restores
        rank_of_two(r)
        assert distributed.shard(list(range(6))) == [[0, 1, 2], [3, 4, 5]][r]
        assert distributed.is_main() == (r == 0)
    with pytest.raises(ValueError, match="3 items cannot be split evenly over 2"):
        distributed.shard([1, 2, 3])
    rank_of_two(0)
    other = {torch.int64: torch.tensor([[5, 6, 7]]), torch.bool: torch.tensor([[True, True, True]]),
             torch.float32: torch.tensor([2.5])}
    monkeypatch.setattr(distributed, "all_gather", lambda t: [t, other[t.dtype]])
    # ragged completions: rank 0's rows first, dim 1 right-padded with 0 / False (a mask must stay False there)
    assert torch.equal(distributed.gather_rows(torch.tensor([[1, 2], [3, 4]])),
                       torch.tensor([[1, 2, 0], [3, 4, 0], [5, 6, 7]]))
    assert torch.equal(distributed.gather_rows(torch.tensor([[True], [True]])),
                       torch.tensor([[True, False, False], [True, False, False], [True, True, True]]))
    assert torch.equal(distributed.gather_rows(torch.tensor([1.5])), torch.tensor([1.5, 2.5]))


def test_reductions_on_a_simulated_rank(rank_of_two, monkeypatch):
    rank_of_two(1)
    calls = []
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    distributed.barrier()
    assert calls == ["barrier"]

    def all_reduce(t, op=distributed.dist.ReduceOp.SUM):      # the other rank holds the same value
        assert op == distributed.dist.ReduceOp.SUM
        t.add_(t.clone())
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed, "_comm_device", lambda: torch.device("cpu"))
    total = distributed.all_reduce_sum(1 / 3)                  # summed in float64: no float32 rounding
    assert type(total) is float and total == 2 / 3
    total = distributed.all_reduce_sum(2 ** 40 + 1)            # token counts: exact integers
    assert type(total) is int and total == 2 ** 41 + 2
    assert distributed.all_reduce_sum(2 ** 60 + 1) == 2 ** 61 + 2     # summed in int64, not float64 (53 bits)


def test_comm_device_follows_the_backend(monkeypatch):
    """all_reduce_sum's tensor lives where the backend can reduce it: the current GPU for nccl, else the CPU."""
    monkeypatch.setattr(distributed.torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    assert distributed._comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    assert distributed._comm_device() == torch.device("cpu")


def test_grad_sync_defers_the_ddp_all_reduce_to_the_last_micro_batch():
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)   # a shell: no process group needed
    torch.nn.Module.__init__(ddp)
    ddp.require_backward_grad_sync = True                             # the flag DDP's backward reads
    with distributed.grad_sync(ddp, last=False):
        assert not ddp.require_backward_grad_sync
    assert ddp.require_backward_grad_sync
    with distributed.grad_sync(ddp, last=True):
        assert ddp.require_backward_grad_sync


@pytest.mark.parametrize("device", [torch.device("cuda", 1), torch.device("cpu")])
def test_ddp_wrap_arguments(rank_of_two, monkeypatch, device):
    """DDP on this rank's GPU (device_ids=[index]; None on CPU), gradients as views of the all-reduce buckets
    (no second copy of the grads), and unused parameters expected only when some backward skips layers
    (find_unused_parameters costs a graph traversal per backward). The constructor is recorded, not run."""
    rank_of_two(1)
    made = []
    monkeypatch.setattr(distributed, "DistributedDataParallel", lambda m, **kw: made.append((m, kw)) or "ddp")
    net = torch.nn.Linear(3, 2)
    for skips in (False, True):
        assert distributed.wrap(net, "ddp", device, torch.bfloat16, skips_layers=skips) == "ddp"
    want_ids = [1] if device.type == "cuda" else None
    assert made == [(net, {"device_ids": want_ids, "gradient_as_bucket_view": True, "find_unused_parameters": s})
                    for s in (False, True)]


def test_fsdp_wrap_units_and_precision(workspace, rank_of_two, monkeypatch):  # noqa: F811
    """One FSDP unit per decoder layer (resharded after forward) and then the root; weights all-gathered in the
    compute dtype (fp32: as stored), gradients reduce-scattered in fp32."""
    rank_of_two(0)
    calls = []
    monkeypatch.setattr(distributed, "init_device_mesh", lambda kind, shape: ("mesh", kind, shape))
    monkeypatch.setattr(distributed, "fully_shard", lambda m, **kw: calls.append((m, kw)) or m)
    model = Qwen2.from_pretrained(workspace / "model")
    for dtype, param_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float32, None)):
        calls.clear()
        assert distributed.wrap(model, "fsdp", torch.device("cpu"), dtype) is model
        assert [m for m, _ in calls] == [*model.model.layers, model]
        assert all(kw["mesh"] == ("mesh", "cpu", (WORLD,)) for _, kw in calls)
        assert all(kw["reshard_after_forward"] for _, kw in calls[:-1])
        assert all(kw["mp_policy"].param_dtype == param_dtype and kw["mp_policy"].reduce_dtype == torch.float32
                   for _, kw in calls)
    with pytest.raises(ValueError, match="expected ddp or fsdp"):
        distributed.wrap(model, "zero3", torch.device("cpu"), torch.float32)


def test_evaluate_sharded_on_a_simulated_rank(rank_of_two, monkeypatch):
    """Rank r grades problems r, r + 2, ...; every rank returns the records in order and the accuracy of all."""
    examples = [Example(f"q{i}", None, str(int(i in (1, 3, 4)))) for i in range(7)]

    def evaluate(model, tok, exs, **kw):                              # grades "1" as correct
        recs = [{"question": ex.question, "correct": ex.answer == "1"} for ex in exs]
        return sum(r["correct"] for r in recs) / max(len(recs), 1), recs
    monkeypatch.setattr(nr, "evaluate", evaluate)
    for r in range(WORLD):
        rank_of_two(r)
        parts = [evaluate(None, None, examples[k::WORLD])[1] for k in range(WORLD)]   # what each rank grades

        def all_gather(mine, r=r, parts=parts):
            assert mine == parts[r], "this rank graded the wrong slice"
            return parts
        monkeypatch.setattr(distributed, "all_gather", all_gather)
        acc, records = nr.evaluate_sharded(None, None, examples, batch_size=2)
        assert [rec["question"] for rec in records] == [ex.question for ex in examples] and acc == 3 / 7


def test_only_the_last_micro_batch_syncs(workspace, monkeypatch):  # noqa: F811
    """reft_step and sft call grad_sync(last=True) exactly once per step, on the last micro-batch, whether the
    micro-batches divide the batch or not (a missed last=True under DDP: no all-reduce, the ranks drift apart)."""
    flags = []
    monkeypatch.setattr(distributed, "grad_sync", lambda model, last: flags.append(last) or contextlib.nullcontext())
    cfg = tiny_config(workspace, workspace / "unused", prompts_per_step=2, sft_batch_size=8, sft_epochs=1)
    model, tok = nr.load_model(cfg, torch.device("cpu"))
    examples = load_dataset("gsm8k", workspace / "data", "train")[:8]
    r = fixed_rollouts(tok, 0, prompts=2)                                         # 8 rows
    with one_thread():
        for micro, calls in ((3, 3), (4, 2), (8, 1)):
            c = replace(cfg, micro_batch=micro, sft_micro_batch=micro)
            opt, sched = nr.make_optimizer(model, c, c.lr, 10)
            flags.clear()
            nr.reft_step(model, opt, sched, r, c, tok, torch.device("cpu"), torch.float32)
            assert flags == [False] * (calls - 1) + [True], ("reft", micro)
            flags.clear()
            nr.sft(model, tok, examples, c, torch.device("cpu"), torch.float32, lambda row: None)
            assert flags == [False] * (calls - 1) + [True], ("sft", micro)


def test_train_checks_the_world_size(workspace, rank_of_two, monkeypatch, tmp_path):  # noqa: F811
    """Under torchrun, before anything is loaded: both batch sizes must split evenly over the ranks, and a
    checkpoint must come from the same number of processes (a 1-process one has no per-rank sampling states)."""
    rank_of_two(0)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    for key in ("prompts_per_step", "sft_batch_size"):
        with pytest.raises(nr.UserError, match=f"'{key}' = 3: expected a multiple of the number of processes \\(2\\)"):
            nr.train(tiny_config(workspace, tmp_path / key, **{key: 3}), quiet=True)
    run = tmp_path / "one_process_run"
    (run / "checkpoint").mkdir(parents=True)
    torch.save({**dict.fromkeys(nr.TRAINER_STATE_KEYS), "step": 1, "sample_rng": torch.Generator().get_state()},
               run / "checkpoint" / "trainer_state.pt")
    with pytest.raises(nr.UserError, match="written by 1 process\\(es\\) but this run has 2"):
        nr.train(tiny_config(workspace, run), resume=str(run), quiet=True)


def test_optimizer_state_moves_between_ddp_and_fsdp(workspace, tmp_path):  # noqa: F811
    """--resume with `parallel` switched (same number of processes): an AdamW state saved under DDP (opt.state_dict(),
    keyed by parameter index) loads into the FSDP model by parameter name (was KeyError 'state.0.step'), and one saved
    under FSDP (keyed by name) loads under DDP; the same moments on every parameter. FSDP2 on a one-process group,
    which also checks full_model (rank 0 only) and that gathered() unshards up front."""
    plain = Qwen2.from_pretrained(workspace / "model")
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    with one_thread():
        plain(torch.tensor([[3, 4, 5, 6]])).logsumexp(-1).mean().backward()
    opt.step()
    saved = opt.state_dict()                                          # what a DDP run's trainer_state.pt holds
    names = [n for n, _ in plain.named_parameters()]
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = Qwen2.from_pretrained(workspace / "model")
        mesh = distributed.init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            distributed.fully_shard(layer, mesh=mesh)
        distributed.fully_shard(model, mesh=mesh)
        fsdp_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        distributed.load_optimizer_state_dict(model, fsdp_opt, saved)
        by_name = distributed.optimizer_state_dict(model, fsdp_opt)   # what an FSDP run's trainer_state.pt holds
        full = distributed.full_model(model)                          # rank 0: all the weights, on the CPU
        assert full.lm_head.weight is full.model.embed_tokens.weight  # tie_word_embeddings, as loaded
        got, want = full.state_dict(), Qwen2.from_pretrained(workspace / "model").state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        with pytest.MonkeyPatch.context() as m:                       # any other rank builds no second model
            m.setattr(distributed, "rank", lambda: 1)
            assert distributed.full_model(model) is None
        with distributed.gathered(model):       # all-gathered on entry, before any forward: no collective inside
            assert not any(isinstance(p, DTensor) for p in model.parameters())
        assert all(isinstance(p, DTensor) for p in model.parameters())
    finally:
        distributed.cleanup()
    assert not torch.distributed.is_initialized()                     # the group is gone: no leak into later tests
    back = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    distributed.load_optimizer_state_dict(plain, back, by_name)
    for i, name in enumerate(names):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(by_name["state"][name][key], saved["state"][i][key]), (name, key)
            assert torch.equal(back.state_dict()["state"][i][key], saved["state"][i][key]), (name, key)
