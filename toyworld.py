"""The toy world: a synthetic world of coloured shapes, tiny CLIPs pretrained on it, and the demo.

Nobody can download CLIP's weights or its datasets here, and many students have no GPU. This file
makes every method in the project runnable and checkable on a laptop CPU in minutes:

  1. The world: 32-pixel images of a shape (10 kinds) in a colour (12) at a size (3) on a
     background (5 kinds), drawn with PIL at 4x and downsampled for clean edges, each with English
     captions made from several templates ("a photo of a small red circle on a striped background"),
     attributes sometimes left out. 12 colour+shape combinations are never shown in pretraining.
  2. Contrastive pretraining, CLIP's recipe in miniature [CLIP, arXiv 2103.00020, Fig. 3]:
        logits = exp(t) * normalise(image_features) @ normalise(text_features).T   (B, B)
        loss   = ( CE(logits, arange(B)) + CE(logits.T, arange(B)) ) / 2           symmetric InfoNCE
     with the learned temperature t, the real CLIP tokenizer and `clip.model.CLIP` itself, captions
     sampled afresh every step. Two image towers: a ResNet (learns shapes fast on a CPU) for the
     text-side methods and a ViT for VPT and multimodal prompts. The ViT cuts the image into a 4x4
     grid of 8-pixel patches (16 patch tokens and the class token); it learns under the ResNet's
     text tower, locked, with the ResNet's image features as a second target (see pretrain). Both
     are pretrained once (`--pretrain`) and shipped in assets/ as fp16 state dicts.
  3. Downstream datasets in the ImageFolder layout (train/ val/ test/), each drawn from its own
     seed: `shapes` (60 colour+shape classes, 6 of the colours x 10 shapes; base and new halves by
     the usual rule), the shifted domains `sketch` (outline drawings) and `noise` (Gaussian noise),
     one domain per test-time mechanism: `clutter` (a small shape off-centre among distractor marks:
     TPT's confident crops) and `haze` (low contrast, a colour cast, blur: shifted token statistics
     for PromptAlign), and `proxy` (10 shape classes, a source set for methods that need source
     statistics or prototypes). WORLD_SHA256 is the datasets' pixel checksum on the reference
     machine: the same digest, the same world.
  4. The demo: base-to-new on `sketch` for every method file present (test-time methods on
     clutter, haze and shapes), through sweep.py's runner, with each paper's claim checked against
     the noise (seed spread, and the binomial standard error of each column's test set). With
     --full (or alone: --fewshot), the few-shot protocol too: sweep.py's plan of each method that
     reads labels on `sketch` at 1, 2, 4, 8 and 16 shots, its curves drawn by sweep.py's plot.

Run
  python toyworld.py                # draw toy/ next to the shipped towers (about a minute)
  python toyworld.py --demo         # draw if needed, run every method file on it: the fast table
                                    # (one seed, a sixth of the test-time images; runs/demo)
  python toyworld.py --demo --full  # docs/toyworld.md's table: seeds 1, 2, 3, every test image;
                                    # then the few-shot curves (--fewshot)
  python toyworld.py --fewshot      # the few-shot curves alone: runs/demo/fewshot.png, .md
  python toyworld.py --pretrain     # pretrain both towers again into assets/ (about 45 minutes)
  python coop.py --backbone toy/clip_rn.pt --data toy/shapes --shots 4 --subsample base \\
        --eval-data toy/sketch toy/noise
"""

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

with warnings.catch_warnings():  # openai-clip 1.0.1 imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip

SHAPES = [
    "circle",
    "square",
    "triangle",
    "diamond",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "ring",
    "crescent",
]
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (35, 160, 55),
    "cyan": (40, 215, 225),
    "blue": (30, 60, 215),
    "purple": (135, 45, 185),
    "pink": (250, 140, 200),
    "brown": (125, 75, 35),
    "gray": (128, 128, 128),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
# the shape's extent as a fraction of the image
SIZES = {"small": 0.45, "medium": 0.62, "large": 0.8}
BACKGROUNDS = ["plain", "dark", "noisy", "striped", "checkered"]
PX, SUPER = 32, 4  # image side, supersampling factor

# Pretraining captions: an opening, the noun phrase with some attributes left out, maybe the
# background (the long openings reach the later positions, where learned prompts put the class name)
OPENINGS = [
    "a photo of a",
    "an image of a",
    "a picture of a",
    "a",
    "a photo of one",
    "in this picture from the toy world we see a",
    "here is a small picture, and it shows a",
]
# The toy models: the text tower of the reference prototype (3 layers, width 64: 1 head, context 24)
TEXT = dict(
    context_length=24,
    vocab_size=49408,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=3,
)
TOWERS = {
    "rn": dict(
        embed_dim=128,
        image_resolution=PX,
        vision_layers=(1, 1, 1, 1),
        vision_width=16,
        vision_patch_size=None,
        **TEXT,
    ),
    "vit": dict(
        embed_dim=128,
        image_resolution=PX,
        vision_layers=4,
        vision_width=128,
        vision_patch_size=8,
        **TEXT,
    ),
}
# The towers' pretraining (pretrain_towers; measured on one thread of a shared 2-core machine). The
# ResNet: 900 steps at lr 3e-3, 4 minutes: 72.6 % shape zero-shot. The ViT (a 4x4 grid of 8-pixel
# patches plus the class token) learns from the ResNet (see pretrain), batch 128 (twice the updates
# of 256 for the same compute), 38 minutes: 77.2 % shape, 79.9 % colour+shape (3000 steps: 70.2,
# 71.0; captions alone, no teacher: 11.9 % after 100 steps of 256, where the teacher gave 19.4 %).
RECIPES = {
    "rn": dict(steps=900, lr=3e-3, batch_size=256),
    "vit": dict(steps=6000, lr=1e-3, batch_size=128),
}


# ------------------------------------------------------------------------------------------------
# 1. Drawing the world
# ------------------------------------------------------------------------------------------------
def heldout_combinations(seed=0):
    """12 of the 120 colour+shape combinations, one per colour, never shown in pretraining."""
    rng = np.random.default_rng(seed)
    return {(c, SHAPES[s]) for c, s in zip(COLOURS, rng.permutation(len(SHAPES)).tolist() + [0, 1])}


