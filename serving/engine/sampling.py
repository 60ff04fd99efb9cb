"""Sampling: request sampling parameters, logit processing and the rejection sampler.

Notation, fixed here for the whole project: p is the target's distribution, q the draft's,
k the number of drafted tokens in one step, V the vocabulary size. Every function is pure:
no models, caches or globals; randomness comes only from the `torch.Generator` passed in, or,
for a request with a seed, from `seeded_noise`, a function of the seed and the output position.

Seeded requests use an exponential race (the Gumbel-max trick): the token at output position t
is argmax_x p_t(x) / e_t(x), with e_t(x) ~ Exp(1) drawn from (seed, t) alone, which is a draw from
p_t. Drafts race with the same noise (argmax q_t / e_t), and the target's race decides, so the
text is the target's own seeded sample whatever the drafts, k, the batch or the replica; drafts
that agree with the target are simply accepted more often.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a distribution. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits [..., V] -> probabilities [..., V] after temperature, top-k, then top-p (HF's order).

    Greedy returns a one-hot at the argmax, so greedy decoding is the argmax special case of
    sampling, which the rejection sampler decides without drawing.
    """
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # [..., V]
        drop_sorted = mass_before >= params.top_p  # the top token always has mass_before == 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row from (unnormalised, non-negative) weights [..., V] -> ids [...].

    Inverse-CDF sampling, one uniform per row: the first token whose cumulative weight reaches
    u * total, u in (0, 1], so a zero-weight token is never drawn.
    """
    cdf = probs.double().cumsum(-1)  # [..., V]
    u = 1 - torch.rand(cdf.shape[:-1] + (1,), generator=generator, dtype=cdf.dtype, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[..., -1:]).squeeze(-1)  # [...]


MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A 64-bit seed for one output position of a seeded request (splitmix64 of both)."""
    x = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def seeded_noise(seed: int, first: int, count: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [count, V] for output positions first..first + count - 1 of a seeded request;
    each row depends on (seed, position) only."""
    rows = []
    for position in range(first, first + count):
        generator = torch.Generator(device=device).manual_seed(position_seed(seed, position))
        rows.append(-torch.rand(vocab, generator=generator, device=device).log())  # (0, inf]
    return torch.stack(rows) if rows else torch.empty(0, vocab, device=device)


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race's winners: ids [...] = argmax probs / noise over the last axis (the
    first columns of `noise` when probs has fewer); each is a draw from its row of probs."""
    return (probs / noise[..., : probs.shape[-1]]).argmax(-1)


@dataclass(frozen=True)
class Verification:
    """Outcome of verifying a batch of proposals.

    tokens: [B, k+1] emitted tokens per row, the accepted draft tokens then one recovered or
        bonus token, padded with -1 after it.
    num_accepted: [B] accepted draft tokens per row (0..k); each row emits num_accepted + 1 tokens.
    """

    tokens: torch.Tensor
    num_accepted: torch.Tensor


def rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
    one_hot: bool = False,
) -> Verification:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), batched over rows.

    target_probs: [B, k+1, V] p at each drafted position plus the bonus position.
    draft_tokens: [B, k] the drafted tokens x_1..x_k.
    draft_probs:  [B, k, V] q at each drafted position, or None for a deterministic proposer
        (q is then one-hot at the drafted token, as for n-gram lookup).

    Draft token x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)). At the first
    rejection a token is drawn from norm(max(0, p_i - q_i)); when all k are accepted a bonus
    token is drawn from p_{k+1}. Each emitted token is then distributed exactly as p, whatever q
    is, provided p and q were processed (temperature, top-k, top-p) identically.

    When every p is one-hot (greedy, or a seeded race's winner) the caller says so (`one_hot`):
    x_i is accepted exactly when it is p_i's argmax, whatever q is, and the next token is the
    argmax at the first mismatch, decided by comparison alone, with no draw from the generator.
    (The general path gives the same distribution for one-hot p, drawing.) Nothing here reads a
    value back to the host: on a GPU the step runs without a synchronisation.
    """
    batch, k_plus_1, vocab = target_probs.shape
    k = k_plus_1 - 1
    positions = torch.arange(k_plus_1, device=target_probs.device)  # [k+1]
    if one_hot:
        argmax = target_probs.argmax(-1)  # [B, k+1]
        num_accepted = (draft_tokens == argmax[:, :k]).cumprod(-1).sum(-1)  # [B] leading accepts
        tokens = argmax.masked_fill(positions > num_accepted.unsqueeze(-1), -1)  # [B, k+1]
        return Verification(tokens=tokens, num_accepted=num_accepted)

    drafted = draft_tokens.unsqueeze(-1)  # [B, k, 1]
    # q with a zero row at the bonus position, so one residual covers recovery and bonus alike.
    q_padded = target_probs.new_zeros(batch, k_plus_1, vocab)  # [B, k+1, V]
    if draft_probs is None:
        q_padded[:, :k].scatter_(-1, drafted, 1.0)
    else:
        q_padded[:, :k] = draft_probs

    p_drafted = target_probs[:, :k].gather(-1, drafted).squeeze(-1)  # [B, k]
    q_drafted = q_padded[:, :k].gather(-1, drafted).squeeze(-1)  # [B, k]
    uniform = torch.rand(batch, k, generator=generator, device=target_probs.device)  # [B, k]
    accepted = uniform * q_drafted < p_drafted  # u < p/q without dividing by q
    num_accepted = accepted.cumprod(-1).sum(-1)  # [B] leading accepts

    first_rejected = num_accepted.view(batch, 1, 1)  # or the bonus position
    p_next = target_probs.take_along_dim(first_rejected, 1).squeeze(1)  # [B, V]
    residual = (p_next - q_padded.take_along_dim(first_rejected, 1).squeeze(1)).clamp_min(0.0)  # [B, V]
    # p == q up to rounding leaves no residual mass; p itself is then the exact fallback.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    next_token = sample(residual, generator)  # [B]

    tokens = torch.nn.functional.pad(draft_tokens, (0, 1), value=-1)  # [B, k+1]
    tokens = tokens.masked_fill(positions >= num_accepted.unsqueeze(-1), -1)
    tokens.scatter_(1, num_accepted.unsqueeze(-1), next_token.unsqueeze(-1))
    return Verification(tokens=tokens, num_accepted=num_accepted)
