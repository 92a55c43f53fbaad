"""The tiny world's data: 32x32 pictures of one coloured shape on a plain background.

Each caption names a colour, a shape and a background ("a red circle on a white
background"). Size, position, the exact shade of the shape and of the background vary per
image. Some caption combinations are held out: they never appear in training and serve as
evaluation prompts. Every colour, shape and background, and every colour-shape pair, still
appears in training (the held-out captions only recombine them with the other background),
so held-out prompts test binding, not unseen words.

Rendering is vectorised in torch from signed distance functions with a one-pixel soft edge,
so batches cost microseconds and are a pure function of a torch.Generator.
"""

from __future__ import annotations

import math
from itertools import product

import torch

IMAGE_SIZE = 32

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.67, 0.16),
    "blue": (0.12, 0.24, 0.86),
    "yellow": (0.94, 0.82, 0.08),
    "purple": (0.55, 0.16, 0.71),
    "orange": (0.96, 0.51, 0.08),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS: dict[str, float] = {"white": 0.94, "black": 0.06}

# Largest random change of a shape colour channel and of the background grey level.
COLOUR_JITTER = 0.06
BACKGROUND_JITTER = 0.05
# Shape radius in pixels (centre to the farthest edge point of a circle of that size).
MIN_RADIUS, MAX_RADIUS = 5.0, 11.0


def caption(colour: str, shape: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


def _held_out(colour_index: int, shape_index: int, background_index: int) -> bool:
    # One colour per (shape, background) cell, cycling through the colours, so that each
    # colour-shape pair stays in training with the other background.
    return colour_index == (2 * shape_index + background_index) % len(COLOURS)


_COMBINATIONS = [
    (c, s, b, _held_out(ci, si, bi))
    for (ci, c), (si, s), (bi, b) in product(
        enumerate(COLOURS), enumerate(SHAPES), enumerate(BACKGROUNDS)
    )
]


def all_captions() -> list[str]:
    """Every colour x shape x background caption, in a fixed order."""
    return [caption(c, s, b) for c, s, b, _ in _COMBINATIONS]


def train_captions() -> list[str]:
    return [caption(c, s, b) for c, s, b, held in _COMBINATIONS if not held]


def heldout_captions() -> list[str]:
    """Captions never rendered for training: the validation and test prompts."""
    return [caption(c, s, b) for c, s, b, held in _COMBINATIONS if held]


# Positions in `heldout_captions` of the test half: each half has every shape once, two
# captions per background and four colours.
_TEST_POSITIONS = (0, 3, 4, 7)


def validation_captions() -> list[str]:
    """Half of the held-out captions, for tuning hyperparameters."""
    return [text for i, text in enumerate(heldout_captions()) if i not in _TEST_POSITIONS]


def test_captions() -> list[str]:
    """The other half, for the reported tables (never used for tuning)."""
    return [heldout_captions()[i] for i in _TEST_POSITIONS]


def parse_caption(text: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a caption made by `caption`."""
    words = text.split()
    return words[1], words[2], words[5]


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) from pixel offsets (dx, dy) to a shape
    centred at the origin; image y points down."""
    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2) - radius
    if shape == "square":
        # Half-side 0.85 r: a square and a circle of the same radius cover similar areas.
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius
    if shape == "triangle":
        # Upright equilateral triangle as the intersection of three half-planes; its
        # inradius is 0.6 r (circumradius 1.2 r) for an area like the other shapes'.
        edges = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
        distances = [nx * dx + ny * dy for nx, ny in edges]
        return torch.stack(distances).amax(0) - 0.6 * radius
    if shape == "cross":
        arm = 0.35 * radius
        horizontal = torch.maximum(dx.abs() - radius, dy.abs() - arm)
        vertical = torch.maximum(dx.abs() - arm, dy.abs() - radius)
        return torch.minimum(horizontal, vertical)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(
    captions: list[str],
    generator: torch.Generator,
    radius: torch.Tensor | None = None,
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images (B, 3, IMAGE_SIZE, IMAGE_SIZE) in [0, 1], one per caption, drawn with random
    size, position and shades from `generator`.

    `radius` (B,) and `centre` (B, 2) as (x, y) in pixels, when given, replace the random
    size and position (the generator still draws them, so the shades stay the same)."""
    n = len(captions)
    parsed = [parse_caption(text) for text in captions]
    random_radius = MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * torch.rand(n, generator=generator)
    # Centres keep the whole shape (at most 1.2 r from its centre) inside the frame.
    margin = 1.2 * random_radius + 0.5
    span = IMAGE_SIZE - 2 * margin
    centre_x = margin + span * torch.rand(n, generator=generator)
    centre_y = margin + span * torch.rand(n, generator=generator)
    radius = random_radius if radius is None else radius.float()
    if centre is not None:
        centre_x, centre_y = centre[:, 0].float(), centre[:, 1].float()
    colour_shift = COLOUR_JITTER * (2 * torch.rand(n, 3, generator=generator) - 1)
    background_shift = BACKGROUND_JITTER * (2 * torch.rand(n, generator=generator) - 1)

    pixel = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    dx = pixel.view(1, 1, -1) - centre_x.view(-1, 1, 1)  # (B, 1, W)
    dy = pixel.view(1, -1, 1) - centre_y.view(-1, 1, 1)  # (B, H, 1)
    dx, dy = torch.broadcast_tensors(dx, dy)  # (B, H, W)
    distance = torch.empty(n, IMAGE_SIZE, IMAGE_SIZE)
    for shape in SHAPES:
        rows = [i for i, (_, s, _) in enumerate(parsed) if s == shape]
        if rows:
            distance[rows] = _signed_distance(shape, dx[rows], dy[rows], radius[rows].view(-1, 1, 1))
    coverage = (0.5 - distance).clamp(0, 1).unsqueeze(1)  # (B, 1, H, W)

    colour = torch.tensor([COLOURS[c] for c, _, _ in parsed]) + colour_shift  # (B, 3)
    grey = torch.tensor([BACKGROUNDS[b] for _, _, b in parsed]) + background_shift  # (B,)
    image = grey.view(-1, 1, 1, 1) * (1 - coverage) + colour.view(-1, 3, 1, 1) * coverage
    return image.clamp(0, 1)


def sample_batch(
    batch_size: int, captions: list[str], generator: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """A labelled batch: captions drawn uniformly from `captions`, then their images."""
    picks = torch.randint(len(captions), (batch_size,), generator=generator).tolist()
    chosen = [captions[i] for i in picks]
    return render(chosen, generator), chosen
