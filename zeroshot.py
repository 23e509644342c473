"""Zero-shot CLIP: classify images by comparing them with texts made from class names.

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
arXiv 2103.00020. Templates and ensembling as in the CoOp code base (arXiv 2109.01134).

The idea. CLIP maps images and texts into one space. To classify without any training example,
write one text per class from a template ("a photo of a {}."), encode the texts, and predict the
class whose text feature is most similar to the image feature. Prompt ensembling averages the
text features of several templates per class, which is usually a few points better.

Equations (f(x) the L2-normalised image feature, g(t) the normalised text feature, tau = CLIP's
logit scale, about 100)
  [CLIP]      logits_c = tau * f(x) . w_c,   w_c = g(template(c))          (one template)
  [Ensemble]  w_c = normalise( mean_k g(template_k(c)) )                   (K templates)

Learned: nothing. Frozen: all of CLIP. Every other method file reports this baseline next to itself.

Run
  quick CPU run on the toy world:  python zeroshot.py --backbone toy/clip_rn.pt --data toy/shapes
  paper setting (RN50, Oxford Pets): python zeroshot.py --backbone RN50 --data DATA/oxford_pets/images \
        --split-file DATA/oxford_pets/split_zhou_OxfordPets.json --template OxfordPets
  7-template ensemble on ImageNet:  python zeroshot.py --backbone RN50 --data DATA/imagenet --ensemble select
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
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]



def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Zero-shot CLIP with one hand-crafted template or an ensemble of templates.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="RN50", help="CLIP name (RN50, ViT-B/16, ...) or checkpoint path")
    p.add_argument("--data", required=True,
                   help="ImageFolder root with [train/] test/, or the image root of --split-file")
    p.add_argument("--split-file", default=None, help="CoOp split_zhou_<Name>.json (then --data is its image root)")
    p.add_argument("--classnames", default=None, help="classnames.txt: 'folder<TAB>readable name' per line")
    p.add_argument("--subsample", choices=["all", "base", "new"], default="all",
                   help="base-to-new protocol: 'base' reports the base classes and 'new' the other half")
    p.add_argument("--eval-data", nargs="*", default=[], help="extra test sets (ImageFolder roots)")
    p.add_argument("--template", default="a photo of a {}.",
                   help=f"a template with {{}} for the class name, or a dataset name: {', '.join(CUSTOM_TEMPLATES)}")
    p.add_argument("--ensemble", choices=["none", "select", "all"], default="none",
                   help="average the text features of the 7 selected ImageNet templates, or of all 80")
    p.add_argument("--add-template", action="store_true",
                   help="also put --template in the ensemble (CoOp's ZeroshotCLIP2 does so for every dataset but "
                        "ImageNet)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "amp", "fp16"], default=None,
                   help="default: amp on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=100, help="test batch size (does not change results)")
    p.add_argument("--out", default=None, help="run folder (default runs/zeroshot/<dataset>/<ensemble>)")
    return p.parse_args(argv)


# --- shared: data (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def fail(message):
    """Stop before any long work with a message that says what is wrong and what to do."""
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
    if not os.path.isdir(root):
        fail(f"{root}: folder not found; expected <root>/<class folder>/<image files>")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d[0] != ".")
    if not folders:
        fail(f"{root}: no class folders in it; expected <root>/<class folder>/<image files>")
    items = []
    for label, folder in enumerate(folders):
        files = sorted(f for f in os.listdir(os.path.join(root, folder)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            fail(f"{os.path.join(root, folder)}: class folder has no images ({' '.join(IMAGE_EXTENSIONS)}); "
                 "add images or remove the folder")
        items += [(os.path.join(root, folder, f), label) for f in files]
    missing = [d for d in folders if classnames is not None and d not in classnames]
    if missing:
        fail(f"--classnames has no line for the folders {missing[:5]} of {root}; add 'folder<TAB>name' lines")
    names = [classnames[d] if classnames else d.replace("_", " ") for d in folders]
    return items, names


def read_split_file(split_file, image_root):
    """CoOp's split_zhou_<Name>.json: {"train"|"val"|"test": [[relative path, label, class name], ...]}."""
    if not os.path.isfile(split_file):
        fail(f"{split_file}: split file not found")
    try:
        with open(split_file, encoding="utf-8") as f:
            split = json.load(f)
        data = {s: [(os.path.join(image_root, p), int(y)) for p, y, _ in split[s]] for s in ("train", "val", "test")}
        names = {int(y): c for _, y, c in split["train"]}
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{split_file}: not a CoOp split file ({e!r}); expected train/val/test lists of [path, label, name]")
    if sorted(names) != list(range(len(names))):
        fail(f"{split_file}: the training labels are not 0..n-1; every class needs training images")
    data["classnames"] = [names[y].replace("_", " ") for y in range(len(names))]
    if data["train"] and not os.path.isfile(data["train"][0][0]):
        fail(f"{data['train'][0][0]}: image not found; is --data the image root that {split_file} is relative to?")
    return data


