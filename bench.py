"""bench.py: time each method's training step on a real CLIP architecture, and each exact speed-up.

Each method is built as its `main` builds it, and the `train_step` its loop calls is timed on random
images and N class names at the paper's batch size, beside the plain formulations the scripts
avoid, with the largest difference in logits and gradients (within tolerance, or DIFFERENT):
  - the text encoder as the scripts run it (the prefix every class shares, [SOS] and the context,
    once; then each class's own tokens)  vs  every prompt whole, cut after the longest end-of-text
    token (cut)  vs  all 77 positions, as the official CoOp code (full); exact: it is causal
  - ProGrad's teacher with an image forward of its own (teacher)  vs  sharing the student's
  - the adapters on cached image features  vs  recomputing them from the pixels every epoch
  - TPT and PromptAlign as written  vs  the 77-position text tower, every view recomputed
  - VPT-deep's own loop over the blocks  vs  CLIP's transformer with forward hooks (hooks)
"coop-text" is CoOp's step without the image encoder. Random weights: nothing is downloaded.
Columns: median and p10-p90 ms of a step (CUDA events, or the CPU's wall clock); peak MiB (CUDA's
allocator, or the growth of resident memory, Linux VmHWM); saved MiB, what autograd keeps for the
backward pass (CLIP's frozen weights and autocast's copies of them left out); GFLOP of one step
(torch.utils.flop_counter, forward and backward); TFLOP/s, and that as a fraction of one matrix
product's rate in the rows' dtype, measured in the same run. The check's tolerance, relative to
the largest logit or gradient, comes from the precision (both sides run in it): 1e-4 in fp32;
100 units in the last place in half precision, fp16 1e-1 (its rounding through CLIP reaches 4e-2
on the tests' tiny CLIPs, a wrong formulation 0.5 and more); bf16 (amp on the CPU) 0.8, rough.

Run
  python bench.py --arch ViT-B/16 --classes 1000 --precision amp --out bench.json      # a GPU
  python bench.py --arch ViT-B/16 --classes 100 --batch-size 2 --steps 3 --warmup 1     # a CPU
"""

import argparse
import contextlib
import copy
import ctypes
import gc
import os
import statistics
import sys
import time
import warnings
from argparse import ArgumentDefaultsHelpFormatter as DEFAULTS
from collections import namedtuple
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapter  # noqa: E402
import coop  # noqa: E402
import prograd  # noqa: E402
import promptsync  # noqa: E402
import vpt  # noqa: E402

# OpenAI's architectures: embed_dim, image_resolution, vision_layers, vision_width,
# vision_patch_size, context_length, vocab_size, transformer_width, transformer_heads, text layers
OPENAI_CONFIGS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
}
# The papers' batch sizes (VPT: MaPLe's VPT-in-CLIP; its border: Bahng et al.); TPT: 64 views
PAPER_BATCH = {"coop-text": 32, "coop": 32, "cocoop": 1, "prograd": 32, "clip-adapter": 32,
               "tip-f": 256, "vpt-shallow": 4, "vpt-deep": 4, "vpt-pad": 256,
               "tpt": 64}  # fmt: skip
TEXT_VARIANTS = {  # how the text encoder runs the prompts; "shared" is what the scripts do
    "shared": "as written: shared prefix once, then each class's tokens",
    "cut": "every prompt whole, cut at end-of-text",
    "full": "text encoder over all 77 positions",
}

# A row: one formulation of one method's step, as data. step() runs it once; outcome() -> (logits,
# gradients) to check against its method's first row (as the scripts run it), or None. The builders
# below return a method's rows; ROWS names them; time_rows is the one timing loop for them all.
Row = namedtuple("Row", "method variant batch step outcome")


