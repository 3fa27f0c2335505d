"""Image building blocks of the VLA, and the object locator pre-trained in simulation.

    random_shift    DrQ augmentation (pad with edge pixels, crop back)
    SpatialSoftmax  expected image coordinates of learned keypoint maps (robomimic, DP)
    strided_cnn     stride-2 conv layers with GroupNorm, shared by every view
    ObjectLocator   (B, V, H, W, 3) uint8 -> object positions (m), from the views' keypoints

Why a locator: behaviour cloning from 100-odd demonstrations did not make the small VLA
use where the cube is (tools/probe_vision_sft.py: its encoder could locate the cube to about
0.4 cm, yet SFT stayed at 0-1/30 on tuning states; the policy drove to one spot wherever
the cube lay). Supervising the perception directly, on simulator frames labelled with the
objects' true positions, and freezing it gives the policy the quantity the state track
reads from privileged state, estimated from pixels. The labels exist only in simulation:
on a real robot the same slot takes a pretrained VLA's vision tower (issue 12).
"""

from dataclasses import asdict, dataclass, field
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
import torch
from torch import nn

LOCATOR_WEIGHTS = 'locator.safetensors'
LOCATOR_CONFIG = 'locator.json'


def random_shift(images: torch.Tensor, pad: int,
                 generator: torch.Generator | None = None,
                 offsets: torch.Tensor | None = None) -> torch.Tensor:
    """DrQ's augmentation: pad each image by `pad` px (edge pixels repeated), crop back.

    images: (N, H, W, C), any dtype; every image gets its own offset in [-pad, pad]^2, drawn
    from `generator`, or given as `offsets` (2, N) (a data-parallel shard's, drawn for the
    whole batch).
    """
    n, h, w, _ = images.shape
    device = images.device
    if offsets is None:
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(device) - pad
    offsets = offsets.to(device)
    rows = (torch.arange(h, device=device) + offsets[0][:, None]).clamp_(0, h - 1)
    cols = (torch.arange(w, device=device) + offsets[1][:, None]).clamp_(0, w - 1)
    index = torch.arange(n, device=device)[:, None, None]
    return images[index, rows[:, :, None], cols[:, None, :]]


class SpatialSoftmax(nn.Module):
    """(N, C, h, w) -> (N, 2K): the expected (x, y) in [-1, 1] of K learned keypoint maps.

    The coordinate grid follows the feature map it is given, so images of another size
    than the config's (a camera resized differently) still work.
    """

    def __init__(self, channels: int, keypoints: int) -> None:
        super().__init__()
        self.keypoint_maps = nn.Conv2d(channels, keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        logits = self.keypoint_maps(features).flatten(2) / self.log_temperature.exp()
        attention = torch.softmax(logits, dim=-1)               # (N, K, h * w)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device) if h > 1 else (
            features.new_zeros(1))
        xs = torch.linspace(-1.0, 1.0, w, device=features.device) if w > 1 else (
            features.new_zeros(1))
        y, x = torch.meshgrid(ys, xs, indexing='ij')
        grid = torch.stack([x.flatten(), y.flatten()], 1).to(attention.dtype)
        return (attention @ grid).flatten(1)                    # (N, 2K)


def strided_cnn(channels: list[int]) -> nn.ModuleList:
    """Conv layers that halve the map each (5x5 first, then 3x3), GroupNorm and ReLU."""
    layers = nn.ModuleList()
    previous = 3
    for i, width in enumerate(channels):
        layers.append(nn.Sequential(
            nn.Conv2d(previous, width, 5 if i == 0 else 3, stride=2,
                      padding=2 if i == 0 else 1),
            nn.GroupNorm(min(8, width), width), nn.ReLU()))  # GELU: +2 ms/chunk
        previous = width
    return layers


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


@dataclass(frozen=True)
class LocatorConfig:
    """Sizes of the object locator."""

    num_views: int = 2
    image_size: int = 96
    outputs: int = 3                       # 3 per object: x, y, z (m)
    # Three stride-2 layers: keypoints on a 12 x 12 map at 96 px, which places a cube 2-3
    # px wide to a fraction of a cell.
    cnn_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    keypoints: int = 32                    # per view
    hidden_dim: int = 256

    def __post_init__(self) -> None:
        for name in ('num_views', 'image_size', 'outputs', 'keypoints', 'hidden_dim'):
            if getattr(self, name) < 1:
                raise ValueError(f'LocatorConfig.{name} must be >= 1, got '
                                 f'{getattr(self, name)}')
        if not self.cnn_channels:
            raise ValueError('LocatorConfig.cnn_channels must name at least one layer')


class ObjectLocator(nn.Module):
    """Object positions from the camera views, through keypoints.

    Per view a CNN and spatial-softmax keypoints; the keypoints of all views -> MLP ->
    normalised positions (the MLP triangulates).

    `forward` returns normalised positions (what a policy consumes); `locate` returns metres.
    """

    def __init__(self, config: LocatorConfig) -> None:
        super().__init__()
        self.config = config
        self.conv = strided_cnn(config.cnn_channels)
        self.keypoints = SpatialSoftmax(config.cnn_channels[-1], config.keypoints)
        width = config.hidden_dim
        self.head = nn.Sequential(
            nn.Linear(2 * config.keypoints * config.num_views, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, config.outputs))
        self.register_buffer('target_mean', torch.zeros(config.outputs))
        self.register_buffer('target_std', torch.ones(config.outputs))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, H, W, 3) uint8 -> (B, outputs) positions, normalised by the training data."""
        b, v, h, w, _ = images.shape
        if v != self.config.num_views:
            raise ValueError(f'the locator was trained on {self.config.num_views} views, got '
                             f'images of {v}')
        features = to_unit_range(images.reshape(b * v, h, w, 3).permute(0, 3, 1, 2))
        for layer in self.conv:
            features = layer(features)
        return self.head(self.keypoints(features).reshape(b, -1))

    def locate(self, images: torch.Tensor) -> torch.Tensor:
        """(B, V, H, W, 3) uint8 -> (B, outputs) positions in metres."""
        return self(images) * self.target_std + self.target_mean

    def save(self, directory: Path) -> None:
        """Write locator.safetensors + locator.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / LOCATOR_WEIGHTS))
        (directory / LOCATOR_CONFIG).write_text(json.dumps(asdict(self.config), indent=2)
                                                + '\n')

    @classmethod
    def load(cls, directory: Path) -> 'ObjectLocator':
        """Load a locator saved with `save`; the error names the missing file."""
        directory = Path(directory)
        for name in (LOCATOR_CONFIG, LOCATOR_WEIGHTS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f'{directory / name} not found: a locator folder '
                                        f'holds {LOCATOR_CONFIG} and {LOCATOR_WEIGHTS}')
        locator = cls(LocatorConfig(**json.loads((directory / LOCATOR_CONFIG).read_text())))
        locator.load_state_dict(load_file(str(directory / LOCATOR_WEIGHTS)))
        return locator
