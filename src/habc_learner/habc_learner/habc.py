"""The HABC equations, one small function each, named after the paper's symbols (no rclpy).

Symbols (spec/habc.md):
    z_v(s)    viability logit; p_v(s) = sigmoid(z_v(s)) = P(success | s) under the policy
    V_e(s)    efficiency value: minus the number of steps still needed to succeed
    A_v, A_e  one-step viability and efficiency advantages
    g_t       the state-adaptive gate, in (0, 2)
Each function takes and returns tensors of matching shape, so every equation can be checked
by hand; `gate_diagnostics` returns the numbers worth logging.

Under data-parallel training (habc_learner.distributed) each process holds one shard of the
minibatch. The functions that average over the minibatch (Eq. 1, 4, 8) then take a
`ShardSum`, which turns a shard's statistic into the whole minibatch's: their normalisers
(B, the mask counts, Eq. 8's c) are those of the global batch, not of the shard.
"""

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias


class ShardSum:
    """Sum of a statistic over the shards of one minibatch; this default has one shard.

    `reduce(x)` returns the sum of the detached statistic `x` over all shards (here: `x`).
    A mean over the minibatch is then computed on each shard as
        shards * (sum over the shard) / (global count),
    because DistributedDataParallel averages the shards' gradients (divides by `shards`):
    the averaged gradient is exactly that of (global sum) / (global count).
    """

    shards: int = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


ONE_SHARD = ShardSum()


def weighted_bc_loss(per_sample_loss: torch.Tensor, w: torch.Tensor,
                     reduce: ShardSum = ONE_SHARD) -> torch.Tensor:
    """Eq. 1: L = (1/B) sum_i w_i * l_i, the weighted behaviour-cloning loss of the actor.

    B is the global minibatch size when the batch is sharded (`reduce`).
    """
    b = reduce(per_sample_loss.new_tensor(float(per_sample_loss.shape[0])))
    return reduce.shards * (w.detach() * per_sample_loss).sum() / b.clamp(min=1.0)


def efficiency_target(v_e_next: torch.Tensor, is_terminal_success: torch.Tensor) -> torch.Tensor:
    """Eq. 3: y_e(s_t) = 0 at the terminal success step, else -1 + stopgrad(V_e(s_{t+1})).

    No discount, so targets lie in [-T_max, 0].
    """
    return torch.where(is_terminal_success.bool(), torch.zeros_like(v_e_next),
                       -1.0 + v_e_next.detach())


def viability_loss(z_v: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                   reduce: ShardSum = ONE_SHARD) -> torch.Tensor:
    """Eq. 4, first term: binary cross-entropy of z_v against y over labelled windows."""
    losses = F.binary_cross_entropy_with_logits(z_v, torch.nan_to_num(y), reduction='none')
    return masked_mean(losses, mask, reduce)


def efficiency_loss(v_e: torch.Tensor, y_e: torch.Tensor, mask: torch.Tensor,
                    delta: float = 1.0, reduce: ShardSum = ONE_SHARD) -> torch.Tensor:
    """Eq. 4, second term: Huber(V_e, y_e) (delta = 1) over windows of successful episodes."""
    losses = F.huber_loss(v_e, y_e.detach(), reduction='none', delta=delta)
    return masked_mean(losses, mask, reduce)


def masked_mean(values: torch.Tensor, mask: torch.Tensor,
                reduce: ShardSum = ONE_SHARD) -> torch.Tensor:
    """Mean of `values` where mask is true; 0 (with a gradient path) when the mask is empty.

    The count is the global batch's when the batch is sharded (`reduce`).
    """
    mask = mask.to(values.dtype)
    count = reduce(mask.sum().detach()).clamp(min=1.0)
    return reduce.shards * (values * mask).sum() / count


def viability_advantage(z_v_t: torch.Tensor, z_v_next: torch.Tensor) -> torch.Tensor:
    """Eq. 5: A_v = z_v(s_{t+1}) - z_v(s_t), in logit space (keeps resolution near p_v = 1)."""
    return z_v_next - z_v_t


def efficiency_advantage(v_e_t: torch.Tensor, v_e_next: torch.Tensor,
                         steps: 'int | torch.Tensor' = 1) -> torch.Tensor:
    """Eq. 6: A_e = -1 + V_e(s_{t+1}) - V_e(s_t).

    With a stride of k steps between s_t and the next state (`steps`), the step cost is -k.
    """
    return -steps + v_e_next - v_e_t


def gate(z_v_t: torch.Tensor, a_v: torch.Tensor, a_e: torch.Tensor) -> torch.Tensor:
    """Eq. 7: g_t = 1 + tanh((1 - p_v) A_v + p_v A_e), p_v = sigmoid(z_v(s_t)); in (0, 2).

    Low viability: the weight follows the change of viability. High viability: it follows
    progress. No exponential, no temperature, no clipping.
    """
    p_v = torch.sigmoid(z_v_t)
    return 1.0 + torch.tanh((1.0 - p_v) * a_v + p_v * a_e)


def normalize_weights(w: torch.Tensor, is_sft: torch.Tensor, valid: torch.Tensor,
                      eps: float = 1e-6, reduce: ShardSum = ONE_SHARD) -> torch.Tensor:
    """Eq. 8: unit-mean normalisation over the valid non-SFT samples of the minibatch.

    c = mean(w~ over valid non-SFT samples); w = w~ / max(c, eps). SFT samples keep weight 1;
    invalid samples get 0. With a sharded batch (`reduce`), c is the global batch's mean.
    """
    is_sft, valid = is_sft.bool(), valid.bool()
    rollout = valid & ~is_sft
    w = w.detach()
    # Both sums are reduced on every shard, even one without rollout samples: the other
    # shards wait for it.
    total = reduce(torch.where(rollout, w, torch.zeros_like(w)).sum())
    count = reduce(rollout.sum().to(w.dtype))
    c = torch.where(count > 0, (total / count.clamp(min=1.0)).clamp(min=eps),
                    torch.ones_like(total))
    normalised = torch.where(is_sft, torch.ones_like(w), w / c)
    return torch.where(valid, normalised, torch.zeros_like(w))


def gate_diagnostics(z_v_t: torch.Tensor, a_v: torch.Tensor, a_e: torch.Tensor,
                     g: torch.Tensor) -> dict[str, float]:
    """Numbers worth logging about one batch of gates."""
    if g.numel() == 0:
        return {}
    p_v = torch.sigmoid(z_v_t)
    return {'mean_p_v': p_v.mean().item(), 'mean_A_v': a_v.mean().item(),
            'mean_A_e': a_e.mean().item(), 'mean_g': g.mean().item(),
            'min_g': g.min().item(), 'max_g': g.max().item()}
