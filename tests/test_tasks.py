"""Tasks: each builds from its config; loaders read the real file layouts (written small into tmp_path);
bad inputs raise errors naming the field and the fix."""
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import assert_scores_match, reference_fisher
from torch.utils.data import DataLoader

from sparsecomm.app.tasks import Task, cifar10, digits, glue, logits_of, synthetic

CONF = Path(__file__).resolve().parents[1] / "conf"
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed "
                                        "(pip install 'sparsecomm[glue]'): the GLUE model cannot load")


# ------------------------------------------------------------------------------------------ digits

def test_digits_split_shapes_and_determinism():
    t = digits.build()
    assert isinstance(t, Task) and t.num_classes == 10 and t.head == ["head.*"]
    assert (len(t.train_set), len(t.test_set)) == (1437, 360)
    x, y = t.train_set[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = t.train_set.tensors
    assert 0.0 <= xs.min() and xs.max() == 1.0
    assert torch.equal(ys, digits.build().train_set.tensors[1]), "same seed, same split"
    assert not torch.equal(ys, digits.build(seed=1).train_set.tensors[1])
    counts = t.test_set.tensors[1].bincount()
    assert counts.min() >= 35 and counts.max() <= 37, "stratified: 36 +- 1 test images per class"


def test_digits_trains_to_high_accuracy_quickly():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        t = digits.build()
        x, y = t.train_set.tensors
        opt = torch.optim.AdamW(t.model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(100):
            i = torch.randint(len(y), (32,), generator=g)
            loss = t.loss_fn(t.model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        t.model.eval()
        xt, yt = t.test_set.tensors
        acc = (t.model(xt).argmax(1) == yt).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert acc > 0.93, f"100 steps of batch 32 reached only {acc:.3f}"


def sklearn_split(test_fraction=0.2, seed=0):
    """The reference: scikit-learn's own digits and stratified split, as its docs show them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.images[:, None] / 16.0, d.target, test_size=test_fraction,
                                              stratify=d.target, random_state=seed)
    return x_tr, y_tr, x_te, y_te


def assert_split_equals(got, want):
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, torch.as_tensor(w).to(g.dtype)), "the split differs from scikit-learn's"


def no_launcher(monkeypatch):
    """This process outside any launch: global rank 0, the one that writes the cache."""
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


def cached_files(folder: Path):
    return sorted(p.name for p in folder.glob("digits-*.npz"))


def test_digits_split_is_cached_and_equals_sklearns(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMM_CACHE_DIR", str(tmp_path))
    no_launcher(monkeypatch)
    assert_split_equals(digits.load(0.25, 3), sklearn_split(0.25, 3))
    assert len(cached_files(tmp_path)) == 1
    digits.load(0.25, 4)
    assert len(cached_files(tmp_path)) == 2, "another seed is another split: another file"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, "the temporary file was renamed into place"
    # A fresh interpreter reads the cached split without importing scikit-learn at all.
    code = ("import sys, torch; from sparsecomm.app.tasks import digits; "
            "torch.save(digits.load(0.25, 3), sys.argv[1]); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "split.pt")], capture_output=True,
                         text=True, check=True, env={**os.environ, "SPARSECOMM_CACHE_DIR": str(tmp_path)})
    assert out.stdout.strip() == "False", out.stderr
    assert_split_equals(torch.load(tmp_path / "split.pt"), sklearn_split(0.25, 3))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_arrays"])
def test_digits_damaged_cache_is_prepared_again_and_replaced(tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setenv("SPARSECOMM_CACHE_DIR", str(tmp_path))
    no_launcher(monkeypatch)
    digits.load()
    (path,) = tmp_path.glob("digits-*.npz")
    if damage == "garbage":
        path.write_bytes(b"not a zip file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:4000])
    else:
        np.savez(path, x_train=np.zeros((3, 1, 8, 8), np.float32), y_train=np.zeros(3, np.int64),
                 x_test=np.zeros((2, 1, 8, 8), np.float32), y_test=np.zeros(2, np.int64))
    with caplog.at_level("WARNING"):
        assert_split_equals(digits.load(), sklearn_split())
    assert str(path) in caplog.text and "preparing them again" in caplog.text
    with np.load(path) as npz:  # replaced by the good split
        assert torch.equal(torch.from_numpy(npz["y_test"]), digits.load()[3])


def test_digits_cache_written_by_rank_zero_only_and_optional(tmp_path, monkeypatch):
    no_launcher(monkeypatch)
    monkeypatch.setenv("SPARSECOMM_CACHE_DIR", str(tmp_path / "ranks"))
    for launcher in ({"RANK": "1", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}):
        for var, value in launcher.items():
            monkeypatch.setenv(var, value)
        assert_split_equals(digits.load(), sklearn_split())
        assert not (tmp_path / "ranks").exists() or not cached_files(tmp_path / "ranks"), launcher
        no_launcher(monkeypatch)
    blocked = tmp_path / "a_file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("SPARSECOMM_CACHE_DIR", str(blocked / "sub"))
    assert_split_equals(digits.load(), sklearn_split()), "a cache that cannot be written: no cache, no error"
    monkeypatch.delenv("SPARSECOMM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    digits.load()
    assert cached_files(tmp_path / "xdg" / "sparsecomm")


# ----------------------------------------------------------------------------------------- CIFAR-10

def write_cifar(folder: Path, n=6, batches=2, seed=0):
    """The real python-pickle layout: dicts with b'data' (n, 3072) uint8 and b'labels'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]
    for name in names:
        d = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    return folder


def test_cifar_reads_the_pickle_layout(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.warns(UserWarning, match="only 2 of CIFAR-10's 5"):
        t = cifar10.build(data_dir=str(tmp_path), augment=False)
    assert (len(t.train_set), len(t.test_set), t.num_classes) == (12, 6, 10)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    x, y = t.train_set[7]  # second batch, row 1
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.item() == raw[b"labels"][1]
    green_pixel = raw[b"data"][1][1024 + 32 * 3 + 5] / 255.0  # plane G, row 3, column 5
    assert x[1, 3, 5].item() == pytest.approx((green_pixel - cifar10.MEAN[1]) / cifar10.STD[1], abs=1e-5)
    xb, yb = next(iter(DataLoader(t.train_set, batch_size=4)))
    assert logits_of(t.model(xb)).shape == (4, 10)
    assert t.loss_fn(t.model(xb), yb).ndim == 0


def test_cifar_augmentation_and_arch(tmp_path):
    write_cifar(tmp_path, batches=5)
    t = cifar10.build(data_dir=tmp_path, arch="resnet34", augment=True)
    assert sum(p.numel() for p in t.model.parameters()) == 21_282_122
    torch.manual_seed(0)
    views = [t.train_set[0][0] for _ in range(8)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:]), "random crops/flips differ"
    assert torch.equal(t.test_set[0][0], t.test_set[0][0]), "the test set is not augmented"
    with pytest.raises(ValueError, match=r"task\.arch='vgg'.*resnet18"):
        cifar10.build(data_dir=tmp_path, arch="vgg")


@pytest.mark.parametrize("build", [cifar10.build, lambda data_dir: glue.build(data_dir=data_dir)])
def test_missing_or_empty_data_dir(tmp_path, build):
    with pytest.raises(ValueError, match=r"task\.data_dir is not set.*task\.data_dir="):
        build(data_dir=None)
    with pytest.raises(FileNotFoundError, match=r"task\.data_dir='.*nope' does not exist.*point task\.data_dir"):
        build(data_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"task\.data_dir='.*' holds no .*task\.data_dir="):
        build(data_dir=str(tmp_path))


# -------------------------------------------------------------------------------------------- GLUE

GLUE_FILES = {  # the official headers and column layouts, two rows each
    "sst2": ["sentence\tlabel", "a gripping , funny film \t1", 'a "dull" mess \t0'],
    "cola": ["gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
             "gj04\t0\t*\tThe more we study verbs, the crazier they get get."],
    "mrpc": ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
             '1\t702876\t702977\tHe said "yes" today.\tToday he agreed.',
             "0\t2108705\t2108831\tA cat sat.\tThe dog ran away."],
    "qnli": ["index\tquestion\tsentence\tlabel", "0\tWho won?\tThe Broncos won.\tentailment",
             "1\tWhere?\tIt rained.\tnot_entailment"],
    "rte": ["index\tsentence1\tsentence2\tlabel", "0\tA man sleeps.\tA person sleeps.\tentailment",
            "1\tA man sleeps.\tA woman runs.\tnot_entailment"],
    "qqp": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t3\t4\tHow to cook?\tHow do I cook?\t1",
            "2\t5\t6\tWhat is AI?\tWhy is the sky blue?\t0", "3\t7\tbroken row"],
    "mnli": ["index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
             "0\t1\t1e\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tA man eats.\tA man is eating.\tentailment\tentailment",
             "1\t2\t2n\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tA man eats.\tHe is hungry.\tneutral\tneutral"],
}
EXPECTED = {  # (text_a of row 0, text_b of row 0 or None, labels)
    "sst2": ("a gripping , funny film ", None, [1, 0]),
    "cola": ("The sailors rode the breeze clear of the rocks.", None, [1, 0]),
    "mrpc": ('He said "yes" today.', "Today he agreed.", [1, 0]),
    "qnli": ("Who won?", "The Broncos won.", [0, 1]),
    "rte": ("A man sleeps.", "A person sleeps.", [0, 1]),
    "qqp": ("How to cook?", "How do I cook?", [1, 0]),
    "mnli": ("A man eats.", "A man is eating.", [1, 2]),
}


