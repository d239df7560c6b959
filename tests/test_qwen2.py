"""qwen2.py: parity with transformers' Qwen2ForCausalLM (the independent oracle, test-only), checkpoint I/O,
layer skipping, the KV-cache sampler and its behaviour log-probs. Tiny random models, CPU, fp32."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch

import qwen2

from qwen2 import GenerateOutput, Qwen2, Qwen2Config, logprobs_from_logits, process_logits



def oracle():
    """transformers, the independent oracle (test-only): a test that compares against it skips without it, the
    others (and tests/test_cuda.py, which imports this module's helpers) run."""
    return pytest.importorskip("transformers")


TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0, rms_norm_eps=1e-5)


def randomize_(model: torch.nn.Module, seed: int = 0):
    """Large random weights (incl. biases and norm gains) so that every part of the math shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def ours(seed=0, **kw) -> Qwen2:
    return randomize_(Qwen2(Qwen2Config(**{**TINY, **kw})), seed).eval()


def decode_path(monkeypatch, path: str):
    """generate()'s one-token steps on the parameters ("plain"), on the fused q|k|v and gate|up matrices kept as
    plain tensors ("fused", what small matrices get), or on the fused matrices prepacked by oneDNN ("packed")."""
    monkeypatch.setattr(qwen2, "PACK_MIN_NEW_TOKENS", 10**9 if path == "plain" else 1)
    monkeypatch.setattr(qwen2, "PACK_MIN_BYTES", 0 if path == "packed" else 2**62)


def hf_model(seed=0, **kw):
    cfg = oracle().Qwen2Config(**{**TINY, **kw}, attn_implementation="eager")
    return randomize_(oracle().Qwen2ForCausalLM(cfg), seed).eval()


def left_pad(prompts, pad=0):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 17, 3, 44, 9, 60, 2], [7, 7, 81], [90, 1, 33, 12, 56]]


# ---------------------------------------------------------------------------------------------- config


def test_config_from_hf_config_json(tmp_path):
    hf = oracle().Qwen2Config(**TINY, tie_word_embeddings=True, max_position_embeddings=4096)
    hf.save_pretrained(tmp_path)
    cfg = Qwen2Config.from_json(tmp_path / "config.json")
    assert cfg == Qwen2Config(**TINY, tie_word_embeddings=True, max_position_embeddings=4096)
    assert cfg.head_dim == 16
    # transformers 4.x layout (rope_theta / torch_dtype at top level), unknown keys ignored
    d = {**TINY, "model_type": "qwen2", "torch_dtype": "bfloat16", "rope_theta": 5.0, "some_new_key": [1]}
    cfg = Qwen2Config.from_dict(d)
    assert cfg.rope_theta == 5.0 and cfg.torch_dtype == "bfloat16"
    assert Qwen2Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["model_type"] == "qwen2" and cfg.to_dict()["architectures"] == ["Qwen2ForCausalLM"]
    # transformers 5.x names the dtype "dtype"; a default rope_scaling under either key name is accepted
    assert Qwen2Config.from_dict({**TINY, "dtype": "bfloat16"}).torch_dtype == "bfloat16"
    assert Qwen2Config.from_dict({**TINY, "torch_dtype": "torch.float16"}).torch_dtype == "float16"
    assert qwen2._as_dtype("torch.bfloat16") is torch.bfloat16 and qwen2._as_dtype("fp32") is torch.float32
    assert cfg.to_dict()["rope_parameters"] == {"rope_theta": 5.0, "rope_type": "default"}     # transformers 5 layout
    for rs in ({"type": "default"}, {"rope_type": "default"}):
        assert Qwen2Config.from_dict({**TINY, "rope_scaling": rs}) == Qwen2Config(**TINY)
    assert "eos_token_id" not in cfg.to_dict()                           # none given, none written
    # the special-token ids travel from config.json to a saved config.json (Qwen2.5-Math: 151643 / 151645)
    cfg = Qwen2Config.from_dict({**TINY, "bos_token_id": 1, "eos_token_id": [2, 1]})
    Qwen2(cfg).save_pretrained(tmp_path / "ids")
    hf = oracle().AutoConfig.from_pretrained(tmp_path / "ids")
    assert (hf.bos_token_id, hf.eos_token_id) == (1, [2, 1]) and Qwen2Config.from_json(tmp_path / "ids") == cfg


@pytest.mark.parametrize("change, words", [
    ({"hidden_size": None}, ["'hidden_size'", "missing"]),
    ({"num_key_value_heads": None}, ["'num_key_value_heads'"]),
    ({"model_type": "llama"}, ["model_type", "llama"]),
    ({"use_sliding_window": True}, ["use_sliding_window"]),
    ({"hidden_act": "gelu"}, ["hidden_act"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads"]),
    ({"vocab_size": -1}, ["vocab_size"]),
    ({"num_attention_heads": 0, "head_dim": 8}, ["num_attention_heads"]),     # checked before the feature checks
    ({"hidden_size": "32", "head_dim": 8}, ["hidden_size"]),
    ({"rope_scaling": "linear"}, ["rope_scaling"]),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope_scaling"]),
    ({"head_dim": 64}, ["head_dim"]),
    ({"eos_token_id": "<|im_end|>"}, ["eos_token_id", "token id"]),
    ({"bos_token_id": [1, 2]}, ["bos_token_id", "token id"]),
    ({"eos_token_id": [2, -1]}, ["eos_token_id"]),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0}}, ["rope_parameters"]),
    ({"hidden_size": 36}, ["head_dim=9"]),                                   # odd head_dim: no RoPE halves
    ({"hidden_size": 66}, ["hidden_size=66", "num_attention_heads"]),
    ({"rope_theta": 0}, ["rope_theta"]),
    ({"rms_norm_eps": -1e-6}, ["rms_norm_eps"]),
    ({"rope_theta": float("inf")}, ["rope_theta=inf"]),                     # JSON Infinity: RoPE would not rotate
    ({"rms_norm_eps": float("nan")}, ["rms_norm_eps=nan"]),
    ({"tie_word_embeddings": "false"}, ["tie_word_embeddings"]),             # a truthy string
    ({"num_hidden_layers": True}, ["num_hidden_layers"]),
    ({"torch_dtype": "int8"}, ["torch_dtype='int8'", "bfloat16"]),
])
def test_config_errors_name_file_and_key(tmp_path, change, words):
    d = {**TINY, "model_type": "qwen2"}
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError) as e:
        Qwen2Config.from_json(tmp_path / "config.json")
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and all(w in msg for w in words), msg


def test_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config"):
        Qwen2Config.from_json(tmp_path / "nope.json")


def test_config_not_utf8_names_the_file(tmp_path):
    """A binary / mis-encoded config.json is a one-line ValueError naming the file, not a bare UnicodeDecodeError."""
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError) as e:
        Qwen2Config.from_json(tmp_path / "config.json")
    assert type(e.value) is ValueError and str(e.value).startswith(f"{tmp_path / 'config.json'}: not UTF-8 text")


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("tied", [False, True])
def test_hf_checkpoint_loads_with_logit_parity(tmp_path, tied):
    hf = hf_model(tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    m = Qwen2.from_pretrained(tmp_path, dtype=torch.float32)
    assert m.config.tie_word_embeddings == tied
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = m(ids)
    assert got.shape == (2, 11, TINY["vocab_size"])
    assert ref.abs().max() > 1.0                     # logits are far from trivial
    assert (got - ref).abs().max() <= 1e-4
    # left-padded batch: positions from the mask (HF takes them explicitly)
    ids, am = left_pad(PROMPTS)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=am, position_ids=pos).logits
        got = m(ids, attention_mask=am)
    real = am.bool()
    assert (got - ref)[real].abs().max() <= 1e-4
    # logits_from: only the tail
    with torch.no_grad():
        tail = m(ids, attention_mask=am, logits_from=4)
    assert tail.shape == (3, ids.shape[1] - 4, TINY["vocab_size"])
    torch.testing.assert_close(tail, got[:, 4:], atol=1e-5, rtol=0)


def test_logit_parity_and_decoding_over_a_long_context():
    """A 3,000-token context, as evaluation reaches (prompt + up to 3000 new tokens, Qwen2.5-Math's theta 10000):
    the logits equal transformers' at every position, and a KV-cache decode from a 2,990-token prompt (with a
    skip mask) reproduces the full forward."""
    kw = dict(rope_theta=10000.0, max_position_embeddings=4096)
    hf, m = hf_model(seed=21, **kw), ours(seed=21, **kw)
    m.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.randint(0, TINY["vocab_size"], (1, 3000), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = hf(ids).logits, m(ids)
    assert (got - ref).abs().max() <= 1e-4
    skip = [False, True, False, False]
    out = m.generate([ids[0, :2990].tolist()], max_new_tokens=10, temperature=0.0, skip_mask=skip)
    with torch.no_grad():
        full = m(torch.cat([ids[:, :2990], out.tokens], 1), skip)[0, 2989:-1]
    assert torch.equal(full.argmax(-1), out.tokens[0])
    torch.testing.assert_close(out.logprobs[0], torch.log_softmax(full, -1).gather(1, out.tokens[0, :, None])[:, 0],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied, shard", [(False, False), (True, True), (False, True)])
def test_our_checkpoint_loads_in_transformers(tmp_path, tied, shard):
    m = ours(seed=3, tie_word_embeddings=tied, num_key_value_heads=1)      # GQA with 4 query heads per kv head
    m.save_pretrained(tmp_path / "ck", max_shard_size_bytes=40_000 if shard else 5_000_000_000)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    if shard:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    else:
        assert files == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "ck"]           # no temp dir left behind
    hf = oracle().Qwen2ForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    ids = torch.randint(0, TINY["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max() <= 1e-4
    # and back: our loader reads the (sharded) checkpoint into identical weights
    m2 = Qwen2.from_pretrained(tmp_path / "ck")
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_hf_sharded_checkpoint_and_dtype(tmp_path):
    hf = hf_model(seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m = Qwen2.from_pretrained(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max() <= 1e-4
    mb = Qwen2.from_pretrained(tmp_path, dtype="bfloat16", device="cpu")
    assert mb.dtype == torch.bfloat16 and mb.inv_freq(torch.device('cpu')).dtype == torch.float32
    with torch.no_grad():
        assert mb(ids).dtype == torch.bfloat16


def test_rms_norm_eps_from_the_config_reaches_every_norm(tmp_path):
    """TINY's eps is negligible next to mean(x^2); at 0.5 it changes every norm's output, so parity with
    transformers shows that each norm (the final one too) takes the config's eps."""
    hf = hf_model(seed=1, rms_norm_eps=0.5)
    hf.save_pretrained(tmp_path)
    m = Qwen2.from_pretrained(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = hf(ids).logits, m(ids)
        m.model.norm.eps = TINY["rms_norm_eps"]
        assert (m(ids) - ref).abs().max() > 0.01                          # the final norm's eps shows
    assert (got - ref).abs().max() <= 1e-4


def test_save_into_existing_dir_keeps_other_files(tmp_path):
    m = ours()
    m.save_pretrained(tmp_path / "ck", max_shard_size_bytes=40_000)
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    m.save_pretrained(tmp_path / "ck")                                     # now unsharded
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors",
                                                                  "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    Qwen2.from_pretrained(tmp_path / "ck")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~umask           # as mkdir() would make it
    m.save_pretrained(tmp_path / "sharded", max_shard_size_bytes=40_000)
    for d in ("ck", "sharded"):                      # every file as open() would make it (others can read it)
        for f in (tmp_path / d).iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_also_write_adds_files_in_the_same_rename(tmp_path):
    """save_pretrained(also_write=f): f writes into the temp folder before it becomes `path` (the run's sft/ =
    weights + tokenizer in one rename); over an existing folder its files replace the old copies, the rest kept."""
    m, seen = ours(), []

    def write(d):
        seen.append(d.name)
        assert d != tmp_path / "ck" and (d / "config.json").is_file()        # the complete temp folder
        (d / "tokenizer.json").write_text("new")
    m.save_pretrained(tmp_path / "ck", also_write=write)
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == "new" and seen[0].startswith(".ck.tmp-")
    (tmp_path / "ck" / "tokenizer.json").write_text("old")
    (tmp_path / "ck" / "notes.txt").write_text("kept")
    m.save_pretrained(tmp_path / "ck", also_write=write)
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == "new"
    assert (tmp_path / "ck" / "notes.txt").read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_shards_are_filled_greedily_up_to_the_limit(tmp_path):
    """Shards of at most max_shard_size_bytes, each filled until the next tensor would not fit (a checkpoint of
    exactly the limit is one file); the index names every tensor and the total size; config.json records the
    dtype of the saved weights."""
    m = ours()
    sizes = {k: v.nbytes for k, v in m.state_dict().items()}          # TINY is untied: lm_head.weight included
    total, limit = sum(sizes.values()), 40_000
    assert max(sizes.values()) < limit
    m.save_pretrained(tmp_path / "one", max_shard_size_bytes=total)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]
    m.save_pretrained(tmp_path / "ck", max_shard_size_bytes=limit)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    wm = index["weight_map"]
    assert sorted(wm) == sorted(sizes)
    names = sorted(set(wm.values()))
    assert names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    used = {n: sum(b for k, b in sizes.items() if wm[k] == n) for n in names}
    assert all(u <= limit for u in used.values())
    for a, b in zip(names, names[1:]):                                 # b's first tensor did not fit into a
        first = next(k for k in sizes if wm[k] == b)
        assert used[a] + sizes[first] > limit, (a, used[a], first)
    ours().to(torch.bfloat16).save_pretrained(tmp_path / "bf")
    assert Qwen2Config.from_json(tmp_path / "bf").torch_dtype == "bfloat16"


