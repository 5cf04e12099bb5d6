"""Built-in demo dataset: photo-like synthetic mushrooms, drawn in code, free of any licence.

    python -m mushroom_demo.painter --out demo_data [--per-class 150] [--size 160] [--seed 0]

writes the seed's layout, `OUT/images/<id>.jpg` plus `OUT/labels.csv` (`id,label`, ids zero-padded strings such as
`00042`), so the demo takes exactly the path a user's own photos take through `shard_tools build`.

The species differ the way real ones do: cap shape (dome, bun, flat with a boss, cone, funnel), colour, warts or
scales, stem build, gills, ring. Every image varies pose, scale, position, forest-floor background, lighting, shadow,
blur and JPEG noise, sometimes with a second mushroom or grass in front. Cap colours overlap between species on
purpose (a red waxcap next to a fly agaric, a pale porcini next to a parasol), so shape has to be learned too.

Each image is drawn from its own random stream `default_rng((seed, index))`, so any slice of the dataset can be made
on its own, in any order or in parallel, and the same seed always gives the same bytes.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from tqdm import tqdm

SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges from plain ImageDraw polygons


@dataclass(frozen=True)
class Species:
    name: str
    cap_shape: str  # "dome" | "bun" | "flat" | "cone" | "funnel"
    cap_colours: tuple  # two RGB endpoints; each image picks a colour between them
    cap_height: tuple  # cap height / cap width, (min, max)
    stem_colour: tuple
    stem_shape: str  # "bulb" | "club" | "slender" | "straight" | "flared"
    stem_width: tuple  # stem width / cap width
    stem_length: tuple  # stem length / cap width
    underside_colour: tuple  # gills, pores or ridges
    gills: str  # "lines" | "pores" | "ridges"
    ring: bool = False
    spots: str = ""  # "warts" | "scales" | "fibres"
    spot_colour: tuple = (0, 0, 0)
    shine: float = 0.2  # specular strength: waxy caps shine, dry ones barely


SPECIES = (
    Species("fly_agaric", "dome", ((195, 25, 20), (245, 150, 40)), (0.4, 0.68), (236, 232, 218), "bulb",
            (0.14, 0.22), (0.8, 1.3), (238, 234, 220), "lines", ring=True, spots="warts",
            spot_colour=(244, 240, 226), shine=0.45),
    Species("porcini", "bun", ((95, 55, 28), (205, 165, 115)), (0.42, 0.65), (218, 200, 165), "club",
            (0.24, 0.42), (0.6, 1.0), (215, 200, 140), "pores", shine=0.3),
    Species("parasol", "flat", ((140, 110, 80), (220, 205, 180)), (0.18, 0.34), (205, 188, 160), "slender",
            (0.08, 0.12), (0.9, 1.45), (240, 232, 215), "lines", ring=True, spots="scales",
            spot_colour=(105, 72, 48), shine=0.05),
    Species("conical_waxcap", "cone", ((210, 45, 25), (248, 190, 55)), (0.6, 1.05), (236, 190, 70), "straight",
            (0.12, 0.2), (0.9, 1.6), (240, 200, 90), "lines", spots="fibres", spot_colour=(150, 40, 20),
            shine=0.6),
    Species("chanterelle", "funnel", ((228, 128, 25), (250, 205, 90)), (0.25, 0.45), (238, 185, 70), "flared",
            (0.16, 0.24), (0.35, 0.6), (232, 170, 55), "ridges", shine=0.1),
)
CLASS_NAMES = tuple(s.name for s in SPECIES)

# Forest-floor palettes (RGB): soil, moss, leaf litter, needles, grass.
FLOOR_COLOURS = np.array([(58, 42, 28), (72, 98, 38), (132, 88, 42), (105, 72, 44), (88, 122, 46),
                          (40, 52, 26), (160, 118, 60), (92, 78, 60)], dtype=np.float32) / 255
LEAF_COLOURS = np.array([(150, 92, 38), (120, 70, 30), (175, 120, 50), (95, 60, 35), (160, 140, 70),
                         (110, 95, 50), (185, 85, 30)], dtype=np.float32) / 255
GRASS_COLOURS = np.array([(70, 115, 35), (95, 140, 45), (55, 90, 30), (120, 150, 60)], dtype=np.float32) / 255


def smooth_noise(rng, h: int, w: int, cells: float) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically (blotches about h/cells across)."""
    gh, gw = max(2, int(round(cells * h / max(h, w)))), max(2, int(round(cells * w / max(h, w))))
    grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32))  # mode "F"
    noise = np.asarray(grid.resize((w, h), Image.BICUBIC))
    return np.clip(noise, 0, 1)


