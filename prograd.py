"""ProGrad: prompt tuning whose updates never oppose zero-shot CLIP's general knowledge.

Paper: Zhu et al., "Prompt-aligned Gradient for Prompt Tuning", arXiv 2205.14865.

The idea. CoOp's learned context fits the few training images and can forget what CLIP knew: with
few shots it may end below zero-shot CLIP. ProGrad trains the same context (CoOp's prompt learner)
but looks at two gradients every step: G_d, of the cross-entropy with the labels (domain-specific),
and G_g, of the KL divergence from zero-shot CLIP's prediction to the prompt's (general). When they
conflict (an angle above 90 degrees), the part of G_d that opposes G_g is removed before the step.
lambda = 1 removes it fully; lambda = 0 is plain CoOp.

Equations (s the student's logits with the learned prompt, t the zero-shot teacher's logits from the
hand-crafted template, T the temperature, both logits include CLIP's scale of about 100)
  [ProGrad]  L_ce = CE(s, y)                     G_d = dL_ce/dctx   (domain-specific direction)
  [ProGrad]  L_kl = T^2 KL(softmax(t/T) || softmax(s/T))            G_g = dL_kl/dctx   (general direction)
  [ProGrad]  G = G_d - lambda (G_d.G_g / |G_g|^2) G_g   if G_d.G_g < 0,   else G = G_d
             then SGD with momentum and weight decay takes the step with G.

Learned:  ctx, 16 context vectors (16, d), initialised from the dataset's template words.
Frozen:   all of CLIP; the teacher is the same frozen CLIP with the template (no second copy).
Differs from coop.py: the template initialisation, the teacher, and train_step (two gradients and the
projection); no CSC, no class positions, no CoCoOp (ProGrad uses none of them).

Run
  quick CPU run on the toy world:  python prograd.py --backbone toy/clip_rn.pt --data toy/sketch --shots 4 \
        --crop-scale 0.5
  paper setting (16 shots, RN50): python prograd.py --backbone RN50 --data DATA/oxford_pets/images \
        --split-file DATA/oxford_pets/split_zhou_OxfordPets.json --template OxfordPets --shots 16
  base-to-new, as the authors' scripts (4 shots): add --shots 4 --subsample base
"""

import argparse
import json
import math
import os
import platform
import random
import time
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

