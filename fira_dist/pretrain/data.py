"""Data layer of the pretraining entry point: text datasets, tokenizer, packing, sharding, resume.

Pipeline::

    tokenizer = load_tokenizer()                       # embedded 8192-token byte-level BPE
    train = get_batches(tokenizer, seq_len=256, micro_batch_size=8,
                        rank=rank, world_size=world_size, seed=0)
    for batch in train:                                # endless (epochs=None)
        batch["input_ids"]                             # LongTensor (micro_batch, seq_len)
        batch["labels"]                                # LongTensor (micro_batch, seq_len), == input_ids
        ...
    ckpt["data"] = train.state_dict()                  # resume: train.load_state_dict(ckpt["data"])
    val = get_eval_batches(tokenizer, seq_len=256, micro_batch_size=8, rank=rank, world_size=world_size)

Documents are tokenized without special tokens, each followed by EOS, concatenated
and cut into sequences of exactly ``seq_len`` tokens (the tail shorter than
``seq_len`` is dropped).  ``labels`` equals ``input_ids``: Hugging Face causal LMs
shift them internally, so each sequence gives ``seq_len - 1`` next-token
predictions.  There is no padding and no attention mask (all positions are real
tokens; attention crosses document boundaries, as in GPT/LLaMA-style packing).

Two loaders share one interface (``__iter__``, ``state_dict``, ``load_state_dict``,
``consumed_batches``):

* :class:`PackedBatchLoader` (map-style data: the embedded corpus, local files
  with ``streaming=False``).  Every rank packs the same global array of
  sequences; each epoch is a permutation of it drawn from ``(seed, epoch)``;
  global step ``g`` consumes the next ``world_size * micro_batch`` sequences of
  that permutation and rank ``r`` takes the ``r``-th block of ``micro_batch``.
  Ranks are therefore disjoint, together they cover the epoch (minus fewer than
  ``world_size * micro_batch`` sequences), all ranks run the same number of
  steps, and the state (epoch, global sequences consumed) is the same on every
  rank: rank 0 may save it alone, and it can be loaded with another
  ``world_size`` or ``micro_batch``.
* :class:`StreamingBatchLoader` (``streaming=True``, e.g. ``allenai/c4`` from
  the hub).  Documents are shuffled with a buffer (seed, epoch) and dealt to
  ranks with ``datasets.distributed.split_dataset_by_node`` (disjoint documents
  per rank); each rank packs its own documents.  The state is per rank: the
  document index and token offset where the next sequence starts.  Resuming
  re-reads (without tokenizing) the documents before that point.

Both resume exactly: a loader restored from ``state_dict()`` after ``k`` batches
yields the same batches as an uninterrupted loader from batch ``k`` on.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import itertools
import logging
import os
from collections import deque
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_DIR", "SPLITS", "embedded_data_files", "load_tokenizer", "load_text_dataset",
    "resolve_data_files", "pack_documents", "tokenize_and_pack", "PackedBatchLoader",
    "StreamingBatchLoader", "get_batches", "get_eval_batches",
]

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
SPLITS = ("train", "validation")
_EMBEDDED_FILES = {"train": "corpus_train.jsonl.gz", "validation": "corpus_validation.jsonl.gz"}
_EMBEDDED_NAMES = ("embedded", "fira_dist", "python-docs")

# file extension (after removing a compression suffix) -> datasets builder
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
             ".ndjson": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")
_ACCEPTED = ("a file, a directory, a glob (e.g. 'corpus/*.jsonl.gz'), a list of these, or a dict "
             "{split: ...}; file types " + ", ".join(sorted(_BUILDERS)) + " optionally compressed ("
             + ", ".join(_COMPRESSION) + ")")


# --------------------------------------------------------------------------- files

def embedded_data_files(split: str = "train") -> str:
    """Path of the embedded corpus file of ``split`` ("train" or "validation")."""
    if split not in _EMBEDDED_FILES:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    path = os.path.join(EMBEDDED_DIR, _EMBEDDED_FILES[split])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embedded corpus file {path} is missing: regenerate it with "
                                "'python fira_dist/data/build.py --fetch'")
    return path


def _builder_of(path: str) -> str:
    name = path.lower()
    for c in _COMPRESSION:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    ext = os.path.splitext(name)[1]
    if ext not in _BUILDERS:
        raise ValueError(f"data file {path!r} has an unsupported type {ext or '(none)'!r}: accepted "
                         f"are {', '.join(sorted(_BUILDERS))}, optionally compressed ({', '.join(_COMPRESSION)})")
    return _BUILDERS[ext]


def _supported(path: str) -> bool:
    try:
        _builder_of(path)
        return True
    except ValueError:
        return False


def resolve_data_files(data, split: str = "train") -> tuple[str, list[str]]:
    """Resolves ``data`` into ``(builder, sorted file list)``.

    ``data``: a file, a directory (its supported files, recursively), a glob
    (``**`` allowed), a list of these, or a dict ``{split: any of these}``.
    ``builder`` is the ``datasets`` builder name ("text", "json", "parquet",
    "csv" or "arrow").  Raises ``FileNotFoundError`` / ``ValueError`` naming the
    value and what is accepted.
    """
    if isinstance(data, dict):
        if split not in data:
            raise ValueError(f"data dict has no entry for split {split!r} (keys: {sorted(data)})")
        data = data[split]
    specs = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not specs:
        raise ValueError(f"data {data!r} is empty: accepted is {_ACCEPTED}")
    files: list[str] = []
    for spec in specs:
        spec = os.fspath(spec)
        if any(ch in spec for ch in "*?["):
            found = sorted(p for p in _glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"data glob {spec!r} matched no files: accepted is {_ACCEPTED}")
        elif os.path.isdir(spec):
            found = sorted(p for p in _glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                           if os.path.isfile(p) and _supported(p))
            if not found:
                raise FileNotFoundError(f"data directory {spec!r} holds no supported files: "
                                        f"accepted is {_ACCEPTED}")
        elif os.path.isfile(spec):
            found = [spec]
        else:
            raise FileNotFoundError(f"data path {spec!r} does not exist: accepted is {_ACCEPTED}")
        files.extend(found)
    builders = {_builder_of(p) for p in files}
    if len(builders) > 1:
        raise ValueError(f"data {data!r} mixes file types ({', '.join(sorted(builders))}): "
                         "give files of one type")
    return builders.pop(), files


# --------------------------------------------------------------------------- tokenizer

def load_tokenizer(name_or_path: Optional[str] = None, **kwargs):
    """A ``transformers`` fast tokenizer with an EOS token.

    ``None`` (or "embedded"): the byte-level BPE shipped in ``fira_dist/data``
    (8192 tokens; ``<pad>``=0, ``</s>``=1 EOS, ``<s>``=2, ``<unk>``=3).  A
    folder or a ``tokenizer.json`` path: loaded from there.  Any other name goes
    to ``AutoTokenizer.from_pretrained`` (e.g. "t5-base" as in the papers; needs
    the hub or a local HF cache).  A tokenizer without a pad token gets
    ``pad_token = eos_token``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name_or_path is None or name_or_path in _EMBEDDED_NAMES:
        path = os.path.join(EMBEDDED_DIR, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"embedded tokenizer {path} is missing: regenerate it with "
                                    "'python fira_dist/data/build.py --fetch'")
        tok = PreTrainedTokenizerFast.from_pretrained(EMBEDDED_DIR, **kwargs)
    elif os.path.isfile(name_or_path) and name_or_path.endswith(".json"):
        tok = PreTrainedTokenizerFast(tokenizer_file=name_or_path, clean_up_tokenization_spaces=False,
                                      **kwargs)
        if tok.eos_token is None and "</s>" in tok.get_vocab():
            tok.eos_token = "</s>"
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        except Exception as e:  # offline, unknown name, ...
            raise OSError(f"could not load tokenizer {name_or_path!r} ({type(e).__name__}: {e}); "
                          "accepted: None for the embedded tokenizer, a folder with tokenizer.json, "
                          "a tokenizer.json path, or a Hugging Face hub name (needs the network or "
                          "a local cache)") from e
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token: packing needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha1(backend.to_str().encode()).hexdigest()
    from datasets.fingerprint import Hasher
    return Hasher.hash(tokenizer)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens), each followed by EOS."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [x + [eos] for x in ids]


