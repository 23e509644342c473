"""CoOp and CoCoOp: learning the words of CLIP's prompt from a few labelled images.

Papers  CoOp:   Zhou et al., "Learning to Prompt for Vision-Language Models", arXiv 2109.01134
        CoCoOp: Zhou et al., "Conditional Prompt Learning for Vision-Language Models", 2203.05557

The idea. Zero-shot CLIP classifies an image by comparing it with the text "a photo of a {class}."
of every class, and its accuracy depends a lot on the exact words of that template. CoOp keeps CLIP
frozen and replaces the template's words by M continuous vectors (the "context"), learned by
gradient descent from a few labelled images per class. CoCoOp adds a small meta-network that turns
each image into a shift of the context, so that the prompt adapts to the image and generalises
better to classes that were not seen in training.

Equations (e(.) CLIP's token embedding, g(.) its text encoder, f the L2-normalised image feature,
tau the temperature: CLIP's frozen logit_scale = ln(1/tau), so 1/tau is about 100)
  [CoOp Eq. 2]   t_c = [SOS] [V]_1 ... [V]_M [CLASS_c] [.] [EOS]       (class token at the end)
  [CoOp Eq. 3]   p(y=c|x) = exp(cos(g(t_c), f) / tau) / sum_j exp(cos(g(t_j), f) / tau)
                 loss = cross-entropy with the label
  [CoCoOp 3.2]   pi = h_theta(f),  [V]_m(x) = [V]_m + pi for every m   (h: Linear-ReLU-Linear)
Learned: ctx = [V]_1..[V]_M, (M, d) or (n_cls, M, d) with --csc; CoCoOp also h_theta.
Frozen:  all of CLIP (image and text encoders, token embedding, logit scale).

The papers' settings: CoOp: RN50, M = 16 random N(0, 0.02^2) vectors (or "a photo of a"), SGD lr
0.002, momentum 0.9, weight decay 5e-4, batch 32, one warm-up epoch at 1e-5 then cosine per epoch,
50/100/200 epochs for 1/2-4/8-16 shots. CoCoOp: ViT-B/16, 4 vectors from "a photo of a", batch 1,
10 epochs, 16 shots, base-to-new.

Run
  python coop.py --backbone toy/clip_rn.pt --data toy/sketch --shots 4 --crop-scale 0.5
  python coop.py --backbone RN50 --data DATA/oxford_pets/images --shots 16 \
      --split-file DATA/oxford_pets/split_zhou_OxfordPets.json
  python coop.py --cocoop --backbone ViT-B/16 --data ... --split-file ... --subsample base
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


# ------------------------------------------------------------------------------------------------
# The method: CoOp's prompt learner, CoCoOp's meta-network
# ------------------------------------------------------------------------------------------------
class PromptLearner(nn.Module):
    """Every class's prompt around the learned context `ctx` (CoOp's only parameter).

    The fixed pieces are token embeddings kept as buffers: token_prefix (the start token) and
    token_suffix (class name, ".", end-of-text, padding). set_classnames rebuilds them, so a learned
    context can be tested on other class names; checkpoints hold ctx only.
    """

    def __init__(self, clip_model, classnames, n_ctx=16, ctx_init="", csc=False, position="end"):
        super().__init__()
        d = clip_model.ln_final.weight.shape[0]  # token width (512 for RN50 and ViT-B)
        if ctx_init:  # [CoOp] word init: ctx = the token embeddings of the init words
            ctx = word_embeddings(clip_model, ctx_init.replace("_", " "))  # (M, d)
            # The original silently ignores --csc when init words are given; we give every class its
            # own copy of the words, so that a class-specific context also starts at the zero-shot
            # prompt (and learns one context per class, as --csc asks).
            ctx = ctx.repeat(len(classnames), 1, 1) if csc else ctx  # (n_cls, M, d)
            self.prefix_text = ctx_init.replace("_", " ")
        else:  # [CoOp] random init N(0, 0.02^2); the placeholder words "X" are replaced by ctx
            ctx = torch.empty((len(classnames), n_ctx, d) if csc else (n_ctx, d))
            nn.init.normal_(ctx, std=0.02)
            self.prefix_text = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx)  # (M, d), or (n_cls, M, d) with a class-specific context
        self.n_ctx, self.csc, self.position = ctx.shape[-2], csc, position
        self.set_classnames(clip_model, classnames)

    def set_classnames(self, clip_model, classnames):
        if self.csc and len(classnames) != self.ctx.shape[0]:
            raise ValueError(
                f"the class-specific context was learned for {self.ctx.shape[0]} "
                f"classes; it cannot be used with {len(classnames)} other classes"
            )
        texts = [f"{self.prefix_text} {c}." for c in classnames]  # [CoOp] note the trailing period
        try:
            tokenized = tokenize(clip_model, texts)  # (n_cls, L)
        except RuntimeError:
            raise ValueError(
                f"a prompt is longer than the model's context length "
                f"{clip_model.context_length}: use a smaller --n-ctx or shorter class "
                f"names (longest: {max(classnames, key=len)!r})"
            ) from None
        device = clip_model.token_embedding.weight.device
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized.to(device)).float()  # (n_cls, L, d)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx :], persistent=False)
        self.register_buffer("tokenized", tokenized.to(device), persistent=False)  # to find EOT
        if self.position != "end":
            order = class_token_order(tokenize(clip_model, classnames), self.n_ctx, self.position)
            self.register_buffer("order", order.to(device), persistent=False)  # (n_cls, L)

    def forward(self):
        """[CoOp Eq. 2] every class's whole prompt: (n_cls, L, d)."""
        n_cls = self.token_prefix.shape[0]
        ctx = self.ctx if self.csc else self.ctx.expand(n_cls, -1, -1)  # (n_cls, M, d)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (n_cls, L, d)
        return prompts if self.position == "end" else move_class_name(prompts, self.order)

    def prefix(self, pi=None):
        """[SOS] [V]_1..[V]_M, the part of the prompt every class shares: (1, 1 + M, d), or
        (B, 1 + M, d) with CoCoOp's shifts pi (B, d)."""
        ctx = self.ctx.unsqueeze(0) if pi is None else self.ctx + pi.unsqueeze(1)  # [CoCoOp 3.2]
        return torch.cat([self.token_prefix[:1].expand(len(ctx), -1, -1), ctx], dim=1)

    def per_image(self, pi):
        """[CoCoOp 3.2] [V]_m(x) = [V]_m + pi(x): every image's whole prompts, (B, n_cls, L, d)."""
        n_cls = self.token_prefix.shape[0]
        ctx = self.prefix(pi)[:, 1:].unsqueeze(1).expand(-1, n_cls, -1, -1)  # (B, n_cls, M, d)
        fixed = [t.expand(len(pi), -1, -1, -1) for t in (self.token_prefix, self.token_suffix)]
        return torch.cat([fixed[0], ctx, fixed[1]], dim=2)  # (B, n_cls, L, d)


