"""CLIP-Adapter, Tip-Adapter(-F) and the linear probe: few-shot CLIP on precomputed features.

Papers  CLIP-Adapter: Gao et al., arXiv 2110.04544 (code: gaopengcuhk/CLIP-Adapter, clip_adapter.py)
        Tip-Adapter(-F): Zhang et al., arXiv 2111.03930 (code: gaopengcuhk/Tip-Adapter, main.py)
        Linear probe: Radford et al., arXiv 2103.00020, App. A.3 (code: KaiyangZhou/CoOp, lpclip/)

The idea. All four keep CLIP frozen and put something small on top of the image feature, so the
image encoder runs once per (image, view): the methods work on precomputed features. CLIP-Adapter
learns a bottleneck MLP and blends its output with the feature. Tip-Adapter adds to the zero-shot
logits the labels of the few-shot images with similar features (a key-value cache), untrained;
Tip-Adapter-F fine-tunes the keys. The probe ignores the text (bar the zero-shot baseline).

Equations (f the raw image feature, f^ = f/|f|, C the number of classes, W (C, D) the normalised
text features of the run's template(s), s = 1/tau = exp(logit_scale) CLIP's frozen logit scale
(about 100), K (N, D) the keys and V (N, C) the one-hot values of the N few-shot images)
  [CLIP-Adapter, as its code: a ReLU after each layer]  A(f) = ReLU(ReLU(f W1^T) W2^T),
                  W1 (D/4, D) and W2 (D, D/4) as torch stores Linear weights, no biases
  [CLIP-Adapter]  f* = alpha A(f) + (1 - alpha) f,  logits = s norm(f*) W^T         (alpha = 0.2)
  [Tip-Adapter]   logits = s f^ W^T + alpha exp(-beta (1 - f^ K^T)) V   (beta: sharpness, alpha: the
                  cache's weight, as the current code; its Dec-2021 code swapped them, issue #4)
  [Linear probe]  min_{P,b} mean_i CE(f_i P^T + b, y_i) + |P|^2 / (2 C_reg N)  (sklearn's objective,
                  C_reg its C: the inverse regularisation strength)
Learned: CLIP-Adapter W1, W2; Tip-Adapter nothing (K, V are built); Tip-Adapter-F K (init: the
built K); the probe P, b. Frozen: all of CLIP and W. Unlike coop.py, no text encoder in training.

Settings: PRESETS (--help prints them). Every choice is made on validation, never on test, so the
published Tip-F numbers are not ours one to one: its code keeps the epoch best on test and prints
the larger of that epoch's test accuracy and the one after the alpha/beta search (on ImageNet, a
search on test too); we report the accuracy after the search, with the epoch chosen on validation.

Run
  python adapter.py --method tip-f --backbone toy/clip_rn.pt --data toy/sketch --shots 4
  python adapter.py --method tip-f --backbone RN50 --data DATA/oxford_pets/images \\
      --split-file DATA/oxford_pets/split_zhou_OxfordPets.json
"""

import argparse
import functools
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from tqdm import tqdm  # comes with the clip package

with warnings.catch_warnings():  # openai-clip 1.0.1 imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip


# --------------------- Presets: each method's defaults, its paper's or code's ---------------------
def rule(doc, value):  # a callable preset: resolved after parsing, shown by --help as `doc`
    value.__doc__ = doc
    return value


TEMPLATE = rule("the dataset's CoOp template, else 'a photo of a {}.'",
                lambda a: CUSTOM_TEMPLATES.get(paper_dataset(a), "a photo of a {}."))  # fmt: skip
tip_config = lambda a: TIP_CONFIGS.get(paper_dataset(a), TIP_CONFIGS[None])  # None: the others'
TIP = dict(  # val_shots None: the whole val split, as Tip-Adapter's main.py (else min(shots, 4))
    template=TEMPLATE, ensemble=rule("ImageNet: 'select', as Tip-Adapter's code; else 'none'",
        lambda a: "select" if paper_dataset(a) == "ImageNet" else "none"),
    alpha=rule("the dataset's init_alpha (Tip-Adapter's configs), else 1 (the authors' baseline)",
               lambda a: tip_config(a)["init_alpha"]),
    search_scale=rule("the dataset's search_scale (Tip-Adapter's configs), else 50 50",
                      lambda a: tip_config(a)["search_scale"]),
    beta=1.0, val_shots=None)  # fmt: skip