# --------------------------------------------------------------------------- datasets

def _holdout_mask(indices: Sequence[int], fraction: float, seed: int) -> list[bool]:
    out = []
    for i in indices:
        h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "little") / 2.0 ** 64 < fraction)
    return out


def load_text_dataset(data=None, dataset: Optional[str] = None, *, streaming: bool = False,
                      split: str = "train", dataset_config: Optional[str] = None,
                      text_field: str = "text", sample_by: str = "line",
                      validation_fraction: Optional[float] = None, holdout_seed: int = 0,
                      cache_dir: Optional[str] = None):
    """A Hugging Face ``datasets`` dataset of documents for ``split``.

    Sources (``data`` and ``dataset`` are exclusive):

    * neither: the embedded corpus (``fira_dist/data/corpus_{split}.jsonl.gz``).
    * ``data``: local files, see :func:`resolve_data_files`; loaded with the
      "text" (one document per line; ``sample_by="paragraph"``/``"document"``
      for other cuts), "json", "parquet", "csv" or "arrow" builder.  The files
      are those of ``split``; give a dict ``{"train": ..., "validation": ...}``
      for both, or ``validation_fraction`` to hold out that share of the
      documents (a hash of the document index and ``holdout_seed``) as
      "validation" and keep the rest as "train".
    * ``dataset``: a hub name such as "allenai/c4" (config ``dataset_config``,
      default "en" for C4), a folder written by ``save_to_disk``, or "embedded".

    Returns a ``datasets.Dataset`` (``streaming=False``) or
    ``datasets.IterableDataset`` with a string column ``text_field``.
    """
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if data is not None and dataset is not None:
        raise ValueError("give either data (local files) or dataset (hub name), not both")
    if validation_fraction is not None and not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")

    if data is None and (dataset is None or dataset in _EMBEDDED_NAMES):
        builder, files = "json", [embedded_data_files(split)]
        validation_fraction = None
    elif data is not None:
        file_split = "train" if (validation_fraction is not None and not isinstance(data, dict)) else split
        builder, files = resolve_data_files(data, file_split)
    else:
        return _load_named(dataset, split, streaming, dataset_config, text_field, cache_dir)

    kwargs = {"sample_by": sample_by} if builder == "text" else {}
    logger.info("loading %d %s file(s) for split %s (streaming=%s)", len(files), builder, split, streaming)
    ds = datasets.load_dataset(builder, data_files={"train": files}, split="train",
                               streaming=streaming, cache_dir=cache_dir, **kwargs)
    if validation_fraction is not None:
        keep_val = split == "validation"
        ds = ds.filter(lambda _ex, idx: [m == keep_val for m in
                                         _holdout_mask(idx, validation_fraction, holdout_seed)],
                       with_indices=True, batched=True)
    _check_text_field(ds, text_field, f"data {data!r}" if data is not None else "the embedded corpus")
    return ds


