"""Regenerate the embedded English corpus and the byte-level BPE tokenizer.

The corpus shipped in this folder is the English prose of the Python 3.11
documentation, as packaged by Debian 12 (``python3.11-doc``, PSF License; see
``README.md`` and ``LICENSE-PSF.txt`` beside this file).  This script turns the
Sphinx HTML pages into plain-text documents, splits them deterministically into
train and validation documents, writes them as gzipped JSON lines and trains a
byte-level BPE tokenizer on the train split only.

Reproduce (offline except for the Debian archive)::

    python fira_dist/data/build.py --fetch            # apt-get download + dpkg-deb -x
    python fira_dist/data/build.py --source /usr/share/doc/python3.11/html

Outputs (all in ``--out``, default: this folder):

* ``corpus_train.jsonl.gz`` / ``corpus_validation.jsonl.gz``: one JSON object a
  line, ``{"text": str, "source": "<page>.html#<section>"}``.
* ``tokenizer.json`` + ``tokenizer_config.json``: loadable with
  ``transformers.PreTrainedTokenizerFast.from_pretrained(<folder>)`` or
  ``AutoTokenizer.from_pretrained(<folder>)``.
* ``LICENSE-PSF.txt``: the package's Debian copyright file (the PSF License
  Agreement and the licenses it lists), verbatim.

Everything is deterministic: files are read in sorted order, the split is a pure
function of the page path, the gzip headers carry no time stamp.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import logging
import os
import subprocess
import tempfile

logger = logging.getLogger("fira_dist.data.build")

HERE = os.path.dirname(os.path.abspath(__file__))
DEBIAN_PACKAGE = "python3.11-doc"
DEFAULT_SOURCE = "/usr/share/doc/python3.11/html"

# Folders of the documentation, in the order they are taken until the target
# size is reached: prose-heavy parts first, the C API reference last.
SECTIONS = ["tutorial", "faq", "howto", "reference", "using", "extending",
            "installing", "distributing", "library", "whatsnew", "c-api"]

SPECIAL_TOKENS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0, 1, 2, 3

_BLOCK = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "div",
          "section", "blockquote", "br", "dl", "ul", "ol", "figcaption",
          "caption", "td", "th", "tr"}


class _SphinxText(html.parser.HTMLParser):
    """Collects the paragraphs of the ``role="main"`` part of a Sphinx page.

    Code blocks, tables, API signatures, permalinks, section numbers and
    "Availability"/audit-hook boiler-plate are dropped.  ``sections`` is a list
    of ``(anchor, [paragraph, ...])``, split at ``<h2>`` headings; ``title`` is
    the ``<h1>`` text.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.in_main = False
        self.main_depth = 0
        self.skip_tag = None
        self.skip_depth = 0
        self.buf: list[str] = []
        self.prefix = ""
        self.heading = None
        self.title = ""
        self.sections: list[tuple[str, list[str]]] = [("intro", [])]
        self.section_id = "intro"
        self.pending_anchor = None

    @staticmethod
    def _skip(tag, attrs) -> bool:
        cls = attrs.get("class") or ""
        if tag in ("pre", "table", "script", "style", "img", "svg", "math"):
            return True
        if tag == "dt" and "sig" in cls.split():
            return True
        if tag == "div" and ("highlight" in cls or "math" in cls.split()):
            return True
        if tag == "p" and ("availability" in cls or "audit-hook" in cls):
            return True
        if tag == "span" and "section-number" in cls:
            return True
        if tag == "a" and "headerlink" in cls:
            return True
        return False

    def _flush(self):
        text = " ".join("".join(self.buf).split())
        self.buf = []
        if text:
            if self.heading == "h1" and not self.title:
                self.title = text
            self.sections[-1][1].append(self.prefix + text)
            self.prefix = ""

    def handle_starttag(self, tag, attrs_list):
        attrs = dict(attrs_list)
        if not self.in_main:
            if tag == "div" and attrs.get("role") == "main":
                self.in_main = True
                self.main_depth = 1
            return
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth += 1
            return
        if self._skip(tag, attrs):
            if tag not in ("img",):  # void element: nothing to skip
                self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "div":
            self.main_depth += 1
        if tag == "section" and attrs.get("id"):
            self.pending_anchor = attrs["id"]
        if tag in _BLOCK:
            self._flush()
        if tag == "h2":
            self.sections.append((self.pending_anchor or f"s{len(self.sections)}", []))
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.heading = tag
        if tag == "li":
            self.prefix = "- "

    def handle_endtag(self, tag):
        if not self.in_main:
            return
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in _BLOCK:
            self._flush()
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.heading = None
        if tag == "div":
            self.main_depth -= 1
            if self.main_depth == 0:
                self.in_main = False

    def handle_data(self, data):
        if self.in_main and self.skip_tag is None:
            self.buf.append(data)


def page_documents(path: str, relpath: str, min_chars: int = 200) -> list[dict]:
    """Documents of one HTML page: its introduction and each ``<h2>`` section.

    Returns a list of ``{"text", "source"}``; documents shorter than
    ``min_chars`` characters are dropped.
    """
    parser = _SphinxText()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    parser._flush()
    docs = []
    for anchor, paras in parser.sections:
        if anchor == "intro" and paras and paras[0] == parser.title and len(paras) == 1:
            continue
        text = "\n\n".join(paras).strip()
        if len(text) >= min_chars:
            docs.append({"text": text, "source": f"{relpath}#{anchor}"})
    return docs


