"""Test-time prompt tuning on TPT's or MaPLe's prompts: TPT, PromptAlign and PromptSync.

Papers  TPT (test-time prompt tuning): Shu et al., arXiv 2209.07511 (NeurIPS 2022)
        MaPLe (multi-modal prompt learning): Khattak et al., arXiv 2210.03117 (CVPR 2023)
        PromptAlign: Abdul Samadh et al., "Align Your Prompts", arXiv 2311.01459 (NeurIPS 2023)
        PromptSync: Khandelwal, arXiv 2404.07520 (CVPR 2024 Workshops); no public code: what its
        paper leaves open is decided in OPEN POINTS below

The idea. TPT tunes CLIP's prompt on each test image, without its label: of N augmented views it
keeps those CLIP is most confident about, lowers the entropy of their mean prediction by a step,
classifies the original image with the tuned prompt, and resets the prompt for the next image.
PromptAlign does the same on MaPLe's multimodal prompts (text prompts in the first J blocks of the
text tower, linear projections of them in the vision tower, learned once on a labelled source set)
and also pulls the views' vision-token means and variances towards the source set's. PromptSync
uses class prototypes (each source class's mean features), class c weighted by the image's p^_c:
meta-train moves the prompts so that the views stand apart from other classes (contrastive L_D);
meta-test, there, pulls the features towards the likely classes' prototypes (L_A) and lowers TPT's
entropy; the mean of the two gradients updates the prompts.

Equations (p_i = softmax of view i's logits, H the entropy, tau = 1/100 CLIP's temperature; TPT's
Eq. 4-6 hold its first two lines together)
  [TPT select]  F = the views with H(p_i) <= t, t the rho-quantile of the H(p_i): int(rho N) views
  [TPT p~]      p~ = mean_{i in F} p_i;   [TPT L_ent]  L_ent = H(p~)
  [MaPLe]       text prompts P_j (M, d) before text blocks j < J; vision prompts F_j(P_j), linear
  [PromptAlign] L = L_ent + beta sum_l (0.5 mean|mu_l - mu^_l| + 0.5 mean|var_l - var^_l|) over
                the block inputs' tokens, l = 0, 1, beta = 100/3 (the authors' code); the paper's
                (1/L) sum_l over all L layers: --align-layers all --align-weight 2 beta / L
  [PromptSync]  s = cosine; v_i (i in F): the kept views' image features; class c's prototypes:
                h^v_CLS,c, h^v_c its source images' mean image feature and mean token output, h^t_c
                its EOT text feature at the loaded prompts (t_c(P): at the prompts P); u_{c,s}: its
                S stored source-view features; g(k): the classes sharing k's prototypes; p^ = mean
                over F of the p_i (detached, recomputed at P')
    L_pos(k) = mean_i e^{s(v_i, h_k)/tau}
    L_neg(k) = sum_{j not in g(k)} [e^{s(h_k, h_j)/tau} + mean_i e^{s(v_i, h_j)/tau}
               + mean_s e^{s(h_k, u_{j,s})/tau}]
    L_D = sum_k p^_k (-log(L_pos(k) / L_neg(k))), summed for h = h^v_CLS and h = t(P)
    L_A = sum_{f in CLS, tok, txt} sum_c p^_c (log(1 + mse(x_f, h^f_c)) + log(2 - cos(x_f, h^f_c))),
          x_CLS, x_tok the mean over F of the views' features, x_txt,c = t_c(P)
    g_D = grad L_D(P);  P' = P - lr sign(g_D);  g_A = grad(L_ent + L_A)(P');
    one AdamW step (at lr) from P with (g_D + g_A) / 2
Learned, per test image and reset after it: TPT: ctx (4, d) from "a photo of a"; MaPLe: ctx (2, d),
deep text prompts (J-1, 2, d), the couplings F_0..F_{J-1} (d -> vision width). Frozen: all of CLIP.

Run (defaults: the papers' settings; the toy world, README.md: real data; the source stage writes
runs/maple/<set>/...)
  python promptsync.py --backbone toy/clip_vit.pt --data toy/sketch --eval-data toy/noise   # TPT
  python promptsync.py --stage source --backbone toy/clip_vit.pt --data toy/proxy --crop-scale 1
  python promptsync.py --loss sync --backbone toy/clip_vit.pt --data toy/sketch --lr 5e-3 \\
      --load runs/maple/proxy/16shot_seed1/checkpoint.pt        # or --loss align: PromptAlign
"""

import argparse
import copy
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
from PIL import Image, ImageOps
from tqdm import tqdm

with warnings.catch_warnings():  # openai-clip 1.0.1 imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip


# The defaults that differ per stage and loss (--help lists them); the others are in parse_args
def from_load(key, value):  # a --load not there yet (a planned run's) stops main before work
    there = lambda a: os.path.isfile(a.load or "")
    get = lambda a: load_checkpoint(a.load)["config"][key] if there(a) else value
    get.__doc__ = f"--load's, else {value}"
    return get


def by_setting(dg, fine):
    get = lambda args: dg if args.setting == "dg" else fine
    get.__doc__ = f"{dg} (--setting dg), {fine} (--setting fine-grained)"
    return get


MAPLE = dict(n_ctx=from_load("n_ctx", 2), depth=from_load("depth", 3), augmix=0, corrupt=0)
TPT = dict(n_ctx=from_load("n_ctx", 4), depth=from_load("depth", 0), augmix=by_setting(0, 1))
TEST = dict(weight_decay=0.01, shots=0)  # AdamW, reset per image; no labelled image
PRESETS = {
    "source": dict(MAPLE, lr=0.0026, weight_decay=5e-4, shots=16),  # MaPLe's cross-dataset recipe
    "tpt": dict(TPT, **TEST, lr=5e-3, corrupt=0),  # AugMix on the fine-grained sets
    "align": dict(MAPLE, **TEST, lr=by_setting(4e-2, 5e-4)),  # PromptAlign's two configs
    "sync": dict(MAPLE, **TEST, lr=by_setting(4e-2, 5e-4), corrupt=1),  # open points 17, 12
}


