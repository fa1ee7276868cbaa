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

from .common import Task
from .wordnet import _QUOTED, check_max_length, find_data_file, read_synsets, split_synset, text_task

SUPERSENSES = ("body", "change", "cognition", "communication", "competition", "consumption", "contact", "creation",
               "emotion", "motion", "perception", "possession", "social", "stative", "weather")
FIRST_LEXFILE = 29  # verb.body; verb.weather is 43


def parse_verb_line(line: str) -> tuple[int, int, list[str]]:
    """One synset line of ``data.verb`` -> (offset, label 0..14, its quoted example sentences).
    Raises ValueError saying what is wrong (the caller adds the file and line)."""
    offset, label, _, gloss = split_synset(line, "v", FIRST_LEXFILE, len(SUPERSENSES), "verb supersense (29..43)",
                                           "data.verb")
    examples = [" ".join(q[1:-1].split()) for q in _QUOTED.findall(gloss)]
    return offset, label, [e for e in examples if e]


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
    check_max_length(max_length, 48)
    texts, labels = read_examples(find_data_file(data_dir, "data.verb"))
    return text_task("verb_examples", texts, labels, len(SUPERSENSES), model_dir=model_dir, train_size=train_size,
                     test_size=test_size, seed=seed, max_length=max_length)
