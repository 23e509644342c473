"""The papers' protocols as one shell command per run, a runner for them, and the papers' tables.

A method file runs one experiment: one dataset, one shot count, one seed. The papers report grids
of them (CoOp's few-shot table: 11 datasets x 5 shot counts x 3 seeds = 165 runs per method), and
TPT-style methods tune on every test image (50,000 on ImageNet). sweep.py handles the grid in three
verbs. It talks to the method files only through their command line and their metrics.json, and
imports none of them (they are run as commands).

  plan      a protocol -> one shell command per line, each with its own --out folder (the same
            lines every time), for this machine, GNU parallel, or a SLURM job array
  run       a plan file on this machine: N worker processes (one GPU each when there are several),
            finished runs skipped (a killed sweep resumes), progress and ETA, a log per run
  table     every metrics.json under a folder: mean +- population std over seeds per method x
            dataset x shots (x backbone), base/new/H and domain columns where present, sharded
            test-time runs merged, the papers' published numbers side by side

Protocols (--datasets, --shots, --seeds narrow or change them; options after `--` go to every
command of the method, after the plan's own, so that they win):
  few-shot               the 11 datasets x shots 1 2 4 8 16 x seeds 1 2 3
  base-to-new            the 11 datasets x 16 shots x seeds 1 2 3, trained on the base half of the
                         classes (--subsample base: the run also reports new and H)
  cross-dataset          ImageNet, 16 shots x seeds 1 2 3 (stage 1); the learned parameters
                         tested on each of the 10 other datasets: --load ... --eval-only (stage 2)
  domain-generalisation  the same ImageNet training, tested on ImageNet-V2, -Sketch, -A and -R
                         (--eval-data)
Zero-shot CLIP (zeroshot.py) runs once per dataset: no shots, no seeds. Test-time methods
(promptsync.py) tune on the target datasets' test images, split into --shards N commands
(--shard K/N) that `table` merges; with MaPLe prompts (--loss align, --prompts maple) a source
stage on 16-shot ImageNet comes first (stage 1). Their plans use seed 1 (TPT reports one run).
`run` starts a stage-2 command after the stage-1 run it --loads; with GNU parallel or SLURM, run
`plan --stage 1` and then `plan --stage 2`.

Data: CoOp's DATASETS.md folders and split files under one --root (DATASETS below). ImageNet and
its four shifted test sets are ImageFolder roots with a classnames.txt (see DATASETS, VARIANTS).

Run
  python sweep.py plan few-shot --method coop.py --root DATA > plan.txt
  python sweep.py run plan.txt --workers 2           # or: parallel -j 4 < plan.txt
  python sweep.py table runs/sweep                   # --format csv for a spreadsheet
  python sweep.py plan base-to-new --method coop.py --root DATA -- --cocoop --backbone ViT-B/16
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

# ------------------------------------------------------------------------------------------------
# The datasets: CoOp's DATASETS.md layout under one --root
# ------------------------------------------------------------------------------------------------
# name (as the split file names it, the papers' order): (folder under --root, image root inside
# it, CoOp's split file). ImageNet has no split file: imagenet/train/<wnid>/, imagenet/test/<wnid>/
# (the official validation set, which the papers test on; CoOp keeps it as images/val: link it)
# and imagenet/classnames.txt ('<wnid> <class name>' per line). CoOp reads FGVCAircraft from its
# variant lists and ships no split file for it: write split_zhou_FGVCAircraft.json from them.
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
#   shots False: no --shots, no seeds (deterministic); test_time: tunes on the test images.
METHODS = {
    "zeroshot": dict(template="name", shots=False),
    "coop": dict(template="text"),
    "prograd": dict(template="name"),
    "adapter": dict(),
    "vpt": dict(),
    "promptsync": dict(test_time=True),
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
                "CoOp ships no split file for FGVCAircraft: write fgvc_aircraft/"
                f"{split} from images_variant_{{train,val,test}}.txt (labels: variants.txt lines)"
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
    return name if name in DATASETS or name in VARIANTS else spec


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


def paper_options(stem, extras, dataset, shots):
    """The papers' per-dataset settings that the method files leave to the caller (training)."""
    opts = []
    if stem in ("coop", "prograd") and dataset == "ImageNet" and "--cocoop" not in extras:
        # CoOp's ImageNet configs (*_ep50) at every shot count; ProGrad follows CoOp's epochs
        opts += ["--epochs", "50"]
    hard = dataset in ("OxfordFlowers", "DescribableTextures", "EuroSAT") and shots >= 8
    if stem == "prograd" and hard:  # ProGrad's scripts: lambda 0.8 at 8 and 16 shots on these
        opts += ["--lam", "0.8"]
    if stem == "adapter" and option(extras, "--method") == "tip-f" and dataset == "EuroSAT":
        opts += ["--epochs", "100"]  # Tip-Adapter-F's EuroSAT config (20 elsewhere)
    return opts