# The method: the prompts, both towers with them, TPT's and PromptAlign's losses, PromptSync's
class MultimodalPrompts(nn.Module):
    """TPT's text context (depth 0) or MaPLe's multimodal prompts (depth J >= 1). Class c's text
    prompt is "[SOS] a photo of a {c}. [EOT]" (start and end of text), its first M words learned
    (ctx): TPT's all 4, MaPLe's "a photo". [MaPLe] deep_text[j-1] replaces the text tokens 1..M
    before text block j = 1..J-1; the vision tower gets proj(ctx) and deep_proj[j-1](deep_text)."""

    def __init__(self, clip_model, classnames, n_ctx=2, depth=3, ctx_init="a photo of a"):
        super().__init__()
        d, visual = clip_model.ln_final.weight.shape[0], clip_model.visual
        tokens = tokenize(clip_model, [ctx_init]).to(clip_model.token_embedding.weight.device)
        if not 1 <= n_ctx <= int(tokens.argmax()) - 1:
            raise ValueError(f"n_ctx must be 1..{int(tokens.argmax()) - 1} ({ctx_init!r})")
        if depth and not hasattr(visual, "transformer"):
            raise ValueError("MaPLe's vision prompts need a ViT backbone (e.g. ViT-B/16)")
        towers = (clip_model.transformer, visual.transformer) if depth else ()
        if depth > min((len(t.resblocks) for t in towers), default=0):
            raise ValueError(f"depth {depth} is more than the layers of a tower of this CLIP")
        with torch.no_grad():
            self.ctx = nn.Parameter(clip_model.token_embedding(tokens)[0, 1 : 1 + n_ctx].float())
        deep = [nn.Parameter(torch.randn(n_ctx, d) * 0.02) for _ in range(max(depth - 1, 0))]
        self.deep_text = nn.ParameterList(deep)  # [MaPLe] deeper text prompts, N(0, 0.02^2)
        if depth:  # [MaPLe] couplings F_j: the deeper ones are copies of one Linear
            width = visual.conv1.out_channels
            self.proj, one = nn.Linear(d, width), nn.Linear(d, width)
            self.deep_proj = nn.ModuleList(copy.deepcopy(one) for _ in range(depth - 1))
        self.n_ctx, self.depth, self.ctx_init = n_ctx, depth, ctx_init
        self.set_classnames(clip_model, classnames)

    def set_classnames(self, clip_model, classnames):
        tokenized = tokenize(clip_model, [f"{self.ctx_init} {c}." for c in classnames])  # (C, L)
        tokenized = tokenized.to(clip_model.token_embedding.weight.device)
        embedding = clip_model.token_embedding(tokenized).detach().float()  # (C, L, d)
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + self.n_ctx :], persistent=False)
        self.register_buffer("tokenized", tokenized, persistent=False)  # only to find EOT

    def text_prompts(self):
        ctx = self.ctx.expand(self.token_prefix.shape[0], -1, -1)  # (C, M, d)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (C, L, d)

    def vision_prompts(self):
        deep = [f(p) for f, p in zip(self.deep_proj, self.deep_text)] if self.depth else []
        return [self.proj(self.ctx)] + deep if self.depth else []  # [MaPLe] F_j(P_j): (M, width)


def text_encoder(clip_model, prompts, tokenized, deep=()):
    """[MaPLe] the text tower on prompts (C, L, d), deep[j-1] (M, d) at positions 1..M, block j."""
    dtype = clip_model.dtype
    x = (prompts.type(dtype) + clip_model.positional_embedding.type(dtype)).permute(1, 0, 2)
    for j, block in enumerate(clip_model.transformer.resblocks):  # x: (L, C, d), LND
        if 1 <= j <= len(deep):  # [MaPLe] replace the previous block's outputs at the prompts
            p = deep[j - 1].type(x.dtype)[:, None].expand(-1, x.shape[1], -1)  # (M, C, d)
            x = torch.cat([x[:1], p, x[1 + p.shape[0] :]])  # (L, C, d)
        x = block(x)  # CLIP's block, its causal mask
    x = x.permute(1, 0, 2)[torch.arange(x.shape[1]), tokenized.argmax(dim=-1)]  # EOT rows: (C, d)
    return clip_model.ln_final(x).type(dtype) @ clip_model.text_projection  # (C, D)


def encode_image(visual, images, prompts=(), tokens=None, last=None):
    """CLIP's ViT, prompts[0] (M, width) after the patches (ln_pre'd with them), the last M tokens
    replaced by prompts[j] before block j; tokens, last: get block inputs, last output (T, B, W)."""
    x = visual.conv1(images.type(visual.conv1.weight.dtype))  # (B, width, g, g)
    x = x.flatten(2).permute(0, 2, 1)  # (B, g*g, width)
    B = x.shape[0]
    cls = visual.class_embedding.to(x.dtype).expand(B, 1, -1)  # (B, 1, width)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, 1+g*g, width)
    if prompts:  # [MaPLe] no position embedding for the prompts
        x = torch.cat([x, prompts[0].to(x.dtype).expand(B, -1, -1)], dim=1)  # (B, T, width)
    x = visual.ln_pre(x).permute(1, 0, 2)  # NLD -> LND: (T, B, width)
    for j, block in enumerate(visual.transformer.resblocks):
        if 1 <= j < len(prompts):  # [MaPLe] drop the previous block's prompt outputs, insert anew
            p = prompts[j].to(x.dtype).unsqueeze(1).expand(-1, B, -1)  # (M, B, width)
            x = torch.cat([x[: -p.shape[0]], p])  # (T, B, width)
        if tokens is not None:
            tokens.append(x)
        x = block(x)
    if last is not None:
        last.append(x)
    return visual.ln_post(x[0]) @ visual.proj  # the class token: (B, D)


