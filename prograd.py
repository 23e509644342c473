"""ProGrad: prompt tuning whose updates never oppose zero-shot CLIP's general knowledge.

Paper   Zhu et al., "Prompt-aligned Gradient for Prompt Tuning", arXiv 2205.14865
Code    github.com/BeierZhu/Prompt-align (ProGrad.public/trainers/prograd.py; the projection is in
        its copy of Dassl, the CoOp authors' training library: dassl/engine/trainer.py)

The idea. CoOp's learned context fits the few training images and can forget what CLIP knew.
ProGrad trains it beside a teacher, zero-shot CLIP's classifier from --template (the authors'
zs_clip), with two gradients per step: G_d, of the cross-entropy with the labels (domain-specific),
and G_g, of the KL divergence from the teacher's prediction to the prompt's (general). The part of
G_d against G_g (an angle over 90 degrees) is removed; lambda = 0: CoOp's step, G_g still computed.

Equations ([SOS], [EOT]: CLIP's start- and end-of-text tokens; g(.): CLIP's text encoder, read at
[EOT]; f: the L2-normalised image feature; tau: CLIP's frozen temperature, 1/tau about 100;
d: the token-embedding width (512); D: the image and text feature width (1024 RN50, 512 ViT-B))
  [CoOp Eq. 2]   t_c = [SOS] [V]_1 ... [V]_M [CLASS_c] [.] [EOT]       (class token at the end)
  [CoOp Eq. 3]   p(y=c|x) = exp(cos(g(t_c), f) / tau) / sum_j exp(cos(g(t_j), f) / tau)
  [ProGrad]      L_ce = CE(p, y),  L_kl = T^2 KL(p_zs || p_T) = T^2 sum_c p_zs log(p_zs / p_T),
                 p_zs(c|x) = softmax_c(cos(w_c, f) / (tau T)), w_c = g(template(c)) (the teacher),
                 p_T: p at tau T (T: the code's; paper: 1);  G_d = dL_ce/dctx,  G_g = dL_kl/dctx
  [ProGrad Eq. 5]  G = G_d - lambda (G_d.G_g / |G_g|^2) G_g  if G_d.G_g < 0,  else G = G_d
Variants: the class token in the middle or at the front; one context per class (CSC, --csc).
Learned: ctx = [V]_1..[V]_M, (M, d), or (n_cls, M, d) with --csc, from the template's words.
Frozen:  all of CLIP (image and text encoders, token embedding, logit scale).
`diff coop.py prograd.py`: the templates and their init, project, two_gradients, train_step;
the other changed lines take CoCoOp out.
Settings: PRESETS below (the papers'); SGD, momentum 0.9, weight decay 5e-4; a warm-up epoch at
1e-5, then a cosine stepped per epoch; the last partial batch is kept (Dassl's loader drops it).

Run (toy/: the synthetic world and tiny CLIPs that toyworld.py builds; see README.md)
  python prograd.py --backbone toy/clip_rn.pt --data toy/sketch --shots 4 --crop-scale 0.5
  python prograd.py --data DATA/pets/images --split-file DATA/pets/split_zhou_OxfordPets.json
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


def by_shots(args):  # a function, so that it can read --shots; --help shows its docstring
    """50/100/200 epochs for 1/2-4/8-16 shots; ImageNet: 50 at every count, pass --epochs 50"""
    return epochs_for_shots(args)  # CoOp's configs: see the shared training block, near the end


def by_dataset(args):  # the authors' code: CUSTOM_TEMPLATES[cfg.DATASET.NAME]
    """the dataset's own (by --split-file's name), else 'a photo of a {}.'"""
    name = os.path.basename(args.split_file or "").removesuffix(".json").replace("split_zhou_", "")
    return PROGRAD_TEMPLATES.get(name, "a photo of a {}.")


PRESETS = {"prograd": dict(backbone="RN50", n_ctx=16, ctx_init="template", epochs=by_shots, lam=1.0,
                           batch_size=32, temperature=1.0, template=by_dataset)}  # fmt: skip


# --- shared: text encoder (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
def text_encoder(clip_model, prompts, tokenized):
    """CLIP's encode_text on prompt embeddings (N, L, d), not token ids -> (N, D). It is causal
    (position i sees positions <= i only), so the end-of-text (EOT) feature depends only on the
    positions up to it: prompts cut after the longest EOT give CLIP's 77-position result exactly."""
    eot, dtype = tokenized.argmax(dim=-1), clip_model.dtype  # EOT: the largest id, (N,)
    n = int(eot.max()) + 1
    x = prompts[:, :n].type(dtype) + clip_model.positional_embedding[:n].type(dtype)
    mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
    x = x.permute(1, 0, 2)  # NLD -> LND: (n, N, d)
    for block in clip_model.transformer.resblocks:  # = block(x) with the causal mask cut to n
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = x.permute(1, 0, 2)[torch.arange(x.shape[1]), eot]  # LND -> NLD, the EOT rows: (N, d)
    return clip_model.ln_final(x).type(dtype) @ clip_model.text_projection  # (N, D)