def shade(nx, ny, light) -> tuple[np.ndarray, np.ndarray]:
    """(diffuse, specular) brightness of a surface with normal (nx right, ny up, nz toward the viewer), lit from
    `light` (a unit 3-vector): Lambert with some ambient light, and a Blinn-Phong highlight."""
    nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0.02, 1))
    norm = np.sqrt(nx * nx + ny * ny + nz * nz)
    nx, ny, nz = nx / norm, ny / norm, nz / norm
    diffuse = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)
    half = light + np.array([0, 0, 1.0])
    half /= np.linalg.norm(half)
    specular = np.clip(nx * half[0] + ny * half[1] + nz * half[2], 0, 1) ** 24
    return 0.32 + 0.78 * diffuse, specular


def pick_colour(rng, endpoints, jitter=0.04) -> np.ndarray:
    a, b = (np.array(c, dtype=np.float32) / 255 for c in endpoints)
    return np.clip(a + (b - a) * rng.random() + rng.normal(0, jitter, 3), 0, 1)


def polygon_mask(size, polygons) -> np.ndarray:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for points in polygons:
        draw.polygon([tuple(p) for p in points], fill=255)
    return np.asarray(mask, dtype=np.float32) / 255


# ---------------------------------------------------------------------------------------------------------------
# Background: forest floor with leaf litter, grass, and sometimes a blurred forest behind.


def leaf_polygon(cx, cy, length, width, angle):
    t = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    x, y = length / 2 * np.cos(t), width / 2 * np.sin(t) * np.abs(np.sin(t)) ** 0.3  # pointed both ends
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def grass_blade(rng, x0, y0, height, width):
    bend = rng.normal(0, 0.35) * height
    t = np.linspace(0, 1, 6)
    spine_x, spine_y = x0 + bend * t ** 2, y0 - height * t
    half = width / 2 * (1 - t)
    return np.concatenate([np.stack([spine_x - half, spine_y], 1), np.stack([spine_x + half, spine_y], 1)[::-1]])


def inks(rgb01: np.ndarray) -> list:
    """Float RGB rows in [0, 1] -> ImageDraw fill tuples."""
    return [tuple(c) for c in np.clip(rgb01 * 255, 0, 255).astype(int).tolist()]


def draw_litter(rng, image: Image.Image, count: int, y_range, scale: float, grass_share: float):
    """Leaves, twigs and grass blades on the ground; nearer (lower) ones drawn larger for a sense of depth."""
    w, h = image.size
    draw = ImageDraw.Draw(image)
    ys = np.sort(rng.uniform(*y_range, size=count))
    xs = rng.uniform(-0.05, 1.05, count) * w
    kinds = rng.random(count)
    sizes = scale * (0.4 + 0.9 * ys / h) * rng.uniform(0.5, 1.5, count)
    angles = rng.uniform(0, np.pi, count)
    grass = inks(GRASS_COLOURS[rng.integers(len(GRASS_COLOURS), size=count)] * rng.uniform(0.6, 1.2, (count, 1)))
    leaf_colours = LEAF_COLOURS[rng.integers(len(LEAF_COLOURS), size=count)] * rng.uniform(0.65, 1.2, (count, 1))
    leaves, ribs = inks(leaf_colours), inks(leaf_colours * 0.75)
    twigs = inks(np.array([0.27, 0.2, 0.14]) * rng.uniform(0.6, 1.3, (count, 1)))
    for i, (x, y, size, angle) in enumerate(zip(xs, ys, sizes, angles)):
        if kinds[i] < grass_share:
            blade = grass_blade(rng, x, y, size * 0.3, size * 0.025)
            draw.polygon([tuple(p) for p in blade], fill=grass[i])
        elif kinds[i] < grass_share + 0.08:
            end = (x + size * 0.22 * np.cos(angle), y + 0.09 * size * np.sin(angle))
            draw.line([(x, y), end], fill=twigs[i], width=max(1, int(size * 0.012)))
        else:
            length = size * 0.11
            leaf = leaf_polygon(x, y, length, length * 0.5, angle)
            leaf[:, 1] = y + (leaf[:, 1] - y) * 0.6  # lying flat: foreshortened
            draw.polygon([tuple(p) for p in leaf], fill=leaves[i])
            draw.line([tuple(leaf[0]), tuple(leaf[7])], fill=ribs[i], width=1)


def vertical_ramp(w: int, h: int, start: float, stop: float) -> Image.Image:
    """An 'L' mask that is 255 above row `start`, 0 below row `stop`, linear in between."""
    rows = np.clip((stop - np.arange(h, dtype=np.float32)) / max(stop - start, 1), 0, 1)
    return Image.fromarray(np.repeat((rows * 255).astype(np.uint8)[:, None], w, axis=1))