class MultimodalPromptedCLIP(nn.Module):
    """Frozen CLIP with TPT's or MaPLe's learned prompts in one or both towers: logits (B, C)."""

    def __init__(self, clip_model, classnames, n_ctx=2, depth=3, ctx_init="a photo of a"):
        super().__init__()
        self.prompts = MultimodalPrompts(clip_model, classnames, n_ctx, depth, ctx_init)
        self.clip = clip_model

    def text_features(self):
        # = text_encoder(self.clip, text_prompts(), tokenized, deep_text), the plain loop;
        # [SOS][ctx] is every class's, so it runs once: the same numbers, see the speed-ups
        pl = self.prompts
        prefix = torch.cat([pl.token_prefix[:1], pl.ctx[None]], dim=1)  # (1, 1 + M, d)
        text = shared_prefix(self.clip, prefix, pl.token_suffix, pl.tokenized, pl.deep_text)[0]
        return F.normalize(text.float(), dim=-1)  # (C, D)

    def image_features(self, images, tokens=None):
        if self.prompts.depth == 0 and tokens is None:  # text-only prompts: CLIP's own forward
            return F.normalize(self.clip.encode_image(images).float(), dim=-1)
        prompts = self.prompts.vision_prompts()
        return F.normalize(encode_image(self.clip.visual, images, prompts, tokens).float(), dim=-1)

    def logits(self, image_features, text_features=None):
        text = self.text_features() if text_features is None else text_features
        return self.clip.logit_scale.exp() * image_features.float() @ text.t()  # (B, C)

    def forward(self, images):
        return self.logits(self.image_features(images))


def select_confident(logits, rho):
    """[TPT select] the int(N rho) views (of N) of lowest entropy: those with H(p_i) <= t."""
    logp = logits.float().log_softmax(dim=-1)  # (N, C)
    entropy = -(logp.exp() * logp).sum(dim=-1)  # (N,)
    return entropy.argsort()[: int(logits.shape[0] * rho)]


def marginal_entropy(logits):
    """[TPT L_ent] H(p~), p~ the mean of the views' softmax; log p~ in the logsumexp form."""
    logp = logits.float().log_softmax(dim=-1)  # (k, C)
    log_mean = logp.logsumexp(dim=0) - math.log(logp.shape[0])  # [TPT p~] log p~: (C,)
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)  # no 0 * -inf
    return -(log_mean.exp() * log_mean).sum()


def view_statistics(tokens, layers):
    """[PromptAlign] mu_l, var_l (biased): over the views of tokens[l] (T, k, W) -> (T, W) each."""
    x = [tokens[l].float() for l in layers]  # (T, k, W) each
    return [t.mean(dim=1) for t in x], [t.var(dim=1, unbiased=False) for t in x]


def token_alignment(means, variances, source_means, source_variances, terms=False):
    """[PromptAlign, as coded] sum_l (0.5 mean|mu_l - mu^_l| + 0.5 mean|var_l - var^_l|); terms:
    the pairs [mean|mu_l - mu^_l|, mean|var_l - var^_l|] per block, (L, 2), not summed."""
    pairs = zip(means, variances, source_means, source_variances)
    gaps = [torch.stack([(m - sm).abs().mean(), (v - sv).abs().mean()]) for m, v, sm, sv in pairs]
    return torch.stack(gaps) if terms else 0.5 * torch.stack(gaps).sum()


@torch.no_grad()
def token_statistics(model, loader, device, precision):
    """Every vision block's input tokens' mean and biased variance over a set, (L, T, W) each, by
    Chan, Golub and LeVeque's (1979) exact merge of batches: two passes in one."""
    n, mean, m2 = 0, 0.0, 0.0
    for images, _ in loader:
        tokens = []
        with autocast(device, precision):
            model.image_features(images.to(device), tokens)
        x = torch.stack(tokens).float()  # (L, T, B, W)
        b, batch_mean = x.shape[2], x.mean(dim=2)  # (L, T, W)
        batch_m2 = (x - batch_mean.unsqueeze(2)).square().sum(dim=2)
        delta, total = batch_mean - mean, n + b
        mean, m2 = mean + delta * b / total, m2 + batch_m2 + delta.square() * n * b / total
        n = total
    return mean.cpu(), (m2 / n).cpu()


# OPEN POINTS: what the PromptSync paper leaves open, decided here (reasons: docs/choices.md)
#  1 prototypes: h^v, the mean of the last block's patch and prompt outputs via ln_post, proj
#  2, 13 text: the class prompt only, one per class (no WordNet variants)
#  3 offline prompts: the source stage's MaPLe prompts (as PromptAlign's statistics), not refreshed
#  4 proxy sampling: the source shots (16 per class), 4 views each (the original + 3 crops)
#  5 L_D's views: the kept views are every class k's (weight p^_k); the others': 8 stored each
#  6 L_D: cosine / tau (CLIP's); L_pos a plain mean; L_neg without the positive; parts summed
#  7 L_A: mse and 1 - cos, each as log(1 + d), 1:1; image side: the mean of the kept views
#  8 p^: TPT's selection (the 10 % lowest-entropy views) at every point, detached, all classes
#  9 no source prototype: the nearest source class's (EOT feature); sharers are not negatives
# 10 h^t: the EOT feature, not the mean token output (in the causal tower, every class's alike)
# 11 L_neg's text-text terms share one sum with the image-text ones at 1/tau = 100 (as written)
# 12 views: 64; crop, flip; with --corrupt colour jitter, grayscale, blur, noise erasing
# 14 prompts: MaPLe's (vision = projections of text), ViT only; the prediction as TPT's
# 15 PromptSync* (the paper's faster variant): not built (what it removes is not described)
# 16 entropy: TPT's marginal entropy in the meta-test objective, weight 1 (--sync-weights)
# 17 meta-update: P' = P - lr sign(g_D) at the outer lr, first order (g_A at P', not through it),
#    weights 1/2, n = --steps = 1, P' goes on; AdamW at PromptAlign's lr, wd 0.01, reset per image
# 18 L_A's text pair t(P) vs h^t = t(loaded prompts): 0 at the loaded prompts, acts at P' only
def class_prototypes(features, labels, n_classes):
    """[PromptSync] each class's mean feature: (N, D), (N,) -> (n_classes, D)."""
    counts = torch.bincount(labels, minlength=n_classes)  # (n_classes,)
    if (counts == 0).any():
        raise ValueError(f"classes {(counts == 0).nonzero().flatten().tolist()} have no sample")
    sums = torch.zeros(n_classes, features.shape[1], device=features.device)
    return sums.index_add_(0, labels, features.float()) / counts[:, None]


