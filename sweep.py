"""The papers' protocols as one shell command per run, runners for them, the papers' tables.

A method file runs one experiment: one dataset, one shot count, one seed. The papers report grids
of them (CoOp's few-shot figure: 11 datasets x 5 shot counts x 3 seeds = 165 runs per method), and
TPT-style methods tune on every test image (50,000 on ImageNet). sweep.py handles the grid. It
talks to the method files only through their command line and their metrics.json (and args.json),
and imports none of them (they are run as commands).

  plan      a protocol -> one shell command per line, each with its own --out folder (the same
            lines every time) and the protocol's paper settings
  run       a plan file on this machine: N job slots (one GPU each), finished runs skipped (a
            killed sweep resumes), stage-2 runs after the runs they load, a log per run folder;
            --index K runs plan line K only (a SLURM array task or a GNU parallel job)
  slurm     a plan -> an sbatch array script: one task per plan line (`run --index`), a throttle,
            --requeue and SIGUSR1 before the time limit (the run checkpoints; the task requeues)
  parallel  a plan -> GNU parallel command lines (--joblog, --resume-failed, a GPU per job slot)
  table     every metrics.json under folders: mean +- population std over seeds per method (and
            variant: its other options) x dataset x shots x backbone, base/new/H, domain columns,
            sharded test-time runs merged, the papers' published numbers side by side; with
            --plan, which of the plan's runs are missing or failed
  plot      the few-shot curves and the base-to-new bars as PNG files (needs matplotlib)
  fgvc-split  CoOp's FGVCAircraft lists -> split_zhou_FGVCAircraft.json (CoOp ships none)

Protocols (--datasets, --shots, --seeds narrow or change them; options after `--` go to every
command of the method, after the plan's own, so that they win):
  few-shot               the 11 datasets x shots 1 2 4 8 16 x seeds 1 2 3 (CoOp, ProGrad, Tip:
                         RN50, the files' defaults)
  base-to-new            the 11 datasets x 16 shots x seeds 1 2 3, trained on the base half of the
                         classes (--subsample base: the run also reports new and H). CLIP, CoOp and
                         CoCoOp on ViT-B/16 (CoCoOp's Table 1; CoOp there: 4 vectors from "a photo
                         of a"); ProGrad: RN50, 4 shots, 100 epochs (its base2new scripts)
  cross-dataset          ImageNet, 16 shots x seeds 1 2 3 (stage 1); the learned parameters
                         tested on each of the 10 other datasets: --load ... --eval-only (stage 2)
  domain-generalisation  the same ImageNet training, tested on ImageNet-V2, -Sketch, -A and -R
                         (--eval-data); test-time methods tune on ImageNet itself too (TPT Table 1)
Zero-shot CLIP (zeroshot.py) runs once per dataset: no shots, no seeds. Test-time methods
(promptsync.py) tune on the target datasets' test images, split into --shards N commands
(--shard K/N) that `table` merges; the fine-grained sets get --setting fine-grained (TPT's AugMix,
PromptAlign's lr 5e-4; ImageNet and its shifts keep dg: no AugMix, lr 4e-2); with MaPLe prompts
(--loss align or sync, or `--loss tpt --load source` for TPT+MaPLe) a source stage on 16-shot
ImageNet comes first (stage 1). Their plans use seed 1 (TPT reports one run). The methods that
save checkpoints (coop, prograd, vpt; promptsync's test stage) get --resume on every line: a run
folder without a checkpoint starts fresh, a stopped run continues.

Data: CoOp's DATASETS.md folders and split files under one --root (DATASETS below). ImageNet and
its four shifted test sets are ImageFolder roots with a classnames.txt (see DATASETS, VARIANTS).
FGVCAircraft: python sweep.py fgvc-split DATA/fgvc_aircraft

Requirements: the method files need torch, clip, numpy and pillow only; `plot` also needs
matplotlib (requirements.txt), imported by that command alone.

Examples (docs/protocols.md has the whole walk-through, the cluster path included)
  python sweep.py plan few-shot --method coop.py --root DATA > plan.txt
  python sweep.py run plan.txt --workers 2           # one GPU per job slot
  python sweep.py table --plan plan.txt > table.md   # or: table runs/sweep --format csv
  python sweep.py plot runs/sweep                    # fewshot.png, base-to-new.png
  python sweep.py plan base-to-new --method coop.py --root DATA -- --cocoop
  python sweep.py slurm plan.txt --partition gpu --setup 'source .venv/bin/activate' > job.sh
  sbatch job.sh
"""

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from tqdm import tqdm  # a dependency of the clip package

try:
    import fcntl  # POSIX: a lock per run folder, so two runners never run one command twice
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

tqdm.monitor_interval = 0  # no monitor thread: the runner forks its commands from one thread