PRESETS = {
    # CoOp's recipe (SGD, momentum 0.9, warm-up epoch, cosine); one template, as its code
    "clip-adapter": dict(template=TEMPLATE, ensemble="none", alpha=0.2, lr=0.002, weight_decay=5e-4,
        batch_size=32, epochs=rule("50/100/200 for 1/2-4/8-16 shots, ImageNet 50 (CoOp's configs)",
                    lambda a: 50 if paper_dataset(a) == "ImageNet" else epochs_for_shots(a))),
    "tip": TIP,
    # AdamW (eps 1e-4, the code's) with torch's default weight decay, as the code; cosine per step
    "tip-f": dict(TIP, batch_size=256, lr=0.001, weight_decay=0.01,
        epochs=rule("20, EuroSAT 100 (Tip-Adapter's configs)",
                    lambda a: 100 if paper_dataset(a) == "EuroSAT" else 20)),
    "linear-probe": dict(template=TEMPLATE, ensemble="none",  # for the zero-shot column only
        val_shots=rule("min(shots, 4) (CoOp's lpclip)", lambda a: min(a.shots, 4))),
}  # fmt: skip


# ---- The methods (CLIP-Adapter, Tip-Adapter(-F), linear probe), on precomputed image features ----
class ClipAdapter(nn.Module):
    """[CLIP-Adapter] as its authors coded it: bias-free, a ReLU after each layer, so A(f) >= 0 (the
    paper writes no ReLU after the second). dim: D (1024 RN50, 512 ViT-B)."""

    def __init__(self, dim, reduction=4):
        super().__init__()
        hidden = dim // reduction
        self.fc = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                nn.Linear(hidden, dim, bias=False), nn.ReLU())  # fmt: skip

    def forward(self, features):
        return self.fc(features)  # [CLIP-Adapter, its code] A(f) = ReLU(ReLU(f W1^T) W2^T): (B, D)


def clip_adapter_logits(features, adapter, alpha, clip_weights, s):
    # Blend the raw feature, then normalise, as the code. (This bias-free ReLU adapter has A(c f) =
    # c A(f) for c > 0, so blending the normalised feature gives the same logits; a test checks it.)
    f = alpha * adapter(features) + (1 - alpha) * features  # [CLIP-Adapter] f* (B, D)
    return s * F.normalize(f, dim=-1) @ clip_weights.t()  # [CLIP-Adapter] s norm(f*) W^T: (B, C)


def tip_adapter_logits(features, clip_weights, cache_keys, cache_values, alpha, beta, s):
    """[Tip-Adapter] zero-shot logits plus the cache's: (B, D), (C, D), (N, D), (N, C) -> (B, C).
    Features, text weights and built keys are L2-normalised (fine-tuned keys drift from norm 1)."""
    clip_logits = s * features @ clip_weights.t()  # (B, C); the code writes 100
    affinity = features @ cache_keys.t()  # cosine similarity to every key: (B, N)
    cache_logits = torch.exp(-beta * (1 - affinity)) @ cache_values  # [Tip-Adapter] (B, C)
    return clip_logits + alpha * cache_logits  # [Tip-Adapter] s f^ W^T + alpha exp(..) V


def build_cache(view_features, labels, n_cls):
    """[Tip-Adapter] keys (N, D): each image's raw view_features (views, N, D) averaged over the
    views, then normalised (normalising each view first gives other keys); values (N, C) one-hot."""
    return F.normalize(view_features.mean(dim=0), dim=-1), F.one_hot(labels, n_cls).float()


class TipAdapter(nn.Module):
    """[Tip-Adapter] training-free: the built keys (N, D) and values (N, C), fixed buffers."""

    def __init__(self, cache_keys, cache_values):
        super().__init__()
        self.register_buffer("cache_keys", cache_keys.clone())  # (N, D)
        self.register_buffer("cache_values", cache_values.clone())  # (N, C)

    def forward(self, image_features, clip_weights, alpha, beta, s):
        K, V = self.cache_keys, self.cache_values
        return tip_adapter_logits(image_features, clip_weights, K, V, alpha, beta, s)


class TipAdapterF(TipAdapter):
    """[Tip-Adapter-F] keys learned from the built ones (the code's Linear(D, N, bias=False))."""

    def __init__(self, cache_keys, cache_values):
        super().__init__(cache_keys, cache_values)
        del self.cache_keys  # the buffer becomes a learned parameter
        self.cache_keys = nn.Parameter(cache_keys.clone())  # (N, D)


