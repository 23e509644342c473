"""VPT inside CLIP's image encoder, and pixel-space visual prompting (the padding prompt).

Papers  VPT: Jia et al., "Visual Prompt Tuning", arXiv 2203.12119; code github.com/KMnP/vpt
             ("KMnP" below: the VPT authors' GitHub organisation, whose repository is vpt)
        Pad: Bahng et al., "Exploring Visual Prompts for Adapting Large-Scale Models", 2203.17274;
             code github.com/hjbahng/visual_prompting

The idea. CoOp learns words on CLIP's text side; these methods learn on the image side. VPT adds
p learned tokens to the sequence of CLIP's frozen vision transformer: shallow, one set at the
input that every layer carries along; deep, a fresh set before every block that *replaces* the
previous block's outputs there (the length stays 1 + p + N). Bahng et al. learn one border in
pixel space (30 px at 224 px) added to every normalised image, so any backbone works.

Equations (blocks L_1..L_n, 1-indexed here, 0-indexed in the code; x_i, Z_i, E_i: the class token
[CLS], the prompt outputs and the patch tokens L_i outputs; P_{i-1}: the prompts L_i reads =
self.prompts[i-1]; W the frozen text classifier, 1/tau CLIP's logit scale, about 100)
  [VPT-shallow]  [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}]),  Z_0 = P_0 (carried through)
  [VPT-deep]     [x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])  (the prompt outputs are dropped)
  [CLIP head]    logits = cos(f(x), W) / tau,  f(x) = ln_post(x_n) @ proj, CLIP's image feature
  [VPT linear head]  logits = head(f(x)), head a learned Linear(D, n_classes) (--head linear)
  [Pad]          x' = x + border (zero inside the centre), x the normalised image
Learned: prompts (n_layers if deep else 1, p, width) or the border's four tensors (69,840 numbers
at 224 px); the linear head. Frozen: all of CLIP; unlike coop.py its image encoder is in the graph.

The papers' settings (PRESETS below; --help prints them). VPT with CLIP's text head: MaPLe's
"Deep Vision Prompting" baseline (MaPLe: Khattak et al., arXiv 2210.03117, code
muzairkhattak/multimodal-prompt-learning), the only published recipe for it: 8 prompts at all 12
layers, SGD lr 0.0025, batch 4, 5 epochs, a warm-up epoch at 1e-5 then cosine (the schedule of
Dassl, the library under CoOp's and MaPLe's code), its prompts after the patches.
Its numbers (ViT-B/16: base 80.24, new 73.43, harmonic mean 76.68) need --placement maple.
--head linear: VPT's recipe for a random head. Pad: Bahng et al.'s, ViT-B/32, SGD lr 40,
batch 256, 1000 epochs, 1000 warm-up steps; training images through CLIP's preprocess.

Run
  python vpt.py --backbone toy/clip_vit.pt --data toy/sketch --shots 4 --epochs 20 --crop-scale 1
  python vpt.py --data DATA/oxford_pets/images --shots 16 --subsample base \
      --split-file DATA/oxford_pets/split_zhou_OxfordPets.json  # or --method pad, --head linear
"""

import argparse
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

with warnings.catch_warnings():  # openai-clip 1.0.1 imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip


# Presets: each recipe's defaults (what the command line gives wins) ------------------------------
def kmnp_lr(args):
    """0.01 x batch / 256 (KMnP's default base lr, scaled by the batch as its tuning scripts do)"""
    return 0.01 * args.batch_size / 256


PRESETS = {
    # MaPLe's VPT (configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml)
    "shallow/deep": dict(backbone="ViT-B/16", epochs=5, batch_size=4, lr=0.0025,
                         weight_decay=5e-4, warmup=1, template="a photo of a {}."),
    # Bahng et al.'s main_clip.py (their ViT-B/32; ViT-B/16 does better, they add)
    "pad": dict(backbone="ViT-B/32", epochs=1000, batch_size=256, lr=40.0, weight_decay=0.0,
                warmup=1000, template="This is a photo of a {}"),
    # KMnP's configs/base-prompt.yaml: a random head needs VPT's recipe, not MaPLe's (made for
    # CLIP's text head); KMnP searches the base lr per task (0.05 to 50)
    "linear head": dict(backbone="ViT-B/16", epochs=100, batch_size=128, lr=kmnp_lr,
                        weight_decay=1e-4, warmup=10, template="a photo of a {}."),
}  # fmt: skip


