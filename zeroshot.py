"""Zero-shot CLIP: classify images by comparing them with texts made from class names.

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
arXiv 2103.00020. Templates and ensembling as in the CoOp code base (arXiv 2109.01134).

The idea. CLIP maps images and texts into one space. To classify without any training example,
write one text per class from a template ("a photo of a {}."), encode the texts, and predict the
class whose text feature is most similar to the image feature. Prompt ensembling averages the
text features of several templates per class, which is usually a few points better.

Equations (f(x) the L2-normalised image feature, g(t) the normalised text feature, tau the
temperature: CLIP's frozen logit_scale = ln(1/tau), so 1/tau is about 100)
  [CLIP]      logits_c = f(x) . w_c / tau,   w_c = g(template(c))          (one template)
  [Ensemble]  w_c = normalise( mean_k g(template_k(c)) )                   (K templates)

Learned: nothing. Frozen: all of CLIP. Every other method file reports this baseline next to itself.

Run
  python zeroshot.py --backbone toy/clip_rn.pt --data toy/shapes
  python zeroshot.py --backbone RN50 --data DATA/oxford_pets/images --template OxfordPets \
      --split-file DATA/oxford_pets/split_zhou_OxfordPets.json
  python zeroshot.py --backbone RN50 --data DATA/imagenet --ensemble select    # 7 templates
"""

import argparse
import json
import math
import os
import platform
import random
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

with warnings.catch_warnings():  # openai-clip 1.0.1 imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip


