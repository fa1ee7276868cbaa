"""WordNet 3.0 noun supersenses with a local pretrained encoder (offline): 26-way text classification.

Data: WordNet's ``data.noun`` (Debian: ``apt-get install wordnet-base`` puts it in
``/usr/share/wordnet``; NLTK keeps the same file in ``<nltk_data>/corpora/wordnet``). Each
synset line reads::

    00001930 03 n 01 physical_entity 0 007 @ 00001740 n 0000 ... | an entity that has physical existence

offset, lexicographer file number (03..28: the 26 noun supersenses ``noun.Tops`` ..
``noun.time``), ``n``, the word count (2 hex digits), that many ``word lex_id`` pairs, pointers,
then ``|`` and the gloss. Example text: first lemma (underscores to spaces) + ``": "`` + the gloss
without its quoted usage examples; label: lexicographer file number - 3. The offset of a line is
its byte position in the file, which this loader checks, so a truncated or altered file is
refused rather than silently mislabelled.

Split: a permutation by ``seed`` of all synsets (82,115 in WordNet 3.0); the first ``test_size``
are the test set, the next ``train_size`` the training set (``null``: all the rest).

Model: the encoder (default: the packaged all-MiniLM-L6-v2) with MEAN pooling over the attended
tokens, as that model was trained, and a fresh ``nn.Linear(hidden, 26)`` named ``classifier``:
the head a mask keeps whole is ``classifier.weight`` and ``classifier.bias`` (``hidden x 26 + 26``
entries; 10,010 for MiniLM). BERT's pooler (CLS -> dense -> tanh) is not part of this model: it
was not trained for these sentence embeddings.

Batches: items are unpadded token ids; :func:`collate` pads a batch to its longest example only
(no all-padding columns) and builds the additive attention mask; ``Task.lengths`` lets the
trainer group examples of similar length into a batch (:mod:`sparsecomm.app.batching`). Items:
``({"input_ids", "token_type_ids": (B, L) int64, "attention_mask": (B, 1, 1, L) float32},
labels (B,) int64)``; the model returns (B, 26) float32 logits.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .common import Task, cross_entropy
from .glue import additive_attention_mask, local_model, quiet

SUPERSENSES = ("Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event",
               "feeling", "food", "group", "location", "motive", "object", "person", "phenomenon", "plant",
               "possession", "process", "quantity", "relation", "shape", "state", "substance", "time")
FIRST_LEXFILE = 3  # noun.Tops; noun.time is 28
DEBIAN_DIR = "/usr/share/wordnet"
FIX = (f"install it (Debian/Ubuntu: `apt-get install wordnet-base`, which puts it in {DEBIAN_DIR}; or NLTK: "
       f"`python -m nltk.downloader wordnet` and unzip corpora/wordnet.zip) and set task.data_dir to the folder "
       f"holding data.noun")
_QUOTED = re.compile(r'"[^"]*"')


def nltk_dirs() -> list[Path]:
    """Where NLTK keeps ``corpora/wordnet``: $NLTK_DATA, then its default search path."""
    roots = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    roots += [str(Path.home() / "nltk_data"), "/usr/share/nltk_data", "/usr/local/share/nltk_data",
              "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]
    return [Path(r) / "corpora" / "wordnet" for r in roots]


def find_data_noun(data_dir=None) -> Path:
    """``data_dir/data.noun`` (or ``data_dir/dict/data.noun``); with ``data_dir`` null, Debian's
    folder, then NLTK's. Raises FileNotFoundError naming where it looked and the fix."""
    return find_data_file(data_dir, "data.noun")


def find_data_file(data_dir, filename: str) -> Path:
    """``data_dir/<filename>`` (or ``data_dir/dict/<filename>``) of WordNet's database; with
    ``data_dir`` null, Debian's folder, then NLTK's. Raises FileNotFoundError naming where it
    looked and the fix."""
    if data_dir is not None and str(data_dir).strip() not in ("", "???"):
        root = Path(data_dir).expanduser()
        candidates = [root / filename, root / "dict" / filename]
    else:
        candidates = [Path(DEBIAN_DIR) / filename] + [d / filename for d in nltk_dirs()]
    for c in candidates:
        if c.is_file():
            return c
    where = ", ".join(str(c) for c in candidates[:4]) + (", ..." if len(candidates) > 4 else "")
    setting = f"task.data_dir={str(data_dir)!r}" if data_dir is not None else "task.data_dir=null"
    raise FileNotFoundError(f"{setting}: WordNet's {filename} not found (looked in {where}): "
                            f"{FIX.replace('data.noun', filename)}")


