"""CoOp and CoCoOp: learning the words of CLIP's prompt from a few labelled images.

Papers
  CoOp:   Zhou et al., "Learning to Prompt for Vision-Language Models", arXiv 2109.01134 (IJCV 2022)
  CoCoOp: Zhou et al., "Conditional Prompt Learning for Vision-Language Models", arXiv 2203.05557

The idea. Zero-shot CLIP classifies an image by comparing it with the text "a photo of a {class}."
for every class, and the accuracy depends a lot on the exact words of that template. CoOp keeps
CLIP frozen and replaces the template words by M continuous vectors (the "context") that are
learned by gradient descent from a few labelled images per class. CoCoOp adds a small meta-network
that turns each image into a shift of the context, so that the prompt adapts to the image and
generalises better to classes that were not seen in training.

Equations (t_c is the prompt of class c, e(.) CLIP's token embedding, g(.) its text encoder,
f(x) the L2-normalised image feature, tau CLIP's own frozen logit scale, about 100)
  [CoOp]   t_c = [SOS] [V]_1 ... [V]_M [CLASS_c] [.] [EOS]      (class token at the end)
  [CoOp]   p(y=c|x) = softmax_c( tau * cos(g(t_c), f(x)) ),  loss = cross-entropy
  [CoCoOp] pi = h_theta(f(x)),  [V]_m(x) = [V]_m + pi  for every m  (h: Linear-ReLU-Linear)

Learned:  ctx = [V]_1..[V]_M, shape (M, d), or (n_cls, M, d) with --csc; CoCoOp also h_theta.
Frozen:   all of CLIP (image encoder, text encoder, token embedding, logit scale).

Run
  quick CPU run on the toy world:  python coop.py --backbone toy/clip_rn.pt --data toy/sketch --shots 4 --crop-scale 0.5
  paper setting (16 shots, RN50): python coop.py --backbone RN50 --data DATA/oxford_pets/images \
        --split-file DATA/oxford_pets/split_zhou_OxfordPets.json --shots 16
  CoCoOp base-to-new (ViT-B/16):  python coop.py --cocoop --backbone ViT-B/16 --ctx-init "a photo of a" \
        --data ... --split-file ... --shots 16 --subsample base
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

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="CoOp / CoCoOp prompt learning for CLIP (defaults: the papers' settings).",
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
    p.add_argument("--template", default="a photo of a {}.", help="hand-crafted template of the zero-shot baseline")
    # the method
    p.add_argument("--cocoop", action="store_true", help="CoCoOp: add the image-conditioned meta-network")
    p.add_argument("--n-ctx", type=int, default=None, help="context vectors M (default 16 for CoOp, 4 for CoCoOp)")
    p.add_argument("--ctx-init", default="",
                   help="initialise the context from these words, e.g. 'a photo of a' (sets M)")
    p.add_argument("--csc", action="store_true", help="class-specific context (one context per class)")
    p.add_argument("--class-token-position", choices=["end", "middle", "front"], default="end")
    # optimisation (CoOp: SGD 0.002, batch 32, epochs by shots; CoCoOp: batch 1, 10 epochs)
    p.add_argument("--epochs", type=int, default=None, help="default: 50/100/200 for 1/2-4/8+ shots (CoCoOp: 10)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 (CoCoOp: 1)")
    p.add_argument("--lr", type=float, default=0.002, help="SGD learning rate after the warm-up epoch")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (on the context too)")
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
    p.add_argument("--out", default=None, help="run folder (default runs/<method>/<dataset>/<shots>shot_seed<seed>)")
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
# The method: CoOp's prompt learner, CoCoOp's meta-network, the schedule
# ------------------------------------------------------------------------------------------------
class PromptLearner(nn.Module):
    """Every class's prompt, built around the learned context `ctx` (CoOp's only parameter).

    The fixed pieces (start token, class-name tokens, ".", EOT) are buffers that set_classnames
    rebuilds, so a learned context can be evaluated on other class names; checkpoints hold ctx only.
    """

    def __init__(self, clip_model, classnames, n_ctx=16, ctx_init="", csc=False, position="end"):
        super().__init__()
        d = clip_model.ln_final.weight.shape[0]  # token width (512 for RN50 and ViT-B)
        if ctx_init:  # [CoOp] word init: ctx = the token embeddings of the init words
            ctx_init = ctx_init.replace("_", " ")
            tokens = tokenize(clip_model, [ctx_init]).to(clip_model.token_embedding.weight.device)
            # The original counts the words of the init text; we count its BPE tokens between SOS and
            # EOT: the same for "a photo of a", and still exact when a word splits into several tokens.
            n_ctx = int(tokens.argmax()) - 1
            with torch.no_grad():
                ctx = clip_model.token_embedding(tokens)[0, 1 : 1 + n_ctx].float()  # (M, d)
            self.prefix_text = ctx_init
        else:  # [CoOp] random init N(0, 0.02^2); the placeholder words "X" are replaced by ctx
            ctx = torch.empty(len(classnames), n_ctx, d) if csc else torch.empty(n_ctx, d)
            nn.init.normal_(ctx, std=0.02)
            self.prefix_text = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx)  # (M, d), or (n_cls, M, d) with class-specific context
        self.n_ctx, self.csc, self.position = n_ctx, csc, position
        self.set_classnames(clip_model, classnames)

    def set_classnames(self, clip_model, classnames):
        if self.csc and len(classnames) != self.ctx.shape[0]:
            fail(f"the class-specific context was learned for {self.ctx.shape[0]} classes; "
                 f"it cannot be used with {len(classnames)} other classes")
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
        if self.position != "end":  # which row of the 'end' layout goes where when the class name moves;
            # the name keeps its BPE tokens, and the prompt's length and EOT index do not change
            name_lens = (tokenize(clip_model, classnames).argmax(dim=-1) - 1).tolist()  # BPE tokens per name
            M, L, order = self.n_ctx, tokenized.shape[1], []
            for n in name_lens:
                v, name, rest = list(range(1, 1 + M)), list(range(1 + M, 1 + M + n)), list(range(1 + M + n, L))
                sos = [0]
                if self.position == "middle":  # [SOS] [V]_1..[V]_M/2 [CLASS] [V]_M/2+1..[V]_M [.] [EOS]
                    order.append(sos + v[: M // 2] + name + v[M // 2 :] + rest)
                else:  # front: [SOS] [CLASS] [V]_1..[V]_M [.] [EOS]
                    order.append(sos + name + v + rest)
            self.register_buffer("order", torch.tensor(order, device=device), persistent=False)  # (n_cls, L)

    def forward(self, bias=None):
        n_cls = self.token_prefix.shape[0]
        ctx = self.ctx
        if bias is not None:  # CoCoOp: bias (B, d) from the meta-network, one per image
            ctx = ctx.unsqueeze(0) + bias.unsqueeze(1)  # [CoCoOp] v_m(x) = v_m + pi: (B, M, d)
            B = ctx.shape[0]
            ctx = ctx.unsqueeze(1).expand(-1, n_cls, -1, -1)  # (B, n_cls, M, d)
            prefix = self.token_prefix.unsqueeze(0).expand(B, -1, -1, -1)  # (B, n_cls, 1, d)
            suffix = self.token_suffix.unsqueeze(0).expand(B, -1, -1, -1)  # (B, n_cls, L-1-M, d)
            return torch.cat([prefix, ctx, suffix], dim=2)  # (B, n_cls, L, d)
        if ctx.dim() == 2:  # generic context, shared by all classes
            ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)  # (n_cls, M, d)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (n_cls, L, d)
        if self.position == "end":  # [CoOp] [SOS] [V]_1..[V]_M [CLASS] [.] [EOS]
            return prompts
        # middle and front: the same rows, reordered per class by `order` (see set_classnames)
        return prompts.gather(1, self.order.unsqueeze(-1).expand(-1, -1, prompts.shape[-1]))


class CustomCLIP(nn.Module):
    """CoOp (and CoCoOp with meta_net): logits of normalised image features against learned prompts."""

    def __init__(self, clip_model, classnames, n_ctx=16, ctx_init="", csc=False, position="end", cocoop=False):
        super().__init__()
        self.prompt_learner = PromptLearner(clip_model, classnames, n_ctx, ctx_init, csc, position)
        self.text_encoder = TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale  # CLIP's own, frozen (about ln 100)
        vis_dim, ctx_dim = clip_model.visual.output_dim, self.prompt_learner.ctx.shape[-1]
        # [CoCoOp] meta-network h_theta: Linear(vis_dim, vis_dim/16) -> ReLU -> Linear(vis_dim/16, ctx_dim)
        self.meta_net = nn.Sequential(nn.Linear(vis_dim, vis_dim // 16), nn.ReLU(inplace=True),
                                      nn.Linear(vis_dim // 16, ctx_dim)) if cocoop else None

    def forward(self, image_features):
        # image_features: (B, D), L2-normalised, from the frozen image encoder
        pl, scale = self.prompt_learner, self.logit_scale.exp()
        if self.meta_net is None:  # one text feature per class, shared by all images
            text = F.normalize(self.text_encoder(pl(), pl.tokenized).float(), dim=-1)  # (n_cls, D)
            return scale * image_features @ text.t()  # [CoOp] (B, n_cls)
        pi = self.meta_net(image_features)  # [CoCoOp] pi = h_theta(f(x)) on the normalised feature: (B, d)
        prompts = pl(pi)  # (B, n_cls, L, d)
        B, n_cls = prompts.shape[:2]
        text = self.text_encoder(prompts.flatten(0, 1), pl.tokenized.repeat(B, 1))  # (B*n_cls, D)
        text = F.normalize(text.float(), dim=-1).view(B, n_cls, -1)  # (B, n_cls, D)
        return scale * torch.einsum("bd,bcd->bc", image_features, text)  # (B, n_cls)


def epochs_for_shots(shots):
    """CoOp's configs: 50 epochs for 1 shot, 100 for 2-4 shots, 200 for 8-16 shots (ImageNet: 50)."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def lr_at_epoch(epoch, base_lr, epochs, warmup_lr=1e-5):
    """Dassl's schedule, stepped once per epoch: a constant warm-up epoch, then cosine over `epochs`.

    With WARMUP_RECOUNT the cosine restarts after the warm-up, so it never reaches 0 (e.g. the last
    of 200 epochs runs at 4.9e-7).
    """
    if epoch == 0:
        return warmup_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


