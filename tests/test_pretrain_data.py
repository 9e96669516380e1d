"""Tests of the pretraining model configs (fira_dist.models) and data layer
(fira_dist.pretrain.data, the embedded corpus and tokenizer in fira_dist/data)."""

import gzip
import itertools
import json
import os
import re
import time

import numpy as np
import pytest
import torch

from fira_dist.pretrain import data as D
from fira_dist import models as M


# ----------------------------------------------------------------------------- configs

def test_param_counts_match_published_sizes():
    # GaLore's torchrun_main.py logs sum(p.numel() for p in model.parameters()): every
    # parameter, i.e. the 32000-row input embedding AND the untied LM head included.
    # Those are the sizes the papers quote ("60M" is 58.07M counted that way, "130M" 134.1M).
    assert M.count_params("llama_60m") == 58_073_600
    assert M.count_params("llama_130m") == 134_105_856
    assert abs(M.count_params("llama_350m") / 350e6 - 1) < 0.06
    assert abs(M.count_params("llama_1b") / 1.34e9 - 1) < 0.01
    assert abs(M.count_params("llama_7b") / 6.74e9 - 1) < 0.01  # LLaMA-7B: 6.74B


def test_configs_carry_galore_values():
    c = M.get_model_config("llama_60m")
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) == (512, 1376, 8, 8)
    assert (c.vocab_size, c.max_position_embeddings, c.rms_norm_eps) == (32000, 1024, 1e-6)
    assert c.tie_word_embeddings is False
    c = M.get_model_config("llama_1b")
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) == (2048, 5461, 32, 24)
    c = M.get_model_config("llama_7b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.max_position_embeddings) == (4096, 11008, 32, 2048)
    for name in ("llama_9m", "llama_20m", "llama_35m", "llama_71m", "llama_250m", "llama_350m", "llama_3b",
                 "llama_tiny", "llama_demo"):
        assert M.get_model_config(name).num_hidden_layers > 0
    assert M.get_model_config("60m").hidden_size == 512
    assert M.get_model_config("llama_tiny", vocab_size=8192).vocab_size == 8192
    assert 2e6 < M.count_params("llama_demo") < 8e6


def test_fira_hyperparameters():
    f = M.MODEL_CONFIGS["llama_60m"].fira
    assert (f.lr, f.rank, f.update_proj_gap, f.alpha, f.seq_len, f.total_batch_size, f.source) == \
        (0.01, 128, 200, 0.25, 256, 512, "paper")
    assert [M.MODEL_CONFIGS[n].fira.rank for n in ("llama_60m", "llama_130m", "llama_350m", "llama_1b")] == \
        [128, 256, 256, 512]
    assert M.MODEL_CONFIGS["llama_1b"].fira.alpha == 0.0625
    f7 = M.MODEL_CONFIGS["llama_7b"].fira
    assert (f7.rank, f7.lr, f7.update_proj_gap, f7.alpha, f7.source) == (64, 0.005, 500, 0.0625, "paper")
    assert M.MODEL_CONFIGS["llama_20m"].fira.source == "analogy"
    assert M.MODEL_CONFIGS["llama_60m"].fira.tokens_per_step == 131072


def test_meta_build_7b_takes_seconds():
    t = time.perf_counter()
    model = M.build_model(M.get_model_config("llama_7b"), device="meta", dtype="bf16")
    elapsed = time.perf_counter() - t
    assert elapsed < 10, elapsed
    params = list(model.parameters())
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in params)
    assert sum(p.numel() for p in params) == 6_738_415_616


def test_unknown_name_lists_accepted():
    with pytest.raises(ValueError) as e:
        M.get_model_config("llama_5m")
    assert "llama_5m" in str(e.value) and "llama_60m" in str(e.value) and "llama_7b" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        M.get_model_config("/no/such/nope.json")