def recipe(a):  # the preset a run takes: the linear head's whatever the prompts, else the method's
    return "linear head" if a.head == "linear" else "pad" if a.method == "pad" else "shallow/deep"


# The method: prompt tokens inside the ViT, the padding prompt, the two heads ---------------------
class PromptedViT(nn.Module):
    """CLIP's frozen vision transformer with p learned prompt tokens (VPT), an explicit forward.
    placement "vpt" (the VPT paper, KMnP's code): [CLS, P_1..P_p, patch_1..patch_N] after ln_pre,
        init uniform(-v, v), v = sqrt(6 / (3 * patch^2 + width)) (0.0625 for ViT-B/16).
    placement "maple" (MaPLe's "Deep Vision Prompting", the CLIP base-to-new "VPT" numbers):
        [CLS, patch_1..patch_N, P_1..P_p] before ln_pre, init N(0, 0.02^2) as MaPLe's code.
    No position embedding for either. forward(images) is a feature like visual(images), (B, D)."""

    # Not promptsync.py's forward: MaPLe's own vision prompts there are projections of text prompts
    def __init__(self, visual, n_prompts, deep, dropout=0.0, placement="vpt"):
        super().__init__()
        if not hasattr(visual, "transformer"):
            name = type(visual).__name__
            raise ValueError(f"prompt tokens need a ViT, not a {name}: try --method pad (any CLIP)")
        self.visual, self.n_prompts, self.deep, self.placement = visual, n_prompts, deep, placement
        width, patch = visual.conv1.out_channels, visual.conv1.kernel_size[0]
        prompts = torch.empty(len(visual.transformer.resblocks) if deep else 1, n_prompts, width)
        if placement == "vpt":  # KMnP's "xavier_uniform": fan_in 3 * patch^2, fan_out width
            v = math.sqrt(6.0 / (3 * patch * patch + width))
            nn.init.uniform_(prompts, -v, v)
        else:  # MaPLe's VPT
            nn.init.normal_(prompts, std=0.02)
        self.prompts = nn.Parameter(prompts)
        self.dropout = nn.Dropout(dropout)  # on the prompts only (VPT's demo: 0.1 for deep)

    def prompt(self, i, batch, dtype):
        """Prompt set i for every image, (B, p, width); dropout draws one mask per image."""
        return self.dropout(self.prompts[i].to(dtype).expand(batch, -1, -1))

    def forward(self, images):
        v, p = self.visual, self.n_prompts
        x = v.conv1(images.type(v.conv1.weight.dtype))  # (B, width, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, N, width), N = grid^2
        B, width = x.shape[0], x.shape[-1]
        zeros = torch.zeros(B, 1, width, dtype=x.dtype, device=x.device)
        x = torch.cat([v.class_embedding.to(x.dtype) + zeros, x], dim=1)  # (B, 1+N, width)
        x = x + v.positional_embedding.to(x.dtype)  # the prompts never get a position embedding
        if self.placement == "vpt":
            # After ln_pre: KMnP puts the prompts into what the first block reads (in CLIP, ln_pre's
            # output), as every deep set; ln_pre would re-normalise them and undo their init scale
            x = v.ln_pre(x)
            x = torch.cat([x[:, :1], self.prompt(0, B, x.dtype), x[:, 1:]], dim=1)  # [VPT-shallow]
            rows = slice(1, 1 + p)  # the prompts' positions in [CLS, P, patches] (LND's L)
        else:  # [MaPLe] appended after the patches, layer-normed with them
            x = v.ln_pre(torch.cat([x, self.prompt(0, B, x.dtype)], dim=1))  # (B, 1+N+p, width)
            rows = slice(x.shape[1] - p, x.shape[1])
        x = x.permute(1, 0, 2)  # NLD -> LND
        for i, block in enumerate(v.transformer.resblocks):
            if i > 0 and self.deep and p > 0:  # [VPT-deep] replace, not add: block i-1's outputs
                x[rows] = self.prompt(i, B, x.dtype).permute(1, 0, 2)  # at the prompts: (p, B, w)
            x = block(x)  # CLIP's own block: attention over all 1+p+N tokens, then the MLP
        x = x.permute(1, 0, 2)  # LND -> NLD
        return v.ln_post(x[:, 0, :]) @ v.proj  # f(x): the class token as CLIP pools: (B, D)