# [ProGrad] the hand-crafted templates, reordered so that the class name comes last: the template text
# before " {}." initialises the context, and the whole template makes the zero-shot teacher.
PROGRAD_TEMPLATES = {
    "OxfordPets": "a type of pet, a photo of a {}.",
    "OxfordFlowers": "a type of flower, a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}.",
    "DescribableTextures": "a texture of {}.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a type of food, a photo of {}.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="ProGrad prompt tuning for CLIP (defaults: the paper's and the authors' code's settings).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # data and protocol
    p.add_argument("--backbone", default="RN50", help="CLIP name (RN50, ViT-B/16, ...) or checkpoint path")
    p.add_argument("--data", required=True,
                   help="ImageFolder root with train/ [val/] test/, or the image root of --split-file")
    p.add_argument("--split-file", default=None, help="CoOp split_zhou_<Name>.json (then --data is its image root)")
    p.add_argument("--classnames", default=None, help="classnames.txt: 'folder<TAB>readable name' per line")
    p.add_argument("--shots", type=int, default=16, help="training images per class (seeded sample)")
    p.add_argument("--subsample", choices=["all", "base", "new"], default="all",
                   help="base-to-new protocol: 'base' trains on the first half of the classes and also reports 'new'")
    p.add_argument("--eval-data", nargs="*", default=[],
                   help="extra test sets (ImageFolder roots) for the learned context")
    p.add_argument("--template", default="a photo of a {}.",
                   help=f"the teacher's template (class name last), or a dataset name: {', '.join(PROGRAD_TEMPLATES)}")
    # the method
    p.add_argument("--n-ctx", type=int, default=16, help="context vectors M")
    p.add_argument("--ctx-init", choices=["template", "random"], default="template",
                   help="context from the template words (right-aligned, zeros before), or CoOp's N(0, 0.02^2)")
    p.add_argument("--lam", type=float, default=1.0,
                   help="lambda, strength of the projection (1: fully orthogonal, 0: CoOp); the authors use "
                        "0.8 for 8 and 16 shots on Flowers102, DTD and EuroSAT")
    p.add_argument("--temperature", type=float, default=1.0, help="T of the KL to the zero-shot prediction")
    # optimisation (as CoOp: SGD 0.002, batch 32, epochs by shots)
    p.add_argument("--epochs", type=int, default=None, help="default: 50/100/200 for 1/2-4/8+ shots")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.002, help="SGD learning rate after the warm-up epoch")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (applied after the projection)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (applied after the projection)")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="constant learning rate of the first epoch")
    p.add_argument("--crop-scale", type=float, default=0.08,
                   help="smallest area of the random resized crop (the toy world's 32-pixel shapes need about 0.5)")
    p.add_argument("--drop-last", action="store_true",
                   help="drop the last partial batch when N >= batch size, as the original loader did")
    # run
    p.add_argument("--seed", type=int, default=1, help="the papers report seeds 1, 2, 3")
    p.add_argument("--precision", choices=["fp32", "amp", "fp16"], default=None,
                   help="default: amp on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--out", default=None, help="run folder (default runs/prograd/<dataset>/<shots>shot_seed<seed>)")
    p.add_argument("--load", default=None, help="checkpoint.pt of learned parameters to start from")
    p.add_argument("--eval-only", action="store_true", help="evaluate --load without training")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
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
# The method: the student (CoOp's prompt learner), the zero-shot teacher, the projection
# ------------------------------------------------------------------------------------------------
class PromptLearner(nn.Module):
    """ProGrad's student: CoOp's prompt learner with a generic context and the class token at the end.

    The template init of the authors' code: ctx = zeros(M, d) whose last k rows are the embeddings of
    the k template words, right-aligned; e.g. M=16 and "a photo of a" give 12 zero rows, then a photo of a.
    """

    def __init__(self, clip_model, classnames, n_ctx=16, init_text=None):
        super().__init__()
        d = clip_model.ln_final.weight.shape[0]  # token width (512 for RN50 and ViT-B)
        ctx = torch.zeros(n_ctx, d)
        if init_text is None:  # CoOp's random init N(0, 0.02^2)
            nn.init.normal_(ctx, std=0.02)
            k = 0
        else:
            # Tokenisation quirk, kept from the authors' code: k counts the template's WORDS. With a comma
            # ("a type of pet, a photo of a": 8 words, 9 BPE tokens, "pet," -> "pet" ",") the last template
            # token falls into the frozen suffix. The encoder still sees exactly the template; one of its
            # tokens is frozen instead of learned.
            k = len(init_text.split())
            if k > n_ctx:
                fail(f"the template {init_text!r} has {k} words, more than --n-ctx {n_ctx}")
            tokens = tokenize(clip_model, [init_text]).to(clip_model.token_embedding.weight.device)
            with torch.no_grad():
                ctx[n_ctx - k :] = clip_model.token_embedding(tokens)[0, 1 : 1 + k].float()  # (k, d)
        self.ctx = nn.Parameter(ctx)  # (M, d)
        self.n_ctx = n_ctx
        self.prefix_text = " ".join(["X"] * (n_ctx - k) + ([init_text] if k else []))
        self.set_classnames(clip_model, classnames)

    def set_classnames(self, clip_model, classnames):
        texts = [f"{self.prefix_text} {c}." for c in classnames]  # [CoOp] note the trailing period
        try:
            tokenized = tokenize(clip_model, texts)  # (n_cls, L)
        except RuntimeError:
            fail(f"a prompt is longer than the model's context length {clip_model.context_length}: "
                 f"use a smaller --n-ctx or shorter class names (longest: {max(classnames, key=len)!r})")
        device = clip_model.token_embedding.weight.device
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized.to(device)).float()  # (n_cls, L, d)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # SOS: (n_cls, 1, d)
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx :], persistent=False)  # class . EOT pad
        self.register_buffer("tokenized", tokenized.to(device), persistent=False)  # only to find EOT

    def forward(self):
        ctx = self.ctx.unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)  # (n_cls, M, d)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # [SOS] [V]_1..[V]_M [CLASS] . [EOS]


