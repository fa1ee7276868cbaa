"""WordNet 3.0 verb usage examples labelled by supersense (offline): 15-way sentence classification.

Data: WordNet's ``data.verb`` (the same package as ``task=wordnet``: ``apt-get install
wordnet-base``, or NLTK's ``corpora/wordnet``). Unlike ``task=wordnet``'s glosses (definitions
that name the lemma), the texts here are the quoted usage sentences of each verb synset::

    00022686 29 v 06 stimulate 0 ... | cause to be alert and energetic; "Coffee and tea stimulate me"; ...

Each quoted sentence is an example ("Coffee and tea stimulate me"), labelled with its synset's
lexicographer file (29..43: the 15 verb supersenses ``verb.body`` ... ``verb.weather``) minus 29.
The lemma is not part of the text: the model reads the sentence alone. A sentence quoted by
synsets of different supersenses is dropped (ambiguous); repeats within one supersense are kept
once. WordNet 3.0 gives 12,510 sentences (the loader checks every synset's offset against its
byte position, as ``task=wordnet`` does).

Split, model and batches as ``task=wordnet`` (:mod:`sparsecomm.app.tasks.wordnet`): a permutation
by ``seed``, the first ``test_size`` for test, the next ``train_size`` (``null``: all the rest)
for training; the mean-pooled encoder (default: the packaged all-MiniLM-L6-v2) with a fresh
``classifier = Linear(hidden, 15)``, the head a mask keeps whole (5,775 entries for MiniLM).
"""
from __future__ import annotations

from .common import Task, cross_entropy
from .wordnet import _QUOTED, MeanPoolClassifier, Tokenized, find_data_file, load_encoder, make_collate, read_synsets, split

SUPERSENSES = ("body", "change", "cognition", "communication", "competition", "consumption", "contact", "creation",
               "emotion", "motion", "perception", "possession", "social", "stative", "weather")
FIRST_LEXFILE = 29  # verb.body; verb.weather is 43


def parse_verb_line(line: str) -> tuple[int, int, list[str]]:
    """One synset line of ``data.verb`` -> (offset, label 0..14, its quoted example sentences).
    Raises ValueError saying what is wrong (the caller adds the file and line)."""
    head, bar, gloss = line.partition(" | ")
    if not bar:
        raise ValueError("no ' | ' before the gloss")
    f = head.split()
    if len(f) < 6:
        raise ValueError("fewer fields than 'offset lex_filenum ss_type w_cnt word lex_id'")
    if not (len(f[0]) == 8 and f[0].isdigit()):
        raise ValueError(f"offset {f[0]!r} is not 8 digits")
    if not (len(f[1]) == 2 and f[1].isdigit()) or not FIRST_LEXFILE <= int(f[1]) < FIRST_LEXFILE + len(SUPERSENSES):
        raise ValueError(f"lexicographer file {f[1]!r} is not a verb supersense (29..43)")
    if f[2] != "v":
        raise ValueError(f"synset type {f[2]!r} is not 'v' (is this data.verb?)")
    examples = [" ".join(q[1:-1].split()) for q in _QUOTED.findall(gloss)]
    return int(f[0]), int(f[1]) - FIRST_LEXFILE, [e for e in examples if e]


def read_examples(path) -> tuple[list[str], list[int]]:
    """Every usage sentence of ``data.verb`` -> (sentences, labels 0..14) in file order, each
    sentence once; those quoted under two supersenses are dropped. A damaged file, or one with
    no example, raises ValueError naming the file (and the line) and the fix."""
    labels_of: dict[str, set[int]] = {}
    for _, label, examples in read_synsets(path, parse_verb_line, "data.verb"):
        for e in examples:
            labels_of.setdefault(e, set()).add(label)
    kept = [(e, next(iter(ls))) for e, ls in labels_of.items() if len(ls) == 1]
    if not kept:
        raise ValueError(f"{path} holds no quoted usage example with one supersense: is it WordNet's data.verb?")
    return [e for e, _ in kept], [label for _, label in kept]


def build(data_dir=None, model_dir=None, train_size: int | None = None, test_size: int = 1000, seed: int = 0,
          max_length: int = 48) -> Task:
    """WordNet verb usage sentences (15 supersenses) with the mean-pooled encoder from
    ``model_dir`` (null: the packaged all-MiniLM-L6-v2) and a fresh ``classifier`` head."""
    if not isinstance(max_length, int) or max_length < 8:
        raise ValueError(f"task.max_length={max_length!r} must be an integer >= 8, e.g. task.max_length=48")
    texts, labels = read_examples(find_data_file(data_dir, "data.verb"))
    train_idx, test_idx = split(len(labels), train_size, test_size, seed)
    tokenizer, encoder = load_encoder(model_dir)

    def encode(idx):
        ids = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length)["input_ids"]
        return Tokenized(ids, [labels[i] for i in idx])

    train_set = encode(train_idx)
    return Task(name="verb_examples", model=MeanPoolClassifier(encoder, len(SUPERSENSES)), train_set=train_set,
                test_set=encode(test_idx), loss_fn=cross_entropy, head=["classifier.*"],
                num_classes=len(SUPERSENSES), collate_fn=make_collate(tokenizer.pad_token_id or 0),
                lengths=train_set.lengths)