def discrimination_loss(views, prototypes, class_views, weights, tau, groups=None):
    """[PromptSync L_D] sum_k weights[k] (-log(L_pos(k) / L_neg(k))), cosines / tau; views (V, D):
    every class's; prototypes (C, D); class_views (C, S, D); groups (C,): no negatives within."""
    v, p, u = (F.normalize(t.float(), dim=-1) for t in (views, prototypes, class_views))
    C = p.shape[0]
    groups = torch.arange(C, device=p.device) if groups is None else groups
    neg = lambda s: s.masked_fill(groups[:, None] == groups[None, :], float("-inf"))  # j != k
    log_pos = (v @ p.t() / tau).logsumexp(dim=0) - math.log(v.shape[0])  # log L_pos(k): (C,)
    part1 = neg(p @ p.t() / tau)  # (1) prototype k vs the other prototypes j: (C, C)
    part2 = neg(log_pos[None].expand(C, -1))  # (2) the views vs the other prototypes: (C, C)
    pu = torch.einsum("kd,jsd->kjs", p, u) / tau  # (C, C, S)
    part3 = neg(pu.logsumexp(dim=-1) - math.log(u.shape[1]))  # (3) k vs the other classes' views
    log_neg = torch.cat([part1, part2, part3], dim=1).logsumexp(dim=1)  # log L_neg(k): (C,)
    terms = torch.where(weights > 0, log_neg - log_pos, torch.zeros_like(log_pos))  # no 0 * inf
    return (weights * terms).sum()


def prototype_alignment(test, prototypes, weights):
    """[PromptSync L_A] sum_c weights[c] (log(1 + mse(x, p_c)) + log(2 - cos(x, p_c))), x: (D,)
    or one per class (C, D); log(1 + d), not log d, which has no minimum (open point 7)."""
    x = test.float().expand_as(prototypes)  # (C, D)
    amplitude = (x - prototypes.float()).square().mean(dim=-1)  # (C,)
    angular = 1 - F.cosine_similarity(x, prototypes.float(), dim=-1)  # (C,)
    return (weights * (torch.log1p(amplitude) + torch.log1p(angular))).sum()


def vision_vectors(model, images):
    """-> h^v_CLS (B, D), the unnormalised image feature, and h^v (B, D): the mean token output
    through ln_post and proj (the class token's head), in h^v_CLS's space."""
    last, v = [], model.clip.visual
    cls = encode_image(v, images, model.prompts.vision_prompts(), last=last)  # (B, D)
    tokens = v.ln_post(last[0][1:].permute(1, 0, 2)) @ v.proj  # patches and prompts: (B, P, D)
    return cls.float(), tokens.float().mean(dim=1)


@torch.no_grad()
def source_prototypes(model, items, classnames, views, seed, device, precision, n_views=8):
    """[PromptSync] the source classes' prototypes h^v_CLS, h^v, h^t (C, D), views (C, S, D)."""
    cls, tokens, labels = [], [], []
    for x, y, _ in ViewDataset([(i, *item) for i, item in enumerate(items)], views, seed):
        with autocast(device, precision):
            c, t = vision_vectors(model, x.to(device))  # (V, D) each
        cls, tokens, labels = cls + [c], tokens + [t], labels + [y] * len(x)
    cls, tokens, labels = torch.cat(cls), torch.cat(tokens), torch.tensor(labels, device=device)
    C = len(classnames)
    S = min(n_views, int(torch.bincount(labels, minlength=C).min()))
    # a class's S stored views come from as many of its images as S allows: every image's first
    # crop, then every image's second crop, ..., the originals (view 0) last
    order = torch.arange(len(cls), device=device).view(-1, views.n_views).roll(-1, 1).t()  # (V, n)
    cls_s, labels_s = cls[order.flatten()], labels[order.flatten()]
    stored = torch.stack([F.normalize(cls_s[labels_s == c][:S], dim=-1) for c in range(C)])
    model.prompts.set_classnames(model.clip, classnames)
    return dict(proto_classnames=list(classnames), proto_cls=class_prototypes(cls, labels, C).cpu(),
                proto_tokens=class_prototypes(tokens, labels, C).cpu(),
                proto_text=model.text_features().float().cpu(),  # EOT (open points 2, 10)
                proto_views=stored.cpu())  # fmt: skip


def match_prototypes(model, ckpt, classnames, device):
    """A test set's classes' source prototypes, by name, else (open point 9) the source class's of
    nearest EOT feature; and L_A's h^t, text_at_load: their EOT features at the loaded prompts."""
    text = model.text_features().detach()  # (C, D) at the loaded prompts
    names, source = list(ckpt["proto_classnames"]), ckpt["proto_text"].to(device)
    nearest = (text @ source.t()).argmax(dim=-1).tolist()
    index = [names.index(c) if c in names else nearest[i] for i, c in enumerate(classnames)]
    index = torch.tensor(index, device=device)
    protos = {k: ckpt["proto_" + k].to(device)[index] for k in ("cls", "tokens", "views")}
    return dict(protos, text_at_load=text, groups=index)