@torch.no_grad()
def predict(model, image_features, chunk=None):
    """Logits for precomputed normalised image features; CoCoOp runs a few images at a time."""
    if model.meta_net is None:
        return model(image_features)
    chunk = chunk or max(1, 2000 // model.prompt_learner.token_prefix.shape[0])
    return torch.cat([model(image_features[i : i + chunk]) for i in range(0, len(image_features), chunk)])


def learned_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_learned(model, checkpoint, path):
    """Copy ctx (and the meta-network) from a checkpoint, after checking that the shapes fit."""
    state, mine = checkpoint["state"], learned_state(model)
    mismatch = [k for k in set(state) | set(mine) if k not in state or k not in mine or state[k].shape != mine[k].shape]
    if mismatch:
        theirs = {k: tuple(v.shape) for k, v in state.items()}
        ours = {k: tuple(v.shape) for k, v in mine.items()}
        fail(f"{path} does not fit this run: it holds {theirs} (written with {checkpoint.get('config')}), "
             f"this run learns {ours}; use the same --backbone, --n-ctx/--ctx-init, --csc and --cocoop")
    model.load_state_dict(state, strict=False)


# ------------------------------------------------------------------------------------------------
# One optimisation step (the unit the training loop, the tests and bench.py call)
# ------------------------------------------------------------------------------------------------
def train_step(model, encode_image, optimizer, scaler, images, labels, precision):
    with torch.no_grad(), autocast(images.device, precision):  # CLIP's image side is frozen
        image_features = F.normalize(encode_image(images).float(), dim=-1)  # (B, D)
    with autocast(images.device, precision):
        logits = model(image_features)  # (B, n_cls)
    loss = F.cross_entropy(logits.float(), labels)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}; try --precision fp32")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # a no-op scale unless --precision amp on CUDA
    scaler.step(optimizer)  # SGD: momentum and weight decay on the fp32 ctx
    scaler.update()
    return loss.item(), accuracy(logits, labels)