def forest_floor(rng, w: int, h: int) -> np.ndarray:
    """An (h, w, 3) float32 image in [0, 1]: blotchy ground, litter, and a blurred far distance at the top.

    Smooth textures and blurs are computed at half resolution (they have no fine detail to lose); only the
    litter is drawn at full resolution."""
    lw, lh = w // SUPERSAMPLE, h // SUPERSAMPLE
    weights = rng.dirichlet(np.full(len(FLOOR_COLOURS), 0.6))
    base = FLOOR_COLOURS[np.argsort(-weights)[:3]] * rng.uniform(0.8, 1.15, size=(3, 1))
    m1 = smooth_noise(rng, lh, lw, rng.uniform(3, 8))[..., None]
    m2 = smooth_noise(rng, lh, lw, rng.uniform(6, 14))[..., None]
    grain = (0.85 + 0.3 * smooth_noise(rng, lh, lw, 30))[..., None]  # moss tufts and soil crumbs
    ground = ((base[0] * (1 - m1) + base[1] * m1) * (1 - 0.5 * m2) + base[2] * 0.5 * m2) * grain
    ground += rng.normal(0, 0.035, (lh, lw, 1)).astype(np.float32)
    image = Image.fromarray((np.clip(ground, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)

    horizon = rng.uniform(0.1, 0.4) * h if rng.random() < 0.65 else -1.0
    draw_litter(rng, image, int(rng.integers(25, 70)), (max(horizon, 0), h * 1.05), min(w, h),
                grass_share=rng.uniform(0, 0.6))

    # Depth of field: the ground gets blurrier toward the top of the picture.
    far = image.reduce(SUPERSAMPLE).filter(ImageFilter.GaussianBlur(min(lw, lh) * 0.012))
    far = far.resize((w, h), Image.BILINEAR)
    image = Image.composite(far, image, vertical_ramp(w, h, -0.3 * h, 0.7 * h))
    if horizon > 0:
        image = Image.composite(distant_forest(rng, lw, lh, horizon / SUPERSAMPLE).resize((w, h), Image.BILINEAR),
                                image, vertical_ramp(w, h, horizon - 0.04 * h, horizon + 0.04 * h))
    return np.asarray(image, dtype=np.float32) / 255


def distant_forest(rng, w: int, h: int, horizon: float) -> Image.Image:
    """Out-of-focus forest: tree trunks against bright foliage blobs, heavily blurred."""
    sky = np.array([0.35, 0.45, 0.3], dtype=np.float32) * rng.uniform(0.6, 1.5)
    image = Image.fromarray((np.clip(sky * (0.7 + 0.6 * smooth_noise(rng, h, w, 5))[..., None], 0, 1) * 255)
                            .astype(np.uint8))
    draw = ImageDraw.Draw(image)
    count = int(rng.integers(6, 20))
    for (x, y, r), tone in zip(rng.uniform(0, 1, (count, 3)) * [w, horizon, 0.06 * w] + [0, 0, 0.02 * w],
                               inks(np.array([0.78, 0.86, 0.47]) * rng.uniform(0.5, 1.1, (count, 1)))):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tone)
    count = int(rng.integers(2, 7))
    for (x, half), tone in zip(rng.uniform(0, 1, (count, 2)) * [w, 0.04 * w] + [0, 0.01 * w],
                               inks(np.array([0.24, 0.19, 0.16]) * rng.uniform(0.5, 1.4, (count, 1)))):
        draw.rectangle([x - half, 0, x + half, horizon * 1.1], fill=tone)
    return image.filter(ImageFilter.GaussianBlur(w * 0.02))


# ---------------------------------------------------------------------------------------------------------------
# One mushroom, drawn upright on its own RGBA layer, then tilted and composited onto the scene.


def stem_profile(shape: str, t: np.ndarray) -> np.ndarray:
    """Stem half-width relative to its nominal half-width, t = 0 at the ground and 1 under the cap."""
    if shape == "bulb":  # fly agaric: a round bulb at the base
        return 0.95 - 0.15 * t + 0.75 * np.exp(-((t - 0.06) / 0.1) ** 2)
    if shape == "club":  # porcini: fat, swollen in its lower third
        return 0.8 + 0.55 * np.exp(-((t - 0.3) / 0.35) ** 2)
    if shape == "slender":  # parasol: thin, with a small bulb
        return 0.9 + 0.9 * np.exp(-(t / 0.07) ** 2)
    if shape == "flared":  # chanterelle: narrows to the ground, widens into the funnel
        return 0.75 + 0.25 * t + 0.9 * t ** 6
    return 1.0 - 0.1 * t  # straight


def cap_profile(shape: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top and bottom outline of the cap's silhouette over x in [-1, 1], in units of cap height (up = +)."""
    ax = np.abs(x)
    if shape == "dome":
        top, bottom = (1 - ax ** 2) ** 0.55, -0.1 * (1 - ax ** 2) ** 0.5
    elif shape == "bun":  # thick, rounded, with a rim that overhangs the pores
        top, bottom = (1 - ax ** 2.4) ** 0.42, -0.22 * (1 - ax ** 2.4) ** 0.6
    elif shape == "flat":  # a wide shallow plate with a boss (umbo) in the middle
        top = 0.55 * (1 - ax ** 2) ** 0.45 + 0.45 * np.exp(-(x / 0.2) ** 2)
        bottom = -0.15 * (1 - ax ** 2) ** 0.5
    else:  # cone
        top, bottom = (1 - ax) ** 0.8, -0.05 * (1 - ax ** 2)  # sides bulge a little, tip stays sharp
    return top, bottom


class Layer:
    """An RGBA float canvas that a mushroom's parts are painted onto, back to front.

    Each part works on a band of rows only (a cap never reaches the ground), which keeps the per-pixel maths small."""

    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.ys, self.xs = np.mgrid[0:h, 0:w].astype(np.float32)
        self.rgb, self.alpha = np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.float32)

    def band(self, top: float, bottom: float) -> slice:
        return slice(max(0, int(top)), min(self.h, int(np.ceil(bottom)) + 1))

    def polygon(self, rows: slice, *outlines) -> np.ndarray:
        """Coverage mask of the outlines ((n, 2) points in layer pixels) within the band."""
        return polygon_mask((self.w, rows.stop - rows.start), [np.asarray(o) - (0, rows.start) for o in outlines])

    def paint(self, rows: slice, mask: np.ndarray, colour: np.ndarray):
        self.rgb[rows] += (colour - self.rgb[rows]) * mask[..., None]
        np.maximum(self.alpha[rows], mask, out=self.alpha[rows])

    def image(self) -> Image.Image:
        return Image.fromarray((np.dstack([np.clip(self.rgb, 0, 1), self.alpha]) * 255).astype(np.uint8), "RGBA")


def mushroom_layer(rng, species: Species, height: float, max_cap_w: float, light: np.ndarray):
    """Draw one upright mushroom about `height` pixels tall on a tight RGBA layer.

    Returns (rgba image, stem base (x, y) in it, cap width)."""
    funnel = species.cap_shape == "funnel"
    # Age blurs the species' proportions: young caps are taller and rounder, old ones open out flatter.
    age = rng.uniform(0.7, 1.35)
    cap_ratio, stem_ratio = rng.uniform(*species.cap_height) * age, rng.uniform(*species.stem_length)
    top_ratio = cap_ratio + 0.26 if funnel else cap_ratio * 1.06  # cap top above the stem top, per cap width
    cap_w = min(height / (stem_ratio + top_ratio), max_cap_w)
    cap_h, stem_len = cap_w * cap_ratio, cap_w * stem_ratio
    stem_half = cap_w * rng.uniform(*species.stem_width) / 2
    bend = rng.normal(0, 0.06) * stem_len
    layer = Layer(int(cap_w * 1.25 + 2 * abs(bend)) + 4, int(cap_w * (stem_ratio + top_ratio + 0.12)) + 4)
    base_x, base_y = layer.w / 2, layer.h - cap_w * 0.08 - 2
    rim_y = base_y - stem_len

    # Stem: a slightly bent tube whose width follows the species' profile; cylinder shading across it.
    rows = layer.band(rim_y - 0.1 * stem_len, layer.h)
    xs, ys = layer.xs[rows], layer.ys[rows]
    t = np.linspace(0, 1, 24)
    centre = base_x + bend * t ** 2
    half = stem_half * stem_profile(species.stem_shape, t)
    y_stem = base_y - stem_len * t
    foot = np.linspace(0, np.pi, 9)  # rounded where it meets the ground
    outline = np.concatenate([np.stack([centre - half, y_stem], 1), np.stack([centre + half, y_stem], 1)[::-1],
                              np.stack([base_x + half[0] * np.cos(foot), base_y + 0.3 * half[0] * np.sin(foot)], 1)])
    row_t = np.clip((base_y - ys[:, :1]) / stem_len, 0, 1)
    row_centre, row_half = base_x + bend * row_t ** 2, stem_half * stem_profile(species.stem_shape, row_t)
    u = np.clip((xs - row_centre) / row_half, -1, 1)
    lum, spec = shade(u * 0.95, np.zeros_like(u), light)
    lum *= 1 - 0.45 * np.exp(-np.clip(ys - rim_y, 0, None) / (0.12 * stem_len))  # in the cap's shadow
    streaks = smooth_noise(rng, xs.shape[0] // 8 + 2, layer.w, layer.w / 6)  # lengthwise fibres
    streaks = 0.93 + 0.14 * np.asarray(Image.fromarray(streaks).resize(xs.shape[::-1], Image.BILINEAR))
    stem_colour = pick_colour(rng, (species.stem_colour, species.stem_colour), 0.03)
    layer.paint(rows, layer.polygon(rows, outline), stem_colour * (lum * streaks)[..., None] + 0.15 * spec[..., None])

    if species.ring:  # a hanging skirt below the cap
        ring_t = rng.uniform(0.72, 0.86)
        ring_y = base_y - stem_len * ring_t
        ring_x = base_x + bend * ring_t ** 2
        ring_half = stem_half * stem_profile(species.stem_shape, np.array([ring_t]))[0]
        skirt = [(ring_x - ring_half, ring_y - stem_len * 0.04), (ring_x + ring_half, ring_y - stem_len * 0.04),
                 (ring_x + ring_half * 1.5, ring_y + stem_len * 0.05), (ring_x, ring_y + stem_len * 0.07),
                 (ring_x - ring_half * 1.5, ring_y + stem_len * 0.05)]
        layer.paint(rows, layer.polygon(rows, skirt), stem_colour * 1.05 * lum[..., None])

    cap_x = base_x + bend
    cap_colour = pick_colour(rng, species.cap_colours)
    if funnel:
        draw_funnel(rng, species, layer, cap_x, rim_y, cap_w, cap_h, cap_colour, stem_half, light)
    else:
        draw_cap(rng, species, layer, cap_x, rim_y, cap_w, cap_h, cap_colour, light)
    return layer.image(), (base_x, base_y), cap_w


def draw_underside(rng, species, layer, cap_x, rim_y, cap_w, light):
    """Gills or pores seen from slightly below: a flat ellipse under the rim, darker toward the stem."""
    seen = cap_w * rng.uniform(0.05, 0.16)
    rows = layer.band(rim_y - seen, rim_y + seen)
    u, v = (layer.xs[rows] - cap_x) / (cap_w * 0.46), (layer.ys[rows] - rim_y) / seen
    inside = (u * u + v * v <= 1).astype(np.float32)
    depth = np.sqrt(np.clip(u * u + v * v, 0, 1))
    colour = pick_colour(rng, (species.underside_colour, species.underside_colour), 0.03)
    lum = (0.45 + 0.5 * depth) * (0.9 + 0.1 * light[1])
    if species.gills == "lines":  # radial gill edges converging on the stem
        lum = lum * (0.85 + 0.15 * np.cos(np.arctan2(v, u) * rng.integers(40, 70)))
    layer.paint(rows, inside, colour * lum[..., None])


def draw_cap(rng, species, layer, cap_x, rim_y, cap_w, cap_h, cap_colour, light):
    draw_underside(rng, species, layer, cap_x, rim_y, cap_w, light)
    x = np.linspace(-1, 1, 61)
    top, bottom = cap_profile(species.cap_shape, x)
    wobble = 1 + 0.04 * np.sin(x * rng.uniform(4, 9) + rng.uniform(0, 6))  # no cap is perfectly round
    px = cap_x + x * cap_w / 2
    outline = np.concatenate([np.stack([px, rim_y - top * cap_h * wobble], 1),
                              np.stack([px, rim_y - bottom * cap_h], 1)[::-1]])
    rows = layer.band(outline[:, 1].min(), outline[:, 1].max())
    xs, ys = layer.xs[rows], layer.ys[rows]

    # Surface normal of a dome: sideways at the rim, up at the crown, toward us in the middle.
    u = (xs - cap_x) / (cap_w / 2)
    crown = np.interp(np.clip(u, -1, 1), x, top) + 1e-3
    v = np.clip((rim_y - ys) / (cap_h * crown), -0.3, 1)
    steep = 0.9 if species.cap_shape == "cone" else 1.0
    lum, spec = shade(np.clip(u, -1, 1) * steep, np.clip(v, 0, 1) * 0.8, light)
    mottle = 0.9 + 0.2 * smooth_noise(rng, *xs.shape, 8)
    colour = cap_colour * (lum * mottle)[..., None]
    if species.name == "porcini":  # a paler rim, typical of young boletes
        margin = np.clip(1 - (v + 0.2) / 0.25, 0, 1)[..., None]
        colour = colour * (1 - 0.5 * margin) + np.array([0.85, 0.75, 0.6]) * lum[..., None] * 0.5 * margin
    colour = colour + species.shine * spec[..., None]

    spots = spots_mask(rng, species, xs.shape, x, top, cap_x, rim_y - rows.start, cap_w, cap_h)
    if spots is not None:
        spot_colour = np.array(species.spot_colour, np.float32) / 255
        colour = colour * (1 - spots[..., None]) + spot_colour * lum[..., None] * spots[..., None]
    layer.paint(rows, layer.polygon(rows, outline), np.clip(colour, 0, 1))


def spots_mask(rng, species, shape, x, top, cap_x, rim_y, cap_w, cap_h):
    """Warts (fly agaric), brown scales (parasol) or radial fibres (waxcap) on the cap."""
    if not species.spots:
        return None
    image = Image.new("L", shape[::-1], 0)
    draw = ImageDraw.Draw(image)
    if species.spots == "fibres":
        for end in rng.uniform(-0.95, 0.95, size=int(rng.integers(10, 20))):
            draw.line([(cap_x, rim_y - cap_h * 0.97),
                       (cap_x + end * cap_w / 2, rim_y - np.interp(end, x, top) * cap_h * 0.1)],
                      fill=int(rng.integers(60, 120)), width=max(1, int(cap_w * 0.012)))
        return np.asarray(image.filter(ImageFilter.GaussianBlur(cap_w * 0.006)), dtype=np.float32) / 255
    if species.spots == "scales":  # a dark boss, then scales thinning out toward the rim
        r = cap_w * 0.1
        draw.ellipse([cap_x - r, rim_y - cap_h * 1.02, cap_x + r, rim_y - cap_h * 0.72], fill=235)
        count, size = int(rng.integers(15, 80)), cap_w * 0.022
        radius = rng.uniform(0, 1, count) ** 0.7
    else:  # rain washes most warts off now and then
        count, size = int(rng.integers(12, 35) if rng.random() < 0.6 else rng.integers(0, 5)), cap_w * 0.03
        radius = rng.uniform(0, 1, count) ** 0.8
    ux = np.clip(radius * np.where(rng.random(count) < 0.5, -1, 1) * 0.92, -0.92, 0.92)
    heights = np.interp(ux, x, top)
    vy = heights * rng.uniform(0.25, 0.95, count)
    for px, py in zip(ux, vy):
        squash = np.sqrt(max(1 - px * px, 0.05))  # foreshortened near the rim
        rx = size * rng.uniform(0.6, 1.4) * (0.4 + 0.6 * squash)
        ry = size * rng.uniform(0.5, 1.0)
        cx, cy = cap_x + px * cap_w / 2, rim_y - py * cap_h
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.integers(180, 255)))
    return np.asarray(image, dtype=np.float32) / 255