def applied(model, logits, step, env):
    """A row's outcome: its logits, then the gradients its step applies (loss scaling off: a scaled
    fp16 gradient can overflow, and the step would skip it)."""
    with torch.no_grad(), coop.autocast(env.device, env.precision):
        before = logits().float().flatten()
    step(torch.amp.GradScaler(env.device.type, enabled=False))
    return before, [p.grad.detach().float().clone() for p in model.parameters() if p.requires_grad]


def compute_dtype(device, precision):
    """The dtype of the rows' matrix products: fp16 weights, autocast's under amp, else fp32."""
    if precision == "fp16":
        return torch.float16
    one = torch.ones(1, 1, device=device)
    with coop.autocast(device, precision):
        return (one @ one).dtype


def grad_scaler(env, **options):
    """The methods' loss scaler: on under amp where autocast runs fp16 (CUDA; bf16 needs none)."""
    on = env.precision == "amp" and compute_dtype(env.device, env.precision) == torch.float16
    return torch.amp.GradScaler(env.device.type, enabled=on, **options)


def inputs(env, batch, seed, features=False):
    """Random images (B, 3, H, W), or normalised image features (B, D), and labels (B,); seeded."""
    torch.manual_seed(seed)
    n_px, D = env.clip.visual.input_resolution, env.clip.visual.output_dim
    x = torch.randn(*((batch, D) if features else (batch, 3, n_px, n_px)), device=env.device)
    x = F.normalize(x, dim=-1) if features else x
    return x, torch.randint(len(env.names), (batch,), device=env.device)


# --- CoOp, CoCoOp, ProGrad: the text encoder three ways; ProGrad's teacher two ways --------------
def full_text_encoder(clip_model, prompts, tokenized, deep=()):
    """The plain text tower: CLIP's blocks over all 77 positions, as the original CoOp, TPT and
    PromptAlign code run it (MaPLe's deep prompts written over positions 1..M before block j)."""
    dtype = clip_model.dtype
    x = prompts.type(dtype) + clip_model.positional_embedding.type(dtype)  # (N, 77, d)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for j, block in enumerate(clip_model.transformer.resblocks):
        if 1 <= j <= len(deep):
            new = deep[j - 1].type(x.dtype)[:, None].expand(-1, x.shape[1], -1)  # (M, N, d)
            x = torch.cat([x[:1], new, x[1 + len(new) :]])  # (77, N, d)
        x = block(x)  # with CLIP's 77 x 77 causal mask
    x = clip_model.ln_final(x.permute(1, 0, 2)).type(dtype)  # LND -> NLD: (N, 77, d)
    x = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)]  # the EOT rows: (N, d)
    return x @ clip_model.text_projection  # (N, D)


