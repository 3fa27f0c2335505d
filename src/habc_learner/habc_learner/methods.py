"""Every method of the paper, plus two baselines it lacks, on one actor and one loss.

All methods train the same policy with the weighted behaviour-cloning loss of Eq. 1; they
differ only in which samples they use and how they weight them:

    sft          demonstrations only, weight 1
    imit_dagger  50/50 demonstrations and intervention (human) windows, no rollouts, weight 1
    imit_recap   distributional value head, mixed TD/Monte-Carlo target, reward -C on failed
                 episodes; rollout samples weighted 1 iff their TD residual clears a
                 threshold chosen on held-out episodes, else 0; no intervention-aware labels
    habc_v       HABC with the viability head only (A_e := 0 in the gate)
    habc         viability + efficiency heads, gate g_t, intervention-aware credit
    habc_ir      habc, and human windows weighted by g_t from `ir_start_step` on
    habc_naive   habc with naive credit: the outcome on every window, interventions included
    awr          exp(A / beta), clipped, from a single value critic

`Algorithm.update(batch, step)` runs one gradient step of actor and critic and returns
metrics (`losses/*`, `weights/*`, `critic/*`).
"""

import copy
from dataclasses import dataclass, replace
import enum
import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from habc_learner.credit import CreditConfig
from habc_learner.critics import DistributionalValue, ScalarValue
from habc_learner.data import HumanWindowTargets, RewardConfig, SampleBuffer, WeightCode
from habc_learner.feature_cache import DEFAULT_MAX_ROWS, FeatureCache
from habc_learner.habc import (
    efficiency_advantage,
    efficiency_loss,
    efficiency_target,
    gate,
    masked_mean,
    normalize_weights,
    ONE_SHARD,
    ShardSum,
    viability_advantage,
    viability_loss,
    weighted_bc_loss,
)
from habc_policy.models.critic import DualHeadCritic


class Method(enum.StrEnum):
    SFT = 'sft'
    IMIT_DAGGER = 'imit_dagger'
    IMIT_RECAP = 'imit_recap'
    HABC_V = 'habc_v'
    HABC = 'habc'
    HABC_IR = 'habc_ir'
    HABC_NAIVE = 'habc_naive'
    AWR = 'awr'


HABC_FAMILY = (Method.HABC_V, Method.HABC, Method.HABC_IR, Method.HABC_NAIVE)


class AdvantageNetwork(enum.StrEnum):
    """Which critic gives both terms of an advantage (and the gate's p_v(s_t))."""

    TARGET = 'target'  # the slowly following copy, at s_t and at s_{t+1}
    ONLINE = 'online'  # the critic being trained, under stop-gradient, at both
    MIXED = 'mixed'    # online at s_t, target at s_{t+1}: the first implementation, whose
                       # lag biases every advantage (kept for ablations)