def draw_funnel(rng, species, layer, cap_x, rim_y, cap_w, depth, cap_colour, stem_half, light):
    """A chanterelle: a trumpet of decurrent ridges widening from the stem into a wavy rim, its hollow seen from
    above."""
    top_y = rim_y - depth
    t = np.linspace(0, 1, 20)
    flare = stem_half * 1.1 + (cap_w / 2 - stem_half * 1.1) * t ** 1.8
    y_cone = rim_y + depth * 0.1 - depth * 1.1 * t
    cone = np.concatenate([np.stack([cap_x - flare, y_cone], 1), np.stack([cap_x + flare, y_cone], 1)[::-1]])
    rows = layer.band(y_cone.min(), y_cone.max())
    xs, ys = layer.xs[rows], layer.ys[rows]
    lum, _ = shade(np.clip((xs - cap_x) / (cap_w / 2), -1, 1) * 0.9, np.full_like(xs, -0.3), light)
    ridges = 0.88 + 0.12 * np.cos(np.arctan2(xs - cap_x, ys - (rim_y + depth * 1.5)) * rng.integers(40, 70))
    under = pick_colour(rng, (species.underside_colour, species.underside_colour), 0.03)
    layer.paint(rows, layer.polygon(rows, cone), under * (lum * ridges)[..., None])

    # The hollow: an ellipse with a wavy edge, its far inner wall lit, its near edge a paler rolled lip.
    angle = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    waves = 1 + 0.06 * np.sin(angle * rng.integers(3, 7) + rng.uniform(0, 6)) + 0.02 * rng.normal(size=72)
    open_h = cap_w * rng.uniform(0.06, 0.22)
    rim = np.stack([cap_x + cap_w / 2 * waves * np.cos(angle), top_y + open_h * waves * np.sin(angle)], 1)
    rows = layer.band(rim[:, 1].min(), rim[:, 1].max())
    xs, ys = layer.xs[rows], layer.ys[rows]
    dy = (ys - top_y) / open_h
    r = np.sqrt(((xs - cap_x) / (cap_w / 2)) ** 2 + dy ** 2)
    lum = 0.5 + 0.5 * np.clip(r, 0, 1) ** 1.5 * np.where(dy < 0, 1.0, 0.75)
    lip = np.clip((r - 0.8) / 0.2, 0, 1) * (dy > 0)
    mottle = 0.92 + 0.16 * smooth_noise(rng, *xs.shape, 8)
    colour = cap_colour * (lum * (1 + 0.25 * lip) * mottle * (0.85 + 0.15 * light[1]))[..., None]
    layer.paint(rows, layer.polygon(rows, rim), np.clip(colour, 0, 1))