# --- shared: text encoder (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
class TextEncoder(nn.Module):
    """CLIP's text transformer on prompt embeddings, in two exact shortcuts of its 77 positions.

    The transformer is causal: position i attends to positions <= i only. So (1) the end-of-text
    (EOT) feature depends only on the positions up to it: prompts cut after the longest EOT give
    the 77-position result exactly (`forward`); (2) positions before the class name never see it:
    with a prefix common to every class ([SOS], a generic context), its hidden states are every
    class's. `shared_prefix` computes them once (per image for CoCoOp) and runs only each class's
    own tokens (name, ".", EOT), which attend to the prefix's keys and values and to their own."""

    def __init__(self, clip_model):
        super().__init__()
        self.transformer, self.ln_final = clip_model.transformer, clip_model.ln_final
        self.positional_embedding = clip_model.positional_embedding
        self.text_projection, self.dtype = clip_model.text_projection, clip_model.dtype

    def forward(self, prompts, tokenized):
        # prompts: (N, L, d) token embeddings; tokenized: (N, L) ids, used to find EOT (largest id)
        eot = tokenized.argmax(dim=-1)  # (N,)
        n = int(eot.max()) + 1
        x = prompts[:, :n].type(self.dtype) + self.positional_embedding[:n].type(self.dtype)
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = x.permute(1, 0, 2)  # NLD -> LND: (n, N, d)
        for block in self.transformer.resblocks:  # = block(x) with the causal mask cut to n
            h = block.ln_1(x)
            x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            x = x + block.mlp(block.ln_2(x))
        x = x.permute(1, 0, 2)[torch.arange(x.shape[1]), eot]  # LND -> NLD, the EOT rows: (N, d)
        return self.ln_final(x).type(self.dtype) @ self.text_projection  # (N, D)

    def shared_prefix(self, prefix, suffix, tokenized, deep=()):
        """Exactly forward(cat([prefix[b], suffix[c]]), tokenized[c]) for every pair (b, c).

        prefix: (B, P, d), the first P positions, the same for every class (B = 1, or one per
        image); suffix: (C, L - P, d), the rest of each class's prompt; tokenized: (C, L) ids;
        deep: tensors (n, d) that replace prefix positions 1..n before blocks 1, 2, ... (MaPLe's
        deeper text prompts). Returns (B, C, D)."""
        (B, P, _), C = prefix.shape, suffix.shape[0]
        eot = tokenized.argmax(dim=-1) - P  # EOT's index within the suffix: (C,)
        S = int(eot.max()) + 1
        pos = self.positional_embedding.type(self.dtype)
        xp = prefix.type(self.dtype) + pos[:P]  # (B, P, d)
        xs = (suffix[:, :S].type(self.dtype) + pos[P : P + S]).repeat(B, 1, 1)  # pairs: (B*C, S, d)
        ahead = torch.ones(S, S, dtype=torch.bool, device=xp.device).triu_(1)  # (S, S)
        rows = lambda t: t.unflatten(0, (B, C)).transpose(1, 2).flatten(2, 3)  # (B, h, C*S, .)
        pairs = lambda t: t.unflatten(2, (C, S)).transpose(1, 2).flatten(0, 1)  # (B*C, h, S, .)
        for i, block in enumerate(self.transformer.resblocks):
            if 0 < i <= len(deep):  # MaPLe: the previous block's outputs there are replaced
                n = deep[i - 1].shape[0]
                new = deep[i - 1].type(xp.dtype).expand(B, -1, -1)  # (B, n, d)
                xp = torch.cat([xp[:, :1], new, xp[:, 1 + n :]], dim=1)  # (B, P, d)
            heads = block.attn.num_heads
            split = lambda t: t.unflatten(-1, (heads, -1)).transpose(-3, -2)  # (.., heads, L, d_h)
            qkv_p = F.linear(block.ln_1(xp), block.attn.in_proj_weight, block.attn.in_proj_bias)
            qkv_s = F.linear(block.ln_1(xs), block.attn.in_proj_weight, block.attn.in_proj_bias)
            qp, kp, vp = map(split, qkv_p.chunk(3, dim=-1))  # (B, heads, P, d_h) each
            qs, ks, vs = map(split, qkv_s.chunk(3, dim=-1))  # (B*C, heads, S, d_h) each
            # The prefix attends causally to itself only: it never sees a class name.
            ap = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # (B, heads, P, d_h)
            # Each class's tokens see the prefix and, causally, themselves: softmax([q K_p^T,
            # q K_s^T + mask] / sqrt(d_h)) [V_p ; V_s]; K_p, V_p never copied (classes as rows)
            q = qs / qs.shape[-1] ** 0.5  # scaled first: q k^T stays within fp16's range
            to_prefix = pairs(rows(q) @ kp.transpose(-2, -1))  # (B*C, heads, S, P)
            to_own = (q @ ks.transpose(-2, -1)).masked_fill(ahead, float("-inf"))  # (.., S, S)
            w = torch.cat([to_prefix, to_own], dim=-1).softmax(dim=-1)  # (B*C, heads, S, P + S)
            a_s = pairs(rows(w[..., :P]) @ vp) + w[..., P:] @ vs  # (B*C, heads, S, d_h)
            merge = lambda t: block.attn.out_proj(t.transpose(-3, -2).flatten(-2))  # (.., L, d)
            xp, xs = xp + merge(ap), xs + merge(a_s)
            xp, xs = xp + block.mlp(block.ln_2(xp)), xs + block.mlp(block.ln_2(xs))
        x = xs[torch.arange(B * C), eot.repeat(B)]  # the EOT rows: (B*C, d)
        return (self.ln_final(x).type(self.dtype) @ self.text_projection).view(B, C, -1)


# --- end shared: text encoder ---


# [CoOp trainers/zsclip.py] the single hand-crafted template of each dataset
CUSTOM_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
}

# [CoOp trainers/imagenet_templates.py] the 7 templates selected for ImageNet
TEMPLATES_SELECT = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

# OpenAI's 80 ImageNet templates (CLIP's prompt-engineering notebook)
80
TEMPLATES_80 = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]


# ------------------------------------------------------------------------------------------------
# The method: templates -> one weight vector per class
# ------------------------------------------------------------------------------------------------
def resolve_template(template):
    """A dataset name gives that dataset's hand-crafted template; otherwise it must contain {}."""
    template = CUSTOM_TEMPLATES.get(template, template)
    if "{}" not in template:
        names = ", ".join(CUSTOM_TEMPLATES)
        fail(f"--template {template!r} has no {{}} for the class name and is not one of {names}")
    return template