class PadPrompter(nn.Module):
    """[Pad] A learned border `pad` pixels wide added to the normalised image (zero centre), N(0, 1)
    init as the original: at 224 px, pad 30, 2 x (1, 3, 30, 224) + 2 x (1, 3, 164, 30) numbers."""

    def __init__(self, image_size, pad):
        super().__init__()
        if not 0 < 2 * pad < image_size:
            raise ValueError(f"border width {pad}: 1..{(image_size - 1) // 2} at {image_size} px")
        inner = image_size - 2 * pad
        self.pad_up = nn.Parameter(torch.randn(1, 3, pad, image_size))
        self.pad_down = nn.Parameter(torch.randn(1, 3, pad, image_size))
        self.pad_left = nn.Parameter(torch.randn(1, 3, inner, pad))
        self.pad_right = nn.Parameter(torch.randn(1, 3, inner, pad))
        self.register_buffer("centre", torch.zeros(1, 3, inner, inner), persistent=False)

    def border(self):
        middle = torch.cat([self.pad_left, self.centre, self.pad_right], dim=3)  # (1, 3, inner, S)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=2)  # (1, 3, S, S)

    def forward(self, x):
        return x + self.border()  # [Pad] x' = x + border, the same for every image; no clamping


class PaddedEncoder(nn.Module):
    """CLIP's frozen image encoder (ViT or ResNet) on images with the learned border added."""

    def __init__(self, visual, pad=None):  # Bahng et al.'s 30 px at 224, scaled (4 px at 32)
        super().__init__()
        pad = max(1, round(30 * visual.input_resolution / 224)) if pad is None else pad
        self.prompter, self.visual = PadPrompter(visual.input_resolution, pad), visual

    def forward(self, images):
        return self.visual(self.prompter(images).type(self.visual.conv1.weight.dtype))  # (B, D)


class TextHead(nn.Module):
    """CLIP's zero-shot classifier, frozen: logits = scale * normalise(f) @ W^T, W (n_cls, D)."""

    def __init__(self, weights, logit_scale):
        super().__init__()
        self.register_buffer("weights", weights.float(), persistent=False)
        self.register_buffer("scale", logit_scale.detach().float().exp(), persistent=False)

    def forward(self, features):
        return self.scale * F.normalize(features.float(), dim=-1) @ self.weights.t()  # [CLIP head]


def linear_head(dim, n_classes):
    """[VPT linear head] VPT's classifier on f(x), initialised as KMnP's; the bias is its
    special_bias, RetinaNet's prior 0.01 (a constant: softmax's cross-entropy never sees it)."""
    head = nn.Linear(dim, n_classes)
    nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))  # about -4.595
    return head


