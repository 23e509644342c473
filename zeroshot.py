"""Zero-shot CLIP: classify images by comparing them with texts made from class names.

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
arXiv 2103.00020 (Sec. 3.1.4, prompt engineering and ensembling). Templates and ensembling as in
the CoOp code (github.com/KaiyangZhou/CoOp, trainers/zsclip.py and trainers/imagenet_templates.py).

The idea. CLIP maps images and texts into one space. To classify without any training example,
write one text per class from a template ("a photo of a {}."), encode the texts, and predict the
class whose text feature is most similar to the image feature. Prompt ensembling averages the
text features of several templates per class, which is usually a few points better.

Equations (f(x) the L2-normalised image feature, g(t) the normalised text feature, s = 1/tau =
exp(logit_scale) CLIP's frozen logit scale, about 100, tau its temperature)
  [CLIP]      logits_c = s f(x) . w_c,   w_c = g(template(c))              (one template)
  [Ensemble]  w_c = normalise( mean_k g(template_k(c)) )                   (K templates)

Learned: nothing. Frozen: all of CLIP. Every other method file reports zero-shot CLIP, with its own
template(s), next to itself.

Templates. Each of the 11 few-shot datasets of the CoOp paper has one hand-written template
(CUSTOM_TEMPLATES, e.g. "a photo of a {}, a type of pet."); --template OxfordPets picks it. The
ensembles: the 7 ImageNet templates that the CLIP authors selected (--ensemble select: CoOp's
ZeroshotCLIP2 uses them on every dataset, Tip-Adapter's code on ImageNet) or all 80 of OpenAI's
ImageNet templates (--ensemble all). On the 10 datasets other than ImageNet, ZeroshotCLIP2 also adds
the dataset's own template to the 7: --ensemble select --add-template --template <dataset>.

Run
  python zeroshot.py --backbone toy/clip_rn.pt --data toy/shapes
  python zeroshot.py --backbone RN50 --data DATA/oxford_pets/images --template OxfordPets \\
      --split-file DATA/oxford_pets/split_zhou_OxfordPets.json
  python zeroshot.py --backbone RN50 --data DATA/imagenet --ensemble select    # 7 templates
"""

import argparse
import json
import math
import os
import random
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image

with warnings.catch_warnings():  # openai-clip 1.0.1 imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip

# ResNet-50 and CLIP's default prompt; CoOp's zero-shot rows: each dataset's (--template <Name>).
# (CLIP's own headline model is ViT-L/14@336px; CoOp and the methods after it: RN50, ViT-B/16.)
PRESETS = {"zeroshot": dict(backbone="RN50", template="a photo of a {}.")}


# --- shared: templates (canonical copy in zeroshot.py; re-sync with tools/sync_shared.py) ---
# [CoOp trainers/zsclip.py CUSTOM_TEMPLATES] one hand-written template per few-shot dataset
CUSTOM_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.", "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.", "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.", "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
}  # fmt: skip
# [CoOp trainers/imagenet_templates.py IMAGENET_TEMPLATES_SELECT] 7 of OpenAI's 80 ImageNet
# templates (--ensemble select): CoOp's ZeroshotCLIP2 averages them, Tip-Adapter's code on ImageNet
TEMPLATES_SELECT = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
]  # fmt: skip


def resolve_template(template):
    """--template: a dataset name gives that dataset's hand-written template; otherwise it must
    contain {} for the class name (else every class would get the same text)."""
    template = CUSTOM_TEMPLATES.get(template, template)
    if "{}" not in template:
        names = ", ".join(CUSTOM_TEMPLATES)
        fail(f"--template {template!r} has no {{}} for the class name and is not one of {names}")
    return template


# --- end shared: templates ---