def ensemble_templates(ensemble, template, add_template):
    """The templates whose features are averaged: one, the 7 selected, or all 80 (+ --template)."""
    templates = {"none": [template], "select": list(TEMPLATES_SELECT), "all": list(TEMPLATES_80)}[
        ensemble
    ]
    if add_template and template not in templates:
        templates.append(template)
    return templates


# ------------------------------------------------------------------------------------------------
# main: data, CLIP, classifier, evaluation, results
# ------------------------------------------------------------------------------------------------
def main(args):
    device = torch.device(args.device)
    precision = args.precision or ("amp" if device.type == "cuda" else "fp32")
    template = resolve_template(args.template)
    templates = ensemble_templates(args.ensemble, template, args.add_template)
    dataset, _, test_sets = load_task(args)
    run_dir = args.out or os.path.join("runs", "zeroshot", dataset, args.ensemble)
    seed_everything(args.seed)

    # Frozen CLIP; one classifier per test set (its class names), images encoded once
    clip_model = load_clip(args.backbone, device, precision)
    inv_tau, n_px = clip_model.logit_scale.exp(), clip_model.visual.input_resolution
    os.makedirs(run_dir, exist_ok=True)
    save(os.path.join(run_dir, "args.json"), vars(args))
    print(
        f"zero-shot CLIP: {len(templates)} template(s), e.g. {templates[0]!r}; nothing is learned"
    )
    single, ensembled = {}, {}
    for name, (items, classnames) in test_sets.items():
        loader = make_loader(items, test_transform(n_px), args.batch_size, args.workers)
        features, labels = encode_images(clip_model.encode_image, loader, device, precision)
        weights = zeroshot_classifier(clip_model, classnames, [template])  # (n_cls, D)
        single[name] = accuracy(inv_tau * features @ weights.t(), labels)  # [CLIP]
        weights = zeroshot_classifier(clip_model, classnames, templates)  # [Ensemble] (n_cls, D)
        ensembled[name] = accuracy(inv_tau * features @ weights.t(), labels)
        print(f"{name}: {len(items)} images, {len(classnames)} classes: {ensembled[name]:.2f}%")
    method = "zeroshot" if args.ensemble == "none" else f"zeroshot-ensemble-{args.ensemble}"
    extra = dict(epochs=0, precision=precision, templates=templates)
    return finish_run(run_dir, args, method, dataset, single, ensembled, **extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Zero-shot CLIP: one template or an ensemble",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--backbone", default="RN50", help="CLIP name (RN50, ViT-B/16, ...) or checkpoint path")
    add("--data", required=True, help="root with [train/] test/, or --split-file's images")
    add("--split-file", help="CoOp's split_zhou_<Name>.json (then --data is its image root)")
    add("--classnames", help="classnames.txt: 'folder<TAB>readable name' per line")
    base_new = "base-to-new: 'base' reports the base classes and 'new' the other half"
    add("--subsample", choices=["all", "base", "new"], default="all", help=base_new)
    add("--eval-data", nargs="*", default=[], help="extra test sets (ImageFolder roots)")
    add(
        "--template",
        default="a photo of a {}.",
        help="a template with {} for the class name, "
        f"or a dataset name: {', '.join(CUSTOM_TEMPLATES)}",
    )
    add(
        "--ensemble",
        choices=["none", "select", "all"],
        default="none",
        help="average the text features of the 7 selected ImageNet templates, or of all 80",
    )
    add(
        "--add-template",
        action="store_true",
        help="also put --template in the ensemble (CoOp's "
        "ZeroshotCLIP2 does so for every dataset but ImageNet)",
    )
    add("--batch-size", type=int, default=100, help="test batch size (does not change results)")
    add_run_args(add, learned=False)
    return p.parse_args(argv)


# --- shared: appendix (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
# ================================================================================================
# Appendix: the shared blocks, the same in every method file that has them (tools/sync_shared.py
# keeps them so)
#   data        dataset readers (ImageFolder, CoOp split files), few-shot sampling, base/new split,
#               load_task (every check on bad input), transforms, loader
#   clip        load_clip (names, TorchScript archives, state dicts), autocast, tokenize
#   evaluation  encode_images, accuracy, text_features, zeroshot_classifier
#   run folder  atomic save, load_checkpoint, seeds, peak memory, run_info, the shared options,
#               the log, metrics.json and the summary line
#   checkpoint  learned_state, load_learned (the files that learn parameters)
#   resume      save_progress, resume (coop, prograd, vpt: --resume after the last finished epoch)
# ================================================================================================
# --- end shared: appendix ---


