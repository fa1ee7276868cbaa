"""task=wordnet: WordNet's data.noun layout written small into tmp_path (never the installed copy),
parsed against hand-written expectations; bad files named with the fix; length-grouped batches;
the mean-pooled MiniLM; a short 2-worker app run."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from reference import assert_scores_match, reference_fisher
from torch.utils.data import SequentialSampler

from sparsecomm.app.batching import LengthGroupedBatches
from sparsecomm.app.tasks import wordnet

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed "
                                        "(pip install 'sparsecomm[glue]'): the MiniLM cannot load")

HEADER = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
          "  2 Princeton University under the following license.  ",
          "  3   "]
# (lex_filenum, words, pointer text, gloss) in WordNet's layout; offsets are filled in by write_noun
SYNSETS = [
    ("03", ["entity"], "003 ~ 00001930 n 0000", "that which is perceived or known (living or nonliving)"),
    ("05", ["dog", "domestic_dog", "Canis_familiaris"], "001 @ 00001740 n 0000",
     'a member of the genus Canis; "the dog barked all night"'),
    ("13", ["apple_pie"], "000", 'pie with an apple filling; "she baked an apple pie"; "pie, again"  '),
    ("28", ["time_of_day"], "002 @ 00001740 n 0000 ~ 00001930 n 0000", "clock time; a reading of a point in time"),
    ("18", ["expert"], "000", '"an expert in his field"; a person with special knowledge; "top expert"'),
]
EXPECTED = [("entity: that which is perceived or known (living or nonliving)", 0),
            ("dog: a member of the genus Canis", 2),
            ("apple pie: pie with an apple filling", 10),
            ("time of day: clock time; a reading of a point in time", 25),
            ("expert: a person with special knowledge", 15)]


def noun_lines(synsets=SYNSETS, header=HEADER) -> bytes:
    """data.noun bytes: the header, then one line per synset whose offset is its byte position."""
    out = "".join(h + "\n" for h in header).encode()
    for lex, words, pointers, gloss in synsets:
        body = f" {lex} n {len(words):02x} " + " ".join(f"{w} 0" for w in words) + f" {pointers} | {gloss}  \n"
        out += f"{len(out):08d}".encode() + body.encode()
    return out


# 48 synsets, 24 of each of two supersenses (animal, food): enough for tiny end-to-end runs.
TWO_SUPERSENSES = [(lex, [f"thing{i}"], "000", f"a {kind} of sort {i}") for i in range(24)
                   for lex, kind in (("05", "beast"), ("13", "dish"))]


def write_noun(folder: Path, data: bytes | None = None, synsets=SYNSETS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.noun").write_bytes(noun_lines(synsets) if data is None else data)
    return folder


def test_parses_lemma_gloss_and_supersense_as_written_by_hand(tmp_path):
    texts, labels = wordnet.read_data_noun(write_noun(tmp_path) / "data.noun")
    assert list(zip(texts, labels)) == EXPECTED
    assert wordnet.SUPERSENSES[2] == "animal" and wordnet.SUPERSENSES[10] == "food"
    assert wordnet.SUPERSENSES[15] == "person" and len(wordnet.SUPERSENSES) == 26


def test_finds_data_noun_in_the_folder_or_its_dict(tmp_path, monkeypatch):
    write_noun(tmp_path / "a")
    write_noun(tmp_path / "b" / "dict")
    assert wordnet.find_data_noun(tmp_path / "a") == tmp_path / "a" / "data.noun"
    assert wordnet.find_data_noun(str(tmp_path / "b")) == tmp_path / "b" / "dict" / "data.noun"
    with pytest.raises(FileNotFoundError, match=r"task.data_dir=.*data.noun not found.*apt-get install wordnet-base"):
        wordnet.find_data_noun(tmp_path / "missing")
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk"))  # the default search reaches NLTK's folder
    write_noun(tmp_path / "nltk" / "corpora" / "wordnet")
    monkeypatch.setattr(wordnet, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    assert wordnet.find_data_noun(None) == tmp_path / "nltk" / "corpora" / "wordnet" / "data.noun"


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-40], "ends mid-line"),                                            # truncated
    (lambda b: b.replace(b" 05 n ", b" 05 n  "), "is not the line's byte"),     # a line altered
    (lambda b: b.replace(b" 13 n ", b" 33 n "), "not a noun supersense"),
    (lambda b: b.replace(b" | clock", b" : clock"), "no ' | '"),
    (lambda b: b + b"\x00\xff garbage\n", ":9: "),
    (lambda b: b"".join(h.encode() + b"\n" for h in HEADER), "holds no synsets"),
])
def test_damaged_files_name_the_file_line_and_fix(tmp_path, damage, message):
    path = write_noun(tmp_path, damage(noun_lines())) / "data.noun"
    with pytest.raises(ValueError, match=message) as e:
        wordnet.read_data_noun(path)
    assert str(path) in str(e.value) and "apt-get install wordnet-base" in str(e.value)


def test_split_is_fixed_by_seed_and_disjoint():
    train, test = wordnet.split(100, 30, 10, seed=0)
    assert (len(train), len(test)) == (30, 10) and not set(train) & set(test)
    assert wordnet.split(100, 30, 10, seed=0) == (train, test)
    assert wordnet.split(100, 30, 10, seed=1) != (train, test)
    assert len(wordnet.split(100, None, 10, seed=0)[0]) == 90
    with pytest.raises(ValueError, match="task.train_size=95"):
        wordnet.split(100, 95, 10, seed=0)
    with pytest.raises(ValueError, match="task.test_size=0"):
        wordnet.split(100, 10, 0, seed=0)


def test_collate_pads_to_the_longest_example_only():
    ds = wordnet.Tokenized([[5, 6, 7], [8], [9, 10]], [1, 0, 2])
    x, y = wordnet.make_collate(pad_id=0)([ds[0], ds[2]])
    assert torch.equal(x["input_ids"], torch.tensor([[5, 6, 7], [9, 10, 0]]))
    assert x["attention_mask"].shape == (2, 1, 1, 3) and torch.equal(y, torch.tensor([1, 2]))
    assert (x["attention_mask"][0] == 0).all() and x["attention_mask"][1, 0, 0, 2] < -1e30
    x, _ = wordnet.make_collate(pad_id=0)([ds[1]])
    assert x["input_ids"].shape == (1, 1), "a batch of short examples has no all-padding columns"


def test_length_grouped_batches_cover_each_index_once_and_group_lengths():
    lengths = [int(v) for v in torch.randint(1, 60, (103,), generator=torch.Generator().manual_seed(0))]
    sampler = LengthGroupedBatches(SequentialSampler(range(103)), lengths, batch_size=4, window=5, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25 and all(len(b) == 4 for b in batches)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(100)), "every kept index once; the last 3 dropped"
    for w in range(5):  # windows of 5 batches = 20 indices, each sorted by length, then cut
        mine = [[lengths[i] for i in b] for b in batches if b[0] // 20 == w]
        assert len(mine) == 5 and all(i // 20 == w for b in batches if b[0] // 20 == w for i in b)
        mine.sort(key=min)
        assert all(max(a) <= min(b) for a, b in zip(mine, mine[1:])), "batches do not overlap in length"
    assert batches == list(sampler), "deterministic for one epoch"
    sampler.set_epoch(1)
    assert sorted(map(tuple, list(sampler))) == sorted(map(tuple, batches)) and list(sampler) != batches


@pytest.mark.slow
@needs_transformers
def test_build_with_packaged_minilm_mean_pools_and_ignores_padding(tmp_path):
    torch.manual_seed(0)
    t = wordnet.build(data_dir=str(write_noun(tmp_path)), train_size=3, test_size=2)
    assert t.name == "wordnet" and t.num_classes == 26 and t.head == ["classifier.*"]
    assert (len(t.train_set), len(t.test_set)) == (3, 2) and t.lengths == t.train_set.lengths
    names = [n for n, _ in t.model.named_parameters()]
    assert not any("pooler" in n for n in names) and names[-2:] == ["classifier.weight", "classifier.bias"]
    t.model.eval()
    items = [t.train_set[i] for i in range(3)]
    x, y = t.collate_fn(items)
    with torch.no_grad():
        batched = t.model(**x)
        alone = torch.cat([t.model(**t.collate_fn([it])[0]) for it in items])
        enc = t.model.encoder(input_ids=x["input_ids"][:1], attention_mask=x["attention_mask"][:1]).last_hidden_state
    assert batched.shape == (3, 26) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)  # padding changes nothing
    n = items[0][0]["input_ids"].numel()
    torch.testing.assert_close(batched[0], t.model.classifier(enc[0, :n].mean(0)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@needs_transformers
def test_minilm_fisher_scores_run_in_the_layers_engine_and_equal_the_loop(tmp_path):
    """Every parameter of the mean-pooled MiniLM is scored by the layers engine (embeddings
    included), exactly as the batch-size-1 loop scores it."""
    from sparsecomm.fisher import fisher_scores

    torch.manual_seed(0)
    t = wordnet.build(data_dir=str(write_noun(tmp_path)), train_size=3, test_size=2, max_length=16)
    batch = t.collate_fn([t.train_set[i] for i in range(3)])
    assert (batch[0]["attention_mask"] < 0).any(), "the test wants padding"
    stats = {}
    fast, n = fisher_scores(t.model, [batch], t.loss_fn, num_samples=3, chunk_size=2, engine="layers", stats=stats)
    assert n == 3 and stats == {"engine": "layers"} and set(fast) == {n for n, _ in t.model.named_parameters()}
    # every parameter, against plain autograd one example at a time (tests/reference.py)
    assert_scores_match(fast, reference_fisher(t.model, [batch], t.loss_fn), rtol=1e-3, floor=1e-8)


@pytest.mark.slow
def test_app_two_workers_on_a_tiny_wordnet(tmp_path):
    """task=wordnet end to end: 2 workers, FISH mask from step 1 (no dense warm-up)."""
    pytest.importorskip("transformers")
    from apptest import run_app

    data = write_noun(tmp_path / "wn", synsets=TWO_SUPERSENSES)
    args = ["task=wordnet", f"task.data_dir={data}", "task.train_size=40", "task.test_size=8", "steps=4",
            "batch_size=4", "eval_every=4", "mask.num_samples=8", "mask.batch_size=4", "mask.chunk_size=4",
            "schedule=fish_fixed", "logging.progress=false", f"out_dir={tmp_path}", "run_id=wn"]
    proc = run_app(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "wn" / "summary.json").read_text())
    assert summary["task"] == "wordnet" and summary["k"] == round(0.005 * summary["numel"])
    assert summary["bytes_sent"] == 4 * summary["k"] * 4, "4 masked steps, no dense one"