def load_dataset(root, split_file=None, classnames_file=None):
    """-> {"train", "val", "test": [(path, label)], "classnames": [name]}; a missing train/ or val/ is empty."""
    if split_file:
        return read_split_file(split_file, root)
    if classnames_file is None and os.path.isfile(os.path.join(root, "classnames.txt")):
        classnames_file = os.path.join(root, "classnames.txt")
    names = read_classnames(classnames_file) if classnames_file else None
    if not os.path.isdir(root):
        fail(f"{root}: folder not found; expected {root}/train/<class>/<image> and {root}/test/<class>/<image>")
    if not os.path.isdir(os.path.join(root, "test")):
        fail(f"{root}: no test/ folder; expected {root}/train/<class>/<image> and {root}/test/<class>/<image>")
    data = {"val": []}
    data["test"], data["classnames"] = read_image_folder(os.path.join(root, "test"), names)
    for split in ("train", "val"):
        if os.path.isdir(os.path.join(root, split)):
            data[split], split_names = read_image_folder(os.path.join(root, split), names)
            if split_names != data["classnames"]:
                fail(f"{root}/{split} and {root}/test have different class folders; they must be the same")
    data.setdefault("train", [])
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
    """Dassl's rule: per class, `shots` items drawn without replacement; a smaller class keeps all."""
    rng = random.Random(seed)
    by_class = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    sampled, short = [], []
    for group in by_class.values():
        if len(group) < shots:
            short.append(f"{os.path.dirname(group[0][0])} ({len(group)})")
        sampled += rng.sample(group, min(shots, len(group)))
    if short:
        print(f"warning: fewer than {shots} training images in {len(short)} classes, all of them are used: "
              f"{', '.join(short[:5])}")
    return sampled


def subsample_classes(data, which):
    """Base-to-new split: sorted labels, first ceil(n/2) are base, the rest new; relabelled from 0."""
    if which == "all":
        return data
    labels = sorted({y for _, y in data["train"] or data["test"]})
    m = math.ceil(len(labels) / 2)
    relabel = {y: i for i, y in enumerate(labels[:m] if which == "base" else labels[m:])}
    out = {s: [(p, relabel[y]) for p, y in data[s] if y in relabel] for s in ("train", "val", "test")}
    out["classnames"] = [data["classnames"][y] for y in relabel]
    return out


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
        print(f"note: {not_rgb} images are grayscale, RGBA or palette images; they are converted to RGB")


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) items -> (transformed image, label). With cache_bytes, decoded images are kept in
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
                image = Image.open(path).convert("RGB")  # grayscale, RGBA (alpha dropped) and palette -> RGB
            except (OSError, ValueError) as e:
                raise OSError(f"{path}: cannot read this image ({e}); replace or delete the file") from e
            if image.width * image.height * 3 <= self.room:
                self.cache[i], self.room = image, self.room - image.width * image.height * 3
        return self.transform(image), label