def sync_terms(model, views, sync, rho=0.1, precision="fp32", part="all"):
    """[PromptSync] at the current prompts, views (N, 3, H, W): F and p^ (detached), then F in the
    graph -> (L_ent, L_A, L_D, logits); part "D": only L_D; "test": L_ent and L_A (else None)."""
    with autocast(views.device, precision):
        text = model.text_features()  # (C, D)
    with torch.no_grad(), autocast(views.device, precision):
        logits = model.logits(model.image_features(views), text.detach())  # (N, C)
    kept = select_confident(logits, rho)  # open point 8
    p_hat = logits[kept].float().softmax(dim=-1).mean(dim=0)  # [PromptSync] p^ over F: (C,)
    entropy = align = discrimination = None
    with autocast(views.device, precision):
        cls, tokens = vision_vectors(model, views[kept])  # (k, D) each
        if part != "D":  # [TPT L_ent] on F
            entropy = marginal_entropy(model.logits(F.normalize(cls, dim=-1), text))
    if part != "D":  # [PromptSync L_A] x_CLS, x_tok: the means over F (open point 7)
        pairs = [(cls.mean(dim=0), sync["cls"]), (tokens.mean(dim=0), sync["tokens"])]
        pairs += [(text, sync["text_at_load"])]  # x_txt = t(P) vs h^t (open point 18)
        align = sum(prototype_alignment(x, p, p_hat) for x, p in pairs)
    if part != "test":  # [PromptSync L_D] its text part (h = t(P)) + its vision part (h^v_CLS)
        tau, groups, stored = 1 / model.clip.logit_scale.exp().item(), sync["groups"], sync["views"]
        part_D = lambda h: discrimination_loss(cls, h, stored, p_hat, tau, groups)
        discrimination = part_D(text) + part_D(sync["cls"])
    return entropy, align, discrimination, logits


def meta_update(params, optimizer, loss_D, loss_test, lr, steps=1, scale=1.0, eps=1e-8):
    """[PromptSync] the header's four lines `steps` times, summing (g_D + g_A) / 2, then one step
    from the start; loss_D(), loss_test(): at the current values (None: weight 0). -> stepped?"""

    def grad(loss):  # in fp32, zeros for None; of the loss x scale (fp16's range, a loss scaler)
        if loss is None:
            return [torch.zeros_like(p) for p in params]
        grads = torch.autograd.grad(loss * scale, params, materialize_grads=True)  # unused: zeros
        return [g.float() / scale for g in grads]

    start, total = [p.detach().clone() for p in params], [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        g_D = grad(loss_D())  # g_D = grad L_D(P)
        with torch.no_grad():  # P' = P - lr sign(g_D) as g / (|g| + eps), Adam's first step: only
            for p, g in zip(params, g_D):  # the sign counts (open point 17); P' goes on
                p.sub_(lr * g / (g.abs() + eps))
        g_A = grad(loss_test())  # g_A = grad(L_ent + L_A)(P')
        total = [s + (a + b) / 2 for s, a, b in zip(total, g_D, g_A)]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    if not all(torch.isfinite(g).all() for g in total):
        return False
    for p, g in zip(params, total):
        p.grad = g
    optimizer.step()  # one fresh AdamW step ~ lr sign(g): the weights only set the direction
    return True


# The test-time views: TPT's, the original first, then random crops + flips and on the fine-grained
# sets AugMix (Hendrycks et al., arXiv 1912.02781: random chains of simple image operations, mixed)
AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
              "translate_x", "translate_y")  # fmt: skip


def augmix_chain(image):
    """[AugMix] 1-3 random ops, severity 1 (level ~ U(0.1, 1), magnitude level/10; shift side/3)."""
    for _ in range(np.random.randint(1, 4)):
        op, v = np.random.choice(AUGMIX_OPS), np.random.uniform(0.1, 1.0) / 10
        s = 1 if np.random.uniform() < 0.5 else -1
        affine = lambda c: image.transform(image.size, Image.AFFINE, c, resample=Image.BILINEAR)
        shear, t = s * v * 0.3, s * int(v * image.size[0] / 3)
        image = {"autocontrast": lambda: ImageOps.autocontrast(image),
                 "equalize": lambda: ImageOps.equalize(image),
                 "posterize": lambda: ImageOps.posterize(image, 4 - int(v * 4)),
                 "rotate": lambda: image.rotate(s * int(v * 30), resample=Image.BILINEAR),
                 "solarize": lambda: ImageOps.solarize(image, 256 - int(v * 256)),
                 "shear_x": lambda: affine((1, shear, 0, 0, 1, 0)),
                 "shear_y": lambda: affine((1, 0, 0, shear, 1, 0)),
                 "translate_x": lambda: affine((1, 0, t, 0, 1, 0)),
                 "translate_y": lambda: affine((1, 0, 0, 0, 1, t))}[op]()  # fmt: skip
    return image


class Views:
    """image -> (N, 3, n_px, n_px): the original (CLIP's preprocess) and N-1 augmented views."""

    def __init__(self, n_px, n_views=64, augmix=False, crop_scale=0.08, corrupt=False):
        self.original, self.n_views, self.augmix = test_transform(n_px), n_views, augmix
        # torchvision's defaults, as TPT: ratio 3/4-4/3, bilinear (not bicubic); open point 12: then
        # jitter, grayscale, blur, and random erasing with noise for the background substitution
        jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.5)
        blur = T.RandomApply([T.GaussianBlur(3, (0.1, 1.5))], p=0.3)
        crop = [T.RandomResizedCrop(n_px, scale=(crop_scale, 1)), T.RandomHorizontalFlip()]
        self.crop = T.Compose(crop + ([jitter, T.RandomGrayscale(0.2), blur] if corrupt else []))
        self.tensor = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        erase = T.RandomErasing(p=0.5, scale=(0.02, 0.25), value="random")
        self.view = T.Compose([self.tensor] + ([erase] if corrupt else []))  # (3, n_px, n_px)

    def __call__(self, image):
        views = [self.original(image)]
        for _ in range(self.n_views - 1):
            crop = self.crop(image)
            x = self.view(crop)
            if self.augmix:  # [AugMix] on normalised tensors: m x + (1-m) sum_i w_i chain_i(x)
                w, m = np.random.dirichlet([1.0] * 3), np.random.beta(1.0, 1.0)
                chains = [self.tensor(augmix_chain(crop)) for _ in range(3)]
                x = m * x + (1 - m) * sum(wi * c for wi, c in zip(w.tolist(), chains))
            views.append(x)
        return torch.stack(views)  # (N, 3, n_px, n_px)