def composite(scene, rgb, alpha, at):
    """Alpha-blend a layer into the scene with its top-left corner at `at`, clipped to the scene."""
    h, w = alpha.shape
    x0, y0 = int(round(at[0])), int(round(at[1]))
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + w, scene.shape[1]), min(y0 + h, scene.shape[0])
    if sx0 >= sx1 or sy0 >= sy1:
        return
    a = alpha[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0, None]
    scene[sy0:sy1, sx0:sx1] = scene[sy0:sy1, sx0:sx1] * (1 - a) + rgb[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] * a


def place_mushroom(rng, scene, species, base, height, light):
    """Draw a tilted mushroom about `height` pixels tall standing at `base` (x, y), over its soft shadow."""
    h, w, _ = scene.shape
    layer, (bx, by), cap_w = mushroom_layer(rng, species, height, 0.6 * w, light)

    # Contact shadow, pushed away from the light.
    shadow = Image.new("L", (int(cap_w * 2), int(cap_w * 0.8)), 0)
    sw, sh = shadow.size
    ImageDraw.Draw(shadow).ellipse([sw * 0.2, sh * 0.35, sw * 0.8, sh * 0.65], fill=int(255 * rng.uniform(0.35, 0.65)))
    shadow = np.asarray(shadow.filter(ImageFilter.GaussianBlur(cap_w * 0.1)), dtype=np.float32) / 255
    composite(scene, np.zeros((sh, sw, 3), np.float32), shadow,
              (base[0] - light[0] * cap_w * 0.35 - sw / 2, base[1] - sh / 2))

    # Tilt about the layer's centre (expand keeps it whole), then find where the stem base went.
    tilt = rng.normal(0, 9)
    lw, lh = layer.size
    layer = layer.rotate(tilt, Image.BICUBIC, expand=True)
    theta = np.deg2rad(tilt)
    dx, dy = bx - lw / 2, by - lh / 2
    bx = layer.size[0] / 2 + dx * np.cos(theta) + dy * np.sin(theta)
    by = layer.size[1] / 2 - dx * np.sin(theta) + dy * np.cos(theta)
    layer = np.asarray(layer, dtype=np.float32) / 255
    composite(scene, layer[..., :3], layer[..., 3], (base[0] - bx, base[1] - by))