@torch.no_grad()
def search_alpha_beta(features, labels, clip_weights, cache_keys, cache_values, s, search_scale,
                      steps=(200, 20)):  # fmt: skip
    """[Tip-Adapter utils.search_hp] the authors' grid from 0.1, the maxima excluded as in their
    code; the first best pair (beta outer, alpha inner) wins. Give it validation features only.
    search_scale = (beta_max, alpha_max), steps = (n_beta, n_alpha) -> (accuracy, alpha, beta)."""
    (beta_max, alpha_max), (n_beta, n_alpha) = search_scale, steps
    betas = [0.1 + i * (beta_max - 0.1) / n_beta for i in range(n_beta)]
    alphas = [0.1 + j * (alpha_max - 0.1) / n_alpha for j in range(n_alpha)]
    alpha_column = torch.tensor(alphas, device=features.device).view(-1, 1, 1)  # (n_alpha, 1, 1)
    clip_logits = s * features @ clip_weights.t()  # (B, C)
    affinity = features @ cache_keys.t()  # (B, N)
    best_correct, best_alpha, best_beta = -1, None, None
    for beta in betas:  # all alphas of one beta at once: (n_alpha, B, C)
        logits = clip_logits + alpha_column * (torch.exp(-beta * (1 - affinity)) @ cache_values)
        correct = (logits.argmax(dim=-1) == labels).sum(dim=-1)  # (n_alpha,)
        j = int(correct.argmax())  # the first of equals, as the authors' strict '>'
        if int(correct[j]) > best_correct:
            best_correct, best_alpha, best_beta = int(correct[j]), alphas[j], beta
    return 100.0 * best_correct / len(labels), best_alpha, best_beta


def fit_linear_probe(features, labels, n_cls, C_reg, max_iter=1000):
    """[Linear probe] multinomial logistic regression with sklearn's objective (mean cross-entropy
    + |P|^2 / (2 C_reg N), bias not penalised), by L-BFGS from zero. Returns P (C, D), b (C,)."""
    if not C_reg > 0 or not math.isfinite(C_reg):
        raise ValueError(f"the inverse regularisation strength C_reg must be positive, not {C_reg}")
    n, d = features.shape
    P = torch.zeros(n_cls, d, device=features.device, requires_grad=True)
    b = torch.zeros(n_cls, device=features.device, requires_grad=True)
    # scipy's L-BFGS defaults as sklearn calls them: 10 pairs of history, gradient tolerance 1e-4
    lbfgs = dict(history_size=10, tolerance_grad=1e-4, line_search_fn="strong_wolfe")
    optimizer = torch.optim.LBFGS([P, b], lr=1, max_iter=max_iter, **lbfgs)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ P.t() + b, labels) + (P**2).sum() / (2 * C_reg * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return P.detach(), b.detach()


def search_C_reg(fit, val_accuracy, steps=8):
    """[CoOp lpclip] C_reg: the coarse list's best, then `steps` log10 bisections between C*/10 and
    10 C*, the better end kept each time. fit(C_reg) -> probe, val_accuracy(probe) -> accuracy.
    -> (C_reg, probe, accuracy)."""

    @functools.cache  # fits are deterministic (from zero), so each C_reg is fitted once
    def scored(C_reg):
        probe = fit(C_reg)
        return probe, val_accuracy(probe)

    coarse = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    peak = coarse[int(np.argmax([scored(C_reg)[1] for C_reg in coarse]))]
    C_reg, left, right = peak, math.log10(peak) - 1, math.log10(peak) + 1
    for _ in range(steps):
        if scored(10**left)[1] < scored(10**right)[1]:  # the better end, the left one on ties
            C_reg, left = 10**right, (left + right) / 2
        else:
            C_reg, right = 10**left, (left + right) / 2
    return C_reg, *scored(C_reg)


def epoch_batches(view_features, labels, batch_size, generator):
    """One epoch on the precomputed features: every training image once, as one of its views drawn,
    in a shuffled order. view_features (views, N, D) -> batches of (B, D) features and labels."""
    views, n, _ = view_features.shape
    which = torch.randint(views, (n,), generator=generator).to(view_features.device)  # (N,)
    order = torch.randperm(n, generator=generator).to(view_features.device)  # (N,)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield view_features[which[idx], idx], labels[idx]  # (B, D), (B,)


# [Tip-Adapter configs/*.yaml] init_alpha and search_scale = (beta_max, alpha_max); init beta 1.
# None, every other dataset: alpha = beta = 1 (the authors' baseline, Tip-Adapter issue #13) and
# their widest scale (OxfordFlowers'): a wide grid costs only resolution (the toy's best alpha > 10)
TIP_CONFIGS = {name: dict(init_alpha=a, search_scale=scale) for name, a, scale in [
    ("ImageNet", 1.17, (7, 3)), ("Caltech101", 3, (12, 5)), ("DescribableTextures", 2, (13, 13)),
    ("EuroSAT", 2, (12, 10)), ("FGVCAircraft", 5, (30, 30)), ("Food101", 1.17, (10, 10)),
    ("OxfordFlowers", 10, (50, 50)), ("OxfordPets", 1.17, (7, 3)), ("StanfordCars", 3, (20, 10)),
    ("SUN397", 1.17, (12, 10)), ("UCF101", 3, (7, 3)), (None, 1.0, (50, 50))]}  # fmt: skip


def paper_dataset(args):
    """Which of the papers' datasets this is, by the split file's or the folder's name; or None."""
    folder = os.path.normpath(args.data)  # CoOp's images/, jpg/, 2750/ sit in the dataset's folder
    folder = os.path.dirname(folder) if folder.endswith(("images", "jpg", "2750")) else folder
    name = os.path.basename(args.split_file or folder).replace("split_zhou_", "").split(".")[0]
    key = name.lower().replace("_", "").replace("-", "")
    return ({k.lower(): k for k in CUSTOM_TEMPLATES} | {"dtd": "DescribableTextures"}).get(key)


# -------- Precomputed features: the frozen image encoder runs once per image and view ---------
class SeededViews(torch.utils.data.Dataset):
    """`views` passes over the items, view v of image i drawn with a seed of its own (one per
    (seed, view, image)), so the features do not depend on batches, workers or order."""

    def __init__(self, items, transform, views=1, seed=0):
        self.images, self.seed = ImageDataset(items * views, transform), seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, k):  # k = v * N + i; the seeds differ while k < 1_000_003
        with torch.random.fork_rng(devices=[]):  # the crops draw from torch only; state restored
            torch.random.default_generator.manual_seed(self.seed * 1_000_003 + k)
            return self.images[k]