# ------------------------------------------------------------------------------------------------
# The datasets: CoOp's DATASETS.md layout under one --root
# ------------------------------------------------------------------------------------------------
# name (as the split file names it, the papers' order): (folder under --root, image root inside
# it, CoOp's split file). ImageNet has no split file: imagenet/train/<wnid>/, imagenet/test/<wnid>/
# (the official validation set, which the papers test on; CoOp keeps it as images/val: link it)
# and imagenet/classnames.txt ('<wnid> <class name>' per line). CoOp reads FGVCAircraft from its
# variant lists and ships no split file for it: `python sweep.py fgvc-split DATA/fgvc_aircraft`
# writes split_zhou_FGVCAircraft.json from them (fgvc_split below).
DATASETS = {
    "ImageNet": ("imagenet", "", None),
    "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "OxfordPets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "OxfordFlowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "Food101": ("food-101", "images", "split_zhou_Food101.json"),
    "FGVCAircraft": ("fgvc_aircraft", "images", "split_zhou_FGVCAircraft.json"),
    "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "DescribableTextures": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "UCF101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
# ImageNet's shifted test sets (test only; 1000 classes, A and R 200 of them): (CoOp's folder, the
# image folder CoOp keeps inside it). The method files read <folder>/test and the classnames.txt
# CoOp keeps in <folder>, so the image folder is linked as test:
#   ln -s imagenetv2-matched-frequency-format-val DATA/imagenetv2/test
# ImageNetV2's class folders are numbered 0-999 (ImageNet's sorted wnids): its classnames.txt needs
# '<number> <class name>' lines.
VARIANTS = {
    "ImageNetV2": ("imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "ImageNetSketch": ("imagenet-sketch", "images"),
    "ImageNetA": ("imagenet-adversarial", "imagenet-a"),
    "ImageNetR": ("imagenet-rendition", "imagenet-r"),
}
# CoOp's hand-crafted template of each dataset (trainers/zsclip.py), for a method whose --template
# takes only a template's text (coop.py's zero-shot baseline); the variants use ImageNet's.
TEMPLATES = {
    "ImageNet": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "OxfordPets": "a photo of a {}, a type of pet.",
    "StanfordCars": "a photo of a {}.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "Food101": "a photo of {}, a type of food.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "SUN397": "a photo of a {}.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "UCF101": "a photo of a person doing {}.",
}
# What the plan must know of each method file; the rest is their common command line (--data,
# --split-file, --shots, --seed, --subsample, --eval-data, --load, --eval-only, --out).
#   template: "name": --template takes CoOp's dataset names (zeroshot.py; prograd.py maps them to
#             its reordered templates); "text": only a template's text (coop.py's zero-shot
#             baseline); absent: the file picks it from the dataset, or it is part of the method.
#   shots False: no --shots, no seeds (deterministic); test_time: tunes on the test images;
#   resume: saves a checkpoint after every epoch and continues from it with --resume (which starts
#   fresh in a folder without a checkpoint), so every line of its plans carries --resume.
METHODS = {
    "zeroshot": dict(template="name", shots=False),
    "coop": dict(template="text", resume=True),
    "prograd": dict(template="name", resume=True),
    "adapter": dict(),
    "vpt": dict(resume=True),
    "promptsync": dict(test_time=True, resume=True),
}
PROTOCOLS = ["few-shot", "base-to-new", "cross-dataset", "domain-generalisation"]
PAPER_SHOTS = [1, 2, 4, 8, 16]
PAPER_SEEDS = [1, 2, 3]


def fail(message):
    raise SystemExit(f"error: {message}")


def norm(name):
    return re.sub(r"[-_ ]", "", name.lower())


def paper_name(name):
    """A dataset's name in the papers' tables (from its name, CoOp's folder, the image folder of a
    variant, or a metrics.json's name for it); other names are kept."""
    key = norm(os.path.basename(os.path.normpath(name)))
    for known, (folder, images, *_) in {**DATASETS, **VARIANTS}.items():
        if key in (norm(known), norm(folder)) or (images != "images" and key == norm(images)):
            return known
    return name


def option(tokens, name):
    """The value of option `name` in a command's tokens (--name value or --name=value), or None."""
    for i, token in enumerate(tokens):
        if token == name and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith(name + "="):
            return token[len(name) + 1 :]
    return None


# ------------------------------------------------------------------------------------------------
# plan: a protocol -> one command per run
# ------------------------------------------------------------------------------------------------
def dataset_options(root, name, train=True):
    """-> (the data options of a dataset, [(path, hint)] that must exist). `name` is a dataset of
    DATASETS or VARIANTS, or the path of an ImageFolder root (train/, test/)."""
    join = os.path.join
    if name in DATASETS:
        folder, images, split = DATASETS[name]
        top = join(root, folder)
        if split is None:  # ImageNet
            hint = (
                f"ImageNet is read as {top}/train/<wnid>/, {top}/test/<wnid>/ (the official val "
                f"set; from CoOp's layout: ln -s images/train {top}/train; ln -s images/val "
                f"{top}/test) and {top}/classnames.txt ('<wnid> <class name>' lines)"
            )
            needs = [join(top, "test"), join(top, "classnames.txt")]
            return ["--data", top], [(p, hint) for p in ([join(top, "train")] * train + needs)]
        hint = f"see CoOp's DATASETS.md: {name} is {top}/{images or ''} and {top}/{split}"
        if name == "FGVCAircraft":
            hint = (
                f"CoOp ships no split file for FGVCAircraft: python sweep.py fgvc-split {top} "
                "writes it from CoOp's images_variant_{train,val,test}.txt and variants.txt"
            )
        image_root = join(top, images) if images else top
        return (
            ["--data", image_root, "--split-file", join(top, split)],
            [(image_root, hint), (join(top, split), hint)],
        )
    if name in VARIANTS:
        folder, images = VARIANTS[name]
        top = join(root, folder)
        hint = (
            f"{name}: CoOp keeps its images in {folder}/{images} next to classnames.txt; "
            f"link them as {folder}/test: ln -s {images} {top}/test"
        )
        return ["--data", top], [(join(top, "test"), hint), (join(top, "classnames.txt"), hint)]
    hint = "an ImageFolder root: <root>/train/<class>/<image>, <root>/test/<class>/<image>"
    return ["--data", name], [(os.path.join(name, s), hint) for s in ["train"] * train + ["test"]]


def resolve_dataset(spec):
    """--datasets/--source value -> a name of DATASETS/VARIANTS (any case, or CoOp's folder), or
    the path of an ImageFolder root."""
    name = paper_name(spec)
    if name in DATASETS or name in VARIANTS:
        return name
    if os.sep in spec or os.path.isdir(spec):  # a path: an ImageFolder root
        return spec
    known = ", ".join([*DATASETS, *VARIANTS])
    fail(
        f"unknown dataset {spec!r}: use one of {known} (any case, or CoOp's folder name), or "
        "the path of an ImageFolder root"
    )


def label(name):
    """A dataset's folder name in the run folders: its name, or an ImageFolder root's basename."""
    known = name in DATASETS or name in VARIANTS
    return name if known else os.path.basename(os.path.normpath(name))


def run_tag(stem, extras):
    """The run folders' name for a method and its options (the same options, the same name):
    coop, coop_cocoop_backbone_ViT-B-16, coop_backbone_clip_rn (toy/clip_rn.pt), ...; --workers
    and --device do not change results."""
    kept, skip = [], False
    for token in extras:
        if skip:
            skip = False
        elif token.split("=")[0] in ("--workers", "--device"):
            skip = "=" not in token
        elif "/" in token and (token[0] in "/.~" or os.path.splitext(token)[1]):
            kept.append(os.path.splitext(os.path.basename(token))[0])  # a file: its name
        else:
            kept.append(token.lstrip("-"))
    tag = re.sub(r"[^A-Za-z0-9_.=-]+", "-", "_".join([stem] + kept)).strip("-")
    if len(tag) > 60:  # a long option list (paths): a readable start and a hash of the rest
        tag = tag[:50] + "-" + hashlib.sha1(" ".join(kept).encode()).hexdigest()[:8]
    return tag


def method_file(method):
    """A metrics.json's method name -> the stem of the file that ran it."""
    stems = {"cocoop": "coop", "tip": "adapter", "tip-f": "adapter", "clip-adapter": "adapter"}
    stems.update(dict.fromkeys(["tpt", "tpt_maple", "promptalign", "maple"], "promptsync"))
    stems["linear-probe"] = "adapter"
    if method.startswith("vpt"):
        return "vpt"
    return stems.get(method, method.split("-")[0])


def protocol_settings(stem, extras, protocol):
    """The backbone and context of the paper behind a protocol, where the method file's default
    is another paper's -> {option: value}."""
    if stem == "coop" and "--cocoop" in extras:  # CoCoOp: ViT-B/16 in all its tables
        return {"--backbone": "ViT-B/16"}
    if stem == "coop" and protocol == "base-to-new":  # CoOp in CoCoOp's Table 1 (vit_b16_ctxv1)
        return {"--backbone": "ViT-B/16", "--ctx-init": "a photo of a"}
    if stem in ("coop", "zeroshot") and protocol != "few-shot":  # CoCoOp Tables 1-3, TPT's rows
        return {"--backbone": "ViT-B/16"}
    return {}


def paper_settings(stem, extras, dataset, shots, protocol):
    """The papers' per-run settings that the method files leave to the caller -> {option: value}
    (True for a flag). `table` uses the same rules to tell a paper setting from a variant."""
    settings, cocoop = {}, "--cocoop" in extras
    if stem in ("coop", "prograd") and dataset == "ImageNet" and not cocoop:
        settings["--epochs"] = "50"  # CoOp's ImageNet configs (*_ep50) at every shot count
    elif stem == "prograd" and protocol == "base-to-new":
        settings["--epochs"] = "100"  # ProGrad's base2new_train_prograd.sh: rn50_ep100, 4 shots
    hard = dataset in ("OxfordFlowers", "DescribableTextures", "EuroSAT") and (shots or 0) >= 8
    if stem == "prograd" and hard:  # ProGrad's scripts: lambda 0.8 at 8 and 16 shots on these
        settings["--lam"] = "0.8"
    if stem == "adapter" and option(extras, "--method") == "tip-f" and dataset == "EuroSAT":
        settings["--epochs"] = "100"  # Tip-Adapter-F's EuroSAT config (20 elsewhere)
    if stem == "promptsync" and option(extras, "--stage") != "source":
        fine = dataset in DATASETS and dataset != "ImageNet"  # the fine-grained sets
        if fine:  # TPT's code: AugMix on all but ImageNet's sets; PromptAlign's configs: lr 5e-4
            settings["--setting"] = "fine-grained"  # there, 4e-2 on ImageNet and its shifts (dg)
    return settings


def as_options(settings, extras):
    """{option: value} -> tokens, leaving out the options the user sets after `--`."""
    given = {t.split("=")[0] for t in extras if t.startswith("--")}
    tokens = []
    for name, value in settings.items():
        if name not in given:
            tokens += [name] if value is True else [name, str(value)]
    return tokens


def template_options(rule, dataset):
    if rule == "name" and dataset in DATASETS:
        return ["--template", dataset]
    if rule == "text" and dataset in TEMPLATES:
        return ["--template", TEMPLATES[dataset]]
    return []


class Planner:
    """Builds one protocol's commands: [(stage, tokens)] and the data paths they need."""

    def __init__(self, protocol, method, root, extras, base, python):
        self.protocol, self.method, self.root, self.base = protocol, method, root, base
        self.stem = os.path.splitext(os.path.basename(method))[0]
        self.rules, self.extras, self.python = METHODS.get(self.stem, {}), list(extras), python
        self.commands, self.needs = [], []
        # `-- --loss tpt --load source`: TPT on the source stage's MaPLe prompts (TPT+MaPLe)
        self.on_source = option(self.extras, "--load") == "source"
        if self.on_source:
            i = self.extras.index("--load")
            del self.extras[i : i + 2]

    def data(self, name, train):
        opts, paths = dataset_options(self.root, name, train)
        self.needs.extend(paths)
        return opts + template_options(self.rules.get("template"), name)

    def training(self, name, k, s, prefix="", train=True):
        """One run's data, shots and seed options, and its folder."""
        opts = self.data(name, train)
        opts += ["--shots", str(k)] * (k is not None) + ["--seed", str(s)] * (s is not None)
        leaf = f"{prefix}{k}shot_seed{s}" if k is not None else f"{prefix}0shot"
        return opts, os.path.join(self.base, label(name), leaf)

    def add(self, stage, opts, folder, dataset=None, k=None, resume=True):
        """A command: its own options, the papers' settings, --resume, the user's, its --out."""
        settings = protocol_settings(self.stem, self.extras, self.protocol)
        if dataset is not None:
            settings.update(paper_settings(self.stem, self.extras, dataset, k, self.protocol))
        if resume and self.rules.get("resume") and "--eval-only" not in opts:
            settings["--resume"] = True
        paper = as_options(settings, self.extras)
        self.commands.append((stage, [self.python, self.method, *opts, *paper, *self.extras]))
        self.commands[-1][1].extend(["--out", folder])

    def trained(self, targets, source, shots, seeds):
        """Methods that learn from labelled images (or zero-shot CLIP): stage 1 trains (few-shot,
        base-to-new, or on the source), stage 2 tests the cross-dataset targets."""
        learns, protocol = self.rules.get("shots", True), self.protocol
        if protocol == "domain-generalisation" or (protocol == "cross-dataset" and learns):
            names = [source]  # trained there; then tested on the shifts, or on the others
        elif protocol == "cross-dataset":  # zero-shot CLIP: every dataset on its own
            names = [source] + targets
        else:
            names = targets
        eval_data = []
        if protocol == "domain-generalisation":  # the shifted test sets, in the same run
            for name in targets:
                opts, paths = dataset_options(self.root, name, train=False)
                eval_data.append(opts[1])
                self.needs.extend(paths)
        for name, k, s in [(n, k, s) for n in names for k in shots for s in seeds]:
            opts, folder = self.training(name, k, s)
            opts += ["--subsample", "base"] * (protocol == "base-to-new")
            opts += ["--eval-data", *eval_data] if eval_data else []
            self.add(1, opts, folder, name if learns else None, k)
        if protocol == "cross-dataset" and learns:  # the learned parameters on every other set
            for name, k, s in [(n, k, s) for n in targets for k in shots for s in seeds]:
                load = os.path.join(self.training(source, k, s)[1], "checkpoint.pt")
                opts, folder = self.training(name, k, s, f"from_{label(source)}_", False)
                self.add(2, opts + ["--load", load, "--eval-only"], folder)

    def test_time(self, targets, source, shots, seeds, shards):
        """Per-image tuning on the targets' test sets, in shards; with MaPLe prompts, a source
        stage on 16-shot ImageNet first (MaPLe's prompts and token statistics)."""
        with_source = option(self.extras, "--loss") in ("align", "sync") or self.on_source
        for k, s in [(k, s) for k in (shots if with_source else [None]) for s in seeds]:
            load, prefix = [], ""
            if with_source:
                opts, folder = self.training(source, k, s, "source_")
                shifted = [t for t in targets if t in VARIANTS]
                if self.protocol == "domain-generalisation" and shifted:  # MaPLe on the shifts
                    opts += ["--eval-data"]
                    opts += [dataset_options(self.root, t, False)[0][1] for t in shifted]
                self.add(1, ["--stage", "source", *opts], folder, resume=False)
                load = ["--load", os.path.join(folder, "checkpoint.pt")]
                prefix = f"from_{label(source)}_{k}shot_"
            for name, K in [(n, K) for n in targets for K in range(shards)]:
                opts = self.data(name, False) + ["--seed", str(s), "--shard", f"{K}/{shards}"]
                leaf = f"{prefix}seed{s}" + (f"_shard{K}of{shards}" if shards > 1 else "")
                folder = os.path.join(self.base, label(name), leaf)
                self.add(2 if with_source else 1, opts + load, folder, name)


def plan_commands(
    protocol,
    method,
    root="DATA",
    datasets=None,
    shots=None,
    seeds=None,
    extras=(),
    out="runs/sweep",
    shards=4,
    source="ImageNet",
    tag=None,
    python="python",
):
    """-> ([(stage, command tokens)], [(path, hint)] the commands need). Stage-2 commands --load the
    checkpoint of a stage-1 run. Every command ends with its own --out:
    <out>/<protocol>/<tag>/<dataset>/<shots>shot_seed<seed> (cross-dataset tests:
    from_<source>_<shots>shot_seed<seed>; test-time shards: seed<seed>_shard<K>of<N>)."""
    if protocol not in PROTOCOLS:
        fail(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    stem, extras = os.path.splitext(os.path.basename(method))[0], list(extras)
    rules = METHODS.get(stem, {})
    test_time, learns = rules.get("test_time", False), rules.get("shots", True)
    if test_time and protocol in ("few-shot", "base-to-new"):
        fail(
            f"{method} tunes at test time without training images: plan cross-dataset or "
            "domain-generalisation"
        )
    if shards < 1:
        fail(f"--shards {shards}: use 1 or more")
    source = resolve_dataset(source)
    default = dict.fromkeys(["few-shot", "base-to-new"], list(DATASETS))
    default["cross-dataset"] = [d for d in DATASETS if d != source]  # the 10 others
    default["domain-generalisation"] = ["ImageNet"] * test_time + list(VARIANTS)  # TPT Table 1
    targets = [resolve_dataset(d) for d in datasets] if datasets else default[protocol]
    trained_on = targets if protocol in ("few-shot", "base-to-new") else [source] * learns
    if any(d in VARIANTS for d in trained_on):
        fail(f"{[d for d in trained_on if d in VARIANTS]}: test sets only, nothing to train on")
    if protocol == "domain-generalisation" and not test_time:  # --eval-data: ImageFolder roots
        bad = [d for d in targets if d in DATASETS]
        if bad:
            fail(f"domain-generalisation tests on ImageFolder roots (--eval-data), not {bad}")
    shots = list(shots or default_shots(stem, protocol)) if learns else [None]
    seeds = list(seeds or ([1] if test_time else PAPER_SEEDS)) if learns else [None]
    base = os.path.join(out, protocol, tag or run_tag(stem, extras))
    planner = Planner(protocol, method, root, extras, base, python)
    if test_time:
        planner.test_time(targets, source, shots, seeds, shards)
    else:
        planner.trained(targets, source, shots, seeds)
    check_clash(planner.commands, planner.extras)
    return sorted(planner.commands, key=lambda c: c[0]), planner.needs


def default_shots(stem, protocol):
    if protocol == "few-shot":
        return PAPER_SHOTS
    if stem == "prograd" and protocol == "base-to-new":
        return [4]  # ProGrad's base2new_train_prograd.sh: SHOTS=4
    return [16]


# the options a plan sets as the papers' settings, which `--` may change (the rest it may not)
PAPER_OPTIONS = {"--epochs", "--lam", "--template", "--backbone", "--ctx-init", "--lr", "--setting"}


def check_clash(commands, extras):
    """Options the plan sets for every run (data, shots, seed, folders) cannot come from `--`."""
    planned = {t.split("=")[0] for _, c in commands for t in c[2 : len(c) - len(extras) - 2]}
    planned = {t for t in planned if t.startswith("--")} | {"--out"}
    given = {t.split("=")[0] for t in extras}
    clash = sorted(planned & given - PAPER_OPTIONS - {"--resume"})
    if clash:
        fail(f"{', '.join(clash)} after '--': the plan sets these for every run; use its options")


def missing_paths(needs):
    """The needed paths that do not exist, each once, with what to do."""
    missing = {}
    for path, hint in needs:
        if not os.path.exists(path) and path not in missing:
            missing[path] = hint
    return missing


# ------------------------------------------------------------------------------------------------
# run: the commands of a plan on this machine, or one of them (a SLURM or GNU parallel task)
# ------------------------------------------------------------------------------------------------
def visible_gpus():
    """GPU ids for CUDA_VISIBLE_DEVICES: the ones it already lists, else nvidia-smi's GPU indices
    (not its -L lines, which list MIG devices too), else torch's count; [] (CPU) when none."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    query = ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]
    try:
        found = subprocess.run(query, capture_output=True, text=True, timeout=60)
        if found.returncode == 0:
            return [line.strip() for line in found.stdout.splitlines() if line.strip().isdigit()]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def _die_with_parent():
    """In the child before exec (Linux): SIGKILL it when the runner dies, even by SIGKILL, so a
    killed sweep leaves no run behind that would race the restarted one."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


try:  # looked up once here; the child only calls it
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover
    _PRCTL = None


class Job:
    """One plan line: its tokens, run folder, log, and the run folders it needs first."""

    def __init__(self, number, line):
        try:
            self.tokens = shlex.split(line, comments=True)
        except ValueError as e:
            fail(f"plan line {number}: {e}: {line}")
        self.line, self.number, self.out = line, number, option(self.tokens, "--out")
        if not self.out:
            fail(f"plan line {number} has no --out, so a finished run cannot be told: {line}")
        self.out = os.path.normpath(self.out)
        self.log = os.path.join(self.out, "run.log")
        # a run that --loads (or --merges) another run's files starts after that run
        needed = [option(self.tokens, "--load")] + self.merged()
        self.after = {
            os.path.normpath(os.path.dirname(p) if p.endswith(".pt") else p) for p in needed if p
        }
        # a plain command is started directly (signals reach it); shell syntax (&&, pipes, $VAR,
        # a VAR=value prefix) goes through sh -c
        self.shell = bool(re.search(r"[|&;<>()$`*?~\[\]!\n]", line)) or "=" in self.tokens[0]

    def merged(self):
        i = self.tokens.index("--merge") + 1 if "--merge" in self.tokens else len(self.tokens)
        folders = []
        while i < len(self.tokens) and not self.tokens[i].startswith("--"):
            folders, i = folders + [self.tokens[i]], i + 1
        return folders

    def finished(self):
        return os.path.isfile(os.path.join(self.out, "metrics.json"))


def read_plan(path):
    """A plan file ('-': stdin) -> its command lines (blank lines and # comments left out); plan
    line K (run --index K, array task K) is the K-th of them."""
    if path != "-" and not os.path.isfile(path):
        fail(f"{path}: plan file not found; write one with: python sweep.py plan ... > {path}")
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def load_jobs(commands):
    jobs = [Job(i, line) for i, line in enumerate(commands, 1)]
    outs = [j.out for j in jobs]
    if len(set(outs)) < len(outs):
        twice = sorted({o for o in outs if outs.count(o) > 1})
        fail(f"two commands of the plan write to the same --out: {twice[:3]}")
    return jobs


class Running:
    """A started command: its process, the log it writes, the run folder's lock it holds."""

    def __init__(self, job, process, log, lock, slot):
        self.job, self.process, self.log, self.lock, self.slot = job, process, log, lock, slot
        self.started = time.time()

    def signal(self, signum):
        """To the command itself (a shell line: its whole process group)."""
        try:
            if self.job.shell:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)
        except ProcessLookupError:
            pass

    def close(self, stopped):
        """-> "ok", "stopped" (by SIGUSR1: a rerun resumes it) or "failed"."""
        code, job = self.process.returncode, self.job
        if code == 0 and not job.finished():
            self.log.write(f"sweep: the command ended without writing {job.out}/metrics.json\n")
        self.log.close()
        self.lock.close()  # the lock goes when the last process holding it ends
        return "ok" if code == 0 and job.finished() else "stopped" if stopped else "failed"


def start(job, env, slot):
    """Start a plan line in its run folder, holding the folder's lock -> a Running, or "busy" when
    another runner holds the lock, or "failed" when the command cannot start."""
    os.makedirs(job.out, exist_ok=True)
    lock = open(os.path.join(job.out, ".sweep.lock"), "a")
    if fcntl is not None:
        try:  # held by the command too (inherited): released when it ends or dies
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return "busy"
    log = open(job.log, "a")  # a resumed run's log follows its earlier attempts
    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {job.line}\n")
    log.flush()
    try:
        process = subprocess.Popen(
            ["/bin/sh", "-c", job.line] if job.shell else job.tokens,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopped as a whole
            pass_fds=(lock.fileno(),),
            preexec_fn=_die_with_parent,
        )
    except OSError as e:
        log.write(f"sweep: cannot start the command: {e}\n")
        log.close()
        lock.close()
        return "failed"
    return Running(job, process, log, lock, slot)


def slot_env(slot, gpus, workers):
    """The environment of a job slot: one GPU per slot; on the CPU, a share of the cores."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    elif "OMP_NUM_THREADS" not in os.environ:  # N runs side by side share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


BAD = ("failed", "blocked", "busy", "stopped")  # a run that needs one of these is not started


def next_ready(todo, state):
    """-> (the first job whose runs are done, or None; the jobs blocked by a run that is not)."""
    blocked = []
    for j in todo:
        if state[j.out] != "todo":
            continue
        before = [state.get(a) for a in j.after]  # None: not in this plan
        if any(s in BAD for s in before):
            state[j.out] = "blocked"
            blocked.append(j)
        elif all(s in (None, "ok", "finished") for s in before):
            return j, blocked
    return None, blocked


class Stop:
    """What the runner's signal handlers decided: stop starting runs (SIGUSR1: the running ones
    get it and end, a rerun resumes them; SIGINT, SIGTERM: they are terminated)."""

    def __init__(self, running):
        self.running, self.requested, self.handlers = running, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals: main thread only
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                self.handlers[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        for r in list(self.running.values()):  # SIGUSR1 ends the method; its checkpoint stays
            r.signal(signum if signum == signal.SIGUSR1 else signal.SIGTERM)
        if signum != signal.SIGUSR1:
            raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)


def run_plan(commands, workers=1, gpus=None, stream=None):
    """Run shell command lines, `workers` at a time, each in its own process with stdout and
    stderr in <out>/run.log; a command whose <out>/metrics.json exists is skipped, and one that
    --loads another's checkpoint waits for it. With GPUs each job slot gets one
    (CUDA_VISIBLE_DEVICES); on the CPU each gets cores/workers threads (OMP_NUM_THREADS). SIGUSR1
    is passed on to the running commands (they checkpoint and exit) and no other starts.
    -> {"ok", "failed", "finished" (before), "blocked" (a run it needs did not finish), "busy"
    (running in another runner), "stopped" (by SIGUSR1)}: lists of run folders."""
    stream, jobs = stream or sys.stderr, load_jobs(commands)
    gpus = visible_gpus() if gpus is None else gpus
    result = {k: [] for k in ("ok", "failed", "finished", "blocked", "busy", "stopped")}
    state = {j.out: "finished" if j.finished() else "todo" for j in jobs}
    result["finished"] = [j.out for j in jobs if state[j.out] == "finished"]
    todo = [j for j in jobs if state[j.out] == "todo"]
    where = f"GPUs {','.join(gpus)}" if gpus else "the CPU"
    print(
        f"{len(jobs)} runs: {len(result['finished'])} finished before, {len(todo)} to run with "
        f"{workers} workers on {where}",
        file=stream,
    )
    if gpus and workers > len(gpus):
        print(f"note: {workers} workers share {len(gpus)} GPUs", file=stream)
    bar = tqdm(total=len(todo), unit="run", file=stream, smoothing=0, disable=not todo)
    bar.stream = stream  # where record writes (tqdm.write's default is stdout)
    running = {}
    with Stop(running) as stop:
        while True:
            free = [s for s in range(workers) if s not in running]
            job, blocked = next_ready(todo, state) if free and not stop.requested else (None, [])
            for j in blocked:
                record(j, "blocked", result, state, bar, "not run (a run it needs did not finish)")
            if job is not None:
                r = start(job, slot_env(free[0], gpus, workers), free[0])
                state[job.out] = "running"
                if isinstance(r, Running):
                    running[free[0]] = r
                else:
                    record(job, r, result, state, bar)
                continue
            ended = [s for s, r in running.items() if r.process.poll() is not None]
            for slot in ended:
                r = running.pop(slot)
                record(r.job, r.close(stop.requested), result, state, bar, started=r.started)
            if not running and not ended:  # nothing runs, nothing can start
                break
            time.sleep(0.05 * (not ended))
    bar.close()
    stranded = [j for j in todo if state[j.out] == "todo"]  # waiting on a run never started
    for j in stranded:
        state[j.out] = "blocked" if not stop.requested else "todo"
        result["blocked"] += [j.out] * (not stop.requested)
    summarise(result, stream)
    return result


def record(job, status, result, state, bar, note=None, started=None):
    state[job.out] = status
    result[status].append(job.out)
    took = f" ({time.time() - started:.0f}s)" if started else ""
    messages = {
        "ok": f"done{took}: {job.out}",
        "busy": f"skipped, another runner is running it: {job.out}",
        "stopped": f"stopped by SIGUSR1{took} (rerun to resume): {job.out}",
        "failed": f"FAILED{took}, see {job.log}:\n  {job.line}",
    }
    text = note + f": {job.out}" if note else messages.get(status, f"{status}: {job.out}")
    bar.write(text, file=bar.stream)
    bar.update()


def summarise(result, stream):
    n_ok, n_failed = len(result["ok"]), len(result["failed"])
    summary = f"ran {n_ok + n_failed}: {n_ok} finished, {n_failed} failed"
    summary += f"; {len(result['finished'])} had finished before"
    if result["blocked"] or result["busy"]:
        summary += f"; {len(result['blocked'])} not run, {len(result['busy'])} running elsewhere"
    if result["stopped"]:
        summary += f"; {len(result['stopped'])} stopped by SIGUSR1 (rerun to resume)"
    print(summary, file=stream)
    for out in result["failed"]:
        print(f"failed: {out} (log: {os.path.join(out, 'run.log')})", file=stream)


def run_index(commands, index, gpus=None, stream=None):
    """Plan line `index` alone (a SLURM array task, a GNU parallel job): skipped when finished,
    not started when a run it loads has no metrics.json (each stage-2 task checks its own
    stage-1 run) -> the exit status: 0 finished (now or before), 1 not."""
    stream, jobs = stream or sys.stderr, load_jobs(commands)
    if not 1 <= index <= len(jobs):
        fail(f"--index {index}: the plan has {len(jobs)} commands (1 to {len(jobs)})")
    job, number = jobs[index - 1], {j.out: j.number for j in jobs}
    waiting = [a for a in sorted(job.after) if not os.path.isfile(os.path.join(a, "metrics.json"))]
    if waiting and not job.finished():
        lines = ", ".join(f"{a} (plan line {number.get(a, '?')})" for a in waiting)
        print(
            f"error: plan line {index} loads runs that have not finished: {lines}; run those "
            f"first (see their run.log), then this line again",
            file=stream,
        )
        return 1
    result = run_plan([job.line], 1, gpus, stream)
    return 0 if result["ok"] or result["finished"] or result["busy"] else 1


# ------------------------------------------------------------------------------------------------
# slurm, parallel: a plan as an sbatch array script, or as GNU parallel commands
# ------------------------------------------------------------------------------------------------
def plan_stages(commands):
    """-> (the plan lines (1-based) that load nothing from the plan, the lines that do)."""
    jobs = load_jobs(commands)
    outs = {j.out for j in jobs}
    second = [j.number for j in jobs if j.after & outs]
    return [j.number for j in jobs if j.number not in second], second


def ranges(numbers):
    """[1, 2, 3, 7, 9, 10] -> "1-3,7,9-10" (sbatch --array's syntax)."""
    spans, numbers = [], sorted(numbers)
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# The task body: a trap passes SLURM's SIGUSR1 (--signal=B:USR1@T, sent to this batch shell only)
# on to `sweep.py run`, which passes it to the method, which it ends (its last epoch's checkpoint,
# or every finished image's prediction, stays); the task then requeues itself (--requeue) and its
# next start runs the same plan line with --resume. `wait` returns early when the trap runs:
# wait again.
TASK_BODY = """stopping=0 child=""
trap 'stopping=1; kill -USR1 "$child" 2>/dev/null' USR1
{python} {sweep} run --index "$SLURM_ARRAY_TASK_ID" {plan} &
child=$!
wait "$child"; status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
if [ "$stopping" = 1 ]; then
    echo "stopped before the time limit; requeued: the run resumes from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def slurm_script(plan, commands, args):
    """-> the sbatch script of a plan: one array task per plan line (its --index), at most
    --throttle at a time; with two stages the array holds stage 1 and the header says how to
    submit stage 2 after it (afterany: each stage-2 task checks its own stage-1 run)."""
    first, second = plan_stages(commands)
    sweep, plan = os.path.abspath(__file__), os.path.abspath(plan)
    head = ["#!/bin/bash", f"# {len(commands)} runs of {plan}; written by sweep.py slurm"]
    if second:
        throttle = f"%{args.throttle}" if args.throttle else ""
        me = args.output or "THIS_SCRIPT"
        head += [
            "# Two stages: submit stage 1 (this array), then stage 2 after it:",
            f"#   jid=$(sbatch --parsable {me})",
            f"#   sbatch --array={ranges(second)}{throttle} --dependency=afterany:$jid {me}",
        ]
    head.append("# Resubmitting skips the finished runs; a requeued task resumes its run.")
    options = [f"--job-name={args.job_name}", f"--array={ranges(first)}"]
    options[-1] += f"%{args.throttle}" if args.throttle else ""
    options += [f"--partition={args.partition}"] * bool(args.partition)
    options += [f"--account={args.account}"] * bool(args.account)
    options += [f"--time={args.time}", f"--mem={args.mem}", f"--cpus-per-task={args.cpus}"]
    options += [f"--gres=gpu:{args.gpus}"] * (args.gpus > 0)
    options += ["--requeue", f"--signal=B:USR1@{args.signal_seconds}"]
    options += [f"--output={args.log_dir}/%x_%A_%a.out", *args.sbatch]
    body = ["set -u", f"cd {shlex.quote(os.getcwd())}", *args.setup]
    python = shlex.quote(args.python)
    task = TASK_BODY.format(python=python, sweep=shlex.quote(sweep), plan=shlex.quote(plan))
    lines = head + [f"#SBATCH {o}" for o in options] + [""] + body
    return "\n".join(lines) + "\n" + task


def parallel_commands(plan, commands, jobs, gpus, python="python"):
    """GNU parallel command lines for a plan: one job per plan line (`run --index`), a GPU per
    job slot, a joblog so that a rerun with --resume-failed runs only the failed and unrun ones;
    a second stage after the first."""
    sweep, plan = os.path.abspath(__file__), os.path.abspath(plan)
    pin = ""
    if gpus:  # job slot {%} (1..jobs) -> the ((slot - 1) mod n)-th of the GPUs
        pin = f"CUDA_VISIBLE_DEVICES=$(echo {','.join(gpus)} | cut -d, -f$(( ({{%}} - 1) % "
        pin += f"{len(gpus)} + 1 ))) "
    lines = []
    for n, stage in enumerate(plan_stages(commands), 1):
        if not stage:
            continue
        task = f"{pin}{shlex.join([python, sweep, 'run', '--index'])} {{}} {shlex.quote(plan)}"
        log = shlex.quote(f"{plan}.stage{n}.joblog")
        indices = " ".join(map(str, stage))
        lines.append(
            f"parallel --jobs {jobs} --joblog {log} --resume-failed {shlex.quote(task)} "
            f"::: {indices}"
        )
    return lines


# ------------------------------------------------------------------------------------------------
# table: every metrics.json under a folder, mean +- std over seeds, the papers' numbers beside
# ------------------------------------------------------------------------------------------------
def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def read_run(path):
    """A metrics.json (and the args.json beside it) -> a run, or None with a warning when the file
    is half-written or corrupt."""
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        accuracy = {k: float(v) for k, v in m["accuracy"].items() if isinstance(v, (int, float))}
        zero_shot = m.get("zero_shot") or {}
        run = dict(
            path=path,
            method=str(m["method"]),
            backbone=str(m.get("backbone", "?")),
            dataset=str(m["dataset"]),
            shots=int(m.get("shots") or 0),
            seed=int(m["seed"]),
            accuracy=accuracy,
            zero_shot={k: float(v) for k, v in zero_shot.items() if isinstance(v, (int, float))},
            merged=m.get("merged"),
        )
        if not accuracy:
            raise ValueError("no accuracy")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warn(f"{path}: skipped, not a complete metrics.json ({type(e).__name__}: {e})")
        return None
    try:
        with open(os.path.join(os.path.dirname(path), "args.json"), encoding="utf-8") as f:
            args = json.load(f)
    except (OSError, ValueError):
        args = {}
    args = args if isinstance(args, dict) else {}
    run["args"] = args
    base_to_new = "new" in accuracy or args.get("subsample") == "base"
    run["setting"] = "base-to-new" if base_to_new else ""
    if args.get("eval_only") and args.get("load"):
        run["setting"] = "cross-dataset"  # learned elsewhere, evaluated here
    K, _, N = str(args.get("shard") or "0/1").partition("/")
    run["shard"] = (int(K), int(N)) if K.isdigit() and N.isdigit() and int(N) > 1 else None
    run["variant"] = run_options(run)
    return run


# args.json entries that do not make another variant of a run: where its data and folder are, the
# row's own columns (backbone, shots, seed, the base-to-new and cross-dataset settings), how it
# was executed (workers, device, resumed, a shard of it)
NOT_OPTIONS = {"data", "split_file", "classnames", "out", "seed", "shots", "backbone", "method"}
NOT_OPTIONS |= {"dataset", "subsample", "eval_data", "load", "eval_only", "resume", "shard"}
NOT_OPTIONS |= {"merge", "workers", "device"}


def run_options(run):
    """The options of a run (args.json) that change its result -> sorted ((name, value), ...):
    every option but NOT_OPTIONS, unset ones (None, False) and the papers' per-dataset settings
    the plan gives (ImageNet's 50 epochs, ProGrad's lambda 0.8, the dataset's template, ...), so
    that a dataset's paper setting is no variant but --csc or --epochs 1 are."""
    args, dataset = run["args"], paper_name(run["dataset"])
    extras = ["--cocoop"] * bool(args.get("cocoop"))
    for key in ("method", "loss", "stage"):
        extras += [f"--{key}", args[key]] if isinstance(args.get(key), str) else []
    protocol = "base-to-new" if run["setting"] == "base-to-new" else "few-shot"
    stem = method_file(run["method"])
    planned = paper_settings(stem, extras, dataset, run["shots"], protocol)
    planned = {k[2:].replace("-", "_"): v for k, v in planned.items()}
    planned = {**shot_defaults(stem, extras, dataset, run["shots"]), **planned}
    planned["template"] = [dataset, TEMPLATES.get(dataset)]
    kept = []
    for key, value in sorted(args.items()):
        if key in NOT_OPTIONS or value is None or value is False or value == []:
            continue
        if key in planned and same_value(value, planned[key]):
            continue
        simple = isinstance(value, (str, int, float, bool))
        kept.append((key, value if simple else json.dumps(value, sort_keys=True)))
    return tuple(kept)


def shot_defaults(stem, extras, dataset, shots):
    """The method files' own defaults that follow the shot count, which args.json records resolved
    -> {name: value}: CoOp's 50/100/200 epochs for 1/2-4/8-16 shots (the files' epochs_for_shots:
    coop.py, prograd.py and CLIP-Adapter; not CoCoOp, nor ImageNet: 50 at every count) and the
    linear probe's min(shots, 4) validation shots. Not variants: a few-shot curve is one method at
    every shot count."""
    defaults, method = {}, option(extras, "--method")
    by_shots = stem in ("coop", "prograd") and "--cocoop" not in extras
    by_shots |= stem == "adapter" and method in (None, "clip-adapter")
    if by_shots and shots and dataset != "ImageNet":
        defaults["epochs"] = 50 if shots <= 1 else 100 if shots <= 4 else 200
    if stem == "adapter" and method == "linear-probe" and shots:
        defaults["val_shots"] = min(shots, 4)
    return defaults


def same_value(value, planned):
    if isinstance(planned, list):
        return any(same_value(value, p) for p in planned)
    try:
        return float(value) == float(planned)
    except (TypeError, ValueError):
        return str(value) == str(planned)


def variant_labels(runs):
    """A short label per run for its options beside the most common ones of its method (the
    same setting and backbone): "" for those, else e.g. "csc", "epochs=1"."""
    counts = {}
    for r in runs:
        group = counts.setdefault((r["setting"], r["method"], r["backbone"]), {})
        group[r["variant"]] = group.get(r["variant"], 0) + 1
    for r in runs:
        group = counts[(r["setting"], r["method"], r["backbone"])]
        usual = dict(max(group, key=lambda v: (group[v], -len(v), str(v))))
        mine = dict(r["variant"])
        words = [k if v is True else f"{k}={v}" for k, v in mine.items() if usual.get(k) != v]
        words += [f"{k}=default" for k in usual if k not in mine]
        text = " ".join(words)
        r["label"] = (
            text
            if len(text) <= 40
            else text[:31] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
        )


def read_predictions(folder):
    """predictions.jsonl of a test-time run: one JSON object per test image, at least
    {"index": i, "label": y, "prediction": p}; promptsync.py writes the prediction as "after",
    zero-shot CLIP's as "before", the test set's name as "set" (default "test") and its size as
    "n". A line cut short by a kill is left out. -> {(set, index): record}."""
    path, records = os.path.join(folder, "predictions.jsonl"), {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
                records[(r.get("set", "test"), int(r["index"]))] = r
            except (ValueError, KeyError, TypeError):
                continue
    return records


# the arguments that make shards parts of one run (the table merges only shards that agree on them)
SHARD_KEYS = ["views", "steps", "lr", "rho", "load", "loss", "setting", "augmix", "align_layers"]


def merge_shards(shards):
    """Sharded test-time runs -> one run per complete set of shards, its accuracy computed from the
    union of their per-image predictions (a shard's own metrics.json holds its images only)."""
    groups = {}
    for r in shards:
        K, N = r["shard"]
        same = tuple(str(r["args"].get(k)) for k in SHARD_KEYS)
        key = (r["method"], r["backbone"], r["dataset"], r["shots"], r["seed"], N, same)
        key += (r["variant"],)
        groups.setdefault(key, {}).setdefault(K, r)
    merged = []
    for key, parts in groups.items():
        N, first = key[5], parts[min(parts)]
        where = os.path.dirname(os.path.dirname(first["path"]))
        if sorted(parts) != list(range(N)):
            missing = ", ".join(f"{K}/{N}" for K in range(N) if K not in parts)
            warn(
                f"{where}: {first['method']} {first['dataset']} seed {first['seed']}: shards "
                f"{missing} have not finished; not in the table until they have"
            )
            continue
        records, clash = {}, None
        try:
            for K in range(N):
                for k, r in read_predictions(os.path.dirname(parts[K]["path"])).items():
                    clash = clash or (k in records and records[k] != r and k)
                    records.setdefault(k, r)
        except OSError as e:
            warn(f"{where}: a shard has no per-image predictions ({e}); shards not merged")
            continue
        if clash:
            warn(f"{where}: image {clash} has two different predictions; shards not merged")
            continue
        accuracy, zero_shot, short = {}, {}, []
        for name in dict.fromkeys(s for s, _ in records):
            rs = [r for (s, _), r in records.items() if s == name]
            if len(rs) < max(int(r.get("n", 0)) for r in rs):
                short.append(name)
            predicted = [r.get("after", r.get("prediction")) for r in rs]
            accuracy[name] = 100 * float(np.mean([p == r["label"] for p, r in zip(predicted, rs)]))
            if all("before" in r for r in rs):
                zero_shot[name] = 100 * float(np.mean([r["before"] == r["label"] for r in rs]))
        if short:
            warn(f"{where}: the shards lack predictions of some {short} images; not merged")
            continue
        paths = [parts[K]["path"] for K in range(N)]
        merged.append(
            dict(
                first,
                path=paths[0],
                paths=paths,
                accuracy=accuracy,
                zero_shot=zero_shot,
                shard=None,
            )
        )
    return merged


def collect_runs(folders):
    """Every run under the folders, each once: metrics.json files by real path, sharded runs merged,
    and one run per (setting, method, backbone, options, dataset, shots, seed)."""
    seen, runs = set(), []
    for top in folders:
        if not os.path.isdir(top):
            fail(f"{top}: folder not found")
        for folder, subfolders, files in os.walk(top):
            subfolders.sort()
            path = os.path.join(folder, "metrics.json")
            if "metrics.json" in files and os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                run = read_run(path)
                if run:
                    runs.append(run)
    whole = [r for r in runs if not r["shard"]] + merge_shards([r for r in runs if r["shard"]])
    whole.sort(key=lambda r: r["merged"] is not None)  # promptsync --merge's folders come last
    unique = {}
    for r in whole:
        key = (r["setting"], r["method"], r["backbone"], r["variant"], paper_name(r["dataset"]))
        key += (r["shots"], r["seed"])
        kept = unique.setdefault(key, r)
        if kept is r or r["merged"]:  # a --merge folder repeats its shards: expected
            continue
        if len(r["accuracy"]) > len(kept["accuracy"]):  # keep the one with more test sets
            unique[key], kept, r = r, r, kept
        what = (key[1], key[2], key[4], key[5], key[6])
        warn(f"{r['path']}: the same run as {kept['path']} {what}; counted once, as the latter")
    return list(unique.values())


def harmonic(base, new):
    return 2 * base * new / (base + new) if base + new else 0.0


def order(dataset):
    """The papers' order of datasets, then other names, then the average rows."""
    names, name = list(DATASETS) + list(VARIANTS), paper_name(dataset)
    if name in names:
        return (names.index(name), "")
    return (len(names) + dataset.startswith("Average"), dataset)


def run_values(r):
    """A run's metrics -> {metric: value}: "test" (base with --subsample base), "new", "H", each
    --eval-data set by the papers' name, and zero-shot CLIP's: "zero-shot" (on test), "zero-shot
    new", "zero-shot H"."""
    values = {(paper_name(k) if k != "test" else k): v for k, v in r["accuracy"].items()}
    zs = r["zero_shot"]
    if "test" in zs:
        values["zero-shot"] = zs["test"]
    if "new" in r["accuracy"]:
        values["H"] = harmonic(r["accuracy"]["test"], r["accuracy"]["new"])
    if "test" in zs and "new" in zs:
        values["zero-shot new"] = zs["new"]
        values["zero-shot H"] = harmonic(zs["test"], zs["new"])
    return values


def collect(folders):
    """The table's rows: one per (setting, method, backbone, variant, dataset, shots) with, for
    each metric of run_values, (mean, population std) over seeds (H: of the mean base and new,
    +- the std of the runs' H); plus average rows over datasets, and the papers' numbers where
    PAPERS_CSV quotes them ("paper": {metric: (value, source)}; the usual variant only)."""
    folders = [folders] if isinstance(folders, str) else folders
    runs, groups = collect_runs(folders), {}
    variant_labels(runs)
    for r in runs:
        key = (r["setting"], r["method"], r["backbone"], r["label"], paper_name(r["dataset"]))
        groups.setdefault(key + (r["shots"],), []).append(r)
    rows = []
    for (setting, method, backbone, variant, dataset, shots), rs in groups.items():
        values = {}
        for r in sorted(rs, key=lambda r: r["seed"]):
            for name, v in run_values(r).items():
                values.setdefault(name, []).append(v)
        full = {m: v for m, v in values.items() if len(v) == len(rs)}  # in every seed's run
        stats = {m: (float(np.mean(v)), float(np.std(v))) for m, v in full.items()}
        for h, (b, n) in {
            "H": ("test", "new"),
            "zero-shot H": ("zero-shot", "zero-shot new"),
        }.items():
            if h in stats:  # the papers' H: of the mean base and the mean new
                stats[h] = (harmonic(stats[b][0], stats[n][0]), stats[h][1])
        seeds, paths = sorted(r["seed"] for r in rs), [r["path"] for r in rs]
        cells = (setting, method, backbone, variant, dataset, shots, seeds, stats, paths)
        rows.append(dict(zip(ROW, cells)))
    rows += averages(rows)
    for row in rows:
        row["paper"] = published(row)
    return sorted(rows, key=row_order)


ROW = ("setting", "method", "backbone", "variant", "dataset", "shots", "seeds", "stats", "paths")


def row_order(r):
    key = (SETTINGS.index(r["setting"]), r["method"], r["variant"], r["backbone"], r["shots"])
    return key + (order(r["dataset"]),)


SETTINGS = ["", "base-to-new", "cross-dataset"]
# the dataset sets the papers average over, by name
AVG11, AVG10 = "Average (11 datasets)", "Average (10 datasets but ImageNet)"
AVG_SHIFTS, AVG_IN5 = "Average (4 ImageNet shifts)", "Average (ImageNet and its 4 shifts)"
AVERAGES = {
    AVG11: set(DATASETS),
    AVG10: set(DATASETS) - {"ImageNet"},
    AVG_SHIFTS: set(VARIANTS),
    AVG_IN5: {"ImageNet", *VARIANTS},
}


def average_name(names):
    """The name of an average over these datasets: a papers' set, or what it covers of the
    smallest papers' set holding it ("Average (10 of 11 datasets: no EuroSAT)")."""
    for name, covered in AVERAGES.items():
        if names == covered:
            return name
    holding = [name for name, covered in AVERAGES.items() if names < covered]
    if not holding:
        return f"Average ({', '.join(sorted(names, key=order))})"
    whole = min(holding, key=lambda name: len(AVERAGES[name]))
    missing = sorted(AVERAGES[whole] - names, key=order)
    have = sorted(names, key=order)
    what = whole[len("Average (") : -1]  # "11 datasets", "4 ImageNet shifts", ...
    if len(missing) <= len(have):
        return f"Average ({len(names)} of {what}: no {', '.join(missing)})"
    return f"Average ({len(names)} of {what}: {', '.join(have)})"


def averages(rows):
    """The average rows of each (setting, method, backbone, variant, shots): the mean over the
    datasets of each dataset's mean (H: of the averaged base and new), named by the datasets it
    covers; and the average over a papers' set inside them where a paper quotes it."""
    groups, out = {}, []
    for r in rows:
        key = (r["setting"], r["method"], r["backbone"], r["variant"], r["shots"])
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        names = {r["dataset"] for r in rs}
        parts = [(average_name(names), rs)] if len(rs) > 1 else []
        for name, covered in AVERAGES.items():
            row = dict(zip(ROW, (*key[:4], name, key[4])))
            if covered < names and published(row):
                parts.append((name, [r for r in rs if r["dataset"] in covered]))
        for name, part in parts:
            common = set.intersection(*(set(r["stats"]) for r in part))
            stats = {m: (float(np.mean([r["stats"][m][0] for r in part])), None) for m in common}
            for h, (b, n) in {
                "H": ("test", "new"),
                "zero-shot H": ("zero-shot", "zero-shot new"),
            }.items():
                if h in stats:
                    stats[h] = (harmonic(stats[b][0], stats[n][0]), None)
            out.append(dict(zip(ROW, (*key[:4], name, key[4], [], stats, []))))
    return out


def plan_status(commands):
    """Which of a plan's runs the table has: "163 of 165 runs found; missing: ...; failed: ...
    (see run.log)". A run folder with a run.log and no metrics.json failed (or was stopped)."""
    jobs = load_jobs(commands)
    missing = [j for j in jobs if not j.finished()]
    failed = [j.out for j in missing if os.path.isfile(j.log)]
    unrun = [j.out for j in missing if not os.path.isfile(j.log)]

    def some(outs):
        return ", ".join(outs[:5]) + (f" and {len(outs) - 5} more" if len(outs) > 5 else "")

    text = f"{len(jobs) - len(missing)} of {len(jobs)} runs found"
    text += f"; missing (not run): {some(unrun)}" if unrun else ""
    text += f"; failed or stopped: {some(failed)} (see run.log in each)" if failed else ""
    return text


# ------------------------------------------------------------------------------------------------
# The papers' numbers (top-1 %): data, one entry per paper row and dataset, each with its source
# ------------------------------------------------------------------------------------------------
# Columns: setting ("-": few-shot or domain generalisation, or a test-time run), method (as the
# method files name it in metrics.json), backbone, shots (0: zero-shot or test-time), dataset (a
# name of DATASETS/VARIANTS, or AVG11 = the 11 datasets, AVG10 = the 10 but ImageNet, SHIFTS = the
# 4 ImageNet shifts, IN5 = ImageNet and its shifts), values (metric=value: test is the accuracy,
# base in base-to-new; an ImageNet row's shift columns are its --eval-data sets; _ for a space in a
# metric's name), and the source:
# its key in PAPER_SOURCES, the table, the row. Tip-Adapter's log holds every dataset at 1-16 shots
# for CLIP-Adapter, Tip-Adapter and Tip-Adapter-F (its rows average to the log's own averages, as a
# test checks). Not here, because no source at hand was checked: CoOp's per-dataset few-shot values
# (the paper's Figure 3 and appendix table), ProGrad's tables, Tip-Adapter's Table 1 as printed, the
# CoCoOp paper's own Table 2 (cross-dataset).
PAPERS_CSV = """\
setting,method,backbone,shots,dataset,values,source,table,row
base-to-new,zeroshot,ViT-B/16,0,AVG11,test=69.34 new=74.22 H=71.70,cocoop,Table 1,CLIP
base-to-new,coop,ViT-B/16,16,AVG11,test=82.69 new=63.22 H=71.66,cocoop,Table 1,CoOp
base-to-new,coop,ViT-B/16,16,AVG11,zero-shot=69.34 zero-shot_new=74.22,cocoop,Table 1,CLIP
base-to-new,cocoop,ViT-B/16,16,AVG11,test=80.47 new=71.69 H=75.83,cocoop,Table 1,CoCoOp
base-to-new,cocoop,ViT-B/16,16,AVG11,zero-shot=69.34 zero-shot_new=74.22,cocoop,Table 1,CLIP
base-to-new,vpt-deep,ViT-B/16,16,AVG11,test=80.24 new=73.43 H=76.68,maple-zoo,Model zoo,VPT-deep
-,zeroshot-ensemble-select,RN50,0,ImageNet,test=60.32,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,SUN397,test=58.52,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,OxfordPets,test=85.83,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,EuroSAT,test=37.52,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,Caltech101,test=85.92,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,DescribableTextures,test=42.20,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,FGVCAircraft,test=17.10,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,Food101,test=77.32,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,OxfordFlowers,test=66.02,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,UCF101,test=61.35,tip-log,16 shots,zero-shot CLIP
-,zeroshot,RN50,0,StanfordCars,test=55.74,tip-log,16 shots,zero-shot CLIP
-,clip-adapter,RN50,16,ImageNet,test=63.59 zero-shot=60.32,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,SUN397,test=69.55 zero-shot=58.52,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,OxfordPets,test=87.84 zero-shot=85.83,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,EuroSAT,test=84.43 zero-shot=37.52,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,Caltech101,test=92.49 zero-shot=85.92,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,DescribableTextures,test=65.96 zero-shot=42.20,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,FGVCAircraft,test=32.10 zero-shot=17.10,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,Food101,test=78.25 zero-shot=77.32,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,OxfordFlowers,test=93.90 zero-shot=66.02,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,UCF101,test=76.76 zero-shot=61.35,tip-log,16 shots,CLIP-Adapter
-,clip-adapter,RN50,16,StanfordCars,test=74.01 zero-shot=55.74,tip-log,16 shots,CLIP-Adapter
-,tip,RN50,16,ImageNet,test=62.01 zero-shot=60.32,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,SUN397,test=66.85 zero-shot=58.52,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,OxfordPets,test=88.14 zero-shot=85.83,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,EuroSAT,test=70.54 zero-shot=37.52,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,Caltech101,test=90.18 zero-shot=85.92,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,DescribableTextures,test=60.93 zero-shot=42.20,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,FGVCAircraft,test=29.76 zero-shot=17.10,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,Food101,test=77.83 zero-shot=77.32,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,OxfordFlowers,test=89.89 zero-shot=66.02,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,UCF101,test=70.58 zero-shot=61.35,tip-log,16 shots,Tip-Adapter
-,tip,RN50,16,StanfordCars,test=66.77 zero-shot=55.74,tip-log,16 shots,Tip-Adapter
-,tip-f,RN50,16,ImageNet,test=65.51 zero-shot=60.32,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,SUN397,test=71.47 zero-shot=58.52,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,OxfordPets,test=89.70 zero-shot=85.83,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,EuroSAT,test=84.54 zero-shot=37.52,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,Caltech101,test=92.86 zero-shot=85.92,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,DescribableTextures,test=66.55 zero-shot=42.20,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,FGVCAircraft,test=35.55 zero-shot=17.10,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,Food101,test=79.43 zero-shot=77.32,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,OxfordFlowers,test=94.80 zero-shot=66.02,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,UCF101,test=78.03 zero-shot=61.35,tip-log,16 shots,Tip-Adapter-F
-,tip-f,RN50,16,StanfordCars,test=75.74 zero-shot=55.74,tip-log,16 shots,Tip-Adapter-F
-,clip-adapter,RN50,8,ImageNet,test=62.68 zero-shot=60.32,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,ImageNet,test=61.84 zero-shot=60.32,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,ImageNet,test=61.52 zero-shot=60.32,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,ImageNet,test=61.20 zero-shot=60.32,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,SUN397,test=67.50 zero-shot=58.52,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,SUN397,test=65.96 zero-shot=58.52,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,SUN397,test=63.29 zero-shot=58.52,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,SUN397,test=61.30 zero-shot=58.52,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,OxfordPets,test=87.65 zero-shot=85.83,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,OxfordPets,test=87.46 zero-shot=85.83,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,OxfordPets,test=86.73 zero-shot=85.83,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,OxfordPets,test=85.99 zero-shot=85.83,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,EuroSAT,test=77.93 zero-shot=37.52,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,EuroSAT,test=73.38 zero-shot=37.52,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,EuroSAT,test=63.90 zero-shot=37.52,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,EuroSAT,test=61.40 zero-shot=37.52,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,Caltech101,test=91.40 zero-shot=85.92,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,Caltech101,test=89.98 zero-shot=85.92,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,Caltech101,test=89.37 zero-shot=85.92,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,Caltech101,test=88.60 zero-shot=85.92,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,DescribableTextures,test=61.00 zero-shot=42.20,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,DescribableTextures,test=56.86 zero-shot=42.20,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,DescribableTextures,test=51.48 zero-shot=42.20,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,DescribableTextures,test=45.80 zero-shot=42.20,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,FGVCAircraft,test=26.25 zero-shot=17.10,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,FGVCAircraft,test=22.59 zero-shot=17.10,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,FGVCAircraft,test=20.10 zero-shot=17.10,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,FGVCAircraft,test=17.49 zero-shot=17.10,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,Food101,test=78.04 zero-shot=77.32,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,Food101,test=77.92 zero-shot=77.32,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,Food101,test=77.22 zero-shot=77.32,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,Food101,test=76.82 zero-shot=77.32,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,OxfordFlowers,test=91.72 zero-shot=66.02,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,OxfordFlowers,test=87.17 zero-shot=66.02,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,OxfordFlowers,test=81.61 zero-shot=66.02,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,OxfordFlowers,test=73.49 zero-shot=66.02,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,UCF101,test=73.30 zero-shot=61.35,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,UCF101,test=69.05 zero-shot=61.35,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,UCF101,test=67.12 zero-shot=61.35,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,UCF101,test=62.20 zero-shot=61.35,tip-log,1 shots,CLIP-Adapter
-,clip-adapter,RN50,8,StanfordCars,test=67.89 zero-shot=55.74,tip-log,8 shots,CLIP-Adapter
-,clip-adapter,RN50,4,StanfordCars,test=62.45 zero-shot=55.74,tip-log,4 shots,CLIP-Adapter
-,clip-adapter,RN50,2,StanfordCars,test=58.74 zero-shot=55.74,tip-log,2 shots,CLIP-Adapter
-,clip-adapter,RN50,1,StanfordCars,test=55.13 zero-shot=55.74,tip-log,1 shots,CLIP-Adapter
-,tip,RN50,8,ImageNet,test=61.45 zero-shot=60.32,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,ImageNet,test=60.98 zero-shot=60.32,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,ImageNet,test=60.96 zero-shot=60.32,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,ImageNet,test=60.70 zero-shot=60.32,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,SUN397,test=65.62 zero-shot=58.52,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,SUN397,test=64.15 zero-shot=58.52,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,SUN397,test=62.70 zero-shot=58.52,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,SUN397,test=61.30 zero-shot=58.52,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,OxfordPets,test=87.03 zero-shot=85.83,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,OxfordPets,test=86.45 zero-shot=85.83,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,OxfordPets,test=87.03 zero-shot=85.83,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,OxfordPets,test=86.10 zero-shot=85.83,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,EuroSAT,test=67.95 zero-shot=37.52,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,EuroSAT,test=65.32 zero-shot=37.52,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,EuroSAT,test=61.68 zero-shot=37.52,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,EuroSAT,test=54.38 zero-shot=37.52,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,Caltech101,test=89.83 zero-shot=85.92,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,Caltech101,test=89.39 zero-shot=85.92,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,Caltech101,test=88.44 zero-shot=85.92,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,Caltech101,test=87.18 zero-shot=85.92,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,DescribableTextures,test=58.63 zero-shot=42.20,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,DescribableTextures,test=53.96 zero-shot=42.20,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,DescribableTextures,test=49.47 zero-shot=42.20,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,DescribableTextures,test=46.22 zero-shot=42.20,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,FGVCAircraft,test=25.59 zero-shot=17.10,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,FGVCAircraft,test=22.41 zero-shot=17.10,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,FGVCAircraft,test=21.21 zero-shot=17.10,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,FGVCAircraft,test=19.05 zero-shot=17.10,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,Food101,test=77.76 zero-shot=77.32,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,Food101,test=77.54 zero-shot=77.32,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,Food101,test=77.52 zero-shot=77.32,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,Food101,test=77.42 zero-shot=77.32,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,OxfordFlowers,test=87.98 zero-shot=66.02,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,OxfordFlowers,test=83.80 zero-shot=66.02,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,OxfordFlowers,test=79.13 zero-shot=66.02,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,OxfordFlowers,test=73.12 zero-shot=66.02,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,UCF101,test=68.68 zero-shot=61.35,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,UCF101,test=66.46 zero-shot=61.35,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,UCF101,test=64.74 zero-shot=61.35,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,UCF101,test=62.60 zero-shot=61.35,tip-log,1 shots,Tip-Adapter
-,tip,RN50,8,StanfordCars,test=62.93 zero-shot=55.74,tip-log,8 shots,Tip-Adapter
-,tip,RN50,4,StanfordCars,test=61.45 zero-shot=55.74,tip-log,4 shots,Tip-Adapter
-,tip,RN50,2,StanfordCars,test=57.93 zero-shot=55.74,tip-log,2 shots,Tip-Adapter
-,tip,RN50,1,StanfordCars,test=57.54 zero-shot=55.74,tip-log,1 shots,Tip-Adapter
-,tip-f,RN50,8,ImageNet,test=64.00 zero-shot=60.32,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,ImageNet,test=62.52 zero-shot=60.32,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,ImageNet,test=61.69 zero-shot=60.32,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,ImageNet,test=61.13 zero-shot=60.32,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,SUN397,test=68.87 zero-shot=58.52,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,SUN397,test=66.21 zero-shot=58.52,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,SUN397,test=63.64 zero-shot=58.52,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,SUN397,test=62.50 zero-shot=58.52,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,OxfordPets,test=88.09 zero-shot=85.83,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,OxfordPets,test=87.54 zero-shot=85.83,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,OxfordPets,test=87.03 zero-shot=85.83,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,OxfordPets,test=87.00 zero-shot=85.83,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,EuroSAT,test=77.93 zero-shot=37.52,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,EuroSAT,test=74.12 zero-shot=37.52,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,EuroSAT,test=66.15 zero-shot=37.52,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,EuroSAT,test=59.53 zero-shot=37.52,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,Caltech101,test=91.44 zero-shot=85.92,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,Caltech101,test=90.56 zero-shot=85.92,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,Caltech101,test=89.74 zero-shot=85.92,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,Caltech101,test=89.33 zero-shot=85.92,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,DescribableTextures,test=62.71 zero-shot=42.20,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,DescribableTextures,test=57.39 zero-shot=42.20,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,DescribableTextures,test=53.72 zero-shot=42.20,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,DescribableTextures,test=49.65 zero-shot=42.20,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,FGVCAircraft,test=30.21 zero-shot=17.10,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,FGVCAircraft,test=25.80 zero-shot=17.10,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,FGVCAircraft,test=23.19 zero-shot=17.10,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,FGVCAircraft,test=20.22 zero-shot=17.10,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,Food101,test=78.64 zero-shot=77.32,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,Food101,test=78.24 zero-shot=77.32,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,Food101,test=77.81 zero-shot=77.32,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,Food101,test=77.51 zero-shot=77.32,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,OxfordFlowers,test=91.51 zero-shot=66.02,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,OxfordFlowers,test=88.83 zero-shot=66.02,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,OxfordFlowers,test=82.30 zero-shot=66.02,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,OxfordFlowers,test=79.98 zero-shot=66.02,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,UCF101,test=74.25 zero-shot=61.35,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,UCF101,test=70.55 zero-shot=61.35,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,UCF101,test=66.43 zero-shot=61.35,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,UCF101,test=64.87 zero-shot=61.35,tip-log,1 shots,Tip-Adapter-F
-,tip-f,RN50,8,StanfordCars,test=69.25 zero-shot=55.74,tip-log,8 shots,Tip-Adapter-F
-,tip-f,RN50,4,StanfordCars,test=64.57 zero-shot=55.74,tip-log,4 shots,Tip-Adapter-F
-,tip-f,RN50,2,StanfordCars,test=61.50 zero-shot=55.74,tip-log,2 shots,Tip-Adapter-F
-,tip-f,RN50,1,StanfordCars,test=58.86 zero-shot=55.74,tip-log,1 shots,Tip-Adapter-F
-,clip-adapter,RN50,16,AVG11,test=74.44,tip-log,average by shots,CLIP-Adapter
-,clip-adapter,RN50,8,AVG11,test=71.40,tip-log,average by shots,CLIP-Adapter
-,clip-adapter,RN50,4,AVG11,test=68.61,tip-log,average by shots,CLIP-Adapter
-,clip-adapter,RN50,2,AVG11,test=65.55,tip-log,average by shots,CLIP-Adapter
-,clip-adapter,RN50,1,AVG11,test=62.67,tip-log,average by shots,CLIP-Adapter
-,tip,RN50,16,AVG11,test=70.32,tip-log,average by shots,Tip-Adapter
-,tip,RN50,8,AVG11,test=68.50,tip-log,average by shots,Tip-Adapter
-,tip,RN50,4,AVG11,test=66.54,tip-log,average by shots,Tip-Adapter
-,tip,RN50,2,AVG11,test=64.62,tip-log,average by shots,Tip-Adapter
-,tip,RN50,1,AVG11,test=62.33,tip-log,average by shots,Tip-Adapter
-,tip-f,RN50,16,AVG11,test=75.83,tip-log,average by shots,Tip-Adapter-F
-,tip-f,RN50,8,AVG11,test=72.45,tip-log,average by shots,Tip-Adapter-F
-,tip-f,RN50,4,AVG11,test=69.67,tip-log,average by shots,Tip-Adapter-F
-,tip-f,RN50,2,AVG11,test=66.65,tip-log,average by shots,Tip-Adapter-F
-,tip-f,RN50,1,AVG11,test=64.60,tip-log,average by shots,Tip-Adapter-F
-,coop,RN50,16,ImageNet,test=62.95,coop-88,the paper's value quoted,CoOp RN50
-,coop,ViT-B/32,16,ImageNet,test=66.85,coop-45,the paper's value quoted,CoOp ViT-B/32
-,zeroshot,RN50,0,ImageNet,test=58.16 ImageNetA=21.83,tpt,Table 1,CLIP-RN50
-,zeroshot,RN50,0,ImageNet,ImageNetV2=51.41 ImageNetR=56.15,tpt,Table 1,CLIP-RN50
-,zeroshot,RN50,0,ImageNet,ImageNetSketch=33.37,tpt,Table 1,CLIP-RN50
-,zeroshot,ViT-B/16,0,ImageNet,test=66.73 ImageNetA=47.87,tpt,Table 1,CLIP-ViT-B/16
-,zeroshot,ViT-B/16,0,ImageNet,ImageNetV2=60.86 ImageNetR=73.98,tpt,Table 1,CLIP-ViT-B/16
-,zeroshot,ViT-B/16,0,ImageNet,ImageNetSketch=46.09,tpt,Table 1,CLIP-ViT-B/16
-,coop,ViT-B/16,16,ImageNet,test=71.51 ImageNetA=49.71,tpt,Table 1,CoOp
-,coop,ViT-B/16,16,ImageNet,ImageNetV2=64.20 ImageNetR=75.21,tpt,Table 1,CoOp
-,coop,ViT-B/16,16,ImageNet,ImageNetSketch=47.99,tpt,Table 1,CoOp
-,cocoop,ViT-B/16,16,ImageNet,test=71.02 ImageNetA=50.63,tpt,Table 1,CoCoOp
-,cocoop,ViT-B/16,16,ImageNet,ImageNetV2=64.07 ImageNetR=76.18,tpt,Table 1,CoCoOp
-,cocoop,ViT-B/16,16,ImageNet,ImageNetSketch=48.75,tpt,Table 1,CoCoOp
-,zeroshot,RN50,0,ImageNetA,test=21.83,tpt,Table 1,CLIP-RN50
-,zeroshot,RN50,0,ImageNetV2,test=51.41,tpt,Table 1,CLIP-RN50
-,zeroshot,RN50,0,ImageNetR,test=56.15,tpt,Table 1,CLIP-RN50
-,zeroshot,RN50,0,ImageNetSketch,test=33.37,tpt,Table 1,CLIP-RN50
-,zeroshot,RN50,0,IN5,test=44.18,tpt,Table 1 (Avg),CLIP-RN50
-,zeroshot,RN50,0,SHIFTS,test=40.69,tpt,Table 1 (OOD Avg),CLIP-RN50
-,tpt,RN50,0,ImageNet,test=60.74,tpt,Table 1,TPT (RN50)
-,tpt,RN50,0,ImageNetA,test=26.67,tpt,Table 1,TPT (RN50)
-,tpt,RN50,0,ImageNetV2,test=54.70,tpt,Table 1,TPT (RN50)
-,tpt,RN50,0,ImageNetR,test=59.11,tpt,Table 1,TPT (RN50)
-,tpt,RN50,0,ImageNetSketch,test=35.09,tpt,Table 1,TPT (RN50)
-,tpt,RN50,0,IN5,test=47.26,tpt,Table 1 (Avg),TPT (RN50)
-,tpt,RN50,0,SHIFTS,test=43.89,tpt,Table 1 (OOD Avg),TPT (RN50)
-,zeroshot,ViT-B/16,0,ImageNetA,test=47.87,tpt,Table 1,CLIP-ViT-B/16
-,zeroshot,ViT-B/16,0,ImageNetV2,test=60.86,tpt,Table 1,CLIP-ViT-B/16
-,zeroshot,ViT-B/16,0,ImageNetR,test=73.98,tpt,Table 1,CLIP-ViT-B/16
-,zeroshot,ViT-B/16,0,ImageNetSketch,test=46.09,tpt,Table 1,CLIP-ViT-B/16
-,zeroshot,ViT-B/16,0,IN5,test=59.11,tpt,Table 1 (Avg),CLIP-ViT-B/16
-,zeroshot,ViT-B/16,0,SHIFTS,test=57.20,tpt,Table 1 (OOD Avg),CLIP-ViT-B/16
-,tpt,ViT-B/16,0,ImageNet,test=68.98,tpt,Table 1,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,ImageNetA,test=54.77,tpt,Table 1,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,ImageNetV2,test=63.45,tpt,Table 1,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,ImageNetR,test=77.06,tpt,Table 1,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,ImageNetSketch,test=47.94,tpt,Table 1,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,IN5,test=62.44,tpt,Table 1 (Avg),TPT (ViT-B/16)
-,tpt,ViT-B/16,0,SHIFTS,test=60.81,tpt,Table 1 (OOD Avg),TPT (ViT-B/16)
-,tpt,ViT-B/16,0,OxfordFlowers,test=68.98,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,DescribableTextures,test=47.75,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,OxfordPets,test=87.79,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,StanfordCars,test=66.87,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,UCF101,test=68.04,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,Caltech101,test=94.16,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,Food101,test=84.67,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,SUN397,test=65.50,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,FGVCAircraft,test=24.78,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,EuroSAT,test=42.44,tpt,Table 2,TPT (ViT-B/16)
-,tpt,ViT-B/16,0,AVG10,test=65.10,tpt,Table 2 (Average),TPT (ViT-B/16)
-,tpt,RN50,0,AVG10,test=57.66,tpt,Table 2 (Average),TPT (RN50)
-,zeroshot,RN50,0,AVG10,test=55.82,tpt,Table 2 (Average),CLIP-RN50
-,zeroshot,ViT-B/16,0,AVG10,test=63.58,tpt,Table 2 (Average),CLIP-ViT-B/16
cross-dataset,cocoop,ViT-B/16,16,AVG10,test=64.63,tpt,Table 2 (Average),CoCoOp (TPT's row)
-,maple,ViT-B/16,16,ImageNet,ImageNetV2=64.07 ImageNetSketch=49.15,promptalign,DG,MaPLe
-,maple,ViT-B/16,16,ImageNet,ImageNetA=50.90,promptalign,DG,MaPLe
-,maple,ViT-B/16,16,ImageNet,ImageNetR=76.98,promptalign,DG,MaPLe
-,tpt_maple,ViT-B/16,0,ImageNetV2,test=64.87,promptalign,DG,TPT+MaPLe
-,tpt_maple,ViT-B/16,0,ImageNetSketch,test=48.16,promptalign,DG,TPT+MaPLe
-,tpt_maple,ViT-B/16,0,ImageNetA,test=58.08,promptalign,DG,TPT+MaPLe
-,tpt_maple,ViT-B/16,0,ImageNetR,test=78.12,promptalign,DG,TPT+MaPLe
-,tpt_maple,ViT-B/16,0,SHIFTS,test=62.31,promptalign,DG (OOD avg),TPT+MaPLe
-,promptalign,ViT-B/16,0,ImageNetV2,test=65.29,promptalign,DG,PromptAlign
-,promptalign,ViT-B/16,0,ImageNetSketch,test=50.23,promptalign,DG,PromptAlign
-,promptalign,ViT-B/16,0,ImageNetA,test=59.37,promptalign,DG,PromptAlign
-,promptalign,ViT-B/16,0,ImageNetR,test=79.33,promptalign,DG,PromptAlign
-,promptalign,ViT-B/16,0,SHIFTS,test=63.55,promptalign,DG (OOD avg),PromptAlign
"""
# Where each source key's numbers were read
PAPER_SOURCES = {
    "cocoop": "CoCoOp (Zhou et al., CVPR 2022, arXiv 2203.05557), base-to-new, ViT-B/16, 16 "
    "shots, average of the 11 datasets; CoOp there: 4 vectors from 'a photo of a' (as quoted "
    "identically in MaPLe's README; not yet checked against the paper itself)",
    "maple-zoo": "MaPLe's repository (muzairkhattak/multimodal-prompt-learning), README.md, "
    "'Deep Vision Prompting' (VPT-deep in CLIP): base-to-new, ViT-B/16, 16 shots, 3 seeds",
    "tip-log": "Tip-Adapter's repository (gaopengcuhk/Tip-Adapter), exp.log: RN50, CoOp's splits "
    "(the paper's Table 1 not checked); ImageNet's zero-shot: the 7-template ensemble",
    "coop-88": "CoOp (Zhou et al., IJCV 2022, arXiv 2109.01134), ImageNet 16 shots, as quoted in "
    "CoOp's issue #88 (RN50; not checked against the paper)",
    "coop-45": "CoOp (Zhou et al., IJCV 2022, arXiv 2109.01134), ImageNet 16 shots, as quoted in "
    "CoOp's issue #45 (ViT-B/32, M=16; not checked against the paper)",
    "tpt": "TPT (Shu et al., NeurIPS 2022, arXiv 2209.07511); Table 1: ImageNet and its shifts, "
    "CoOp and CoCoOp trained on 16-shot ImageNet; Table 2: cross-dataset (its CoCoOp row is TPT's "
    "number, not the CoCoOp paper's Table 2)",
    "promptalign": "PromptAlign (Abdul Samadh et al., NeurIPS 2023, arXiv 2311.01459), domain "
    "generalisation, ViT-B/16, MaPLe prompts from 16-shot ImageNet; repository "
    "jameelhassan/PromptAlign README.md, its typos corrected from the paper's poster",
}
AVERAGE_KEYS = {"AVG11": AVG11, "AVG10": AVG10, "SHIFTS": AVG_SHIFTS, "IN5": AVG_IN5}


def read_papers(text=PAPERS_CSV):
    """PAPERS_CSV -> {(setting, method, backbone, shots, dataset): {metric: (value, source)}}, a
    source being "<key>|<table>|<row>" (source_text); an entry twice is an error in the data."""
    papers = {}
    for e in csv.DictReader(io.StringIO(text)):
        setting = "" if e["setting"] == "-" else e["setting"]
        dataset = AVERAGE_KEYS.get(e["dataset"], e["dataset"])
        key = (setting, e["method"], e["backbone"], int(e["shots"]), dataset)
        source = f"{e['source']}|{e['table']}|{e['row']}"
        cell = papers.setdefault(key, {})
        for pair in e["values"].split(" "):
            metric, value = pair.rsplit("=", 1)
            metric = metric.replace("_", " ")  # zero-shot_new: "zero-shot new"
            if metric in cell:
                raise ValueError(f"PAPERS_CSV: {key} {metric} twice")
            cell[metric] = (float(value), source)
    return papers


PUBLISHED = read_papers()


def source_text(source):
    """ "tpt|Table 1|CoOp" -> "CoOp, Table 1: TPT (Shu et al., ...) ..." (a footnote)."""
    key, table, row = source.split("|")
    return f"{row}, {table}: {PAPER_SOURCES[key]}"


def published(row):
    """The papers' numbers for a table row: {metric: (value, source)} (the usual variant only)."""
    if row.get("variant"):
        return {}
    key = (row["setting"], row["method"], row["backbone"], row["shots"], row["dataset"])
    return PUBLISHED.get(key, {})


FIRST = ["zero-shot", "zero-shot new", "zero-shot H", "test", "new", "H"]


def table_metrics(rows):
    """The metric columns of the rows: zero-shot CLIP's, the method's, then the other test sets."""
    metrics = []
    for r in rows:
        metrics += [m for m in r["stats"] if m not in metrics]
    rest = sorted((m for m in metrics if m not in FIRST), key=order)
    return [m for m in FIRST if m in metrics] + rest


def format_csv(rows, paper=True):
    metrics, out = table_metrics(rows), io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    head = ["setting", "method", "variant", "backbone", "dataset", "shots", "runs", "seeds"]
    writer.writerow(
        head + [f"{m}{s}" for m in metrics for s in ("", "_std", "_paper")] + ["paper_sources"]
    )
    for r in rows:
        cells = [r["setting"] or "-", r["method"], r["variant"], r["backbone"], r["dataset"]]
        cells += [r["shots"], len(r["seeds"]) or "", " ".join(map(str, r["seeds"]))]
        for m in metrics:
            mean, std = r["stats"].get(m, (None, None))
            value = r["paper"].get(m, (None,))[0] if paper else None
            cells += [_num(mean, 4), _num(std, 4), _num(value, 2)]
        sources = sorted({s for _, s in r["paper"].values()}) if paper else []
        writer.writerow(cells + ["; ".join(map(source_text, sources))])
    return out.getvalue()


TITLES = {
    "": "Accuracy",
    "base-to-new": "Base-to-new: trained on the base classes",
    "cross-dataset": "Cross-dataset: learned on another dataset, evaluated here",
}


def format_section(setting, section, metrics, paper, notes):
    names = [m for m in metrics if any(m in r["stats"] for r in section)]
    with_paper = {m for r in section for m in r["paper"] if paper and m in names}
    head = ["method", "backbone", "dataset", "shots", "runs"]
    for m in names:
        if setting == "base-to-new":
            name = {"test": "base", "zero-shot": "zero-shot base"}.get(m, m)
        else:
            name = {"test": "accuracy"}.get(m, m)
        head += [name] + [f"{name} (paper)"] * (m in with_paper)
    lines = [f"### {TITLES[setting]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in section:
        method = r["method"] + (f" [{r['variant']}]" if r["variant"] else "")
        cells = [method, r["backbone"], r["dataset"], str(r["shots"])]
        cells.append(str(len(r["seeds"])) if r["seeds"] else "")
        for m in names:
            mean, std = r["stats"].get(m, (None, None))
            cells.append("" if mean is None else f"{mean:.2f}")
            cells[-1] += "" if std is None or len(r["seeds"]) < 2 else f" ± {std:.2f}"
            if m in with_paper:
                value, source = r["paper"].get(m, (None, None))
                if value is not None:
                    notes.setdefault(source, len(notes) + 1)
                cells.append("" if value is None else f"{value:.2f} [{notes[source]}]")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def format_table(rows, fmt="markdown", paper=True, status=None):
    """The rows of `collect` as markdown (a table per setting, the sources as footnotes, the plan's
    status first) or CSV."""
    if fmt == "csv":
        return format_csv(rows, paper)
    lines, notes, metrics = [status, ""] if status else [], {}, table_metrics(rows)
    for setting in SETTINGS:
        section = [r for r in rows if r["setting"] == setting]
        if section:
            lines += format_section(setting, section, metrics, paper, notes)
    lines.append("Mean ± population std over seeds (np.std, ddof 0, as CoOp's parse_test_res.py)")
    if any("H" in r["stats"] for r in rows):
        lines[-1] += "; H: the harmonic mean of the mean base and new accuracies, ± the runs' H std"
    if any(r["variant"] for r in rows):
        lines[-1] += "; [options]: a variant, the options it differs by from its method's usual"
    if any(not r["seeds"] for r in rows):
        lines[-1] += "; averages: the mean of the datasets' means, named by the datasets covered"
    lines[-1] += "."
    lines += [f"[{n}] {source_text(source)}" for source, n in notes.items()]
    return "\n".join(lines) + "\n"


def _num(value, digits):
    return "" if value is None else round(value, digits)


def write_atomic(path, data):
    """Write a file whole or not at all (a reader never sees half of it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# plot: the few-shot curves and the base-to-new bars (matplotlib, imported here only)
# ------------------------------------------------------------------------------------------------
def plot(rows, folder):
    """PNG files in `folder` -> {path: [what it draws]}: fewshot.png (accuracy vs shots per
    dataset and average, a line per method, zero-shot CLIP as a marker at 0 shots, the papers'
    curves dashed where quoted) and base-to-new.png (base, new and H bars per method)."""
    try:
        import matplotlib
    except ImportError:
        fail("plot needs matplotlib: pip install matplotlib (see requirements.txt)")
    matplotlib.use("Agg")  # files, no window
    import matplotlib.pyplot as plt

    drawn = {}
    few = [r for r in rows if r["setting"] == "" and "test" in r["stats"]]
    if any(r["shots"] for r in few):
        drawn[os.path.join(folder, "fewshot.png")] = (few_shot_figure, few)
    b2n = [r for r in rows if r["setting"] == "base-to-new" and "new" in r["stats"]]
    if b2n:
        drawn[os.path.join(folder, "base-to-new.png")] = (base_to_new_figure, b2n)
    for path, (draw, part) in drawn.items():
        datasets = sorted({r["dataset"] for r in part}, key=order)
        cols = min(4, len(datasets))
        fig, axes = plt.subplots(
            -(-len(datasets) // cols), cols, figsize=(4.2 * cols, 3.4 * -(-len(datasets) // cols))
        )
        axes = np.atleast_1d(axes).ravel()
        drawn[path] = draw(part, datasets, axes)
        for ax in axes[len(datasets) :]:
            ax.set_visible(False)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        write_atomic(path, buffer.getvalue())
    return drawn


def curve_name(r):
    variant = f" [{r['variant']}]" if r["variant"] else ""
    return f"{r['method']}{variant} {r['backbone']}"


def few_shot_figure(rows, datasets, axes):
    shots = sorted({r["shots"] for r in rows} | {0})
    x = {k: i for i, k in enumerate(shots)}  # shots evenly spaced, as the papers draw them
    drawn = []
    for ax, dataset in zip(axes, datasets):
        here = [r for r in rows if r["dataset"] == dataset]
        curves, markers = {}, iter("*PXDsv" * 10)  # zero-shot CLIP of each backbone: its own
        for r in sorted(here, key=lambda r: r["shots"]):
            curves.setdefault(curve_name(r), []).append(r)
        for name, rs in curves.items():
            if rs[0]["shots"] == 0:  # zero-shot CLIP: a black marker at 0 shots
                y = rs[0]["stats"]["test"][0]
                ax.plot([0], [y], "k" + next(markers), markersize=9, label=name)
                drawn.append(f"{dataset}: {name} (marker)")
                continue
            xs, means = [x[r["shots"]] for r in rs], [r["stats"]["test"][0] for r in rs]
            stds = [r["stats"]["test"][1] or 0 for r in rs]
            line = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=2, label=name)
            drawn.append(f"{dataset}: {name}")
            quoted = [(x[r["shots"]], r["paper"]["test"][0]) for r in rs if "test" in r["paper"]]
            if quoted:
                colour = line[0].get_color()
                ax.plot(*zip(*quoted), "--", color=colour, marker="x", label=f"{name} (paper)")
                drawn.append(f"{dataset}: {name} (paper, dashed)")
        ax.set_xticks(range(len(shots)), [str(k) for k in shots])
        ax.set(title=dataset, xlabel="shots per class", ylabel="top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return drawn


def base_to_new_figure(rows, datasets, axes):
    drawn = []
    for ax, dataset in zip(axes, datasets):
        here = sorted((r for r in rows if r["dataset"] == dataset), key=curve_name)
        width = 0.8 / max(1, len(here))
        for i, r in enumerate(here):
            values = [r["stats"][m][0] for m in ("test", "new", "H")]
            ax.bar(np.arange(3) + i * width, values, width, label=curve_name(r))
            drawn.append(f"{dataset}: {curve_name(r)}")
        ax.set_xticks(np.arange(3) + 0.4 - width / 2, ["base", "new", "H"])
        ax.set(title=dataset, ylabel="top-1 accuracy (%)")
        ax.legend(fontsize=6)
    return drawn


# ------------------------------------------------------------------------------------------------
# fgvc-split: CoOp's FGVCAircraft lists as a split file in CoOp's format
# ------------------------------------------------------------------------------------------------
def fgvc_split(folder):
    """CoOp's fgvc_aircraft folder (variants.txt, images_variant_{train,val,test}.txt, images/)
    -> <folder>/split_zhou_FGVCAircraft.json: {"train"|"val"|"test": [[image, label, variant]]},
    the label being the variant's line in variants.txt, as CoOp's datasets/fgvc_aircraft.py
    reads them; the images' paths relative to images/ (--data)."""

    def lines(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            fail(f"{path}: not found; {folder} should be CoOp's fgvc_aircraft folder (its data/)")
        return [line.strip() for line in open(path, encoding="utf-8") if line.strip()]

    labels = {variant: i for i, variant in enumerate(lines("variants.txt"))}
    split = {}
    for part in ("train", "val", "test"):
        split[part] = []
        for line in lines(f"images_variant_{part}.txt"):
            image, _, variant = line.partition(" ")
            if variant not in labels:
                fail(f"images_variant_{part}.txt: {variant!r} is not a line of variants.txt")
            split[part].append([f"{image}.jpg", labels[variant], variant])
    path = os.path.join(folder, DATASETS["FGVCAircraft"][2])
    write_atomic(path, json.dumps(split, indent=1))
    return path, {part: len(items) for part, items in split.items()}


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
def plan_main(args):
    if not os.path.isfile(args.method):
        fail(f"--method {args.method}: file not found (a method file such as coop.py)")
    keys = ["datasets", "shots", "seeds", "extras", "out", "shards", "source", "tag", "python"]
    options = {k: getattr(args, k) for k in keys}
    commands, needs = plan_commands(args.protocol, args.method, args.root, **options)
    under_root = any(path.startswith(os.path.join(args.root, "")) for path, _ in needs)
    if not args.no_check and under_root and not os.path.isdir(args.root):  # one line, not 100
        fail(
            f"--root {args.root}: folder not found; give the folder holding CoOp's dataset "
            "folders (or --no-check to plan for another machine)"
        )
    missing = {} if args.no_check else missing_paths(needs)
    if missing:  # before printing anything: a plan is all or nothing
        by_hint = {}
        for path, hint in missing.items():
            by_hint.setdefault(hint, []).append(path)
        what = "\n".join(f"  {' '.join(p)}\n    {hint}" for hint, p in by_hint.items())
        fail(
            f"the plan needs {len(missing)} missing paths under --root {args.root}:\n{what}\n"
            "(--no-check plans without looking, e.g. for another machine)"
        )
    lines = [shlex.join(c) for stage, c in commands if args.stage in (None, stage)]
    sys.stdout.write("".join(line + "\n" for line in lines))
    stages = sorted({stage for stage, _ in commands})
    note = " (run orders them; slurm and parallel write both stages)" * (len(stages) > 1)
    print(f"# {len(lines)} command{'s' * (len(lines) != 1)}{note}", file=sys.stderr)
    return 0


def slurm_main(args):
    commands = read_plan(args.planfile)
    script = slurm_script(args.planfile, commands, args)
    os.makedirs(args.log_dir, exist_ok=True)  # sbatch does not create --output's folder
    if args.output:
        write_atomic(args.output, script)
        os.chmod(args.output, 0o755)
        submit = [line[4:] for line in script.splitlines() if line.startswith("#   ")]
        print(
            f"wrote {args.output}; submit: {' && '.join(submit) or 'sbatch ' + args.output}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(script)
    return 0


def table_main(args):
    commands = read_plan(args.plan) if args.plan else None
    dirs = args.dirs
    if not dirs and commands:  # the plan's run folders
        dirs = [os.path.commonpath([Job(i, c).out for i, c in enumerate(commands, 1)])]
    if not dirs:
        fail("table needs run folders, or --plan PLAN (its run folders)")
    status = plan_status(commands) if commands else None
    rows = collect([d for d in dirs if os.path.isdir(d)] if commands else dirs)
    if status and (args.format == "csv" or not rows):
        print(status, file=sys.stderr)
    if not rows:
        fail(f"no finished run (metrics.json) under {' '.join(dirs)}")
    sys.stdout.write(format_table(rows, args.format, not args.no_paper, status))
    return 0


def main(args):
    if args.verb == "plan":
        return plan_main(args)
    if args.verb == "run":
        if args.workers < 1:
            fail("--workers must be at least 1")
        gpus = None if args.gpus is None else [g for g in args.gpus.split(",") if g]
        commands = read_plan(args.planfile)
        if args.index is not None:
            return run_index(commands, args.index, gpus)
        result = run_plan(commands, args.workers, gpus)
        return 1 if result["failed"] or result["stopped"] else 0
    if args.verb == "slurm":
        return slurm_main(args)
    if args.verb == "parallel":
        commands = read_plan(args.planfile)
        gpus = visible_gpus() if args.gpus is None else [g for g in args.gpus.split(",") if g]
        jobs = args.jobs or max(1, len(gpus))
        for line in parallel_commands(args.planfile, commands, jobs, gpus, args.python):
            print(line)
        return 0
    if args.verb == "plot":
        rows = collect(args.dirs)
        folder = args.out or args.dirs[0]
        os.makedirs(folder, exist_ok=True)
        drawn = plot(rows, folder)
        if not drawn:
            fail(f"nothing to draw under {' '.join(args.dirs)}: no few-shot or base-to-new run")
        for path, what in drawn.items():
            print(f"wrote {path}: {len(what)} curves or bar groups", file=sys.stderr)
        return 0
    if args.verb == "fgvc-split":
        path, sizes = fgvc_split(args.folder)
        print(f"wrote {path}: {sizes}", file=sys.stderr)
        return 0
    return table_main(args)


PLAN_EPILOG = """\
Options after `--` go to every command of the method, after the plan's own, so that they win
(the data, shots, seeds and folders are the plan's: use its options for those), e.g.
  python sweep.py plan base-to-new --method coop.py --root DATA -- --cocoop
  python sweep.py plan few-shot --method coop.py --root DATA -- --csc --precision fp16
Each protocol sets its papers' backbone and context (see `python sweep.py --help`)."""


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extras = []
    if "--" in argv:  # the method's own options
        argv, extras = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__, formatter_class=raw)
    verbs = p.add_subparsers(dest="verb", required=True)
    plan = verbs.add_parser(
        "plan",
        help="print one command per run of a protocol",
        description="Print one shell command per run of a protocol.",
        epilog=PLAN_EPILOG,
        formatter_class=raw,
        usage="sweep.py plan PROTOCOL --method FILE [options] [-- METHOD OPTIONS]",
    )
    add = plan.add_argument
    add("protocol", choices=PROTOCOLS)
    add("--method", required=True, help="the method file, e.g. coop.py")
    add("--root", default="DATA", help="the folder holding CoOp's dataset folders (default: DATA)")
    add(
        "--datasets",
        nargs="+",
        help="names, CoOp folder names or ImageFolder paths (default: "
        "the protocol's: 11, the 10 but --source, or the 4 shifts)",
    )
    add(
        "--shots",
        nargs="+",
        type=int,
        help="default: 1 2 4 8 16 (few-shot); 4 (ProGrad's base-to-new); else 16",
    )
    add("--seeds", nargs="+", type=int, help="default: 1 2 3 (test-time methods: 1)")
    add(
        "--source",
        default="ImageNet",
        help="cross-dataset and domain-generalisation: the dataset learned on (default: ImageNet)",
    )
    add(
        "--shards",
        type=int,
        default=4,
        help="test-time methods: commands per test set (default: 4)",
    )
    add(
        "--out",
        default="runs/sweep",
        help="the run folders go under <out>/<protocol>/<tag>/ (default: runs/sweep)",
    )
    add("--tag", help="the method's folder name (default: the file and its `--` options)")
    add("--python", default="python", help="the interpreter the commands start (default: python)")
    add("--stage", type=int, choices=[1, 2], help="only the commands of this stage (default: all)")
    add("--no-check", action="store_true", help="do not check that the data paths exist")
    add_run_parsers(verbs)
    args = p.parse_args(argv)
    if extras and args.verb != "plan":
        p.error("options after '--' are method options, for plan only")
    args.extras = extras
    return args


def add_run_parsers(verbs):
    run = verbs.add_parser("run", help="run a plan file here (or one line of it), resumable")
    run.add_argument("planfile", help="one command per line ('-': stdin)")
    run.add_argument("--workers", type=int, default=1, help="job slots (default: 1)")
    run.add_argument(
        "--gpus",
        help="GPU ids, one per job slot in turn, e.g. 0,1 (default: every "
        "visible GPU; '' for the CPU)",
    )
    run.add_argument(
        "--index", type=int, help="run plan line K only (1-based), e.g. $SLURM_ARRAY_TASK_ID"
    )
    add_slurm_parser(verbs)
    par = verbs.add_parser("parallel", help="GNU parallel command lines for a plan")
    par.add_argument("planfile", help="the plan file")
    par.add_argument("--jobs", type=int, help="job slots (default: one per visible GPU)")
    par.add_argument("--gpus", help="GPU ids, one per job slot in turn (default: every visible)")
    par.add_argument("--python", default="python", help="the interpreter (default: python)")
    table = verbs.add_parser("table", help="mean ± std over seeds of the runs under folders")
    table.add_argument("dirs", nargs="*", help="folders searched for metrics.json")
    table.add_argument("--plan", help="the plan: which runs are missing (and its run folders)")
    table.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    table.add_argument("--no-paper", action="store_true", help="without the papers' numbers")
    plot = verbs.add_parser("plot", help="few-shot curves and base-to-new bars as PNG files")
    plot.add_argument("dirs", nargs="+", help="folders searched for metrics.json")
    plot.add_argument("--out", help="the folder of the PNG files (default: the first folder)")
    fgvc = verbs.add_parser("fgvc-split", help="write FGVCAircraft's split file from CoOp's lists")
    fgvc.add_argument("folder", help="CoOp's fgvc_aircraft folder, e.g. DATA/fgvc_aircraft")


def add_slurm_parser(verbs):
    slurm = verbs.add_parser("slurm", help="an sbatch array script for a plan, one task per line")
    add = slurm.add_argument
    add("planfile", help="the plan file (its run folders are relative to this folder)")
    add("--output", "-o", help="write the script here (default: print it)")
    add("--partition", help="sbatch --partition (default: the cluster's)")
    add("--account", help="sbatch --account (default: yours)")
    add("--time", default="24:00:00", help="a task's time limit (default: 24:00:00)")
    add("--mem", default="32G", help="a task's memory (default: 32G)")
    add("--cpus", type=int, default=8, help="a task's CPU cores (default: 8)")
    add("--gpus", type=int, default=1, help="a task's GPUs, --gres=gpu:N (default: 1; 0: none)")
    add("--throttle", type=int, default=8, help="tasks at a time, the array's %%N (default: 8)")
    add(
        "--signal-seconds",
        type=int,
        default=300,
        help="SIGUSR1 this long before the time "
        "limit: the run checkpoints and the task requeues (default: 300)",
    )
    add(
        "--setup",
        action="append",
        default=[],
        help="a line run before the task, e.g. 'source "
        ".venv/bin/activate' or 'module load cuda' (repeatable)",
    )
    add("--python", default="python", help="the interpreter of sweep.py (default: python)")
    add("--job-name", default="sweep", help="sbatch --job-name (default: sweep)")
    add("--log-dir", default="slurm-logs", help="SLURM's own task logs (default: slurm-logs)")
    add(
        "--sbatch",
        action="append",
        default=[],
        help="another sbatch option, e.g. --constraint=a100 (repeatable)",
    )


if __name__ == "__main__":
    sys.exit(main(parse_args()))