# --- end shared: text encoder ---


# ---- The method: CoOp's prompt learner, the teacher's templates, the projection ------------------
PROGRAD_TEMPLATES = {  # [ProGrad] the authors'; the words before " {}." initialise ctx
    "OxfordPets": "a type of pet, a photo of a {}.", "Food101": "a type of food, a photo of {}.",
    "OxfordFlowers": "a type of flower, a photo of a {}.", "ImageNet": "a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}.", "SUN397": "a photo of a {}.",
    "DescribableTextures": "a texture of {}.", "EuroSAT": "a centered satellite photo of {}.",
    "UCF101": "a photo of a person doing {}.", "StanfordCars": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
}  # fmt: skip


class PromptLearner(nn.Module):
    """CoOp's: every class's prompt around the learned context `ctx` (the only parameter). The fixed
    pieces are buffers of token embeddings: token_prefix ([SOS]) and token_suffix (class name, ".",
    [EOT], padding); set_classnames rebuilds them for other classes (checkpoints hold ctx only)."""

    def __init__(self, clip_model, classnames, n_ctx=16, ctx_init="", csc=False, position="end"):
        super().__init__()
        d = clip_model.ln_final.weight.shape[0]  # token width (512 for RN50 and ViT-B)
        if ctx_init:  # [ProGrad] template init: [SOS] 0..0 <k template words> CLASS . [EOT]
            # The zeros go through the encoder too: the student starts near the teacher, not at it.
            # k counts WORDS (the authors'): "pet, a" is 2 words, 3 tokens; the third stays frozen.
            k = len(ctx_init.split())
            if k > n_ctx:
                raise ValueError(f"the template {ctx_init!r} has {k} words, more than M = {n_ctx}")
            self.prefix_text = " ".join(["X"] * (n_ctx - k) + [ctx_init])
            tokens = tokenize(clip_model, [ctx_init]).to(clip_model.logit_scale.device)
            embedding = clip_model.token_embedding(tokens)  # (1, L, d), CLIP frozen: no graph
            ctx = F.pad(embedding[0, 1 : 1 + k].float(), (0, 0, n_ctx - k, 0))  # (M, d)
            # The original ignores --csc when init words are given; we give every class its own
            # copy, so that a class-specific context also starts from the init words.
            ctx = ctx.repeat(len(classnames), 1, 1) if csc else ctx  # (n_cls, M, d)
        else:  # [CoOp] random init N(0, 0.02^2); the placeholder words "X" are replaced by ctx
            ctx = torch.empty((len(classnames), n_ctx, d) if csc else (n_ctx, d))
            nn.init.normal_(ctx, std=0.02)
            self.prefix_text = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx)  # (M, d), or (n_cls, M, d) with a class-specific context
        self.n_ctx, self.csc, self.position = ctx.shape[-2], csc, position
        self.set_classnames(clip_model, classnames)

    def set_classnames(self, clip_model, classnames):
        if self.csc and len(classnames) != self.ctx.shape[0]:
            learned = f"learned for {self.ctx.shape[0]} classes; got {len(classnames)}"
            raise ValueError(f"the class-specific context was {learned}")
        texts = [f"{self.prefix_text} {c}." for c in classnames]  # [CoOp] note the trailing period
        try:
            tokenized = tokenize(clip_model, texts).to(clip_model.logit_scale.device)  # (n_cls, L)
        except RuntimeError:  # clip.tokenize: too long
            what = f"longer than the model's context length {clip_model.context_length}"
            raise ValueError(f"a prompt is {what}; use a smaller --n-ctx, shorter names") from None
        embedding = clip_model.token_embedding(tokenized).float()  # (n_cls, L, d)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # [SOS]
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx :], persistent=False)
        self.register_buffer("tokenized", tokenized, persistent=False)  # to find [EOT]
        if self.position != "end":
            order = class_token_order(tokenize(clip_model, classnames), self.n_ctx, self.position)
            self.register_buffer("order", order.to(tokenized.device), persistent=False)

    def forward(self):
        """[CoOp Eq. 2] every class's whole prompt: (n_cls, L, d)."""
        n_cls = self.token_prefix.shape[0]
        ctx = self.ctx if self.csc else self.ctx.expand(n_cls, -1, -1)  # (n_cls, M, d)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (n_cls, L, d)
        if self.position != "end":  # the class name moves: each row goes where `order` says
            prompts = prompts.gather(1, self.order.expand_as(prompts))
        return prompts

    def prefix(self):
        """[SOS] [V]_1..[V]_M, the part of the prompt every class shares: (1, 1 + M, d)."""
        return torch.cat([self.token_prefix[:1], self.ctx.unsqueeze(0)], dim=1)


