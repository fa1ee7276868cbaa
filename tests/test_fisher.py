"""fisher_mask against a plain per-example autograd loop written here, independently."""

import pytest
import torch
from torch import nn

import sparsecomm
from reference import reference_fisher
from multirank import run_ranks
from sparsecomm.fisher import fisher_scores


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def model():
    torch.manual_seed(0)
    m = Net()
    m.bn.running_mean.uniform_(-0.1, 0.1)
    return m


def data(n, seed=0, bs=10):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def reference_scores(m, batches, method="empirical"):
    m.eval()
    out = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for x, y in batches:
        for i in range(len(x)):
            logits = m(x[i:i + 1])
            if method == "empirical":
                terms = [(1.0, nn.functional.cross_entropy(logits, y[i:i + 1]))]
            else:
                logp = torch.log_softmax(logits[0], 0)
                terms = [(logp[c].exp().item(), logp[c]) for c in range(3)]
            for w, t in terms:
                m.zero_grad()
                t.backward(retain_graph=True)
                for n, p in m.named_parameters():
                    out[n] += w * p.grad ** 2
    m.train()
    return out


def reference_mask(scores, k):
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    top = torch.zeros_like(flat, dtype=torch.bool)
    top[torch.topk(flat, k).indices] = True
    return top


@pytest.mark.parametrize("engine", ["layers", "vmap"])
@pytest.mark.parametrize("method", ["empirical", "expected"])
def test_vmap_scores_equal_per_example_loop(method, engine):
    m = model()
    ref = reference_scores(m, data(30), method)
    stats = {}
    got, seen = fisher_scores(m, data(30), nn.functional.cross_entropy, num_samples=30, method=method, chunk_size=7,
                              engine=engine, stats=stats)
    assert seen == 30 and stats["engine"] == engine
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7)
    assert m.training, "the model's mode is restored"


def test_mask_is_global_topk_of_scores():
    m = model()
    n = sum(p.numel() for p in m.parameters())
    mask = sparsecomm.fisher_mask(m, data(40), nn.functional.cross_entropy, density=0.05, num_samples=40)
    expected = reference_mask(reference_scores(m, data(40)), round(0.05 * n))
    got = torch.cat([mask[name].reshape(-1) for name, _ in m.named_parameters()])
    assert torch.equal(got, expected)


def two_rank_fisher(rank, world):
    m = model()
    mine = data(40)[rank::world]  # each rank holds different examples
    mask = sparsecomm.fisher_mask(m, mine, nn.functional.cross_entropy, density=0.05, num_samples=40)
    return mask.digest(), torch.cat([mask[n].reshape(-1) for n, _ in m.named_parameters()])


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_mask_equals_single_process_mask_over_all_data(world):
    results = run_ranks(two_rank_fisher, world)
    assert len({d for d, _ in results}) == 1
    m = model()
    n = sum(p.numel() for p in m.parameters())
    expected = reference_mask(reference_scores(m, data(40)), round(0.05 * n))
    assert torch.equal(results[0][1], expected)


def test_always_and_fewer_examples_warns():
    m = model()
    with pytest.warns(UserWarning, match="held 20 examples, fewer than its share 1024"):
        mask = sparsecomm.fisher_mask(m, data(20), nn.functional.cross_entropy, density=0.95, always=["fc.*"])
    assert mask["fc.weight"].all() and mask["fc.bias"].all()
    assert mask.num_selected == round(0.95 * sum(p.numel() for p in m.parameters()))


def test_bad_inputs():
    m = model()
    with pytest.raises(ValueError, match="density=0"):
        sparsecomm.fisher_mask(m, data(10), nn.functional.cross_entropy, density=0, num_samples=10)
    with pytest.raises(ValueError, match="method='fancy'"):
        sparsecomm.fisher_mask(m, data(10), nn.functional.cross_entropy, density=0.1, method="fancy")


def test_dict_inputs():
    """HF-style models take keyword tensors; per-example grads must still work."""
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask):
            h = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(1)
            return self.fc(h)

    torch.manual_seed(0)
    kw = KW()
    ids = torch.randint(0, 20, (6, 5))
    am = torch.ones(6, 5, dtype=torch.long)
    y = torch.randint(0, 2, (6,))
    stats = {}
    got, _ = fisher_scores(kw, [({"input_ids": ids, "attention_mask": am}, y)], nn.functional.cross_entropy,
                           num_samples=6, stats=stats)
    assert stats == {"engine": "layers"}  # nn.Embedding is scored by the layers engine
    want = reference_fisher(kw, [({"input_ids": ids, "attention_mask": am}, y)], nn.functional.cross_entropy)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n])


# ---- the "layers" engine on every layer kind it handles, and its fall-backs to vmap ----------------