@torch.no_grad()
def encode_views(encode_image, items, transform, device, precision, views=1, seed=0, workers=4,
                 batch_size=256):  # fmt: skip
    """Raw (unnormalised) image features of every view of every item: (views, N, D) in fp32."""
    dataset, pin = SeededViews(items, transform, views, seed), device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers, pin_memory=pin)
    batches = tqdm(loader, desc=f"encoding {views}x{len(items)} images", leave=False)
    with autocast(device, precision):
        out = [encode_image(images.to(device, non_blocking=True)).float() for images, _ in batches]
    return torch.cat(out).view(views, len(items), -1)  # (views*N, D) -> (views, N, D)


def label_tensor(items, device):
    return torch.tensor([y for _, y in items], device=device)  # (N,)


def precompute_features(args, clip_model, train, W):
    """The namespace `feats` the four methods read (raw image features, fp32): views (views, N, D)
    of the training images, y (N,) their labels; f_val (M, D) the validation images (test transform;
    None without), y_val (M,); W (C, D) text weights; s = exp(logit_scale); n_cls, dim, device."""
    device, n_px, t = torch.device(args.device), clip_model.visual.input_resolution, time.time()
    probe = args.method == "linear-probe"  # CoOp's lpclip: test-transform features, no augmentation
    transform = test_transform(n_px) if probe else train_transform(n_px, args.crop_scale)
    n_views, val = 1 if probe else args.aug_views, train["val"]
    encode = functools.partial(encode_views, clip_model.encode_image, device=device,
                               precision=args.precision, workers=args.workers)  # fmt: skip
    views = encode(train["train"], transform, views=n_views, seed=args.seed)  # (views, N, D)
    f_val = encode(val, test_transform(n_px))[0] if val else None  # (M, D)
    print(f"precomputed features: {n_views} views of {views.shape[1]} training images, "
          f"{len(val)} validation images, in {time.time() - t:.1f}s")  # fmt: skip
    return argparse.Namespace(views=views, y=label_tensor(train["train"], device), f_val=f_val,
        y_val=label_tensor(val, device), W=W, s=clip_model.logit_scale.exp().item(),
        n_cls=len(train["classnames"]), dim=views.shape[-1], device=device)  # fmt: skip


def draw_validation(args, train, k):
    """The validation set of the choices, never from test: k images per class (seeded) of the val
    split (all if k is None), else k or min(shots, 4) of the training images not among the shots."""
    pool = train["val"]
    if not pool:  # the other training images of the same classes
        data, taken = load_dataset(args.data, args.split_file), set(train["train"])
        pool = [x for x in subsample_classes(data, args.subsample)["train"] if x not in taken]
        k = k or min(args.shots, 4)
    by_class = {}
    for item in pool:
        by_class.setdefault(item[1], []).append(item)
    empty = [c for y, c in enumerate(train["classnames"]) if y not in by_class]
    if empty:
        where = "val split" if train["val"] else "training images left after the shots"
        fail(f"{args.data}: no validation image of the classes {empty[:5]} in the {where}; add a "
             "val/ folder or use fewer --shots")  # fmt: skip
    rng = random.Random(args.seed + 1)  # a whole class (k None) is drawn too: the same order
    take = lambda group: rng.sample(group, min(k or len(group), len(group)))
    return [x for y in sorted(by_class) for x in take(by_class[y])]