# OpenAI's 80 ImageNet templates (CLIP's prompt-engineering notebook; CoOp's IMAGENET_TEMPLATES),
# in their order (the ensemble's mean adds them in this order)
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
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The method: templates -> one weight vector per class
# ------------------------------------------------------------------------------------------------
# (resolve_template, which reads --template, sits in the templates block above: adapter.py has it)
def ensemble_templates(ensemble, template, add_template):
    """The templates whose features are averaged: one, the 7 selected, or all 80 (+ --template)."""
    templates = {"none": [template], "select": TEMPLATES_SELECT, "all": TEMPLATES_80}[ensemble]
    if add_template and template not in templates:
        return templates + [template]  # CoOp's ZeroshotCLIP2: the 7 and the dataset's own
    return list(templates)


# ------------------------------------------------------------------------------------------------
# main: data, CLIP, classifier, evaluation, results
# ------------------------------------------------------------------------------------------------
def main(args):
    device = torch.device(args.device)
    template = resolve_template(args.template)
    templates = ensemble_templates(args.ensemble, template, args.add_template)
    dataset, _, test_sets = load_task(args)
    run_dir = args.out or os.path.join("runs", "zeroshot", dataset, args.ensemble)
    torch.manual_seed(args.seed)

    # Frozen CLIP; one classifier per test set (its class names), images encoded once
    clip_model = load_clip(args.backbone, device, args.precision)
    s, n_px = clip_model.logit_scale.exp(), clip_model.visual.input_resolution  # s = 1/tau
    os.makedirs(run_dir, exist_ok=True)
    save(os.path.join(run_dir, "args.json"), vars(args))
    print(
        f"zero-shot CLIP: {len(templates)} template(s), e.g. {templates[0]!r}; nothing is learned"
    )
    single, ensembled = {}, {}  # metrics.json: zero_shot = --template alone, accuracy = the run's
    for name, (items, classnames) in test_sets.items():
        loader = make_loader(items, test_transform(n_px), args.batch_size, args.workers, device)
        features, labels = encode_images(clip_model.encode_image, loader, device, args.precision)
        weights = zeroshot_classifier(clip_model, classnames, [template])  # [CLIP] w_c: (n_cls, D)
        single[name] = accuracy(s * features @ weights.t(), labels)  # [CLIP] logits: (N, n_cls)
        if templates != [template]:  # [Ensemble] w_c of the K templates: (n_cls, D)
            weights = zeroshot_classifier(clip_model, classnames, templates)
        ensembled[name] = accuracy(s * features @ weights.t(), labels)  # [CLIP] logits, w_c as set
        print(f"{name}: {len(items)} images, {len(classnames)} classes: {ensembled[name]:.2f}%")
    method = "zeroshot" if args.ensemble == "none" else f"zeroshot-ensemble-{args.ensemble}"
    extra = dict(epochs=0, precision=args.precision, templates=templates)
    return finish_run(run_dir, args, method, dataset, single, ensembled, **extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Zero-shot CLIP: one template or an ensemble")
    add = p.add_argument
    add("--backbone", help="CLIP name (RN50, ViT-B/16, ...) or checkpoint path")
    add("--data", required=True, help="root with [train/] test/, or --split-file's images")
    add("--split-file", help="CoOp's split_zhou_<Name>.json (then --data is its image root)")
    base_new = "base-to-new: 'base' reports the base classes and 'new' the other half"
    add("--subsample", choices=["all", "base", "new"], default="all", help=base_new)
    add("--eval-data", nargs="*", default=[], help="extra test sets (ImageFolder roots)")
    names = ", ".join(CUSTOM_TEMPLATES)
    add("--template", help=f"a template with {{}} for the class name, or a dataset name: {names}")
    ensemble = "average the text features of the 7 selected ImageNet templates, or of all 80"
    add("--ensemble", choices=["none", "select", "all"], default="none", help=ensemble)
    coop2 = "also average --template in (CoOp's ZeroshotCLIP2 does on the 10 non-ImageNet sets)"
    add("--add-template", action="store_true", help=coop2)
    add("--batch-size", type=int, default=100, help="test batch size (does not change results)")
    return parse(p, argv, PRESETS, lambda a: "zeroshot", learned=False)


# --- shared: appendix (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
# Appendix, the same in every file: data and its checks, CLIP, frozen features, options, results.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def fail(message):  # stops the command line before any long work: what is wrong, what to do
    raise SystemExit(f"error: {message}")


def read_image_folder(folder, names_file):
    """folder/<class>/<image> -> ([(path, label)], class names: names_file's or the folders')."""
    try:
        found = torchvision.datasets.ImageFolder(folder)  # sorted class folders, image files only
    except (FileNotFoundError, OSError) as e:
        fail(f"{folder}: {e}; expected {folder}/<class folder>/<image files>")
    names = {d: d.replace("_", " ") for d in found.classes}
    if os.path.isfile(names_file):
        with open(names_file, encoding="utf-8") as f:
            names = dict(line.split(maxsplit=1) for line in f if len(line.split()) > 1)
        if set(found.classes) - set(names):
            missing = sorted(set(found.classes) - set(names))[:5]
            fail(f"{names_file}: no 'folder<TAB>readable name' line for the folders {missing}")
    return found.samples, [names[d].strip() for d in found.classes]


def load_dataset(root, split_file=None):
    """CoOp's split_zhou_<Name>.json ({split: [[path under root, label, class name]]}) or folders
    root/{train,val,test}/<class>/<image> -> {"train", "val", "test": [(path, y)], "classnames"}."""
    if split_file:
        try:
            split = json.load(open(split_file, encoding="utf-8"))
            data = {s: [(os.path.join(root, p), int(y)) for p, y, _ in split[s]] for s in split}
            names = {int(y): c.replace("_", " ") for _, y, c in split["train"]}
            data["classnames"] = [names[y] for y in range(len(names))]  # KeyError: labels 0..n-1
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{split_file}: not a CoOp split file with train labels 0..n-1 ({e!r})")
        if data["train"] and not os.path.isfile(data["train"][0][0]):
            fail(f"{data['train'][0][0]}: not found; is --data the image root of {split_file}?")
        return data
    if not os.path.isdir(os.path.join(root, "test")):
        what = "no test/ folder" if os.path.isdir(root) else "folder not found"
        fail(f"{root}: {what}; expected {root}/train/<class>/<image> and {root}/test/...")
    data = {"train": [], "val": []}
    for split in [s for s in ("test", "train", "val") if os.path.isdir(os.path.join(root, s))]:
        data[split], names = read_image_folder(f"{root}/{split}", f"{root}/classnames.txt")
        if data.setdefault("classnames", names) != names:
            fail(f"{root}/{split} and {root}/test have different class folders")
    return data


def sample_few_shot(items, shots, seed):
    """Per class, `shots` items drawn without replacement (seeded); a smaller class keeps all."""
    rng, by_class = random.Random(seed), {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    return [x for group in by_class.values() for x in rng.sample(group, min(shots, len(group)))]


def subsample_classes(data, which):
    """Base-to-new split: sorted labels, the first ceil(n/2) are base, the rest new; relabelled."""
    if which == "all":
        return data
    labels = sorted({y for _, y in data["train"] or data["test"]})
    m = math.ceil(len(labels) / 2)
    relabel = {y: i for i, y in enumerate(labels[:m] if which == "base" else labels[m:])}
    keep = lambda split: [(path, relabel[y]) for path, y in data[split] if y in relabel]
    return dict(train=keep("train"), val=keep("val"), test=keep("test"),
                classnames=[data["classnames"][y] for y in relabel])  # fmt: skip


def check_images(items, full=True):
    """Open every image now (and decode it if full): a bad file stops the run before long work."""
    for path, _ in items:
        try:
            with Image.open(path) as image:
                image.load() if full else None  # decode the (few) training images too
        except (OSError, ValueError) as e:
            fail(f"{path}: cannot read this image ({e}); replace or delete the file")


def load_task(args, shots=None):
    """The run's data, checked before anything slow -> (dataset name, the trained classes' data,
    {test set: (items, class names)}); the shots are drawn before the base/new split, as CoOp's."""
    data = load_dataset(args.data, args.split_file)
    if shots:
        data["train"] = sample_few_shot(data["train"], shots, args.seed)
    part = subsample_classes(data, args.subsample)
    test_sets = {"test": (part["test"], part["classnames"])}
    if args.subsample == "base":  # the same learned parameters, tested on the other half
        new = subsample_classes(data, "new")
        test_sets["new"] = (new["test"], new["classnames"])
    for root in args.eval_data:  # <root>/[test/]<class>/<image>, named after its folder
        root = os.path.normpath(root).removesuffix(f"{os.sep}test")
        folder = f"{root}/test" if os.path.isdir(f"{root}/test") else root
        name = os.path.basename(root) if os.path.basename(root) not in test_sets else root
        test_sets[name] = read_image_folder(folder, f"{root}/classnames.txt")
    check_images(part["train"] if shots else [])  # the shots decoded; no shots: train unused
    for items, _ in test_sets.values():
        check_images(items, full=False)
    name = os.path.basename(args.split_file or os.path.normpath(args.data))
    return name.removesuffix(".json").replace("split_zhou_", ""), part, test_sets


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) items -> (transformed image, label); grayscale, RGBA and palette become RGB."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.transform(Image.open(self.items[i][0]).convert("RGB")), self.items[i][1]


def train_transform(n_px, min_scale=0.08):
    """CoOp's: random resized crop (area min_scale-1, bicubic), flip, CLIP's normalisation."""
    crop = T.RandomResizedCrop(n_px, (min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    flip, normalize = T.RandomHorizontalFlip(), T.Normalize(CLIP_MEAN, CLIP_STD)
    return T.Compose([crop, flip, T.ToTensor(), normalize])


def test_transform(n_px):
    """CLIP's own preprocess: shorter side to n_px (bicubic), centre crop, CLIP's normalisation."""
    resize = T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([resize, T.CenterCrop(n_px), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def make_loader(items, transform, batch_size, workers, device, **options):
    """Batches of `items` read by `workers` processes, pinned for CUDA (options: DataLoader's)."""
    pin = torch.device(device).type == "cuda"
    return torch.utils.data.DataLoader(ImageDataset(items, transform), batch_size,
                                       num_workers=workers, pin_memory=pin, **options)  # fmt: skip


def load_clip(backbone, device, precision):
    """CLIP by name or path, frozen, eval mode, fp32 unless fp16. openai-clip 1.0.1 misreads a plain
    state-dict file (its TorchScript attempt does not rewind it): read here with build_model."""
    try:
        with warnings.catch_warnings():  # torch deprecates torch.jit.load, tried by clip.load
            warnings.simplefilter("ignore")
            model = clip.load(backbone, device="cpu", jit=False)[0].float()
    except Exception as e:  # unknown names: clip.load's message lists the known ones
        if not os.path.isfile(backbone):
            fail(f"could not load {backbone} ({e}); offline, pass the downloaded file's path")
        try:
            state_dict = torch.load(backbone, map_location="cpu", weights_only=True)
            model = clip.model.build_model(dict(state_dict)).float()
            model.load_state_dict(state_dict)  # build_model rounds to fp16: undo that
        except Exception as e2:
            fail(f"{backbone}: not a CLIP checkpoint (TorchScript archive or state dict): {e2}")
    if precision == "fp16":  # CLIP's own fp16 layout (LayerNorm and embeddings stay fp32)
        clip.model.convert_weights(model)
    return model.requires_grad_(False).eval().to(device)


def autocast(device, precision):  # --precision amp: fp16 on CUDA, bf16 on the CPU; else nothing
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, half) if precision == "amp" else nullcontext()


def tokenize(clip_model, texts):
    return clip.tokenize(texts, context_length=clip_model.context_length)


@torch.no_grad()
def encode_images(encode, loader, device, precision):
    """L2-normalised image features (N, D) in fp32 and labels (N,) of a whole test set."""
    features, labels = [], []
    for images, y in loader:
        with autocast(device, precision):
            features.append(F.normalize(encode(images.to(device)).float(), dim=-1))
        labels.append(y.to(device))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def zeroshot_classifier(clip_model, classnames, templates):
    """[CLIP] one weight per class: the normalised mean of its templates' normalised features, by
    CLIP's own encode_text (77 positions): (n_cls, D) in fp32."""
    per_template = []
    for t in templates:
        tokens = tokenize(clip_model, [t.format(c) for c in classnames])
        tokens = tokens.to(clip_model.positional_embedding.device)
        per_template.append(F.normalize(clip_model.encode_text(tokens).float(), dim=-1))
    return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)  # (n_cls, D)


def accuracy(logits, labels):  # top-1, in percent of the whole set (as the papers)
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


def save(path, obj):
    """Write a str, a .json path's object or torch.save's, atomically (temporary file, rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"  # a crash leaves at most this file, never half of `path`
    if isinstance(obj, str) or path.endswith(".json"):
        text = obj if isinstance(obj, str) else json.dumps(obj, indent=2)  # fails before writing
        with open(tmp, "w") as f:
            f.write(text)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def parse(parser, argv, presets, method, learned=True):
    """Add the shared options and parse; an option left out takes `method(args)`'s preset (--help
    lists them), so `method` may read only options that have a default of their own."""
    add = parser.add_argument
    add("--seed", type=int, default=1, help="the papers report seeds 1, 2, 3")
    fp16 = "amp: mixed precision; fp16: CLIP's own fp16 weights; default: amp on CUDA, else fp32"
    add("--precision", choices=["fp32", "amp", "fp16"], help=fp16)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cpu, ...")
    add("--workers", type=int, default=4, help="data-loading processes")
    add("--out", help="run folder (default runs/<method>/<dataset>/...)")
    if learned:
        add("--load", help="checkpoint.pt of learned parameters to start from")
        add("--eval-only", action="store_true", help="evaluate --load without training")
        add("--resume", action="store_true", help="continue the run in --out after its last epoch")
    for action in parser._actions:  # --help shows every default
        values = {m: p[action.dest] for m, p in presets.items() if action.dest in p}
        if values:  # --help lists each method's; unset until parsed (absent: no preset here)
            show = lambda v: v.__doc__ if callable(v) else repr(v)
            tag = lambda m: m if len(presets) > 1 else "default"  # one method: the default
            action.help += " (" + "; ".join(f"{tag(m)}: {show(v)}" for m, v in values.items()) + ")"
            action.default = argparse.SUPPRESS
        elif action.default not in (None, [], argparse.SUPPRESS) and action.default is not False:
            action.help = f"{action.help or ''} (default: {action.default!r})"
    args = parser.parse_args(argv)
    for key, value in presets[method(args)].items():
        if not hasattr(args, key):
            setattr(args, key, value(args) if callable(value) else value)
    args.precision = args.precision or ("amp" if args.device.startswith("cuda") else "fp32")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args


def finish_run(run_dir, args, method, dataset, zero_shot, acc, **extra):
    """metrics.json: zero-shot and the method's accuracy per test set, H, how and where it ran."""
    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    metrics = dict(method=method, backbone=args.backbone, dataset=dataset, seed=args.seed)
    metrics.update(shots=getattr(args, "shots", 0), zero_shot=zero_shot, accuracy=acc)
    if "new" in acc:  # [CoCoOp] H, the harmonic mean of base and new: 2 base new / (base + new)
        base, new = acc["test"], acc["new"]
        metrics["harmonic_mean"] = 2 * base * new / (base + new)
    where = f"{torch.cuda.get_device_name(device) if cuda else 'cpu'} ({os.cpu_count()} cores)"
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None
    metrics.update(extra, peak_mib=peak, device=where, torch=torch.__version__)
    save(os.path.join(run_dir, "metrics.json"), metrics)
    shown = [" ".join(f"{k}={v:.2f}" for k, v in d.items()) for d in (acc, zero_shot)]
    hm = f" H={metrics['harmonic_mean']:.2f}" if "new" in acc else ""
    print(f"{method} {dataset} shots={metrics['shots']} seed={args.seed}: accuracy {shown[0]}{hm}"
          f" | zero-shot {shown[1]} | {run_dir}/metrics.json")  # fmt: skip
    return metrics


# --- end shared: appendix ---


if __name__ == "__main__":
    main(parse_args())