def test_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """A save into an existing checkpoint folder that dies while writing (disk full) or while moving the new files
    into place: the old checkpoint still loads, unchanged, with its other files, and no temp folder is left."""
    import safetensors.torch
    old = ours(seed=1)
    old.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    real_save, real_replace = safetensors.torch.save_file, os.replace

    def fail_on_call(n, real):
        calls = []
        def f(*a, **kw):
            calls.append(1)
            if len(calls) == n:
                raise OSError("No space left on device")
            return real(*a, **kw)
        return f
    for target, name, fake in ((safetensors.torch, "save_file", fail_on_call(2, real_save)),   # 2nd shard
                               (qwen2.os, "replace", fail_on_call(2, real_replace))):          # moving in
        with monkeypatch.context() as mp:
            mp.setattr(target, name, fake)
            with pytest.raises(OSError, match="No space"):
                ours(seed=2).save_pretrained(tmp_path / "ck", max_shard_size_bytes=40_000)
        assert [p.name for p in tmp_path.iterdir()] == ["ck"], name
        assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.json"], name
        back = Qwen2.from_pretrained(tmp_path / "ck").state_dict()
        assert all(torch.equal(back[k], v) for k, v in old.state_dict().items()), name


def _edit_checkpoint(tmp_path, edit):
    from safetensors.torch import load_file, save_file
    ours().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    edit(sd)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_load_errors_name_the_tensor(tmp_path):
    _edit_checkpoint(tmp_path, lambda sd: sd.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.2.mlp.up_proj.weight'"):
        Qwen2.from_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda sd: sd.update({"model.layers.9.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.9.extra'"):
        Qwen2.from_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.k_proj.bias": torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.bias' has shape \(7,\), expected \(32,\)"):
        Qwen2.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Qwen2.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        Qwen2.from_pretrained(tmp_path / "absent")
    ours().save_pretrained(tmp_path)
    for device, words in (("tpu", "device = 'tpu': expected cpu, cuda or cuda:N"), ("cuda:7", "no such CUDA device")):
        with pytest.raises(ValueError, match=words):     # were torch's RuntimeError / AssertionError
            Qwen2.from_pretrained(tmp_path, device=device)


def test_load_skips_a_tied_lm_head_and_rotary_buffers(tmp_path):
    """A tied save holds the embedding once; on load, an lm_head.weight in a tied checkpoint (older exports have
    one) and rotary_emb.inv_freq buffers are ignored, not 'unexpected'."""
    from safetensors.torch import load_file, save_file
    m = ours(seed=2, tie_word_embeddings=True)
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    sd["lm_head.weight"] = torch.zeros(TINY["vocab_size"], TINY["hidden_size"])
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    back = Qwen2.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, m.model.embed_tokens.weight)