def prompt_rows(method, env):
    """coop-text, coop, cocoop or prograd: the step as written, with the text encoder cut or over 77
    positions, and (ProGrad) with a teacher that encodes the images itself."""
    batch, precision = env.batch or PAPER_BATCH[method], env.precision
    # coop-text: the text step alone, normalised image features as its input
    images, labels = inputs(env, batch, seed=1, features=method == "coop-text")
    encode = (lambda x: x) if method == "coop-text" else env.clip.encode_image
    features = lambda: F.normalize(encode(images).float(), dim=-1)  # (B, D), as the step has them

    def row(text="shared", own_teacher=False):  # the model as its main builds it
        torch.manual_seed(0)
        if method == "prograd":  # 16 vectors initialised with "a photo of a"
            model = prograd.CustomCLIP(env.clip, env.names, 16, "a photo of a")
            teacher = prograd.zeroshot_classifier(env.clip, env.names, ["a photo of a {}."])
        else:  # CoOp's 16 random vectors, CoCoOp's 4 initialised with "a photo of a"
            n_ctx, init = (4, "a photo of a") if method == "cocoop" else (16, "")
            model = coop.CustomCLIP(env.clip, env.names, n_ctx, init, cocoop=method == "cocoop")
            teacher = None
        # False: every prompt whole, through the cut encoder
        model.to(env.device).prefix_is_shared = text == "shared"
        learned = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(learned, lr=0.002, momentum=0.9, weight_decay=5e-4)

        def step(scaler):
            if own_teacher:  # the original: the teacher, a second CLIP, encodes the batch again
                with torch.no_grad(), coop.autocast(env.device, precision):
                    features()
            if teacher is None:
                return coop.train_step(model, encode, optimizer, scaler, images, labels, precision)
            data = (images, labels, precision)
            return prograd.train_step(model, encode, teacher, optimizer, scaler, *data, 1.0, 1.0)

        def logits():  # ProGrad's: the student's and the zero-shot teacher's
            f = features()
            if teacher is None:
                return model(f)
            zero_shot = model.logit_scale.exp() * (features() if own_teacher else f) @ teacher.t()
            return torch.cat([model(f).float().flatten(), zero_shot.float().flatten()])

        if text == "full":  # each call with the text encoder over 77 positions, as the original
            full = mock.patch.object(prograd if method == "prograd" else coop, "text_encoder",
                                     full_text_encoder)  # fmt: skip
            step, logits = full(step), full(logits)
        variant = "teacher with its own image forward" if own_teacher else TEXT_VARIANTS[text]
        check = partial(applied, model, logits, step, env)
        return Row(method, variant, batch, partial(step, grad_scaler(env)), check)

    rows, teacher = [row()], method == "prograd" and "teacher" in env.plain
    rows += [row(text) for text in ("cut", "full") if text in env.plain]
    return rows + [row(own_teacher=True)] if teacher else rows


# --- adapter.py: CLIP-Adapter and Tip-Adapter-F two ways; Tip-Adapter's search; linear probe -----
def adapter_rows(method, env):
    """clip-adapter, tip-f: the step on cached features, and recomputing them every epoch (as the
    original loops); tip: Tip-Adapter's alpha/beta search (200 x 20 grid, 4 validation images per
    class) and one L-BFGS fit of the linear probe. 16 shots per class, random features."""
    batch, C = env.batch or PAPER_BATCH.get(method), len(env.names)
    s = env.clip.logit_scale.exp().item()  # 1 / CLIP's temperature, a number
    W = coop.zeroshot_classifier(env.clip, env.names, ["a photo of a {}."])  # (C, D)
    keys, _ = inputs(env, 16 * C, seed=3, features=True)  # (N, D)
    values = F.one_hot(torch.arange(16 * C, device=env.device) % C, C).float()  # (N, C)
    if method == "tip":
        f_val, y_val = inputs(env, 4 * C, seed=4, features=True)
        search = lambda: adapter.search_alpha_beta(f_val, y_val, W, keys, values, s, (7.0, 3.0))
        fit = lambda: adapter.fit_linear_probe(keys, values.argmax(dim=1), C, 1.0)
        return [Row("tip", "alpha/beta search, 200 x 20 grid", 4 * C, search, None),
                Row("probe", "one L-BFGS fit (C = 1)", 16 * C, fit, None)]  # fmt: skip
    images, labels = inputs(env, batch, seed=1)

    def encode():  # the frozen image encoder: once (the cache) or every epoch (the original)
        with torch.no_grad(), coop.autocast(env.device, env.precision):
            return env.clip.encode_image(images).float()  # (B, D), raw

    def row(variant, features):  # the model, optimizer, scheduler and logits as adapter.main has
        torch.manual_seed(0)
        if method == "clip-adapter":
            model = adapter.ClipAdapter(W.shape[1]).to(env.device)
            opt = torch.optim.SGD(model.parameters(), 0.002, momentum=0.9, weight_decay=5e-4)
            sched, forward = None, lambda f: adapter.clip_adapter_logits(f, model, 0.2, W, s)
        else:
            model = adapter.TipAdapterF(keys, values).to(env.device)
            opt = torch.optim.AdamW(model.parameters(), 1e-3, eps=1e-4, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10**6)
            forward = lambda f: model(F.normalize(f, dim=-1), W, 1.0, 1.0, s)
        step = lambda scaler: adapter.train_step(forward, opt, features(), labels, sched)
        check = partial(applied, model, lambda: forward(features()), step, env)
        return Row(method, variant, batch, lambda: step(None), check)  # no loss scaler here

    cached = encode()
    return [row("on cached features", lambda: cached),
            row("image features recomputed every epoch", encode)]  # fmt: skip