def _check_text_field(ds, text_field: str, what: str):
    cols = getattr(ds, "column_names", None)
    if cols is not None and text_field not in cols:
        raise ValueError(f"{what} has no column {text_field!r} (columns: {cols}); "
                         "pass text_field=")


def _load_named(dataset: str, split: str, streaming: bool, dataset_config, text_field, cache_dir):
    import datasets

    if os.path.isdir(dataset):
        ds = datasets.load_from_disk(dataset)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset folder {dataset!r} has no split {split!r} (has {list(ds)})")
            ds = ds[split]
        if streaming:
            ds = ds.to_iterable_dataset()
        _check_text_field(ds, text_field, f"dataset {dataset!r}")
        return ds
    if dataset_config is None and dataset in ("allenai/c4", "c4"):
        dataset_config = "en"
    try:
        ds = datasets.load_dataset(dataset, dataset_config, split=split, streaming=streaming,
                                   cache_dir=cache_dir)
    except Exception as e:
        raise RuntimeError(
            f"could not load dataset {dataset!r} (config {dataset_config!r}, split {split!r}): "
            f"{type(e).__name__}: {e}. Without the Hugging Face hub use data=PATH_OR_GLOB "
            "(local files) or neither data nor dataset (the embedded corpus)") from e
    _check_text_field(ds, text_field, f"dataset {dataset!r}")
    return ds