def train_transform(n_px, min_scale=0.08):
    """CoOp/Dassl: random resized crop (area min_scale-1, 0.08 in the papers; bicubic), horizontal flip,
    CLIP normalisation."""
    import torchvision.transforms as T  # torchvision comes with the clip package

    return T.Compose([T.RandomResizedCrop(n_px, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def test_transform(n_px):
    """CLIP's own preprocess: shorter side to n_px (bicubic), centre crop, CLIP normalisation."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n_px),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def make_loader(items, transform, batch_size, workers, shuffle=False, drop_last=False, generator=None):
    # A training set (shuffle) is read every epoch: without worker processes (which would each hold and then
    # drop a copy), its decoded images stay in memory, up to 1 GiB. Same batches, less decoding.
    dataset = ImageDataset(items, transform, cache_bytes=2**30 if shuffle and workers == 0 else 0)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       drop_last=drop_last, generator=generator, persistent_workers=False,
                                       pin_memory=torch.cuda.is_available())
# --- end shared: data ---


# --- shared: clip (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
def load_clip(backbone, device, precision):
    """CLIP by name or checkpoint path, frozen and in eval mode; fp32 weights unless precision is fp16.

    openai-clip 1.0.1 reads a plain state-dict file wrongly (after its TorchScript attempt it does not
    rewind the file), so such files are read here with torch.load and built with clip's build_model.
    """
    if backbone not in clip.available_models() and not os.path.isfile(backbone):
        fail(f"unknown backbone {backbone!r}: use one of {', '.join(clip.available_models())}, "
             "or the path of a CLIP checkpoint file")
    try:
        with warnings.catch_warnings():  # torch deprecates torch.jit.load, which clip.load tries first
            warnings.simplefilter("ignore")
            model, _ = clip.load(backbone, device="cpu", jit=False)
    except Exception as e:
        if not os.path.isfile(backbone):
            fail(f"could not load {backbone} ({e}); without internet, put OpenAI's file in ~/.cache/clip "
                 "or pass its path with --backbone")
        try:
            state_dict = torch.load(backbone, map_location="cpu", weights_only=True)
            model = clip.model.build_model(dict(state_dict))
        except Exception as e2:
            fail(f"{backbone}: not a CLIP checkpoint (TorchScript archive or state dict): {e2}")
        model.float().load_state_dict(state_dict)  # build_model rounds to fp16: put the file's values back
    model = model.float()
    if precision == "fp16":
        clip.model.convert_weights(model)  # CLIP's own fp16 layout (LayerNorm and embeddings stay fp32)
    return model.requires_grad_(False).eval().to(device)


def autocast(device, precision):
    """Mixed precision for --precision amp (fp16 on CUDA, bf16 on the CPU); a no-op otherwise."""
    if precision != "amp":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
# --- end shared: clip ---


# --- shared: text encoder (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
class TextEncoder(nn.Module):
    """CLIP's text transformer on prompt embeddings, cut at the last end-of-text (EOT) position.

    The transformer is causal, so the EOT feature depends only on the positions up to it: running
    it on prompts cut after the longest EOT gives exactly the 77-position result, much faster.
    """

    def __init__(self, clip_model):
        super().__init__()
        self.transformer, self.ln_final = clip_model.transformer, clip_model.ln_final
        self.positional_embedding, self.text_projection = clip_model.positional_embedding, clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts, tokenized):
        # prompts: (N, L, d) token embeddings; tokenized: (N, L) ids, only used to find EOT (the largest id)
        eot = tokenized.argmax(dim=-1)  # (N,)
        n = int(eot.max()) + 1
        x = prompts[:, :n].type(self.dtype) + self.positional_embedding[:n].type(self.dtype)  # (N, n, d)
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)  # causal
        x = x.permute(1, 0, 2)  # NLD -> LND
        for block in self.transformer.resblocks:  # = block(x) with the mask cut to n positions
            h = block.ln_1(x)
            x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            x = x + block.mlp(block.ln_2(x))
        x = x.permute(1, 0, 2)[torch.arange(x.shape[1]), eot]  # LND -> NLD, then the EOT row: (N, d)
        return self.ln_final(x).type(self.dtype) @ self.text_projection  # (N, D)


def tokenize(clip_model, texts):
    return clip.tokenize(texts, context_length=clip_model.context_length)


@torch.no_grad()
def text_features(clip_model, texts, batch_size=1000):
    """L2-normalised CLIP text features of plain texts, (N, D) in fp32."""
    encoder, device, out = TextEncoder(clip_model), clip_model.positional_embedding.device, []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(clip_model, texts[i : i + batch_size]).to(device)
        out.append(F.normalize(encoder(clip_model.token_embedding(tokens), tokens).float(), dim=-1))
    return torch.cat(out)


def zeroshot_classifier(clip_model, classnames, templates):
    """[CLIP] one weight per class: the normalised mean of its normalised template features, (n_cls, D)."""
    per_template = [text_features(clip_model, [t.format(c) for c in classnames]) for t in templates]
    return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)
# --- end shared: text encoder ---


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


def harmonic_mean(base, new):
    return 2 * base * new / (base + new)
# --- end shared: evaluation ---


# --- shared: run folder (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
def _write_atomic(path, write):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    _write_atomic(path, write)


def save_checkpoint(path, obj):
    _write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path}: not a checkpoint written by this project ({e})")


def append_log(run_dir, record):
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def versions():
    from importlib.metadata import PackageNotFoundError, version

    try:
        clip_version = "openai-clip " + version("openai-clip")
    except PackageNotFoundError:  # clip installed from a git checkout
        clip_version = "clip (not from PyPI)"
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "clip": clip_version}


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finish_run(run_dir, metrics):
    """Write metrics.json and print its one-line summary (the last line of every run)."""
    save_json(os.path.join(run_dir, "metrics.json"), metrics)
    accs = " ".join(f"{k}={v:.2f}" for k, v in metrics["accuracy"].items())
    zs = " ".join(f"{k}={v:.2f}" for k, v in metrics["zero_shot"].items())
    hm = f" H={metrics['harmonic_mean']:.2f}" if "harmonic_mean" in metrics else ""
    print(f"{metrics['method']} {metrics['dataset']} shots={metrics['shots']} seed={metrics['seed']}: "
          f"accuracy {accs}{hm} | zero-shot {zs} | {os.path.join(run_dir, 'metrics.json')}")
# --- end shared: run folder ---


# ------------------------------------------------------------------------------------------------
# The method: templates -> one weight vector per class
# ------------------------------------------------------------------------------------------------
def resolve_template(template):
    """A dataset name gives that dataset's hand-crafted template; otherwise it must contain {}."""
    template = CUSTOM_TEMPLATES.get(template, template)
    if "{}" not in template:
        fail(f"--template {template!r} has no {{}} for the class name and is not one of {', '.join(CUSTOM_TEMPLATES)}")
    return template


def ensemble_templates(ensemble, template, add_template):
    """The templates whose features are averaged: one, the 7 selected, or all 80 (+ --template)."""
    templates = {"none": [template], "select": list(TEMPLATES_SELECT), "all": list(TEMPLATES_80)}[ensemble]
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
    dataset = os.path.basename(os.path.normpath(args.data))
    if args.split_file:
        dataset = os.path.splitext(os.path.basename(args.split_file))[0].replace("split_zhou_", "")
    run_dir = args.out or os.path.join("runs", "zeroshot", dataset, args.ensemble)
    seed_everything(args.seed)

    # 1. Data, checked before anything slow
    data = load_dataset(args.data, args.split_file, args.classnames)
    part = subsample_classes(data, args.subsample)
    test_sets = {"test": (part["test"], part["classnames"])}
    if args.subsample == "base":
        new = subsample_classes(data, "new")
        test_sets["new"] = (new["test"], new["classnames"])
    for root in args.eval_data:
        name, items, classnames = load_eval_set(root)
        test_sets[name if name not in test_sets else root] = (items, classnames)
    for items, _ in test_sets.values():
        check_images(items, full=False)

    # 2. Frozen CLIP; 3. one classifier per test set (its class names), images encoded once
    clip_model = load_clip(args.backbone, device, precision)
    scale = clip_model.logit_scale.exp()
    os.makedirs(run_dir, exist_ok=True)
    save_json(os.path.join(run_dir, "args.json"), vars(args))
    print(f"zero-shot CLIP: {len(templates)} template(s), e.g. {templates[0]!r}; nothing is learned")
    single, ensembled = {}, {}
    for name, (items, classnames) in test_sets.items():
        loader = make_loader(items, test_transform(clip_model.visual.input_resolution), args.batch_size, args.workers)
        features, labels = encode_images(clip_model.encode_image, loader, device, precision)  # (N, D), (N,)
        single[name] = accuracy(scale * features @ zeroshot_classifier(clip_model, classnames, [template]).t(), labels)
        weights = zeroshot_classifier(clip_model, classnames, templates)  # (n_cls, D)
        ensembled[name] = accuracy(scale * features @ weights.t(), labels)
        print(f"{name}: {len(items)} images, {len(classnames)} classes, accuracy {ensembled[name]:.2f}")
    metrics = {"method": "zeroshot" if args.ensemble == "none" else f"zeroshot-ensemble-{args.ensemble}",
               "backbone": args.backbone, "dataset": dataset, "shots": 0, "seed": args.seed,
               "zero_shot": single, "accuracy": ensembled}
    if "new" in ensembled:
        metrics["harmonic_mean"] = harmonic_mean(ensembled["test"], ensembled["new"])
    metrics.update({"epochs": 0, "train_seconds": 0.0, "device": device_name(device), "precision": precision,
                    "templates": templates, "versions": versions()})
    finish_run(run_dir, metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args())