class ViewDataset(torch.utils.data.Dataset):
    """(index, path, label) -> (views, label, index); image i's views depend on (seed, i) only."""

    def __init__(self, items, views, seed):
        self.items, self.views, self.seed = items, views, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        i, path, label = self.items[k]
        np.random.seed(self.seed * 1_000_003 + i)  # AugMix's generator
        torch.manual_seed(self.seed * 1_000_003 + i)  # torchvision's random transforms
        return self.views(Image.open(path).convert("RGB")), label, i


# One step, and the per-image procedures (select, step, predict), after a reset of the prompts
def train_step(model, optimizer, scaler, images, precision="fp32", features=None, align=None,
               labels=None):  # fmt: skip
    """TPT's or PromptAlign's step on the confident views (k, 3, H, W) or their frozen features
    (k, D); align: (layers, source means, variances (T, W), weight); labels: MaPLe's step."""
    tokens = [] if align else None
    with autocast(images.device, precision):
        if features is None:  # the vision prompts are learned: the vision tower is in the graph
            features = model.image_features(images, tokens)
        logits = model.logits(features)  # (k, C)
    # [TPT L_ent]; [MaPLe] cross-entropy on labelled images, in fp32 (autocast's logits are fp16)
    loss = marginal_entropy(logits) if labels is None else F.cross_entropy(logits.float(), labels)
    if align:  # [PromptAlign] the k views' token statistics (T, W) each vs the source's, weighted
        loss = loss + align[3] * token_alignment(*view_statistics(tokens, align[0]), *align[1:3])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # a no-op scale unless fp16 on CUDA
    scaler.step(optimizer)  # on the fp32 prompts; a step that overflows is skipped
    scaler.update()
    return loss.item()


def adapt(model, views, optimizer, scaler, steps=1, rho=0.1, precision="fp32", align=None):
    """TPT's procedure for one image's views (N, 3, H, W), views[0] the original, after a reset of
    the prompts and optimizer -> (prediction before tuning, after, steps skipped on overflow)."""
    frozen = model.prompts.depth == 0  # text-only prompts: the views' features never change
    with torch.no_grad(), autocast(views.device, precision):
        features = model.image_features(views)  # (N, D), every view in one batch
        logits = model.logits(features)  # (N, C)
    before, skipped = int(logits[0].argmax()), 0
    if steps == 0:
        return before, before, 0
    selected = select_confident(logits, rho)  # [TPT select] once, before the first step
    for _ in range(steps):  # the loss needs only the kept views: only they are recomputed
        kept, scale = features[selected] if frozen else None, scaler.get_scale()
        train_step(model, optimizer, scaler, views[selected], precision, kept, align)
        skipped += scaler.get_scale() < scale  # the scaler backs off after a skipped step
    with torch.no_grad(), autocast(views.device, precision):  # the original view, tuned prompts
        original = features[:1] if frozen else model.image_features(views[:1])
        return before, int(model.logits(original)[0].argmax()), skipped


def adapt_sync(model, views, optimizer, sync, steps=1, rho=0.1, precision="fp32", scaler=None):
    """PromptSync's procedure for one image, as adapt; scaler's scale multiplies the losses."""
    with torch.no_grad(), autocast(views.device, precision):  # the original view, loaded prompts
        before = int(model(views[:1])[0].argmax())
    w_ent, w_align, w_disc = sync["weights"]  # PromptSync's Table 5 ablation: a loss off = 0
    if not steps or not any(sync["weights"]):  # nothing to optimise: no step (no AdamW decay)
        return before, before, 0
    terms = lambda part: sync_terms(model, views, sync, rho, precision, part)  # at the current P
    loss_D = lambda: w_disc * terms("D")[2] if w_disc else None  # meta-train; None: weight 0
    test = lambda e, a, *_: w_ent * e + w_align * a  # meta-test, with the entropy (open point 16)
    loss_test = lambda: test(*terms("test")) if w_ent or w_align else None
    params = [p for p in model.prompts.parameters() if p.requires_grad]
    lr, scale = optimizer.param_groups[0]["lr"], scaler.get_scale() if scaler else 1.0
    stepped = meta_update(params, optimizer, loss_D, loss_test, lr, steps, scale)
    with torch.no_grad(), autocast(views.device, precision):  # the original view, tuned prompts
        return before, int(model(views[:1])[0].argmax()), int(not stepped)