# --- shared: data (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def fail(message):
    """Stop the command line before any long work, saying what is wrong and what to do."""
    raise SystemExit(f"error: {message}")


def read_classnames(path):
    """classnames.txt: one 'folder<TAB or space>readable name' per line -> {folder: name}."""
    if not os.path.isfile(path):
        fail(f"{path}: class-name file not found")
    names = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            folder, _, name = line.strip().replace("\t", " ").partition(" ")
            if folder and not name.strip():
                fail(f"{path}:{number}: expected 'folder<TAB>readable name', got {line.strip()!r}")
            if folder:
                names[folder] = name.strip()
    return names


def read_image_folder(root, classnames=None):
    """ImageFolder layout root/<class folder>/<image> -> ([(path, label)], [class name])."""
    layout = "expected <root>/<class folder>/<image files>"
    if not os.path.isdir(root):
        fail(f"{root}: folder not found; {layout}")
    folders = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    folders, items = [d for d in folders if not d.startswith(".")], []
    if not folders:
        fail(f"{root}: no class folders in it; {layout}")
    for label, folder in enumerate(folders):
        files = sorted(os.listdir(os.path.join(root, folder)))
        files = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            fail(f"{os.path.join(root, folder)}: class folder has no images; add some or remove it")
        items += [(os.path.join(root, folder, f), label) for f in files]
    missing = [d for d in folders if classnames is not None and d not in classnames]
    if missing:
        fail(f"--classnames has no line for the folders {missing[:5]} of {root}")
    return items, [classnames[d] if classnames else d.replace("_", " ") for d in folders]


def read_split_file(split_file, image_root):
    """CoOp's split_zhou_<Name>.json: {"train"|"val"|"test": [[path, label, class name], ...]}."""
    if not os.path.isfile(split_file):
        fail(f"{split_file}: split file not found")
    try:
        with open(split_file, encoding="utf-8") as f:
            split, splits = json.load(f), ("train", "val", "test")
        data = {s: [(os.path.join(image_root, p), int(y)) for p, y, _ in split[s]] for s in splits}
        names = {int(y): c for _, y, c in split["train"]}
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{split_file}: not a CoOp split file ({e!r}); expected train/val/test lists")
    if sorted(names) != list(range(len(names))):
        fail(f"{split_file}: the training labels are not 0..n-1; every class needs training images")
    data["classnames"] = [names[y].replace("_", " ") for y in range(len(names))]
    if data["train"] and not os.path.isfile(data["train"][0][0]):
        fail(f"{data['train'][0][0]}: image not found; is --data the image root of {split_file}?")
    return data


def load_dataset(root, split_file=None, classnames_file=None):
    """-> {"train", "val", "test": [(path, label)], "classnames": [name]}; missing splits: []."""
    if split_file:
        return read_split_file(split_file, root)
    if classnames_file is None and os.path.isfile(os.path.join(root, "classnames.txt")):
        classnames_file = os.path.join(root, "classnames.txt")
    names = read_classnames(classnames_file) if classnames_file else None
    if not os.path.isdir(os.path.join(root, "test")):
        what = "no test/ folder" if os.path.isdir(root) else "folder not found"
        fail(f"{root}: {what}; expected {root}/train/<class>/<image> and {root}/test/...")
    data = {"train": [], "val": []}
    data["test"], data["classnames"] = read_image_folder(os.path.join(root, "test"), names)
    for split in [s for s in ("train", "val") if os.path.isdir(os.path.join(root, s))]:
        data[split], split_names = read_image_folder(os.path.join(root, split), names)
        if split_names != data["classnames"]:
            fail(f"{root}/{split} and {root}/test have different class folders")
    return data