# --------------------------------------------------------------------------- packing

def pack_documents(token_lists: Iterable[Sequence[int]], seq_len: int) -> np.ndarray:
    """Concatenates token lists (each already ending in EOS) and cuts them.

    Returns an array of shape ``(n_sequences, seq_len)``; the last
    ``total % seq_len`` tokens are dropped.
    """
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def tokenize_and_pack(ds, tokenizer, seq_len: int, *, text_field: str = "text",
                      shuffle_documents: bool = True, seed: int = 0, num_proc: Optional[int] = None,
                      map_batch_size: int = 1000) -> np.ndarray:
    """Tokenizes a map-style dataset and packs it: array ``(n_sequences, seq_len)``.

    ``ds`` is a ``datasets.Dataset`` with column ``text_field`` (or a list of
    strings).  Documents are permuted with ``seed`` first (so neighbours in a
    sequence come from unrelated documents), then tokenized (``datasets.map``,
    cached by fingerprint of data + tokenizer), each followed by EOS, then
    concatenated and cut into ``seq_len`` tokens (the tail is dropped).  The
    dtype is uint16 when the vocabulary fits, else int32.
    """
    import datasets
    from datasets.fingerprint import Hasher

    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    if isinstance(ds, (list, tuple)):
        ds = datasets.Dataset.from_dict({text_field: list(ds)})
    if text_field not in ds.column_names:
        raise ValueError(f"dataset has no column {text_field!r} (columns: {ds.column_names})")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    if shuffle_documents and len(ds) > 1:
        ds = ds.shuffle(seed=seed)
    fp = Hasher.hash([ds._fingerprint, _tokenizer_hash(tokenizer), text_field, "eos-append-v1"])

    def encode(batch):
        return {"ids": _encode(tokenizer, batch[text_field])}

    tokenized = ds.map(encode, batched=True, batch_size=map_batch_size, num_proc=num_proc,
                       remove_columns=ds.column_names, new_fingerprint=fp,
                       desc="tokenizing", load_from_cache_file=True)
    col = tokenized.data.column("ids").combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    n = len(flat) // seq_len
    out = flat[: n * seq_len].astype(dtype, copy=False).reshape(n, seq_len)
    logger.info("packed %d documents, %d tokens into %d sequences of %d (%d tokens dropped)",
                len(ds), len(flat), n, seq_len, len(flat) - n * seq_len)
    return out


def _to_batch(rows: np.ndarray) -> dict:
    ids = torch.from_numpy(np.ascontiguousarray(rows).astype(np.int64, copy=False))
    return {"input_ids": ids, "labels": ids.clone()}


def _dist_rank_world(rank, world_size) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        rank = 0 if rank is None else rank
        world_size = 1 if world_size is None else world_size
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    return rank, world_size


# --------------------------------------------------------------------------- loaders