def clean_gloss(gloss: str) -> str:
    """The gloss without its quoted usage examples (and the separators they leave)."""
    text = _QUOTED.sub("", gloss)
    text = re.sub(r"(\s*;\s*)+$", "", text.strip())   # trailing "; " left by removed examples
    text = re.sub(r"(\s*;\s*){2,}", "; ", text)        # "a; ; b" -> "a; b"
    return re.sub(r"\s+", " ", text).strip(" ;")


def parse_line(line: str) -> tuple[int, int, str, str]:
    """One synset line (str, no newline) -> (offset, label 0..25, first lemma, cleaned gloss).
    Raises ValueError saying what is wrong (the caller adds the file and line)."""
    offset, label, f, gloss = split_synset(line, "n", FIRST_LEXFILE, len(SUPERSENSES), "noun supersense (03..28)",
                                           "data.noun")
    try:
        words = int(f[3], 16)
    except ValueError:
        raise ValueError(f"word count {f[3]!r} is not hexadecimal") from None
    if words < 1 or len(f) < 4 + 2 * words + 1:
        raise ValueError(f"word count {words} does not match the fields that follow")
    gloss = clean_gloss(gloss)
    if not gloss:
        raise ValueError("empty gloss")
    return offset, label, f[4].replace("_", " "), gloss


def split_synset(line: str, ss_type: str, first_lexfile: int, classes: int, what: str,
                 filename: str) -> tuple[int, int, list[str], str]:
    """A synset line of a WordNet data file -> (offset, label = lexicographer file - ``first_lexfile``,
    the fields before the gloss, the raw gloss), checking what every data file shares: the gloss
    separator, the leading fields, the 8-digit offset, a lexicographer file in
    ``first_lexfile .. + classes - 1`` (else ``what`` is named) and the synset type."""
    head, bar, gloss = line.partition(" | ")
    if not bar:
        raise ValueError("no ' | ' before the gloss")
    f = head.split()
    if len(f) < 6:
        raise ValueError("fewer fields than 'offset lex_filenum ss_type w_cnt word lex_id'")
    if not (len(f[0]) == 8 and f[0].isdigit()):
        raise ValueError(f"offset {f[0]!r} is not 8 digits")
    if not (len(f[1]) == 2 and f[1].isdigit()) or not first_lexfile <= int(f[1]) < first_lexfile + classes:
        raise ValueError(f"lexicographer file {f[1]!r} is not a {what}")
    if f[2] != ss_type:
        raise ValueError(f"synset type {f[2]!r} is not {ss_type!r} (is this {filename}?)")
    return int(f[0]), int(f[1]) - first_lexfile, f, gloss


def read_data_noun(path) -> tuple[list[str], list[int]]:
    """All synsets of ``data.noun`` -> (texts "lemma: gloss", labels 0..25), in file order.

    Checks every line's offset against its byte position and that the file ends with a newline:
    a truncated, altered or wrong file raises ValueError naming the file, the line and the fix.
    """
    texts, labels = [], []
    for offset, label, lemma, gloss in read_synsets(path, parse_line, "data.noun"):
        texts.append(f"{lemma}: {gloss}")
        labels.append(label)
    return texts, labels


def read_synsets(path, parse, filename: str) -> list[tuple]:
    """``parse(line)`` of every synset line of a WordNet data file (the license header skipped),
    in file order; ``parse`` returns a tuple whose first item is the line's offset.

    Checks every offset against its line's byte position and that the file ends with a newline:
    a truncated, altered or wrong file raises ValueError naming the file, the line and the fix.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    bad = f"not WordNet 3.0's {filename}, or damaged: re{FIX.replace('data.noun', filename)}"
    if not raw.endswith(b"\n"):
        raise ValueError(f"{path}: the file ends mid-line (truncated?); {bad}")
    out = []
    pos = 0
    for n, line in enumerate(raw.split(b"\n")[:-1], 1):
        start, pos = pos, pos + len(line) + 1
        if line.startswith(b"  "):  # the license header
            continue
        try:
            parsed = parse(line.decode("utf-8").rstrip())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{n}: {e}; {bad}") from None
        if parsed[0] != start:
            raise ValueError(f"{path}:{n}: synset offset {parsed[0]:08d} is not the line's byte position {start:08d} "
                             f"(file altered or cut); {bad}")
        out.append(parsed)
    if not out:
        raise ValueError(f"{path} holds no synsets; {bad}")
    return out


def split(n: int, train_size: int | None, test_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices): a permutation of range(n) by ``seed``; test first."""
    if test_size < 1 or test_size >= n:
        raise ValueError(f"task.test_size={test_size} must be in [1, {n - 1}] ({n} synsets)")
    rest = n - test_size
    if train_size is None:
        train_size = rest
    if train_size < 1 or train_size > rest:
        raise ValueError(f"task.train_size={train_size} must be in [1, {rest}] ({n} synsets, {test_size} for test), "
                         f"or null for all the rest")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[test_size:test_size + train_size], perm[:test_size]