def test_missing_shard_is_an_error(tmp_path):
    ours().save_pretrained(tmp_path, max_shard_size_bytes=40_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        Qwen2.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_value_error_naming_the_tensor(tmp_path, bad):
    """A checkpoint with a NaN / inf weight (a diverged run's) is refused at load, naming file and tensor: it made
    eval.py grade garbage with exit status 0 and training fail with a sampler traceback."""
    m = ours()
    with torch.no_grad():
        m.model.norm.weight[3] = bad
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        Qwen2.from_pretrained(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'model.safetensors'}: tensor 'model.norm.weight' has NaN or infinite")


@pytest.mark.parametrize("index", [b'{"weight_map": ["model.norm.weight"]}',
                                   b'{"weight_map": {"model.norm.weight": 1}}',
                                   b'\xff\xfe{"weight_map": {}}', b'[]', b'{"metadata": {}}'])
def test_bad_shard_index_is_a_value_error_naming_it(tmp_path, index):
    """A shard index that is not {"weight_map": {tensor: shard file}} (a list, a non-string file, not UTF-8) is
    a one-line ValueError naming it, not an AttributeError / TypeError / UnicodeDecodeError."""
    ours().save_pretrained(tmp_path, max_shard_size_bytes=40_000)
    (tmp_path / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(ValueError) as e:
        Qwen2.from_pretrained(tmp_path)
    assert type(e.value) is ValueError
    assert str(e.value).startswith(f"{tmp_path / 'model.safetensors.index.json'}: expected JSON with a 'weight_map'")


def test_shard_index_is_read_as_utf8(tmp_path):
    """The shard index is JSON, read as UTF-8 whatever the locale: shards with non-ASCII file names load."""
    m = ours(seed=5)
    m.save_pretrained(tmp_path, max_shard_size_bytes=40_000)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text(encoding="utf-8"))
    names = {f: f"modèle-{i}.safetensors" for i, f in enumerate(sorted(set(index["weight_map"].values())))}
    for old, new in names.items():
        (tmp_path / old).rename(tmp_path / new)
    index["weight_map"] = {k: names[f] for k, f in index["weight_map"].items()}
    path.write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")
    loaded = Qwen2.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("shard", [False, True])
@pytest.mark.parametrize("size", ["half", 10, 0])
def test_truncated_safetensors_is_a_value_error_naming_the_file(tmp_path, shard, size):
    """A truncated download (half a file, a few bytes, an empty file) is a one-line ValueError naming the
    file, not safetensors' own SafetensorError."""
    ours().save_pretrained(tmp_path, max_shard_size_bytes=40_000 if shard else 5_000_000_000)
    f = next(tmp_path.glob("model-00002-*.safetensors")) if shard else tmp_path / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2 if size == "half" else size)
    with pytest.raises(ValueError) as e:
        Qwen2.from_pretrained(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{f}: not a readable safetensors file ("), msg
    assert "\n" not in msg
    assert type(e.value) is ValueError and e.value.__cause__ is None


# ---------------------------------------------------------------------------------------------- skipping


@pytest.mark.parametrize("skip", [None, [False, True, False, False]])
def test_grad_checkpointing_gives_the_same_gradients(skip):
    """grad_checkpointing recomputes each layer in the backward: the same loss and gradients (left-padded batch,
    a skip mask), fewer tensors kept for the backward; forwards without gradient and the sampler are unchanged."""
    ids, am = left_pad(PROMPTS)
    runs = []
    for flag in (False, True):
        m = ours(seed=14).train()
        m.grad_checkpointing = flag
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = (torch.log_softmax(m(ids, skip, am.bool()), -1)[am.bool()][:, :7].sum())
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}, len(saved)))
        with torch.no_grad():
            assert torch.equal(m(ids, skip, am.bool()), ours(seed=14)(ids, skip, am.bool()))
    (l0, g0, n0), (l1, g1, n1) = runs
    assert torch.equal(l0, l1) and n1 < n0 / 2
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)
    m = ours(seed=14)
    m.grad_checkpointing = True
    assert torch.equal(m.generate(PROMPTS, max_new_tokens=5, temperature=0.0).tokens,
                       ours(seed=14).generate(PROMPTS, max_new_tokens=5, temperature=0.0).tokens)
    cache = m.new_cache(len(PROMPTS), ids.shape[1], skip)     # a cached forward with gradients on is not recomputed:
    chunks = torch.cat([m(ids[:, a:b], skip, am[:, a:b], cache=cache) for a, b in ((0, 4), (4, ids.shape[1]))], 1)
    real = am.bool()                                          # the second chunk attends to the cached first one
    torch.testing.assert_close(chunks[real], ours(seed=14)(ids, skip, am)[real], atol=1e-5, rtol=0)


def test_attention_and_mlp_modules_alone():
    """For a porter calling the blocks directly: without a residual, the attention block is the residual-added
    one minus x, and the MLP is HF's Qwen2MLP (down(silu(gate x) * up x)) on the same weights."""
    layer = ours(seed=3).model.layers[1]
    x = torch.randn(2, 5, TINY["hidden_size"], generator=torch.Generator().manual_seed(0))
    cos, sin = ours(seed=3).rope_table(5, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        a = layer.self_attn(x, cos, sin, None)
        torch.testing.assert_close(a + x, layer.self_attn(x, cos, sin, None, residual=x), rtol=0, atol=0)
        hf = oracle().models.qwen2.modeling_qwen2.Qwen2MLP(oracle().Qwen2Config(**TINY))
        hf.load_state_dict(layer.mlp.state_dict(), strict=True)
        torch.testing.assert_close(layer.mlp(x), hf(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.mlp(x) + x, layer.mlp(x, residual=x), rtol=0, atol=0)


@pytest.mark.parametrize("i", [0, 2])
def test_skipping_layer_equals_model_without_it(i):
    m = ours(seed=6)
    N = m.config.num_hidden_layers
    small = Qwen2(Qwen2Config(**{**TINY, "num_hidden_layers": N - 1}))
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith(f"model.layers.{i}.")}
    sd = {(f"model.layers.{int(k.split('.')[2]) - (int(k.split('.')[2]) > i)}." + k.split(".", 3)[3]
           if k.startswith("model.layers.") else k): v for k, v in sd.items()}
    small.load_state_dict(sd, strict=True)
    ids, am = left_pad(PROMPTS)
    skip = [j == i for j in range(N)]
    with torch.no_grad():
        a, b, full = m(ids, skip, am), small(ids, attention_mask=am), m(ids, attention_mask=am)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - full).abs().max() > 0.1                                    # skipping changes the output


def test_all_false_mask_equals_no_mask_and_mask_validation():
    m = ours()
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    with torch.no_grad():
        assert torch.equal(m(ids, [False] * 4), m(ids))
        assert torch.equal(m(ids, (True, False, False, True)), m(ids, torch.tensor([1, 0, 0, 1]).bool()))
        assert m(ids, logits_from=6).shape == (2, 0, TINY["vocab_size"])          # logits_from in 0..T
    with pytest.raises(ValueError, match="logits_from=7"):
        m(ids, logits_from=7)
    with pytest.raises(ValueError, match="skip_mask has 3 entries, expected num_hidden_layers=4"):
        m(ids, [False] * 3)
    with pytest.raises(ValueError, match="skip_mask"):
        m(ids, [0.5, 0, 0, 0])
    with pytest.raises(ValueError, match="attention_mask"):
        m(ids, attention_mask=torch.ones(2, 5))
    for bad, what in ((ids[0], r"\(6,\)"), (ids[None], r"\(1, 2, 6\)"), ([[1, 2]], "list")):   # 1-D ids: "not
        with pytest.raises(ValueError, match=f"input_ids {what}: expected a \\[B, T\\] tensor"):  # enough values
            m(bad)                                                                                   # to unpack"


def test_kv_cache_holds_active_layers_only():
    m = ours()
    full = m.new_cache(4, 32)
    nested = m.new_cache(4, 32, [False, True, True, False])
    assert full.k.shape == (4, 4, 2, 32, 16)
    assert nested.nbytes * 2 == full.nbytes


# ---------------------------------------------------------------------------------------------- sampler