def word_embeddings(clip_model, words):
    """The token embeddings of `words` (between SOS and EOT): (M, d), M = number of BPE tokens."""
    tokens = tokenize(clip_model, [words]).to(clip_model.token_embedding.weight.device)
    # The original counts the words of the init text; we count its BPE tokens: the same for
    # "a photo of a", and still exact when a word splits into several tokens.
    with torch.no_grad():
        return clip_model.token_embedding(tokens)[0, 1 : int(tokens.argmax())].float()


def class_token_order(name_tokens, n_ctx, position):
    """CoOp's 'middle' and 'front': which row of the 'end' layout goes where when the class name
    moves; the name keeps its tokens, and the prompt's length and EOT index do not change."""
    order, L, M = [], name_tokens.shape[1], n_ctx
    for n in (name_tokens.argmax(dim=-1) - 1).tolist():  # BPE tokens of each class name
        sos, v, name = [0], list(range(1, 1 + M)), list(range(1 + M, 1 + M + n))
        rest = list(range(1 + M + n, L))  # ".", EOT, padding
        if position == "middle":  # [SOS] [V]_1..[V]_M/2 [CLASS] [V]_M/2+1..[V]_M [.] [EOS]
            order.append(sos + v[: M // 2] + name + v[M // 2 :] + rest)
        else:  # front: [SOS] [CLASS] [V]_1..[V]_M [.] [EOS]
            order.append(sos + name + v + rest)
    return torch.tensor(order)


def move_class_name(prompts, order):
    """The 'end' prompts (n_cls, L, d) with each class's rows reordered by `order` (n_cls, L)."""
    return prompts.gather(1, order.unsqueeze(-1).expand(-1, -1, prompts.shape[-1]))


class CustomCLIP(nn.Module):
    """CoOp (and CoCoOp with a meta-network): logits of normalised image features against the
    learned prompts."""

    def __init__(
        self, clip_model, classnames, n_ctx=16, ctx_init="", csc=False, position="end", cocoop=False
    ):
        super().__init__()
        self.prompt_learner = PromptLearner(clip_model, classnames, n_ctx, ctx_init, csc, position)
        self.text_encoder = TextEncoder(clip_model)
        self.logit_scale = clip_model.logit_scale  # CLIP's own, frozen: ln(1/tau)
        # A generic context with the class name at the end gives every class the same prefix
        # [SOS] [V]_1..[V]_M: the text encoder runs it once (exact). A class-specific context, or
        # the name in the middle or front, makes every prompt differ from its start: cut encoder.
        self.shared_prefix = not csc and position == "end"
        vis, d = clip_model.visual.output_dim, self.prompt_learner.ctx.shape[-1]
        self.meta_net = None
        if cocoop:  # [CoCoOp] h_theta: Linear(vis, vis/16) -> ReLU -> Linear(vis/16, d)
            hidden = vis // 16
            layers = [nn.Linear(vis, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d)]
            self.meta_net = nn.Sequential(*layers)

    def forward(self, image_features):
        # image_features: (B, D), L2-normalised, from the frozen image encoder
        pl, encoder, inv_tau = self.prompt_learner, self.text_encoder, self.logit_scale.exp()
        pi = None if self.meta_net is None else self.meta_net(image_features)  # [CoCoOp] (B, d)
        if self.shared_prefix:
            suffix, tokenized = pl.token_suffix, pl.tokenized
            text = encoder.shared_prefix(pl.prefix(pi), suffix, tokenized)  # (1 or B, n_cls, D)
        elif pi is None:
            text = encoder(pl(), pl.tokenized).unsqueeze(0)  # (1, n_cls, D)
        else:  # the plain formulation: every (image, class) prompt through the cut encoder
            B, C = len(pi), len(pl.tokenized)
            text = encoder(pl.per_image(pi).flatten(0, 1), pl.tokenized.repeat(B, 1)).view(B, C, -1)
        text = F.normalize(text.float(), dim=-1)  # (1 or B, n_cls, D)
        if pi is None:
            return inv_tau * image_features @ text[0].t()  # [CoOp Eq. 3] (B, n_cls)
        return inv_tau * torch.einsum("bd,bcd->bc", image_features, text)  # (B, n_cls)


def epochs_for_shots(shots):
    """CoOp's configs: 50 epochs for 1 shot, 100 for 2-4 shots, 200 for 8-16 (ImageNet: 50)."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def lr_at_epoch(epoch, base_lr, epochs, warmup_lr=1e-5):
    """Dassl's warm-up then cosine, stepped once per epoch: the first epoch runs at warmup_lr,
    then the cosine starts afresh over `epochs`, so it never reaches 0 (the last of 200: 4.9e-7)."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


@torch.no_grad()
def predict(model, image_features):
    """Logits for precomputed normalised image features; CoCoOp runs a few images at a time."""
    if model.meta_net is None:
        return model(image_features)
    chunk = max(1, 2000 // model.prompt_learner.token_prefix.shape[0])
    return torch.cat(
        [model(image_features[i : i + chunk]) for i in range(0, len(image_features), chunk)]
    )


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
    ctx_init = "a photo of a" if args.cocoop else ""  # CoCoOp's published init; CoOp: random
    ctx_init = ctx_init if args.ctx_init is None else args.ctx_init
    n_ctx = args.n_ctx or (4 if args.cocoop else 16)
    epochs = args.epochs or (10 if args.cocoop else epochs_for_shots(args.shots))
    batch_size = args.batch_size or (1 if args.cocoop else 32)
    if args.cocoop and (args.csc or args.class_token_position != "end"):
        fail("CoCoOp uses one generic context with the class token at the end")
    if args.eval_only and not args.load:
        fail("--eval-only needs --load <checkpoint.pt>")
    if args.shots < 1:
        fail("--shots must be at least 1")
    dataset, train, test_sets = load_task(args, args.shots)
    if not train["train"] and not args.eval_only:
        fail(f"{args.data}: no training images (a train/ folder or the split file's train list)")
    run_dir = args.out or os.path.join("runs", method, dataset, f"{args.shots}shot_seed{args.seed}")
    if args.resume and not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        fail(f"--resume: {run_dir}/checkpoint.pt not found; start the run without --resume")
    seed_everything(args.seed)

    # Frozen CLIP and the learned prompt
    clip_model = load_clip(args.backbone, device, precision)
    n_px, where = clip_model.visual.input_resolution, args.class_token_position
    encode = clip_model.encode_image
    # --csc learns one context per training class: a test set of other classes is not scored
    names = train["classnames"]
    other = [k for k, (_, classnames) in test_sets.items() if args.csc and classnames != names]
    not_scored = {k: "classes without a learned context (--csc)" for k in other}
    test_sets = {k: v for k, v in test_sets.items() if k not in other}
    try:
        model = CustomCLIP(clip_model, names, n_ctx, ctx_init, args.csc, where, args.cocoop)
        model.to(device)
        for _, classnames in test_sets.values():  # every test set's prompts fit, before training
            model.prompt_learner.set_classnames(clip_model, classnames)
        model.prompt_learner.set_classnames(clip_model, train["classnames"])
    except ValueError as e:
        fail(str(e))
    pl, learned = model.prompt_learner, [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in clip_model.parameters())
    n_learned, n_frozen = [sum(p.numel() for p in ps) for ps in (learned, clip_model.parameters())]
    print(
        f"{method}: {pl.n_ctx} context vectors ({ctx_init or 'random'!r}); learned "
        f"{list(learned_state(model))} = {n_learned:,} parameters; CLIP's {n_frozen:,} frozen"
    )
    config = dict(method=method, backbone=args.backbone, n_ctx=pl.n_ctx, csc=args.csc)
    if args.load:
        load_learned(model, load_checkpoint(args.load), args.load, config)

    # Training: SGD on the context (and CoCoOp's meta-network), one learning rate per epoch
    os.makedirs(run_dir, exist_ok=True)
    save(os.path.join(run_dir, "args.json"), vars(args))
    sgd = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    optimizer = torch.optim.SGD(learned, **sgd)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp" and device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)  # the shuffling order, kept for --resume
    # The original loader silently drops the last partial batch when N >= batch size (up to 31
    # images per epoch); we keep every image unless --drop-last asks for the original behaviour.
    drop_last = args.drop_last and len(train["train"]) >= batch_size
    transform = train_transform(n_px, args.crop_scale)
    loader = make_loader(
        train["train"], transform, batch_size, args.workers, True, drop_last, generator
    )
    start, train_seconds, n_seen = 0, 0.0, 0
    if args.resume:
        start, train_seconds = resume(run_dir, model, optimizer, generator, config)
    elif os.path.exists(os.path.join(run_dir, "log.jsonl")) and not args.eval_only:
        os.remove(os.path.join(run_dir, "log.jsonl"))  # a fresh run starts a fresh log
    for epoch in range(start, 0 if args.eval_only else epochs):
        lr = lr_at_epoch(epoch, args.lr, epochs, args.warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0, losses, accs, n = time.time(), [], [], 0
        peak_mib(device, reset=True)
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            step = train_step(model, encode, optimizer, scaler, images, labels, precision)
            losses, accs, n = losses + [step[0]], accs + [step[1]], n + len(labels)
        seconds = time.time() - t0
        train_seconds, n_seen = train_seconds + seconds, n_seen + n
        log_epoch(
            run_dir, device, epoch + 1, epochs, seconds, n, lr=lr, loss=losses, train_acc=accs
        )
        save_progress(run_dir, config, model, optimizer, epoch + 1, train_seconds, generator)

    # Evaluation of the last epoch on every test set (image features encoded once per set)
    zero_shot, acc = {}, {}
    for name, (items, classnames) in test_sets.items():
        loader = make_loader(items, test_transform(n_px), 100, args.workers)
        features, labels = encode_images(encode, loader, device, precision)
        weights = zeroshot_classifier(clip_model, classnames, [args.template])
        zero_shot[name] = accuracy(clip_model.logit_scale.exp() * features @ weights.t(), labels)
        pl.set_classnames(clip_model, classnames)  # the context does not depend on the names
        with autocast(device, precision):
            acc[name] = accuracy(predict(model, features), labels)
    speed = round(n_seen / train_seconds, 1) if n_seen else None
    extra = dict(epochs=0 if args.eval_only else epochs, precision=precision, images_per_s=speed)
    extra.update(train_seconds=round(train_seconds, 2), not_scored=not_scored)
    return finish_run(run_dir, args, method, dataset, zero_shot, acc, **extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="CoOp and CoCoOp (defaults: the papers' settings)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    # data and protocol
    add("--backbone", default="RN50", help="CLIP name or checkpoint path (CoCoOp: ViT-B/16)")
    add("--data", required=True, help="root with train/ [val/] test/, or --split-file's images")
    add("--split-file", help="CoOp's split_zhou_<Name>.json (then --data is its image root)")
    add("--classnames", help="classnames.txt: 'folder<TAB>readable name' per line")
    add("--shots", type=int, default=16, help="training images per class (seeded sample)")
    base_new = "base-to-new: 'base' trains on the first half of the classes, also tests 'new'"
    add("--subsample", choices=["all", "base", "new"], default="all", help=base_new)
    add("--eval-data", nargs="*", default=[], help="extra test sets (ImageFolder roots)")
    add("--template", default="a photo of a {}.", help="the zero-shot baseline's template")
    # the method
    add(
        "--cocoop",
        action="store_true",
        help="CoCoOp: the image-conditioned meta-network, "
        "its published setting (4 vectors from 'a photo of a', batch 1, 10 epochs)",
    )
    add("--n-ctx", type=int, help="context vectors M of a random init (CoOp: 16, CoCoOp: 4)")
    add(
        "--ctx-init",
        help="initialise the context from these words (sets M); default: random "
        "N(0, 0.02^2) for CoOp, 'a photo of a' for CoCoOp ('' for random)",
    )
    add("--csc", action="store_true", help="class-specific context (one context per class)")
    add("--class-token-position", choices=["end", "middle", "front"], default="end")
    # optimisation
    add("--epochs", type=int, help="default: 50/100/200 for 1/2-4/8+ shots (CoCoOp: 10)")
    add("--batch-size", type=int, help="default: 32 (CoCoOp: 1)")
    add("--lr", type=float, default=0.002, help="SGD learning rate after the warm-up epoch")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--weight-decay", type=float, default=5e-4, help="SGD weight decay (on ctx too)")
    add("--warmup-lr", type=float, default=1e-5, help="learning rate of the first epoch")
    crop = "smallest area of the random resized crop (the toy world's 32-px images: 0.5)"
    add("--crop-scale", type=float, default=0.08, help=crop)
    drop = "drop the last partial batch when N >= batch size, as the original loader did"
    add("--drop-last", action="store_true", help=drop)
    add_run_args(add)
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


# --- shared: checkpoint (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
def learned_state(model):
    """The parameters a method learns (requires_grad): all that a checkpoint holds of the model."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_learned(model, checkpoint, path, config):
    """Copy the learned parameters of `checkpoint` into `model`, after checking that it was written
    by the same method and that every tensor has the shape this run learns."""
    theirs, mine = checkpoint["state"], learned_state(model)
    fits = set(theirs) == set(mine) and all(theirs[k].shape == mine[k].shape for k in mine)
    if checkpoint.get("config", {}).get("method") != config["method"] or not fits:
        shapes = lambda state: {k: tuple(v.shape) for k, v in state.items()}
        fail(
            f"{path} does not fit this run: it was written with {checkpoint.get('config')} and "
            f"holds {shapes(theirs)}; this run ({config}) learns {shapes(mine)}; use the options "
            "it was written with"
        )
    model.load_state_dict(theirs, strict=False)


# --- end shared: checkpoint ---


# --- shared: resume (canonical copy in coop.py; re-sync with tools/sync_shared.py) ---
def save_progress(run_dir, config, model, optimizer, epoch, train_seconds, generator):
    """checkpoint.pt after each epoch: what --resume needs to continue exactly where it stopped."""
    rng = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    state = dict(config=config, state=learned_state(model), optimizer=optimizer.state_dict())
    save(
        os.path.join(run_dir, "checkpoint.pt"),
        dict(state, epoch=epoch, train_seconds=train_seconds, rng=rng),
    )


def resume(run_dir, model, optimizer, generator, config):
    """Restore the last finished epoch -> (epochs done, training seconds so far). log.jsonl keeps
    exactly one line per epoch the checkpoint holds: a run killed between appending an epoch's
    line and saving its checkpoint would otherwise log that epoch twice."""
    path, log = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "log.jsonl")
    ckpt = load_checkpoint(path)
    load_learned(model, ckpt, path, config)
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    generator.set_state(ckpt["rng"]["loader"])
    lines = {}
    for line in open(log).read().splitlines() if os.path.isfile(log) else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if record["epoch"] <= ckpt["epoch"]:
            lines[record["epoch"]] = line
    save(log, "".join(lines[e] + "\n" for e in sorted(lines)))
    print(f"resuming {run_dir} after epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt["train_seconds"]


# --- end shared: resume ---


if __name__ == "__main__":
    main(parse_args())