class Tokenized(Dataset):
    """Unpadded token ids per example; items ``({"input_ids": (l,) int64}, label int64)``."""

    def __init__(self, ids: list[list[int]], labels: list[int]):
        self.ids = [torch.tensor(i, dtype=torch.int32) for i in ids]
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.lengths = [len(i) for i in ids]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i].long()}, self.labels[i]


def make_collate(pad_id: int):
    """collate(items) -> padded batch: (B, L) ids padded with ``pad_id`` to the batch's longest
    example, (B, L) zero token types, (B, 1, 1, L) additive attention mask."""

    def collate(items):
        longest = max(x["input_ids"].numel() for x, _ in items)
        ids = torch.full((len(items), longest), pad_id, dtype=torch.int64)
        keep = torch.zeros(len(items), longest, dtype=torch.int64)
        for r, (x, _) in enumerate(items):
            n = x["input_ids"].numel()
            ids[r, :n] = x["input_ids"]
            keep[r, :n] = 1
        mask = torch.stack([additive_attention_mask(k) for k in keep])
        labels = torch.stack([torch.as_tensor(y) for _, y in items])
        return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}, labels
    return collate


class MeanPoolClassifier(nn.Module):
    """encoder -> mean over attended tokens -> ``classifier`` (Linear hidden -> num_classes).

    forward(input_ids (B, L), attention_mask (B, 1, 1, L) additive float, token_type_ids (B, L))
    -> logits (B, num_classes) float32.
    """

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state      # (B, L, H)
        keep = (attention_mask[:, 0, 0, :] == 0).to(hidden.dtype).unsqueeze(-1)     # (B, L, 1)
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.classifier(pooled)


def load_encoder(model_dir):
    """(tokenizer, encoder without BERT's pooler) from a local Hugging Face folder, offline."""
    model_dir, transformers = local_model(model_dir, "wordnet")
    with quiet(transformers):  # the pooler's weights are in the file and unused on purpose
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        kwargs = {"add_pooling_layer": False} if transformers.AutoConfig.from_pretrained(
            model_dir, local_files_only=True).model_type == "bert" else {}
        encoder = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True, **kwargs)
    return tokenizer, encoder


def build(data_dir=None, model_dir=None, train_size: int | None = 20000, test_size: int = 2000, seed: int = 0,
          max_length: int = 64) -> Task:
    """WordNet noun supersenses (26 classes) with the mean-pooled encoder from ``model_dir``
    (null: the packaged all-MiniLM-L6-v2) and a fresh ``classifier`` head."""
    check_max_length(max_length, 64)
    texts, labels = read_data_noun(find_data_noun(data_dir))
    return text_task("wordnet", texts, labels, len(SUPERSENSES), model_dir=model_dir, train_size=train_size,
                     test_size=test_size, seed=seed, max_length=max_length)


def check_max_length(max_length, example: int) -> None:
    if not isinstance(max_length, int) or max_length < 8:
        raise ValueError(f"task.max_length={max_length!r} must be an integer >= 8, e.g. task.max_length={example}")


def text_task(name: str, texts: list[str], labels: list[int], num_classes: int, *, model_dir, train_size: int | None,
              test_size: int, seed: int, max_length: int) -> Task:
    """A labelled text classification task: the split by ``seed``, the texts tokenized (at most
    ``max_length`` tokens), the mean-pooled encoder from ``model_dir`` with a fresh ``classifier``."""
    train_idx, test_idx = split(len(labels), train_size, test_size, seed)
    tokenizer, encoder = load_encoder(model_dir)

    def encode(idx):
        ids = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length)["input_ids"]
        return Tokenized(ids, [labels[i] for i in idx])

    train_set = encode(train_idx)
    return Task(name=name, model=MeanPoolClassifier(encoder, num_classes), train_set=train_set,
                test_set=encode(test_idx), loss_fn=cross_entropy, head=["classifier.*"],
                num_classes=num_classes, collate_fn=make_collate(tokenizer.pad_token_id or 0),
                lengths=train_set.lengths)