@dataclass(frozen=True)
class MethodConfig:
    """One config value (`method`) selects the method; the rest are its settings.

    Where the paper is silent the default is ours (marked "ours").
    """

    method: str = Method.HABC
    horizon: int = 50
    min_human_steps: int | None = None      # None: 10 of 50 scaled to the horizon
    warmup_steps: int = 500                 # N_wu: g_t = 1 for the first steps
    ir_start_step: int = 0                  # habc_ir: human windows get g_t from this step
    next_stride: int = 1                    # ours: s_{t+1} is the next control step
    advantage_network: str = AdvantageNetwork.TARGET   # both terms from one network
    human_window_targets: str = HumanWindowTargets.HUMAN_STEPS  # imitate the human's steps
    eps: float = 1e-6                       # Eq. 8
    critic_hidden_dim: int = 256            # ours: MLP trunk over detached policy features
    critic_layers: int = 2
    efficiency_scale: float = 100.0         # ours: V_e head predicts V_e / scale
    target_tau: float = 0.1                 # ours: Polyak rate of the critic copy that
                                            # gives the stop-gradient TD targets (1 = none)
    efficiency_uses_demos: bool = True      # ours: demonstrations are successful episodes
    dagger_demo_fraction: float = 0.5
    failure_cost: float = 100.0             # Imit-Recap / AWR: reward -C on failure
    step_reward: float = -1.0               # ours: time penalty per step
    gamma: float = 0.99
    recap_mc_mix: float = 0.5               # ours: target = mix * MC + (1 - mix) * TD
    recap_bins: int = 101
    recap_keep_fraction: float = 0.25       # threshold = (1 - keep) quantile on held-out
                                            # episodes: the paper's Recap passed 19-27%
    recap_holdout_fraction: float = 0.2
    recap_threshold_every: int = 200
    awr_beta: float = 1.0
    awr_max_weight: float = 20.0

    def __post_init__(self) -> None:
        for name, kind in (('method', Method), ('advantage_network', AdvantageNetwork),
                           ('human_window_targets', HumanWindowTargets)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ValueError(f'unknown {name} {getattr(self, name)!r}; choose one of '
                                 f'{[m.value for m in kind]}') from None
        checks = [
            (self.horizon >= 1, 'horizon must be >= 1'),
            (self.warmup_steps >= 0, 'warmup_steps must be >= 0'),
            (self.ir_start_step >= 0, 'ir_start_step must be >= 0'),
            (self.next_stride >= 1, 'next_stride must be >= 1'),
            (self.eps > 0, 'eps must be > 0'),
            (self.efficiency_scale > 0, 'efficiency_scale must be > 0'),
            (0.0 < self.target_tau <= 1.0, 'target_tau must be in (0, 1]'),
            (0.0 <= self.dagger_demo_fraction <= 1.0, 'dagger_demo_fraction must be in [0, 1]'),
            (0.0 < self.gamma <= 1.0, 'gamma must be in (0, 1]'),
            (0.0 <= self.recap_mc_mix <= 1.0, 'recap_mc_mix must be in [0, 1]'),
            (0.0 < self.recap_keep_fraction <= 1.0, 'recap_keep_fraction must be in (0, 1]'),
            (0.0 < self.recap_holdout_fraction < 1.0,
             'recap_holdout_fraction must be in (0, 1)'),
            (self.recap_bins >= 2, 'recap_bins must be >= 2'),
            (self.awr_beta > 0, 'awr_beta must be > 0'),
            (self.awr_max_weight > 0, 'awr_max_weight must be > 0'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f'MethodConfig: {message}')
        CreditConfig(self.horizon, self.min_human_steps)  # validates k against H

    def credit_config(self) -> CreditConfig:
        return CreditConfig(horizon=self.horizon, min_human_steps=self.min_human_steps,
                            naive=self.method == Method.HABC_NAIVE)

    def reward_config(self) -> RewardConfig:
        return RewardConfig(self.failure_cost, self.step_reward, self.gamma)

    def make_buffer(self) -> SampleBuffer:
        """Return an empty buffer with this method's credit and reward settings."""
        return SampleBuffer(self.credit_config(), self.reward_config(), self.next_stride,
                            self.efficiency_uses_demos, self.human_window_targets)


class Algorithm:
    """One method: which samples it trains on, its critic, and its update step."""

    def __init__(self, policy: torch.nn.Module, config: MethodConfig,
                 actor_lr: float = 3e-4, critic_lr: float = 1e-3,
                 grad_clip: float = 1.0, feature_cache_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.policy = policy
        self.config = config
        self.method = Method(config.method)
        self.grad_clip = grad_clip
        self.critic = self._make_critic()
        # A slowly following copy evaluates s_{t+1} for the TD targets and advantages: plain
        # stop-gradient bootstrapping without discount diverged in our tests.
        self.target_critic = copy.deepcopy(self.critic) if self.critic is not None else None
        if self.target_critic is not None:
            self.target_critic.requires_grad_(False)
        # Only the parameters that train: a frozen pretrained backbone (TransformersVLA) has
        # hundreds of tensors that the optimizer and gradient clipping would walk every step
        # for nothing, and it must never get optimizer state.
        self.actor_parameters = [p for p in policy.parameters() if p.requires_grad]
        self.actor_optimizer = torch.optim.AdamW(self.actor_parameters, lr=actor_lr)
        self.critic_optimizer = (torch.optim.AdamW(self.critic.parameters(), lr=critic_lr)
                                 if self.critic is not None else None)
        self.recap_threshold = -math.inf
        self._holdout_episodes: set[int] = set()
        # Features of s_{t+1} reuse what a frozen backbone computed for the same frame
        # before (inert for a policy with no cacheable features; rows x width floats).
        self.feature_cache = FeatureCache(feature_cache_rows)
        # Data-parallel training (`distribute`): the grad-enabled forwards run through
        # DistributedDataParallel modules, and the minibatch means use global sums.
        self._actor_ddp: torch.nn.Module | None = None
        self._critic_ddp: torch.nn.Module | None = None
        self.reduce: ShardSum = ONE_SHARD

    def distribute(self, device: str = 'cpu') -> 'Algorithm':
        """Train data-parallel in the current process group (habc_learner.distributed).

        Actor and critic forwards run through DistributedDataParallel, which averages the
        gradients over the processes during backward (so clipping after it sees the same
        gradients everywhere) and starts every process from rank 0's weights; the
        minibatch means of the losses and Eq. 8 use the global batch's counts.
        """
        from torch.nn.parallel import DistributedDataParallel

        from habc_learner.distributed import GlobalBatchSum

        ids = [torch.device(device).index] if device.startswith('cuda') else None
        # find_unused_parameters: policies and methods differ in what one loss touches
        # (habc_v leaves the efficiency head idle, the 'l2' head the noise inputs); the
        # graph walk it costs is small next to the forward. Buffers (normalisation
        # statistics) never change in training: no broadcast per forward.
        options = {'device_ids': ids, 'find_unused_parameters': True,
                   'broadcast_buffers': False}
        self._actor_ddp = DistributedDataParallel(_ActorLoss(self.policy), **options)
        if self.critic is not None:
            self._critic_ddp = DistributedDataParallel(self.critic, **options)
        self.reduce = GlobalBatchSum()
        return self

    def _critic_forward(self, features: torch.Tensor):
        """Run the critic's grad-enabled forward (through DDP when data-parallel)."""
        critic = self._critic_ddp if self._critic_ddp is not None else self.critic
        return critic(features)

    def to(self, device: torch.device | str) -> 'Algorithm':
        """Move the critic and its target copy to `device` (the policy's owner moves it)."""
        for critic in (self.critic, self.target_critic):
            if critic is not None:
                critic.to(device)
        return self

    def training_state(self) -> dict[str, dict]:
        """Return what training carries beyond the weights: AdamW moments, target critic.

        A run that goes on from a checkpoint with this state (`load_training_state`) takes
        the same steps as one that never stopped, instead of restarting Adam's bias
        correction from zero and the target critic from the online one.
        """
        state = {'actor_optimizer': self.actor_optimizer.state_dict()}
        if self.critic is not None:
            state['critic_optimizer'] = self.critic_optimizer.state_dict()
            state['target_critic'] = {k: v.detach().cpu()
                                      for k, v in self.target_critic.state_dict().items()}
        return state

    def load_training_state(self, state: dict[str, dict]) -> None:
        """Go on from `training_state()`; ValueError, changing nothing, if it does not fit.

        It fits when it comes from the same method (a critic or none) and the same trainable
        parameters, shape for shape.
        """
        expected = {'actor_optimizer'} | ({'critic_optimizer', 'target_critic'}
                                          if self.critic is not None else set())
        if set(state) != expected:
            raise ValueError(f'training state holds {sorted(state)}, this {self.method.value} '
                             f'training needs {sorted(expected)}')
        _check_optimizer_state(self.actor_optimizer, state['actor_optimizer'], 'actor')
        if self.critic is not None:
            _check_optimizer_state(self.critic_optimizer, state['critic_optimizer'], 'critic')
            ours = self.target_critic.state_dict()
            theirs = state['target_critic']
            if {k: tuple(v.shape) for k, v in ours.items()} != {
                    k: tuple(v.shape) for k, v in theirs.items()}:
                raise ValueError('training state: the target critic has other tensors than '
                                 'this critic')
        _load_moments(self.actor_optimizer, state['actor_optimizer'])
        if self.critic is not None:
            _load_moments(self.critic_optimizer, state['critic_optimizer'])
            with torch.no_grad():
                self.target_critic.load_state_dict(state['target_critic'])

    def branch_with_intervention_reweighting(self, start_step: int) -> 'Algorithm':
        """Return a copy of this HABC algorithm (actor, critic, optimisers) with IR on.

        The paper's second stage: HABC+IR continues from HABC's checkpoint once the
        viability head is trained; human windows get g_t from `start_step` on.
        """
        if self.method != Method.HABC:
            raise ValueError(f'HABC+IR branches from HABC, not from {self.method.value}')
        if self.reduce is not ONE_SHARD:
            raise ValueError('HABC+IR cannot branch from data-parallel training; branch '
                             'first, then distribute')
        branch = copy.deepcopy(self)
        branch.config = replace(self.config, method=Method.HABC_IR, ir_start_step=start_step)
        branch.method = Method.HABC_IR
        return branch

    def _make_critic(self) -> torch.nn.Module | None:
        c, feature_dim = self.config, self.policy.feature_dim
        if self.method in HABC_FAMILY:
            return DualHeadCritic(feature_dim, c.critic_hidden_dim, c.critic_layers,
                                  c.efficiency_scale)
        if self.method == Method.AWR:
            return ScalarValue(feature_dim, c.critic_hidden_dim, c.critic_layers)
        if self.method == Method.IMIT_RECAP:
            # Returns lie between an endless run of step costs ending in failure and 0.
            # (gamma = 1 has no such bound; 1000 steps stand in for one.)
            steps = 1.0 / (1.0 - c.gamma) if c.gamma < 1 else 1000.0
            v_min = min(c.step_reward * steps - c.failure_cost, -1.0)
            return DistributionalValue(feature_dim, v_min, 0.0, c.recap_bins,
                                       c.critic_hidden_dim, c.critic_layers)
        return None

    # --- which samples ------------------------------------------------------------------
    def actor_mask(self, table: dict[str, np.ndarray]) -> np.ndarray:
        """Return the mask of samples that enter the actor loss."""
        sft = table['is_sft']
        if self.method == Method.SFT:
            return sft
        if self.method == Method.IMIT_DAGGER:
            return sft | self._intervention_windows(table)
        if self.method in (Method.IMIT_RECAP, Method.AWR):
            return sft | table['is_rollout_labelled']
        return sft | (table['weight_code'] != WeightCode.EXCLUDED)

    def critic_mask(self, table: dict[str, np.ndarray]) -> np.ndarray:
        """Return the mask of samples that train the critic (none without a critic)."""
        if self.method in HABC_FAMILY:
            trains_e = table['trains_efficiency'] & (self.method != Method.HABC_V)
            return table['trains_viability'] | trains_e
        if self.method in (Method.IMIT_RECAP, Method.AWR):
            trainable = table['is_sft'] | table['is_rollout_labelled']
            return trainable & ~np.isin(table['episode'], list(self._holdout_episodes))
        return np.zeros(len(table['is_sft']), dtype=bool)

    @staticmethod
    def _intervention_windows(table: dict[str, np.ndarray]) -> np.ndarray:
        return table['is_human'] & ~table['is_sft'] & (table['weight_code']
                                                        != WeightCode.EXCLUDED)

    def sample_indices(self, table: dict[str, np.ndarray], batch_size: int,
                       rng: np.random.Generator) -> np.ndarray:
        """Draw a minibatch of sample indices for this method."""
        if self.method == Method.IMIT_DAGGER:
            demos = np.flatnonzero(table['is_sft'])
            interventions = np.flatnonzero(self._intervention_windows(table))
            if len(interventions) and len(demos):
                n_demo = int(round(batch_size * self.config.dagger_demo_fraction))
                return np.concatenate([rng.choice(demos, n_demo),
                                       rng.choice(interventions, batch_size - n_demo)])
        return rng.choice(self.sample_pool(table), batch_size)

    def sample_pool(self, table: dict[str, np.ndarray]) -> np.ndarray:
        """Return the indices of the samples minibatches come from (actor or critic).

        Imit-DAgger's 50/50 draw from two pools is `sample_indices`' alone.

        Raises:
            ValueError: no sample at all (the message says what the method needs).
        """
        pool = np.flatnonzero(self.actor_mask(table) | self.critic_mask(table))
        if len(pool) == 0:
            needs = 'demonstrations' if self.method == Method.SFT else 'labelled episodes'
            raise ValueError(f'no training samples for method {self.method.value}: it needs '
                             f'{needs}')
        return pool

    def prepare(self, buffer: SampleBuffer, rng: np.random.Generator) -> None:
        """Once the buffer is known: pick Imit-Recap's held-out episodes."""
        if self.method in (Method.IMIT_RECAP, Method.AWR):
            rollouts = sorted({int(e) for e in buffer.table['episode'][
                buffer.table['is_rollout_labelled']]})
            n_holdout = int(round(len(rollouts) * self.config.recap_holdout_fraction))
            if self.method == Method.IMIT_RECAP and n_holdout >= 1 and len(rollouts) > 1:
                self._holdout_episodes = {int(e) for e in rng.choice(rollouts, n_holdout,
                                                                      replace=False)}

    # --- features -----------------------------------------------------------------------
    def encode(self, obs: dict) -> torch.Tensor:
        """Return the policy's features of `obs`, through the feature cache (same values)."""
        return self.feature_cache.encode(self.policy, obs)

    def warm_feature_cache(self, buffer: SampleBuffer, device: torch.device | str = 'cpu',
                           chunk: int = 256) -> int:
        """Cache the features of every frame of `buffer` now; return how many were computed.

        Not needed for correctness or for the cache to fill (the steps fill it); it reaches
        the steady state of later rounds at once.
        """
        return self.feature_cache.warm(self.policy, buffer, device, chunk)

    # --- one gradient step --------------------------------------------------------------
    def update(self, batch: dict, step: int) -> dict[str, float]:
        """One gradient step of actor (and critic); return metrics."""
        if self._actor_ddp is not None:
            features, per_sample = self._actor_ddp(batch['obs'])
        else:
            features, per_sample = self.policy.features_and_loss(batch['obs'])
        # The actor's pass computed s_t's frame features anyway: s_{t+1} lookups reuse them.
        self.feature_cache.store(self.policy, batch['obs'], features)
        stats: dict[str, float] = {}
        w, critic_loss = self.compute_weights(batch, features.detach(), step, stats)
        actor_valid = batch['masks']['actor']
        actor_loss = weighted_bc_loss(per_sample, w, self.reduce)

        self.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        stats['losses/actor_grad_norm'] = float(torch.nn.utils.clip_grad_norm_(
            self.actor_parameters, self.grad_clip))
        self.actor_optimizer.step()
        if critic_loss is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.grad_clip)
            self.critic_optimizer.step()
            self._update_target()
            stats['losses/critic'] = critic_loss.item()

        stats['losses/actor'] = actor_loss.item()
        stats['losses/bc_unweighted'] = masked_mean(per_sample.detach(), actor_valid,
                                                    self.reduce).item()
        valid_rollout = actor_valid & ~batch['is_sft']
        if valid_rollout.any():
            stats['weights/zero_share'] = (w[valid_rollout] <= 1e-8).float().mean().item()
            stats['weights/max'] = w[valid_rollout].max().item()
        return stats

    @torch.no_grad()
    def _update_target(self) -> None:
        tau = self.config.target_tau
        for target, online in zip(self.target_critic.parameters(), self.critic.parameters(),
                                  strict=True):
            target.lerp_(online, tau)
        for target, online in zip(self.target_critic.buffers(), self.critic.buffers(),
                                  strict=True):
            target.copy_(online)

    def compute_weights(self, batch: dict, features: torch.Tensor, step: int,
                        stats: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised actor weights w (B,) of a batch, and the critic loss (None if no critic).

        `features` are the detached policy features of batch['obs'].
        """
        actor_valid = batch['masks']['actor']
        critic_loss = None
        if self.method in (Method.SFT, Method.IMIT_DAGGER):
            w = actor_valid.float()
        else:
            with torch.no_grad():
                next_features = self.encode(batch['next_obs'])
                adv_features = (next_features if batch['adv_obs'] is batch['next_obs']
                                else self.encode(batch['adv_obs']))
            if self.method in HABC_FAMILY:
                w, critic_loss = self._habc_weights(batch, features, next_features,
                                                    adv_features, step, stats)
            else:
                w, critic_loss = self._value_weights(batch, features, next_features, step,
                                                     stats)
        return (normalize_weights(w, batch['is_sft'], actor_valid, self.config.eps, self.reduce),
                critic_loss)

    def _habc_weights(self, batch, f_t, f_next, f_adv, step, stats):
        c = self.config
        z_v_t, v_e_t = self._critic_forward(f_t)
        with torch.no_grad():
            z_v_next, v_e_next = self.target_critic(f_next)
        labelled = batch['trains_viability']
        loss_v = viability_loss(z_v_t, batch['label'], labelled, self.reduce)
        critic_loss = loss_v
        stats['losses/viability'] = loss_v.item()
        if self.method != Method.HABC_V:
            y_e = efficiency_target(v_e_next, batch['terminal_success'])
            loss_e = efficiency_loss(v_e_t, y_e, batch['trains_efficiency'],
                                     reduce=self.reduce)
            critic_loss = critic_loss + loss_e
            stats['losses/efficiency'] = loss_e.item()

        with torch.no_grad():
            target_adv = (z_v_next, v_e_next) if f_adv is f_next else None
            g, z_gate, a_v, a_e = self._gate(batch, f_t, f_adv, (z_v_t.detach(),
                                                                 v_e_t.detach()), target_adv)
            if step < c.warmup_steps:
                g = torch.ones_like(g)
            code = batch['weight_code']
            w = torch.zeros_like(g)
            w = torch.where(code == WeightCode.GATE, g, w)
            w = torch.where(code == WeightCode.ONE, torch.ones_like(g), w)
            human = batch['is_human'] & ~batch['is_sft'] & (code == WeightCode.ONE)
            if self.method == Method.HABC_IR and step >= c.ir_start_step:
                w = torch.where(human, g, w)
            w = torch.where(batch['is_sft'], torch.ones_like(g), w)
            self._log_weights(stats, batch, g, z_gate, a_v, a_e, human)
        return w, critic_loss

    @torch.no_grad()
    def _gate(self, batch: dict, f_t: torch.Tensor, f_adv: torch.Tensor,
              online_t: tuple[torch.Tensor, torch.Tensor],
              target_adv: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, ...]:
        """g_t, the z_v(s_t) it used, A_v and A_e of a batch (features of s_t and s_{t+k}).

        Both terms of each advantage come from the network `advantage_network` names;
        `online_t` are the online heads at s_t, `target_adv` (optional) the target's at
        s_{t+k}, when the caller has them already.
        """
        network = self.config.advantage_network
        if network == AdvantageNetwork.ONLINE:
            z_t, v_t = online_t
            z_next, v_next = self.critic(f_adv)
        else:
            z_t, v_t = online_t if network == AdvantageNetwork.MIXED else self.target_critic(f_t)
            z_next, v_next = target_adv if target_adv is not None else self.target_critic(f_adv)
        is_last = batch['is_last']
        # At the last step there is no s_{t+1}: viability does not change, and after a
        # terminal success nothing remains to be done (V_e = 0).
        a_v = viability_advantage(z_t, torch.where(is_last, z_t, z_next))
        if self.method == Method.HABC_V:
            a_e = torch.zeros_like(a_v)
        else:
            v_next = torch.where(batch['terminal_success'] & is_last, torch.zeros_like(v_next),
                                 torch.where(is_last, v_t, v_next))
            steps = torch.where(is_last, torch.ones_like(batch['adv_steps']),
                                batch['adv_steps']).to(v_next.dtype)
            a_e = efficiency_advantage(v_t, v_next, steps)
        return gate(z_t, a_v, a_e), z_t, a_v, a_e

    def _log_weights(self, stats, batch, g, z_v, a_v, a_e, human):
        code = batch['weight_code']
        success = (code == WeightCode.GATE) & ~batch['is_sft'] & ~batch['is_human']
        for name, mask in (('rollout_success', success), ('human', human)):
            if mask.any():
                stats[f'weights/mean_g_{name}'] = g[mask].mean().item()
        labelled = batch['trains_viability']
        if labelled.any():
            p_v = torch.sigmoid(z_v[labelled])
            y = batch['label'][labelled]
            stats['critic/p_v_mean'] = p_v.mean().item()
            stats['critic/brier'] = ((p_v - y) ** 2).mean().item()
            for outcome, value in (('success', 1.0), ('failure', 0.0)):
                if (y == value).any():
                    stats[f'critic/p_v_{outcome}'] = p_v[y == value].mean().item()
            stats['critic/mean_A_v'] = a_v[labelled].mean().item()
            stats['critic/mean_A_e'] = a_e[labelled].mean().item()

    def _value_weights(self, batch, f_t, f_next, step, stats):
        c = self.config
        not_done = (~batch['is_last']).float()
        reward, mc = batch['reward'], batch['mc_return']
        critic_mask = batch['masks']['critic']
        if self.method == Method.IMIT_RECAP:
            logits = self._critic_forward(f_t)
            v_t = self.critic.expected_value(logits)
            with torch.no_grad():
                v_next = self.target_critic.expected_value(self.target_critic(f_next))
            target = c.recap_mc_mix * mc + (1 - c.recap_mc_mix) * (
                reward + c.gamma * not_done * v_next)
            critic_loss = masked_mean(self.critic.loss(logits, target), critic_mask,
                                      self.reduce)
        else:
            v_t = self._critic_forward(f_t)
            with torch.no_grad():
                v_next = self.target_critic(f_next)
            target = c.recap_mc_mix * mc + (1 - c.recap_mc_mix) * (
                reward + c.gamma * not_done * v_next)
            critic_loss = masked_mean(F.mse_loss(v_t, target.detach(), reduction='none'),
                                      critic_mask, self.reduce)
        stats['losses/value'] = critic_loss.item()
        with torch.no_grad():
            residual = self._residual(batch, f_t, f_next, v_t.detach(), v_next)
            if self.method == Method.IMIT_RECAP:
                w = (residual >= self.recap_threshold).float()
                stats['weights/recap_threshold'] = float(self.recap_threshold)
            else:
                w = torch.exp(residual / c.awr_beta).clamp(max=c.awr_max_weight)
            if step < c.warmup_steps:
                w = torch.ones_like(w)
            w = torch.where(batch['is_sft'], torch.ones_like(w), w)
            stats['critic/mean_residual'] = residual.mean().item()
        return w, critic_loss

    @torch.no_grad()
    def gate_report(self, buffer: SampleBuffer, rng: np.random.Generator,
                    max_per_source: int = 2048, device: str = 'cpu',
                    chunk: int = 512) -> dict[str, np.ndarray]:
        """g_t of (up to `max_per_source`) samples per data source, HABC family only.

        Sources: successful and failed rollout windows with the outcome label, human
        windows of interventions, demonstrations. What the actor weights look like after
        warm-up, before normalisation (the paper reports means of 0.68-0.86).
        """
        if self.method not in HABC_FAMILY:
            return {}
        table = buffer.table
        code, sft, human = table['weight_code'], table['is_sft'], table['is_human']
        rollout = ~sft & ~human
        sources = {'rollout_success': rollout & (code == WeightCode.GATE),
                   'rollout_failure': rollout & (code == WeightCode.ZERO),
                   'human': human & ~sft & (code != WeightCode.EXCLUDED),
                   'demo': sft}
        report = {}
        for name, mask in sources.items():
            indices = np.flatnonzero(mask)
            if len(indices) > max_per_source:
                indices = np.sort(rng.choice(indices, max_per_source, replace=False))
            values = []
            for start in range(0, len(indices), chunk):
                batch = buffer.batch(indices[start:start + chunk], device)
                f_t = self.encode(batch['obs'])
                f_adv = self.encode(batch['adv_obs'])
                values.append(self._gate(batch, f_t, f_adv, self.critic(f_t))[0].cpu().numpy())
            report[name] = np.concatenate(values) if values else np.zeros(0, np.float32)
        return report

    def _state_value(self, critic: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
        if self.method == Method.IMIT_RECAP:
            return critic.expected_value(critic(features))
        return critic(features)

    @torch.no_grad()
    def _residual(self, batch: dict, f_t: torch.Tensor, f_next: torch.Tensor,
                  online_v_t: torch.Tensor, target_v_next: torch.Tensor) -> torch.Tensor:
        """TD residual r + gamma (1 - d) V(s') - V(s), both values from one network."""
        network = self.config.advantage_network
        if network == AdvantageNetwork.ONLINE:
            v_t, v_next = online_v_t, self._state_value(self.critic, f_next)
        elif network == AdvantageNetwork.MIXED:
            v_t, v_next = online_v_t, target_v_next
        else:
            v_t, v_next = self._state_value(self.target_critic, f_t), target_v_next
        not_done = (~batch['is_last']).float()
        return batch['reward'] + self.config.gamma * not_done * v_next - v_t

    @torch.no_grad()
    def refresh(self, buffer: SampleBuffer, step: int, device: str = 'cpu',
                max_samples: int = 4096) -> None:
        """Imit-Recap: re-choose the residual threshold on the held-out episodes."""
        if self.method != Method.IMIT_RECAP or not self._holdout_episodes:
            return
        if step % self.config.recap_threshold_every:
            return
        table = buffer.table
        held_out = np.flatnonzero(np.isin(table['episode'], list(self._holdout_episodes))
                                  & table['is_rollout_labelled'])
        if len(held_out) > max_samples:
            held_out = held_out[np.linspace(0, len(held_out) - 1, max_samples).astype(int)]
        batch = buffer.batch(held_out, device)
        f_t, f_next = self.encode(batch['obs']), self.encode(batch['next_obs'])
        residual = self._residual(batch, f_t, f_next, self._state_value(self.critic, f_t),
                                  self._state_value(self.target_critic, f_next))
        keep = self.config.recap_keep_fraction
        self.recap_threshold = float(torch.quantile(residual, 1.0 - keep))


class _ActorLoss(torch.nn.Module):
    """The actor's grad-enabled forward as a module, for DistributedDataParallel.

    DDP's hooks fire only through a module's forward, and the policy's is
    `features_and_loss`, not `forward`.
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        features, per_sample = self.policy.features_and_loss(obs)
        # The critic reads the features detached: returned detached, DDP does not wait for
        # gradients of parameters that only the features reach.
        return features.detach(), per_sample


def _load_moments(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state's moments, keeping this optimizer's settings (lr, ...).

    torch's load_state_dict would also bring back the saved learning rates: a run resumed
    with another actor_lr must train with it.
    """
    settings = [{k: v for k, v in group.items() if k != 'params'}
                for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, name: str) -> None:
    """Raise ValueError unless `state` is an optimizer state of `optimizer`'s parameters."""
    params = [p for group in optimizer.param_groups for p in group['params']]
    groups = state.get('param_groups', [])
    saved = [index for group in groups for index in group.get('params', [])]
    if len(groups) != len(optimizer.param_groups) or len(saved) != len(params):
        raise ValueError(f'training state: the {name} optimizer holds {len(saved)} parameters, '
                         f'this one trains {len(params)}')
    for index, param in zip(saved, params, strict=True):
        for key, value in state.get('state', {}).get(index, {}).items():
            if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                raise ValueError(f'training state: the {name} optimizer state {key} of '
                                 f'parameter {index} has shape {tuple(value.shape)}, the '
                                 f'parameter {tuple(param.shape)}')