class VisualPromptedCLIP(nn.Module):
    """A prompted image encoder (PromptedViT or PaddedEncoder) followed by a head."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def train(self, mode=True):  # only the prompt dropout trains: CLIP stays in eval mode
        super().train(mode)  # (a ResNet's BatchNorm statistics must not move)
        self.encoder.visual.eval()
        return self

    def forward(self, images):
        return self.head(self.encoder(images).float())  # (B, n_cls)


def lr_at(name, epoch, i, n_batches, base_lr, epochs, warmup):
    """The learning rate of batch i of `epoch` in the schedule of recipe `name`."""
    if name == "shallow/deep":  # MaPLe's (Dassl's), warmup fixed: epoch 0 at 1e-5, then epoch e
        return lr_at_epoch(epoch, base_lr, epochs)  # at base_lr (1 + cos(pi (e - 1) / epochs)) / 2
    # linear warm-up, then cosine to 0: Bahng et al.'s per step, from base_lr / warmup; KMnP's per
    # epoch, from 0 (its first epoch trains at lr 0: WarmupCosineSchedule, src/solver/)
    pad = name == "pad"
    t, total = (epoch * n_batches + i, epochs * n_batches) if pad else (epoch, epochs)
    if t < warmup:
        return base_lr * (t + 1 if pad else t) / warmup
    progress = (t - warmup) / (total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def load_data(args):
    """load_task and this file's checks -> (dataset name, training items, test sets)."""
    dataset, train, test_sets = load_task(args, args.shots)
    if not train["train"] and not args.eval_only:
        fail(f"{args.data}: no training images (a train/ folder or the split file's train list)")
    if args.method == "pad":  # class names as Bahng et al. write them: lower case, "-" as a space
        for name, (items, names) in test_sets.items():
            test_sets[name] = (items, [c.lower().replace("-", " ") for c in names])
    if args.head == "linear" and any(n != test_sets["test"][1] for _, n in test_sets.values()):
        fail("--head linear knows its training classes only: use --head text for base-to-new")
    return dataset, train["train"], test_sets


def build_model(args, clip_model, classnames):
    """The prompted image encoder and its head, as the command line asks (CLIP frozen inside)."""
    visual = clip_model.visual
    try:
        if args.method == "pad":
            encoder = PaddedEncoder(visual, args.pad)
        else:
            deep = args.method == "deep"
            encoder = PromptedViT(visual, args.n_prompts, deep, args.dropout, args.placement)
    except ValueError as e:
        fail(f"--method {args.method} with --backbone {args.backbone}: {e}")
    if args.head == "linear":
        head = linear_head(visual.output_dim, len(classnames))
    else:  # CLIP's own classifier, encoded once
        weights = zeroshot_classifier(clip_model, classnames, [args.template])  # (n_cls, D)
        head = TextHead(weights, clip_model.logit_scale)
    model = VisualPromptedCLIP(encoder, head)
    assert not any(p.requires_grad for p in clip_model.parameters())
    learned = {k: tuple(v.shape) for k, v in learned_state(model).items()}
    print(f"vpt-{args.method}: learned {learned} = {sum(map(math.prod, learned.values())):,}")
    return model


def sgd(model, lr, weight_decay):
    """SGD, momentum 0.9 (all three recipes); the head's bias gets no weight decay (as KMnP's)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n != "head.bias"]}]
    groups += [{"params": [p], "weight_decay": 0.0} for n, p in named if n == "head.bias"]
    return torch.optim.SGD(groups, lr, momentum=0.9, weight_decay=weight_decay)


@torch.no_grad()
def save_border(prompter, path):
    """The border as a PNG (written atomically): the prompt on CLIP's mean colour (the gray centre),
    un-normalised (* std + mean), clipped, enlarged to be seen -> the PIL image."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = (prompter.border()[0].float().cpu() * std + mean).clamp(0, 1)  # (3, S, S)
    image = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    side = image.width * math.ceil(224 / image.width)  # at least 224 px
    image = image.resize((side, side), Image.NEAREST)
    image.save(f"{path}.tmp", format="PNG")
    os.replace(f"{path}.tmp", path)
    return image


@torch.no_grad()
def evaluate(model, clip_model, test_sets, template, workers, device, precision):
    """Zero-shot CLIP and the prompted model on every test set, one pass over each set's images ->
    ({set: zero-shot accuracy}, {set: accuracy}); a text head is re-encoded for each set."""
    zero_shot, ours, n_px = {}, {}, clip_model.visual.input_resolution
    for name, (items, classnames) in test_sets.items():
        weights = zeroshot_classifier(clip_model, classnames, [template])  # (n_cls, D)
        if isinstance(model.head, TextHead):  # the same frozen classifier, for these classes (it
            model.head = TextHead(weights, clip_model.logit_scale).to(device)  # stays on the model)
        logits, labels = ([], []), []
        for images, y in make_loader(items, test_transform(n_px), 100, workers, device):
            images = images.to(device)
            with autocast(device, precision):
                f = F.normalize(clip_model.encode_image(images).float(), dim=-1)  # (B, D)
                logits[0].append(f @ weights.t())
                logits[1].append(model(images).float())
            labels.append(y.to(device))
        zero_shot[name], ours[name] = (accuracy(torch.cat(z), torch.cat(labels)) for z in logits)
    return zero_shot, ours