def render_image(index: int, label: int, size: int = 160, seed: int = 0) -> bytes:
    """JPEG bytes of demo image `index` of class `label`; depends only on (seed, index, label, size)."""
    rng = np.random.default_rng((seed, index))
    species = SPECIES[label]
    aspect = rng.choice([1.0, 4 / 3, 3 / 4], p=[0.4, 0.4, 0.2])
    out_w, out_h = (round(size * aspect), size) if aspect >= 1 else (size, round(size / aspect))
    w, h = out_w * SUPERSAMPLE, out_h * SUPERSAMPLE
    scene = forest_floor(rng, w, h)

    side = rng.uniform(-0.9, 0.9)  # light from left (-) or right (+), mostly from above
    light = np.array([side, rng.uniform(0.5, 1.0), rng.uniform(0.4, 0.8)])
    light /= np.linalg.norm(light)

    height = min(h, 1.3 * w) * rng.uniform(0.35, 0.8)
    base = (w * rng.uniform(0.3, 0.7), rng.uniform(max(0.7 * h, height + 0.04 * h), 0.96 * h))
    if rng.random() < 0.3:  # a smaller sibling, behind and beside the main one
        offset = np.sign(rng.random() - 0.5) * height * rng.uniform(0.35, 0.6)
        place_mushroom(rng, scene, species, (base[0] + offset, base[1] - height * rng.uniform(0.03, 0.12)),
                       height * rng.uniform(0.5, 0.75), light)
    place_mushroom(rng, scene, species, base, height, light)

    if rng.random() < 0.45:  # grass or a leaf in front: partial occlusion of the stem, sometimes the cap
        front = Image.fromarray((scene * 255).astype(np.uint8))
        draw_litter(rng, front, int(rng.integers(3, 12)), (base[1] - height * 0.05, h * 1.05), min(w, h),
                    grass_share=0.7)
        scene = np.asarray(front, dtype=np.float32) / 255
    return finish(rng, scene, light, (out_w, out_h))