# ------------------------------------------------------------------------------------------------
# main: data, model, the visible training loop, evaluation, results
# ------------------------------------------------------------------------------------------------
def main(args):
    device = torch.device(args.device)
    precision = args.precision or ("amp" if device.type == "cuda" else "fp32")
    method = "cocoop" if args.cocoop else "coop"
    n_ctx = args.n_ctx or (4 if args.cocoop else 16)
    epochs = args.epochs or (10 if args.cocoop else epochs_for_shots(args.shots))
    batch_size = args.batch_size or (1 if args.cocoop else 32)
    if args.cocoop and (args.csc or args.class_token_position != "end"):
        fail("CoCoOp uses one generic context with the class token at the end (no --csc, no --class-token-position)")
    if args.csc and (args.subsample == "base" or args.eval_data):
        fail("a class-specific context belongs to its training classes: --csc cannot be tested on new classes")
    if args.eval_only and not args.load:
        fail("--eval-only needs --load <checkpoint.pt>")
    if args.shots < 1:
        fail("--shots must be at least 1")
    dataset = os.path.basename(os.path.normpath(args.data))
    if args.split_file:
        dataset = os.path.splitext(os.path.basename(args.split_file))[0].replace("split_zhou_", "")
    run_dir = args.out or os.path.join("runs", method, dataset, f"{args.shots}shot_seed{args.seed}")
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

    # 2. Frozen CLIP and the learned prompt
    clip_model = load_clip(args.backbone, device, precision)
    n_px = clip_model.visual.input_resolution
    model = CustomCLIP(clip_model, train["classnames"], n_ctx, args.ctx_init, args.csc,
                       args.class_token_position, args.cocoop).to(device)
    learned = [p for p in model.parameters() if p.requires_grad]
    pl = model.prompt_learner
    expected = pl.ctx.numel() + (sum(p.numel() for p in model.meta_net.parameters()) if args.cocoop else 0)
    n_learned, n_frozen = sum(p.numel() for p in learned), sum(p.numel() for p in clip_model.parameters())
    assert n_learned == expected and all(not p.requires_grad for p in clip_model.parameters())
    print(f"{method}: {pl.n_ctx} context vectors, learned {list(learned_state(model))} = {n_learned:,} parameters; "
          f"CLIP's {n_frozen:,} are frozen")
    config = {"method": method, "backbone": args.backbone, "n_ctx": pl.n_ctx, "csc": args.csc,
              "ctx_dim": pl.ctx.shape[-1]}
    if args.load:
        load_learned(model, load_checkpoint(args.load), args.load)

    # 3. Training: SGD on the context only, one learning rate per epoch
    os.makedirs(run_dir, exist_ok=True)
    save_json(os.path.join(run_dir, "args.json"), vars(args))
    optimizer = torch.optim.SGD(learned, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp" and device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)  # the shuffling order, saved for --resume
    # The original loader silently drops the last partial batch when N >= batch size (up to 31
    # images per epoch); we keep every image unless --drop-last asks for the original behaviour.
    drop_last = args.drop_last and len(train["train"]) >= batch_size
    loader = make_loader(train["train"], train_transform(n_px, args.crop_scale), batch_size, args.workers, True,
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
        t0, losses, accs = time.time(), [], []
        for images, labels in loader:
            loss, acc = train_step(model, clip_model.encode_image, optimizer, scaler,
                                   images.to(device, non_blocking=True), labels.to(device), precision)
            losses.append(loss)
            accs.append(acc)
        train_seconds += time.time() - t0
        record = {"epoch": epoch + 1, "lr": lr, "loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                  "seconds": round(time.time() - t0, 3)}
        append_log(run_dir, record)
        print(f"epoch {epoch + 1}/{epochs}  lr {lr:.3e}  loss {record['loss']:.4f}  "
              f"train acc {record['train_acc']:.1f}  {record['seconds']:.1f}s")
        save_checkpoint(ckpt_path, {"config": config, "state": learned_state(model),
                                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                                    "train_seconds": train_seconds,
                                    "rng": {"torch": torch.get_rng_state(), "loader": generator.get_state()}})

    # 4. Evaluation of the last epoch on every test set (image features encoded once per set)
    zero_shot, acc = {}, {}
    for name, (items, classnames) in test_sets.items():
        loader = make_loader(items, test_transform(n_px), 100, args.workers)
        features, labels = encode_images(clip_model.encode_image, loader, device, precision)
        weights = zeroshot_classifier(clip_model, classnames, [args.template])
        zero_shot[name] = accuracy(clip_model.logit_scale.exp() * features @ weights.t(), labels)
        pl.set_classnames(clip_model, classnames)  # the learned context does not depend on the names
        with autocast(device, precision):
            acc[name] = accuracy(predict(model, features), labels)
    metrics = {"method": method, "backbone": args.backbone, "dataset": dataset, "shots": args.shots,
               "seed": args.seed, "zero_shot": zero_shot, "accuracy": acc}
    if "new" in acc:
        metrics["harmonic_mean"] = harmonic_mean(acc["test"], acc["new"])
    metrics.update({"epochs": 0 if args.eval_only else epochs, "train_seconds": round(train_seconds, 2),
                    "device": device_name(device), "precision": precision, "versions": versions()})
    finish_run(run_dir, metrics)
    return metrics


if __name__ == "__main__":
    main(parse_args())