# --- promptsync.py: one test image per step; TPT and PromptAlign two ways; PromptSync -------------
def test_time_model(env, maple):
    """promptsync.py's model, AdamW, and the reset before every image: TPT's prompts (4 tokens, lr
    5e-3) or MaPLe's (2 tokens, lr 4e-2, depth 3 or what the towers have: the tests' tiny CLIP)."""
    towers = (env.clip.transformer, env.clip.visual.transformer) if maple else ()
    depth = min(3, *(len(t.resblocks) for t in towers)) if maple else 0
    torch.manual_seed(0)
    model = promptsync.MultimodalPromptedCLIP(env.clip, env.names, 2 if maple else 4, depth).to(
        env.device
    )
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(learned, 4e-2 if maple else 5e-3, weight_decay=0.01)
    initial = copy.deepcopy((model.prompts.state_dict(), optimizer.state_dict()))

    def reset():
        model.prompts.load_state_dict(initial[0])
        optimizer.load_state_dict(initial[1])

    return model, optimizer, reset


def plain_tpt(model, optimizer, scaler, views, rho, precision, align):
    """TPT's step as the original code takes it: every view through the image tower (PromptAlign:
    with gradients), the selection, the loss, one step, the original view encoded again."""
    tokens = [] if align else None
    with coop.autocast(views.device, precision):
        with torch.set_grad_enabled(align is not None):  # TPT: the image side under no_grad
            features = model.image_features(views, tokens)  # all the views
        logits = model.logits(features)  # (N, C), the 77-position text tower
    kept = promptsync.select_confident(logits.detach(), rho)
    total = promptsync.marginal_entropy(logits[kept])
    if align:
        x = [tokens[l][:, kept].float() for l in align[0]]  # (T, k, W)
        means, variances = [t.mean(1) for t in x], [t.var(1, unbiased=False) for t in x]
        total = total + align[3] * promptsync.token_alignment(means, variances, *align[1:3])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad(), coop.autocast(views.device, precision):  # the original view, again
        return int(model.logits(model.image_features(views[:1]))[0].argmax())


def test_time_rows(loss, env):
    """One test image: reset, the views, the selection, one AdamW step, the original view's
    prediction. tpt, align (a ViT only): as written and as the original code (plain_tpt). sync:
    PromptSync (adapt_sync) with random class prototypes, alone: no other code to compare with."""
    if loss != "tpt" and not hasattr(env.clip.visual, "transformer"):
        return []  # MaPLe's vision prompts need a ViT
    n_views, C, D = env.batch or PAPER_BATCH["tpt"], len(env.names), env.clip.visual.output_dim
    rho, precision = max(0.1, 1 / n_views), env.precision  # TPT's 10 %; at least one view
    views, _ = inputs(env, n_views, seed=3)
    model, optimizer, reset = test_time_model(env, maple=loss != "tpt")
    if loss == "sync":
        rand = lambda *shape: torch.randn(*shape, device=env.device)
        sync = dict(cls=rand(C, D), tokens=rand(C, D), text_at_load=F.normalize(rand(C, D), dim=-1),
                    views=F.normalize(rand(C, 8, D), dim=-1),  # 8 stored views per class
                    groups=torch.arange(C, device=env.device), weights=[1.0, 1.0, 1.0])  # fmt: skip

        def step():
            reset()
            return promptsync.adapt_sync(model, views, optimizer, sync, 1, rho, precision)

        return [Row("promptsync", "as written (one test image)", n_views, step, None)]
    align = None
    if loss == "align":  # source statistics of the right shape (their values do not matter)
        tokens = []
        with torch.no_grad(), coop.autocast(env.device, precision):
            model.image_features(views[:4], tokens)
        x = torch.stack(tokens[:2]).float()  # (2, T, 4, W)
        align = ([0, 1], list(x.mean(dim=2)), list(x.var(dim=2, unbiased=False)), 100 / 3)
    plain = test_time_model(env, maple=loss != "tpt")
    pl = plain[0].prompts  # the second model's text tower runs over all 77 positions
    text = lambda: full_text_encoder(env.clip, pl.text_prompts(), pl.tokenized, pl.deep_text)
    plain[0].text_features = lambda: F.normalize(text().float(), dim=-1)

    def row(variant, model, optimizer, reset):
        def step(scaler):
            reset()
            if model is not plain[0]:
                return promptsync.adapt(model, views, optimizer, scaler, 1, rho, precision, align)
            return plain_tpt(model, optimizer, scaler, views, rho, precision, align)

        timed = lambda: step(grad_scaler(env, init_scale=1000))  # a new one per image, as TPT's
        logits = lambda: model.logits(model.image_features(views))
        check = partial(applied, model, logits, step, env)
        return Row("tpt" if loss == "tpt" else "promptalign", variant, n_views, timed, check)

    return [row("as written (one test image)", model, optimizer, reset),
            row("77 positions, features recomputed", *plain)]  # fmt: skip