# main: the source stage (MaPLe's prompts, what PromptAlign and PromptSync align to), test stage
def source_stage(args, model, data, test_sets, config, run_dir, device):
    """[MaPLe] learn the prompts on the source shots, record what PromptAlign and PromptSync use."""
    learned = [p for p in model.parameters() if p.requires_grad]
    n_px, precision = model.clip.visual.input_resolution, args.precision
    optimizer = torch.optim.SGD(learned, args.lr, 0.9, weight_decay=args.weight_decay)  # MaPLe's
    fp16 = precision != "fp32" and device.type == "cuda"  # a loss scaler for fp16's range
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    loader = make_loader(data["train"], train_transform(n_px, args.crop_scale), args.batch_size,
                         args.workers, device, shuffle=True)  # fmt: skip
    save(os.path.join(run_dir, "log.jsonl"), "")  # a fresh log (a source stage never resumes)
    for epoch in range(0 if args.eval_only else args.epochs):
        lr = lr_at_epoch(epoch, args.lr, args.epochs)  # MaPLe's: a warm-up epoch at 1e-5, cosine
        optimizer.param_groups[0]["lr"] = lr
        t0, losses, n = time.time(), [], 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            losses.append(train_step(model, optimizer, scaler, images, precision, labels=labels))
            n += len(labels)
        log_epoch(run_dir, epoch + 1, args.epochs, time.time() - t0, n, lr=lr, loss=losses)
    # [PromptAlign] the statistics, with the learned prompts, over the whole train split (not only
    # the shots; CLIP's preprocess); [PromptSync] the class prototypes (open point 4)
    every = load_dataset(args.data, args.split_file)["train"]
    loader = make_loader(every, test_transform(n_px), 100, args.workers, device)
    means, variances = token_statistics(model, loader, device, precision)
    ckpt = dict(config=config, state=learned_state(model), means=means, variances=variances)
    views, names = Views(n_px, 4, crop_scale=args.crop_scale), data["classnames"]
    ckpt.update(source_prototypes(model, data["train"], names, views, args.seed, device, precision))
    save(os.path.join(run_dir, "checkpoint.pt"), ckpt)
    zero_shot, acc = {}, {}
    for name, (items, classnames) in test_sets.items():  # zero-shot CLIP vs the learned prompts
        loader = make_loader(items, test_transform(n_px), 100, args.workers, device)
        features, labels = encode_images(model.clip.encode_image, loader, device, precision)
        weights = zeroshot_classifier(model.clip, classnames, ["a photo of a {}."])
        zero_shot[name] = accuracy(model.clip.logit_scale.exp() * features @ weights.t(), labels)
        model.prompts.set_classnames(model.clip, classnames)
        with torch.no_grad():  # no graph through the learned text prompts (model.logits)
            features, labels = encode_images(model.image_features, loader, device, precision)
            acc[name] = accuracy(model.logits(features), labels)
    return zero_shot, acc, {}


def test_stage(args, model, ckpt, test_sets, run_dir, device):
    """[TPT] each test image alone: reset, views, step, predict; a predictions.jsonl line each."""
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(learned, args.lr, weight_decay=args.weight_decay)
    initial = copy.deepcopy((model.prompts.state_dict(), optimizer.state_dict()))
    run = dict(steps=0 if args.eval_only else args.steps, rho=args.rho, precision=args.precision)
    align = alignment_targets(args, ckpt, model) if args.loss == "align" else None
    sync, weights = None, [float(w) for w in args.sync_weights.split(",")]  # Table 5's ablation
    fp16 = args.precision != "fp32" and device.type == "cuda"
    n_px, n_views = model.clip.visual.input_resolution, 1 if args.eval_only else args.views
    views = Views(n_px, n_views, args.augmix, args.crop_scale, args.corrupt)
    path, (K, N) = os.path.join(run_dir, "predictions.jsonl"), map(int, args.shard.split("/"))
    done = read_predictions(run_dir) if args.resume else {}
    save(path, "".join(json.dumps(r) + "\n" for r in done.values()))  # drops a line cut short
    for name, (items, classnames) in test_sets.items():
        model.prompts.set_classnames(model.clip, classnames)
        model.prompts.load_state_dict(initial[0])  # the prototypes' h^t: at the loaded prompts
        if args.loss == "sync":
            sync = dict(match_prototypes(model, ckpt, classnames, device), weights=weights)
        todo = [(i, *item) for i, item in enumerate(items) if i % N == K and (name, i) not in done]
        dataset = ViewDataset(todo, views, args.seed)  # one image's views per item, from workers
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.workers)
        with open(path, "a") as f:
            for images, label, i in tqdm(loader, name, mininterval=10):
                model.prompts.load_state_dict(initial[0])  # [TPT] episodic: reset the prompts
                optimizer.load_state_dict(initial[1])  # ... and AdamW's state
                # a loss scaler (TPT's init 1000), fresh per image: an overflow skips this step
                run["scaler"] = torch.amp.GradScaler(device.type, init_scale=1000, enabled=fp16)
                x = images.to(device)
                if sync:
                    before, after, skip = adapt_sync(model, x, optimizer, sync, **run)
                else:
                    before, after, skip = adapt(model, x, optimizer, align=align, **run)
                r = dict(set=name, index=i, label=label, before=before, after=after, n=len(items))
                f.write(json.dumps(dict(r, skipped=skip)) + "\n")
                f.flush()  # a killed run keeps every image it finished (--resume)
    return summary(read_predictions(run_dir))


def alignment_targets(args, ckpt, model):
    """PromptAlign's source statistics of the aligned blocks -> train_step's `align`."""
    means, v, spec, L = ckpt["means"], model.clip.visual, args.align_layers, len(ckpt["means"])
    shape = (v.positional_embedding.shape[0] + model.prompts.n_ctx, v.conv1.out_channels)
    layers = list(range(L)) if spec == "all" else [int(i) for i in spec.split(",") if i.isdigit()]
    if means.shape[1:] != shape or not layers or max(layers) >= L:
        fail(f"{args.load}: statistics {tuple(means.shape)} or --align-layers {spec} do not fit "
             f"this backbone ({L} blocks, {shape} tokens x width); use 0,1 or all")  # fmt: skip
    stats = [list(ckpt[k][layers].to(model.prompts.ctx.device)) for k in ("means", "variances")]
    return layers, *stats, args.align_weight  # (T, W) per block each


def read_predictions(run_dir):
    """{(test set, image index): record} of a run folder's predictions.jsonl ({} if none)."""
    path, records = os.path.join(run_dir, "predictions.jsonl"), {}
    for line in open(path).read().splitlines() if os.path.isfile(path) else []:
        try:
            r = json.loads(line)
            records[r["set"], r["index"]] = r
        except ValueError:  # a line cut short by a kill
            continue
    return records


def summary(records):
    """-> {set: accuracy before tuning (metrics.json's "zero_shot")}, {set: after}, {skipped}."""
    before, after, records = {}, {}, list(records.values())
    for name in dict.fromkeys(r["set"] for r in records):
        rs = [r for r in records if r["set"] == name]
        before[name] = 100 * float(np.mean([r["before"] == r["label"] for r in rs]))
        after[name] = 100 * float(np.mean([r["after"] == r["label"] for r in rs]))
    return before, after, dict(skipped_steps=sum(r.get("skipped", 0) for r in records))


