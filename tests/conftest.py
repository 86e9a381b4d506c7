import pytest
import torch
from torch import nn
import torch.nn.functional as F

from ecoptim import NonFiniteGradientError

# Tests use small tensors: one thread is as fast, and stays fast when another job shares the 2 cores
# (OpenMP spin-waiting of two multi-threaded processes made the suite 30x slower here).
torch.set_num_threads(1)


class Block(nn.Module):
    """A small pre-norm transformer block (attention + SwiGLU MLP) built from nn.Linear layers."""

    def __init__(self, d: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        u, g = self.up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x))


def lm_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    """n reproducible batches of 4 token sequences for TinyLM."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 17), generator=g) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], sched=None) -> None:
    """One optimizer step (and scheduler step) per batch."""
    for idx in data:
        opt.zero_grad()
        lm_loss(model, idx).backward()
        opt.step()
        if sched is not None:
            sched.step()


def step_expecting_skip(opt, policy: str) -> None:
    """Step ``opt`` on gradients known to hold NaN/Inf: 'raise' must raise, the skipping policies must count
    one skipped step."""
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