# --- vpt.py: the whole image tower in the graph; VPT-deep two ways --------------------------------
class HookedDeepVPT(vpt.PromptedViT):
    """Plain VPT-deep: CLIP's `visual.transformer` called whole on [CLS, P_0, patches], a forward
    hook on every block re-concatenating its output with the next prompts (a port's way)."""

    def forward(self, images):
        v, p, B = self.visual, self.n_prompts, images.shape[0]
        x = v.conv1(images.type(v.conv1.weight.dtype)).flatten(2).permute(0, 2, 1)  # (B, N, w)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(B, 1, -1), x], dim=1)  # (B, 1+N, w)
        x = v.ln_pre(x + v.positional_embedding.to(x.dtype))
        x = torch.cat([x[:, :1], self.prompts[0].to(x.dtype).expand(B, -1, -1), x[:, 1:]], dim=1)
        P = lambda i, out: self.prompts[i].to(out.dtype).unsqueeze(1).expand(-1, B, -1)  # (p, B, w)
        # the hook on block i-1: its output (LND) -> [CLS, P_i, patches]
        replace = lambda i: lambda block, args, x: torch.cat([x[:1], P(i, x), x[1 + p :]])
        blocks = v.transformer.resblocks
        hooks = [blocks[i - 1].register_forward_hook(replace(i)) for i in range(1, len(blocks))]
        try:
            x = v.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # LND in, NLD out
        finally:
            for h in hooks:
                h.remove()
        return v.ln_post(x[:, 0, :]) @ v.proj  # (B, D)


def vpt_rows(method, env):
    """vpt.py's step: the image tower forward and backward to the prompts (8 tokens per layer, as
    MaPLe's VPT; or the 30-px border at 224 px, scaled); VPT-deep also through HookedDeepVPT."""
    visual, batch, precision = env.clip.visual, env.batch or PAPER_BATCH[method], env.precision
    if method != "vpt-pad" and not hasattr(visual, "transformer"):
        print(f"{method}: skipped (not a ViT; only vpt-pad runs on a ResNet)")
        return []
    images, labels = inputs(env, batch, seed=1)
    weights = vpt.zeroshot_classifier(env.clip, env.names, ["a photo of a {}."])
    head = vpt.TextHead(weights, env.clip.logit_scale)  # frozen: one for both rows

    def row(variant, hooked=False):  # the model and optimizer as vpt.py's main builds them
        torch.manual_seed(0)
        if method == "vpt-pad":
            encoder = vpt.PaddedEncoder(visual)
            sgd = dict(lr=40.0, momentum=0.9, weight_decay=0.0)
        else:
            kind = HookedDeepVPT if hooked else vpt.PromptedViT
            encoder = kind(visual, 8, deep=method == "vpt-deep")
            sgd = dict(lr=0.0025, momentum=0.9, weight_decay=5e-4)
        model = vpt.VisualPromptedCLIP(encoder, head).to(env.device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], **sgd)
        step = lambda scaler: vpt.train_step(model, optimizer, scaler, images, labels, precision)
        check = partial(applied, model, lambda: model(images), step, env)
        return Row(method, variant, batch, partial(step, grad_scaler(env)), check)

    rows, hooks = [row("as written")], method == "vpt-deep" and "hooks" in env.plain
    return rows + [row("CLIP's transformer + forward hooks", True)] if hooks else rows