def template_options(rule, dataset):
    if rule == "name" and dataset in DATASETS:
        return ["--template", dataset]
    if rule == "text" and dataset in TEMPLATES:
        return ["--template", TEMPLATES[dataset]]
    return []


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
    transfer = protocol in ("cross-dataset", "domain-generalisation")
    source = resolve_dataset(source)
    default = dict.fromkeys(["few-shot", "base-to-new"], list(DATASETS))
    default["cross-dataset"] = [d for d in DATASETS if d != source]  # the 10 others
    default["domain-generalisation"] = list(VARIANTS)
    targets = [resolve_dataset(d) for d in datasets] if datasets else default[protocol]
    trains_on = targets if protocol in ("few-shot", "base-to-new") else [source] * learns
    if any(d in VARIANTS for d in trains_on):
        fail(f"{[d for d in trains_on if d in VARIANTS]}: test sets only, nothing to train on")
    if protocol == "domain-generalisation" and not test_time:  # --eval-data: ImageFolder roots
        bad = [d for d in targets if d in DATASETS]
        if bad:
            fail(f"domain-generalisation tests on ImageFolder roots (--eval-data), not {bad}")
    shots = list(shots or ([16] if transfer or protocol == "base-to-new" else PAPER_SHOTS))
    seeds = list(seeds or ([1] if test_time else PAPER_SEEDS)) if learns else [None]
    shots = shots if learns else [None]
    base = os.path.join(out, protocol, tag or run_tag(stem, extras))
    commands, needs = [], []

    def data(name, train):
        opts, paths = dataset_options(root, name, train)
        needs.extend(paths)
        return opts + template_options(rules.get("template"), name)

    def training(name, k, s, prefix="", train=True):
        # one run's data, shots and seed options, and its folder
        opts = data(name, train)
        opts += ["--shots", str(k)] * (k is not None) + ["--seed", str(s)] * (s is not None)
        leaf = f"{prefix}{k}shot_seed{s}" if k is not None else f"{prefix}0shot"
        return opts, os.path.join(base, label(name), leaf)

    def add(stage, opts, folder, paper=()):
        commands.append((stage, [python, method, *opts, *paper, *extras, "--out", folder]))

    if not test_time:
        if protocol == "domain-generalisation" or (protocol == "cross-dataset" and learns):
            names = [source]  # trained there; then tested on the shifts, or on the others
        elif protocol == "cross-dataset":  # zero-shot CLIP: every dataset on its own
            names = [source] + targets
        else:
            names = targets
        eval_data = []
        if protocol == "domain-generalisation":  # the shifted test sets, in the same run
            for name in targets:
                opts, paths = dataset_options(root, name, train=False)
                eval_data.append(opts[1])
                needs.extend(paths)
        for name in names:
            for k in shots:
                for s in seeds:
                    opts, folder = training(name, k, s)
                    opts += ["--subsample", "base"] * (protocol == "base-to-new")
                    opts += ["--eval-data", *eval_data] if eval_data else []
                    add(1, opts, folder, paper_options(stem, extras, name, k) if learns else [])
        if protocol == "cross-dataset" and learns:  # the learned parameters on every other dataset
            for name in targets:
                for k in shots:
                    for s in seeds:
                        load = os.path.join(training(source, k, s)[1], "checkpoint.pt")
                        opts, folder = training(name, k, s, f"from_{label(source)}_", False)
                        add(2, opts + ["--load", load, "--eval-only"], folder)
    else:  # test-time: per-image tuning on the targets' test sets, in shards
        with_source = option(extras, "--loss") == "align" or option(extras, "--prompts") == "maple"
        for k in shots if with_source else [None]:
            for s in seeds:
                load, prefix = [], ""
                if with_source:  # MaPLe's prompts and token statistics from 16-shot ImageNet
                    opts, folder = training(source, k, s, "source_")
                    if protocol == "domain-generalisation":  # MaPLe itself on the shifts
                        shifted = [dataset_options(root, t, False)[0][1] for t in targets]
                        opts += ["--eval-data", *shifted]
                    add(1, ["--stage", "source", *opts], folder)
                    load = ["--load", os.path.join(folder, "checkpoint.pt")]
                    prefix = f"from_{label(source)}_{k}shot_"
                for name in targets:
                    for K in range(shards):
                        opts = data(name, False) + ["--seed", str(s), "--shard", f"{K}/{shards}"]
                        leaf = f"{prefix}seed{s}" + (f"_shard{K}of{shards}" if shards > 1 else "")
                        folder = os.path.join(base, label(name), leaf)
                        add(2 if with_source else 1, opts + load, folder)
    # options the plan sets itself cannot come from `--` (the papers' defaults it sets can)
    planned = {t.split("=")[0] for _, c in commands for t in c[2 : len(c) - len(extras) - 2]}
    planned = {t for t in planned if t.startswith("--")} | {"--out"}
    clash = sorted(
        planned & {t.split("=")[0] for t in extras} - {"--epochs", "--lam", "--template"}
    )
    if clash:
        fail(f"{', '.join(clash)} after '--': the plan sets these for every run; use its options")
    return sorted(commands, key=lambda c: c[0]), needs


