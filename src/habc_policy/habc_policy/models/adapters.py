"""How a real pretrained VLA plugs into habc: the adapter interface (documented, not built).

habc trains any policy that implements `habc_policy.models.base.Policy`. An adapter wraps a
pretrained checkpoint that lies on local disk (nothing is downloaded at run time) and maps
between habc's batches and the model's own inputs:

    class LeRobotPi0Adapter(PretrainedVLAAdapter):
        @classmethod
        def from_pretrained(cls, path):      # local folder: config.json + model.safetensors
            ...                              # build the LeRobot policy from its config and
                                             # load the weights with local_files_only
        def encode(self, batch):             # pooled prefix (image + language) embeddings:
            ...                              # the critic reads them detached
        def per_sample_loss(self, batch, features=None):
            ...                              # the model's flow-matching loss WITHOUT the
                                             # batch mean: (B,), masked by action_mask and
                                             # dim_mask, so Eq. 1's weights apply per sample
        def sample_chunks(self, batch, generator=None):
            ...                              # the model's action-chunk sampler, in robot units

Mapping of habc batch keys: 'images' (B, V, H, W, 3) uint8 -> the model's camera keys in
its configured order (resize and normalise as the checkpoint expects); 'state' (B, S) ->
the proprioceptive input; 'instruction' list[str] -> the model's tokenizer;
'actions' (B, H, D), 'action_mask' (B, H) -> its action targets and padding mask (pad or
truncate to the model's chunk length). Joint order and units must match the ones the
checkpoint was trained with; an adapter should check action_dim and state_dim on load and
fail with a message that names both.

Built adapters (each tested against the real on-disk format, docs/pretrained_vla.md):
`habc_policy.models.lerobot_act.LeRobotACT` reads a LeRobot ACT folder (weights mapped 1:1,
checked against LeRobot's own output) and `habc_policy.models.transformers_vla` puts a flow-
matching expert on a local transformers VLM. LeRobot itself is not installed: its declared
bounds conflict with the lock, so its formats are read in-tree.
"""

from abc import abstractmethod
from pathlib import Path

from habc_policy.models.base import Policy


class PretrainedVLAAdapter(Policy):
    """A Policy that wraps a pretrained VLA checkpoint from a local path."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: Path) -> 'PretrainedVLAAdapter':
        """Load the checkpoint at `path` (local files only) and return the adapter."""