def loop_scores(m, x, y):
    """Independent reference: one example at a time, plain autograd, eval mode."""
    return reference_fisher(m, [(x, y)], nn.functional.cross_entropy)


class Seq(nn.Module):
    """Linear per token (not once per example), LayerNorm, BatchNorm1d, a strided dilated conv with bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2)
        self.ln = nn.LayerNorm(6)
        self.tok = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.conv(x)                              # (B, 3, 4, 4)
        h = h.flatten(2)[:, :, :12].reshape(len(x), 6, 6)  # 6 "tokens" of width 6
        h = torch.tanh(self.tok(self.ln(h)))          # (B, 6, 5): Linear applied per token
        return self.head(torch.relu(self.bn(h.mean(1))))


def test_layers_engine_exact_on_sequences_layernorm_batchnorm1d_strided_conv():
    torch.manual_seed(0)
    m = Seq()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2)
    m.tok.bias.requires_grad_(False)  # frozen entries are not scored
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, 2, 8, 8, generator=g), torch.randint(0, 3, (13,), generator=g)
    stats = {}
    got, _ = fisher_scores(m, [(x[:9], y[:9]), (x[9:], y[9:])], nn.functional.cross_entropy, num_samples=13,
                           chunk_size=4, engine="layers", stats=stats)
    want = loop_scores(m, x, y)
    assert stats == {"engine": "layers"} and set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7)


class Inplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.back, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.back.weight = self.fc.weight

    def forward(self, x):
        return self.head(self.back(torch.tanh(self.fc(x))))


@pytest.mark.parametrize("cls, why", [(Inplace, "in place"), (Twice, "more than once"), (Tied, "shared")])
def test_auto_falls_back_to_vmap_and_stays_exact(cls, why):
    torch.manual_seed(0)
    m = cls()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    stats = {}
    got, _ = fisher_scores(m, [(x, y)], nn.functional.cross_entropy, num_samples=7, stats=stats)
    assert stats["engine"] == "vmap" and why in stats["fallback_reason"]
    want = loop_scores(m, x, y)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="engine='layers' cannot score this model"):
        fisher_scores(m, [(x, y)], nn.functional.cross_entropy, num_samples=7, engine="layers")


class Tokens(nn.Module):
    """Word embedding with padding_idx, a position embedding called with (1, L) ids (broadcast over
    the batch, as BERT does), a token-type embedding, LayerNorm, a per-token Linear, mean pooling."""

    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(11, 6, padding_idx=0)
        self.pos = nn.Embedding(7, 6)
        self.types = nn.Embedding(2, 6)
        self.ln = nn.LayerNorm(6)
        self.tok = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)  # (1, L)
        h = self.words(input_ids) + self.pos(positions) + self.types(token_type_ids)
        h = torch.tanh(self.tok(self.ln(h)))
        keep = (input_ids != 0).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1))


def test_layers_engine_embeddings_exact_with_repeated_ids_padding_and_broadcast_positions():
    """Per-example squared gradients of nn.Embedding against the batch-size-1 loop: ids repeated
    inside an example (their output gradients add up before squaring), ids shared by examples
    (squared per example, then added), padding_idx (row stays 0), position ids of batch 1."""
    torch.manual_seed(0)
    m = Tokens()
    ids = torch.tensor([[3, 3, 5, 3, 0, 0], [5, 2, 2, 0, 0, 0], [7, 3, 9, 9, 9, 1], [4, 0, 0, 0, 0, 0]])
    types = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2 + [[0, 1, 0, 1, 0, 1]] * 2)
    y = torch.tensor([0, 2, 1, 2])
    stats = {}
    got, _ = fisher_scores(m, [({"input_ids": ids[:3], "token_type_ids": types[:3]}, y[:3]),
                               ({"input_ids": ids[3:], "token_type_ids": types[3:]}, y[3:])],
                           nn.functional.cross_entropy, num_samples=4, engine="layers", stats=stats)
    assert stats == {"engine": "layers"}
    want = reference_fisher(m, [({"input_ids": ids, "token_type_ids": types}, y)], nn.functional.cross_entropy)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-9)
    assert got["words.weight"][0].abs().sum() == 0 and got["words.weight"][3].abs().sum() > 0


def test_embedding_with_max_norm_is_refused_by_the_layers_engine():
    m = Tokens()
    m.words.max_norm = 1.0  # renormalises rows in place during the forward
    ids, types = torch.tensor([[1, 2, 0]]), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_norm"):
        fisher_scores(m, [({"input_ids": ids, "token_type_ids": types}, torch.tensor([1]))],
                      nn.functional.cross_entropy, num_samples=1, engine="layers")