# -- One optimisation step on precomputed features (the unit the loops, tests and bench.py call) --
def train_step(logits_fn, optimizer, features, labels, scheduler=None):
    """logits_fn(features) -> (B, C) logits. No CLIP here: fp32 precomputed features, fp32
    parameters, whatever --precision, so no loss scaling is needed."""
    logits = logits_fn(features)
    loss = F.cross_entropy(logits, labels)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}; lower --lr or the alpha/beta values")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:  # Tip-Adapter-F: cosine per iteration
        scheduler.step()
    return loss.item(), accuracy(logits, labels)


# ---- The four methods on the precomputed features `feats` (each -> its model, its choices), after
# the epoch that CLIP-Adapter and Tip-Adapter-F share
def train_epoch(epoch, args, feats, run_dir, forward, optimizer, generator, scheduler=None):
    """One epoch of CLIP-Adapter or Tip-Adapter-F on the precomputed views (their codes crop afresh
    every epoch), logged -> the validation accuracy (None without validation features)."""
    lr, t = optimizer.param_groups[0]["lr"], time.time()
    batches = epoch_batches(feats.views, feats.y, args.batch_size, generator)  # each image once
    loss, acc = zip(*[train_step(forward, optimizer, f, y, scheduler) for f, y in batches])
    values = dict(lr=lr, loss=loss, train_acc=acc)  # loss, acc: one value per step
    if feats.f_val is not None:
        with torch.no_grad():
            values["val_acc"] = accuracy(forward(feats.f_val), feats.y_val)
    seconds = time.time() - t
    log_epoch(run_dir, epoch + 1, args.epochs, seconds, len(feats.y), **values)
    return values.get("val_acc")


def run_clip_adapter(args, feats, run_dir):
    """[CLIP-Adapter] trained by CoOp's recipe on the precomputed views; the last epoch is kept (its
    code, a trainer in CoOp's code base, selects nothing). Mixed recipes: alpha 0.2 is the code's
    fixed ratio (the paper tunes it); the 10 views, crop area 0.5-1, are Tip-Adapter's; the last
    partial batch is kept (CoOp's Dassl library drops it)."""
    model = ClipAdapter(feats.dim).to(feats.device)  # reduction 4, as the code
    sgd = dict(momentum=0.9, weight_decay=args.weight_decay)  # CoOp's SGD
    optimizer = torch.optim.SGD(model.parameters(), args.lr, **sgd)
    forward = lambda f: clip_adapter_logits(f, model, args.alpha, feats.W, feats.s)
    generator = torch.Generator().manual_seed(args.seed)  # each epoch's views and order
    for epoch in range(args.epochs):
        for group in optimizer.param_groups:  # CoOp's: a warm-up epoch at 1e-5, cosine per epoch
            group["lr"] = lr_at_epoch(epoch, args.lr, args.epochs)
        train_epoch(epoch, args, feats, run_dir, forward, optimizer, generator)  # val: shown only
    return model, dict(alpha=args.alpha)


def run_tip(args, feats, run_dir, model=None):
    """[Tip-Adapter] alpha, beta by the authors' grid on a cache: built here (training-free), or
    the fine-tuned one of Tip-Adapter-F (model)."""
    if model is None:  # K, V built
        model = TipAdapter(*build_cache(feats.views, feats.y, feats.n_cls)).to(feats.device)
    K, V, f_val = model.cache_keys.detach(), model.cache_values, F.normalize(feats.f_val, dim=-1)
    grid = (args.search_scale, args.search_step)
    val_acc, alpha, beta = search_alpha_beta(f_val, feats.y_val, feats.W, K, V, feats.s, *grid)
    print(f"alpha {alpha:.3f}, beta {beta:.3f}: validation accuracy {val_acc:.2f}")
    return model, dict(val_acc=val_acc, alpha=alpha, beta=beta)