class CustomCLIP(nn.Module):
    """The student: logits of normalised image features against the learned prompts."""

    def __init__(self, clip_model, classnames, n_ctx=16, init_text=None):
        super().__init__()
        self.prompt_learner = PromptLearner(clip_model, classnames, n_ctx, init_text)
        self.text_encoder = TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale  # CLIP's own, frozen (about ln 100)

    def forward(self, image_features):
        # image_features: (B, D), L2-normalised, from the frozen image encoder
        pl = self.prompt_learner
        text = F.normalize(self.text_encoder(pl(), pl.tokenized).float(), dim=-1)  # (n_cls, D)
        return self.logit_scale.exp() * image_features @ text.t()  # (B, n_cls)


def resolve_template(template):
    """A dataset name gives ProGrad's template for it; otherwise it must end with the class name."""
    template = PROGRAD_TEMPLATES.get(template, template)
    if not template.endswith("{}."):
        fail(f"--template {template!r} must end with '{{}}.' (the class name last) or be one of "
             f"{', '.join(PROGRAD_TEMPLATES)}")
    return template


def prograd_losses(student_logits, teacher_logits, labels, temperature):
    """L_ce with the labels, and L_kl from the zero-shot distribution to the student's (both (B, n_cls) in)."""
    loss_ce = F.cross_entropy(student_logits, labels)
    # As the authors' code: the soft-target cross-entropy T^2 mean_b sum_c -p_zs log p_student. It
    # differs from KL(p_zs || p_student) by p_zs's entropy, a constant: the gradient is the KL's.
    p_zs = F.softmax(teacher_logits / temperature, dim=-1)
    loss_kl = temperature**2 * -(p_zs * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()
    return loss_ce, loss_kl


def project(G_d, G_g, lam):
    """[ProGrad] G = G_d - lambda (G_d.G_g / |G_g|^2) G_g if G_d.G_g < 0, else G_d; per tensor, in fp32."""
    g_d, g_g = G_d.float(), G_g.float()
    dot, norm2 = (g_d * g_g).sum(), (g_g * g_g).sum()
    if norm2 == 0 or not torch.isfinite(norm2):
        # |G_g| = 0: the authors' code divides 0 by 0, and "NaN < 0" is False, so it keeps G_d. We keep
        # that behaviour, explicitly.
        return G_d
    if dot < 0:  # the update would undo part of the general knowledge: remove that part
        return (g_d - lam * dot / norm2 * g_g).to(G_d.dtype)
    return G_d  # no conflict: the domain-specific gradient as it is


def epochs_for_shots(shots):
    """CoOp's configs, which ProGrad uses: 50 epochs for 1 shot, 100 for 2-4 shots, 200 for 8-16 shots."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def lr_at_epoch(epoch, base_lr, epochs, warmup_lr=1e-5):
    """Dassl's schedule, stepped once per epoch: a constant warm-up epoch, then cosine over `epochs`.

    With WARMUP_RECOUNT the cosine restarts after the warm-up, so it never reaches 0 (e.g. the last
    of 200 epochs runs at 4.9e-7).
    """
    if epoch == 0:
        return warmup_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def learned_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_learned(model, checkpoint, path):
    """Copy ctx from a checkpoint, after checking that the shapes fit."""
    state, mine = checkpoint["state"], learned_state(model)
    mismatch = [k for k in set(state) | set(mine) if k not in state or k not in mine or state[k].shape != mine[k].shape]
    if mismatch:
        theirs = {k: tuple(v.shape) for k, v in state.items()}
        ours = {k: tuple(v.shape) for k, v in mine.items()}
        fail(f"{path} does not fit this run: it holds {theirs} (written with {checkpoint.get('config')}), "
             f"this run learns {ours}; use the same --backbone and --n-ctx")
    model.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------------------------
# One optimisation step (the unit the training loop, the tests and bench.py call)
# ------------------------------------------------------------------------------------------------
def two_gradients(model, image_features, teacher_weights, labels, temperature, params, scale=lambda loss: loss):
    """G_d and G_g from ONE forward of the student; the teacher shares the student's image features."""
    logits = model(image_features).float()  # (B, n_cls)
    with torch.no_grad():
        teacher = model.logit_scale.exp() * image_features @ teacher_weights.t()  # zero-shot CLIP: (B, n_cls)
    loss_ce, loss_kl = prograd_losses(logits, teacher, labels, temperature)
    if not (torch.isfinite(loss_ce) and torch.isfinite(loss_kl)):
        raise FloatingPointError(f"the losses are {loss_ce.item()} and {loss_kl.item()}; try --precision fp32")
    G_g = torch.autograd.grad(scale(loss_kl), params, retain_graph=True)  # general direction
    G_d = torch.autograd.grad(scale(loss_ce), params)  # domain-specific direction
    return G_d, G_g, loss_ce, logits


def train_step(model, encode_image, teacher_weights, optimizer, scaler, images, labels, precision, lam, temperature):
    with torch.no_grad(), autocast(images.device, precision):  # CLIP's image side is frozen
        image_features = F.normalize(encode_image(images).float(), dim=-1)  # (B, D), one image forward
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with autocast(images.device, precision):
        G_d, G_g, loss_ce, logits = two_gradients(model, image_features, teacher_weights, labels, temperature,
                                                  params, scaler.scale)  # amp on CUDA: both scaled alike
    for p, g_d, g_g in zip(params, G_d, G_g):
        p.grad = project(g_d, g_g, lam)  # the projection is linear in G_d, so the loss scale passes through
    scaler.step(optimizer)  # SGD: momentum and weight decay act after the projection, as in the original
    scaler.update()
    dot = sum((d.float() * g.float()).sum() for d, g in zip(G_d, G_g))
    norms = math.sqrt(sum(d.float().pow(2).sum() for d in G_d) * sum(g.float().pow(2).sum() for g in G_g))
    cosine = float(dot) / norms if norms > 0 else 0.0
    return loss_ce.item(), accuracy(logits, labels), cosine


# ------------------------------------------------------------------------------------------------
# main: data, model, the visible training loop, evaluation, results
# ------------------------------------------------------------------------------------------------
def main(args):
    device = torch.device(args.device)
    precision = args.precision or ("amp" if device.type == "cuda" else "fp32")
    template = resolve_template(args.template)
    epochs = args.epochs or epochs_for_shots(args.shots)
    if args.eval_only and not args.load:
        fail("--eval-only needs --load <checkpoint.pt>")
    if args.shots < 1:
        fail("--shots must be at least 1")
    dataset = os.path.basename(os.path.normpath(args.data))
    if args.split_file:
        dataset = os.path.splitext(os.path.basename(args.split_file))[0].replace("split_zhou_", "")
    run_dir = args.out or os.path.join("runs", "prograd", dataset, f"{args.shots}shot_seed{args.seed}")
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if args.resume and not os.path.isfile(ckpt_path):
        fail(f"--resume: {ckpt_path} not found; start the run without --resume")
    seed_everything(args.seed)

    # 1. Data, checked before anything slow: few-shot sampling happens before the base/new split
    data = load_dataset(args.data, args.split_file, args.classnames)
    data["train"] = sample_few_shot(data["train"], args.shots, args.seed) if data["train"] else []
    train = subsample_classes(data, args.subsample)
    if not train["train"] and not args.eval_only:
        fail(f"{args.data}: no training images (a train/ folder or the split file's train list)")
    test_sets = {"test": (train["test"], train["classnames"])}
    if args.subsample == "base":
        new = subsample_classes(data, "new")
        test_sets["new"] = (new["test"], new["classnames"])
    for root in args.eval_data:
        name, items, classnames = load_eval_set(root)
        test_sets[name if name not in test_sets else root] = (items, classnames)
    check_images(train["train"])
    for items, _ in test_sets.values():
        check_images(items, full=False)

    # 2. Frozen CLIP, the learned prompt, and the zero-shot teacher (its class features computed once)
    clip_model = load_clip(args.backbone, device, precision)
    n_px = clip_model.visual.input_resolution
    init_text = template[: -len(" {}.")].replace("_", " ") if args.ctx_init == "template" else None
    model = CustomCLIP(clip_model, train["classnames"], args.n_ctx, init_text).to(device)
    teacher_weights = zeroshot_classifier(clip_model, train["classnames"], [template])  # (n_cls, D)
    learned = [p for p in model.parameters() if p.requires_grad]
    pl = model.prompt_learner
    n_learned, n_frozen = sum(p.numel() for p in learned), sum(p.numel() for p in clip_model.parameters())
    assert n_learned == pl.ctx.numel() and all(not p.requires_grad for p in clip_model.parameters())
    print(f"prograd: {pl.n_ctx} context vectors from {init_text or 'N(0, 0.02^2)'!r}, learned "
          f"{list(learned_state(model))} = {n_learned:,} parameters; CLIP's {n_frozen:,} are frozen; "
          f"teacher {template!r}, lambda {args.lam}, T {args.temperature}")
    config = {"method": "prograd", "backbone": args.backbone, "n_ctx": pl.n_ctx, "ctx_dim": pl.ctx.shape[-1]}
    if args.load:
        load_learned(model, load_checkpoint(args.load), args.load)

    # 3. Training: SGD on the context only, with the projected gradient, one learning rate per epoch
    os.makedirs(run_dir, exist_ok=True)
    save_json(os.path.join(run_dir, "args.json"), vars(args))
    optimizer = torch.optim.SGD(learned, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp" and device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)  # the shuffling order, saved for --resume
    # The original loader silently drops the last partial batch when N >= batch size (up to 31
    # images per epoch); we keep every image unless --drop-last asks for the original behaviour.
    drop_last = args.drop_last and len(train["train"]) >= args.batch_size
    loader = make_loader(train["train"], train_transform(n_px, args.crop_scale), args.batch_size, args.workers, True,
                         drop_last, generator)
    start_epoch, train_seconds = 0, 0.0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        load_learned(model, ckpt, ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, train_seconds = ckpt["epoch"], ckpt["train_seconds"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        generator.set_state(ckpt["rng"]["loader"])
        print(f"resuming {run_dir} after epoch {start_epoch}/{epochs}")
    elif not args.eval_only and os.path.exists(os.path.join(run_dir, "log.jsonl")):
        os.remove(os.path.join(run_dir, "log.jsonl"))  # a fresh run starts a fresh log
    for epoch in range(start_epoch, 0 if args.eval_only else epochs):
        lr = lr_at_epoch(epoch, args.lr, epochs, args.warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0, losses, accs, cosines = time.time(), [], [], []
        for images, labels in loader:
            loss, acc, cosine = train_step(model, clip_model.encode_image, teacher_weights, optimizer, scaler,
                                           images.to(device, non_blocking=True), labels.to(device), precision,
                                           args.lam, args.temperature)
            losses.append(loss)
            accs.append(acc)
            cosines.append(cosine)
        train_seconds += time.time() - t0
        # the quantity the paper is about: how often, and how much, the two directions disagree
        record = {"epoch": epoch + 1, "lr": lr, "loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                  "conflict_fraction": float(np.mean([c < 0 for c in cosines])),
                  "mean_cosine": float(np.mean(cosines)), "seconds": round(time.time() - t0, 3)}
        append_log(run_dir, record)
        print(f"epoch {epoch + 1}/{epochs}  lr {lr:.3e}  loss {record['loss']:.4f}  "
              f"train acc {record['train_acc']:.1f}  conflicts {100 * record['conflict_fraction']:.0f}%  "
              f"cos(G_d, G_g) {record['mean_cosine']:+.3f}  {record['seconds']:.1f}s")
        save_checkpoint(ckpt_path, {"config": config, "state": learned_state(model),
                                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                    "train_seconds": train_seconds,
                                    "rng": {"torch": torch.get_rng_state(), "loader": generator.get_state()}})

    # 4. Evaluation of the last epoch on every test set (image features encoded once per set)
    zero_shot, acc = {}, {}
    for name, (items, classnames) in test_sets.items():
        loader = make_loader(items, test_transform(n_px), 100, args.workers)
        features, labels = encode_images(clip_model.encode_image, loader, device, precision)
        weights = zeroshot_classifier(clip_model, classnames, [template])  # the teacher on these classes
        zero_shot[name] = accuracy(clip_model.logit_scale.exp() * features @ weights.t(), labels)
        pl.set_classnames(clip_model, classnames)  # the learned context does not depend on the names
        with torch.no_grad(), autocast(device, precision):
            acc[name] = accuracy(model(features), labels)
    metrics = {"method": "prograd", "backbone": args.backbone, "dataset": dataset, "shots": args.shots,
               "seed": args.seed, "zero_shot": zero_shot, "accuracy": acc}
    if "new" in acc:
        metrics["harmonic_mean"] = harmonic_mean(acc["test"], acc["new"])
    metrics.update({"epochs": 0 if args.eval_only else epochs, "train_seconds": round(train_seconds, 2),
                    "device": device_name(device), "precision": precision, "versions": versions()})
    finish_run(run_dir, metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args())
