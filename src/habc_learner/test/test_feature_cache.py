"""The frame-feature cache: same features as without it, fewer backbone rows, right keys.

A tiny random SmolVLM backs a TransformersVLA whose frozen prefix the cache reuses. The
prefix runs are counted with a hook on the VLM decoder (rows through it), never timed.

Hits, misses and equality: a hit returns features the same frozen weights computed for the
same frame in another batch; batch size and padding length change the blocking of float32
reductions, so a lookup equals a fresh `encode` to float32 rounding (assert_close's float32
tolerances) and, when it reads back what was stored from that very batch, bit for bit.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from habc_episodes.episode import Episode
from habc_episodes.vocabulary import EpisodeKind
from habc_learner.feature_cache import FeatureCache
from habc_learner.methods import Algorithm, MethodConfig
from habc_learner.trainer import TrainConfig, Trainer
from habc_policy.models.tiny_backbones import write_tiny_smolvlm
from habc_policy.models.transformers_vla import TransformersVLA, TransformersVLAConfig

SIZES = {'prefix_layers': 2, 'state_dim': 3, 'action_dim': 2, 'horizon': 4, 'num_views': 2,
         'image_size': 24, 'expert_hidden_dim': 32, 'expert_layers': 2, 'expert_heads': 2,
         'actions_per_token': 2, 'num_inference_steps': 2}
PREFIX_WIDTH = 48  # write_tiny_smolvlm's text_hidden
LENGTH = 6
# Different lengths, so that batches pad the text differently.
INSTRUCTIONS = ('pick up the red cube', 'insert the peg into the socket and lift it', '')


@pytest.fixture(scope='module')
def backbone(tmp_path_factory) -> Path:
    return write_tiny_smolvlm(tmp_path_factory.mktemp('smolvlm') / 'backbone')


def make_policy(folder: Path, **overrides) -> TransformersVLA:
    torch.manual_seed(0)
    return TransformersVLA(TransformersVLAConfig(backbone_dir=str(folder),
                                                 **{**SIZES, **overrides}))


def make_episodes(seed: int = 0, count: int = 3) -> list[Episode]:
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(count):
        controllers = np.array(['policy'] * LENGTH)
        if i == 2:
            controllers[3:] = 'human'
        episodes.append(Episode(
            observations={'state': rng.normal(size=(LENGTH, 3)).astype(np.float32),
                          'images': rng.integers(0, 256, (LENGTH, 2, 24, 24, 3),
                                                 dtype=np.uint8)},
            actions=rng.normal(size=(LENGTH, 2)).astype(np.float32), controllers=controllers,
            outcome='failure' if i == 1 else 'success', kind=EpisodeKind.ROLLOUT,
            instruction=INSTRUCTIONS[i % len(INSTRUCTIONS)]))
    return episodes


def make_buffer(episodes: list[Episode], config: MethodConfig | None = None):
    buffer = (config or MethodConfig(method='habc', horizon=4)).make_buffer()
    for episode in episodes:
        buffer.add(episode)
    return buffer


def count_prefix_rows(policy: TransformersVLA) -> list[int]:
    """[prefix passes, observations through them], counted at the VLM decoder."""
    counts = [0, 0]

    def hook(module, args, kwargs, output) -> None:
        counts[0] += 1
        counts[1] += kwargs['inputs_embeds'].shape[0]
    policy.backbone.get_decoder().register_forward_hook(hook, with_kwargs=True)
    return counts


def reference(policy: TransformersVLA, obs: dict) -> torch.Tensor:
    with torch.no_grad():
        return policy.encode(obs)


def test_buffer_rows_keep_their_ids_and_the_token_names_the_numbering():
    episodes = make_episodes()
    buffer = make_buffer(episodes[:2])
    token = buffer.frame_token
    before = buffer.frames(np.array([3, 7]))
    buffer.add(episodes[2])
    assert buffer.frame_token == token  # add() appends: old rows keep ids and frames
    after = buffer.frames(np.array([3, 7]))
    assert torch.equal(before['images'], after['images'])
    assert after['frame_rows'].tolist() == [3, 7] and after['frame_token'] == token
    batch = buffer.batch(np.array([0, 5, 11]))
    assert batch['obs']['frame_rows'].tolist() == [0, 5, 11]
    assert batch['next_obs']['frame_rows'].tolist() == [1, 5, 11]  # last steps: themselves
    assert batch['next_obs']['frame_token'] == token
    copied = buffer.copy()
    assert copied.frame_token != token  # a copy appends other frames at the same new rows
    assert make_buffer(episodes).frame_token not in (token, copied.frame_token)


def test_lookups_equal_encode_for_misses_hits_and_mixed_batches(backbone):
    policy = make_policy(backbone).train()
    buffer = make_buffer(make_episodes())
    cache = FeatureCache()
    prefix = count_prefix_rows(policy)
    # Cold, with a repeated row: every distinct row through the backbone once.
    cold = buffer.frames(np.array([0, 7, 7, 12, 17]))
    with torch.no_grad():
        torch.testing.assert_close(cache.encode(policy, cold), reference(policy, cold))
    assert prefix == [2, 5 + 4]  # the reference's 5 rows, the cache's 4 distinct ones
    assert (cache.counters.hits, cache.counters.computed, len(cache)) == (0, 4, 4)
    # Mixed: rows 7 and 12 are hits, 1 and 13 run the backbone.
    mixed = buffer.frames(np.array([1, 7, 13, 12]))
    with torch.no_grad():
        torch.testing.assert_close(cache.encode(policy, mixed), reference(policy, mixed))
    assert prefix == [4, 9 + 4 + 2]
    assert (cache.counters.hits, cache.counters.computed) == (2, 6)
    # All hits: no backbone at all, and the states still come from this batch.
    hits = buffer.frames(np.array([17, 1, 0, 13, 1]))
    with torch.no_grad():
        looked_up = cache.encode(policy, hits)
    assert prefix == [4, 15]
    torch.testing.assert_close(looked_up, reference(policy, hits))
    assert cache.counters.hits == 2 + 5


def test_a_hit_reads_back_exactly_what_the_actor_pass_stored(backbone):
    policy = make_policy(backbone).train()
    obs = make_buffer(make_episodes()).frames(np.array([2, 9, 16, 4]))
    cache = FeatureCache()
    features, _ = policy.features_and_loss({**obs, 'actions': torch.zeros(4, 4, 2),
                                            'action_mask': torch.ones(4, 4)})
    cache.store(policy, obs, features)
    prefix = count_prefix_rows(policy)
    with torch.no_grad():
        looked_up = cache.encode(policy, obs)
    assert prefix == [0, 0]
    assert torch.equal(looked_up, features.detach())


def test_a_new_frame_token_or_policy_empties_the_cache(backbone):
    policy = make_policy(backbone)
    episodes = make_episodes()
    buffer = make_buffer(episodes)
    cache = FeatureCache()
    rows = np.array([0, 1, 6, 13])
    cache.warm(policy, buffer)
    assert len(cache) == len(buffer) == 18
    prefix = count_prefix_rows(policy)
    with torch.no_grad():
        # Another buffer, its episodes in another order: the same row ids are other frames.
        reordered = make_buffer(episodes[::-1]).frames(rows)
        torch.testing.assert_close(cache.encode(policy, reordered), reference(policy, reordered))
        assert cache.counters.invalidations == 1 and len(cache) == 4
        # A copy may grow apart from its original: its own token, recomputed.
        copied = buffer.copy().frames(rows)
        cache.encode(policy, copied)
        assert cache.counters.invalidations == 2
        # Episodes appended to the same buffer keep the token and the rows cached so far.
        grown = buffer.copy()
        cache.encode(policy, grown.frames(rows))
        computed = cache.counters.computed
        grown.add(make_episodes(seed=1, count=1)[0])
        cache.encode(policy, grown.frames(rows))
        assert cache.counters.computed == computed and cache.counters.invalidations == 3
        # Another policy object (a swapped policy, here on another backbone) starts empty,
        # on the same buffer too.
        other = copy.deepcopy(policy)
        for parameter in other.backbone.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        same_rows = grown.frames(rows)
        torch.testing.assert_close(cache.encode(other, same_rows), reference(other, same_rows))
        assert cache.counters.invalidations == 4
    assert prefix[0] == 2 + 1 + 1 + 0 + 2


def test_memory_is_bounded_by_max_rows(backbone):
    policy = make_policy(backbone)
    buffer = make_buffer(make_episodes())
    cache = FeatureCache(max_rows=5)
    assert cache.warm(policy, buffer) == 5
    assert len(cache) == 5 and cache.nbytes == 5 * PREFIX_WIDTH * 4
    prefix = count_prefix_rows(policy)
    obs = buffer.frames(np.array([4, 5, 17, 17]))
    with torch.no_grad():
        torch.testing.assert_close(cache.encode(policy, obs), reference(policy, obs))
    assert prefix == [2, 2 + 4]  # rows 5 and 17 are past the bound: computed, not stored
    assert len(cache) == 5 and cache.nbytes == 5 * PREFIX_WIDTH * 4
    off = FeatureCache(max_rows=0)
    with torch.no_grad():
        off.encode(policy, obs)
    assert len(off) == 0 and off.nbytes == 0
    with pytest.raises(ValueError, match='max_rows must be >= 0'):
        FeatureCache(max_rows=-1)


@pytest.mark.parametrize('finetune', ['lora', 'full'])
def test_a_trained_backbone_is_never_cached(backbone, finetune):
    policy = make_policy(backbone, finetune=finetune)
    config = MethodConfig(method='habc', horizon=4, warmup_steps=0)
    buffer = make_buffer(make_episodes(), config)
    algorithm = Algorithm(policy, config)
    prefix = count_prefix_rows(policy)
    batch = buffer.batch(np.array([0, 1, 2, 3]))
    batch['masks'] = {'actor': torch.ones(4, dtype=torch.bool),
                      'critic': torch.ones(4, dtype=torch.bool)}
    algorithm.update(batch, 0)
    assert prefix == [2, 8]  # s_t for the actor, s_{t+1} for the critic, as before
    assert algorithm.warm_feature_cache(buffer) == 0
    assert len(algorithm.feature_cache) == 0 and algorithm.feature_cache.nbytes == 0


def run_updates(folder: Path, feature_cache_rows: int, draws: list[np.ndarray]):
    policy = make_policy(folder)
    config = MethodConfig(method='habc', horizon=4, warmup_steps=0)
    buffer = make_buffer(make_episodes(), config)
    algorithm = Algorithm(policy, config, feature_cache_rows=feature_cache_rows)
    table = buffer.table
    actor, critic = algorithm.actor_mask(table), algorithm.critic_mask(table)
    prefix = count_prefix_rows(policy)
    stats = []
    for step, indices in enumerate(draws):
        batch = buffer.batch(indices)
        batch['masks'] = {'actor': torch.as_tensor(actor[indices]),
                          'critic': torch.as_tensor(critic[indices])}
        torch.manual_seed(step)  # the same flow-matching noise in both runs
        stats.append(algorithm.update(batch, step))
    return algorithm, stats, prefix


def test_habc_updates_with_the_cache_match_those_without(backbone):
    draws = [np.array([0, 4, 5, 9, 13, 17]), np.array([1, 3, 5, 8, 12, 16]),
             np.array([2, 6, 10, 14, 15, 17])]
    cached, cached_stats, cached_prefix = run_updates(backbone, 100, draws)
    plain, plain_stats, plain_prefix = run_updates(backbone, 0, draws)
    for with_cache, without in zip(cached_stats, plain_stats, strict=True):
        assert with_cache.keys() == without.keys()
        for key, value in without.items():
            assert with_cache[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for a, b in ((cached.policy, plain.policy), (cached.critic, plain.critic),
                 (cached.target_critic, plain.target_critic)):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, msg=name)
    # Without the cache: s_t and s_{t+1} of all 6 samples, every step. With it: s_t, plus
    # the distinct s_{t+1} rows not seen before (as s_t, or as s_{t+1}) in this or an earlier
    # step.
    assert plain_prefix == [6, 36]
    seen, expected = set(), 0
    for indices in draws:
        seen |= set(indices.tolist())
        next_rows = {int(i) + 1 if (i + 1) % LENGTH else int(i) for i in indices}
        expected += 6 + len(next_rows - seen)
        seen |= next_rows
    assert cached_prefix[1] == expected < 36
    assert cached.feature_cache.counters.computed == expected - 18


def test_trainer_passes_the_cache_bound_and_a_branch_starts_empty(backbone):
    config = MethodConfig(method='habc', horizon=4, warmup_steps=0)
    trainer = Trainer(make_policy(backbone), make_buffer(make_episodes(), config), config,
                      TrainConfig(steps=2, batch_size=4, feature_cache_rows=7), progress=False)
    trainer.fit()
    cache = trainer.algorithm.feature_cache
    assert cache.max_rows == 7 and 0 < len(cache) <= 7
    branch = trainer.algorithm.branch_with_intervention_reweighting(0)
    assert branch.feature_cache.max_rows == 7 and len(branch.feature_cache) == 0
    with pytest.raises(ValueError, match='feature_cache_rows must be >= 0'):
        TrainConfig(feature_cache_rows=-1)
