"""Rendering of the synthetic pedestrian world: one camera's view of a `Person` as a crop.

`render` draws a person with pose, scale, lighting, blur, noise, clutter and occlusion
changes; it is a pure function of the numpy Generator passed in, so crops are reproducible
per seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from icl.synthetic.schema import (
    BUILDS,
    COLOURS,
    HAIR_COLOURS,
    NONE,
    RGB,
    SKIN,
    VIEWS,
    Person,
    draw_view,
)

# Rendering. Body coordinates are "units": x in [-24, 24] around the body axis, y in [0, 128]
# from the top of the head area to the ground, for a 128x48 crop; other sizes scale them.


def _shade(c: RGB, f: float) -> RGB:
    return (min(255, int(c[0] * f)), min(255, int(c[1] * f)), min(255, int(c[2] * f)))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(a[i] * (1 - t) + b[i] * t) for i in range(3))  # type: ignore[return-value]


def _contrast(name: str) -> RGB:
    return (35, 35, 40) if name in ("white", "yellow", "pink", "orange") else (240, 240, 236)


class _Painter:
    """Draws in body units onto a PIL image (the scale and offset carry the jitter)."""

    def __init__(self, img: Image.Image, cx: float, top: float, sx: float, sy: float) -> None:
        self.d = ImageDraw.Draw(img)
        self.cx, self.top, self.sx, self.sy = cx, top, sx, sy

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.sx, self.top + y * self.sy)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        ax, ay = self.pt(min(x0, x1), min(y0, y1))
        bx, by = self.pt(max(x0, x1), max(y0, y1))
        return [ax, ay, bx, by]

    def rect(self, x0: float, y0: float, x1: float, y1: float, c: RGB) -> None:
        self.d.rectangle(self.box(x0, y0, x1, y1), fill=c)

    def ell(self, x0: float, y0: float, x1: float, y1: float, c: RGB) -> None:
        self.d.ellipse(self.box(x0, y0, x1, y1), fill=c)

    def chord(self, x0: float, y0: float, x1: float, y1: float, a0: float, a1: float, c: RGB):
        self.d.chord(self.box(x0, y0, x1, y1), a0, a1, fill=c)

    def poly(self, pts: Sequence[tuple[float, float]], c: RGB) -> None:
        self.d.polygon([self.pt(x, y) for x, y in pts], fill=c)

    def line(self, pts: Sequence[tuple[float, float]], c: RGB, width: float) -> None:
        self.d.line([self.pt(x, y) for x, y in pts], fill=c, width=max(1, round(width * self.sx)))


def _background(rng: np.random.Generator, h: int, w: int, jitter: float) -> Image.Image:
    """A street-like backdrop: a wall gradient, a ground band and desaturated clutter."""
    grey = np.array([128.0, 128.0, 128.0])
    wall = rng.uniform(40, 220, 3) * 0.5 + grey * 0.5 * rng.uniform(0.5, 1.5)
    wall2 = wall * rng.uniform(0.6, 1.3)
    ground = rng.uniform(60, 170, 3) * 0.4 + grey * 0.6 * rng.uniform(0.6, 1.3)
    t = np.linspace(0.0, 1.0, h)[:, None]
    rows = wall[None, :] * (1 - t) + wall2[None, :] * t
    horizon = int(h * rng.uniform(0.72, 0.92))
    rows[horizon:] = ground
    arr = np.broadcast_to(np.clip(rows, 0, 255).astype(np.uint8)[:, None, :], (h, w, 3))
    img = Image.fromarray(np.ascontiguousarray(arr))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 4 + round(6 * jitter)))):
        c = rng.uniform(20, 235, 3)
        sat = rng.uniform(0.25, 0.85)
        col = tuple(int(v) for v in c * sat + grey * (1 - sat))
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 0.95) * h
        kind = rng.random()
        if kind < 0.4:  # poles, door frames
            d.rectangle([x0, y0, x0 + rng.uniform(1, 0.15 * w), y0 + rng.uniform(0.2, 1) * h], col)
        elif kind < 0.7:  # windows, signs, parked things
            d.rectangle([x0, y0, x0 + rng.uniform(4, 0.6 * w), y0 + rng.uniform(4, 0.3 * h)], col)
        elif kind < 0.9:  # bushes, blobs
            d.ellipse([x0, y0, x0 + rng.uniform(4, 0.5 * w), y0 + rng.uniform(4, 0.25 * h)], col)
        else:
            d.line([x0, y0, rng.uniform(0, w), rng.uniform(0, h)], col, int(rng.integers(1, 3)))
    return img


def _occluder(d: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int) -> None:
    """A box from the bottom or a side, or part of another passer-by at an edge."""
    col = tuple(int(v) for v in rng.uniform(30, 220, 3))
    kind = rng.random()
    if kind < 0.4:  # bench, bin, car bonnet
        d.rectangle([rng.uniform(-0.3, 0.3) * w, h * rng.uniform(0.7, 0.85), w * 1.3, h], col)
    elif kind < 0.6:  # a sign or a pillar at one side
        x = w * rng.uniform(0.12, 0.3)
        box = [0, h * rng.uniform(0, 0.4), x, h] if rng.random() < 0.5 else [w - x, 0, w, h]
        d.rectangle(box, col)
    else:  # someone else crossing at the edge
        left = rng.random() < 0.5
        bw = w * rng.uniform(0.3, 0.45)
        x0 = -bw * rng.uniform(0.3, 0.6) if left else w - bw * rng.uniform(0.4, 0.7)
        y0 = h * rng.uniform(0.05, 0.15)
        skin = SKIN[int(rng.integers(len(SKIN)))]
        lower = tuple(int(v) for v in rng.uniform(20, 200, 3))
        d.ellipse([x0 + bw * 0.3, y0, x0 + bw * 0.7, y0 + h * 0.13], skin)
        d.rectangle([x0 + bw * 0.3, y0 + h * 0.5, x0 + bw * 0.7, h], lower)
        d.rectangle([x0, y0 + h * 0.13, x0 + bw, y0 + h * 0.52], col)


def render(
    person: Person,
    rng: np.random.Generator,
    size: tuple[int, int] = (128, 48),
    *,
    view: str | None = None,
    jitter: float = 1.0,
) -> np.ndarray:
    """One crop [H, W, 3] uint8 of `person` seen from `view` (drawn from `rng` when None).

    `jitter` scales the per-image nuisance: pose, scale and position, camera light and colour
    cast, blur, low resolution, noise, background clutter and occlusion (DIFFICULTIES).
    """
    h, w = size
    if view is None:
        view = draw_view(rng)
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
    j = float(jitter)
    img = _background(rng, h, w, j)
    k = rng.uniform(max(0.7, 1 - 0.15 * j), 1.0)
    sx, sy = w / 48 * k, h / 128 * k
    cx = w / 2 + rng.uniform(-3.0, 3.0) * j * w / 48
    top = (h - 120 * sy) * rng.uniform(0.15, 0.85)
    pa = _Painter(img, cx, top, sx, sy)
    pose = (rng.uniform(-1, 1) * j, rng.uniform(0, 1), rng.uniform(-1, 1) * j)
    if view == "side":
        _draw_side(pa, person, pose)
    else:
        _draw_frontal(pa, person, pose, back=view == "back")
    if rng.random() < 0.15 * j:
        _occluder(pa.d, rng, h, w)
    if rng.random() < 0.3 * j:  # a distant or low-quality camera
        f = rng.uniform(0.45, 0.8)
        small = img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR)
        img = small.resize((w, h), Image.Resampling.BILINEAR)
    radius = rng.uniform(0.0, 0.9 * j)
    if radius > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(img, dtype=np.float32)
    # Camera: global gain, a colour cast, a side-light ramp, and sensor noise.
    gain = rng.uniform(1 - 0.25 * j, 1 + 0.2 * j)
    cast = 1 + rng.uniform(-0.08, 0.08, 3) * j
    ramp = 1 + rng.uniform(-0.15, 0.15) * j * np.linspace(-1, 1, w, dtype=np.float32)
    arr = arr * (gain * cast).astype(np.float32)[None, None, :] * ramp[None, :, None]
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(1, 5) * j)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))


def _upper_details(pa: _Painter, p: Person, sw: float, bottom: float, back: bool) -> None:
    """Pattern and garment-type cues on a frontal torso spanning x in [-sw, sw]."""
    base = COLOURS[p.upper_colour]
    con = _contrast(p.upper_colour)
    x0, x1 = -sw + 1, sw - 1
    if p.upper_pattern == "stripes":
        y = 33.0
        while y < bottom - 1:
            pa.rect(x0, y, x1, y + 1.8, con)
            y += 5.0
    elif p.upper_pattern == "checked":
        half = _mix(base, con, 0.55)
        y = 33.0
        while y < bottom - 1:
            pa.rect(x0, y, x1, y + 1.2, half)
            y += 4.5
        x = x0 + 1.5
        while x < x1:
            pa.rect(x, 31, x + 1.2, bottom - 1, half)
            x += 4.5
    elif p.upper_pattern == "logo" and not back:
        pa.rect(-4.5, 37, 4.5, 46, con)
        pa.ell(-2.5, 39, 2.5, 44, base)
    dark = _shade(base, 0.6)
    t = p.upper_type
    if back:
        if t == "hoodie":
            pa.chord(-7, 26, 7, 44, 0, 180, dark)
        elif t in ("shirt", "jacket", "coat"):
            pa.rect(-5, 29, 5, 31.5, dark)
        return
    if t == "t-shirt":
        pa.chord(-3.5, 26, 3.5, 34, 0, 180, SKIN[p.skin])
    elif t == "shirt":
        pa.poly([(-4.5, 29), (0, 35), (-1, 29)], (235, 235, 235))
        pa.poly([(4.5, 29), (0, 35), (1, 29)], (235, 235, 235))
        pa.rect(-0.5, 35, 0.5, bottom - 1, dark)
    elif t == "jacket":
        pa.rect(-0.8, 31, 0.8, bottom, dark)
        pa.rect(-6, 29, 6, 32, dark)
    elif t == "coat":
        pa.poly([(-6, 29), (0, 42), (-2, 48)], dark)
        pa.poly([(6, 29), (0, 42), (2, 48)], dark)
        for y in (52.0, 60.0, 68.0, 76.0):
            pa.ell(-3, y, -1.5, y + 1.5, (20, 20, 20))
            pa.ell(1.5, y, 3, y + 1.5, (20, 20, 20))
    elif t == "hoodie":
        pa.chord(-7.5, 24, 7.5, 36, 0, 180, dark)
        pa.rect(-6, 54, 6, 63, dark)
        pa.line([(-2, 33), (-2, 42)], (235, 235, 235), 0.8)
        pa.line([(2, 33), (2, 42)], (235, 235, 235), 0.8)


def _shoe(pa: _Painter, p: Person, fx: float, forward: float) -> None:
    """A shoe at foot x `fx`; `forward` > 0 extends the toe to +x (side view)."""
    c = COLOURS[p.shoe_colour]
    x0, x1 = fx - 4.2 + min(0.0, forward), fx + 4.2 + max(0.0, forward)
    t = p.shoe_type
    if t == "boots":
        pa.rect(fx - 4.2, 99, fx + 4.2, 110, c)
        pa.rect(x0, 108, x1, 114, c)
    elif t == "sandals":
        pa.rect(x0, 108, x1, 113, SKIN[p.skin])
        pa.rect(x0, 108.5, x1, 110, c)
        pa.rect(x0, 112.5, x1, 114.5, c)
    elif t == "sneakers":
        pa.rect(x0, 107, x1, 113, c)
        pa.rect(x0, 112, x1, 114.5, (170, 170, 170) if p.shoe_colour == "white" else (235,) * 3)
    else:  # leather shoes: low, slim and glossy
        pa.rect(x0, 109, x1, 114, c)
        pa.rect(fx - 1.5, 109.5, fx + 0.5, 110.5, _shade(c, 1.6) if c[0] > 40 else (110,) * 3)


def _legs(
    pa: _Painter, p: Person, feet: Sequence[tuple[float, float]], lw: float, toe: float = 0.0
) -> None:
    """Skin legs, then the lower garment, then shoes; feet = [(hip_x, foot_x), ...]."""
    skin = SKIN[p.skin]
    for hx, fx in feet:
        pa.line([(hx, 64), (fx, 109)], skin, lw)
    if p.lower_type in ("trousers", "jeans", "shorts"):
        c = COLOURS[p.lower_colour]
        end = 107.5 if p.lower_type != "shorts" else 84.0
        pa.rect(-8.5, 62, 8.5, 71, c)
        for hx, fx in feet:
            t = (end - 64) / 45
            pa.line([(hx, 64), (hx + (fx - hx) * t, end)], c, lw + 0.6)
            if p.lower_type == "jeans":  # faded knees and a seam tell denim from cloth
                kx = hx + (fx - hx) * 0.5
                pa.rect(kx - 1.6, 84, kx + 1.6, 90, _mix(c, (200, 200, 220), 0.35))
    for _, fx in feet:
        _shoe(pa, p, fx, toe)


def _skirt(pa: _Painter, p: Person, top_y: float, spread: float, lean: float) -> None:
    colour = p.upper_colour if p.upper_type == "dress" else p.lower_colour
    hem = 102.0 if p.lower_length == "long" else 84.0
    pa.poly(
        [(-8.5, top_y), (8.5, top_y), (11 + spread + lean, hem), (-11 - spread + lean, hem)],
        COLOURS[colour],
    )


def _head(pa: _Painter, p: Person, view: str, hx: float) -> None:
    skin, hair = SKIN[p.skin], HAIR_COLOURS.get(p.hair_colour, (0, 0, 0))
    bald = p.hair_length == "bald"
    pa.rect(hx - 2.8, 24, hx + 2.8, 31, skin)  # neck
    if view == "back":
        pa.ell(hx - 6.5, 10, hx + 6.5, 26, skin if bald else hair)
        if not bald and p.hair_length == "long":
            pa.rect(hx - 7, 17, hx + 7, 46, hair)
            pa.ell(hx - 7, 40, hx + 7, 49, hair)
        return
    pa.ell(hx - 6.5, 10, hx + 6.5, 26, skin)
    if view == "side":  # facing +x: hair on the crown and the back of the head
        if not bald:
            pa.chord(hx - 7, 8.5, hx + 7, 24, 180, 360, hair)
            pa.chord(hx - 7, 9, hx + 4, 25, 90, 270, hair)
            if p.hair_length == "long":
                pa.rect(hx - 7.5, 14, hx - 2.5, 44, hair)
        pa.rect(hx + 2.5, 17.5, hx + 3.7, 18.8, (30, 25, 25))
        if p.glasses != NONE:
            lens = (15, 15, 18) if p.glasses == "sunglasses" else (175, 200, 215)
            pa.rect(hx + 1.3, 16.3, hx + 6.3, 20.6, (20, 20, 20))
            pa.rect(hx + 2.1, 17.1, hx + 5.5, 19.8, lens)
            pa.line([(hx - 2.5, 17.5), (hx + 1.5, 17.5)], (20, 20, 20), 0.9)
        return
    if not bald:
        pa.chord(hx - 7, 8.5, hx + 7, 24, 180, 360, hair)
        if p.hair_length == "long":  # strands over the shoulders, in front of the torso
            pa.rect(hx - 8.5, 14, hx - 4.6, 44, hair)
            pa.rect(hx + 4.6, 14, hx + 8.5, 44, hair)
    for ex in (-2.7, 1.5):
        pa.rect(hx + ex, 17.8, hx + ex + 1.2, 19, (30, 25, 25))
    if p.glasses != NONE:
        lens = (15, 15, 18) if p.glasses == "sunglasses" else (175, 200, 215)
        pa.rect(hx - 6.2, 16.2, hx + 6.2, 20.8, (20, 20, 20))
        pa.rect(hx - 5.2, 17.1, hx - 0.9, 19.9, lens)
        pa.rect(hx + 0.9, 17.1, hx + 5.2, 19.9, lens)


def _hat(pa: _Painter, p: Person, view: str, hx: float) -> None:
    if p.hat == NONE:
        return
    c = COLOURS[p.hat_colour]
    if p.hat == "cap":
        pa.chord(hx - 7.3, 6.5, hx + 7.3, 22, 180, 360, c)
        if view == "side":
            pa.rect(hx + 3, 12.5, hx + 12, 15, _shade(c, 0.85))
        elif view == "front":
            pa.rect(hx - 8, 12.5, hx + 8, 15.5, _shade(c, 0.85))
    else:  # beanie: taller, rounded, with a folded band
        pa.ell(hx - 7.3, 3.5, hx + 7.3, 20, c)
        pa.rect(hx - 7.6, 12.5, hx + 7.6, 16.5, _shade(c, 0.8))


def _scarf(pa: _Painter, p: Person, view: str, hx: float) -> None:
    if p.scarf == NONE:
        return
    c = COLOURS[p.scarf]
    pa.rect(hx - 7, 25.5, hx + 7, 31.5, c)
    if view == "front":
        pa.rect(hx + 1.5, 30, hx + 5.5, 47, c)
    elif view == "side":
        pa.rect(hx + 3, 30, hx + 7, 45, c)


def _held(pa: _Painter, p: Person, hand: tuple[float, float]) -> None:
    hx, hy = hand
    o = p.held_object
    if o == "phone":
        pa.rect(hx - 2.3, hy - 2, hx + 2.3, hy + 6, (25, 25, 30))
        pa.rect(hx - 1.4, hy - 1, hx + 1.4, hy + 4.6, (150, 190, 235))
    elif o == "cup":
        pa.rect(hx - 2.8, hy - 6, hx + 2.8, hy + 2, (240, 240, 240))
        pa.rect(hx - 2.8, hy - 3.5, hx + 2.8, hy - 0.5, (150, 100, 60))
        pa.rect(hx - 3.2, hy - 7, hx + 3.2, hy - 5.5, (40, 40, 40))
    elif o == "shopping bag":
        pa.line([(hx - 3, hy + 3), (hx, hy - 0.5), (hx + 3, hy + 3)], (90, 70, 50), 0.8)
        pa.rect(hx - 6, hy + 2.5, hx + 6, hy + 16, (205, 170, 115))
        pa.rect(hx - 6, hy + 2.5, hx + 6, hy + 4, (160, 125, 80))


def _umbrella(pa: _Painter, hand: tuple[float, float]) -> None:
    hx, hy = hand
    pa.line([(hx, hy), (hx, 3)], (40, 40, 40), 1.0)
    pa.chord(hx - 17, -3, hx + 17, 17, 180, 360, (30, 32, 45))
    pa.line([(hx, hy), (hx + 2, hy + 2.5)], (40, 40, 40), 1.0)


def _arm(
    pa: _Painter, p: Person, shoulder: tuple[float, float], hand: tuple[float, float], aw: float
) -> None:
    skin, c = SKIN[p.skin], COLOURS[p.upper_colour]
    pa.line([shoulder, hand], skin, aw)
    frac = 0.9 if p.sleeve_length == "long" else 0.38
    sx, sy = shoulder
    end = (sx + (hand[0] - sx) * frac, sy + (hand[1] - sy) * frac)
    pa.line([shoulder, end], c, aw + 0.5)
    pa.ell(hand[0] - 2.2, hand[1] - 2.2, hand[0] + 2.2, hand[1] + 2.2, skin)


def _hand_at(shoulder: tuple[float, float], angle: float, length: float = 32.0):
    return (shoulder[0] + length * math.sin(angle), shoulder[1] + length * math.cos(angle))


def _draw_frontal(pa: _Painter, p: Person, pose: tuple[float, float, float], back: bool) -> None:
    """Front or back view. On the back the face is hidden and a backpack shows whole."""
    swing, spread, stance = pose
    woman = p.gender == "woman"
    sw = (9.5 if woman else 11.0) * BUILDS[p.build]
    lw = 6.5 if woman else 7.5
    side = 1.0 if back else -1.0  # +x side of the held object (the person's right hand)
    col = COLOURS[p.upper_colour]
    # Hands: lateral spread plus a forward/back swing that foreshortens the arm.
    arm_len = 32 * (1 - 0.12 * abs(swing))
    sh_r, sh_l = (side * (sw - 1.5), 32.0), (-side * (sw - 1.5), 32.0)
    out = 0.12 + 0.2 * spread
    hand_r = _hand_at(sh_r, side * out, arm_len)
    hand_l = _hand_at(sh_l, -side * out, arm_len * (1 - 0.1 * swing))
    if p.held_object == "umbrella":
        hand_r = (sh_r[0] + side * 6, 44.0)
    feet = [(-4.2, -4.2 - 1.5 * stance - 1), (4.2, 4.2 + 1.5 * stance + 1)]
    if back and p.bag == "backpack":  # the top of the pack above the shoulders
        pa.rect(-8, 30, 8, 34, _shade(COLOURS[p.bag_colour], 0.8))
    _legs(pa, p, feet, lw)
    if p.upper_type == "dress" or p.lower_type == "skirt":
        _skirt(pa, p, 60 if p.upper_type == "dress" else 63, 0.8 * stance, 0)
    bottom = {"coat": 88.0, "dress": 62.0, "jacket": 69.0}.get(p.upper_type, 67.0)
    hem = sw + (2.0 if p.upper_type == "coat" else -1.5)
    pa.poly([(-sw, 30), (sw, 30), (hem, bottom), (-hem, bottom)], col)
    pa.ell(-sw - 1, 29, -sw + 4, 35, col)
    pa.ell(sw - 4, 29, sw + 1, 35, col)
    _upper_details(pa, p, sw, bottom, back)
    if back:
        _head(pa, p, "back", 0)
    bag_c = COLOURS.get(p.bag_colour, (0, 0, 0))
    if p.bag == "backpack":
        if back:
            pa.rect(-9.5, 33, 9.5, 62, bag_c)
            pa.rect(-6.5, 49, 6.5, 60, _shade(bag_c, 0.75))
        else:  # only the straps show from the front
            for x in (-sw + 2.2, sw - 5.2):
                pa.rect(x, 30, x + 3, 55, bag_c)
    if p.bag == "shoulder bag":
        pa.line([(side * (sw - 2), 30), (-side * (sw - 1), 58)], _shade(bag_c, 0.85), 1.6)
        pa.rect(-side * (sw + 3.5), 55, -side * (sw - 6.5), 66, bag_c)
    _arm(pa, p, sh_r, hand_r, 4.5 if not woman else 4.0)
    _arm(pa, p, sh_l, hand_l, 4.5 if not woman else 4.0)
    if p.bag == "handbag":
        hx, hy = hand_l
        pa.line([(hx - 3, hy + 3), (hx, hy - 1), (hx + 3, hy + 3)], _shade(bag_c, 0.7), 1.0)
        pa.rect(hx - 5, hy + 2, hx + 5, hy + 12, bag_c)
    if not back:
        _head(pa, p, "front", 0)
    _hat(pa, p, "back" if back else "front", 0)
    _scarf(pa, p, "back" if back else "front", 0)
    _held(pa, p, hand_r)
    if p.held_object == "umbrella":
        _umbrella(pa, hand_r)


def _draw_side(pa: _Painter, p: Person, pose: tuple[float, float, float]) -> None:
    """Profile facing +x: one arm in front of the body, legs in stride, a backpack behind."""
    swing, _, stance = pose
    woman = p.gender == "woman"
    hw = (7.0 if woman else 8.0) * BUILDS[p.build]
    lw = 6.5 if woman else 7.5
    col = COLOURS[p.upper_colour]
    stride = 3 + 6 * abs(stance)
    shoulder = (0.0, 32.0)
    near_hand = _hand_at(shoulder, 0.45 * swing)
    far_hand = _hand_at(shoulder, -0.45 * swing)
    bag_c = COLOURS.get(p.bag_colour, (0, 0, 0))
    if p.bag == "backpack":
        pa.rect(-hw - 8, 32, -hw + 1, 60, bag_c)
        pa.rect(-hw - 8, 46, -hw - 4, 58, _shade(bag_c, 0.75))
    # Far arm first, so a handbag in it peeks out behind the body.
    _arm(pa, p, shoulder, far_hand, 4.0)
    if p.bag == "handbag":
        hx, hy = far_hand
        pa.rect(hx - 5, hy + 2, hx + 5, hy + 12, bag_c)
    front_foot, back_foot = stride * (1 if swing >= 0 else -1), -stride * (1 if swing >= 0 else -1)
    _legs(pa, p, [(0.0, back_foot), (0.0, front_foot)], lw, toe=2.5)
    if p.upper_type == "dress" or p.lower_type == "skirt":
        _skirt(pa, p, 60 if p.upper_type == "dress" else 63, -2.5 + 0.3 * stride, 0.5)
    bottom = {"coat": 88.0, "dress": 62.0, "jacket": 69.0}.get(p.upper_type, 67.0)
    hem = hw + (2.0 if p.upper_type == "coat" else -1.0)
    pa.poly([(-hw, 30), (hw, 30), (hem, bottom), (-hem, bottom)], col)
    _upper_details(pa, p, hw, bottom, back=True)  # the type cues of the frontal view do not fit
    if p.upper_pattern == "logo":
        pa.rect(hw - 6, 38, hw - 1, 46, _contrast(p.upper_colour))
    if p.upper_type == "coat":
        pa.rect(hw - 2, 31, hw - 0.8, bottom, _shade(col, 0.6))
    _head(pa, p, "side", 1.0)
    _hat(pa, p, "side", 1.0)
    _scarf(pa, p, "side", 1.0)
    if p.bag == "shoulder bag":
        pa.line([(hw - 2, 30), (-hw + 1, 58)], _shade(bag_c, 0.85), 1.6)
        pa.rect(-hw - 2, 55, -hw + 7, 66, bag_c)
    if p.held_object == "umbrella":
        near_hand = (5.0, 44.0)
    _arm(pa, p, shoulder, near_hand, 4.5 if not woman else 4.0)
    _held(pa, p, near_hand)
    if p.held_object == "umbrella":
        _umbrella(pa, near_hand)