def finish(rng, scene, light, out_size) -> bytes:
    """Camera: downsample, light fall-off, exposure, contrast, white balance, vignette, blur, sensor noise, JPEG."""
    image = Image.fromarray((np.clip(scene, 0, 1) * 255).astype(np.uint8)).resize(out_size, Image.LANCZOS)
    if rng.random() < 0.5:  # focus missed a little, or camera shake
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.4)))
    w, h = out_size
    pixels = np.asarray(image, dtype=np.float32) / 255
    xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    gain = (1 + 0.2 * light[0] * xs) * (1 - rng.uniform(0, 0.35) * (xs * xs + ys * ys) / 2)
    warmth = np.clip(rng.normal(0, 0.05), -0.1, 0.1)  # white balance: a little warm or cool, never blue
    pixels = pixels * gain[..., None] * (np.array([1 + warmth, 1, 1 - warmth], np.float32) * rng.uniform(0.65, 1.3))
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.8, 1.25) + mean
    pixels += rng.normal(0, rng.uniform(0.002, 0.016), (h, w, 1)).astype(np.float32)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue()


def generate_demo_dataset(out_dir, per_class: int = 150, size: int = 160, seed: int = 0, workers: int = 1,
                          progress: bool = False) -> Path:
    """Write `out_dir/images/<id>.jpg` and `out_dir/labels.csv` (id,label); returns the CSV's path.

    Classes take turns (image i is class i % len(SPECIES)), so every prefix of the dataset is balanced.
    The bytes depend on (per_class, size, seed) only, never on `workers`.
    """
    if per_class < 1 or size < 32 or workers < 1:
        raise ValueError(f"need per_class >= 1, size >= 32 and workers >= 1, got {per_class}, {size}, {workers}")
    out_dir = Path(out_dir)
    images_dir, labels_csv = out_dir / "images", out_dir / "labels.csv"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_csv.unlink(missing_ok=True)  # written last: a CSV means every image it names is there
    total = per_class * len(SPECIES)
    ids = [f"{index:0{max(5, len(str(total - 1)))}d}" for index in range(total)]
    labels = [index % len(SPECIES) for index in range(total)]

    jobs = (range(total), labels, repeat(size), repeat(seed))
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        images = pool.map(render_image, *jobs, chunksize=8) if pool else map(render_image, *jobs)
        for image_id, jpeg in zip(ids, tqdm(images, total=total, desc="demo images", unit="img", disable=not progress)):
            (images_dir / f"{image_id}.jpg").write_bytes(jpeg)
    pd.DataFrame({"id": ids, "label": [CLASS_NAMES[i] for i in labels]}).to_csv(labels_csv, index=False)
    return labels_csv