def class_token_order(name_tokens, n_ctx, position):
    """CoOp's 'middle' and 'front': the row of the 'end' layout that each position takes. E.g.
    M = 2, a one-token name: end [S V1 V2 N . E] -> middle order [0, 1, 3, 2, 4, 5]."""
    order, L, M = [], name_tokens.shape[1], n_ctx
    for n in (name_tokens.argmax(dim=-1) - 1).tolist():  # BPE tokens of each class name
        v, name, rest = range(1, 1 + M), range(1 + M, 1 + M + n), range(1 + M + n, L)
        if position == "middle":  # [SOS] [V]_1..[V]_M/2 [CLASS] [V]_M/2+1..[V]_M [.] [EOT]
            order.append([0, *v[: M // 2], *name, *v[M // 2 :], *rest])
        else:  # front: [SOS] [CLASS] [V]_1..[V]_M [.] [EOT]
            order.append([0, *name, *v, *rest])
    return torch.tensor(order).unsqueeze(-1)  # (n_cls, L, 1)


class CustomCLIP(nn.Module):
    """CoOp's model (the official code's name): logits of the normalised image features against
    the learned prompts."""

    def __init__(self, clip_model, classnames, n_ctx=16, ctx_init="", csc=False, position="end"):
        super().__init__()
        self.prompt_learner = PromptLearner(clip_model, classnames, n_ctx, ctx_init, csc, position)
        self.clip = clip_model  # frozen; its text tower encodes the prompts
        self.logit_scale = clip_model.logit_scale  # CLIP's own, frozen: ln(1/tau)
        # A generic context with the class name at the end gives every class the same prefix
        # [SOS] [V]_1..[V]_M, which the speed-ups run once (not so with --csc or middle/front).
        self.prefix_is_shared = not csc and position == "end"

    def forward(self, image_features):
        # image_features: (B, D), L2-normalised, from the frozen image encoder
        pl, clip_model, inv_tau = self.prompt_learner, self.clip, self.logit_scale.exp()
        if self.prefix_is_shared:  # exactly the plain formulation, faster: shared_prefix (tested)
            text = shared_prefix(clip_model, pl.prefix(), pl.token_suffix, pl.tokenized)
        else:  # the plain formulation: every class's prompt through the text encoder
            text = text_encoder(clip_model, pl(), pl.tokenized).unsqueeze(0)  # (1, n_cls, D)
        text = F.normalize(text.float(), dim=-1)  # (1, n_cls, D)
        return inv_tau * image_features @ text[0].t()  # [CoOp Eq. 3] (B, n_cls)


def project(G_d, G_g, lam):
    """[ProGrad Eq. 5] G = G_d - lambda (G_d.G_g / |G_g|^2) G_g if G_d.G_g < 0, else G_d (fp32)."""
    g_d, g_g = G_d.float(), G_g.float()
    dot, norm2 = (g_d * g_g).sum(), (g_g * g_g).sum()  # G_g = 0: dot 0, G_d stays (as the authors')
    if dot < 0:  # the update would undo part of the general knowledge: remove that part
        return (g_d - lam * dot / norm2 * g_g).to(G_d.dtype)
    return G_d  # no conflict: the domain-specific gradient as it is


def two_gradients(model, image_features, teacher, labels, temperature, params, precision, scale):
    """[ProGrad] (G_d, G_g per tensor of params, L_ce, L_kl, logits) from ONE student forward."""
    with autocast(image_features.device, precision):
        logits = model(image_features).float()  # (B, n_cls), the rest in fp32
    with torch.no_grad():  # the teacher, on the same features (the authors' code: a CLIP copy)
        p_zs = F.softmax(model.logit_scale.exp() * image_features @ teacher.t() / temperature, -1)
    loss_ce = F.cross_entropy(logits, labels)  # [ProGrad] L_ce
    # As the authors' code: L_kl = T^2 mean_b sum_c -p_zs log p_T, the soft-target cross-entropy.
    # It differs from KL(p_zs || p_T) by p_zs's entropy, a constant: the gradient is the KL's.
    loss_kl = temperature**2 * -(p_zs * F.log_softmax(logits / temperature, -1)).sum(-1).mean()
    if not (torch.isfinite(loss_ce) and torch.isfinite(loss_kl)):
        raise FloatingPointError(f"the losses are {loss_ce.item()}, {loss_kl.item()}; try fp32")
    grads_g = torch.autograd.grad(scale(loss_kl), params, retain_graph=True)  # general directions
    grads_d = torch.autograd.grad(scale(loss_ce), params)  # domain-specific directions
    return grads_d, grads_g, loss_ce, loss_kl, logits


# ---- One training step (the unit the loop, the tests and bench.py call), then main ---------------
def train_step(model, encode_image, teacher, optimizer, scaler, images, labels, precision, lam,
               temperature):  # fmt: skip
    with torch.no_grad(), autocast(images.device, precision):  # CLIP's image side is frozen
        image_features = F.normalize(encode_image(images).float(), dim=-1)  # (B, D)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads_d, grads_g, loss_ce, loss_kl, logits = two_gradients(model, image_features, teacher,
        labels, temperature, params, precision, scaler.scale)  # fmt: skip
    finite = all(torch.isfinite(g).all() for g in (*grads_d, *grads_g))
    if not finite and not scaler.is_enabled():
        raise FloatingPointError("a gradient is not finite; try --precision fp32")
    # p.grad is assigned, not accumulated: no zero_grad needed. On overflow we write inf so that
    # GradScaler skips the step and halves the scale, as after a backward().
    for p, G_d, G_g in zip(params, grads_d, grads_g):  # per tensor, as the authors' (one: ctx)
        p.grad = project(G_d, G_g, lam) if finite else torch.full_like(G_d, math.inf)
    scaler.step(optimizer)  # unscale, then SGD: project(sG_d, sG_g) = s project(G_d, G_g), s > 0
    scaler.update()  # the scale halves after an overflow and grows after 2000 good steps
    dot = sum((d.float() * g.float()).sum() for d, g in zip(grads_d, grads_g))  # logged cosine
    norms = [math.sqrt(sum(g.float().pow(2).sum() for g in G)) for G in (grads_d, grads_g)]
    cosine = float(dot) / (norms[0] * norms[1]) if norms[0] * norms[1] > 0 else 0.0
    return loss_ce.item(), loss_kl.item(), accuracy(logits, labels), cosine if finite else math.nan


def main(args):
    device, method = torch.device(args.device), "prograd"
    dataset, train, test_sets = load_task(args, args.shots)
    if not train["train"] and not args.eval_only:
        fail(f"{args.data}: no training images (a train/ folder or the split file's train list)")
    folder = f"{args.shots}shot_seed{args.seed}" + ("_eval" if args.eval_only else "")
    run_dir = args.out or os.path.join("runs", method, dataset, folder)
    torch.manual_seed(args.seed)
    # Frozen CLIP and the learned prompt
    clip_model = load_clip(args.backbone, device, args.precision)
    model, learned, test_sets, not_scored = build_model(args, method, clip_model, train, test_sets)
    teacher = zeroshot_classifier(clip_model, train["classnames"], [args.template])  # (n_cls, D)
    config = dict(method=method, backbone=args.backbone, n_ctx=model.prompt_learner.n_ctx)
    config.update(csc=args.csc, position=args.class_token_position)  # what --load must match
    if args.load:
        load_learned(model, load_checkpoint(args.load), args.load, config)
    # Training: SGD on the learned parameters, one learning rate per epoch
    os.makedirs(run_dir, exist_ok=True)
    save(os.path.join(run_dir, "args.json"), dict(vars(args), n_ctx=config["n_ctx"]))  # M used
    optimizer = torch.optim.SGD(learned, args.lr, momentum=0.9, weight_decay=5e-4)  # on ctx too
    # loss scaled for fp16 math, lest small gradients round to 0; the original's fp16 mode does not
    half = args.precision == "fp16" or (args.precision == "amp" and device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=half)
    generator = torch.Generator().manual_seed(args.seed)  # the shuffling order, kept for --resume
    drop_last = args.drop_last and len(train["train"]) >= args.batch_size  # Dassl's rule, if asked
    transform = train_transform(clip_model.visual.input_resolution, args.crop_scale)
    loader = make_loader(train["train"], transform, args.batch_size, args.workers, device,
                         shuffle=True, drop_last=drop_last, generator=generator)  # fmt: skip
    epochs = 0 if args.eval_only else args.epochs
    start, train_seconds = 0, 0.0  # over every session of the run (--resume)
    if args.resume:
        start, train_seconds = resume(run_dir, model, optimizer, scaler, generator, config)
    elif not args.eval_only and os.path.exists(os.path.join(run_dir, "log.jsonl")):
        os.remove(os.path.join(run_dir, "log.jsonl"))  # a fresh run starts a fresh log
    for epoch in range(start, epochs):
        lr = lr_at_epoch(epoch, args.lr, epochs)  # a warm-up epoch at 1e-5, then a cosine
        optimizer.param_groups[0]["lr"] = lr  # one parameter group
        t0, steps, n = time.time(), [], 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            steps.append(train_step(model, clip_model.encode_image, teacher, optimizer, scaler,
                images, labels, args.precision, args.lam, args.temperature))  # fmt: skip
            n += len(labels)
        seconds = time.time() - t0
        train_seconds += seconds
        loss_ce, loss_kl, train_acc, cosine = zip(*steps)  # one value per step
        cos = [c for c in cosine if not math.isnan(c)]  # NaN: a step skipped (fp16 overflow)
        log_epoch(run_dir, epoch + 1, epochs, seconds, n, lr=lr, loss_ce=loss_ce,
                  loss_kl=loss_kl, train_acc=train_acc, conflict_fraction=[c < 0 for c in cos],
                  mean_cosine=cos)  # fmt: skip
        save_progress(run_dir, config, model, optimizer, scaler, epoch + 1, train_seconds,
                      generator)  # fmt: skip
    zero_shot, acc = evaluate(args, clip_model, model, test_sets)  # the last epoch, every test set
    speed = round(len(train["train"]) * epochs / train_seconds, 1) if train_seconds else None
    extra = dict(epochs=epochs, precision=args.precision, images_per_s=speed)
    extra.update(train_seconds=round(train_seconds, 2), not_scored=not_scored)
    return finish_run(run_dir, args, method, dataset, zero_shot, acc, **extra)


def build_model(args, method, clip_model, train, test_sets):
    """-> (model, learned parameters, test sets it can score, the others); every prompt checked."""
    # --csc learns one context per training class: a test set of other classes is not scored
    other = [k for k, (_, names) in test_sets.items() if args.csc and names != train["classnames"]]
    test_sets = {k: v for k, v in test_sets.items() if k not in other}
    ctx_init = args.template.removesuffix(" {}.") if args.ctx_init == "template" else ""
    try:
        model = CustomCLIP(clip_model, train["classnames"], args.n_ctx, ctx_init, args.csc,
                           args.class_token_position).to(args.device)  # fmt: skip
        # the training classes last: training uses these buffers
        for names in [names for _, names in test_sets.values()] + [train["classnames"]]:
            model.prompt_learner.set_classnames(clip_model, names)
    except ValueError as e:
        fail(str(e))
    learned = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in clip_model.parameters())  # CLIP stays frozen
    n_learned, n_frozen = [sum(p.numel() for p in ps) for ps in (learned, clip_model.parameters())]
    what = f"{method}: {model.prompt_learner.n_ctx} context vectors ({ctx_init or 'random'!r})"
    print(f"{what}; learned {list(learned_state(model))} = {n_learned:,} parameters; CLIP's "
          f"{n_frozen:,} frozen; --template {args.template!r}")  # fmt: skip
    return model, learned, test_sets, dict.fromkeys(other, "no learned context (--csc)")


def evaluate(args, clip_model, model, test_sets):
    """Accuracies of zero-shot CLIP (--template; the papers' zero-shot rows use the dataset's own,
    as zeroshot.py --template <Name>) and of the learned prompt on every test set."""
    device, n_px = torch.device(args.device), clip_model.visual.input_resolution
    zero_shot, acc = {}, {}
    for name, (items, classnames) in test_sets.items():
        loader = make_loader(items, test_transform(n_px), 100, args.workers, device)
        features, labels = encode_images(clip_model.encode_image, loader, device, args.precision)
        weights = zeroshot_classifier(clip_model, classnames, [args.template])  # (n_cls, D)
        zero_shot[name] = accuracy(clip_model.logit_scale.exp() * features @ weights.t(), labels)
        model.prompt_learner.set_classnames(clip_model, classnames)  # the context stays
        with torch.no_grad(), autocast(device, args.precision):
            acc[name] = accuracy(model(features), labels)
    return zero_shot, acc


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.description = f"{__doc__.splitlines()[0]} Defaults: the papers' settings; SGD, momentum 0.9,"
    p.description += " weight decay 5e-4; the first epoch at lr 1e-05, then a cosine from --lr."
    add = p.add_argument
    add("--backbone", help="CLIP name (RN50, ViT-B/16, ...) or checkpoint path")
    add("--data", required=True, help="root with train/ [val/] test/, or --split-file's images")
    add("--split-file", help="CoOp's split_zhou_<Name>.json (then --data is its image root)")
    add("--shots", type=int, default=16, help="training images per class (seeded sample)")
    base_new = "base-to-new: 'base' trains on the first half of the classes, also tests 'new'"
    add("--subsample", choices=["all", "base", "new"], default="all", help=base_new)
    add("--eval-data", nargs="*", default=[], help="extra test sets (ImageFolder roots)")
    add("--template", help=f"the teacher's (' {{}}.' last) or {', '.join(PROGRAD_TEMPLATES)}")
    add("--n-ctx", type=int, help="context vectors M")
    add("--ctx-init", choices=["template", "random"], help="the template's words, or CoOp's random")
    add("--csc", action="store_true", help="class-specific context (one context per class)")
    where = "where the class name goes in the prompt (CoOp's variants)"
    add("--class-token-position", choices=["end", "middle", "front"], default="end", help=where)
    lam = "lambda (1: orthogonal, 0: CoOp); the authors: 0.8 at 8+ shots on Flowers, DTD, EuroSAT"
    add("--lam", type=float, help=lam)
    add("--temperature", type=float, help="T of L_kl (LOSS.T, only in the authors' code)")
    add("--epochs", type=int, help="training epochs")
    add("--batch-size", type=int, help="training images per step")
    add("--lr", type=float, default=0.002, help="SGD learning rate after the warm-up epoch")
    add("--crop-scale", type=float, default=0.08, help="random crop's smallest area; toy runs: 0.5")
    add("--drop-last", action="store_true", help="drop the last partial batch, as the original")
    args = parse(p, argv, PRESETS, lambda a: "prograd")
    args.template = PROGRAD_TEMPLATES.get(args.template, args.template)
    if not args.template.endswith(" {}."):  # the words before it initialise the context
        fail(f"--template {args.template!r} must end with ' {{}}.' or be a dataset of --help")
    if args.eval_only and not args.load:
        fail("--eval-only needs --load <checkpoint.pt>")
    if args.shots < 1:
        fail("--shots must be at least 1")
    return args


# --- shared: speed-ups (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
# Exact speed-ups: the plain formulation's numbers (tested) in less time and memory; not the method.
def shared_prefix(clip_model, prefix, suffix, tokenized, deep=()):
    """= text_encoder(clip_model, cat([prefix[b], suffix[c]]), tokenized[c]) for every pair (b, c):
    (B, C, D). Causal attention again: positions before the class name never see it, so a prefix
    that every class shares ([SOS] and a generic context) runs once (per image for CoCoOp); each
    class's own tokens (name, ".", EOT) attend to its keys and values and, causally, to their own.
    prefix: (B, P, d), B = 1 or one per image; suffix: (C, L - P, d), the rest of each class's
    prompt; tokenized: (C, L) ids; deep: tensors (n, d) that replace prefix positions 1..n before
    blocks 1, 2, ... (promptsync.py's MaPLe prompts)."""
    (B, P, _), C = prefix.shape, suffix.shape[0]
    eot = tokenized.argmax(dim=-1) - P  # EOT's index within the suffix: (C,)
    S = int(eot.max()) + 1
    pos = clip_model.positional_embedding.type(clip_model.dtype)
    xp = prefix.type(clip_model.dtype) + pos[:P]  # (B, P, d)
    xs = (suffix[:, :S].type(clip_model.dtype) + pos[P : P + S]).repeat(B, 1, 1)  # (B*C, S, d)
    ahead = torch.ones(S, S, dtype=torch.bool, device=xp.device).triu_(1)  # (S, S)
    rows = lambda t: t.unflatten(0, (B, C)).transpose(1, 2).flatten(2, 3)  # (B, h, C*S, .)
    pairs = lambda t: t.unflatten(2, (C, S)).transpose(1, 2).flatten(0, 1)  # (B*C, h, S, .)
    for i, block in enumerate(clip_model.transformer.resblocks):
        if 0 < i <= len(deep):  # MaPLe: the previous block's outputs there are replaced
            n = deep[i - 1].shape[0]
            new = deep[i - 1].type(xp.dtype).expand(B, -1, -1)  # (B, n, d)
            xp = torch.cat([xp[:, :1], new, xp[:, 1 + n :]], dim=1)  # (B, P, d)
        heads, w_in, b_in = block.attn.num_heads, block.attn.in_proj_weight, block.attn.in_proj_bias
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(-3, -2)  # (.., heads, L, d_h)
        qkv = lambda x: map(split, F.linear(block.ln_1(x), w_in, b_in).chunk(3, dim=-1))
        (qp, kp, vp), (qs, ks, vs) = qkv(xp), qkv(xs)  # (B, h, P, .), (B*C, h, S, .)
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
    return (clip_model.ln_final(x).type(clip_model.dtype) @ clip_model.text_projection).view(
        B, C, -1
    )


# --- end shared: speed-ups ---


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