def teacher_forced(m, out: GenerateOutput, skip, **kw):
    """Full (no cache) forward over prompt + completion -> log-probs of the completion and the logits."""
    seq = torch.cat([out.prompt_tokens, out.tokens], 1)
    am = torch.cat([out.prompt_mask, out.mask], 1)
    Tp = out.prompt_tokens.shape[1]
    with torch.no_grad():
        logits = m(seq, skip, am, logits_from=Tp - 1)[:, :-1]              # position t predicts token t
    return logprobs_from_logits(logits, out.tokens, **kw), logits


@pytest.mark.parametrize("path", ["plain", "fused", "packed"])
@pytest.mark.parametrize("skip", [None, [False, True, False, False], [False, True, True, False]])
def test_greedy_kv_cache_decoding_equals_full_forward(skip, path, monkeypatch):
    """Every decode path: the parameters, and the fused decode weights plain or prepacked (pack_for_decode)."""
    decode_path(monkeypatch, path)
    m = ours(seed=7)
    out = m.generate(PROMPTS, max_new_tokens=12, temperature=0.0, skip_mask=skip)
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (3, 12)
    assert out.mask.all() and out.logprobs.dtype == torch.float32
    assert torch.equal(out.prompt_tokens, left_pad(PROMPTS)[0]) and torch.equal(out.prompt_mask,
                                                                               left_pad(PROMPTS)[1].bool())
    lp, logits = teacher_forced(m, out, skip, temperature=0.0)
    assert torch.equal(logits.argmax(-1), out.tokens)
    torch.testing.assert_close(out.logprobs, lp, atol=1e-4, rtol=0)
    # temperature 0 records the log-probs of the temperature-1 distribution
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits.float(), -1).gather(
        -1, out.tokens[..., None]).squeeze(-1), atol=1e-4, rtol=0)
    # each row equals generating it alone (no padding at all)
    for b, p in enumerate(PROMPTS):
        alone = m.generate([p], max_new_tokens=12, temperature=0.0, skip_mask=skip)
        assert torch.equal(alone.tokens[0], out.tokens[b])


@pytest.mark.parametrize("path", ["plain", "packed"])
def test_greedy_rows_do_not_depend_on_the_batch_order_padding_or_pad_id(path, monkeypatch):
    """A row's greedy tokens and log-probs are the same whatever the other rows, their order, its left padding and
    the pad id, even a pad id that also occurs inside the prompts (77 below): the padding is the mask, never the
    token value. Breaks if prompt_mask is read from tokens != pad_token_id, or positions come from the columns."""
    decode_path(monkeypatch, path)
    m = ours(seed=13)
    prompts = [[5, 77, 3, 44, 9], [77, 7, 81], [90]]                                # [3] rows, 5 / 3 / 1 tokens
    base = m.generate(prompts, max_new_tokens=10, temperature=0.0, skip_mask=[False, True, False, False])
    long = list(range(1, 24))                                                       # 23 tokens: 18-22 more padding
    other = m.generate([prompts[2], long, prompts[0], prompts[1]], max_new_tokens=10, temperature=0.0,
                       skip_mask=[False, True, False, False], pad_token_id=77)
    rows = [2, 3, 0]                                                                # where prompts[0..2] went
    assert torch.equal(other.tokens[rows], base.tokens)
    torch.testing.assert_close(other.logprobs[rows], base.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("skip, temperature, top_p", [(None, 1.0, 1.0), ([False, False, True, False], 0.7, 0.9),
                                                      ([True, False, True, False], 1.3, 0.6)])
def test_sampled_logprobs_equal_teacher_forced(skip, temperature, top_p):
    m = ours(seed=8)
    eos = (3, 11)
    kw = dict(temperature=temperature, top_p=top_p, valid_vocab_size=90)
    out = m.generate(PROMPTS * 3, max_new_tokens=16, min_new_tokens=2, skip_mask=skip, eos_token_ids=eos,
                     pad_token_id=0, generator=torch.Generator().manual_seed(0), **kw)
    lp, _ = teacher_forced(m, out, skip, eos_token_ids=eos, min_new_tokens=2, **kw)
    torch.testing.assert_close(out.logprobs[out.mask], lp[out.mask], atol=1e-4, rtol=0)
    assert torch.isfinite(lp[out.mask]).all()
    assert (out.logprobs[~out.mask] == 0).all() and (out.tokens[~out.mask] == 0).all()
    # EOS kept in the mask, everything after it masked
    for b in range(out.tokens.shape[0]):
        row = out.tokens[b][out.mask[b]].tolist()
        assert all(t not in eos for t in row[:-1])
        if out.mask[b].sum() < out.tokens.shape[1]:
            assert row[-1] in eos
    if top_p < 1:   # the recorded distribution really is truncated: lower log-probs would have been sampled else
        plain, _ = teacher_forced(m, out, skip, temperature=temperature, valid_vocab_size=90)
        assert (lp[out.mask] >= plain[out.mask] - 1e-5).all() and (lp[out.mask] > plain[out.mask] + 1e-3).any()


def nucleus_by_hand(logits, temperature, top_p):
    """Independent of process_logits: softmax(logits / T) in float64, then the smallest set of most likely ids whose
    mass reaches top_p (an id is kept when the mass of the more likely ones is still below top_p), renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    sorted_p, order = p.sort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[(sorted_p.cumsum(-1) - sorted_p) < top_p]] = True
    return torch.where(keep, p, 0) / p[keep].sum()


def chi_square(samples, p) -> tuple[float, int]:
    """Pearson's statistic of integer samples against probabilities p (bins with < 5 expected draws pooled)."""
    n = len(samples)
    observed = torch.bincount(samples, minlength=len(p)).double()
    big = p * n >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([p[big] * n, (p[~big] * n).sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 0.8), (1.7, 0.95)])
@pytest.mark.parametrize("path", ["plain", "packed"])
def test_sampled_tokens_follow_the_distribution_by_hand(temperature, top_p, path, monkeypatch):
    """6,000 rows of one prompt, 2 new tokens each: the first token (prefill) and the second given the most common
    first (a KV-cache decode step) are drawn from softmax(logits / T) truncated to the top-p nucleus, computed here
    by hand from a plain forward. Pearson chi-square below dof + 6 sqrt(2 dof) + 10 (a fixed seed: 13-82 here, over
    12-80 dof; a sampler that ignored T scores 880-1,700, one that ignored top-p draws outside the nucleus)."""
    decode_path(monkeypatch, path)
    m = ours(seed=12)
    m.model.embed_tokens.weight.data *= 0.3                       # a flatter distribution: many ids in play
    prompt, n = PROMPTS[1], 6000
    out = m.generate([prompt] * n, max_new_tokens=2, temperature=temperature, top_p=top_p,
                     generator=torch.Generator().manual_seed(3))
    first = out.tokens[:, 0]
    t1 = int(first.mode().values)
    with torch.no_grad():
        logits = m(torch.tensor([prompt + [t1]]))[0]                                     # [T, V]
    for draws, p in ((first, nucleus_by_hand(logits[-2], temperature, top_p)),
                     (out.tokens[first == t1, 1], nucleus_by_hand(logits[-1], temperature, top_p))):
        assert (p[draws] > 0).all()                                                      # never outside the nucleus
        stat, dof = chi_square(draws, p)
        assert dof >= 3 and stat < dof + 6 * (2 * dof) ** 0.5 + 10, (stat, dof)


def test_same_seed_same_tokens():
    m = ours(seed=9)
    run = lambda s: m.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.95,
                               generator=torch.Generator().manual_seed(s))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_min_new_tokens_suppresses_eos_and_rows_stop():
    m = ours(seed=10)
    eos = tuple(range(0, 96, 2))                                         # half the vocabulary is EOS
    g = torch.Generator().manual_seed(0)
    free = m.generate(PROMPTS * 4, max_new_tokens=12, eos_token_ids=eos, pad_token_id=1, generator=g)
    assert free.tokens.shape[1] < 12                                     # every row stopped early -> Tn shrinks
    assert free.mask.sum(1).min() == 1
    lens = free.mask.sum(1)
    assert all(free.tokens[b, lens[b] - 1] in eos for b in range(12))
    assert (free.tokens[~free.mask] == 1).all()
    held = m.generate(PROMPTS * 4, max_new_tokens=12, min_new_tokens=6, eos_token_ids=eos, generator=g)
    assert held.mask[:, :6].all()
    assert not torch.isin(held.tokens[:, :5], torch.tensor(eos)).any()
    one = m.generate(PROMPTS * 4, max_new_tokens=3, min_new_tokens=1, eos_token_ids=eos, generator=g)
    assert not torch.isin(one.tokens[:, 0], torch.tensor(eos)).any()
    fixed = m.generate(PROMPTS, max_new_tokens=8, min_new_tokens=8, eos_token_ids=eos, generator=g)
    assert fixed.mask.all() and fixed.tokens.shape == (3, 8)
    assert not torch.isin(fixed.tokens, torch.tensor(eos)).any()