def load_eval_set(root):
    """An --eval-data set <root>/[test/]<class>/<image> -> (name, items, class names)."""
    root = os.path.normpath(root)
    if os.path.basename(root) == "test":  # name a test/ folder after its dataset
        root = os.path.dirname(root)
    names_file = os.path.join(root, "classnames.txt")
    names = read_classnames(names_file) if os.path.isfile(names_file) else None
    folder = os.path.join(root, "test") if os.path.isdir(os.path.join(root, "test")) else root
    return (os.path.basename(root), *read_image_folder(folder, names))


def sample_few_shot(items, shots, seed):
    """Dassl's rule: per class, `shots` items without replacement; a smaller class keeps all."""
    rng, by_class, sampled = random.Random(seed), {}, []
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    for group in by_class.values():
        sampled += rng.sample(group, min(shots, len(group)))
    short = [f"{os.path.dirname(g[0][0])} ({len(g)})" for g in by_class.values() if len(g) < shots]
    if short:
        print(
            f"warning: fewer than {shots} training images in {len(short)} classes, all of them "
            f"are used: {', '.join(short[:5])}"
        )
    return sampled


def subsample_classes(data, which):
    """Base-to-new split: sorted labels, the first ceil(n/2) are base, the rest new; relabelled."""
    if which == "all":
        return data
    labels = sorted({y for _, y in data["train"] or data["test"]})
    m = math.ceil(len(labels) / 2)
    relabel = {y: i for i, y in enumerate(labels[:m] if which == "base" else labels[m:])}
    out = {
        s: [(p, relabel[y]) for p, y in data[s] if y in relabel] for s in ("train", "val", "test")
    }
    return dict(out, classnames=[data["classnames"][y] for y in relabel])


def check_images(items, full=True):
    """Open every image once now, so an unreadable file stops the run before any long work."""
    not_rgb = 0
    for path, _ in items:
        try:
            with Image.open(path) as image:
                not_rgb += image.mode != "RGB"
                if full:  # decode the pixels too (done for the small few-shot training set)
                    image.load()
        except (OSError, ValueError) as e:
            fail(f"{path}: cannot read this image ({e}); replace or delete the file")
    if not_rgb:
        print(f"note: {not_rgb} images are grayscale, RGBA or palette images; they become RGB")