def main(args):
    device, source, loss = torch.device(args.device), args.stage == "source", args.loss
    ckpt = load_checkpoint(args.load) if args.load else {}
    need = None if source else dict(align="means", sync="proto_cls").get(loss)
    if need and (args.depth == 0 or need not in ckpt):
        fail(f"--loss {loss} aligns to what a source stage records: --load the checkpoint.pt of "
             "a --stage source run (MaPLe prompts; rerun it if it predates this file)")  # fmt: skip
    # Data: the labelled source shots, or the test sets
    dataset, data, test_sets = load_task(args, args.shots)  # the test stage: 0 shots, train/ unused
    method = "maple" if source else dict(align="promptalign", sync="promptsync").get(loss, "tpt")
    method += "_maple" if method == "tpt" and args.depth else ""
    folder = f"{args.shots}shot_seed{args.seed}" if source else f"seed{args.seed}"
    folder += "" if args.shard.endswith("/1") else "_shard" + args.shard.replace("/", "of")
    run_dir = args.out or os.path.join("runs", method, dataset, folder)
    torch.manual_seed(args.seed)

    # Frozen CLIP and the prompts: every test set's class names must fit, before any work
    clip_model = load_clip(args.backbone, device, args.precision)
    try:
        model = MultimodalPromptedCLIP(clip_model, data["classnames"], args.n_ctx, args.depth)
        for classnames in [*(c for _, c in test_sets.values()), data["classnames"]]:
            model.prompts.set_classnames(clip_model, classnames)
    except (ValueError, RuntimeError) as e:  # RuntimeError: clip.tokenize, a name too long
        fail(str(e))
    learned, kind = learned_state(model.to(device)), "maple" if args.depth else "tpt"
    print(f"{method}: {kind} prompts, learned {list(learned)}; CLIP is frozen")
    config = dict(method=kind, backbone=args.backbone, n_ctx=args.n_ctx, depth=args.depth)
    if args.load:
        load_learned(model, ckpt, args.load, config)
    os.makedirs(run_dir, exist_ok=True)
    save(os.path.join(run_dir, "args.json"), dict(vars(args), method=method, dataset=dataset))

    # The source stage's epochs, or the test images one by one; then metrics.json
    t0 = time.time()
    if source:
        zero_shot, acc, extra = source_stage(args, model, data, test_sets, config, run_dir, device)
    else:
        zero_shot, acc, extra = test_stage(args, model, ckpt, test_sets, run_dir, device)
    extra["seconds"] = round(time.time() - t0, 1)
    return finish_run(run_dir, args, method, dataset, zero_shot, acc, **extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.description = f"{__doc__.splitlines()[0]} Defaults: the papers' settings."
    add = p.add_argument
    add("--stage", choices=["source", "test"], default="test", help="source: MaPLe's prompts")
    add("--loss", choices=["tpt", "align", "sync"], default="tpt", help="the test stage's method")
    add("--setting", choices=["dg", "fine-grained"], default="dg", help="dg: ImageNet's shifts")
    add("--n-ctx", type=int, help="learned text tokens (TPT: 'a photo of a'; MaPLe: 'a photo')")
    add("--depth", type=int, help="MaPLe's prompt depth J (0: TPT's text-only prompts)")
    add("--backbone", default="ViT-B/16", help="CLIP name or checkpoint path (TPT also: RN50)")
    add("--data", required=True, help="root with test/ (and train/ for --stage source)")
    add("--split-file", help="CoOp's split_zhou_<Name>.json (then --data is its image root)")
    add("--eval-data", nargs="*", default=[], help="more test sets (ImageFolder roots)")
    add("--shots", type=int, help="source images per class (seeded sample)")
    add("--epochs", type=int, default=2, help="source epochs (the first is the warm-up)")
    add("--batch-size", type=int, default=4, help="source batch size")
    add("--lr", type=float, help="source: SGD's; test: AdamW's")
    add("--weight-decay", type=float, help="source: SGD's; test: AdamW's")
    add("--crop-scale", type=float, default=0.08, help="smallest crop area (toy source: 1)")
    add("--views", type=int, default=64, help="views per test image, the original included")
    add("--rho", type=float, default=0.1, help="confidence selection: the share of views kept")
    add("--steps", type=int, default=1, help="AdamW steps per image (sync: inner iterations)")
    add("--augmix", type=int, choices=[0, 1], help="AugMix on the views")
    add("--corrupt", type=int, choices=[0, 1], help="corrupted views (PromptSync's)")
    add("--align-layers", default="0,1", help="PromptAlign's blocks (code: 0,1; paper: all)")
    add("--align-weight", type=float, default=100 / 3, help="PromptAlign's beta (code: 100/3)")
    add("--sync-weights", default="1,1,1", help="E,A,D: L_ent's, L_A's, L_D's weights (0: off)")
    add("--shard", default="0/1", help="K/N: only every N-th test image, from the K-th")
    p.set_defaults(subsample="all")  # load_task's base/new split: not used here
    args = parse(p, argv, PRESETS, lambda a: "source" if a.stage == "source" else a.loss)
    K, _, N = args.shard.partition("/")
    if not (K.isdigit() and N.isdigit() and int(K) < int(N)):
        fail(f"--shard {args.shard}: expected K/N with 0 <= K < N, e.g. 0/4")
    weights = args.sync_weights.split(",")
    if len(weights) != 3 or not all(w.replace(".", "", 1).isdigit() for w in weights):
        fail(f"--sync-weights {args.sync_weights}: expected three numbers >= 0, e.g. 0,1,1")
    if args.stage == "test" and not args.eval_only and int(args.views * args.rho) < 1:
        fail(f"--views {args.views} with --rho {args.rho} keeps no view; raise one of them")
    if (args.eval_only and not args.load) or (args.stage == "source" and args.resume):
        fail("--eval-only needs --load; --resume continues a test stage (rerun a source stage)")
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


if __name__ == "__main__":
    main(parse_args())