# The rows behind each --methods name ("adapter": three builders), built one at a time (see run)
ROWS = {name: [partial(prompt_rows, name)] for name in ("coop-text", "coop", "cocoop", "prograd")}
ROWS["adapter"] = [partial(adapter_rows, name) for name in ("clip-adapter", "tip-f", "tip")]
ROWS.update({name: [partial(test_time_rows, name)] for name in ("tpt", "align", "sync")})
ROWS.update({name: [partial(vpt_rows, name)] for name in ("vpt-shallow", "vpt-deep", "vpt-pad")})
PLAIN = ("cut", "full", "teacher", "hooks")


# --- Measurements: the exactness check, FLOPs, memory, time -------------------------------------
def max_difference(a, b, relative=1e-4):
    """Largest |difference| of logits and gradients; exact: at most `relative` x the largest."""
    (la, ga), (lb, gb) = a, b
    diff = torch.stack([(la - lb).abs().max()] + [(x - y).abs().max() for x, y in zip(ga, gb)])
    scale = torch.stack([la.abs().max()] + [x.abs().max() for x in ga]).max().item()
    return diff.max().item(), bool(diff.max() <= max(relative * scale, 1e-6))


def count_flops(fn):
    """FLOPs of fn by torch's counter without its per-module table, whose backward hooks
    autograd.grad refuses on a module fed a learned leaf (MaPLe's projection of the context)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = contextlib.nullcontext()  # tracks no module: every FLOP is "Global"
    counter.mod_tracker.parents = {"Global"}
    with counter:
        fn()
    return counter.get_total_flops()


FROZEN = set()  # storages of CLIP's weights: held anyway, not counted as a step's activations
storage = lambda t: t.untyped_storage().data_ptr()


class FrozenCopies(TorchDispatchMode):
    """Notes autocast's half-precision copies of FROZEN weights (made anew at every use: autocast
    keeps only copies of weights that require grad), held until the mode ends."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        cast = func is torch.ops.aten._to_copy.default  # what autocast's casts come down to
        if cast and (storage(args[0]) in FROZEN or storage(args[0]) in self.copies):
            self.copies[storage(out)] = out.untyped_storage()  # held: its address is not reused
        return out


def saved_mib(fn):
    """MiB autograd keeps for fn's backward passes (summed), each storage once and held until fn
    returns (an address reused later is another), CLIP's weights and autocast's copies left out."""
    kept = {}

    def pack(t):
        if storage(t) not in FROZEN and storage(t) not in frozen.copies:
            kept[storage(t)] = t.untyped_storage()
        return t

    frozen = FrozenCopies()
    frozen.copies = {}  # storage address -> the copy's storage
    with frozen, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in kept.values()) / 2**20


# this process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in kB
resident = lambda key: int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0])