def load_task(args, shots=None):
    """The run's data, checked before anything slow -> (dataset name, {"train", "val", "test",
    "classnames"} of the trained classes, {test set name: (items, class names)}). Few-shot
    sampling (train, seeded) happens before the base/new split, as in the papers."""
    data = load_dataset(args.data, args.split_file, args.classnames)
    if shots:
        data["train"] = sample_few_shot(data["train"], shots, args.seed)
    part = subsample_classes(data, args.subsample)
    test_sets = {"test": (part["test"], part["classnames"])}
    if args.subsample == "base":  # the same learned parameters, tested on the other half
        new = subsample_classes(data, "new")
        test_sets["new"] = (new["test"], new["classnames"])
    for root in args.eval_data:
        name, items, classnames = load_eval_set(root)
        test_sets[name if name not in test_sets else root] = (items, classnames)
    check_images(part["train"])
    for items, _ in test_sets.values():
        check_images(items, full=False)
    name = os.path.basename(os.path.normpath(args.data))
    if args.split_file:
        name = os.path.basename(args.split_file)[: -len(".json")].replace("split_zhou_", "")
    return name, part, test_sets


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) items -> (transformed image, label). With cache_bytes, decoded images stay in
    memory up to that many bytes; the (random) transform still runs on every read."""

    def __init__(self, items, transform, cache_bytes=0):
        self.items, self.transform, self.cache, self.room = items, transform, {}, cache_bytes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        image = self.cache.get(i)
        if image is None:
            try:
                image = Image.open(path).convert("RGB")  # grayscale, RGBA, palette -> RGB
            except (OSError, ValueError) as e:
                raise OSError(f"{path}: cannot read this image ({e}); replace or delete it") from e
            if image.width * image.height * 3 <= self.room:
                self.cache[i], self.room = image, self.room - image.width * image.height * 3
        return self.transform(image), label


def train_transform(n_px, min_scale=0.08):
    """CoOp/Dassl: random resized crop (area min_scale-1, 0.08 in the papers; bicubic),
    horizontal flip, CLIP normalisation."""
    import torchvision.transforms as T  # torchvision comes with the clip package

    crop = T.RandomResizedCrop(n_px, (min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose(
        [crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    )


def test_transform(n_px):
    """CLIP's own preprocess: shorter side to n_px (bicubic), centre crop, CLIP normalisation."""
    import torchvision.transforms as T

    resize = T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([resize, T.CenterCrop(n_px), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def make_loader(
    items, transform, batch_size, workers, shuffle=False, drop_last=False, generator=None
):
    # A training set (shuffle) is read every epoch: without worker processes (which would each hold
    # a copy), its decoded images stay in memory, up to 1 GiB. Same batches, less decoding.
    dataset = ImageDataset(items, transform, 2**30 if shuffle and workers == 0 else 0)
    options = dict(num_workers=workers, drop_last=drop_last, generator=generator)
    return torch.utils.data.DataLoader(
        dataset, batch_size, shuffle, pin_memory=torch.cuda.is_available(), **options
    )


# --- end shared: data ---


# --- shared: clip (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
def load_clip(backbone, device, precision):
    """CLIP by name or checkpoint path, frozen, in eval mode; fp32 weights unless precision fp16.

    openai-clip 1.0.1 reads a plain state-dict file wrongly (after its TorchScript attempt it does
    not rewind the file), so such files are read here with torch.load and clip's build_model.
    """
    if backbone not in clip.available_models() and not os.path.isfile(backbone):
        names = ", ".join(clip.available_models())
        fail(f"unknown backbone {backbone!r}: use one of {names}, or a CLIP checkpoint's path")
    try:
        with warnings.catch_warnings():  # torch deprecates torch.jit.load, tried by clip.load
            warnings.simplefilter("ignore")
            model = clip.load(backbone, device="cpu", jit=False)[0].float()
    except Exception as e:
        if not os.path.isfile(backbone):
            fail(
                f"could not load {backbone} ({e}); without internet, put OpenAI's file in "
                "~/.cache/clip or pass its path with --backbone"
            )
        try:
            state_dict = torch.load(backbone, map_location="cpu", weights_only=True)
            model = clip.model.build_model(dict(state_dict)).float()
        except Exception as e2:
            fail(f"{backbone}: not a CLIP checkpoint (TorchScript archive or state dict): {e2}")
        model.load_state_dict(state_dict)  # build_model rounds to fp16: undo that
    if precision == "fp16":  # CLIP's own fp16 layout (LayerNorm and embeddings stay fp32)
        clip.model.convert_weights(model)
    return model.requires_grad_(False).eval().to(device)


def autocast(device, precision):
    """Mixed precision for --precision amp (fp16 on CUDA, bf16 on the CPU); a no-op otherwise."""
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, half) if precision == "amp" else nullcontext()


def tokenize(clip_model, texts):
    return clip.tokenize(texts, context_length=clip_model.context_length)


# --- end shared: clip ---


# --- shared: evaluation (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
@torch.no_grad()
def encode_images(encode, loader, device, precision):
    """L2-normalised image features (N, D) in fp32 and labels (N,) of a whole test set."""
    features, labels = [], []
    for images, y in loader:
        with autocast(device, precision):
            features.append(F.normalize(encode(images.to(device)).float(), dim=-1))
        labels.append(y.to(device))
    return torch.cat(features), torch.cat(labels)


def accuracy(logits, labels):
    """Top-1 accuracy in percent over the whole set (micro average, as in the papers)."""
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def text_features(clip_model, texts, batch_size=1000):
    """L2-normalised CLIP text features of plain texts, (N, D) in fp32."""
    encoder, device, out = TextEncoder(clip_model), clip_model.positional_embedding.device, []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(clip_model, texts[i : i + batch_size]).to(device)
        out.append(F.normalize(encoder(clip_model.token_embedding(tokens), tokens).float(), dim=-1))
    return torch.cat(out)


def zeroshot_classifier(clip_model, classnames, templates):
    """[CLIP] one weight per class: the normalised mean of its normalised template features."""
    per_template = [text_features(clip_model, [t.format(c) for c in classnames]) for t in templates]
    return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)  # (n_cls, D)