def shape_mask(shape, size, rng, extent=None, off_centre=False):
    """The shape as a supersampled 'L' mask, randomly placed and rotated. extent: the shape's size
    as a fraction of the image instead of SIZES[size]; off_centre: placed away from the middle, in a
    random corner region (the `clutter` domain), not near it."""
    n = PX * SUPER
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    r = 0.5 * n * (extent or SIZES[size]) * rng.uniform(0.9, 1.1)
    if off_centre:  # each coordinate 55-90 % of the way from the middle to where the shape touches
        cx, cy = (n / 2 + rng.choice((-1, 1)) * rng.uniform(0.55, 0.9) * (n / 2 - r) for _ in "xy")
    else:
        cx, cy = (n / 2 + rng.uniform(-1, 1) * (n / 2 - r) * 0.5 for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)

    def polygon(radii, k, turn=angle, squash=1.0):
        pts = [
            (
                cx + radii[i % len(radii)] * squash * math.cos(turn + 2 * math.pi * i / k),
                cy + radii[i % len(radii)] * math.sin(turn + 2 * math.pi * i / k),
            )
            for i in range(k)
        ]
        draw.polygon(pts, fill=255)

    if shape in ("circle", "ring", "crescent"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
        if shape == "crescent":
            dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
            draw.ellipse(
                [cx + dx - 0.85 * r, cy + dy - 0.85 * r, cx + dx + 0.85 * r, cy + dy + 0.85 * r],
                fill=0,
            )
    elif shape == "square":
        # roughly axis-aligned
        polygon([r * 0.85], 4, turn=angle % (math.pi / 8) + math.pi / 4 - math.pi / 16)
    elif shape == "diamond":
        polygon([r], 4, turn=0.0, squash=0.6)  # a tall rhombus
    elif shape == "triangle":
        polygon([r], 3)
    elif shape == "pentagon":
        polygon([r], 5)
    elif shape == "hexagon":
        polygon([r], 6)
    elif shape == "star":
        polygon([r, 0.42 * r], 10)
    elif shape == "cross":
        t = 0.33 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
    return mask


def background(kind, rng):
    """A 32x32 background as an RGB array (32, 32, 3) in float."""
    tone = lambda lo, hi: rng.integers(lo, hi, 3).astype(np.float32)
    if kind == "plain":
        return np.broadcast_to(tone(165, 215), (PX, PX, 3))
    if kind == "dark":
        return np.broadcast_to(tone(25, 70), (PX, PX, 3))
    if kind == "noisy":
        return np.clip(tone(60, 200) + rng.normal(0, 30, (PX, PX, 3)), 0, 255).astype(np.float32)
    a, b = tone(30, 225), tone(30, 225)
    y, x = np.mgrid[0:PX, 0:PX]
    half = int(rng.integers(3, 6))  # half the period, in pixels
    if kind == "striped":
        # vertical, horizontal or diagonal
        on = ((x, y, x + y)[rng.integers(0, 3)] // half) % 2 == 0
    else:  # checkered
        on = (x // half + y // half) % 2 == 0
    return np.where(on[..., None], a, b)


def render(shape, colour, size, bg, rng, style="photo"):
    """One 32x32 RGB image. style 'photo': filled, on `bg`; 'sketch': the outline only, on paper;
    'clutter': a small filled shape off-centre among thin distractor marks (`size` is ignored);
    'haze': a photo with shifted statistics (see HAZE)."""
    if style == "clutter":
        mask = shape_mask(shape, size, rng, extent=CLUTTER_EXTENT, off_centre=True)
    else:
        mask = shape_mask(shape, size, rng)  # drawn at 4x ...
    if style == "sketch":
        mask = mask.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(2 * SUPER + 1))
        canvas = np.broadcast_to(np.array([210, 205, 190]) + rng.integers(-10, 10, 3), (PX, PX, 3))
    else:
        canvas = background(bg, rng)
    if style == "clutter":
        canvas = distractors(canvas, rng)
    # ... and averaged down
    alpha = np.asarray(mask.resize((PX, PX), Image.BOX), dtype=np.float32)[..., None] / 255
    ink = np.clip(np.array(COLOURS[colour]) + rng.integers(-12, 13, 3), 0, 255)
    image = Image.fromarray((canvas * (1 - alpha) + ink * alpha).round().astype(np.uint8))
    return haze(image, rng) if style == "haze" else image


CLUTTER_EXTENT, CLUTTER_MARKS = 0.42, (3, 6)  # the clutter shape's extent; marks per image


def distractors(canvas, rng):
    """Thin strokes and dots in random colours of the world, painted on the background: marks that
    are no shape of the world, so that only crops that frame the shape are confident."""
    n, colours = PX * SUPER, list(COLOURS.values())
    for _ in range(rng.integers(*CLUTTER_MARKS, endpoint=True)):
        mark = Image.new("L", (n, n), 0)
        x0, y0 = rng.uniform(0, n, 2)
        if rng.random() < 0.7:  # a stroke 5-12 px long at 32 px, 1 px wide
            length, turn = rng.uniform(5, 12) * SUPER, rng.uniform(0, math.pi)
            end = (x0 + length * math.cos(turn), y0 + length * math.sin(turn))
            ImageDraw.Draw(mark).line([(x0, y0), end], fill=255, width=SUPER)
        else:  # a dot 2 px across
            ImageDraw.Draw(mark).ellipse([x0, y0, x0 + 2 * SUPER, y0 + 2 * SUPER], fill=255)
        alpha = np.asarray(mark.resize((PX, PX), Image.BOX), dtype=np.float32)[..., None] / 255
        canvas = canvas * (1 - alpha) + np.array(colours[rng.integers(len(colours))]) * alpha
    return canvas


# The `haze` domain: the photos' image statistics shifted on purpose (for PromptAlign's token
# statistics): contrast halved around a warm grey, a colour cast, and a slight blur.
HAZE = dict(contrast=0.5, grey=(150, 135, 110), cast=(18, 6, -20), blur=0.8)


def haze(image, rng):
    """A photo seen through haze: lower contrast, a warm cast (jittered), blurred."""
    x = np.asarray(image.filter(ImageFilter.GaussianBlur(HAZE["blur"])), dtype=np.float32)
    cast = np.array(HAZE["cast"]) + rng.integers(-6, 7, 3)
    x = np.array(HAZE["grey"]) + HAZE["contrast"] * (x - np.array(HAZE["grey"])) + cast
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


def add_noise(image, sigma, rng):
    x = np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (PX, PX, 3))
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def random_attributes(rng, n, exclude=()):
    """n random (shape, colour, size, background) index tuples, never an excluded combination."""
    colours, out = list(COLOURS), []
    while len(out) < n:
        a = (
            rng.integers(len(SHAPES)),
            rng.integers(len(COLOURS)),
            rng.integers(len(SIZES)),
            rng.integers(len(BACKGROUNDS)),
        )
        if (colours[a[1]], SHAPES[a[0]]) not in exclude:
            out.append(tuple(int(v) for v in a))
    return np.array(out)


def draw_pool(attrs, seed):
    """Images (N, 3, 32, 32) uint8 for attribute rows (shape, colour, size, background)."""
    # NHWC -> NCHW
    return torch.from_numpy(draw_numpy(attrs, seed)).permute(0, 3, 1, 2).contiguous()


def draw_numpy(attrs, seed):
    rng = np.random.default_rng(seed)
    colours, sizes = list(COLOURS), list(SIZES)
    images = np.empty((len(attrs), PX, PX, 3), np.uint8)
    for i, (s, c, z, b) in enumerate(attrs):
        images[i] = np.asarray(render(SHAPES[s], colours[c], sizes[z], BACKGROUNDS[b], rng))
    return images


def caption(attrs, rng):
    """A fresh English caption for one image, e.g. 'a photo of a small red circle on a striped
    background.'"""
    shape, colour, size, bg = (
        SHAPES[attrs[0]],
        list(COLOURS)[attrs[1]],
        list(SIZES)[attrs[2]],
        BACKGROUNDS[attrs[3]],
    )
    size = size + " " if rng.random() < 0.5 else ""  # attributes are sometimes left out
    if rng.random() < 0.15:
        phrase = f"{size}{shape}"
    elif rng.random() < 0.2:  # the colour after the noun
        phrase = f"{size}{shape} in {colour}"
    else:
        phrase = f"{size}{colour} {shape}"
    where = f" on a {bg} background" if rng.random() < 0.5 else ""
    return f"{OPENINGS[rng.integers(len(OPENINGS))]} {phrase}{where}."


def draw_pool_parallel(attrs, seed, workers=2):
    """draw_pool over `workers` processes; chunk i of 8 uses seed + i, so the pool is the same every
    run, whatever the number of workers."""
    chunks = np.array_split(attrs, 8)
    if workers <= 1:
        parts = [draw_numpy(c, seed + i) for i, c in enumerate(chunks)]
    else:
        import multiprocessing as mp

        # "spawn", not "fork": a process forked after torch has used its thread pool can hang in it
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.starmap(draw_numpy, [(c, seed + i) for i, c in enumerate(chunks)])
    return torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW


# ------------------------------------------------------------------------------------------------
# 2. Contrastive pretraining of a tiny clip.model.CLIP
# ------------------------------------------------------------------------------------------------
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def to_input(images_uint8):
    """uint8 (B, 3, 32, 32) -> CLIP-normalised float, exactly as the methods' test transform."""
    return (images_uint8.float() / 255 - MEAN) / STD


def param_groups(model, weight_decay, trainable=None):
    """Weight decay on matrices only: none on gains, biases, embeddings and the temperature."""
    decay, no_decay = [], []
    keep = {id(p) for p in (trainable or model.parameters())}
    for name, p in model.named_parameters():
        if id(p) not in keep:
            continue
        is_matrix = p.dim() >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class CachedTokenizer:
    """clip.tokenize with a cache: each of the world's few thousand captions is tokenized once."""

    def __init__(self, context_length):
        self.context_length, self.cache = context_length, {}

    def __call__(self, texts):
        missing = [t for t in set(texts) if t not in self.cache]
        if missing:
            self.cache.update(
                zip(missing, clip.tokenize(missing, context_length=self.context_length))
            )
        return torch.stack([self.cache[t] for t in texts])


def pretrain(model, images, attrs, steps, batch_size, lr, seed, label="", teacher=None):
    """CLIP's symmetric InfoNCE on (image, fresh caption) pairs. Returns the loss curve.

    With a pretrained `teacher` CLIP (the ViT's recipe) the model takes the teacher's text tower and
    temperature and keeps them frozen (a "locked" text tower, as LiT locks the image tower [LiT,
    arXiv 2111.07991]), so only the image tower learns, and its features are also pulled towards
    the teacher's image features of the same image (feature distillation, as TinyCLIP [arXiv
    2309.12314]):  loss += DISTILL * (1 - cos(f_student, f_teacher)).  A ViT with a 4x4 grid of
    8-pixel patches learns shapes slowly from captions alone on a CPU budget; the teacher's dense
    target (a whole feature per image, not one caption among the batch's) gets it there."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    text_cache = None
    if teacher is not None:
        text = {k: v for k, v in teacher.state_dict().items() if not k.startswith("visual.")}
        model.load_state_dict(text, strict=False)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("visual."))
        teacher.eval().requires_grad_(False)
        text_cache = {}  # caption -> its frozen, normalised feature
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, 0.1, trainable)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = min(50, steps // 10)

    def schedule(s):  # linear warm-up, then cosine to 0
        return (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    tokenize = CachedTokenizer(model.context_length)
    # faster convolutions on the CPU
    channels_last = model.visual.__class__.__name__ == "ModifiedResNet"
    model.train()
    if channels_last:
        model.visual.to(memory_format=torch.channels_last)
    losses, t0 = [], time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = to_input(images[idx])  # (B, 3, 32, 32)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        captions = [caption(attrs[i], rng) for i in idx.tolist()]
        image_features = F.normalize(model.encode_image(x), dim=-1)  # (B, D)
        if text_cache is None:
            text_features = F.normalize(model.encode_text(tokenize(captions)), dim=-1)  # (B, D)
        else:
            text_features = frozen_text_features(model, tokenize, captions, text_cache)  # (B, D)
        logits = model.logit_scale.exp() * image_features @ text_features.t()  # [CLIP] (B, B)
        target = torch.arange(batch_size)
        # symmetric InfoNCE
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        if teacher is not None:
            with torch.no_grad():
                target_features = F.normalize(teacher.encode_image(x.contiguous()), dim=-1)
            # feature distillation: 1 - cosine similarity to the teacher's feature
            loss = loss + DISTILL * (1 - (image_features * target_features).sum(-1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # [CLIP] the temperature is clipped at 100
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            progress(
                f"pretraining {label}",
                step + 1,
                steps,
                t0,
                f"loss {np.mean(losses[-20:]):.3f}",
                newline_every=steps // 20 if torch.get_num_threads() <= 2 else 0,
            )
    model.to(memory_format=torch.contiguous_format).eval()
    model.requires_grad_(True)
    return losses


DISTILL = 10.0  # the distillation term's weight (a cosine gap of 0.1 weighs 1, as InfoNCE's ~1-2)


@torch.no_grad()
def frozen_text_features(model, tokenize, captions, cache):
    """Normalised features of a frozen text tower, each distinct caption encoded once."""
    missing = [c for c in dict.fromkeys(captions) if c not in cache]  # in order: reproducible
    if missing:
        features = F.normalize(model.encode_text(tokenize(missing)), dim=-1)  # (M, D)
        cache.update(zip(missing, features))
    return torch.stack([cache[c] for c in captions])  # (B, D)


def progress(what, done, total, t0, extra="", newline_every=0):
    """A one-line progress bar on stderr (a new line every `newline_every` steps when processes
    share it)."""
    if newline_every and done % newline_every > 10 and done != total:
        return
    elapsed = time.time() - t0
    bar = "#" * int(30 * done / total)
    eta = elapsed / done * (total - done) if done else float("nan")
    end = "\n" if newline_every or done == total else ""
    sys.stderr.write(
        f"\r{what} [{bar:<30}] {done}/{total} {elapsed:.0f}s, {eta:.0f}s left {extra}  {end}"
    )
    sys.stderr.flush()


@torch.no_grad()
def zero_shot_report(model, seed=123, n=2000):
    """Zero-shot accuracy (%) on fresh held-out images: shape, colour, colour+shape, unseen
    combinations."""
    rng = np.random.default_rng(seed)
    heldout = heldout_combinations()
    attrs = random_attributes(rng, n)
    x = to_input(draw_pool(attrs, seed))
    f = torch.cat(
        [F.normalize(model.encode_image(x[i : i + 500]), dim=-1) for i in range(0, n, 500)]
    )

    def logits(texts):
        t = F.normalize(
            model.encode_text(clip.tokenize(texts, context_length=model.context_length)), dim=-1
        )
        return model.logit_scale.exp() * f @ t.t()  # (n, len(texts))

    shapes, colours = torch.tensor(attrs[:, 0]), torch.tensor(attrs[:, 1])
    combo = logits([f"a photo of a {c} {s}." for c in COLOURS for s in SHAPES]).view(
        n, len(COLOURS), len(SHAPES)
    )
    pred_combo, true_combo = combo.flatten(1).argmax(-1), colours * len(SHAPES) + shapes
    unseen = torch.tensor([(list(COLOURS)[c], SHAPES[s]) in heldout for s, c, _, _ in attrs])
    report = {
        "shape": (logits([f"a photo of a {s}." for s in SHAPES]).argmax(-1) == shapes)
        .float()
        .mean(),
        # No caption names a colour without a shape, so colour is read from the 120 colour+shape
        # prompts: p(colour) = sum over shapes of p(colour, shape), a logsumexp over 10 logits.
        "colour": (combo.logsumexp(-1).argmax(-1) == colours).float().mean(),
        "colour+shape": (pred_combo == true_combo).float().mean(),
        "unseen combinations": (pred_combo == true_combo)[unseen].float().mean(),
    }
    return {k: round(100 * float(v), 1) for k, v in report.items()}


# ------------------------------------------------------------------------------------------------
# 3. Downstream datasets (ImageFolder layout) and the saved models
# ------------------------------------------------------------------------------------------------
# The downstream task's colours: 60 classes keep the demo's runs short (CoCoOp's cost grows with the
# number of classes times the number of test images). Sorted, base = blue, green, orange; new =
# purple, red, yellow.
TASK_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple"]
NOISE_SIGMA = 30  # strong enough that zero-shot drops, not so strong that it collapses
SPLITS = {"train": 16, "val": 4, "test": 10}  # images per class


def write_dataset(root, classes, splits, seed, style="photo", sigma=0.0):
    """root/<split>/<class folder>/<i>.png for classes given as (folder, shape or None, colour or
    None)."""
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for folder, shape, colour in classes:
            os.makedirs(os.path.join(root, split, folder), exist_ok=True)
            for i in range(per_class):
                image = render(
                    shape or SHAPES[rng.integers(len(SHAPES))],
                    colour or list(COLOURS)[rng.integers(12)],
                    list(SIZES)[rng.integers(3)],
                    BACKGROUNDS[rng.integers(5)],
                    rng,
                    style,
                )
                if sigma:
                    image = add_noise(image, sigma, rng)
                image.save(os.path.join(root, split, folder, f"{i:03d}.png"))
    # folder -> the words used in prompts
    with open(os.path.join(root, "classnames.txt"), "w") as f:
        f.writelines(f"{folder}\t{folder.replace('_', ' ')}\n" for folder, _, _ in classes)


def write_text(path, text):
    """Atomically: a temporary file, then a rename: an interrupted run never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_datasets(root, seed):
    # 60 classes, sorted by colour
    combos = [(f"{c}_{s}", s, c) for c in TASK_COLOURS for s in SHAPES]
    write_dataset(os.path.join(root, "shapes"), combos, SPLITS, seed + 1)
    write_dataset(os.path.join(root, "sketch"), combos, SPLITS, seed + 2, style="sketch")
    write_dataset(os.path.join(root, "noise"), combos, SPLITS, seed + 3, sigma=NOISE_SIGMA)
    write_dataset(os.path.join(root, "clutter"), combos, SPLITS, seed + 5, style="clutter")
    write_dataset(os.path.join(root, "haze"), combos, SPLITS, seed + 6, style="haze")
    write_dataset(
        os.path.join(root, "proxy"),
        [(s, s, None) for s in SHAPES],
        {"train": 50, "test": 20},
        seed + 4,
    )


DATASETS = ["shapes", "sketch", "noise", "proxy", "clutter", "haze"]


# The shipped towers: pretrained once by `python toyworld.py --pretrain`, saved as fp16 state dicts
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# The world's datasets, drawn with seed 0: sha256 of their decoded pixels (dataset_checksum). Two
# machines that print this digest drew the same images (pixels, not PNG bytes: zlib may differ).
WORLD_SHA256 = "59789bffe27bb8f7cb1ebacc74c96ac62ce29e84eb0afa44d820d4bbd5c3148e"


def pretrain_towers(out=ASSETS, seed=0, recipes=RECIPES, threads=1):
    """The towers' recipe, run once: the ResNet by CLIP's loss alone, then the ViT (its text tower
    locked to the ResNet's, its image features distilled from the ResNet's; see pretrain). Writes
    out/clip_rn.pt, out/clip_vit.pt (fp16 state dicts) and out/towers.json (recipe, zero-shot)."""
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(threads)
    t0 = time.time()
    attrs = random_attributes(
        np.random.default_rng(seed), 100_000, exclude=heldout_combinations(seed)
    )
    images = draw_pool_parallel(attrs, seed + 1, workers=2)
    print(f"drew 100,000 pretraining images in {time.time() - t0:.0f}s")
    record, teacher = {"seed": seed}, None
    for tower in ("rn", "vit"):
        torch.manual_seed(seed)
        model, t1, r = clip.model.CLIP(**TOWERS[tower]), time.time(), recipes[tower]
        pretrain(model, images, attrs, r["steps"], r["batch_size"], r["lr"], seed, tower, teacher)
        seconds = time.time() - t1
        model = save_tower(model, os.path.join(out, f"clip_{tower}.pt"))
        record[tower] = {"config": dict(TOWERS[tower]), **r, "teacher": "rn" if teacher else None,
            "pretrain_seconds": round(seconds, 1), "threads": threads,
            "zero_shot": zero_shot_report(model)}  # fmt: skip
        print(f"{tower}: {seconds:.0f}s of pretraining; zero-shot: {record[tower]['zero_shot']}")
        write_text(os.path.join(out, "towers.json"), json.dumps(record, indent=2))
        teacher = model  # the ViT learns from the ResNet
    return record


def save_tower(model, path):
    """A plain fp16 state dict (half the bytes; every method file's load_clip reads it and works in
    fp32 from there: clip.load itself cannot read state-dict files in openai-clip 1.0.1). Returns
    the model as loaded back from the file, so that what is reported is what is shipped."""
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return load_tower(path)


def load_tower(path):
    """A shipped tower as the methods see it: fp16 weights in an fp32 clip.model.CLIP."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = clip.model.build_model(dict(state)).float()
    model.load_state_dict(state)
    return model.eval()


def dataset_checksum(root):
    """sha256 over every image's relative path and decoded RGB pixels, in sorted order."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".png")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            digest.update(np.asarray(Image.open(path).convert("RGB")).tobytes())
    return digest.hexdigest()


def build_world(root="toy", seed=0, force=False, towers=ASSETS):
    """toy/: the shipped towers copied in, and the datasets drawn (whatever is missing, or all
    with force). Returns the world's record (world.json)."""
    os.makedirs(root, exist_ok=True)
    record_path = os.path.join(root, "world.json")
    fresh = force or not os.path.isfile(record_path)
    record = {"seed": seed} if fresh else json.load(open(record_path))
    for tower in TOWERS:
        path, shipped = (
            os.path.join(root, f"clip_{tower}.pt"),
            os.path.join(towers, f"clip_{tower}.pt"),
        )
        if force or not os.path.isfile(path):
            if not os.path.isfile(shipped):
                sys.exit(
                    f"error: no {shipped}: rebuild the towers with python toyworld.py --pretrain"
                )
            shutil.copyfile(shipped, path)
    if os.path.isfile(os.path.join(towers, "towers.json")):
        for tower, about in json.load(open(os.path.join(towers, "towers.json"))).items():
            if tower in TOWERS:
                record.setdefault(tower, {}).update(about)
    if force or not os.path.isfile(os.path.join(root, "haze", "classnames.txt")):
        t0 = time.time()
        write_datasets(root, seed)
        record["datasets_sha256"] = dataset_checksum(root)
        print(f"drew the datasets {', '.join(DATASETS)} in {time.time() - t0:.0f}s")
        if seed == 0 and WORLD_SHA256 and record["datasets_sha256"] != WORLD_SHA256:
            other = "another Pillow or numpy version draws other pixels"
            print(f"warning: datasets_sha256 is not the reference world's {WORLD_SHA256}: {other}")
    write_text(record_path, json.dumps(record, indent=2))
    return record


# ------------------------------------------------------------------------------------------------
# 4. The demo: every method file present, on the toy world, against zero-shot CLIP
# ------------------------------------------------------------------------------------------------
# The demo's protocol: base-to-new on the sketch domain, where zero-shot CLIP is weak (as on EuroSAT
# or DTD for the real CLIP): train on the 30 base classes' sketches, test on base and new sketches,
# and test what was learned on the photo-like `shapes` (does it forget what CLIP knew?) and on
# `noise`. Test-time methods see no sketch label: they tune on each test image of `sketch`, `noise`
# and `shapes` (all 60 classes), PromptAlign and PromptSync from prompts learned on `proxy`.
TRAIN_DOMAIN, DOMAINS = "sketch", ["shapes", "noise"]
# The random resized crop keeps at least half the image: an 8% crop of a 32-pixel image (the
# papers' 0.08, made for 224-pixel photos) often cuts the shape away, and training on it hurts.
COMMON = ["--crop-scale", "0.5"]
# VPT on the toy ViT (a 4x4 patch grid): MaPLe's 5 epochs are 150 steps at batch 4; vpt.py's toy
# setting trains 20 epochs on flipped, uncropped images (see its docstring)
VPT_TOY = ["--epochs", "20", "--crop-scale", "1"]
# The padding prompt: Bahng et al.'s recipe (lr 40, batch 256, a 1,000-step warm-up) for 250 epochs
# instead of 1,000. The toy's 120 training images make one step per epoch, so every run of it stays
# in the warm-up; 250 epochs give the same base accuracy as 1,000 (46.0 against 45.3, measured in
# docs/toyworld.md) in a quarter of the time, which keeps the demo within 6 minutes.
PAD_TOY = COMMON + ["--method", "pad", "--epochs", "250"]
# (label, file, tower, shot counts, extra arguments, the paper's claim, how the toy checks it).
# A check ("base" | "new" | "shapes", label or None) compares the row with zero-shot CLIP of the
# same tower, or with another row, on that column. Files that are not there are skipped.
DEMO_METHODS = [
    (
        "CoOp",
        "coop.py",
        "rn",
        (1, 4),
        COMMON + ["--ctx-init", "a photo of a"],
        "a learned context beats the hand-made prompt on its classes",
        ("base", None),
    ),
    (
        "CoOp, class-specific",
        "coop.py",
        "rn",
        (1, 4),
        COMMON + ["--csc"],  # the CoOp paper's CSC: 16 random vectors per class
        "one context per class fits fine-grained classes better than a generic one",
        ("base", "CoOp"),
    ),
    (
        "CoCoOp",
        "coop.py",
        "rn",
        (1, 4),
        COMMON + ["--cocoop"],
        "generalises to new classes better than CoOp",
        ("new", "CoOp"),
    ),
    (
        "ProGrad",
        "prograd.py",
        "rn",
        (1, 4),
        COMMON,
        "forgets less of zero-shot CLIP than CoOp on other domains",
        ("shapes", "CoOp"),
    ),
    (
        "CLIP-Adapter",
        "adapter.py",
        "rn",
        (4,),
        COMMON + ["--method", "clip-adapter"],
        "a residual adapter beats zero-shot CLIP on its classes",
        ("base", None),
    ),
    (
        "Tip-Adapter",
        "adapter.py",
        "rn",
        (4,),
        COMMON + ["--method", "tip"],
        "a training-free cache beats zero-shot CLIP on its classes",
        ("base", None),
    ),
    (
        "Tip-Adapter-F",
        "adapter.py",
        "rn",
        (4,),
        COMMON + ["--method", "tip-f"],
        "fine-tuning the cache's keys beats the training-free cache",
        ("base", "Tip-Adapter"),
    ),
    (
        "Linear probe",
        "adapter.py",
        "rn",
        (4,),
        COMMON + ["--method", "linear-probe"],
        "a linear probe beats zero-shot CLIP with a few shots",
        ("base", None),
    ),
    (
        "VPT-shallow",
        "vpt.py",
        "vit",
        (4,),
        VPT_TOY + ["--method", "shallow"],
        "prompt tokens in the image tower beat zero-shot CLIP",
        ("base", None),
    ),
    (
        "VPT-deep",
        "vpt.py",
        "vit",
        (4,),
        VPT_TOY + ["--method", "deep"],
        "deep prompts beat shallow ones",
        ("base", "VPT-shallow"),
    ),
    (
        "Padding prompt",
        "vpt.py",
        "vit",
        (4,),
        PAD_TOY,
        "a learned pixel border beats zero-shot CLIP",
        ("base", None),
    ),
]
# Test-time methods tune on each test image of the domains made for their mechanisms: `clutter` (a
# small shape among marks: some of TPT's crops frame it and are confident), `haze` (shifted image
# statistics: what PromptAlign aligns) and `shapes` (the pretraining look: tuning should not hurt).
TEST_DOMAINS = ["clutter", "haze", "shapes"]
# (label, extra arguments, the paper's claim, the row it is compared with, on which column);
# promptsync.py, ViT; PromptAlign and PromptSync start from MaPLe's prompts learned on `proxy`.
SOURCE = ["--stage", "source", "--crop-scale", "1"]
SOURCE_ROW = "MaPLe source prompts (no tuning)"  # PromptAlign's predictions before its step
TEST_TIME = [
    ("TPT", ["--loss", "tpt"], "tuning on one image's views beats zero-shot CLIP", None, "clutter"),
    ("PromptAlign", ["--loss", "align"], "aligning token statistics beats TPT", "TPT", "haze"),
    ("PromptSync", ["--loss", "sync"], "class-aware prototypes beat PromptAlign", "PromptAlign",
     "haze"),
]  # fmt: skip
# --full only: PromptSync's ablation (its Table 5), each loss weight at 0 (--sync-weights E,A,D);
# the claim is the full method's: it beats the row
ABLATIONS = [
    (f"PromptSync, {name} off", ["--loss", "sync", "--sync-weights", w],
     f"PromptSync gains from {name}", "PromptSync", "haze")
    for name, w in [("entropy", "0,1,1"), ("L_A", "1,0,1"), ("L_D", "1,1,0")]
]  # fmt: skip


# The default demo is the fast table (one seed; the test-time methods on every 6th test image);
# --full runs docs/toyworld.md's table: seeds 1, 2, 3 and every test image.
FAST = dict(seeds=(1,), shard="0/6")
FULL = dict(seeds=(1, 2, 3), shard="0/1")
# The longest runs start first, so that the two workers finish together.
LONG_FIRST = ["Padding prompt", "source", "PromptSync", "PromptAlign", "TPT", "CoCoOp"]
LONG_FIRST[3:3] = [t[0] for t in ABLATIONS]

# The few-shot protocol on the toy (CoOp's few-shot figure in miniature): sweep.py's few-shot plan
# of each method that reads labels, on `sketch` (all 60 classes, 16 training and 10 test images
# each; zero-shot CLIP is weak there, so a curve has room to climb), at 1, 2, 4, 8 and 16 shots,
# zero-shot CLIP of each tower as the marker at 0 shots. The files' own settings (CoOp: 16 random
# context vectors, 50/100/200 epochs), the toy's crop. CoCoOp (a step per image, its prompts
# through the text encoder for each) would take about as long as CoOp and ProGrad together, so it
# is left out, as are VPT-shallow, the padding prompt and class-specific CoOp, for time.
# (label, file, tower, options after sweep's `--`), the slowest first, so that they start first.
FEWSHOT_METHODS = [
    ("CoOp", "coop.py", "rn", COMMON),
    ("ProGrad", "prograd.py", "rn", COMMON),
    ("VPT-deep", "vpt.py", "vit", VPT_TOY + ["--method", "deep"]),
    ("CLIP-Adapter", "adapter.py", "rn", COMMON + ["--method", "clip-adapter"]),
    ("Linear probe", "adapter.py", "rn", COMMON + ["--method", "linear-probe"]),
    ("Tip-Adapter-F", "adapter.py", "rn", COMMON + ["--method", "tip-f"]),
    ("Tip-Adapter", "adapter.py", "rn", COMMON + ["--method", "tip"]),
]
FEWSHOT = dict(dataset="sketch", shots=(1, 2, 4, 8, 16), seeds=(1, 2))


def ceilings(root, tower):
    """Know the ceiling first: roughly what a method reading these frozen image features can reach
    (a guide, not a bound). adapter.py's linear probe (C searched on val/, as that file does) on
    every training image of each column's classes (16 per class), scored on that column's test
    images. -> {column: accuracy %}"""
    import adapter

    device, out = torch.device("cpu"), {}
    model = adapter.load_clip(f"{root}/clip_{tower}.pt", device, "fp32")
    transform = adapter.test_transform(model.visual.input_resolution)
    columns = {"base": (TRAIN_DOMAIN, "base"), "new": (TRAIN_DOMAIN, "new")}
    columns.update({d: (d, "all") for d in DOMAINS})
    for column, (domain, part) in columns.items():
        args = argparse.Namespace(
            data=f"{root}/{domain}", split_file=None, subsample=part, eval_data=[]
        )
        _, data, _ = adapter.load_task(args)  # every training image: no few-shot sample
        f, y = {}, {}
        for split in ("train", "val", "test"):
            views = adapter.encode_views(
                model.encode_image, data[split], transform, device, "fp32", workers=0
            )
            f[split] = views[0]  # (N, D): one view, the test transform
            y[split] = adapter.label_tensor(data[split], device)
        n_cls = len(data["classnames"])
        fit = lambda C_reg: adapter.fit_linear_probe(f["train"], y["train"], n_cls, C_reg)
        score = lambda probe, s: adapter.accuracy(f[s] @ probe[0].t() + probe[1], y[s])
        _, probe, _ = adapter.search_C_reg(fit, lambda probe: score(probe, "val"))
        out[column] = round(score(probe, "test"), 2)
    return out


def claim_verdict(row, other, column, n_images=None):
    """'yes' when the row beats the other on `column` by more than the noise, 'no' when it is behind
    by as much, 'within noise' in between. The noise: twice the larger std over seeds, and at least
    twice the binomial standard error of an accuracy on the column's n_images test images (one seed
    has no std: the test set's own sampling error is then the noise), and at least one point."""
    (a, sa), (b, sb) = row[column], other[column]
    noise = max(2 * max(sa, sb), 1.0, 2 * binomial_se(a, b, n_images) if n_images else 0.0)
    verdict = "yes" if a - b > noise else "no" if b - a > noise else "within noise"
    return f"{verdict} ({a - b:+.1f} on {column}, noise {noise:.1f})"


def binomial_se(a, b, n):
    """The standard error (points) of an accuracy near the mean of a and b (%) on n images."""
    p = (a + b) / 200
    return 100 * math.sqrt(p * (1 - p) / n)


def draw_picture(root, path, per_domain=8, scale=3):
    """One PNG of the world a student can look at: for each domain, a row of training images
    (each `scale` times enlarged) with the class names under them, drawn with pillow."""
    every = [TRAIN_DOMAIN] + DOMAINS + TEST_DOMAINS[:2] + ["proxy"]
    domains = [d for d in every if os.path.isdir(f"{root}/{d}")]
    cell, label_h, left = PX * scale + 8, 24, 70
    sheet = Image.new("RGB", (left + per_domain * cell, len(domains) * (cell + label_h)), "white")
    pen = ImageDraw.Draw(sheet)
    for row, domain in enumerate(domains):
        folders = sorted(os.listdir(f"{root}/{domain}/train"))
        picks = [folders[i * len(folders) // per_domain] for i in range(per_domain)]
        y = row * (cell + label_h)
        pen.text((4, y + cell // 2), domain, fill="black")
        for col, folder in enumerate(picks):
            first = sorted(os.listdir(f"{root}/{domain}/train/{folder}"))[0]
            image = Image.open(f"{root}/{domain}/train/{folder}/{first}").convert("RGB")
            sheet.paste(image.resize((PX * scale,) * 2, Image.NEAREST), (left + col * cell, y + 4))
            for line, words in enumerate(folder.replace("_", " ").split(" ", 1)):
                pen.text((left + col * cell, y + cell + line * 10 - 4), words, fill="black")
    tmp = path + ".tmp.png"
    sheet.save(tmp)
    os.replace(tmp, path)


def demo(root="toy", out=None, shots=None, seeds=None, full=False, parallel=2, only=None):
    """Every method file present on the toy world, through sweep.py's runner: the runs, then the
    table (mean ± std over seeds, the linear-probe ceiling, a claim column) in results.md/json and
    a picture of the world in world.png. full=False: the fast table (FAST), else FULL."""
    import sweep

    t0, here = time.time(), os.path.dirname(os.path.abspath(__file__))
    setting = FULL if full else FAST
    seeds, out = seeds or setting["seeds"], out or ("runs/demo-full" if full else "runs/demo")
    data = ["--data", f"{root}/{TRAIN_DOMAIN}", "--subsample", "base", "--eval-data"]
    data += [f"{root}/{d}" for d in DOMAINS]
    present = lambda file: os.path.isfile(os.path.join(here, file))
    methods = [m for m in DEMO_METHODS if present(m[1]) and (only is None or m[0] in only)]
    lines, folders = [], {}

    def command(file, folder, args):  # folder: "<label>/<run>", the label's slug on disk
        label, _, run = folder.partition("/")
        slug = "".join(c for c in label.lower().replace(" ", "-") if c.isalnum() or c == "-")
        folder = os.path.join(slug, run) if run else slug
        folders.setdefault(label, []).append(os.path.join(out, folder))
        argv = [sys.executable, os.path.join(here, file), *args, "--workers", "0"]
        first = LONG_FIRST.index(label) if label in LONG_FIRST else len(LONG_FIRST)
        lines.append((first, shlex.join(argv + ["--out", os.path.join(out, folder)])))

    for tower in sorted({m[2] for m in methods}):
        command(
            "zeroshot.py",
            f"Zero-shot CLIP ({tower})",
            [f"--backbone={root}/clip_{tower}.pt", *data],
        )
    for label, file, tower, counts, extra, _, _ in methods:
        for k in counts if shots is None else [k for k in counts if k in shots]:
            for seed in seeds:
                args = [f"--backbone={root}/clip_{tower}.pt", *data, "--shots", str(k)]
                command(file, f"{label}/{k}shot_seed{seed}", args + ["--seed", str(seed), *extra])
    if present("promptsync.py") and (only is None or "TPT" in only):
        vit, rest = f"--backbone={root}/clip_vit.pt", [f"{root}/{d}" for d in TEST_DOMAINS[1:]]
        command("promptsync.py", "source", [vit, "--data", f"{root}/proxy", *SOURCE])
        for label, extra, _, _, _ in TEST_TIME + (ABLATIONS if full else []):
            load = ["--load", f"{out}/source/checkpoint.pt"] if "tpt" not in extra else []
            args = [vit, "--data", f"{root}/{TEST_DOMAINS[0]}", "--eval-data", *rest, *load, *extra]
            args += ["--crop-scale", "0.5", "--shard", setting["shard"]]
            command("promptsync.py", f"{label}/seed1", args)
    lines = [line for _, line in sorted(lines, key=lambda x: x[0])]  # stable: plan order kept
    result = sweep.run_plan(lines, workers=parallel)
    if result["failed"] or result["blocked"]:
        logs = [os.path.join(d, "run.log") for d in result["failed"]]
        sys.exit(f"error: demo runs failed; see {logs or result['blocked']}")

    sharded = [t[0] for t in TEST_TIME + ABLATIONS] if setting["shard"] != "0/1" else []
    stats = {n: one_shard(d[0]) if n in sharded else sweep.collect(d) for n, d in folders.items()}
    rows = table_rows(stats, methods)
    if only is None and present("adapter.py"):  # the ceilings, next to each tower's zero-shot row
        record_path = os.path.join(root, "world.json")
        record = json.load(open(record_path)) if os.path.isfile(record_path) else {}
        for tower in sorted({m[2] for m in methods}):
            if "ceiling" not in record.get(tower, {}):  # once per world: it is the world's property
                print(f"the ceilings of the {tower} tower (linear probes, about a minute)")
                record.setdefault(tower, {})["ceiling"] = ceilings(root, tower)
                write_text(record_path, json.dumps(record, indent=2))
            row = {k: [v, 0.0] for k, v in record[tower]["ceiling"].items()}
            row["H"] = [2 * row["base"][0] * row["new"][0] / (row["base"][0] + row["new"][0]), 0.0]
            at = next(i for i, r in enumerate(rows) if r["label"] == f"Zero-shot CLIP ({tower})")
            rows.insert(at + 1, {"label": f"Ceiling: linear probe ({tower})", "shots": 16, **row})
    text = format_demo(rows, methods, root, seeds, time.time() - t0, full)
    write_text(os.path.join(out, "results.md"), text)
    write_text(os.path.join(out, "results.json"), json.dumps({"rows": rows}, indent=2))
    draw_picture(root, os.path.join(out, "world.png"))
    print("\n" + text)
    return rows


def one_shard(folder):
    """The fast table's test-time row: one shard's metrics.json (its own images only), in the form
    of sweep.collect's rows (sweep's tables wait for every shard of a run, as they should)."""
    path = os.path.join(folder, "metrics.json")
    metrics = json.load(open(path))
    stats = {k: (v, 0.0) for k, v in metrics["accuracy"].items()}
    return [{"paths": [path], "shots": 0, "seeds": [metrics["seed"]], "stats": stats}]


def table_rows(stats, methods):
    """One row per (label, shots): {column: (mean, std)} from sweep.collect's statistics."""
    test_time = [t[0] for t in TEST_TIME + ABLATIONS]
    rows = []
    for name, found in stats.items():
        # metrics.json's "test" is the --data set: sketch's for the methods, clutter's at test time
        rename = {"test": TEST_DOMAINS[0] if name in test_time else "base"}
        for r in found:
            if not r["paths"]:  # sweep's average over datasets: one dataset here
                continue
            values = {rename.get(k, k): list(v) for k, v in r["stats"].items() if k != "zero-shot"}
            rows.append({"label": name, "shots": r["shots"], "seeds": r["seeds"], **values})
    # A test-time run's "before" (its metrics.json's zero_shot): zero-shot CLIP (ViT) for TPT, which
    # starts from CLIP's own prompt; MaPLe's source prompts, untuned, for PromptAlign
    for label, before_of in [("Zero-shot CLIP (vit, 60-way)", "TPT"), (SOURCE_ROW, "PromptAlign")]:
        found = stats.get(before_of)
        if found and found[0]["paths"]:
            before = json.load(open(found[0]["paths"][0]))["zero_shot"]
            values = {(TEST_DOMAINS[0] if k == "test" else k): [v, 0.0] for k, v in before.items()}
            rows.append({"label": label, "shots": 0, "seeds": found[0]["seeds"], **values})
    order = ["Zero-shot CLIP (rn)"] + [m[0] for m in methods if m[2] == "rn"]
    order += ["Zero-shot CLIP (vit)"] + [m[0] for m in methods if m[2] == "vit"]
    order += ["source", "Zero-shot CLIP (vit, 60-way)", SOURCE_ROW] + test_time
    return sorted(
        rows, key=lambda r: (order.index(r["label"]) if r["label"] in order else 99, r["shots"])
    )


def format_demo(rows, methods, root, seeds, seconds, full=True):
    """The demo's table: mean ± std over seeds, and whether the toy shows each paper's claim."""
    setting = FULL if full else FAST
    every, per_class = int(setting["shard"].split("/")[1]), SPLITS["test"]
    n_test = {"base": 30 * per_class, "new": 30 * per_class}  # images per column (60 classes)
    n_test.update({d: 60 * per_class for d in DOMAINS})
    per_domain = -(-60 * per_class // every)  # shard K/N keeps every N-th image: ceil(n / N), K = 0
    fmt = lambda v: "–" if v is None else f"{v[0]:.1f}" + (f" ± {v[1]:.1f}" if v[1] else "")
    find = lambda label, k: next((r for r in rows if r["label"] == label and r["shots"] == k), None)
    claims = {m[0]: (m[2], m[5], m[6]) for m in methods}
    test_time = {t[0]: t for t in TEST_TIME + ABLATIONS}
    before_rows = ["Zero-shot CLIP (vit, 60-way)", SOURCE_ROW]
    cols = ["base", "new", "H"] + DOMAINS
    out = [
        "| method | tower | shots | "
        + " | ".join(cols)
        + " | the paper's claim: does the toy show it? |",
        "|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    for r in rows:
        if r["label"] in test_time or r["label"] in before_rows or r["label"] == "source":
            continue
        tower, claim, check = claims.get(
            r["label"], ("rn" if "(rn)" in r["label"] else "vit", "", None)
        )
        verdict = ""
        if check:
            column, versus = check
            other = find(versus, r["shots"]) if versus else find(f"Zero-shot CLIP ({tower})", 0)
            if other and column in r and column in other:
                verdict = f"{claim}: {claim_verdict(r, other, column, n_test.get(column))}"
        out.append(
            f"| {r['label']} | {tower} | {r['shots']} | "
            + " | ".join(fmt(r.get(c)) for c in cols)
            + f" | {verdict} |"
        )
    tt_rows = [r for r in rows if r["label"] in test_time or r["label"] in before_rows]
    if tt_rows:
        out += ["", "| test-time method (ViT) | " + " | ".join(TEST_DOMAINS)
                + " | the paper's claim: does the toy show it? |",
                "|---|" + "---|" * len(TEST_DOMAINS) + "---|"]  # fmt: skip
        for r in tt_rows:
            verdict = ""
            if r["label"] in test_time:
                _, _, claim, versus, column = test_time[r["label"]]
                a, b = r, find(versus or "Zero-shot CLIP (vit, 60-way)", 0)
                if r["label"].startswith("PromptSync, "):  # an ablation: the full method's claim
                    a, b = b, a
                if a and b and column in a and column in b:
                    verdict = f"{claim}: {claim_verdict(a, b, column, per_domain)}"
            out.append(
                f"| {r['label']} | "
                + " | ".join(fmt(r.get(c)) for c in TEST_DOMAINS)
                + f" | {verdict} |"
            )
    shown = "every test image" if every == 1 else f"1 in {every} test images"
    shown += f" ({per_domain} per domain)"
    note = (
        f"\nToy world `{root}`. Trained on {TRAIN_DOMAIN} drawings of the 30 base colour+shape "
        f"classes; base and new: {TRAIN_DOMAIN} test images, 30-way; H: their harmonic mean; "
        f"{' and '.join(DOMAINS)}: what was learned, on other domains, all 60 classes (a "
        "class-specific context and the linear probe know only their training classes: –). "
        "Ceiling: adapter.py's linear probe on the frozen features of all 16 training images per "
        "class of each column's classes (new: a probe of its own on the new classes). Test-time "
        f"methods: {shown} of {', '.join(TEST_DOMAINS)}, 60-way, seed 1; {SOURCE_ROW}: the "
        "prompts PromptAlign and PromptSync start from, learned on `proxy`. Seeds "
        f"{list(seeds)}, mean ± population std. 'yes'/'no': the difference is more than twice the "
        "larger std over seeds, twice the binomial standard error of an accuracy on the column's "
        "test images (300 for base and new, 600 for the other domains, "
        f"{per_domain} at test time) and one point"
        + ("" if len(seeds) > 1 else " (one seed here: no std, so the binomial error decides)")
        + f". {seconds:.0f}s for the runs and the ceilings on {os.cpu_count()} cores."
    )
    if not full:
        note += (
            f"\nThis is the fast table (one seed, every {every}th test-time image). The full table "
            "(docs/toyworld.md), seeds 1, 2, 3, every test image: python toyworld.py --demo --full"
        )
    return "\n".join(out) + "\n" + note + "\n"


def fewshot_plan(root="toy", out="runs/demo", shots=None, seeds=None, methods=None):
    """sweep.py's few-shot plan of each method of FEWSHOT_METHODS present, on `root`/sketch, and
    zero-shot CLIP once per tower -> command lines, the most shots first (then in the order of
    FEWSHOT_METHODS), so that the runner's workers finish together. Run folders:
    <out>/few-shot/<label>/sketch/<k>shot_seed<s> (zero-shot CLIP: 0shot)."""
    import sweep

    here = os.path.dirname(os.path.abspath(__file__))
    methods = [m for m in methods or FEWSHOT_METHODS if os.path.isfile(os.path.join(here, m[1]))]
    towers = sorted({m[2] for m in methods})
    runs = [(f"Zero-shot CLIP ({t})", "zeroshot.py", t, []) for t in towers]
    lines = []
    for rank, (label, file, tower, extra) in enumerate(methods + runs):
        tag = "".join(c for c in label.lower().replace(" ", "-") if c.isalnum() or c == "-")
        commands, _ = sweep.plan_commands(
            "few-shot",
            os.path.join(here, file),
            datasets=[os.path.join(root, FEWSHOT["dataset"])],
            shots=shots or FEWSHOT["shots"],
            seeds=seeds or FEWSHOT["seeds"],
            extras=[f"--backbone={root}/clip_{tower}.pt", *extra, "--workers", "0"],
            out=out,
            tag=tag,
            python=sys.executable,
        )
        shots_of = lambda tokens: int(sweep.option(tokens, "--shots") or 0)
        lines += [(-shots_of(c), rank, i, shlex.join(c)) for i, (_, c) in enumerate(commands)]
    return [line for *_, line in sorted(lines)]


def fewshot(root="toy", out="runs/demo", shots=None, seeds=None, parallel=2, methods=None):
    """The few-shot protocol on the toy through sweep.py: its plan (fewshot_plan), its runner
    (finished runs skipped), its statistics and its plot -> <out>/fewshot.png (accuracy against
    shots, a curve per method, zero-shot CLIP as a marker at 0 shots) and <out>/fewshot.md (mean ±
    std over seeds per method and shot count, then sweep's table). -> (rows, what the plot drew)"""
    import sweep

    t0, seeds = time.time(), seeds or FEWSHOT["seeds"]
    result = sweep.run_plan(fewshot_plan(root, out, shots, seeds, methods), workers=parallel)
    if result["failed"] or result["blocked"]:
        logs = [os.path.join(d, "run.log") for d in result["failed"]]
        sys.exit(f"error: few-shot runs failed; see {logs or result['blocked']}")
    rows = sweep.collect(os.path.join(out, "few-shot"))
    drawn = sweep.plot(rows, out)[os.path.join(out, "fewshot.png")]
    text = format_fewshot(rows, root, seeds, time.time() - t0)
    text += "\n" + sweep.format_table(rows, paper=False)
    write_text(os.path.join(out, "fewshot.md"), text)
    print("\n" + text + f"\nwrote {os.path.join(out, 'fewshot.png')} and fewshot.md")
    return rows, drawn


def format_fewshot(rows, root, seeds, seconds):
    """sweep.collect's few-shot rows as a line per curve of sweep's plot (its name: the method and
    the tower): the test accuracy at each shot count, mean ± population std over seeds."""
    import sweep

    shots = sorted({r["shots"] for r in rows})
    curves = {}
    for r in rows:
        if r["paths"] and "test" in r["stats"]:  # not sweep's averages over datasets (none here)
            curves.setdefault(sweep.curve_name(r), {})[r["shots"]] = r
    spread = lambda r: f" ± {r['stats']['test'][1]:.1f}" if len(r["seeds"]) > 1 else ""
    fmt = lambda r: f"{r['stats']['test'][0]:.1f}" + spread(r) if r else ""
    out = ["| method, tower | " + " | ".join(f"{k} shots" for k in shots) + " |"]
    out.append("|---|" + "---|" * len(shots))
    for name, by_shots in sorted(curves.items(), key=lambda c: min(c[1]) > 0):  # zero-shot first
        out.append(f"| {name} | " + " | ".join(fmt(by_shots.get(k)) for k in shots) + " |")
    n_classes = len(TASK_COLOURS) * len(SHAPES)
    out.append(
        f"\nToy world `{root}`, `{FEWSHOT['dataset']}`: {n_classes} classes, trained on k images "
        f"per class, tested on all {n_classes * SPLITS['test']} test images ({n_classes}-way). "
        f"Seeds {list(seeds)}, mean ± population std; zero-shot CLIP: no training, no seed. "
        f"{seconds:.0f}s for the runs on {os.cpu_count()} cores: python toyworld.py --fewshot"
    )
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Draw the toy world's datasets next to the shipped towers (and run the demo).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--root", default="toy", help="folder of the world (the towers' copies and the datasets)")
    add("--seed", type=int, default=0, help="the world's seed: same seed, same world")
    add("--force", action="store_true", help="draw everything again even if it exists")
    add(
        "--towers", default=ASSETS, help="folder of the pretrained towers (clip_rn.pt, clip_vit.pt)"
    )
    add(
        "--pretrain",
        action="store_true",
        help="pretrain the towers again into --towers (about 45 minutes on one core), then go on",
    )
    for tower, r in RECIPES.items():
        add(f"--{tower}-steps", type=int, default=r["steps"], help=f"--pretrain: {tower} steps")
        add(f"--{tower}-lr", type=float, default=r["lr"], help=f"--pretrain: {tower} AdamW lr")
    add("--demo", action="store_true", help="then run every method file on it and write the table")
    add(
        "--full",
        action="store_true",
        help="with --demo: the full table (seeds 1, 2, 3, every test image), not the fast one, "
        "then the few-shot curves (--fewshot)",
    )
    add(
        "--fewshot",
        action="store_true",
        help="then run the few-shot protocol on sketch (1-16 shots; part of --demo --full) and "
        "write fewshot.png and fewshot.md in --demo-out (default: runs/demo)",
    )
    add("--fewshot-seeds", type=int, nargs="+", default=FEWSHOT["seeds"], help="its seeds")
    add("--demo-out", help="folder of the demo runs and its table (runs/demo or runs/demo-full)")
    add("--workers", type=int, default=2, help="processes (threads: --pretrain) to draw and run")
    return p.parse_args(argv)  # fmt: skip


def main(args):
    t0 = time.time()
    if args.pretrain:
        recipes = {t: dict(r, steps=vars(args)[f"{t}_steps"], lr=vars(args)[f"{t}_lr"])
                   for t, r in RECIPES.items()}  # fmt: skip
        pretrain_towers(args.towers, args.seed, recipes, threads=args.workers)
        print(f"the towers are in {args.towers}/ ({time.time() - t0:.0f}s)")
    build_world(args.root, args.seed, args.force or args.pretrain, args.towers)
    print(f"the toy world is in {args.root}/ ({time.time() - t0:.0f}s)")
    if args.demo:
        demo(args.root, args.demo_out, full=args.full, parallel=args.workers)
    if args.fewshot or (args.demo and args.full):  # the few-shot curves: too long for the fast demo
        out = args.demo_out or "runs/demo"
        fewshot(args.root, out, seeds=args.fewshot_seeds, parallel=args.workers)
    if args.demo or args.fewshot:
        print(f"demo finished in {time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    main(parse_args())