def run_tip_f(args, feats, run_dir):
    """[Tip-Adapter-F] the built keys fine-tuned (alpha, beta at their initial values); the epoch
    best on validation is kept (the code: the best on test), then alpha and beta are searched."""
    model = TipAdapterF(*build_cache(feats.views, feats.y, feats.n_cls)).to(feats.device)
    adamw = dict(eps=1e-4, weight_decay=args.weight_decay)  # the code's eps, chosen for fp16
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, **adamw)
    n_steps = args.epochs * math.ceil(len(feats.y) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, n_steps)  # per iteration
    forward = lambda f: model(F.normalize(f, dim=-1), feats.W, args.alpha, args.beta, feats.s)
    generator = torch.Generator().manual_seed(args.seed)  # each epoch's views and order
    best_acc, best_epoch, best_state = -1.0, 0, None  # the epoch best on validation
    for epoch in range(args.epochs):  # the same 10 views that built the keys
        val_acc = train_epoch(epoch, args, feats, run_dir, forward, optimizer, generator, scheduler)
        if val_acc > best_acc:
            best_acc, best_epoch, best_state = val_acc, epoch + 1, learned_state(model)
    model.load_state_dict(best_state, strict=False)  # the keys of the best epoch
    model, chosen = run_tip(args, feats, run_dir, model)  # [Tip-Adapter] the grid, on these keys
    return model, dict(epoch=best_epoch, **chosen)


def run_linear_probe(args, feats, run_dir):
    """[Linear probe] on the raw test-transform features, its C_reg by lpclip's search on val."""
    model = nn.Linear(feats.dim, feats.n_cls).to(feats.device)  # P (C, D), b (C,)
    fit = lambda C_reg: fit_linear_probe(feats.views[0], feats.y, feats.n_cls, C_reg)  # L-BFGS
    val_accuracy = lambda probe: accuracy(feats.f_val @ probe[0].t() + probe[1], feats.y_val)
    C_reg, (P, b), val_acc = search_C_reg(fit, val_accuracy)
    print(f"C_reg = {C_reg:.4g}: validation accuracy {val_acc:.2f}")
    model.load_state_dict(dict(weight=P, bias=b))
    return model, dict(C_reg=C_reg, val_acc=val_acc)


def visual_sum(clip_model):
    """Which image encoder, for --eval-only's check (a name may be a path): its weights as fp16,
    summed in float64 on the CPU to 8 digits, so the same for every --precision and device."""
    weights = [p.detach().cpu().half().double() for p in clip_model.visual.parameters()]
    return float(f"{sum(w.sum().item() for w in weights):.8g}")


def from_checkpoint(args, ckpt, config):
    """--eval-only: the model (learned `state`, Tip's built `fixed` tensors), choices in --load."""
    if args.method == "clip-adapter":
        model = ClipAdapter(config["dim"])
    elif args.method == "linear-probe":
        model = nn.Linear(config["dim"], len(ckpt["classnames"]))
    elif args.method == "tip":
        model = TipAdapter(ckpt["fixed"]["cache_keys"], ckpt["fixed"]["cache_values"])
    else:
        model = TipAdapterF(ckpt["state"]["cache_keys"], ckpt["fixed"]["cache_values"])
    load_learned(model.to(args.device), ckpt, args.load, config)
    return model, ckpt["chosen"]


@torch.no_grad()
def evaluate(args, clip_model, model, chosen, classnames, templates, test_sets):
    """Zero-shot CLIP and the method on every test set, encoded only now, after every choice."""
    device, n_px = torch.device(args.device), clip_model.visual.input_resolution
    s, zero_shot, acc, not_scored = clip_model.logit_scale.exp().item(), {}, {}, {}
    for name, (items, names) in test_sets.items():
        f = encode_views(clip_model.encode_image, items, test_transform(n_px), device,
                         args.precision, workers=args.workers)[0]  # (N, D) raw  # fmt: skip
        y, W = label_tensor(items, device), zeroshot_classifier(clip_model, names, templates)
        zero_shot[name] = accuracy(s * F.normalize(f, dim=-1) @ W.t(), y)
        if args.method == "clip-adapter":  # the adapter does not depend on the class names
            score = lambda x: clip_adapter_logits(x, model, chosen["alpha"], W, s)
        elif args.method.startswith("tip"):  # by name; a class the cache lacks stays zero-shot
            where = [classnames.index(n) if n in classnames else len(classnames) for n in names]
            V = F.pad(model.cache_values, (0, 1))[:, where]  # (N, C + 1) -> (N, C_test)
            K, alpha, beta = model.cache_keys, chosen["alpha"], chosen["beta"]
            score = lambda x: tip_adapter_logits(F.normalize(x, dim=-1), W, K, V, alpha, beta, s)
        elif set(names) <= set(classnames):  # the probe scores its training classes only
            score = lambda x: model(x)[:, [classnames.index(n) for n in names]]
        else:
            not_scored[name] = "classes the linear probe was not trained on"
            continue
        acc[name] = accuracy(torch.cat([score(x) for x in f.split(1024)]), y)  # 1024 at a time
    return zero_shot, acc, not_scored