# --- end shared: evaluation ---


# --- shared: run folder (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
def save(path, obj):
    """Write atomically (a temporary file in the same folder, then a rename), so that a crash never
    leaves half a file: text for a str, JSON for a .json path, torch.save otherwise."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        if isinstance(obj, str) or path.endswith(".json"):
            with open(tmp, "w") as f:
                f.write(obj) if isinstance(obj, str) else json.dump(obj, f, indent=2)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path}: not a checkpoint written by this project ({e})")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_mib(device, reset=False):
    """CUDA's peak memory since the last reset, in MiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def run_info(device):
    """Where and with what a run ran, for metrics.json."""
    from importlib import metadata

    try:
        clip_version = "openai-clip " + metadata.version("openai-clip")
    except metadata.PackageNotFoundError:  # clip installed from a git checkout
        clip_version = "clip (not from PyPI)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    versions = dict(python=platform.python_version(), torch=torch.__version__, clip=clip_version)
    return {"device": f"{name} ({os.cpu_count()} cores)", "versions": versions}


def add_run_args(add, learned=True):
    """The options every method file shares: seed, precision, device, run folder, checkpoints."""
    add("--seed", type=int, default=1, help="the papers report seeds 1, 2, 3")
    add("--precision", choices=["fp32", "amp", "fp16"], help="default: amp on CUDA, else fp32")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--workers", type=int, default=4, help="data-loading processes")
    add("--out", help="run folder (default runs/<method>/<dataset>/...)")
    if learned:
        add("--load", help="checkpoint.pt of learned parameters to start from")
        add("--eval-only", action="store_true", help="evaluate --load without training")
        add("--resume", action="store_true", help="continue the run in --out after its last epoch")


def log_epoch(run_dir, device, epoch, epochs, seconds, n_images, **values):
    """One line of log.jsonl per epoch, and on the screen: the mean of each per-step value, the
    speed (images per second) and, on CUDA, the peak memory of the epoch."""
    record = {"epoch": epoch, **{k: float(np.mean(v)) for k, v in values.items()}}
    record.update(seconds=round(seconds, 3), images_per_s=round(n_images / seconds, 1))
    record["peak_mib"] = peak_mib(device)
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    shown = "  ".join(f"{k} {record[k]:.4g}" for k in values)
    print(f"epoch {epoch}/{epochs}  {shown}  {seconds:.1f}s  {record['images_per_s']} img/s")


def finish_run(run_dir, args, method, dataset, zero_shot, accuracy, **extra):
    """Write metrics.json (the zero-shot baseline and the method's accuracy on every test set,
    base/new/H, how and where it ran) and print its one-line summary, the run's last line."""
    device, hm = torch.device(args.device), ""
    metrics = dict(method=method, backbone=args.backbone, dataset=dataset, seed=args.seed)
    metrics.update(shots=getattr(args, "shots", 0), zero_shot=zero_shot, accuracy=accuracy)
    if "new" in accuracy:  # [CoCoOp] H = 2 * base * new / (base + new)
        base, new = accuracy["test"], accuracy["new"]
        metrics["harmonic_mean"] = 2 * base * new / (base + new)
        hm = f" H={metrics['harmonic_mean']:.2f}"
    metrics.update(extra, peak_mib=peak_mib(device), **run_info(device))
    save(os.path.join(run_dir, "metrics.json"), metrics)
    acc, zs = [" ".join(f"{k}={v:.2f}" for k, v in d.items()) for d in (accuracy, zero_shot)]
    speed = f" | {extra['images_per_s']:.1f} img/s" if extra.get("images_per_s") else ""
    peak = f", peak {metrics['peak_mib']:.0f} MiB" if metrics["peak_mib"] else ""
    print(
        f"{method} {dataset} shots={metrics['shots']} seed={args.seed}: accuracy {acc}{hm} | "
        f"zero-shot {zs}{speed}{peak} | {run_dir}/metrics.json"
    )
    return metrics


# --- end shared: run folder ---


if __name__ == "__main__":
    main(parse_args())
