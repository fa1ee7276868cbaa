"""task=verb_examples: WordNet's data.verb layout written small into tmp_path (never the installed
copy), parsed against hand-written expectations; ambiguous sentences dropped; bad files named with
the fix; the packaged MiniLM with a 15-way head; a short 2-worker app run."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sparsecomm.app.tasks import verb_examples

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (pip install 'sparsecomm[glue]')")

HEADER = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
          "  2 Princeton University under the following license.  "]
# (lex_filenum, words, gloss) in WordNet's verb layout; offsets are filled in by verb_lines
SYNSETS = [
    ("29", ["breathe", "take_a_breath"], 'draw air into, and expel out of, the lungs; "I can breathe better now"; '
                                         '"The patient is respiring"'),
    ("30", ["change"], "undergo a change; become different in essence"),                     # no example
    ("34", ["eat"], 'take in solid food; "She was eating a banana"; "What did you eat for dinner?"'),
    ("43", ["rain", "rain_down"], 'precipitate as rain; "If it rains much more, we can expect flooding"'),
    ("38", ["run"], 'move fast by using one\'s feet; "Don\'t run--you\'ll be out of breath"; "It rained"'),
    ("43", ["drizzle"], 'rain lightly; "It rained"; "It drizzled all day"'),  # "It rained" under weather and motion
    ("34", ["devour"], 'eat immoderately; "She was eating a banana"'),  # a repeat within one supersense
]
EXPECTED = [("I can breathe better now", 0), ("The patient is respiring", 0),
            ("She was eating a banana", 5), ("What did you eat for dinner?", 5),
            ("If it rains much more, we can expect flooding", 14), ("Don't run--you'll be out of breath", 9),
            ("It drizzled all day", 14)]


def verb_lines(synsets=SYNSETS) -> bytes:
    """data.verb bytes: the header, then one line per synset whose offset is its byte position."""
    out = "".join(h + "\n" for h in HEADER).encode()
    for lex, words, gloss in synsets:
        body = (f" {lex} v {len(words):02x} " + " ".join(f"{w} 0" for w in words)
                + f" 000 01 + 02 00 | {gloss}  \n")
        out += f"{len(out):08d}".encode() + body.encode()
    return out


def write_verb(folder: Path, data: bytes | None = None, synsets=SYNSETS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.verb").write_bytes(verb_lines(synsets) if data is None else data)
    return folder


def test_sentences_and_supersenses_as_written_by_hand(tmp_path):
    texts, labels = verb_examples.read_examples(write_verb(tmp_path) / "data.verb")
    assert list(zip(texts, labels)) == EXPECTED
    assert verb_examples.SUPERSENSES[0] == "body" and verb_examples.SUPERSENSES[5] == "consumption"
    assert verb_examples.SUPERSENSES[9] == "motion" and verb_examples.SUPERSENSES[14] == "weather"
    assert len(verb_examples.SUPERSENSES) == 15


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-30], "ends mid-line"),
    (lambda b: b.replace(b" 34 v ", b" 34 n ", 1), "synset type 'n' is not 'v'"),
    (lambda b: b.replace(b" 29 v ", b" 12 v ", 1), "lexicographer file '12' is not a verb supersense"),
    (lambda b: b.replace(b"  1 This", b"  1 This extra", 1), "is not the line's byte position"),
])
def test_damaged_files_name_the_file_line_and_fix(tmp_path, damage, message):
    path = write_verb(tmp_path, damage(verb_lines())) / "data.verb"
    with pytest.raises(ValueError, match=message) as e:
        verb_examples.read_examples(path)
    assert str(path) in str(e.value) and "data.verb" in str(e.value) and "apt-get install wordnet-base" in str(e.value)


def test_a_file_without_examples_and_a_missing_file_are_named(tmp_path):
    write_verb(tmp_path / "bare", synsets=[("30", ["change"], "undergo a change")])
    with pytest.raises(ValueError, match="holds no quoted usage example"):
        verb_examples.read_examples(tmp_path / "bare" / "data.verb")
    with pytest.raises(FileNotFoundError, match=r"task.data_dir=.*data.verb not found.*apt-get install wordnet-base"):
        verb_examples.build(data_dir=str(tmp_path / "missing"))


# 48 sentences, 24 of each of two supersenses (consumption, weather): enough for tiny end-to-end runs.
TWO_SUPERSENSES = [(lex, [f"verb{i}"], f'do it; "{kind} number {i} happened"') for i in range(24)
                   for lex, kind in (("34", "a meal"), ("43", "a storm"))]


@pytest.mark.slow
@needs_transformers
def test_build_with_packaged_minilm_has_a_15_way_head(tmp_path):
    t = verb_examples.build(data_dir=str(write_verb(tmp_path, synsets=TWO_SUPERSENSES)), train_size=10, test_size=4)
    assert t.name == "verb_examples" and t.num_classes == 15 and t.head == ["classifier.*"]
    assert (len(t.train_set), len(t.test_set)) == (10, 4)
    x, y = t.collate_fn([t.train_set[i] for i in range(3)])
    with torch.no_grad():
        assert t.model(**x).shape == (3, 15)
    assert set(y.tolist()) <= {5, 14}


@pytest.mark.slow
def test_app_two_workers_on_tiny_verb_examples(tmp_path):
    """task=verb_examples end to end: 2 workers, the learned mask refreshed once."""
    pytest.importorskip("transformers")
    from apptest import run_app

    data = write_verb(tmp_path / "wn", synsets=TWO_SUPERSENSES)
    args = ["task=verb_examples", f"task.data_dir={data}", "task.train_size=40", "task.test_size=8", "steps=4",
            "batch_size=4", "eval_every=4", "mask=learned", "mask.refresh_every=2", "schedule=fish_fixed",
            "logging.progress=false", "save_model=false", f"out_dir={tmp_path}", "run_id=ve"]
    proc = run_app(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "ve" / "summary.json").read_text())
    assert summary["task"] == "verb_examples" and summary["refreshes"] == 1
    assert summary["bytes_sent"] == 4 * summary["k"] * 4, "4 masked steps, nothing else through the hook"