def write_glue(folder: Path, task: str, dev_name="dev.tsv"):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", dev_name):
        (folder / name).write_text("\n".join(GLUE_FILES[task]) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("task", sorted(GLUE_FILES))
def test_glue_tsv_columns_and_labels(tmp_path, task):
    path = write_glue(tmp_path, task) / "train.tsv"
    if task == "qqp":
        with pytest.warns(UserWarning, match="skipped 1 malformed"):
            a, b, y = glue.read_tsv(path, glue.TASKS[task])
    else:
        a, b, y = glue.read_tsv(path, glue.TASKS[task])
    text_a, text_b, labels = EXPECTED[task]
    assert a[0] == text_a and (b is None if text_b is None else b[0] == text_b) and y == labels


def test_glue_finds_official_folders(tmp_path):
    write_glue(tmp_path / "MNLI", "mnli", dev_name="dev_matched.tsv")
    train, dev = glue.find_files(tmp_path, glue.TASKS["mnli"])
    assert (train.name, dev.name, dev.parent.name) == ("train.tsv", "dev_matched.tsv", "MNLI")


def test_glue_bad_label_names_the_file_and_line(tmp_path):
    write_glue(tmp_path, "rte")
    with pytest.raises(ValueError, match=r"train\.tsv:2: label 'entailment'.*task\.task_name"):
        glue.read_tsv(tmp_path / "train.tsv", glue.Spec("RTE", "sentence1", "sentence2", "label", ("0", "1")))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['sentence'\].*task\.task_name"):
        glue.read_tsv(tmp_path / "train.tsv", glue.TASKS["sst2"])


def test_glue_unknown_task_name(tmp_path):
    with pytest.raises(ValueError, match=r"task\.task_name='sts-b'.*task\.task_name=sst2"):
        glue.build(data_dir=write_glue(tmp_path, "sst2"), task_name="sts-b")


def test_glue_bad_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task\.model_dir='.*' is not a Hugging Face model folder"):
        glue.build(data_dir=write_glue(tmp_path, "sst2"), model_dir=str(tmp_path))


@needs_transformers
@pytest.mark.parametrize("task", ["sst2", "mrpc"])
def test_glue_with_packaged_minilm(tmp_path, task):
    torch.manual_seed(0)
    t = glue.build(data_dir=str(write_glue(tmp_path / glue.TASKS[task].folder, task).parent),
                   task_name=task, max_length=24)
    assert t.head == ["classifier.*"] and t.num_classes == 2 and (len(t.train_set), len(t.test_set)) == (2, 2)
    x, y = t.train_set[0]
    assert set(x) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(x[k].shape == (24,) and x[k].dtype == torch.int64 for k in ("input_ids", "token_type_ids"))
    assert x["attention_mask"].shape == (1, 1, 24) and x["attention_mask"].dtype == torch.float32
    assert y.dtype == torch.int64
    if task == "mrpc":
        assert x["token_type_ids"].max() == 1, "sentence pairs are encoded as pairs"
    xb, yb = next(iter(DataLoader(t.train_set, batch_size=2)))
    out = t.model(**xb)
    assert logits_of(out).shape == (2, 2)
    loss = t.loss_fn(out, yb)
    loss.backward()
    assert all(n.startswith(("bert.", "classifier.")) for n, _ in t.model.named_parameters())
    assert t.model.classifier.weight.grad is not None


@needs_transformers
@pytest.mark.slow  # MiniLM's Fisher scores, vectorised and per example
def test_glue_fisher_scores_are_vectorised_and_exact(tmp_path):
    """Per-example Fisher scores of the pretrained MiniLM run vectorised (the layers engine, which
    also scores nn.Embedding) and equal the batch-size-1 loop's; the 4D mask the loader hands out
    (transformers' own 2D-mask handling cannot be traced by vmap, the fallback) attends exactly
    like the tokenizer's 2D one."""
    from sparsecomm.fisher import fisher_scores

    torch.manual_seed(0)
    t = glue.build(data_dir=str(write_glue(tmp_path, "mrpc")), task_name="mrpc", max_length=16)
    model = t.model.eval()
    xb, yb = next(iter(DataLoader(t.train_set, batch_size=2)))
    mask_2d = t.train_set.enc["attention_mask"][:2].long()
    assert (mask_2d == 0).any(), "the test wants padding"
    with torch.no_grad():
        ours = logits_of(model(**xb))
        theirs = logits_of(model(**{**xb, "attention_mask": mask_2d}))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    stats = {}
    fast, n = fisher_scores(model, [(xb, yb)], t.loss_fn, num_samples=2, chunk_size=2, stats=stats)
    assert n == 2 and stats["engine"] == "layers"  # nn.Embedding included since issue 11
    # every parameter, against plain autograd one example at a time (tests/reference.py)
    assert_scores_match(fast, reference_fisher(model, [(xb, yb)], t.loss_fn))


# --------------------------------------------------------------------------------------- synthetic

@pytest.mark.parametrize("kw, x_shape, x_dtype", [
    (dict(model="mlp", in_features=20, hidden=32, depth=2), (20,), torch.float32),
    (dict(model="resnet18", num_train=8, num_test=4), (3, 32, 32), torch.float32),
    (dict(model="gpt2", vocab_size=40, n_layer=1, n_head=2, n_embd=16, block_size=12), (12,), torch.int64),
])
def test_synthetic_builds_each_model(kw, x_shape, x_dtype):
    t = synthetic.build(**kw)
    x, y = t.train_set[0]
    assert x.shape == x_shape and x.dtype == x_dtype and y.dtype == torch.int64
    xb, yb = t.train_set[:4]
    assert t.model(xb).shape == (4, 10)
    assert torch.equal(t.train_set.tensors[1], synthetic.build(**kw).train_set.tensors[1]), "fixed seed"


def test_synthetic_labels_are_learnable():
    torch.manual_seed(0)
    t = synthetic.build(model="mlp", in_features=16, hidden=64, depth=2, num_train=2048)
    x, y = t.train_set.tensors
    assert y.bincount(minlength=10).min() > 100, "classes roughly balanced"
    opt = torch.optim.AdamW(t.model.parameters(), lr=3e-3)
    first = t.loss_fn(t.model(x), y).item()
    for step in range(150):
        i = torch.arange(step * 64, step * 64 + 64) % len(y)
        loss = t.loss_fn(t.model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert t.loss_fn(t.model(x), y).item() < 0.5 * first


def test_synthetic_bad_kwargs():
    with pytest.raises(ValueError, match=r"task\.n_layer does not apply to task\.model=mlp"):
        synthetic.build(model="mlp", n_layer=2)
    with pytest.raises(ValueError, match=r"task\.model='vgg'.*task\.model=mlp"):
        synthetic.build(model="vgg")


# ----------------------------------------------------------------------------------- Hydra configs

@pytest.fixture
def compose_task(tmp_path):
    """Compose conf/task/<name>.yaml under a one-line primary config, as the app's `task` group."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sparsecomm.app import schema

    schema.register()  # the schemas conf/task/*.yaml extend (the app registers them at start)
    shutil.copytree(CONF / "task", tmp_path / "task")
    (tmp_path / "config.yaml").write_text("defaults:\n  - task: digits\n  - _self_\n")

    def run(overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(tmp_path)):
            return compose("config", overrides=overrides)
    yield run
    GlobalHydra.instance().clear()


def test_configs_instantiate(compose_task, tmp_path):
    from hydra.utils import instantiate

    t = instantiate(compose_task([]).task)
    assert isinstance(t, Task) and t.name == "digits"
    t = instantiate(compose_task(["task=synthetic", "task.in_features=8", "task.hidden=16", "task.depth=1",
                                 "task.num_train=32", "task.num_test=8"]).task)
    assert t.name == "synthetic-mlp" and len(t.train_set) == 32
    write_cifar(tmp_path / "c", batches=5)
    t = instantiate(compose_task(["task=cifar10", f"task.data_dir={tmp_path / 'c'}"]).task)
    assert t.name == "cifar10" and len(t.test_set) == 6
    cfg = compose_task(["task=glue"]).task
    assert (cfg.task_name, cfg.model_dir, cfg.max_length) == ("sst2", None, 128)


@pytest.mark.parametrize("name", ["cifar10", "glue"])
def test_configs_report_missing_data_dir(compose_task, name):
    from hydra.utils import instantiate
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue, match=r"task\.data_dir"):
        instantiate(compose_task([f"task={name}"]).task)