def peak_mib(fn, device):
    """One call of fn and its peak memory in MiB: CUDA's allocator peak, or on the CPU the growth of
    the process's resident memory above what it held before (weights, data; Linux, else None)."""
    gc.collect()  # what earlier steps left
    if device.type != "cuda":
        try:  # give freed memory back to the system; restart the peak count at the current size
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to VmRSS
        except OSError:  # not Linux
            fn()
            return None
        base = resident("VmRSS")
        fn()
        return (resident("VmHWM") - base) / 1024
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def milliseconds(fn, device):
    """One call of fn: CUDA events (on the current device: run sets it), or the wall clock."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def matmul_rate(device, precision):
    """TFLOP/s of one large matrix product in the rows' dtype (and TF32 setting), on this device."""
    dtype = compute_dtype(device, precision)  # a CPU's fp16 products are slow: a smaller one
    n = 8192 if device.type == "cuda" else 256 if dtype == torch.float16 else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = [milliseconds(lambda: a @ b, device) for _ in range(13)][3:]  # after 3 warm-up ones
    return 2 * n**3 / (statistics.median(times) / 1000) / 1e12


# --- The timing loop, the run, the output --------------------------------------------------------
def time_rows(rows, env, args, rate):
    """The one timing loop: each row's outcome (before a step moves it), checked against its
    method's first row's; each row warmed up (the first step counts the FLOPs), its memory measured
    alone; then the timed steps in turn, one of each row, so that load changes hit all alike."""
    dtype, first, checks, costs = compute_dtype(env.device, env.precision), {}, [], []
    relative = 1e-4 if dtype == torch.float32 else 100 * torch.finfo(dtype).eps
    for r, outcome in [(r, r.outcome and r.outcome()) for r in rows]:  # before any step is taken
        expected = first.setdefault(r.method, outcome)  # the method as written
        checked = outcome is not None and outcome is not expected
        checks.append(max_difference(expected, outcome, relative) if checked else (None, None))
    for r in rows:
        flops = count_flops(r.step)
        for _ in range(args.warmup - 1):
            r.step()
        costs.append((flops, peak_mib(r.step, env.device), saved_mib(r.step)))
    times = [[milliseconds(r.step, env.device) for r in rows] for _ in range(args.steps)]
    times = list(zip(*times))  # one list of times per row
    results = []
    for r, t, (flops, peak, kept), (diff, exact) in zip(rows, times, costs, checks):
        median = statistics.median(t)
        q = statistics.quantiles(t, n=10, method="inclusive") if len(t) >= 2 else [median] * 9
        tflops = flops / (median / 1000) / 1e12
        results.append(dict(method=r.method, variant=r.variant, batch=r.batch,
            classes=len(env.names), median_ms=round(median, 3), p10_ms=round(q[0], 3),
            p90_ms=round(q[-1], 3), peak_mib=None if peak is None else round(peak, 1),
            saved_mib=round(kept, 1), gflop=round(flops / 1e9, 3), tflops=round(tflops, 4),
            fraction_of_matmul=round(tflops / rate, 4), max_abs_diff=diff,
            exact=exact))  # fmt: skip
        print(markdown_row(results[-1], results[0]["median_ms"]), flush=True)
    return results