def test_masked_vocab_is_never_sampled():
    m = ours(seed=11)
    out = m.generate(PROMPTS, max_new_tokens=40, temperature=3.0, valid_vocab_size=20,
                     generator=torch.Generator().manual_seed(0))
    assert out.tokens.max() < 20
    assert len(out.tokens.unique()) > 5


def test_process_logits_golden_values():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()[None] + 3.0                                         # shift: softmax is invariant
    torch.testing.assert_close(process_logits(logits).exp()[0], p)
    # top-p keeps the smallest prefix of most likely ids whose mass reaches top_p, renormalised
    torch.testing.assert_close(process_logits(logits, top_p=0.8).exp()[0], torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(process_logits(logits, top_p=0.45).exp()[0], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(process_logits(logits, top_p=0.81).exp()[0],
                               torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    # temperature: logits [0, ln 2] at T = 0.5 -> [0, 2 ln 2] -> probs [1/5, 4/5]
    two = torch.tensor([[0.0, math.log(2.0)]])
    torch.testing.assert_close(process_logits(two, temperature=0.5).exp()[0], torch.tensor([0.2, 0.8]))
    torch.testing.assert_close(process_logits(two, temperature=0.0).exp()[0], torch.tensor([1 / 3, 2 / 3]))
    # vocab masking and banned ids renormalise over the rest
    torch.testing.assert_close(process_logits(logits, valid_vocab_size=2).exp()[0],
                               torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(process_logits(logits, banned_ids=torch.tensor([0])).exp()[0],
                               torch.tensor([0, 0.6, 0.3, 0.1]))
    # temperature before top-p: at T = 0.5 the probs are p^2 / sum(p^2) = [.685, .247, .062, .007], so top-p 0.6
    # keeps the first id only (on the T = 1 probs it would keep two); at T = 2, p^0.5 normalised, 0.8 keeps three
    torch.testing.assert_close(process_logits(logits, temperature=0.5, top_p=0.6).exp()[0],
                               torch.tensor([1.0, 0, 0, 0]))
    q = p.sqrt()[:3]
    torch.testing.assert_close(process_logits(logits, temperature=2.0, top_p=0.8).exp()[0],
                               torch.cat([q / q.sum(), torch.zeros(1)]))
    lp = logprobs_from_logits(logits[None].expand(1, 3, 4), torch.tensor([[1, 0, 2]]), top_p=0.8)
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.375), math.log(0.625), -math.inf]]))


def test_greedy_pick_is_the_first_maximum():
    """Greedy takes the first of tied maxima, as argmax does (on a 4-row, 151936-id row too: the real vocab)."""
    logp = torch.tensor([[-1.0, -0.5, -0.5, -2.0], [-0.1, -3.0, -0.1, -0.1]])
    assert qwen2.sample_from_logprobs(logp, 0.0).tolist() == [1, 0]
    big = torch.randn(4, 151936, generator=torch.Generator().manual_seed(0))
    big[:, 1000] = big[:, 90000] = 10.0
    assert qwen2.sample_from_logprobs(big, 0.0).tolist() == [1000] * 4