def missing_paths(needs):
    """The needed paths that do not exist, each once, with what to do."""
    missing = {}
    for path, hint in needs:
        if not os.path.exists(path) and path not in missing:
            missing[path] = hint
    return missing


# ------------------------------------------------------------------------------------------------
# run: the commands of a plan on this machine
# ------------------------------------------------------------------------------------------------
def visible_gpus():
    """GPU ids for CUDA_VISIBLE_DEVICES: the ones it already lists, else nvidia-smi's, else
    torch's count; [] (CPU) when there is none."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        found = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        return [
            str(i) for i, line in enumerate(found.stdout.splitlines()) if line.startswith("GPU")
        ]
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


try:  # looked up once here: the child, forked from a threaded process, only calls it
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover
    _PRCTL = None


class Job:
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
        # a plain command is started directly (nothing between it and the runner); shell syntax
        # (&&, pipes, $VAR, a VAR=value prefix) goes through sh -c
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
    """A plan file ('-': stdin) -> its command lines (blank lines and # comments left out)."""
    if path != "-" and not os.path.isfile(path):
        fail(f"{path}: plan file not found; write one with: python sweep.py plan ... > {path}")
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def run_plan(commands, workers=1, gpus=None, stream=None):
    """Run shell command lines, `workers` at a time, each in its own process with stdout and
    stderr in <out>/run.log; a command whose <out>/metrics.json exists is skipped, and one that
    --loads another's checkpoint waits for it. With several GPUs each worker gets one
    (CUDA_VISIBLE_DEVICES); on the CPU each gets cores/workers threads (OMP_NUM_THREADS).
    -> {"ok", "failed", "finished" (before), "blocked" (a run it needs failed), "busy" (running
    in another runner)}: lists of run folders."""
    stream = stream or sys.stderr
    jobs = [Job(i, line) for i, line in enumerate(commands, 1)]
    outs = [j.out for j in jobs]
    if len(set(outs)) < len(outs):
        twice = sorted({o for o in outs if outs.count(o) > 1})
        fail(f"two commands of the plan write to the same --out: {twice[:3]}")
    gpus = visible_gpus() if gpus is None else gpus
    result = {k: [] for k in ("ok", "failed", "finished", "blocked", "busy")}
    state = {j.out: "todo" for j in jobs}
    for j in jobs:
        if j.finished():
            state[j.out] = "finished"
            result["finished"].append(j.out)
    todo = [j for j in jobs if state[j.out] == "todo"]
    print(
        f"{len(jobs)} runs: {len(result['finished'])} finished before, {len(todo)} to run with "
        f"{workers} workers on " + (f"GPUs {','.join(gpus)}" if gpus else "the CPU"),
        file=stream,
    )
    if gpus and workers > len(gpus):
        print(f"note: {workers} workers share {len(gpus)} GPUs", file=stream)
    cond, running, stop = threading.Condition(), {}, threading.Event()
    bar = tqdm(total=len(todo), unit="run", file=stream, smoothing=0, disable=not todo)

    def next_job():
        with cond:
            while not stop.is_set():
                waiting = False
                for j in todo:
                    if state[j.out] != "todo":
                        continue
                    before = [state.get(a) for a in j.after]
                    if any(s in ("failed", "blocked", "busy") for s in before):
                        state[j.out] = "blocked"
                        result["blocked"].append(j.out)
                        bar.write(f"not run (a run it needs did not finish): {j.out}")
                        bar.update()
                        cond.notify_all()
                    elif all(s in (None, "ok", "finished") for s in before):
                        state[j.out] = "running"
                        return j
                    else:
                        waiting = True
                if not waiting:
                    return None
                if not any(s == "running" for s in state.values()):  # waits on a run never started
                    for j in todo:
                        if state[j.out] == "todo":
                            state[j.out] = "blocked"
                            result["blocked"].append(j.out)
                    return None
                cond.wait()
            return None

    def work(slot):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        elif "OMP_NUM_THREADS" not in os.environ:  # N runs side by side share the cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
        while (j := next_job()) is not None:
            t0, status = time.time(), execute(j, env, slot)
            with cond:
                state[j.out] = status
                result[status].append(j.out)
                cond.notify_all()
            took = f"{time.time() - t0:.0f}s"
            if status == "ok":
                bar.write(f"done ({took}): {j.out}")
            elif status == "busy":
                bar.write(f"skipped, another runner is running it: {j.out}")
            elif not stop.is_set():
                bar.write(f"FAILED ({took}), see {j.log}:\n  {j.line}")
            bar.update()

    def execute(j, env, slot):
        os.makedirs(j.out, exist_ok=True)
        lock = open(os.path.join(j.out, ".sweep.lock"), "a")
        try:
            if fcntl is not None:
                try:  # held by the run's process (inherited), released when it ends or dies
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return "busy"
            with open(j.log, "w") as log:
                log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {j.line}\n")
                log.flush()
                argv = ["/bin/sh", "-c", j.line] if j.shell else j.tokens
                try:
                    process = subprocess.Popen(
                        argv,
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
                    return "failed"
                with cond:
                    running[slot] = process
                code = process.wait()
                with cond:
                    running.pop(slot, None)
                if code == 0 and not j.finished():
                    log.write(f"sweep: the command ended without writing {j.out}/metrics.json\n")
            return "ok" if code == 0 and j.finished() else "failed"
        finally:
            lock.close()

    def interrupt(signum, frame):
        stop.set()
        with cond:
            processes = list(running.values())
            cond.notify_all()
        for process in processes:  # the whole group: DataLoader workers too
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise SystemExit(128 + signum)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, interrupt)
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        bar.close()
    n_ok, n_failed = len(result["ok"]), len(result["failed"])
    summary = f"ran {n_ok + n_failed}: {n_ok} finished, {n_failed} failed"
    summary += f"; {len(result['finished'])} had finished before"
    if result["blocked"] or result["busy"]:
        summary += f"; {len(result['blocked'])} not run, {len(result['busy'])} running elsewhere"
    print(summary, file=stream)
    for out in result["failed"]:
        print(f"failed: {out} (log: {os.path.join(out, 'run.log')})", file=stream)
    return result


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
    return run


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


# the arguments that make shards parts of one run (promptsync.py's --merge checks the same)
SHARD_KEYS = ["views", "steps", "lr", "rho", "load", "loss", "prompts", "augmix", "align_layers"]


def merge_shards(shards):
    """Sharded test-time runs -> one run per complete set of shards, its accuracy computed from the
    union of their per-image predictions (a shard's own metrics.json holds its images only)."""
    groups = {}
    for r in shards:
        K, N = r["shard"]
        same = tuple(str(r["args"].get(k)) for k in SHARD_KEYS)
        key = (r["method"], r["backbone"], r["dataset"], r["shots"], r["seed"], N, same)
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
    and one run per (setting, method, backbone, dataset, shots, seed)."""
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
        key = (r["setting"], r["method"], r["backbone"], paper_name(r["dataset"]), r["shots"])
        key += (r["seed"],)
        kept = unique.setdefault(key, r)
        if kept is r or r["merged"]:  # a --merge folder repeats its shards: expected
            continue
        if len(r["accuracy"]) > len(kept["accuracy"]):  # keep the one with more test sets
            unique[key], kept, r = r, r, kept
        warn(f"{r['path']}: the same run as {kept['path']} {key[1:]}; counted once, as the latter")
    return list(unique.values())


def harmonic(base, new):
    return 2 * base * new / (base + new) if base + new else 0.0


def order(dataset):
    """The papers' order of datasets, then other names, then the average rows."""
    names, name = list(DATASETS) + list(VARIANTS), paper_name(dataset)
    if name in names:
        return (names.index(name), "")
    return (len(names) + dataset.startswith("Average of"), dataset)


def collect(folders):
    """The table's rows: one per (setting, method, backbone, dataset, shots) with, for each metric,
    (mean, population std) over seeds: "test" (base with --subsample base), "new", "H" (of the mean
    base and new, +- the std of the runs' H), "zero-shot" (CLIP on test), and each --eval-data set;
    plus an average row over the datasets of each (setting, method, backbone, shots), and the
    papers' numbers where the reference sheets give them ("paper": {metric: (value, source)})."""
    folders = [folders] if isinstance(folders, str) else folders
    groups = {}
    for r in collect_runs(folders):
        key = (r["setting"], r["method"], r["backbone"], paper_name(r["dataset"]), r["shots"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (setting, method, backbone, dataset, shots), runs in groups.items():
        values = {}
        for r in sorted(runs, key=lambda r: r["seed"]):
            for name, v in r["accuracy"].items():
                values.setdefault(paper_name(name) if name != "test" else name, []).append(v)
            if "test" in r["zero_shot"]:
                values.setdefault("zero-shot", []).append(r["zero_shot"]["test"])
            if "new" in r["accuracy"]:
                values.setdefault("H", []).append(
                    harmonic(r["accuracy"]["test"], r["accuracy"]["new"])
                )
        full = {m: v for m, v in values.items() if len(v) == len(runs)}  # in every seed's run
        stats = {m: (float(np.mean(v)), float(np.std(v))) for m, v in full.items()}
        if "new" in stats:  # the papers' H: of the mean base and the mean new
            stats["H"] = (harmonic(stats["test"][0], stats["new"][0]), stats["H"][1])
        seeds = sorted(r["seed"] for r in runs)
        paths = [r["path"] for r in runs]
        rows.append(
            dict(zip(ROW, (setting, method, backbone, dataset, shots, seeds, stats, paths)))
        )
    rows += averages(rows)
    for row in rows:
        row["paper"] = published(row)
    return sorted(rows, key=row_order)


ROW = ("setting", "method", "backbone", "dataset", "shots", "seeds", "stats", "paths")


def row_order(r):
    return (
        SETTINGS.index(r["setting"]),
        r["method"],
        r["backbone"],
        r["shots"],
        order(r["dataset"]),
    )


SETTINGS = ["", "base-to-new", "cross-dataset"]
AVG11, AVG10, AVG_SHIFTS = "Average of 11", "Average of 10", "Average of 4 shifts"


def averages(rows):
    """The papers' average rows: the mean over datasets of each dataset's mean; H of the averaged
    base and new (as in the published tables)."""
    groups, out = {}, []
    for r in rows:
        groups.setdefault((r["setting"], r["method"], r["backbone"], r["shots"]), []).append(r)
    for (setting, method, backbone, shots), rs in groups.items():
        if len(rs) < 2:
            continue
        names = {r["dataset"] for r in rs}
        name = f"Average of {len(rs)}"
        name = AVG11 if names == set(DATASETS) else name
        name = AVG10 if names == set(DATASETS) - {"ImageNet"} else name
        name = AVG_SHIFTS if names == set(VARIANTS) else name
        common = set.intersection(*(set(r["stats"]) for r in rs))
        stats = {m: (float(np.mean([r["stats"][m][0] for r in rs])), None) for m in common}
        if "new" in stats:
            stats["H"] = (harmonic(stats["test"][0], stats["new"][0]), None)
        out.append(dict(zip(ROW, (setting, method, backbone, name, shots, [], stats, []))))
    return out


# ------------------------------------------------------------------------------------------------
# The papers' numbers (top-1 %), from the reference sheets, each with its source
# ------------------------------------------------------------------------------------------------
SOURCES = {
    "cocoop": "CoCoOp paper (arXiv 2203.05557) Table 1: base-to-new, ViT-B/16, 16 shots, average "
    "of 11 datasets; CoOp with M=4 from 'a photo of a' (as copied in the MaPLe and PromptSRC "
    "READMEs; reference/coop.md 4)",
    "maple-vpt": "MaPLe README model zoo: VPT-deep in CLIP ('Deep Vision Prompting'), base-to-new, "
    "ViT-B/16, 16 shots, average of 11 (reference/vpt.md 5)",
    "tip": "Tip-Adapter exp.log (arXiv 2111.03930): RN50, CoOp's splits, 16 shots; its zero-shot "
    "column uses the 7-template ensemble on ImageNet (reference/adapter.md 4)",
    "tip-avg": "Tip-Adapter exp.log: RN50, average of 11 datasets by shot count "
    "(reference/adapter.md 4)",
    "coop-issues": "CoOp's paper values as quoted in CoOp issues #88 (RN50) and #45 (ViT-B/32): "
    "ImageNet, 16 shots (secondary; reference/coop.md 4)",
    "tpt1": "TPT paper (arXiv 2209.07511) Table 1: ImageNet and its shifts; CoOp and CoCoOp "
    "trained on 16-shot ImageNet (reference/promptsync.md 5.1)",
    "tpt2": "TPT paper Table 2: cross-dataset, TPT per dataset (ViT-B/16) and averages of the 10 "
    "datasets (reference/promptsync.md 5.2)",
    "promptalign": "PromptAlign (arXiv 2311.01459) README, checked against its poster: domain "
    "generalisation, ViT-B/16, MaPLe prompts from 16-shot ImageNet (reference/promptsync.md 5.3)",
}


def _facts():
    """-> {(setting, method, backbone, shots, dataset): {metric: (value, source)}}."""
    facts = {}

    def add(source, setting, method, backbone, shots, dataset, **values):
        cell = facts.setdefault((setting, method, backbone, shots, dataset), {})
        for metric, value in values.items():
            cell.setdefault(metric.replace("zero_shot", "zero-shot"), (value, source))

    b2n = {("zeroshot", 0): (69.34, 74.22, 71.70), ("coop", 16): (82.69, 63.22, 71.66)}
    b2n[("cocoop", 16)] = (80.47, 71.69, 75.83)
    for (method, shots), (b, n, h) in b2n.items():
        add("cocoop", "base-to-new", method, "ViT-B/16", shots, AVG11, test=b, new=n, H=h)
    vpt = dict(test=80.24, new=73.43, H=76.68)
    add("maple-vpt", "base-to-new", "vpt-deep", "ViT-B/16", 16, AVG11, **vpt)
    tip = {  # dataset: zero-shot CLIP, CLIP-Adapter, Tip-Adapter, Tip-Adapter-F
        "ImageNet": (60.32, 63.59, 62.01, 65.51),
        "SUN397": (58.52, 69.55, 66.85, 71.47),
        "OxfordPets": (85.83, 87.84, 88.14, 89.70),
        "EuroSAT": (37.52, 84.43, 70.54, 84.54),
        "Caltech101": (85.92, 92.49, 90.18, 92.86),
        "DescribableTextures": (42.20, 65.96, 60.93, 66.55),
        "FGVCAircraft": (17.10, 32.10, 29.76, 35.55),
        "Food101": (77.32, 78.25, 77.83, 79.43),
        "OxfordFlowers": (66.02, 93.90, 89.89, 94.80),
        "UCF101": (61.35, 76.76, 70.58, 78.03),
        "StanfordCars": (55.74, 74.01, 66.77, 75.74),
    }
    for dataset, (zs, *accs) in tip.items():
        for method, acc in zip(["clip-adapter", "tip", "tip-f"], accs):
            add("tip", "", method, "RN50", 16, dataset, test=acc, zero_shot=zs)
        zs_method = "zeroshot-ensemble-select" if dataset == "ImageNet" else "zeroshot"
        add("tip", "", zs_method, "RN50", 0, dataset, test=zs)
    for method, accs in {
        "clip-adapter": (74.44, 71.40, 68.61, 65.55, 62.67),
        "tip": (70.32, 68.50, 66.54, 64.62, 62.33),
        "tip-f": (75.83, 72.45, 69.67, 66.65, 64.60),
    }.items():
        for shots, acc in zip([16, 8, 4, 2, 1], accs):
            add("tip-avg", "", method, "RN50", shots, AVG11, test=acc)
    add("coop-issues", "", "coop", "RN50", 16, "ImageNet", test=62.95)
    add("coop-issues", "", "coop", "ViT-B/32", 16, "ImageNet", test=66.85)
    shifts = ["ImageNet", "ImageNetA", "ImageNetV2", "ImageNetR", "ImageNetSketch"]
    for (method, backbone, shots), values in {  # IN, A, V2, R, Sketch; OOD average
        ("zeroshot", "RN50", 0): (58.16, 21.83, 51.41, 56.15, 33.37, 40.69),
        ("tpt", "RN50", 0): (60.74, 26.67, 54.70, 59.11, 35.09, 43.89),
        ("zeroshot", "ViT-B/16", 0): (66.73, 47.87, 60.86, 73.98, 46.09, 57.20),
        ("coop", "ViT-B/16", 16): (71.51, 49.71, 64.20, 75.21, 47.99, 59.28),
        ("cocoop", "ViT-B/16", 16): (71.02, 50.63, 64.07, 76.18, 48.75, 59.91),
        ("tpt", "ViT-B/16", 0): (68.98, 54.77, 63.45, 77.06, 47.94, 60.81),
    }.items():
        named = dict(zip(shifts, values))
        if method != "tpt":  # one run on ImageNet, the shifts as --eval-data
            domains = {k: v for k, v in named.items() if k != "ImageNet"}
            add("tpt1", "", method, backbone, shots, "ImageNet", test=values[0], **domains)
        if shots == 0:  # a run per test set (test-time tuning; zero-shot CLIP either way)
            for dataset, value in named.items():
                add("tpt1", "", method, backbone, 0, dataset, test=value)
            add("tpt1", "", method, backbone, 0, AVG_SHIFTS, test=values[-1])
    tpt2 = {
        "OxfordFlowers": 68.98,
        "DescribableTextures": 47.75,
        "OxfordPets": 87.79,
        "StanfordCars": 66.87,
        "UCF101": 68.04,
        "Caltech101": 94.16,
        "Food101": 84.67,
        "SUN397": 65.50,
        "FGVCAircraft": 24.78,
        "EuroSAT": 42.44,
    }
    for dataset, value in tpt2.items():
        add("tpt2", "", "tpt", "ViT-B/16", 0, dataset, test=value)
    for (method, backbone), value in {
        ("zeroshot", "RN50"): 55.82,
        ("tpt", "RN50"): 57.66,
        ("zeroshot", "ViT-B/16"): 63.58,
        ("tpt", "ViT-B/16"): 65.10,
    }.items():
        add("tpt2", "", method, backbone, 0, AVG10, test=value)
    add("tpt2", "cross-dataset", "cocoop", "ViT-B/16", 16, AVG10, test=64.63)
    variants = ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
    maple = dict(zip(variants, (64.07, 49.15, 50.90, 76.98)))
    add("promptalign", "", "maple", "ViT-B/16", 16, "ImageNet", **maple)
    for method, values in {
        "tpt_maple": (64.87, 48.16, 58.08, 78.12, 62.31),
        "promptalign": (65.29, 50.23, 59.37, 79.33, 63.55),
    }.items():
        for dataset, value in zip(variants + [AVG_SHIFTS], values):
            add("promptalign", "", method, "ViT-B/16", 0, dataset, test=value)
    return facts


PUBLISHED = _facts()


def published(row):
    """The papers' numbers for a table row: {metric: (value, source key)}."""
    key = (row["setting"], row["method"], row["backbone"], row["shots"], row["dataset"])
    return PUBLISHED.get(key, {})


def format_table(rows, fmt="markdown", paper=True):
    """The rows of `collect` as markdown (a table per setting, the sources as footnotes) or CSV."""
    metrics = []
    for r in rows:
        metrics += [m for m in r["stats"] if m not in metrics]
    first = ["zero-shot", "test", "new", "H"]
    metrics = [m for m in first if m in metrics] + sorted(
        (m for m in metrics if m not in first), key=order
    )
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        head = ["setting", "method", "backbone", "dataset", "shots", "runs", "seeds"]
        writer.writerow(
            head + [f"{m}{s}" for m in metrics for s in ("", "_std", "_paper")] + ["paper_sources"]
        )
        for r in rows:
            cells = [r["setting"] or "-", r["method"], r["backbone"], r["dataset"], r["shots"]]
            cells += [len(r["seeds"]) or "", " ".join(map(str, r["seeds"]))]
            for m in metrics:
                mean, std = r["stats"].get(m, (None, None))
                value = r["paper"].get(m, (None,))[0] if paper else None
                cells += [_num(mean, 4), _num(std, 4), _num(value, 2)]
            sources = sorted({s for _, s in r["paper"].values()}) if paper else []
            writer.writerow(cells + ["; ".join(SOURCES[s] for s in sources)])
        return out.getvalue()
    lines, notes = [], {}
    titles = {
        "": "Accuracy",
        "base-to-new": "Base-to-new: trained on the base classes",
        "cross-dataset": "Cross-dataset: learned on another dataset, evaluated here",
    }
    for setting in SETTINGS:
        section = [r for r in rows if r["setting"] == setting]
        if not section:
            continue
        names = [m for m in metrics if any(m in r["stats"] for r in section)]
        with_paper = {m for r in section for m in r["paper"] if paper and m in names}
        head = ["method", "backbone", "dataset", "shots", "runs"]
        for m in names:
            name = {"test": "base" if setting == "base-to-new" else "accuracy"}.get(m, m)
            head += [name] + [f"{name} (paper)"] * (m in with_paper)
        lines += [f"### {titles[setting]}", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "---|" * len(head))
        for r in section:
            cells = [r["method"], r["backbone"], r["dataset"], str(r["shots"])]
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
        lines.append("")
    lines.append("Mean ± population std over seeds (np.std, ddof 0, as CoOp's parse_test_res.py)")
    if any("H" in r["stats"] for r in rows):
        lines[-1] += "; H: the harmonic mean of the mean base and new accuracies, ± the runs' H std"
    if any(not r["seeds"] for r in rows):
        lines[-1] += "; averages: the mean of the datasets' means"
    lines[-1] += "."
    lines += [f"[{n}] {SOURCES[s]}" for s, n in notes.items()]
    return "\n".join(lines) + "\n"


def _num(value, digits):
    return "" if value is None else round(value, digits)


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
def main(args):
    if args.verb == "plan":
        if not os.path.isfile(args.method):
            fail(f"--method {args.method}: file not found (a method file such as coop.py)")
        keys = ["datasets", "shots", "seeds", "extras", "out", "shards", "source", "tag", "python"]
        options = {k: getattr(args, k) for k in keys}
        commands, needs = plan_commands(args.protocol, args.method, args.root, **options)
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
        note = " (run orders them; elsewhere: --stage 1, then --stage 2)" * (len(stages) > 1)
        print(f"# {len(lines)} command{'s' * (len(lines) != 1)}{note}", file=sys.stderr)
        return 0
    if args.verb == "run":
        if args.workers < 1:
            fail("--workers must be at least 1")
        gpus = None if args.gpus is None else [g for g in args.gpus.split(",") if g]
        result = run_plan(read_plan(args.planfile), args.workers, gpus)
        return 1 if result["failed"] else 0
    rows = collect(args.dirs)
    if not rows:
        fail(f"no finished run (metrics.json) under {' '.join(args.dirs)}")
    sys.stdout.write(format_table(rows, args.format, not args.no_paper))
    return 0


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extras = []
    if "--" in argv:  # the method's own options
        argv, extras = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    p = argparse.ArgumentParser(
        description="The papers' protocols: plan commands, run them, table their results",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    plan = verbs.add_parser(
        "plan",
        help="print one command per run of a protocol",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Print one shell command per run; options after '--' go to every command",
    )
    add = plan.add_argument
    add("protocol", choices=PROTOCOLS)
    add("--method", required=True, help="the method file, e.g. coop.py")
    add("--root", default="DATA", help="the folder holding CoOp's dataset folders")
    add("--datasets", nargs="+", help="names or folders (or ImageFolder paths); default: all")
    add("--shots", nargs="+", type=int, help="default: 1 2 4 8 16 (few-shot), else 16")
    add("--seeds", nargs="+", type=int, help="default: 1 2 3 (test-time: 1)")
    add("--source", default="ImageNet", help="cross-dataset/domain-generalisation: trained on")
    add("--shards", type=int, default=4, help="test-time methods: commands per test set")
    add("--out", default="runs/sweep", help="the run folders go under <out>/<protocol>/<tag>/")
    add("--tag", help="the method's folder name (default: the file and its options)")
    add("--python", default="python", help="the interpreter the commands start")
    add("--stage", type=int, choices=[1, 2], help="only the commands of this stage")
    add("--no-check", action="store_true", help="do not check that the data paths exist")
    run = verbs.add_parser("run", help="run a plan file here, resumable")
    run.add_argument("planfile", help="one command per line ('-': stdin)")
    run.add_argument("--workers", type=int, default=1, help="commands at a time")
    run.add_argument("--gpus", help="GPU ids, e.g. 0,1 (default: every visible GPU)")
    table = verbs.add_parser("table", help="mean ± std over seeds of the runs under folders")
    table.add_argument("dirs", nargs="+", help="folders searched for metrics.json")
    table.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    table.add_argument("--no-paper", action="store_true", help="without the papers' numbers")
    args = p.parse_args(argv)
    if extras and args.verb != "plan":
        p.error("options after '--' are method options, for plan only")
    args.extras = extras
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