# One optimisation step (the unit the training loop, the tests and bench.py call) -----------------
def train_step(model, optimizer, scaler, images, labels, precision):
    # unlike coop.py, the backward pass runs through the whole frozen image encoder to the prompts
    with autocast(images.device, precision):
        logits = model(images)  # (B, n_cls)
    loss = F.cross_entropy(logits.float(), labels)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}; try --precision fp32 or a lower --lr")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # amp and fp16: small fp16 activation gradients would be 0
    scaler.step(optimizer)  # SGD on the fp32 prompts (and head); skipped if a gradient overflowed
    scaler.update()
    return loss.item(), accuracy(logits, labels)


# main: data, model, the visible training loop, evaluation, results -------------------------------
def main(args):
    device, precision, pad = torch.device(args.device), args.precision, args.method == "pad"
    method, (dataset, train, test_sets) = f"vpt-{args.method}", load_data(args)
    folder = f"{args.shots}shot_seed{args.seed}" + ("_eval" if args.eval_only else "")
    run_dir = args.out or os.path.join("runs", method, dataset, folder)
    torch.manual_seed(args.seed)

    # Frozen CLIP, the prompted image encoder, the head
    clip_model = load_clip(args.backbone, device, precision)
    model = build_model(args, clip_model, test_sets["test"][1]).to(device)
    placement = None if pad else args.placement  # --load and --resume refuse another one
    config = dict(method=method, backbone=args.backbone, head=args.head, placement=placement)
    if args.load:
        load_learned(model, load_checkpoint(args.load), args.load, config)

    # Training: the visible loop; the learning rate as each recipe's schedule sets it
    os.makedirs(run_dir, exist_ok=True)
    save(os.path.join(run_dir, "args.json"), vars(args))
    optimizer = sgd(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision != "fp32")  # see train_step
    generator = torch.Generator().manual_seed(args.seed)  # the shuffling order, kept for --resume
    # Bahng et al.: CLIP's preprocess; MaPLe's VPT (here the linear head too): random crops, flip
    n_px = clip_model.visual.input_resolution
    transform = test_transform(n_px) if pad else train_transform(n_px, args.crop_scale)
    loader = make_loader(train, transform, args.batch_size, args.workers, device, shuffle=True,
                         generator=generator)  # fmt: skip
    start, train_seconds = 0, 0.0
    if args.resume:
        start, train_seconds = resume(run_dir, model, optimizer, scaler, generator, config)
    elif os.path.exists(os.path.join(run_dir, "log.jsonl")) and not args.eval_only:
        os.remove(os.path.join(run_dir, "log.jsonl"))  # a fresh run starts a fresh log
    for epoch in range(start, 0 if args.eval_only else args.epochs):
        model.train()  # the prompt dropout only: CLIP stays in eval mode
        t0, losses, accs, n = time.time(), [], [], 0
        for i, (images, labels) in enumerate(loader):
            lr = lr_at(recipe(args), epoch, i, len(loader), args.lr, args.epochs, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            loss, acc = train_step(model, optimizer, scaler, images, labels, precision)
            losses, accs, n = losses + [loss], accs + [acc], n + len(labels)
        seconds = time.time() - t0
        train_seconds += seconds
        log_epoch(run_dir, epoch + 1, args.epochs, seconds, n, lr=lr, loss=losses,
                  train_acc=accs)  # fmt: skip
        save_progress(run_dir, config, model, optimizer, scaler, epoch + 1, train_seconds,
                      generator)  # fmt: skip
    if pad:  # the learned border as a picture
        save_border(model.encoder.prompter, os.path.join(run_dir, "border.png"))

    # Evaluation of the last epoch against zero-shot CLIP. Bahng et al. keep the epoch with the best
    # accuracy on the test split itself (main_clip.py); the last epoch selects nothing on the test.
    model.eval()
    zero_shot, acc = evaluate(model, clip_model, test_sets, args.template, args.workers, device,
                              precision)  # fmt: skip
    speed = round(len(train) * args.epochs / train_seconds, 1) if train_seconds else None
    run = dict(epochs=0 if args.eval_only else args.epochs, precision=precision, images_per_s=speed)
    run["train_seconds"] = round(train_seconds, 2)
    return finish_run(run_dir, args, method, dataset, zero_shot, acc, **run)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--backbone", help="CLIP name or checkpoint (pad: any backbone, ResNets too)")
    add("--data", required=True, help="root with train/ [val/] test/, or --split-file's images")
    add("--split-file", help="CoOp's split_zhou_<Name>.json (then --data is its image root)")
    add("--shots", type=int, default=16, help="training images per class (seeded sample)")
    add("--subsample", choices=["all", "base", "new"], default="all", help="base-to-new split")
    add("--eval-data", nargs="*", default=[], help="extra test sets (ImageFolder roots)")
    add("--template", help="the text head's and the zero-shot baseline's template")
    add("--method", choices=["shallow", "deep", "pad"], default="deep", help="VPT or the border")
    add("--n-prompts", type=int, default=8, help="prompt tokens p per layer (MaPLe's VPT: 8)")
    add("--placement", choices=["vpt", "maple"], default="vpt", help="vpt: VPT's, after [CLS], "
        "after ln_pre; maple: MaPLe's VPT, after the patches, through ln_pre")  # fmt: skip
    add("--dropout", type=float, default=0.0, help="prompt dropout (VPT's demo: 0.1 for deep)")
    add("--pad", type=int, help="border width in pixels (default: 30 at 224 px, scaled)")
    add("--head", choices=["text", "linear"], default="text", help="CLIP's, or VPT's learned one")
    add("--epochs", type=int, help="training epochs")
    add("--batch-size", type=int, help="images per step")
    add("--lr", type=float, help="SGD's base learning rate")
    add("--weight-decay", type=float, help="SGD's weight decay")
    add("--warmup", type=int, help="pad: steps, a linear ramp from lr/warmup; linear head: epochs, "
        "a ramp from 0; shallow/deep: one epoch at 1e-5 (fixed)")  # fmt: skip
    add("--crop-scale", type=float, default=0.08, help="prompt tokens: random crops' smallest area")
    args = parse(p, argv, PRESETS, recipe)
    if recipe(args) == "shallow/deep" and args.warmup != 1:
        fail("--warmup: MaPLe's schedule for prompt tokens has one warm-up epoch (at 1e-5)")
    if args.eval_only and not args.load:
        fail("--eval-only needs --load <checkpoint.pt>")
    if args.shots < 1 or args.n_prompts < 0:
        fail("--shots must be at least 1 and --n-prompts at least 0")
    return args


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


# --- shared: resume (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
def save_progress(run_dir, config, model, optimizer, scaler, epoch, train_seconds, generator):
    """checkpoint.pt after each epoch: what --resume needs to go on exactly, the log included."""
    rng = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    rng.update(cuda=torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else None
    state = dict(config=config, state=learned_state(model), optimizer=optimizer.state_dict())
    state.update(scaler=scaler.state_dict(), epoch=epoch, train_seconds=train_seconds, rng=rng)
    state["log"] = open(os.path.join(run_dir, "log.jsonl")).read()
    save(os.path.join(run_dir, "checkpoint.pt"), state)


def resume(run_dir, model, optimizer, scaler, generator, config):
    """Restore the last epoch's checkpoint -> (epochs done, seconds so far); none yet: (0, 0)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    ckpt = load_checkpoint(path) if os.path.isfile(path) else dict(epoch=0, train_seconds=0, log="")
    if "state" in ckpt:
        load_learned(model, ckpt, path, config)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"]) if ckpt["scaler"] else None  # {}: not scaling
        torch.set_rng_state(ckpt["rng"]["torch"])
        generator.set_state(ckpt["rng"]["loader"])
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"]) if "cuda" in ckpt["rng"] else None
    save(os.path.join(run_dir, "log.jsonl"), ckpt["log"])
    print(f"{run_dir}: resuming after epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt["train_seconds"]


# --- end shared: resume ---


if __name__ == "__main__":
    main(parse_args())
