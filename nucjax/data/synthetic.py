"""Procedural nuclei images with exact instance labels (demo data, tests), and the `synthetic_nuclei` TFDS builder."""

import dataclasses

import numpy as np
from scipy import ndimage

from nucjax.data import folder

STYLES = ("fluorescence", "brightfield", "histology")
MIN_AREA = 12  # visible pixels a nucleus needs to be kept (smaller remnants are erased from image and label)
_MAX_OVERLAP = 0.2  # a touching nucleus may lose at most this fraction of its area under earlier ones
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)  # optical density per unit stain (R, G, B)
_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)


def generate(
    seed_or_rng: int | np.random.Generator,
    *,
    height: int = 256,
    width: int = 256,
    num_nuclei: tuple[int, int] = (8, 40),
    radius: tuple[float, float] = (5.0, 14.0),
    touching: float = 0.5,
    style: str = "fluorescence",
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its exact labels: (uint8[H, W, 3], int32[H, W] with ids 1..N, 0 = background).

    Nuclei are perturbed ellipses: `num_nuclei` is the inclusive range of their count, `radius` that of their size in
    pixels (long semi-axis 1-1.3x a value drawn from it, short one 0.55-1x the long one); `touching` is the chance
    that a nucleus is placed against an earlier one (clusters form as chains of such placements). Earlier nuclei lie
    on top; a nucleus left in pieces keeps its largest, one under MIN_AREA visible pixels is dropped, and the image
    is rendered from the final labels, so the two agree.
    """
    if style not in STYLES:
        raise ValueError(f"synthetic style {style!r} is not one of {STYLES}")
    if not (0 <= num_nuclei[0] <= num_nuclei[1] and 0 < radius[0] <= radius[1] and height > 0 and width > 0):
        raise ValueError(f"synthetic: bad sizes height={height} width={width} num_nuclei={num_nuclei} radius={radius}")
    rng = np.random.default_rng(seed_or_rng)
    label, shade = _place_nuclei(rng, height, width, num_nuclei, radius, touching)
    label = _clean(label)
    density = _nucleus_density(rng, label, shade)
    return _render(rng, density, style), label


def _place_nuclei(rng, height, width, num_nuclei, radius, touching) -> tuple[np.ndarray, np.ndarray]:
    """Draws perturbed ellipses, earlier ones on top: (int32[H, W] ids in drawing order, float32[H, W] profile)."""
    label = np.zeros((height, width), np.int32)
    shade = np.zeros((height, width), np.float32)
    centres: list[tuple[float, float, float]] = []  # (y, x, equivalent radius)
    target = int(rng.integers(num_nuclei[0], num_nuclei[1] + 1))
    for _ in range(4 * target):
        if len(centres) == target:
            break
        a = rng.uniform(*radius) * rng.uniform(1.0, 1.3)
        b = a * rng.uniform(0.55, 1.0)
        size = np.sqrt(a * b)
        against = bool(centres) and rng.random() < touching
        if against:
            cy, cx, other = centres[rng.integers(len(centres))]
            angle = rng.uniform(0, 2 * np.pi)
            distance = (other + size) * rng.uniform(0.85, 1.0)
            cy, cx = cy + distance * np.sin(angle), cx + distance * np.cos(angle)
        else:
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        drawn = _draw(rng, label, shade, len(centres) + 1, cy, cx, a, b, _MAX_OVERLAP if against else 0.0)
        if drawn:
            centres.append((cy, cx, size))
    return label, shade


def _draw(rng, label, shade, index, cy, cx, a, b, max_overlap) -> bool:
    """Draws a perturbed ellipse within its bounding box on free pixels; False (drawing nothing) if it overlaps too
    much."""
    harmonics = rng.uniform(0.0, 0.06, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    reach = a * (1 + harmonics.sum()) + 1
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, label.shape[0])
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, label.shape[1])
    if y0 >= y1 or x0 >= x1:
        return False
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    theta = rng.uniform(0, np.pi)
    u = (np.cos(theta) * dx + np.sin(theta) * dy) / a
    v = (-np.sin(theta) * dx + np.cos(theta) * dy) / b
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    edge = 1 + sum(h * np.cos(k * phi + p) for k, h, p in zip((2, 3, 4), harmonics, phases))
    inside = rho <= edge
    area = np.count_nonzero(inside)
    if area == 0:
        return False
    box = label[y0:y1, x0:x1]
    taken = inside & (box > 0)
    if np.count_nonzero(taken) > max_overlap * area:
        return False
    free = inside & ~taken
    box[free] = index
    shade[y0:y1, x0:x1][free] = 1 - 0.35 * (rho[free] / edge[free]) ** 2
    return True


def _clean(label: np.ndarray) -> np.ndarray:
    """Keeps each nucleus's largest connected piece if it has >= MIN_AREA pixels; renumbers to 1..N."""
    kept = np.zeros_like(label)
    count = 0
    for index, box in enumerate(ndimage.find_objects(label), start=1):
        if box is None:
            continue
        pieces, num = ndimage.label(label[box] == index)
        sizes = np.bincount(pieces.ravel())[1:]
        if num == 0 or sizes.max() < MIN_AREA:
            continue
        count += 1
        kept[box][pieces == 1 + int(sizes.argmax())] = count
    return kept


def _nucleus_density(rng, label: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """Stain or dye density of the nuclei, float32[H, W] in about [0, 1]: per-nucleus level x radial profile x texture.
    """
    levels = rng.uniform(0.45, 1.0, size=int(label.max()) + 1).astype(np.float32)
    levels[0] = 0
    texture = ndimage.gaussian_filter(rng.standard_normal(label.shape, dtype=np.float32), 1.5)
    return levels[label] * shade * (1 + 0.9 * texture)


def _render(rng, density: np.ndarray, style: str) -> np.ndarray:
    """Background gradient, blur, shot noise (Poisson, in its Gaussian approximation: variance = signal / photons)
    and Gaussian read noise, in the given style: uint8[H, W, 3]."""
    height, width = density.shape
    angle = rng.uniform(0, 2 * np.pi)
    ys = np.arange(height, dtype=np.float32)[:, None] * (np.cos(angle) / height)
    xs = np.arange(width, dtype=np.float32)[None, :] * (np.sin(angle) / width)
    ramp = (ys + xs) * np.float32(rng.uniform(0.0, 0.15))
    blurred = ndimage.gaussian_filter(density, rng.uniform(0.5, 1.5))
    if style == "histology":
        eosin = np.float32(rng.uniform(0.15, 0.35)) + ramp
        nuclei = blurred * np.float32(rng.uniform(1.0, 1.6))
        image = np.exp(-(nuclei[..., None] * _HEMATOXYLIN + eosin[..., None] * _EOSIN))
    else:
        background = np.float32(rng.uniform(0.02, 0.1)) + ramp
        signal = blurred * np.float32(rng.uniform(0.5, 0.9))
        grey = background + signal if style == "fluorescence" else 0.92 - background - 0.8 * signal
        image = grey[..., None]
    photons, read_noise = rng.uniform(150, 1000), rng.uniform(0.005, 0.02)
    std = np.sqrt(np.clip(image, 0, None) / np.float32(photons) + np.float32(read_noise**2))
    image = image + std * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(image, 3 // image.shape[-1], axis=-1)


STYLE_MODALITY = {"fluorescence": "fluorescence", "brightfield": "brightfield", "histology": "histology-colour"}


@dataclasses.dataclass(eq=False, kw_only=True)
class SyntheticConfig(folder.NucleiConfig):
    """How many images, their size, nuclei counts and radii, `touching` (see `generate`), `style` (one of STYLES, or
    "mixed": image i takes STYLES[i % 3]) and the seed (image i is generated from [seed, i])."""

    num_images: int = 256
    height: int = 256
    width: int = 256
    min_nuclei: int = 8
    max_nuclei: int = 40
    min_radius: float = 5.0
    max_radius: float = 14.0
    touching: float = 0.5
    style: str = "fluorescence"
    seed: int = 0

    def check(self) -> None:
        super().check()
        if self.style not in STYLES + ("mixed",):
            raise ValueError(f"builder setting style={self.style!r} must be one of {STYLES + ('mixed',)}")
        for key in ("num_images", "height", "width", "min_radius"):
            if getattr(self, key) <= 0:
                raise ValueError(f"builder setting {key}={getattr(self, key)} must be positive")
        if not 0 <= self.min_nuclei <= self.max_nuclei:
            raise ValueError(
                f"builder settings min_nuclei={self.min_nuclei}, max_nuclei={self.max_nuclei}: need 0 <= min <= max"
            )
        if self.max_radius < self.min_radius:
            raise ValueError(
                f"builder settings min_radius={self.min_radius}, max_radius={self.max_radius}: need min <= max"
            )
        if not 0 <= self.touching <= 1:
            raise ValueError(f"builder setting touching={self.touching} must be in [0, 1]")


class SyntheticNuclei(folder.NucleiBuilder):
    """Synthetic nuclei with exact labels (nucjax.data.synthetic.generate): id, image, label, modality."""

    name = "synthetic_nuclei"
    BUILDER_CONFIGS = [SyntheticConfig(name=folder.DEFAULT_CONFIG)]

    def _split_generators(self, dl_manager):
        config = self.builder_config
        config.check()
        styles = {
            f"synthetic-{i:05d}": STYLES[i % 3] if config.style == "mixed" else config.style
            for i in range(config.num_images)
        }

        def load(image_id: str) -> tuple[str, dict]:
            index = int(image_id.rsplit("-", 1)[1])
            image, label = generate(
                np.random.default_rng([config.seed, index]),
                height=config.height,
                width=config.width,
                num_nuclei=(config.min_nuclei, config.max_nuclei),
                radius=(config.min_radius, config.max_radius),
                touching=config.touching,
                style=styles[image_id],
            )
            return folder.example(image_id, image, label)

        return self._training_splits({i: STYLE_MODALITY[s] for i, s in styles.items()}, load)