def test_spec_validation():
    with pytest.raises(ValueError, match="divisible"):
        M.LlamaSpec("bad", 100, 200, 3, 2, fira=M.MODEL_CONFIGS["llama_tiny"].fira)
    with pytest.raises(ValueError, match="rank"):
        M.LlamaSpec("bad", 64, 128, 4, 2, fira=M.MODEL_CONFIGS["llama_60m"].fira)


def test_galore_style_config_json(tmp_path):
    raw = {"architectures": ["LLaMAForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
           "hidden_size": 512, "intermediate_size": 1376, "initializer_range": 0.02,
           "max_sequence_length": 1024, "model_type": "llama", "num_attention_heads": 8,
           "num_hidden_layers": 8, "pad_token_id": -1, "rms_norm_eps": 1e-06, "use_cache": True,
           "vocab_size": 32000}
    path = tmp_path / "llama_60m.json"
    path.write_text(json.dumps(raw))
    c = M.get_model_config(str(path))
    assert c.max_position_embeddings == 1024 and c.pad_token_id is None
    assert M.count_params(c) == 58_073_600


# ----------------------------------------------------------------------------- corpus

def _docs(split):
    with gzip.open(D.embedded_data_files(split), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_corpus_present_real_english_and_small():
    train, val = _docs("train"), _docs("validation")
    chars = sum(len(d["text"]) for d in train + val)
    assert 2e6 <= chars <= 6e6
    shipped = sum(os.path.getsize(os.path.join(D.EMBEDDED_DIR, f)) for f in os.listdir(D.EMBEDDED_DIR))
    assert shipped < 5e6
    text = " ".join(d["text"] for d in train[::10])
    words = re.findall(r"[A-Za-z']+", text.lower())
    common = {"the", "of", "and", "to", "a", "is", "in", "that", "for", "it", "be", "are", "this"}
    assert sum(w in common for w in words) / len(words) > 0.15  # function words of English prose
    assert sum(c.isascii() for c in text) / len(text) > 0.98
    n_val = sum(len(d["text"]) for d in val)
    assert len(val) >= 50 and 0.03 * chars < n_val < 0.1 * chars  # ~5% held out
    for name in ("README.md", "LICENSE-PSF.txt", "build.py", "tokenizer.json"):
        assert os.path.isfile(os.path.join(D.EMBEDDED_DIR, name))


def test_corpus_split_disjoint():
    train, val = _docs("train"), _docs("validation")
    assert not {d["text"] for d in train} & {d["text"] for d in val}
    pages = lambda docs: {d["source"].split("#")[0] for d in docs}  # noqa: E731
    assert not pages(train) & pages(val)


# ----------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tok():
    return D.load_tokenizer()


def test_tokenizer_roundtrip(tok):
    assert len(tok) == 8192 and tok.eos_token_id == 1 and tok.pad_token_id == 0
    samples = [d["text"] for d in _docs("validation")[:20]]
    samples += ["naïve café — 東京 🙂\n\n  indented\ttab", "", "x" * 1000]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
    # ~4 characters per token on English prose
    s = samples[0]
    assert len(s) / len(tok(s, add_special_tokens=False)["input_ids"]) > 3


def test_tokenizer_from_json_path_and_bad_name():
    t = D.load_tokenizer(os.path.join(D.EMBEDDED_DIR, "tokenizer.json"))
    assert len(t) == 8192 and t.eos_token_id == 1
    with pytest.raises(OSError, match="nonexistent"):
        D.load_tokenizer("/nonexistent/tok")


# ----------------------------------------------------------------------------- packing

def test_pack_documents_shapes():
    out = D.pack_documents([[5, 6, 1], [7, 1], [8, 9, 10, 1]], 4)
    assert out.shape == (2, 4) and out.tolist() == [[5, 6, 1, 7], [1, 8, 9, 10]]


def test_tokenize_and_pack_is_concatenation(tok):
    texts = [d["text"] for d in _docs("validation")[:10]]
    seqs = D.tokenize_and_pack(texts, tok, 32, shuffle_documents=False)
    stream = [t for s in texts for t in tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert seqs.shape == (len(stream) // 32, 32)
    assert seqs.reshape(-1).tolist() == stream[: seqs.size]


def test_get_batches_shapes(tok):
    loader = D.get_batches(tok, seq_len=64, micro_batch_size=4, split="validation", max_documents=30,
                           rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert int(batch["input_ids"].max()) < len(tok)
    assert (batch["input_ids"] == tok.eos_token_id).any()  # document separators


def test_tiny_model_forward_on_batch(tok):
    cfg = M.get_model_config("llama_tiny", tokenizer=tok)
    model = M.build_model(cfg, seed=0)
    batch = next(iter(D.get_batches(tok, seq_len=32, micro_batch_size=2, split="validation",
                                    max_documents=5, rank=0, world_size=1)))
    loss = model(**batch).loss
    assert torch.isfinite(loss) and abs(loss.item() - np.log(len(tok))) < 1.5


# ----------------------------------------------------------------------------- sharding

def _ids(batch):
    return batch["input_ids"][:, 0].tolist()


def _rank_epoch(seqs, rank, world, mb, **kw):
    loader = D.PackedBatchLoader(seqs, mb, rank=rank, world_size=world, epochs=1, **kw)
    return [_ids(b) for b in loader]


def test_packed_rank_shards_disjoint_and_covering():
    n, world, mb = 103, 3, 4
    seqs = np.arange(n)[:, None].repeat(8, axis=1)  # row i is all i: the row id is its first token
    per_rank = [_rank_epoch(seqs, r, world, mb, seed=7) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # same number of steps on every rank
    flat = [i for p in per_rank for b in p for i in b]
    assert len(flat) == len(set(flat))  # disjoint
    assert len(flat) == n - n % (world * mb)  # covering all but the last partial global batch
    # eval layout: nothing dropped but fewer than world_size sequences, same step count
    per_rank = [_rank_epoch(seqs, r, world, mb, shuffle=False, drop_last=False) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    flat = [i for p in per_rank for b in p for i in b]
    assert len(flat) == len(set(flat)) and len(flat) >= n - world + 1


def test_streaming_rank_shards_disjoint_and_covering(tok):
    docs = D.load_text_dataset(split="validation", streaming=True)
    world = 3
    seen = []
    for r in range(world):
        loader = D.StreamingBatchLoader(docs, tok, 64, 2, rank=r, world_size=world, seed=3, shuffle_buffer=50)
        seen.append([ex["source"] for ex in loader._rank_stream(0)])
    flat = [s for p in seen for s in p]
    assert len(flat) == len(set(flat)) == len(_docs("validation"))
    b = next(iter(D.StreamingBatchLoader(docs, tok, 64, 2, rank=1, world_size=world)))
    assert b["input_ids"].shape == (2, 64)


def test_seed_determinism(tok):
    mk = lambda seed: D.get_batches(tok, seq_len=32, micro_batch_size=2, split="validation",  # noqa: E731
                                    max_documents=40, seed=seed, rank=0, world_size=1, shuffle=True)
    a, b, c = (list(itertools.islice(mk(s), 3)) for s in (0, 0, 1))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


# ----------------------------------------------------------------------------- resume

def _same(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(xs, ys))


def test_packed_resume_identical_across_epochs(tok):
    kw = dict(seq_len=32, micro_batch_size=3, split="validation", max_documents=12, seed=5,
              rank=1, world_size=2, shuffle=True)
    ref = D.get_batches(tok, **kw)
    per_epoch = len(ref)
    k, m = per_epoch - 2, 6  # crosses the epoch boundary after resuming
    ref_batches = list(itertools.islice(iter(ref), k + m))
    run = D.get_batches(tok, **kw)
    it = iter(run)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(run.state_dict()))
    assert state["consumed_batches"] == k
    resumed = D.get_batches(tok, **kw)
    resumed.load_state_dict(state)
    assert _same(list(itertools.islice(iter(resumed), m)), ref_batches[k:])


def test_packed_resume_with_other_world_size():
    seqs = np.arange(200)[:, None].repeat(4, axis=1)
    ref = [[_ids(b) for b in itertools.islice(iter(D.PackedBatchLoader(seqs, 2, rank=r, world_size=2, seed=1)), 10)]
           for r in range(2)]
    run = D.PackedBatchLoader(seqs, 2, rank=0, world_size=2, seed=1)
    list(itertools.islice(iter(run), 4))
    one = D.PackedBatchLoader(seqs, 4, rank=0, world_size=1, seed=1)
    one.load_state_dict(run.state_dict())
    got = [_ids(b) for b in itertools.islice(iter(one), 3)]
    assert got == [ref[0][s] + ref[1][s] for s in range(4, 7)]


def test_streaming_resume_identical(tok):
    docs = D.load_text_dataset(split="validation", streaming=True).take(30)
    kw = dict(rank=1, world_size=2, seed=2, shuffle_buffer=16)
    ref = D.StreamingBatchLoader(docs, tok, 48, 3, **kw)
    it = iter(ref)
    first = [next(it) for _ in range(5)]
    n_epoch = 5 + sum(1 for _ in itertools.takewhile(lambda _: ref.epoch == 0, it))
    ref = D.StreamingBatchLoader(docs, tok, 48, 3, **kw)
    ref_batches = list(itertools.islice(iter(ref), n_epoch + 4))
    assert _same(ref_batches[:5], first)
    for k in (3, n_epoch - 1):
        run = D.StreamingBatchLoader(docs, tok, 48, 3, **kw)
        it = iter(run)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(run.state_dict()))
        resumed = D.StreamingBatchLoader(docs, tok, 48, 3, **kw)
        resumed.load_state_dict([{}, state])  # list of per-rank states: picks its own
        assert _same(list(itertools.islice(iter(resumed), 4)), ref_batches[k:k + 4])


def test_eval_loader_restarts_and_is_equal_across_ranks(tok):
    loaders = [D.get_eval_batches(tok, seq_len=64, micro_batch_size=4, max_documents=20, rank=r, world_size=2)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) > 0
    a, b = list(loaders[0]), list(loaders[0])
    assert _same(a, b) and len(a) == len(loaders[0])


# ----------------------------------------------------------------------------- errors and local files

def test_bad_paths_name_value_and_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no/such/dir.*accepted"):
        D.load_text_dataset(data="no/such/dir")
    with pytest.raises(FileNotFoundError, match=r"\*\.jsonl.*matched no files"):
        D.load_text_dataset(data=str(tmp_path / "*.jsonl"))
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(ValueError, match=r"a\.docx.*unsupported"):
        D.load_text_dataset(data=str(tmp_path / "a.docx"))
    (tmp_path / "b.txt").write_text("x\n")
    (tmp_path / "c.json").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="mixes"):
        D.load_text_dataset(data=[str(tmp_path / "b.txt"), str(tmp_path / "c.json")])
    with pytest.raises(ValueError, match="validation"):
        D.load_text_dataset(data={"train": str(tmp_path / "b.txt")}, split="validation")
    with pytest.raises(ValueError, match="split"):
        D.load_text_dataset(split="test")


def test_local_text_files_and_holdout(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text("".join(f"document {i}-{j} about nothing\n" for j in range(40)))
    pattern = str(tmp_path / "*.txt")
    ds = D.load_text_dataset(data=pattern)
    assert len(ds) == 120
    tr = D.load_text_dataset(data=pattern, split="train", validation_fraction=0.2)
    va = D.load_text_dataset(data=pattern, split="validation", validation_fraction=0.2)
    assert len(tr) + len(va) == 120 and 5 < len(va) < 45
    assert not set(tr["text"]) & set(va["text"])
    assert D.load_text_dataset(data=str(tmp_path), split="train").num_rows == 120  # a directory
