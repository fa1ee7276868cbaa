"""Models the tasks and benchmarks train. Plain ``nn.Module``s, float32, freshly initialised.

    mlp(in_features, hidden, depth, num_classes)   (B, in_features) -> (B, num_classes)
    small_cnn(num_classes=10)                      (B, 1, 8, 8)     -> (B, num_classes), 149,938 params
    resnet18(num_classes=10) / resnet34(...)       (B, 3, 32, 32)   -> (B, num_classes), CIFAR variant
    gpt2(vocab_size, n_layer, n_head, n_embd, block_size, num_classes=None)
                                                   (B, T) int64     -> (B, T, vocab) or (B, num_classes)

Every classifier ends in one ``nn.Linear`` named ``head`` (``HEAD = ["head.*"]``), so a mask can
keep the head whole with ``always=HEAD``. Build under ``torch.device("meta")`` to count the
parameters of a large configuration without allocating it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEAD = ["head.*"]  # glob patterns of the classifier head of every model here

# mlp(**MLP_25M): 1024 -> 5 x 2368 -> 10, 24,890,058 parameters (the "25M MLP" of the benchmarks).
# Count: in*h + h + (depth-1)*(h*h + h) + h*C + C. Other ways to ~25M: (2048, 2560, 4) = 24.9M.
MLP_25M = dict(in_features=1024, hidden=2368, depth=5, num_classes=10)
# gpt2(**GPT2_SMALL): GPT-2 small, 124,439,808 parameters with the LM head tied to the embedding.
GPT2_SMALL = dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024)


def num_params(model: nn.Module) -> int:
    """Number of parameter entries (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- MLP

class MLP(nn.Module):
    """``depth`` hidden layers of width ``hidden`` (Linear + ReLU), then ``head``: Linear(hidden, C)."""

    layer_chain = True  # one chain of layers in registration order: width cores apply (sparsecomm.width_core)

    def __init__(self, in_features: int, hidden: int, depth: int, num_classes: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp depth={depth}: need at least 1 hidden layer")
        widths = [in_features] + [hidden] * depth
        self.body = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_features) float -> logits (B, num_classes); extra dims are flattened."""
        return self.head(self.body(x.flatten(1)))


def mlp(in_features: int, hidden: int, depth: int, num_classes: int) -> MLP:
    """MLP with ``in*h + h + (depth-1)*(h*h+h) + h*C + C`` parameters; ``mlp(**MLP_25M)`` is ~25M."""
    return MLP(in_features, hidden, depth, num_classes)


# ---------------------------------------------------------------------------------------- digits CNN

class SmallCNN(nn.Module):
    """CNN for 8x8 grey digits: 3 conv+BN layers (32, 64, 128 ch, two 2x2 pools), 2 FC, ``head``.

    The head is Linear(32, C): 330 entries for 10 classes, 0.22% of the model, so it fits a
    0.5%-density mask budget whole with room to spare.
    """

    layer_chain = True  # see MLP

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(a, b):
            return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]  # BN holds the bias

        self.features = nn.Sequential(*block(1, 32), *block(32, 64), nn.MaxPool2d(2),   # 64 x 4 x 4
                                      *block(64, 128), nn.MaxPool2d(2), nn.Flatten())   # 128 x 2 x 2
        self.fc = nn.Sequential(nn.Linear(512, 104), nn.ReLU(), nn.Linear(104, 32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 8, 8) float32 in [0, 1] -> logits (B, num_classes)."""
        return self.head(self.fc(self.features(x)))


def small_cnn(num_classes: int = 10) -> SmallCNN:
    """The digits CNN, 149,938 parameters for 10 classes."""
    return SmallCNN(num_classes)


# ------------------------------------------------------------------------------------ CIFAR ResNet

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for 32x32 images (He et al. 2016, CIFAR variant): 3x3 stem, no max-pool,
    four stages of BasicBlocks (64, 128, 256, 512 ch; stride 1, 2, 2, 2), global average pool, ``head``."""

    def __init__(self, blocks: list[int], num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, (n, cout) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.head = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 32, 32) float32 (normalised) -> logits (B, num_classes)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18, CIFAR variant: 11,173,962 parameters for 10 classes."""
    return ResNet([2, 2, 2, 2], num_classes)


def resnet34(num_classes: int = 10) -> ResNet:
    """ResNet-34, CIFAR variant: 21,282,122 parameters for 10 classes."""
    return ResNet([3, 4, 6, 3], num_classes)


# ------------------------------------------------------------------------------------------- GPT-2

class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"gpt2 n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp.gelu = nn.GELU(approximate="tanh")
        self.mlp.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2-shaped decoder (nanoGPT layout: pre-LN blocks, learned positions, biases, GELU-tanh).

    ``num_classes=None``: language model, ``lm_head`` tied to ``transformer.wte``.
    ``num_classes=C``: sequence classifier, ``head`` = Linear(n_embd, C) on the last token's state.
    """

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int,
                 num_classes: int | None = None):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))
        if num_classes is None:
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        else:
            self.head = nn.Linear(n_embd, num_classes)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) int64 token ids, T <= block_size.
        Returns LM logits (B, T, vocab_size) float32, or class logits (B, num_classes)."""
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size={self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if hasattr(self, "head"):
            return self.head(x[:, -1])
        return self.lm_head(x)


def gpt2(vocab_size: int = 50257, n_layer: int = 12, n_head: int = 12, n_embd: int = 768,
         block_size: int = 1024, num_classes: int | None = None) -> GPT:
    """GPT-2 shape; the defaults (= ``GPT2_SMALL``) are GPT-2 small, 124,439,808 parameters as an LM.

    Count: V*E + block*E + L*(12*E*E + 13*E) + 2*E, plus E*C + C with ``num_classes=C``.
    """
    return GPT(vocab_size, n_layer, n_head, n_embd, block_size, num_classes)