class PackedBatchLoader:
    """Micro-batches of one data-parallel rank from a packed array of sequences.

    ``sequences``: array ``(n_sequences, seq_len)`` (from :func:`tokenize_and_pack`),
    the same on every rank.  Each epoch ``e`` orders it by a permutation drawn
    from ``(seed, e)`` (identity when ``shuffle=False``).  Global step ``g``
    takes the next ``world_size * micro_batch_size`` sequences of that order and
    rank ``r`` gets block ``r``.  With ``drop_last=False`` the last, partial
    global step is split evenly (``floor(rest / world_size)`` sequences a rank),
    so every rank still runs the same number of steps.

    Iteration yields ``{"input_ids": LongTensor (b, seq_len), "labels": same}``
    with ``b = micro_batch_size`` (smaller only in that last partial step).
    ``epochs=None`` iterates forever.  Iterating continues from the current
    state (see :meth:`state_dict`); with ``restart_on_iter=True`` (evaluation)
    every ``iter()`` starts from the beginning.
    """

    kind = "packed"

    def __init__(self, sequences: np.ndarray, micro_batch_size: int, *, rank: Optional[int] = 0,
                 world_size: Optional[int] = 1, seed: int = 0, shuffle: bool = True,
                 epochs: Optional[int] = None, drop_last: bool = True, restart_on_iter: bool = False):
        if sequences.ndim != 2 or len(sequences) == 0:
            raise ValueError(f"sequences must be a non-empty (n, seq_len) array, got shape {sequences.shape}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if epochs is not None and epochs <= 0:
            raise ValueError(f"epochs must be None or > 0, got {epochs}")
        self.sequences = sequences
        self.micro_batch_size = int(micro_batch_size)
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        self.seed, self.shuffle, self.epochs = int(seed), bool(shuffle), epochs
        self.drop_last, self.restart_on_iter = bool(drop_last), bool(restart_on_iter)
        if self.global_batch_size > len(sequences) and drop_last:
            raise ValueError(f"{len(sequences)} sequences are fewer than one global batch "
                             f"(world_size {self.world_size} x micro_batch {self.micro_batch_size})")
        self.epoch = 0
        self.samples_in_epoch = 0  # global sequences consumed in the current epoch
        self.consumed_batches = 0  # micro-batches yielded by this loader (this rank)
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def seq_len(self) -> int:
        return self.sequences.shape[1]

    @property
    def num_sequences(self) -> int:
        return self.sequences.shape[0]

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (from the start of an epoch)."""
        full, rest = divmod(self.num_sequences, self.global_batch_size)
        return full + (0 if self.drop_last or rest < self.world_size else 1)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_sequences)
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order_cache = (epoch, rng.permutation(self.num_sequences))
        return self._order_cache[1]

    def _next_block(self) -> Optional[tuple[int, int]]:
        """``(start, size)`` of this rank's block at the current global position, or None at epoch end."""
        rest = self.num_sequences - self.samples_in_epoch
        if rest >= self.global_batch_size:
            return self.samples_in_epoch + self.rank * self.micro_batch_size, self.micro_batch_size
        if self.drop_last or rest < self.world_size:
            return None
        per = rest // self.world_size
        return self.samples_in_epoch + self.rank * per, per

    def _finished(self) -> bool:
        return self.epochs is not None and self.epoch >= self.epochs

    def reset(self):
        """Back to the first batch of epoch 0."""
        self.epoch, self.samples_in_epoch, self.consumed_batches = 0, 0, 0

    def __iter__(self) -> Iterator[dict]:
        if self.restart_on_iter or self._finished():
            self.reset()
        while not self._finished():
            block = self._next_block()
            if block is None:
                self.epoch += 1
                self.samples_in_epoch = 0
                continue
            start, size = block
            idx = self._order(self.epoch)[start:start + size]
            step = self.global_batch_size if size == self.micro_batch_size else size * self.world_size
            self.samples_in_epoch = min(self.samples_in_epoch + step, self.num_sequences)
            self.consumed_batches += 1
            yield _to_batch(self.sequences[idx])

    def state_dict(self) -> dict:
        """JSON-serialisable position; identical on every rank (rank 0 may save it alone)."""
        return {"kind": self.kind, "epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch,
                "consumed_batches": self.consumed_batches, "seed": self.seed, "shuffle": self.shuffle,
                "num_sequences": self.num_sequences, "seq_len": self.seq_len,
                "world_size": self.world_size, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: Union[dict, Sequence[dict]]):
        """Restores a :meth:`state_dict` (a list of per-rank states is accepted too).

        The data (``num_sequences``, ``seq_len``), ``seed`` and ``shuffle`` must
        match; ``world_size`` and ``micro_batch_size`` may differ, since the state
        counts global sequences: the run continues where the global order stopped.
        """
        if isinstance(state, (list, tuple)):
            state = state[min(self.rank, len(state) - 1)]
        if state.get("kind") != self.kind:
            raise ValueError(f"state of kind {state.get('kind')!r} cannot be loaded into a {self.kind} loader")
        for key, mine in (("num_sequences", self.num_sequences), ("seq_len", self.seq_len),
                          ("seed", self.seed), ("shuffle", self.shuffle)):
            if state[key] != mine:
                raise ValueError(f"data state mismatch: saved {key}={state[key]!r}, this loader has {mine!r}")
        if (state["world_size"], state["micro_batch_size"]) != (self.world_size, self.micro_batch_size):
            logger.info("resuming data from world_size %d x micro_batch %d on world_size %d x micro_batch %d",
                        state["world_size"], state["micro_batch_size"], self.world_size, self.micro_batch_size)
        self.epoch = int(state["epoch"])
        self.samples_in_epoch = int(state["samples_in_epoch"])
        self.consumed_batches = int(state["consumed_batches"])


class StreamingBatchLoader:
    """Micro-batches of one rank packed on the fly from a stream of documents.

    ``docs``: a ``datasets.IterableDataset`` (or ``Dataset``, turned into one)
    with a string column ``text_field``.  For each epoch ``e`` the stream is
    shuffled with a buffer of ``shuffle_buffer`` documents (seed ``seed``, epoch
    ``e``; 0 turns shuffling off) and dealt to ranks with
    ``datasets.distributed.split_dataset_by_node``: whole shards when their
    number divides ``world_size``, else every ``world_size``-th document.  This
    rank's documents are tokenized ``tokenize_batch`` at a time, each followed
    by EOS, concatenated and cut into ``seq_len`` tokens.

    Yields ``{"input_ids": LongTensor (micro_batch, seq_len), "labels": same}``.
    ``epochs=None`` iterates forever (stop by step count: ranks may hold
    different numbers of tokens, so a finite stream can end on one rank first).
    The state is per rank: ``(epoch, doc, offset)`` where the next sequence
    starts; :meth:`load_state_dict` accepts this rank's state or the list of
    all ranks' states.
    """

    kind = "streaming"

    def __init__(self, docs, tokenizer, seq_len: int, micro_batch_size: int, *,
                 rank: Optional[int] = 0, world_size: Optional[int] = 1, seed: int = 0,
                 shuffle_buffer: int = 10_000, text_field: str = "text", epochs: Optional[int] = None,
                 tokenize_batch: int = 64, restart_on_iter: bool = False):
        import datasets

        if seq_len <= 0 or micro_batch_size <= 0:
            raise ValueError(f"seq_len and micro_batch_size must be > 0, got {seq_len}, {micro_batch_size}")
        if isinstance(docs, datasets.Dataset):
            docs = docs.to_iterable_dataset()
        if not isinstance(docs, datasets.IterableDataset):
            raise TypeError(f"docs must be a datasets IterableDataset or Dataset, got {type(docs).__name__}")
        self.docs, self.tokenizer = docs, tokenizer
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        self.seed, self.shuffle_buffer, self.text_field = int(seed), int(shuffle_buffer), text_field
        self.epochs, self.tokenize_batch, self.restart_on_iter = epochs, int(tokenize_batch), restart_on_iter
        self.reset()

    def reset(self):
        """Back to the first batch of epoch 0."""
        self.epoch, self.doc, self.offset, self.consumed_batches = 0, 0, 0, 0

    def _rank_stream(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        ds = self.docs
        if self.shuffle_buffer > 0:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(epoch)
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        return ds

    def _texts(self, epoch: int, start_doc: int) -> Iterator[str]:
        for i, ex in enumerate(itertools.islice(iter(self._rank_stream(epoch)), start_doc, None)):
            if self.text_field not in ex:
                raise KeyError(f"document {start_doc + i} has no field {self.text_field!r} "
                               f"(fields: {sorted(ex)}); pass text_field=")
            yield ex[self.text_field]

    def _sequences(self, epoch: int, start_doc: int, start_offset: int):
        """Yields ``(sequence, (doc, offset) after it)`` for one epoch from a position."""
        segs: deque = deque()  # [doc index, offset of arr[0] in the doc, token array]
        avail = 0
        next_doc = start_doc
        texts = self._texts(epoch, start_doc)
        exhausted = False
        while True:
            while avail < self.seq_len and not exhausted:
                chunk = list(itertools.islice(texts, self.tokenize_batch))
                if not chunk:
                    exhausted = True
                    break
                for ids in _encode(self.tokenizer, chunk):
                    off = start_offset if next_doc == start_doc else 0
                    arr = np.asarray(ids[off:], dtype=np.int64)
                    if len(arr):
                        segs.append([next_doc, off, arr])
                        avail += len(arr)
                    next_doc += 1
            if avail < self.seq_len:
                return
            parts, need = [], self.seq_len
            while need:
                d, off, arr = segs[0]
                take = min(need, len(arr))
                parts.append(arr[:take])
                need -= take
                if take == len(arr):
                    segs.popleft()
                else:
                    segs[0] = [d, off + take, arr[take:]]
            avail -= self.seq_len
            pos = (segs[0][0], segs[0][1]) if segs else (next_doc, 0)
            yield np.concatenate(parts), pos

    def _finished(self) -> bool:
        return self.epochs is not None and self.epoch >= self.epochs

    def __iter__(self) -> Iterator[dict]:
        if self.restart_on_iter or self._finished():
            self.reset()
        while not self._finished():
            rows, from_start, yielded = [], (self.doc, self.offset) == (0, 0), 0
            for seq, pos in self._sequences(self.epoch, self.doc, self.offset):
                rows.append(seq)
                if len(rows) == self.micro_batch_size:
                    self.doc, self.offset = pos
                    self.consumed_batches += 1
                    yielded += 1
                    yield _to_batch(np.stack(rows))
                    rows = []
            if from_start and yielded == 0:
                raise RuntimeError(
                    f"rank {self.rank}'s share of the documents holds less than one micro-batch "
                    f"({self.micro_batch_size} x {self.seq_len} tokens): use more data, a smaller "
                    "micro_batch_size or seq_len, or fewer ranks")
            # end of this rank's stream for the epoch (a partial batch is dropped)
            self.epoch += 1
            self.doc, self.offset = 0, 0

    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank (save every rank's, e.g. via all_gather_object)."""
        return {"kind": self.kind, "epoch": self.epoch, "doc": self.doc, "offset": self.offset,
                "consumed_batches": self.consumed_batches, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "rank": self.rank, "world_size": self.world_size,
                "seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: Union[dict, Sequence[dict]]):
        """Restores this rank's :meth:`state_dict` (or picks it from a list of all ranks' states).

        ``world_size``, ``seed``, ``shuffle_buffer`` and ``seq_len`` must match
        (each rank's document stream depends on them).
        """
        if isinstance(state, (list, tuple)):
            if len(state) != self.world_size:
                raise ValueError(f"got {len(state)} rank states for world_size {self.world_size}")
            state = state[self.rank]
        if state.get("kind") != self.kind:
            raise ValueError(f"state of kind {state.get('kind')!r} cannot be loaded into a {self.kind} loader")
        for key, mine in (("world_size", self.world_size), ("rank", self.rank), ("seed", self.seed),
                          ("shuffle_buffer", self.shuffle_buffer), ("seq_len", self.seq_len)):
            if state[key] != mine:
                raise ValueError(f"data state mismatch: saved {key}={state[key]!r}, this loader has {mine!r}")
        self.epoch, self.doc, self.offset = int(state["epoch"]), int(state["doc"]), int(state["offset"])
        self.consumed_batches = int(state["consumed_batches"])


# --------------------------------------------------------------------------- entry points

def get_batches(tokenizer, *, seq_len: int = 256, micro_batch_size: int = 8, data=None,
                dataset: Optional[str] = None, streaming: bool = False, split: str = "train",
                rank: Optional[int] = None, world_size: Optional[int] = None, seed: int = 0,
                shuffle: Optional[bool] = None, epochs: Optional[int] = None, drop_last: bool = True,
                restart_on_iter: bool = False, text_field: str = "text", sample_by: str = "line",
                dataset_config: Optional[str] = None, validation_fraction: Optional[float] = None,
                num_proc: Optional[int] = None, shuffle_buffer: int = 10_000,
                barrier: Optional[Callable[[], None]] = None, max_documents: Optional[int] = None,
                cache_dir: Optional[str] = None):
    """Loader of packed micro-batches for one data-parallel rank.

    Each batch is ``{"input_ids": LongTensor (micro_batch_size, seq_len),
    "labels": LongTensor (micro_batch_size, seq_len)}`` (``labels`` equals
    ``input_ids``; HF causal LMs shift internally).  One optimizer step over
    ``world_size`` ranks and ``grad_accum`` micro-steps sees
    ``world_size * grad_accum * micro_batch_size * seq_len`` tokens.

    Data: see :func:`load_text_dataset` (``data`` local files, ``dataset`` hub
    name, neither = embedded corpus).  ``streaming=False`` gives a
    :class:`PackedBatchLoader` (whole dataset tokenized up front, sequence-level
    shuffle per epoch, rank-independent state); ``streaming=True`` a
    :class:`StreamingBatchLoader` (documents dealt to ranks, per-rank state).
    ``rank``/``world_size`` default to ``torch.distributed``'s (0/1 without it).
    ``shuffle`` defaults to ``split == "train"``; ``epochs=None`` is endless.
    ``barrier``: optional callable (e.g. ``torch.distributed.barrier``) so
    that rank 0 tokenizes first and the other ranks read its ``datasets``
    cache.  ``max_documents`` keeps only the first documents (quick tests).
    """
    rank, world_size = _dist_rank_world(rank, world_size)
    if shuffle is None:
        shuffle = split == "train"
    ds = load_text_dataset(data, dataset, streaming=streaming, split=split, dataset_config=dataset_config,
                           text_field=text_field, sample_by=sample_by,
                           validation_fraction=validation_fraction, cache_dir=cache_dir)
    if max_documents is not None:
        ds = ds.take(max_documents) if streaming else ds.select(range(min(max_documents, len(ds))))
    if streaming:
        return StreamingBatchLoader(ds, tokenizer, seq_len, micro_batch_size, rank=rank,
                                    world_size=world_size, seed=seed,
                                    shuffle_buffer=shuffle_buffer if shuffle else 0,
                                    text_field=text_field, epochs=epochs, restart_on_iter=restart_on_iter)
    if barrier is not None and rank != 0:
        barrier()
    seqs = tokenize_and_pack(ds, tokenizer, seq_len, text_field=text_field, shuffle_documents=shuffle,
                             seed=seed, num_proc=num_proc)
    if barrier is not None and rank == 0:
        barrier()
    return PackedBatchLoader(seqs, micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                             shuffle=shuffle, epochs=epochs, drop_last=drop_last,
                             restart_on_iter=restart_on_iter)


def get_eval_batches(tokenizer, *, seq_len: int = 256, micro_batch_size: int = 8,
                     max_documents: Optional[int] = None, **kwargs):
    """Validation loader for perplexity: ``split="validation"``, one pass, no shuffle.

    Same batches as :func:`get_batches` (``input_ids``/``labels`` of shape
    ``(b, seq_len)``).  Non-streaming: every rank gets the same number of
    batches, disjoint, covering all but fewer than ``world_size`` sequences (the
    last batch may be smaller than ``micro_batch_size``); each ``iter()``
    restarts from the first batch.  Perplexity = ``exp(mean token loss)``;
    weight each batch's mean loss by its ``b * (seq_len - 1)`` predictions.
    Streaming sources (C4): one pass whose length may differ between ranks,
    so cap it with ``itertools.islice(loader, n_batches)``.
    """
    kwargs.setdefault("split", "validation")
    kwargs.setdefault("shuffle", False)
    kwargs.setdefault("epochs", 1)
    kwargs.setdefault("drop_last", False)
    kwargs.setdefault("restart_on_iter", True)
    return get_batches(tokenizer, seq_len=seq_len, micro_batch_size=micro_batch_size,
                       max_documents=max_documents, **kwargs)