def _page_key(relpath: str) -> str:
    return hashlib.sha1(relpath.encode()).hexdigest()


def collect(source: str, target_chars: int, val_fraction: float):
    """Reads pages in ``SECTIONS`` order until ``target_chars`` is reached.

    Returns ``(train_docs, validation_docs)``.  Validation takes whole pages
    (never a page's sections on both sides): pages in order of the SHA-1 of
    their path, each at most 2% of the corpus, until ``val_fraction`` of the
    characters is held out.
    """
    pages = []  # (relpath, docs)
    total = 0
    for sec in SECTIONS:
        files = sorted(glob.glob(os.path.join(source, sec, "**", "*.html"), recursive=True))
        for path in files:
            rel = os.path.relpath(path, source).replace(os.sep, "/")
            if rel.endswith("index.html") or rel.startswith("whatsnew/changelog"):
                continue  # tables of contents; the changelog is a list of issue titles
            docs = page_documents(path, rel)
            if not docs:
                continue
            pages.append((rel, docs))
            total += sum(len(d["text"]) for d in docs)
            if total >= target_chars:
                break
        if total >= target_chars:
            break
    logger.info("read %d pages, %d characters", len(pages), total)
    val_pages = set()
    val_chars = 0
    for rel, docs in sorted(pages, key=lambda p: _page_key(p[0])):
        n = sum(len(d["text"]) for d in docs)
        if val_chars >= val_fraction * total:
            break
        if n > 0.02 * total:
            continue
        val_pages.add(rel)
        val_chars += n
    train = [d for rel, docs in pages if rel not in val_pages for d in docs]
    val = [d for rel, docs in pages if rel in val_pages for d in docs]
    logger.info("train %d docs, validation %d docs (%d pages, %d chars)",
                len(train), len(val), len(val_pages), val_chars)
    return train, val


def write_jsonl_gz(path: str, docs: list[dict]):
    """Writes ``docs`` as gzipped JSON lines with a reproducible gzip header."""
    raw = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    with open(path, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(raw)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str):
    """Trains a byte-level BPE (GPT-2 style pre-tokenization, no normalizer).

    Special tokens: ``<pad>``=0, ``</s>``=1 (EOS, the document separator),
    ``<s>``=2, ``<unk>``=3.  Writes ``tokenizer.json`` and
    ``tokenizer_config.json`` into ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
        unk_token="<unk>", model_max_length=1_000_000_000, clean_up_tokenization_spaces=False)
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(tmp, name), "rb") as src:
                data = src.read()
            if name == "tokenizer_config.json":
                cfg = json.loads(data)
                cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
                data = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
            with open(os.path.join(out_dir, name), "wb") as dst:
                dst.write(data)
    logger.info("tokenizer: %d tokens", tok.get_vocab_size())


def copy_license(source: str, out_path: str):
    """Copies the Debian copyright file of the package (the Python license texts) verbatim.

    It lies at ``<source>/../../python3.11-doc/copyright`` (that is
    ``/usr/share/doc/python3.11-doc/copyright`` for the installed package).
    """
    path = os.path.normpath(os.path.join(source, "..", "..", DEBIAN_PACKAGE, "copyright"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"license file {path} of {DEBIAN_PACKAGE} is missing")
    with open(path, "rb") as src, open(out_path, "wb") as dst:
        dst.write(src.read())


def fetch(dest: str) -> str:
    """``apt-get download python3.11-doc`` and unpack it; returns the html folder."""
    subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=dest, check=True)
    debs = sorted(glob.glob(os.path.join(dest, f"{DEBIAN_PACKAGE}_*.deb")))
    if not debs:
        raise FileNotFoundError(f"apt-get download left no {DEBIAN_PACKAGE}_*.deb in {dest}")
    root = os.path.join(dest, "root")
    subprocess.run(["dpkg-deb", "-x", debs[-1], root], check=True)
    return os.path.join(root, DEFAULT_SOURCE.lstrip("/"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=None,
                   help=f"the html folder of {DEBIAN_PACKAGE} (default {DEFAULT_SOURCE})")
    p.add_argument("--fetch", action="store_true",
                   help=f"download {DEBIAN_PACKAGE} with apt-get into a temporary folder")
    p.add_argument("--out", default=HERE)
    p.add_argument("--target-mb", type=float, default=5.0,
                   help="uncompressed size of the corpus in MB (1e6 characters)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or DEFAULT_SOURCE
        if args.fetch:
            source = fetch(tmp)
        if not os.path.isfile(os.path.join(source, "tutorial", "index.html")):
            raise FileNotFoundError(
                f"--source {source!r} is not the html folder of {DEBIAN_PACKAGE} "
                f"(expected {source}/tutorial/index.html); use --fetch or "
                f"'apt-get install {DEBIAN_PACKAGE}'")
        train, val = collect(source, int(args.target_mb * 1e6), args.val_fraction)
        os.makedirs(args.out, exist_ok=True)
        write_jsonl_gz(os.path.join(args.out, "corpus_train.jsonl.gz"), train)
        write_jsonl_gz(os.path.join(args.out, "corpus_validation.jsonl.gz"), val)
        copy_license(source, os.path.join(args.out, "LICENSE-PSF.txt"))
    train_tokenizer([d["text"] for d in train], args.vocab_size, args.out)
    for name in sorted(os.listdir(args.out)):
        logger.info("%-28s %9d bytes", name, os.path.getsize(os.path.join(args.out, name)))


if __name__ == "__main__":
    main()