def run(args):
    device, precision = torch.device(args.device), args.precision
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events and synchronize() time the current device
    if args.arch in OPENAI_CONFIGS:  # a real architecture with random weights, as load_clip gives
        torch.manual_seed(0)
        clip_model = clip.model.CLIP(*OPENAI_CONFIGS[args.arch]).requires_grad_(False).eval()
        if precision == "fp16":  # CLIP's own fp16 layout, as load_clip's
            clip.model.convert_weights(clip_model)
    else:
        clip_model = coop.load_clip(args.arch, device, precision)
    clip_model.to(device)  # (load_clip's is there already)
    FROZEN.clear()  # this run's weights only (a freed storage's address can be reused)
    FROZEN.update(storage(p) for p in clip_model.parameters())
    names = [f"class {i}" for i in range(args.classes)]
    env = argparse.Namespace(clip=clip_model, names=names, device=device, precision=precision,
                             batch=args.batch_size, plain=args.plain)  # fmt: skip
    rate, rows, name = matmul_rate(device, precision), [], "cpu"
    name = torch.cuda.get_device_name(device) if cuda else name
    print(f"{name}, {args.arch}, {precision}, {args.classes} classes; a matrix product's rate "
          f"measured here: {rate:.3f} TFLOP/s\n{HEAD}")  # fmt: skip
    for build in [build for method in args.methods for build in ROWS[method]]:
        rows += time_rows(build(env), env, args, rate)  # then nothing holds the rows' models:
        gc.collect()  # they are freed before the next are built (each peak is its own)
    tf32 = dict(matmul=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.allow_tf32)
    on = lambda key: "TF32" if tf32[key] else "true fp32"
    note = (f"CUDA events; fp32 matmuls run {on('matmul')}, convolutions {on('cudnn')} (TF32 "
            "convolutions: 'of matmul' can pass 100 %)" if cuda else
            "CPU run: wall-clock times, peak MiB the growth of resident memory") + (
            "; GFLOP: the counter counts CUDA's attention kernels but not the CPU's flash "
            "attention (a GPU run's GFLOP is a few % above a CPU run's)")  # fmt: skip
    print(note)
    result = dict(arch=args.arch, device=name, precision=precision, classes=args.classes,
                  matmul_tflops=round(rate, 4), tf32=tf32, torch=torch.__version__, rows=rows,
                  note=note)  # fmt: skip
    if args.out:
        coop.save(args.out, result)
    FROZEN.clear()
    return result


HEAD = "| method | variant | batch | classes | median ms | p10–p90 ms | peak MiB | saved MiB "
HEAD += "| GFLOP | TFLOP/s | of matmul | speed-up | max abs diff |\n" + "|---" * 13 + "|"


def markdown_row(r, base_ms):
    """One row of the table; the speed-up is against the method's first row (as written)."""
    checked, verdict = r["exact"] is not None, "exact" if r["exact"] else "DIFFERENT"
    speedup = f"{r['median_ms'] / base_ms:.2f}×" if checked else ""
    diff = f"{r['max_abs_diff']:.1e} ({verdict})" if checked else ""
    return (f"| {r['method']} | {r['variant']} | {r['batch']} | {r['classes']} "
            f"| {r['median_ms']:.1f} | {r['p10_ms']:.1f}–{r['p90_ms']:.1f} "
            f"| {r['peak_mib'] or '–'} | {r['saved_mib']} | {r['gflop']:.1f} | {r['tflops']:.3f} "
            f"| {100 * r['fraction_of_matmul']:.0f}% | {speedup} | {diff} |")  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DEFAULTS)
    add = p.add_argument
    add("--arch", default="ViT-B/16", help=f"{', '.join(OPENAI_CONFIGS)} or a checkpoint's path")
    add("--methods", default="all", help=f"all, or some of {','.join(ROWS)} (comma-separated)")
    add("--classes", type=int, default=1000, help="number of class names (ImageNet has 1000)")
    add("--batch-size", type=int, help="default: each method's paper batch size")
    add("--precision", choices=["fp32", "amp", "fp16"], help="default: amp on CUDA, else fp32")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda[:N] or cpu")
    add("--steps", type=int, default=20, help="timed steps per row")
    add("--warmup", type=int, default=5, help="untimed steps first (the first counts FLOPs)")
    add("--plain", default=",".join(PLAIN), help="plain rows to time (see the docstring), or none")
    add("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.methods = list(ROWS) if args.methods == "all" else args.methods.split(",")
    args.plain = set() if args.plain == "none" else set(args.plain.split(","))
    if set(args.methods) - set(ROWS) or args.plain - set(PLAIN):
        coop.fail(f"--methods takes some of {', '.join(ROWS)} or all; --plain: {', '.join(PLAIN)}")
    args.precision = args.precision or ("amp" if args.device.startswith("cuda") else "fp32")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        coop.fail(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args


if __name__ == "__main__":
    run(parse_args())