def contact_sheet(labels_csv, out_png, per_class: int = 6, tile: int = 128) -> Path:
    """A PNG grid of the first `per_class` images of each species (one row each, named), e.g. for the README."""
    labels_csv = Path(labels_csv)
    rows = pd.read_csv(labels_csv, dtype=str).groupby("label", sort=False).head(per_class)
    names = list(dict.fromkeys(rows["label"]))
    sheet = Image.new("RGB", (per_class * tile, len(names) * tile))
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(names):
        for column, image_id in enumerate(rows.loc[rows["label"] == name, "id"]):
            with Image.open(labels_csv.parent / "images" / f"{image_id}.jpg") as image:
                sheet.paste(ImageOps.fit(image.convert("RGB"), (tile, tile)), (column * tile, row * tile))
        draw.text((4, row * tile + 3), name, fill="white", stroke_width=2, stroke_fill="black")
    sheet.save(out_png)
    return Path(out_png)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mushroom_demo.painter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write images/ and labels.csv into")
    parser.add_argument("--per-class", type=int, default=150, help="images per species (default 150)")
    parser.add_argument("--size", type=int, default=160, help="shorter side of the images in pixels (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing images (default 1)")
    parser.add_argument("--contact-sheet", type=Path, metavar="PNG", help="also save a grid of samples per species")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
    if args.size < 32:
        parser.error("--size must be at least 32 pixels")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder; pick another path")
    start = time.perf_counter()
    labels_csv = generate_demo_dataset(args.out, args.per_class, args.size, args.seed, args.workers, progress=True)
    print(f"wrote {args.per_class * len(SPECIES)} images of {len(SPECIES)} species ({', '.join(CLASS_NAMES)}) "
          f"to {args.out / 'images'} and {labels_csv} in {time.perf_counter() - start:.1f} s")
    if args.contact_sheet:
        print(f"contact sheet: {contact_sheet(labels_csv, args.contact_sheet)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