# ---- main: data, CLIP and the text classifier, the precomputed features, the method, results ----
def main(args):
    device, method = torch.device(args.device), args.method
    ckpt = load_checkpoint(args.load) if args.load else None  # bad input, before any long work
    if ckpt and ckpt.get("config", {}).get("method") != method:
        fail(f"{args.load} is a checkpoint of {ckpt.get('config')}, not of --method {method}")
    template = resolve_template(args.template)  # shared with zeroshot.py, as --ensemble select
    templates = TEMPLATES_SELECT if args.ensemble == "select" else [template]
    dataset, train, test_sets = load_task(args, None if args.eval_only else args.shots)
    if not train["train"] and not args.eval_only:
        fail(f"{args.data}: no training images (a train/ folder or the split file's train list)")
    if method != "clip-adapter" and not args.eval_only:  # to choose alpha/beta, the epoch, C_reg
        train["val"] = draw_validation(args, train, args.val_shots)
        check_images(train["val"])
    folder = f"{args.shots}shot_seed{args.seed}" + ("_eval" if args.eval_only else "")
    run_dir = args.out or os.path.join("runs", method, dataset, folder)
    torch.manual_seed(args.seed)
    # Frozen CLIP and the frozen text classifier W of the training classes
    clip_model = load_clip(args.backbone, device, args.precision)
    config = dict(method=method, backbone=args.backbone, dim=clip_model.visual.output_dim)
    config["visual_sum"] = visual_sum(clip_model)  # which image encoder (its name may be a path)
    classnames = ckpt["classnames"] if ckpt else train["classnames"]
    W = zeroshot_classifier(clip_model, classnames, templates)  # (C, D)
    os.makedirs(run_dir, exist_ok=True)
    save(os.path.join(run_dir, "args.json"), vars(args))
    # The method on the precomputed features (with --eval-only: as the checkpoint holds it)
    t0 = time.time()
    if args.eval_only:
        model, chosen = from_checkpoint(args, ckpt, config)
    else:
        feats = precompute_features(args, clip_model, train, W)
        t0 = time.time()  # train_seconds: the method alone, after the image encoder
        if os.path.exists(os.path.join(run_dir, "log.jsonl")):
            os.remove(os.path.join(run_dir, "log.jsonl"))  # a fresh run starts a fresh log
        run = {"clip-adapter": run_clip_adapter, "tip": run_tip, "tip-f": run_tip_f,
               "linear-probe": run_linear_probe}  # fmt: skip
        model, chosen = run[method](args, feats, run_dir)
        state = dict(config=config, classnames=classnames, state=learned_state(model))
        fixed = dict(model.named_buffers())  # Tip's built keys (tip) and values, to evaluate
        save(os.path.join(run_dir, "checkpoint.pt"), dict(state, fixed=fixed, chosen=chosen))
    extra = dict(precision=args.precision, train_seconds=round(time.time() - t0, 3), chosen=chosen)
    zero_shot, acc, extra["not_scored"] = evaluate(args, clip_model, model, chosen, classnames,
                                                   templates, test_sets)  # fmt: skip
    epochs = args.epochs if method in ("clip-adapter", "tip-f") and not args.eval_only else 0
    return finish_run(run_dir, args, method, dataset, zero_shot, acc, epochs=epochs, **extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--method", choices=list(PRESETS), default="clip-adapter", help="the method")
    add("--backbone", default="RN50", help="CLIP name or checkpoint path")
    add("--data", required=True, help="root with train/ [val/] test/, or --split-file's images")
    add("--split-file", help="CoOp's split_zhou_<Name>.json (then --data is its image root)")
    add("--shots", type=int, default=16, help="training images per class (seeded sample)")
    val = "validation images per class (None: all) for alpha/beta, Tip-F's epoch, C, from val/ "
    add("--val-shots", type=int, help=val + "or from the training images not among the shots")
    base_new = "base-to-new: 'base' trains on the first half of the classes, also tests 'new'"
    add("--subsample", choices=["all", "base", "new"], default="all", help=base_new)
    add("--eval-data", nargs="*", default=[], help="extra test sets (ImageFolder roots)")
    add("--template", help="a template with {} for the class name, or a dataset of CoOp's table")
    add("--ensemble", choices=["none", "select"], help="select: the 7 ImageNet templates instead")
    add("--aug-views", type=int, default=10, help="views per training image, precomputed (Tip's)")
    add("--crop-scale", type=float, default=0.5, help="the views' least crop area (Tip's 0.5)")
    add("--alpha", type=float, help="CLIP-Adapter: residual ratio; Tip-F: the cache's weight")
    add("--beta", type=float, help="Tip-F: the sharpness (tip: both from the search)")
    grid = dict(nargs=2, metavar=("BETA", "ALPHA"))
    add("--search-scale", type=float, **grid, help="Tip: the grid's maxima")
    add("--search-step", type=int, default=[200, 20], **grid, help="Tip: the grid's steps")
    add("--epochs", type=int, help="training epochs")
    add("--batch-size", type=int, help="training batch size")
    add("--lr", type=float, help="base learning rate (CLIP-Adapter: SGD; Tip-F: AdamW)")
    add("--weight-decay", type=float, help="weight decay")
    add("--load", help="checkpoint.pt of this method and backbone, to evaluate (--eval-only)")
    add("--eval-only", action="store_true", help="evaluate --load: no training image is read")
    args = parse(p, argv, PRESETS, lambda a: a.method, learned=False)  # then the checks
    counts = [getattr(args, k, 1) for k in ("shots", "aug_views", "epochs", "batch_size")]
    if min(counts) < 1 or (getattr(args, "val_shots", None) or 1) < 1:
        fail("--shots, --val-shots, --aug-views, --epochs and --batch-size must be at least 1")
    if not 0 < args.crop_scale <= 1:
        fail(f"--crop-scale {args.crop_scale}: the smallest crop's area is a fraction in (0, 1]")
    if args.method == "clip-adapter" and not 0 <= args.alpha <= 1:
        fail(f"--alpha {args.alpha}: CLIP-Adapter's residual ratio lies in [0, 1] (its code: 0.2)")
    tip = args.method in ("tip", "tip-f")
    if tip and not (0 <= args.alpha <= 100 and 0 <= args.beta <= 100):
        fail(f"--alpha {args.alpha}, --beta {args.beta}: weight and sharpness lie in [0, 100]")
    if tip and (min(args.search_scale) <= 0.1 or min(args.search_step) < 1):
        fail(f"--search-scale {args.search_scale} --search-step {args.search_step}: both maxima "
             "must exceed 0.1 (the grid's start), both steps be at least 1")  # fmt: skip
    if args.eval_only != bool(args.load):  # a method fits in seconds: no training goes on from one
        fail("--eval-only needs --load <checkpoint.pt>, and --load needs --eval-only")
    return args


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


# --- shared: training (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
def epochs_for_shots(args):
    """50/100/200 for 1/2-4/8-16 shots (CoOp's configs)"""
    return 50 if args.shots <= 1 else 100 if args.shots <= 4 else 200


def lr_at_epoch(epoch, base_lr, epochs, warmup_lr=1e-5):
    """CoOp's (Dassl's) per-epoch schedule: epoch 0 at warmup_lr, then a cosine over `epochs`."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def log_epoch(run_dir, epoch, epochs, seconds, n_images, **values):
    """log.jsonl's line for an epoch: each value's mean over steps, seconds, images/s."""
    record = {"epoch": epoch, **{k: float(np.mean(v)) for k, v in values.items()}}
    record.update(seconds=round(seconds, 3), images_per_s=round(n_images / seconds, 1))
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    shown = "  ".join(f"{k} {record[k]:.4g}" for k in values)
    print(f"epoch {epoch}/{epochs}  {shown}  {seconds:.1f}s  {record['images_per_s']} img/s")


def learned_state(model):  # the learned (requires_grad) tensors: all a checkpoint holds of it
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_checkpoint(path):
    if not os.path.isfile(path):
        fail(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path}: cannot read this checkpoint ({e}); is it a checkpoint.pt of this project?")


def load_learned(model, checkpoint, path, config):
    """Copy `checkpoint`'s learned tensors into `model` if it has the same options and shapes."""
    theirs, mine = checkpoint["state"], learned_state(model)
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}
    options = lambda c: {k: v for k, v in (c or {}).items() if k != "backbone"}  # name or path
    if options(checkpoint.get("config")) != options(config) or shapes(theirs) != shapes(mine):
        fail(f"{path} does not fit this run: it holds {shapes(theirs)}, written with "
             f"{checkpoint.get('config')}; this run ({config}) learns {shapes(mine)}")  # fmt: skip
    model.load_state_dict(theirs, strict=False)


# --- end shared: training ---


if __name__ == "__main__":
    main(parse_args())