def test_generate_argument_errors():
    m = ours()
    with pytest.raises(ValueError, match="prompts"):
        m.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts"):
        m.generate([[1, 2], []], max_new_tokens=2)
    for bad in ([5, 17, 3], ["5 17 3"]):            # one prompt not in a list: "object of type 'int' has no len()"
        with pytest.raises(ValueError, match="prompts: expected a non-empty list of non-empty token-id lists"):
            m.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature >= 0"):
        m.generate([[1]], max_new_tokens=2, temperature=-0.5)
    for bad in (float("nan"), float("inf")):       # NaN sampled silently at temperature 1, inf uniformly
        with pytest.raises(ValueError, match="temperature >= 0"):
            m.generate([[1]], max_new_tokens=2, temperature=bad)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        m.generate([[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        m.generate([[1]], max_new_tokens=2, min_new_tokens=3)
    for kw in (dict(max_new_tokens=2.5), dict(max_new_tokens=None), dict(max_new_tokens="4"),
               dict(max_new_tokens=4, min_new_tokens=1.0), dict(max_new_tokens=True),   # True was 1 token
               dict(max_new_tokens=4, min_new_tokens=False)):
        with pytest.raises(TypeError, match=f"{list(kw)[-1]}=.*expected an int"):
            m.generate([[1]], **kw)
    for bad in ([[1, 96]], [[1, -1]]):              # -1 was an IndexError in the embedding
        with pytest.raises(ValueError, match="token ids"):
            m.generate(bad, max_new_tokens=2)
    for bad in ([[3], [1.5, 2]], [[3], [True]], [[3], [2 + 0j]]):     # 1.5 was silently read as token 1
        with pytest.raises(TypeError, match="prompts\\[1\\]: expected integer token ids"):
            m.generate(bad, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"eos_token_ids=5: expected a sequence of token ids, e.g. \(5,\)"):
        m.generate([[1]], max_new_tokens=2, eos_token_ids=5)
    for eos in ([-1], [3, 96]):                     # -1 silently banned id 95 before min_new_tokens
        with pytest.raises(ValueError, match=r"eos_token_ids=.*expected ids in \[0, 96\)"):
            m.generate([[1]], max_new_tokens=2, min_new_tokens=1, eos_token_ids=eos)
    with pytest.raises(ValueError, match="pad_token_id=-1"):
        m.generate([[1, 2], [3]], max_new_tokens=2, pad_token_id=-1)
    with pytest.raises(ValueError, match="pad_token_id=96"):
        m.generate([[1, 2], [3]], max_new_tokens=2, pad_token_id=96)
    for vv in (0, 97):
        with pytest.raises(ValueError, match=f"valid_vocab_size={vv}"):
            m.generate([[1]], max_new_tokens=2, valid_vocab_size=vv)
    with pytest.raises(ValueError, match="skip_mask"):
        m.generate([[1]], max_new_tokens=2, skip_mask=[True])
    for eos in (None, "3", b"\x03", 3.0):            # None was "'NoneType' object is not iterable"; bytes: not ids
        with pytest.raises(TypeError, match="eos_token_ids="):
            m.generate([[1]], max_new_tokens=2, eos_token_ids=eos)
    with pytest.raises(TypeError, match=r"eos_token_ids=\[True\]: expected integer token ids"):   # not id 1
        m.generate([[1]], max_new_tokens=2, eos_token_ids=[True])
    for eos in (np.int64(3), torch.tensor(3)):      # a bare id, as np / torch scalars too
        with pytest.raises(TypeError, match=r"expected a sequence of token ids, e.g."):
            m.generate([[1]], max_new_tokens=2, eos_token_ids=eos)
    with pytest.raises(TypeError, match=r"eos_token_ids=\[3.7\]: expected integer token ids"):   # was id 3
        m.generate([[1]], max_new_tokens=2, eos_token_ids=[3.7])
    for pad in (1.5, None):
        with pytest.raises(TypeError, match=f"pad_token_id={pad}: expected an int"):
            m.generate([[1, 2], [3]], max_new_tokens=2, pad_token_id=pad)
    with pytest.raises(TypeError, match="valid_vocab_size=50.5"):
        m.generate([[1]], max_new_tokens=2, valid_vocab_size=50.5)
    out = m.generate([[1]], max_new_tokens=2, eos_token_ids={np.int64(3), 4}, temperature=np.float32(0.5))
    assert out.tokens.shape[0] == 1                 # numpy ids and numbers, sets of ids: fine


@pytest.mark.parametrize("path", ["plain", "packed"])
def test_generate_runs_in_inference_mode_and_returns_ordinary_tensors(path, monkeypatch):
    """generate() samples under torch.inference_mode (no autograd bookkeeping per op) but returns ordinary tensors: a
    loss can save them for its backward and write into them, and the model (whose RoPE frequencies generate may
    have cached first) still trains. Inference tensors would fail each of these with a RuntimeError."""
    decode_path(monkeypatch, path)
    m, seen = ours(), []
    monkeypatch.setattr(qwen2, "sample_from_logprobs", lambda logp, *a, _f=qwen2.sample_from_logprobs:
                        seen.append(torch.is_inference_mode_enabled()) or _f(logp, *a))
    out = m.generate([[1, 2, 3], [4]], max_new_tokens=3)
    assert seen == [True] * 3
    assert not any(getattr(out, f).is_inference() for f in ("tokens", "mask", "logprobs", "prompt_tokens",
                                                             "prompt_mask"))
    w = torch.ones(2, requires_grad=True)
    (torch.where(out.mask, out.logprobs, 0.0) * w[:, None]).sum().backward()   # logprobs saved for the backward
    torch.testing.assert_close(w.grad, torch.where(out.mask, out.logprobs, 0.0).sum(1))
    out.tokens[:, 0] = 5                                                     # written in place
    m(torch.cat([out.prompt_tokens, out.tokens], 1)).logsumexp(-1).sum().backward()
    assert m.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_forward_refuses_out_of_range_ids_before_touching_the_cache():
    """An id outside [0, vocab) in forward (teacher forcing, a decode step) is a ValueError naming the range (was
    torch's "index out of range in self"), raised before a cache is appended to: it can be used again."""
    m = ours()
    for bad in ([[1, 96]], [[-1, 2]]):
        with pytest.raises(ValueError, match=r"input_ids: token ids must be in \[0, 96\), got -?\d+\.\.\d+"):
            m(torch.tensor(bad))
    cache = m.new_cache(1, 4)
    m(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="token ids must be in"):
        m(torch.tensor([[96]]), cache=cache)
    assert cache.length == 2 and cache.next_pos.tolist() == [2]
    step = m(torch.tensor([[3]]), cache=cache)[0, -1]
    torch.testing.assert_close(step, m(torch.tensor([[1, 2, 3]]))[0, -1], rtol=1e-5, atol=1e-5)


def test_logprobs_from_logits_refuses_tokens_of_another_shape():
    """tokens [B, T - 1] against logits [B, T, V] (the teacher-forcing off-by-one) were gathered from the first
    T - 1 positions without a word: gather only needs index.size(d) <= input.size(d)."""
    logits, tokens = torch.randn(2, 3, 10), torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits \(2, 3, 10\) and tokens \(2, 2\)"):
        logprobs_from_logits(logits, tokens)
    with pytest.raises(ValueError, match="top_p=0"):
        logprobs_from_logits(logits, torch.zeros(2, 3, dtype=torch.long), top_p=0)
    assert logprobs_from_logits(logits[0], tokens[0, :1].expand(3)).shape == (3,)    # [T, V] and [T] still work


@pytest.mark.parametrize("m", [0, 1, 2, 5, 9])     # 1: one banned position, the rest unbanned
def test_logprobs_from_logits_scores_each_position_once(m, monkeypatch):
    """With EOS banned before min_new_tokens = m each position's log-softmax is taken once, with or without the ban:
    fixed-length rollouts (m >= T) took every [T, V] log-softmax twice, the overwritten one held for the backward.
    The values are those of scoring each position on its own."""
    logits, tokens = torch.randn(2, 5, 10, dtype=torch.float64), torch.randint(0, 10, (2, 5))
    eos, kw = (3, 7), dict(temperature=0.7, top_p=0.9, valid_vocab_size=9)
    scored = []
    real = qwen2.process_logits
    monkeypatch.setattr(qwen2, "process_logits", lambda x, *a, **k: scored.append(x.shape[-2]) or real(x, *a, **k))
    got = logprobs_from_logits(logits, tokens, eos_token_ids=eos, min_new_tokens=m, **kw)
    assert sum(scored) == 5
    for t in range(5):
        banned = torch.tensor(eos) if t < m else None
        one = real(logits[:, t], banned_ids=banned, **kw).gather(-1, tokens[:, t, None])[:, 0]
        assert torch.equal(got[:, t], one)


def test_masked_attention_repeats_kv_off_the_cpu(monkeypatch):
    """GQA with a mask: K/V repeated per query head (what a CUDA device gets: its enable_gqa takes a mask only in the
    math kernel, [B, H, T, S] fp32 scores) gives enable_gqa's values and gradients; the CPU keeps enable_gqa."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2))
    bool_mask = qwen2.padded_causal_mask(torch.tensor([[False, True, True, True, True], [True] * 5]), 5, 0)
    for mask in (bool_mask, torch.zeros(2, 1, 5, 5, dtype=torch.float64).masked_fill(~bool_mask, float("-inf"))):
        outs = [qwen2.masked_attention(q, k, v, mask, repeat_kv=r) for r in (False, True)]
        grads = [torch.autograd.grad(o.square().sum(), (q, k, v)) for o in outs]
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    seen = []
    monkeypatch.setattr(qwen2.F, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask, enable_gqa: seen.append((k.shape[1], enable_gqa)))
    for dev in ("cpu", "meta"):                                            # meta: a device that is not the CPU
        qwen2.masked_attention(*(t.detach().to(dev) for t in (q, k, v)), bool_mask.to(dev))
    for r in (True, False):                                                # an explicit repeat_kv wins on the CPU
        qwen2.masked_attention(*(t.detach() for t in (q, k, v)), bool_mask, repeat_kv=r)
    assert seen == [(2, True), (6, False), (6, False), (2, True)]


def test_logprobs_from_logits_of_no_positions():
    """Zero positions ([B, 0, V], e.g. a batch with nothing to score) give [B, 0], with or without an EOS ban."""
    logits, tokens = torch.randn(2, 0, 10), torch.zeros(2, 0, dtype=torch.long)
    for kw in ({}, dict(eos_token_ids=(3,), min_new_tokens=2)):
        assert logprobs_from_logits(logits, tokens, **kw).shape == (2, 0)


def test_a_cpu_forward_keeps_enable_gqa(monkeypatch):
    """Attention leaves masked_attention's choice to the device: on the CPU a padded (masked) forward passes the
    unrepeated Hkv heads with enable_gqa (repeating K/V is for CUDA's memory-efficient kernel only)."""
    m = ours(seed=5)
    ids, am = left_pad(PROMPTS)
    seen, real = [], qwen2.F.scaled_dot_product_attention
    monkeypatch.setattr(qwen2.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((k.shape[1], kw.get("enable_gqa"))) or real(q, k, v, **kw))
    with torch.no_grad():
        m(ids, attention_mask=am)
    assert seen and set(seen) == {(m.config.num_key_value_heads, True)}


def test_chunked_prefill_with_padding_equals_full_forward():
    """The cache path with T > 1 after cached columns (padded_causal_mask with start > 0)."""
    m = ours(seed=12)
    ids, am = left_pad(PROMPTS)
    skip = [False, False, True, False]
    with torch.no_grad():
        full = m(ids, skip, am)
        cache = m.new_cache(3, ids.shape[1], skip)
        a = m(ids[:, :3], skip, am[:, :3], cache=cache)
        b = m(ids[:, 3:6], skip, am[:, 3:6], cache=cache)
        c = m(ids[:, 6:], skip, am[:, 6:], cache=cache)
    got = torch.cat([a, b, c], 1)
    real = am.bool()
    torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="overflow"):
        m(ids[:, :1], skip, cache=cache)
    with pytest.raises(ValueError, match="skip_mask differs"):
        m(ids[:, :1], None, cache=m.new_cache(3, 9, skip))
    with pytest.raises(ValueError, match="skip_mask differs"):                 # as many active layers, not the same
        m(ids[:, :1], [False, True, False, False], cache=m.new_cache(3, 9, skip))


def test_chunked_prefill_without_padding_equals_full_forward():
    """The cache path with T > 1 after cached columns and no padding: the plain causal chunk mask (tril(start))
    and positions from next_pos; with no attention_mask and with an all-ones one."""
    m = ours(seed=12)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    skip = [False, True, False, False]
    with torch.no_grad():
        full = m(ids, skip)
        for am in (None, torch.ones(2, 9, dtype=torch.long)):
            cache = m.new_cache(2, 9, skip)
            got = torch.cat([m(ids[:, a:b], skip, None if am is None else am[:, a:b], cache=cache)
                             for a, b in ((0, 4), (4, 7), (7, 9))], 1)
            assert not cache.has_padding
            torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_padded_causal_mask_matches_its_definition():
    """[b, 0, t, s] = key s at or before query start + t and not padding, or s is the query itself (a padding
    query attends to itself: no softmax row is empty, which some attention kernels turn into NaN)."""
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6, [False] * 3 + [True] * 3])
    for start in (0, 2, 5):
        T = 6 - start
        got = qwen2.padded_causal_mask(valid, T, start)
        want = torch.tensor([[[[(s <= start + t and bool(valid[b, s])) or s == start + t for s in range(6)]
                               for t in range(T)]] for b in range(3)])
        assert torch.equal(got, want), start
        assert got.any(-1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_has_hf_rounding(dtype):
    """HF Qwen2RMSNorm: normalise in fp32, cast to the input dtype, THEN multiply by the weight (bit-exact)."""
    g = torch.Generator().manual_seed(0)
    norm = qwen2.RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64, generator=g))
    norm.to(dtype)
    x = (3 * torch.randn(2, 5, 64, generator=g)).to(dtype)
    h = x.float()
    ref = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    with torch.no_grad():
        assert torch.equal(norm(x), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("theta", [1000.0, 10000.0])
def test_rope_table_equals_hf_rotary_embedding(dtype, theta):
    """cos/sin as HF's Qwen2RotaryEmbedding makes them (bit-exact): angles in fp32, rounded to the model dtype once
    at the end; our sin has its first half negated (RoPE as x * cos + roll(x, hd/2) * sin). Over the whole 4096-token
    context of Qwen2.5-Math, with its theta (10000) and the tiny config's."""
    hd = TINY["hidden_size"] // TINY["num_attention_heads"]
    cfg = {**TINY, "rope_theta": theta, "max_position_embeddings": 4096}
    cos, sin = ours(**cfg).rope_table(4096, dtype, torch.device("cpu"))          # [4096, 1, hd]
    rotary = oracle().models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(oracle().Qwen2Config(**cfg))
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=dtype), torch.arange(4096)[None])   # [1, 4096, hd]
    assert cos.dtype == sin.dtype == dtype
    assert torch.equal(cos[:, 0], ref_cos[0])
    assert torch.equal(sin[:, 0], torch.cat((-ref_sin[0, :, :hd // 2], ref_sin[0, :, hd // 2:]), -1))


NATIVE_BF16 = [pytest.param(False, id="bf16-in-fp32"),
               pytest.param(True, id="bf16-native", marks=pytest.mark.skipif(
                   not qwen2.native_bf16_matmul(), reason="this CPU has no bf16 matmul hardware"))]


@pytest.mark.parametrize("native", NATIVE_BF16)
def test_bf16_packed_decode_tracks_teacher_forced(native, monkeypatch):
    """bf16 prepacked decode (fused q|k|v and gate|up, packed matmuls: bf16 where the CPU has bf16 hardware, else
    fp32 on the bf16 values) vs a bf16 full forward."""
    decode_path(monkeypatch, "packed")
    monkeypatch.setattr(qwen2, "native_bf16_matmul", lambda: native)
    m = ours(seed=14).to(torch.bfloat16)
    out = m.generate(PROMPTS, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert qwen2._PACKED[m]["lm_head"].compute == (torch.bfloat16 if native else torch.float32)
    lp, _ = teacher_forced(m, out, None)
    assert (out.logprobs - lp).abs().max() < 0.1 and (out.logprobs - lp).abs().mean() < 0.03


@pytest.mark.parametrize("packed", [True, False])
def test_bf16_decode_in_fp32_rounds_like_a_bf16_matmul(monkeypatch, packed):
    """A bf16 DecodeLinear that runs in fp32 (no bf16 hardware) rounds x, W and b to bf16 first and its output
    back to bf16: it equals the fp32 product of the bf16-rounded operands, rounded once; prepacked or kept as
    W^T for torch.addmm."""
    monkeypatch.setattr(qwen2, "PACK_MIN_BYTES", 0 if packed else 2**62)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48)                                       # fp32 master weights (autocast's case)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) / 8)
        lin.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(3, 1, 64, generator=g)
    dl = qwen2.DecodeLinear((lin,), torch.bfloat16, 3, torch.float32)
    assert dl.packed == packed
    bf = lambda t: t.to(torch.bfloat16).float()                        # noqa: E731
    with torch.no_grad():
        ref = (bf(x) @ bf(lin.weight).T + bf(lin.bias)).to(torch.bfloat16)
        y = dl(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=2 ** -7)       # one bf16 ulp, or a cancellation's residue
    assert (y != ref).float().mean() < 0.05                             # unrounded operands: ~50 % differ


def test_decode_weights_are_prepacked_from_pack_min_bytes(monkeypatch):
    """DecodeLinear prepacks a fused matrix of at least PACK_MIN_BYTES and keeps a smaller one plain; a step that
    mixes both kinds still decodes what the full forward predicts."""
    m = ours(seed=16)
    if not m.pack_for_decode(m.new_cache(len(PROMPTS), 8, None)):
        pytest.skip("this torch build has no oneDNN weight packing (the plain decode path is used)")
    layer = qwen2._PACKED[m]["layers"][0]
    assert not any(w.packed for w in (layer.qkv, layer.o, layer.gate_up, layer.down))    # all < 1 MiB by default
    qwen2._PACKED.pop(m)
    decode_path(monkeypatch, "fused")
    monkeypatch.setattr(qwen2, "PACK_MIN_BYTES", 128 * 64 * 4)           # q|k|v is [128, 64] fp32: exactly this
    out = m.generate(PROMPTS, max_new_tokens=8, temperature=0)
    layer = qwen2._PACKED[m]["layers"][0]
    assert [w.packed for w in (layer.qkv, layer.o, layer.gate_up, layer.down)] == [True, False, True, False]
    lp, logits = teacher_forced(m, out, None, temperature=0.0)
    assert torch.equal(logits.argmax(-1), out.tokens)
    torch.testing.assert_close(out.logprobs, lp, atol=1e-4, rtol=0)


def test_packed_decode_weights_are_reused_until_the_weights_change(monkeypatch):
    """pack_for_decode keeps its packing across generate() calls while the weights are unchanged, and packs again
    after an in-place update (as an optimizer step does): stale packed weights would decode the old model."""
    decode_path(monkeypatch, "packed")
    m = ours(seed=15)
    if not m.pack_for_decode(m.new_cache(len(PROMPTS), 8, None)):
        pytest.skip("this torch build has no oneDNN weight packing (the plain decode path is used)")
    a = m.generate(PROMPTS, max_new_tokens=6, temperature=0)
    first = qwen2._PACKED[m]
    b = m.generate(PROMPTS, max_new_tokens=6, temperature=0)
    assert qwen2._PACKED[m] is first and torch.equal(a.tokens, b.tokens)
    assert qwen2.decode_packing(m) is first                                # the public view of the same
    qwen2.drop_decode_packing(m)
    assert qwen2.decode_packing(m) is None and m not in qwen2._PACKED
    c = m.generate(PROMPTS, max_new_tokens=6, temperature=0)              # packs anew: the same tokens
    assert qwen2.decode_packing(m) is not first and torch.equal(c.tokens, a.tokens)
    first = qwen2._PACKED[m]
    with torch.no_grad():                                                   # an "optimizer step" in place
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    packed = m.generate(PROMPTS, max_new_tokens=6, temperature=0)
    assert qwen2._PACKED[m] is not first
    monkeypatch.setattr(qwen2, "PACK_MIN_NEW_TOKENS", 10**9)               # the same step on the parameters
    plain = m.generate(PROMPTS, max_new_tokens=6, temperature=0)
    assert torch.equal(packed.tokens, plain.tokens) and not torch.equal(packed.tokens, a.tokens)
    copy.deepcopy(m)                                                        # the packing is not part of the model
    # writes that do not bump the version counter: a fused AdamW step, and writes through p.data (weight syncing)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)
    m(torch.tensor(PROMPTS[0])[None]).logsumexp(-1).sum().backward()
    for update in (opt.step, lambda: [p.data.mul_(-1.5) for p in m.parameters()]):
        monkeypatch.setattr(qwen2, "PACK_MIN_NEW_TOKENS", 1)
        before = m.generate(PROMPTS, max_new_tokens=6, temperature=0)       # packs (or reuses) the current weights
        update()
        packed = m.generate(PROMPTS, max_new_tokens=6, temperature=0)
        monkeypatch.setattr(qwen2, "PACK_MIN_NEW_TOKENS", 10**9)
        plain = m.generate(PROMPTS, max_new_tokens=6, temperature=0)
        assert torch.equal(packed.tokens, plain.tokens) and not torch.equal(packed.tokens, before.tokens)


def test_a_packing_serves_batches_of_any_size(monkeypatch):
    """The prepacked layout is a hint for a row count, valid for any: a packing made for 3 rows (packed for 16)
    serves 2, 5 and 1 rows (the smaller last batch of an evaluation or of a step's rollout chunks does not pack
    again); a lone row with no packing yet packs for 1 row, which the next batch of several rows replaces. Every
    one decodes what the parameters decode."""
    decode_path(monkeypatch, "packed")
    m = ours(seed=16)
    if not m.pack_for_decode(m.new_cache(len(PROMPTS), 8, None)):
        pytest.skip("this torch build has no oneDNN weight packing (the plain decode path is used)")
    assert qwen2.pack_rows(3) == qwen2.pack_rows(2) == 16 and qwen2.pack_rows(1) == 1
    first = qwen2.decode_packing(m)
    assert first["rows"] == 16

    def generate(prompts):
        monkeypatch.setattr(qwen2, "PACK_MIN_NEW_TOKENS", 1)
        packed = m.generate(prompts, max_new_tokens=5, temperature=0)
        monkeypatch.setattr(qwen2, "PACK_MIN_NEW_TOKENS", 10**9)
        plain = m.generate(prompts, max_new_tokens=5, temperature=0)
        assert torch.equal(packed.tokens, plain.tokens)
        torch.testing.assert_close(packed.logprobs, plain.logprobs, atol=1e-4, rtol=0)

    for prompts in (PROMPTS, PROMPTS[:2], PROMPTS + PROMPTS[:2], PROMPTS[1:2]):
        generate(prompts)
        assert qwen2.decode_packing(m) is first, len(prompts)
    qwen2.drop_decode_packing(m)
    generate(PROMPTS[1:2])
    lone = qwen2.decode_packing(m)
    assert lone["rows"] == 1
    generate(PROMPTS[:1])
    assert qwen2.decode_packing(m) is lone
    generate(PROMPTS[:2])
    assert qwen2.decode_packing(m)["rows"] == 16


def test_packing_is_dropped_by_writes_the_value_sample_misses(monkeypatch):
    """_weights_key samples 16 values per parameter; a write to other values must still drop the packing: in
    place through autograd (bumps the version counter), or by an optimizer step (a fused one bumps nothing)."""
    decode_path(monkeypatch, "packed")
    m = ours(seed=15)
    if not m.pack_for_decode(m.new_cache(len(PROMPTS), 8, None)):
        pytest.skip("this torch build has no oneDNN weight packing (the plain decode path is used)")

    def packed_equals_plain():
        monkeypatch.setattr(qwen2, "PACK_MIN_NEW_TOKENS", 1)
        packed = m.generate(PROMPTS, max_new_tokens=4, temperature=0)
        monkeypatch.setattr(qwen2, "PACK_MIN_NEW_TOKENS", 10**9)
        plain = m.generate(PROMPTS, max_new_tokens=4, temperature=0)
        assert torch.equal(packed.tokens, plain.tokens)
        torch.testing.assert_close(packed.logprobs, plain.logprobs, atol=1e-4, rtol=0)
        return plain.logprobs

    before = packed_equals_plain()
    W = m.lm_head.weight                  # [96, 64]: the sample reads flat ids 0, 384, ...; row 5 is 320..383
    sample = qwen2._weights_key(m)[1]
    with torch.no_grad():
        W[5].mul_(-20.0)
    assert torch.equal(qwen2._weights_key(m)[1], sample)
    after = packed_equals_plain()
    assert (after - before).abs().max() > 1e-3                              # the write shows in the log-probs
    opt = torch.optim.Adam([W], lr=1.0, fused=True)                          # moves row 5 only (zero grads elsewhere)
    W.grad = torch.zeros_like(W)
    W.grad[5] = 1.0
    version = W._version
    opt.step()
    assert torch.equal(qwen2._weights_key(m)[1], sample) and W._version == version
    assert (packed_equals_plain() - after).abs().max() > 1e-3


def test_packing_is_not_reused_across_dtypes_or_skip_masks(monkeypatch):
    """The packing made under bf16 autocast holds bf16 decode weights: a later fp32 call packs again. One packing
    serves every skip mask: its layers are kept by layer index, not by position among the active ones."""
    decode_path(monkeypatch, "packed")
    m = ours(seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.generate(PROMPTS, max_new_tokens=3, temperature=0)
    for skip in (None, [False, True, False, False]):                  # the first packs every layer in fp32
        out = m.generate(PROMPTS, max_new_tokens=6, temperature=0, skip_mask=skip)
        lp, logits = teacher_forced(m, out, skip, temperature=0.0)
        assert torch.equal(logits.argmax(-1), out.tokens), skip
        torch.testing.assert_close(out.logprobs, lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("native", NATIVE_BF16)
def test_bf16_decode_rounds_before_the_residual_add(native, monkeypatch):
    """residual + x W^T + b of a packed bf16 DecodeLinear rounds x W^T + b to bf16 before the add, as the model's
    own bf16 forward does (the fused oneDNN add would not); in fp32 the add is fused."""
    monkeypatch.setattr(qwen2, "PACK_MIN_BYTES", 0)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 64, generator=g) / 8)
        lin.bias.copy_(torch.randn(64, generator=g))
    x, res = torch.randn(3, 1, 64, generator=g), 4 * torch.randn(3, 1, 64, generator=g)
    for dtype in (torch.bfloat16, torch.float32):
        lin_d, x_d, res_d = lin.to(dtype), x.to(dtype), res.to(dtype)
        compute = torch.float32 if dtype == torch.bfloat16 and not native else dtype
        dl = qwen2.DecodeLinear((lin_d,), dtype, 3, compute)
        assert dl.packed
        with torch.no_grad():
            y, ref = dl(x_d, res_d), res_d + dl(x_d)
        assert y.dtype == dtype
        if dtype == torch.bfloat16:
            assert torch.equal(y, ref)
        else:
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


def test_bf16_model_tracks_fp32():
    m = ours(seed=13)
    mb = ours(seed=13).to(torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m(ids), mb(ids)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() < 0.05 * a.abs().max()
    out = mb.generate(PROMPTS, max_new_tokens=5, temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert out.logprobs.dtype == torch.float32 and torch.isfinite(out.logprobs).all()


@pytest.mark.parametrize("native", NATIVE_BF16)
@pytest.mark.parametrize("path", ["plain", "fused", "packed"])
def test_generate_under_autocast_caches_in_the_compute_dtype(path, native, monkeypatch):
    """fp32 master weights + bf16 autocast (the training loop's GPU path, here on CPU): the KV cache is bf16 and
    greedy decoding still equals the argmax of a full forward under the same autocast (packed: bf16 decode
    weights, fp32 residual stream, so the residual add is not fused into the matmul)."""
    decode_path(monkeypatch, path)
    monkeypatch.setattr(qwen2, "native_bf16_matmul", lambda: native)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2(cfg).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(2, 8)
        assert cache.k.dtype == torch.bfloat16
        # its RoPE table stays in the model dtype, as the full forward's (no bf16-rounded cos/sin)
        assert torch.equal(cache.cos, model.rope_table(8, torch.float32, torch.device("cpu"))[0])
        out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, temperature=0.0)
        for b, prompt in enumerate([[1, 2, 3], [4, 5]]):
            seq = torch.tensor([prompt + out.tokens[b, :3].tolist()])
            ref = model(seq)[0, len(prompt) - 1:].float().argmax(-1)
            assert ref.tolist() == out.tokens[b].tolist()
    assert model.new_cache(2, 8).k.dtype == torch.float32
