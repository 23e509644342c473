"""bench.py: time each method's training step on a real CLIP architecture, and each exact speed-up.

For every method file present it builds the method as its `main` does and times the same
`train_step` that the training loop calls, on random images and N class names, at the method's paper
batch size. Next to each method it times the plain formulations the scripts avoid, in the same run,
and reports the largest difference in logits and gradients between the two (it must be within float
tolerance, or the row says DIFFERENT):
  - the text encoder as the scripts run it (the class-independent prefix, [SOS] and the context,
    once; then each class's own tokens)  vs  every prompt whole, cut after the longest end-of-text
    token  vs  all 77 positions, as the official CoOp code (all exact: the transformer is causal)
  - ProGrad's teacher with its own image forward  vs  sharing the student's image features
  - evaluation re-encoding the images for each classifier  vs  encoding them once per test set

On CUDA: warm-up, CUDA events, median and spread of many steps, peak memory, FLOPs of one step
(torch.utils.flop_counter), achieved TFLOP/s, and that as a fraction of the matrix-product rate
measured once on the same card in the same run. On the CPU the same table with wall-clock times,
and as peak memory the growth of the process's resident memory during the row (Linux VmHWM).
Both: "saved MiB", the tensors autograd keeps for the backward pass (CLIP's weights not counted),
the activation memory of the step, counted exactly with saved-tensor hooks.
"coop-text" is CoOp's step without the image encoder (its input is image features): the text step.
Weights are random (speed does not depend on their values), so nothing is downloaded.

Run
  python bench.py --arch ViT-B/16 --classes 1000 --precision amp --out bench.json      # a GPU
  python bench.py --arch ViT-B/16 --classes 100 --batch-size 2 --steps 3 --warmup 1     # this CPU
"""

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import coop  # noqa: E402

try:
    import prograd  # noqa: E402
except ImportError:  # the file is not there yet
    prograd = None
try:
    import adapter  # noqa: E402
except ImportError:
    adapter = None
try:
    import promptsync  # noqa: E402
except ImportError:
    promptsync = None
try:
    import vpt  # noqa: E402
except ImportError:
    vpt = None

# OpenAI's architectures: embed_dim, image_resolution, vision_layers, vision_width,
# vision_patch_size, context_length, vocab_size, transformer_width, transformer_heads,
# transformer_layers
OPENAI_CONFIGS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
}
PAPER_BATCH = {
    "coop-text": 32,
    "coop": 32,
    "cocoop": 1,
    "prograd": 32,
    "clip-adapter": 32,
    "tip-f": 256,
    "vpt-shallow": 4,  # MaPLe's VPT-in-CLIP setting (vpt.py's default)
    "vpt-deep": 4,
    "vpt-pad": 256,  # Bahng et al.
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark the methods' training steps and their exact speed-ups.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--arch",
        default="ViT-B/16",
        help=f"one of {', '.join(OPENAI_CONFIGS)} (random weights), or a checkpoint",
    )
    p.add_argument(
        "--methods",
        default="all",
        help="comma-separated: coop-text (the text step alone), coop, cocoop, prograd, adapter, "
        "tpt, align, sync, vpt-shallow, vpt-deep, vpt-pad (those whose files are present), or all",
    )
    p.add_argument(
        "--classes", type=int, default=1000, help="number of class names (ImageNet has 1000)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: each method's paper batch size"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "amp", "fp16"],
        default=None,
        help="default: amp on CUDA, else fp32",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed steps before timing (the first counts the FLOPs)",
    )
    p.add_argument(
        "--plain",
        default="cut,full,teacher,eval,hooks",
        help="the plain formulations to time side by side: cut (every prompt whole, cut at "
        "end-of-text), full (all 77 positions), teacher (ProGrad's own image forward), "
        "eval (features re-encoded per classifier), hooks (VPT-deep through CLIP's own "
        "transformer with forward hooks), or none",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def build_clip(arch, device, precision):
    """A real CLIP architecture with random weights (seeded), frozen, as load_clip returns it."""
    if arch not in OPENAI_CONFIGS:
        return coop.load_clip(arch, device, precision)
    torch.manual_seed(0)
    model = clip.model.CLIP(*OPENAI_CONFIGS[arch]).float()
    if precision == "fp16":
        clip.model.convert_weights(model)
    return model.requires_grad_(False).eval().to(device)


class FullTextEncoder(nn.Module):
    """The plain formulation: CLIP's text transformer over all 77 positions (the original CoOp)."""

    def __init__(self, clip_model):
        super().__init__()
        self.clip_model = clip_model

    def forward(self, prompts, tokenized):
        m = self.clip_model
        x = prompts.type(m.dtype) + m.positional_embedding.type(m.dtype)  # (N, 77, d)
        # the full causal mask, all 77 positions
        x = m.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = m.ln_final(x).type(m.dtype)
        return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ m.text_projection


# ------------------------------------------------------------------------------------------------
# The rows: (name, step function, a function giving logits and gradients for the exactness check)
# ------------------------------------------------------------------------------------------------
TEXT_VARIANTS = {  # how the text encoder runs the prompts; "shared" is what the scripts do
    "shared": "as written: shared prefix once, then each class's tokens",
    "cut": "every prompt whole, cut at end-of-text",
    "full": "text encoder over all 77 positions",
}


def make_method(method, clip_model, classnames, device, precision, text="shared"):
    """The method as its main builds it: model, optimizer, scaler, and the step the loop calls.
    text: "shared" (the scripts), "cut" (every prompt whole, cut at the last end-of-text token) or
    "full" (all 77 positions, as the official CoOp code)."""
    torch.manual_seed(0)
    if method == "prograd":
        model = prograd.CustomCLIP(clip_model, classnames, 16, "a photo of a").to(device)
        teacher = prograd.zeroshot_classifier(clip_model, classnames, ["a photo of a {}."])
    else:
        cocoop = method == "cocoop"
        model = coop.CustomCLIP(
            clip_model,
            classnames,
            n_ctx=4 if cocoop else 16,
            ctx_init="a photo of a" if cocoop else "",
            cocoop=cocoop,
        ).to(device)
        teacher = None
    model.shared_prefix = text == "shared"
    if text == "full":
        model.text_encoder = FullTextEncoder(clip_model)
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(learned, lr=0.002, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp" and device.type == "cuda")
    return model, teacher, optimizer, scaler


def encoder_of(method, clip_model):
    """The image side of a step: CLIP's image encoder, or none for "coop-text" (the text step
    alone: its "images" are already normalised image features)."""
    return (lambda x: x) if method == "coop-text" else clip_model.encode_image


def step_fn(
    method,
    clip_model,
    model,
    teacher,
    optimizer,
    scaler,
    images,
    labels,
    precision,
    teacher_forward=False,
):
    encode = encoder_of(method, clip_model)
    if method != "prograd":
        return lambda: coop.train_step(model, encode, optimizer, scaler, images, labels, precision)
    if not teacher_forward:
        return lambda: prograd.train_step(
            model, encode, teacher, optimizer, scaler, images, labels, precision, 1.0, 1.0
        )

    def plain():  # the original: the teacher (a second CLIP) encodes the same batch again
        with torch.no_grad(), coop.autocast(images.device, precision):
            clip_model.encode_image(images)
        return prograd.train_step(
            model, encode, teacher, optimizer, scaler, images, labels, precision, 1.0, 1.0
        )

    return plain


def logits_and_grads(
    method, clip_model, model, teacher, images, labels, precision, teacher_forward=False
):
    """What the exactness check compares: the step's logits and the gradients it applies."""
    encode = encoder_of(method, clip_model)
    with torch.no_grad(), coop.autocast(images.device, precision):
        f = F.normalize(encode(images).float(), dim=-1)
        f_teacher = F.normalize(encode(images).float(), dim=-1) if teacher_forward else f
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "prograd":
        G_d, G_g, _, logits = prograd.two_gradients(
            model, f, teacher, labels, 1.0, params, precision
        )
        teacher_logits = model.logit_scale.exp() * f_teacher @ teacher.t()
        grads = [prograd.project(d, g, 1.0) for d, g in zip(G_d, G_g)]
        return torch.cat([logits.float().flatten(), teacher_logits.flatten()]), grads
    with coop.autocast(images.device, precision):
        logits = model(f).float()
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), params)
    return logits.flatten(), grads


def max_difference(a, b):
    """Largest |difference| in logits and gradients, and whether it is within float tolerance."""
    (la, ga), (lb, gb) = a, b
    diff = max(
        [(la - lb).abs().max().item()]
        + [(x.float() - y.float()).abs().max().item() for x, y in zip(ga, gb)]
    )
    scale = max([la.abs().max().item()] + [x.float().abs().max().item() for x in ga])
    tolerance = (
        1e-4 if la.dtype == torch.float32 and all(g.dtype == torch.float32 for g in ga) else 1e-2
    ) * scale
    if not math.isfinite(diff):
        return diff, False
    return diff, diff <= max(tolerance, 1e-6)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def time_steps(fn, steps, warmup, device, count=False):
    """Per-step milliseconds (CUDA events on a GPU, wall clock on the CPU) and, with count, the
    FLOPs of one step, counted during the first warm-up step: no timed step pays for counting."""
    flops = None
    for i in range(max(warmup, 1 if count else 0)):
        if count and i == 0:
            with FlopCounterMode(display=False) as counter:
                fn()
            flops = counter.get_total_flops()
        else:
            fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times, flops


def matmul_rate(device, precision):
    """TFLOP/s of one large matrix product in the steps' precision, measured on this device."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = (
        torch.float16 if precision in ("amp", "fp16") and device.type == "cuda" else torch.float32
    )
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    ms = statistics.median(time_steps(lambda: a @ b, 10, 3, device)[0])
    return 2 * n**3 / (ms / 1000) / 1e12


def cpu_memory(field):
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_cpu_peak():
    """Return freed memory to the system and restart the peak count (Linux; elsewhere a no-op)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        return cpu_memory("VmRSS")
    except OSError:
        return None


def measure(fn, device):
    """One call of fn and its peak memory in MiB: CUDA's allocator peak, or on the CPU the growth of
    the process's resident memory above what it held before (weights, data)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) / 2**20
    base = reset_cpu_peak()
    fn()
    return None if base is None else cpu_memory("VmHWM") - base


FROZEN = set()  # storages of CLIP's weights: held anyway, not counted as a step's activations


def saved_mib(fn):
    """MiB of the tensors autograd keeps for the backward pass during one call of fn (each storage
    once, CLIP's frozen weights not counted): the step's activation memory, which, unlike the
    process's peak, does not depend on the allocator or on what else the process holds. The saved
    storages are held until fn returns, so that a freed address reused by a later pass is not
    mistaken for the same storage: for a step with several backward passes (PromptSync's two
    points) it is the sum over its passes. Under
    --precision amp, autocast's half-precision copies of the weights are new storages and are
    counted (not checked on a GPU here: the fp32 CPU rows hold no such copies)."""
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in FROZEN:
            kept[storage.data_ptr()] = storage  # held: its address cannot be reused meanwhile
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in kept.values()) / 2**20


def side_by_side(name, variants, batch, classes, device, steps, warmup, peak_rate):
    """Rows for (variant, fn, difference) triples of one method. Each fn is warmed up (its FLOPs
    counted in the first warm-up step) and its memory measured alone; then the timed steps run in
    alternation, one step of each variant in turn, so that a change in the machine's load during
    the measurement affects every variant alike."""
    flops, peaks, saved = [], [], []
    for _, fn, _ in variants:
        flops.append(time_steps(fn, 0, warmup, device, count=True)[1])
        peaks.append(measure(fn, device))
        saved.append(saved_mib(fn))
    times = [[] for _ in variants]
    for _ in range(steps):
        for i, (_, fn, _) in enumerate(variants):
            times[i] += time_steps(fn, 1, 0, device)[0]
    rows = []
    for (variant, _, difference), t, f, peak, kept in zip(variants, times, flops, peaks, saved):
        median = statistics.median(t)
        q = statistics.quantiles(t, n=10, method="inclusive") if len(t) >= 2 else [median] * 9
        achieved = f / (median / 1000) / 1e12
        rows.append(
            {
                "method": name,
                "variant": variant,
                "batch": batch,
                "classes": classes,
                "median_ms": round(median, 3),
                "p10_ms": round(q[0], 3),
                "p90_ms": round(q[-1], 3),
                "peak_mib": None if peak is None else round(peak, 1),
                "saved_mib": round(kept, 1),
                "gflop": round(f / 1e9, 3),
                "tflops": round(achieved, 4),
                "fraction_of_matmul": round(achieved / peak_rate, 4),
                "max_abs_diff": None if difference is None else difference[0],
                "exact": None if difference is None else difference[1],
            }
        )
        print(format_row(rows[-1]), flush=True)
    return rows


def row(name, variant, fn, batch, classes, device, steps, warmup, peak_rate, difference=None):
    """One row alone (see side_by_side)."""
    common = (batch, classes, device, steps, warmup, peak_rate)
    return side_by_side(name, [(variant, fn, difference)], *common)[0]


def run(args):
    device = torch.device(args.device)
    precision = args.precision or ("amp" if device.type == "cuda" else "fp32")
    available = ["coop-text", "coop", "cocoop"] + (["prograd"] if prograd else [])
    available += ["adapter"] if adapter else []
    available += ["tpt", "align", "sync"] if promptsync else []
    available += ["vpt-shallow", "vpt-deep", "vpt-pad"] if vpt else []
    methods = available if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in available]
    if unknown:
        sys.exit(f"error: unknown or missing methods {unknown}; available: {available}")
    plain = set() if args.plain == "none" else set(args.plain.split(","))
    if plain - {"cut", "full", "teacher", "eval", "hooks"}:
        sys.exit(f"error: --plain takes cut, full, teacher, eval, hooks or none, not {args.plain}")
    clip_model = build_clip(args.arch, device, precision)
    FROZEN.clear()  # this run's weights only (a freed storage's address can be reused)
    FROZEN.update(p.untyped_storage().data_ptr() for p in clip_model.parameters())
    n_px, dim = clip_model.visual.input_resolution, clip_model.visual.output_dim
    classnames = [f"class {i}" for i in range(args.classes)]
    peak = matmul_rate(device, precision)
    rows = []
    for method in methods:
        if method == "adapter":
            rows += adapter_rows(clip_model, classnames, args, device, precision, peak)
            continue
        if method.startswith("vpt-"):  # prompts in the image tower: the image side in the graph
            rows += vpt_rows(method, clip_model, classnames, args, device, precision, peak, plain)
            continue
        if method == "sync":  # PromptSync: one test image per step
            rows += promptsync_sync_rows(clip_model, classnames, args, device, precision, peak)
            continue
        if method in ("tpt", "align"):  # test-time tuning: one test image per step
            rows += promptsync_rows(clip_model, classnames, args, device, precision, peak, method)
            continue
        batch = args.batch_size or PAPER_BATCH[method]
        torch.manual_seed(1)
        if method == "coop-text":  # the text step alone: normalised image features as the input
            images = F.normalize(torch.randn(batch, dim, device=device), dim=-1)
        else:
            images = torch.randn(batch, 3, n_px, n_px, device=device)
        labels = torch.randint(args.classes, (batch,), device=device)
        built = make_method(method, clip_model, classnames, device, precision)
        variants = [
            (
                TEXT_VARIANTS["shared"],
                step_fn(method, clip_model, *built, images, labels, precision),
                None,
            )
        ]
        check = lambda *m, **k: logits_and_grads(
            method, clip_model, *m, images, labels, precision, **k
        )
        fast = check(*make_method(method, clip_model, classnames, device, precision)[:2])
        for text in [t for t in ("cut", "full") if t in plain]:
            other = make_method(method, clip_model, classnames, device, precision, text)
            variants.append(
                (
                    TEXT_VARIANTS[text],
                    step_fn(method, clip_model, *other, images, labels, precision),
                    max_difference(fast, check(*other[:2])),
                )
            )
        if method == "prograd" and "teacher" in plain:
            own = make_method(method, clip_model, classnames, device, precision)
            fn = step_fn(method, clip_model, *own, images, labels, precision, teacher_forward=True)
            variants.append(
                (
                    "teacher with its own image forward",
                    fn,
                    max_difference(fast, check(*own[:2], teacher_forward=True)),
                )
            )
        rows += side_by_side(
            method, variants, batch, args.classes, device, args.steps, args.warmup, peak
        )
    if "eval" in plain:
        rows += eval_rows(clip_model, classnames, args, device, precision, peak)
    result = {
        "arch": args.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
        "classes": args.classes,
        "matmul_tflops": round(peak, 4),
        "torch": torch.__version__,
        "rows": rows,
        "note": "CPU run: wall-clock times" if device.type == "cpu" else "CUDA events",
    }
    print(
        f"\n{result['device']}, {args.arch}, {precision}, {args.classes} classes; matrix-product "
        f"rate measured here: {peak:.3f} TFLOP/s"
        + (" (a CPU run: wall-clock times)" if device.type == "cpu" else "")
    )
    print(markdown_table(rows))
    if args.out:
        coop.save(args.out, result)
    FROZEN.clear()
    return result


def eval_rows(clip_model, classnames, args, device, precision, peak):
    """Zero-shot and a learned prompt on one test batch: image features encoded once vs twice."""
    batch = args.batch_size or 100  # the papers' test batch
    torch.manual_seed(2)
    images = torch.randn(
        batch,
        3,
        clip_model.visual.input_resolution,
        clip_model.visual.input_resolution,
        device=device,
    )
    model = make_method("coop", clip_model, classnames, device, precision)[0]
    weights = coop.zeroshot_classifier(clip_model, classnames, ["a photo of a {}."])

    @torch.no_grad()
    def evaluate(encode_twice):
        with coop.autocast(device, precision):
            f = F.normalize(clip_model.encode_image(images).float(), dim=-1)
            zero_shot = f @ weights.t()
            if encode_twice:
                f = F.normalize(clip_model.encode_image(images).float(), dim=-1)
            return torch.cat([zero_shot.flatten(), model(f).float().flatten()]), []

    difference = max_difference(evaluate(False), evaluate(True))
    variants = [
        ("image features encoded once", lambda: evaluate(False), None),
        ("re-encoded for each classifier", lambda: evaluate(True), difference),
    ]
    return side_by_side(
        "eval", variants, batch, args.classes, device, args.steps, args.warmup, peak
    )


def adapter_rows(clip_model, classnames, args, device, precision, peak):
    """adapter.py: each trained method's step on cached features, next to the same step recomputing
    the image features from the pixels every epoch (what the original loops do), with the exactness
    check on logits and gradients; and the training-free parts as rows of their own: Tip-Adapter's
    alpha/beta search (200 x 20 grid on 4 validation images per class) and one L-BFGS fit of the
    linear probe (16 shots per class). Keys: 16 shots per class, as at 16 shots."""
    n_px, dim, n_cls = (
        clip_model.visual.input_resolution,
        clip_model.visual.output_dim,
        len(classnames),
    )
    s = clip_model.logit_scale.exp().item()
    W = coop.zeroshot_classifier(clip_model, classnames, ["a photo of a {}."])  # (C, D)
    torch.manual_seed(3)
    n_keys = 16 * n_cls  # 16 shots per class
    keys = F.normalize(torch.randn(n_keys, dim, device=device), dim=-1)  # (N, D)
    values = F.one_hot(torch.arange(n_keys, device=device) % n_cls, n_cls).float()  # (N, C)
    rows = []
    for method in ("clip-adapter", "tip-f"):
        batch = args.batch_size or PAPER_BATCH[method]
        images = torch.randn(batch, 3, n_px, n_px, device=device)
        labels = torch.randint(n_cls, (batch,), device=device)

        def encode():  # the frozen image encoder, as the cache (once) or the original loop (always)
            with torch.no_grad(), coop.autocast(device, precision):
                return clip_model.encode_image(images).float()  # (B, D), raw

        def build():  # the model, optimizer, scheduler and logits as adapter.main builds them
            torch.manual_seed(0)
            if method == "clip-adapter":
                model = adapter.ClipAdapter(dim).to(device)
                opt = torch.optim.SGD(model.parameters(), 0.002, momentum=0.9, weight_decay=5e-4)
                return model, opt, None, lambda f: adapter.clip_adapter_logits(f, model, 0.2, W, s)
            model = adapter.TipAdapterF(keys, values).to(device)
            opt = torch.optim.AdamW(model.parameters(), 1e-3, eps=1e-4, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10**6)
            return model, opt, sched, lambda f: model(F.normalize(f, dim=-1), W, 1.0, 1.0, s)

        def check(features):  # what the exactness check compares: logits and gradients
            model, _, _, forward = build()
            logits = forward(features)
            grads = torch.autograd.grad(F.cross_entropy(logits, labels), list(model.parameters()))
            return logits.detach().float().flatten(), grads

        cached = encode()
        difference = max_difference(check(cached), check(encode()))
        common = (batch, n_cls, device, args.steps, args.warmup, peak)
        _, opt, sched, forward = build()
        _, opt2, sched2, forward2 = build()
        variants = [
            (
                "on cached features",
                lambda: adapter.train_step(forward, opt, cached, labels, sched),
                None,
            ),
            (
                "image features recomputed every epoch",
                lambda: adapter.train_step(forward2, opt2, encode(), labels, sched2),
                difference,
            ),
        ]
        rows += side_by_side(method, variants, *common)
    n_val = 4 * n_cls
    f_val = F.normalize(torch.randn(n_val, dim, device=device), dim=-1)
    y_val = torch.arange(n_val, device=device) % n_cls
    search = lambda: adapter.search_alpha_beta(f_val, y_val, W, keys, values, s, (7.0, 3.0))
    rows.append(
        row("tip", "alpha/beta search, 200 x 20 grid", search, n_val, n_cls, device, 1, 0, peak)
    )
    probe_x, probe_y = (
        torch.randn(n_keys, dim, device=device),
        torch.arange(n_keys, device=device) % n_cls,
    )
    fit = lambda: adapter.fit_linear_probe(probe_x, probe_y, n_cls, 1.0)
    rows.append(row("probe", "one L-BFGS fit (C = 1)", fit, n_keys, n_cls, device, 1, 0, peak))
    return rows


def full_text_features(model):
    """The plain text tower, as TPT's and PromptAlign's code run it: CLIP's own blocks over all 77
    positions (MaPLe's deep prompts written over positions 1..M before the blocks 1..J-1)."""
    m, pl = model.clip, model.prompts
    x = pl.text_prompts().type(m.dtype) + m.positional_embedding.type(m.dtype)  # (C, 77, d)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for j, block in enumerate(m.transformer.resblocks):
        if 1 <= j <= len(pl.deep_text):
            deep = pl.deep_text[j - 1].type(x.dtype)[:, None].expand(-1, x.shape[1], -1)
            x = torch.cat([x[:1], deep, x[1 + pl.n_ctx :]])  # (77, C, d)
        x = block(x)  # with CLIP's 77 x 77 causal mask
    x = m.ln_final(x.permute(1, 0, 2)).type(m.dtype)  # LND -> NLD: (C, 77, d)
    x = x[torch.arange(x.shape[0]), pl.tokenized.argmax(dim=-1)]  # the EOT rows: (C, d)
    return F.normalize((x @ m.text_projection).float(), dim=-1)  # (C, D)


def maple_depth(clip_model):
    """MaPLe's depth 3, or fewer on a CLIP whose towers have fewer blocks (the tests' tiny one)."""
    towers = (clip_model.transformer, clip_model.visual.transformer)
    return min(3, *(len(t.resblocks) for t in towers))


def promptsync_rows(clip_model, classnames, args, device, precision, peak, loss):
    """Test-time tuning, one test image per step: reset, 64 views (--batch-size), confidence
    selection, one AdamW step, the prediction of the original view. TPT (text prompts, 4 tokens)
    and PromptAlign (MaPLe prompts, 2 tokens, depth 3 or `maple_depth`; a ViT only), as
    promptsync.py runs them, and as the original code does: the text tower over all 77
    positions, every view's image features recomputed (TPT: the original view again for the
    prediction; PromptAlign: all 64 views through the vision tower with gradients, then the
    original view again). The check compares the logits
    of the views with the starting prompts and the gradients of the step."""
    ps, n_views = promptsync, args.batch_size or 64
    rho = max(0.1, 1 / n_views)  # TPT's 10 %; at least one view in a small CPU run
    n_px, amp = clip_model.visual.input_resolution, precision == "amp" and device.type == "cuda"
    torch.manual_seed(3)
    views = torch.randn(n_views, 3, n_px, n_px, device=device)
    if loss == "align" and not hasattr(clip_model.visual, "transformer"):
        return []  # MaPLe's vision prompts need a ViT
    built = []
    for plain in (False, True):  # two identical models: as written, and the plain one
        torch.manual_seed(0)
        shape = (4, 0) if loss == "tpt" else (2, maple_depth(clip_model))
        model = ps.PromptedCLIP(clip_model, classnames, *shape)
        model.to(device)
        if plain:
            model.text_features = lambda model=model: full_text_features(model)
        learned = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(learned, 5e-3 if loss == "tpt" else 4e-2, weight_decay=0.01)
        initial = copy.deepcopy((model.prompts.state_dict(), optimizer.state_dict()))
        built.append((model, learned, optimizer, initial))
    align = None
    if loss == "align":  # source statistics of the right shape (their values do not matter)
        tokens = []
        with torch.no_grad(), coop.autocast(device, precision):
            built[0][0].image_features(views[:4], tokens)
        x = torch.stack(tokens[:2]).float()  # (2, T, 4, W)
        align = ([0, 1], list(x.mean(dim=2)), list(x.var(dim=2, unbiased=False)), 100 / 3)

    def reset(model, optimizer, initial):  # promptsync.test_stage's reset, before every image
        model.prompts.load_state_dict(initial[0])
        optimizer.load_state_dict(initial[1])
        return torch.amp.GradScaler(device.type, init_scale=1000, enabled=amp)

    def as_written(model=built[0][0], optimizer=built[0][2], initial=built[0][3]):
        scaler = reset(model, optimizer, initial)
        return ps.adapt(model, views, optimizer, scaler, 1, rho, precision, align)

    def plain(model=built[1][0], optimizer=built[1][2], initial=built[1][3]):
        scaler, tokens = reset(model, optimizer, initial), [] if align else None
        with coop.autocast(device, precision):
            with torch.set_grad_enabled(align is not None):  # TPT: image side under no_grad
                features = model.image_features(views, tokens)  # all the views
            logits = model.logits(features)  # (N, C), the 77-position text tower
        kept = ps.select_confident(logits.detach(), rho)
        total = ps.marginal_entropy(logits[kept])
        if align:
            x = [tokens[l][:, kept].float() for l in align[0]]  # (T, k, W)
            means, variances = [t.mean(1) for t in x], [t.var(1, unbiased=False) for t in x]
            total = total + align[3] * ps.token_alignment(means, variances, align[1], align[2])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad(), coop.autocast(device, precision):  # the original view, again
            return int(model.logits(model.image_features(views[:1]))[0].argmax())

    def outcome(step, model, learned, *_):
        with torch.no_grad(), coop.autocast(device, precision):
            logits = model.logits(model.image_features(views)).float().flatten()
        step()
        return logits, [p.grad.detach().float().clone() for p in learned]

    difference = max_difference(outcome(as_written, *built[0]), outcome(plain, *built[1]))
    common = (n_views, len(classnames), device, args.steps, args.warmup, peak)
    name = "tpt" if loss == "tpt" else "promptalign"
    variants = [
        ("as written (one test image)", as_written, None),
        ("77 positions, features recomputed", plain, difference),
    ]
    return side_by_side(name, variants, *common)


def promptsync_sync_rows(clip_model, classnames, args, device, precision, peak):
    """PromptSync (promptsync.adapt_sync, as written) for one test image: reset, views
    (--batch-size, default 64), meta-train (the text tower and the kept views with gradients, a
    no-grad pass over every view for the confidence selection and p^ with those text features;
    all three losses, L_D's gradient; a step to temporary prompts), meta-test at the temporary
    prompts (the same passes, L_ent + L_A's gradient), one AdamW step with the averaged gradients,
    the original view's prediction.
    MaPLe prompts (2 tokens, depth 3 or `maple_depth`; a ViT only); the class prototypes are
    random tensors of the saved shapes (their values do not change the cost). No second variant:
    there is no other code to compare with."""
    ps, n_views = promptsync, args.batch_size or 64
    if not hasattr(clip_model.visual, "transformer"):
        return []  # MaPLe's vision prompts need a ViT
    rho = max(0.1, 1 / n_views)  # TPT's 10 %; at least one view in a small CPU run
    n_px, C = clip_model.visual.input_resolution, len(classnames)
    D = clip_model.visual.output_dim
    torch.manual_seed(3)
    views = torch.randn(n_views, 3, n_px, n_px, device=device)
    torch.manual_seed(0)
    model = ps.PromptedCLIP(clip_model, classnames, 2, maple_depth(clip_model)).to(device)
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(learned, 4e-2, weight_decay=0.01)
    initial = copy.deepcopy((model.prompts.state_dict(), optimizer.state_dict()))
    rand = lambda *shape: torch.randn(*shape, device=device)
    sync = dict(
        cls=rand(C, D),
        tokens=rand(C, D),
        text=F.normalize(rand(C, D), dim=-1),
        views=F.normalize(rand(C, 8, D), dim=-1),  # 8 stored source views per class
        groups=torch.arange(C, device=device),
        weights=[1.0, 1.0, 1.0],  # entropy, alignment, discrimination
    )

    def as_written():
        model.prompts.load_state_dict(initial[0])  # promptsync.test_stage's reset
        optimizer.load_state_dict(initial[1])
        return ps.adapt_sync(model, views, optimizer, sync, 1, rho, precision)

    common = (n_views, C, device, args.steps, args.warmup, peak)
    return [row("promptsync", "as written (one test image)", as_written, *common)]


class HookedDeepVPT(nn.Module):
    """The plain formulation of VPT-deep: CLIP's own `visual.transformer` called whole on the
    sequence [CLS, P_0, patches], and a forward hook on every block that re-concatenates its
    output with the next block's prompts (what a port that does not write its own loop does)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images):
        e, v = self.encoder, self.encoder.visual
        p, B = e.n_prompts, images.shape[0]
        x = v.conv1(images.type(v.conv1.weight.dtype)).flatten(2).permute(0, 2, 1)  # (B, N, w)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(B, 1, -1), x], dim=1)  # (B, 1+N, w)
        x = v.ln_pre(x + v.positional_embedding.to(x.dtype))
        x = torch.cat([x[:, :1], e.prompts[0].to(x.dtype).expand(B, -1, -1), x[:, 1:]], dim=1)

        def replace(i):  # block i-1's output (LND) -> [CLS, P_i, patches]
            def hook(module, inputs, out):
                prompts = e.prompts[i].to(out.dtype).unsqueeze(1).expand(-1, B, -1)  # (p, B, w)
                return torch.cat([out[:1], prompts, out[1 + p :]])

            return hook

        blocks = v.transformer.resblocks
        hooks = [blocks[i - 1].register_forward_hook(replace(i)) for i in range(1, len(blocks))]
        try:
            x = v.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # LND in, NLD out
        finally:
            for h in hooks:
                h.remove()
        return v.ln_post(x[:, 0, :]) @ v.proj  # (B, D)


def make_vpt(method, clip_model, classnames, device, hooked=False):
    """The model and optimizer as vpt.py's main builds them: the text head, 8 prompt tokens per
    layer (MaPLe's VPT), or the 30-px border at 224 px (scaled to the input size)."""
    torch.manual_seed(0)
    visual = clip_model.visual
    if method == "vpt-pad":
        encoder = vpt.PaddedEncoder(visual, vpt.pad_width(visual.input_resolution))
        sgd = dict(lr=40.0, momentum=0.9, weight_decay=0.0)
    else:
        encoder = vpt.PromptedViT(visual, 8, deep=method == "vpt-deep")
        sgd = dict(lr=0.0025, momentum=0.9, weight_decay=5e-4)
    if hooked:
        encoder = HookedDeepVPT(encoder)
    weights = vpt.zeroshot_classifier(clip_model, classnames, ["a photo of a {}."])
    model = vpt.PromptedCLIP(encoder, vpt.TextHead(weights, clip_model.logit_scale)).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], **sgd)
    return model, optimizer


def vpt_rows(method, clip_model, classnames, args, device, precision, peak, plain):
    """The step vpt.py's loop calls: the whole image encoder forward and backward to the prompts
    (the text classifier is encoded once, so the number of classes hardly matters). For VPT-deep,
    side by side: CLIP's own transformer with forward hooks that re-concatenate the sequence before
    every block, against vpt.py's explicit loop (which writes the prompt rows in place); the check
    compares the logits and the prompts' gradients."""
    if method != "vpt-pad" and not hasattr(clip_model.visual, "transformer"):
        print(f"{method}: skipped ({args.arch} is not a ViT; only vpt-pad runs on a ResNet)")
        return []
    batch, n_px = args.batch_size or PAPER_BATCH[method], clip_model.visual.input_resolution
    torch.manual_seed(1)
    images = torch.randn(batch, 3, n_px, n_px, device=device)
    labels = torch.randint(len(classnames), (batch,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp" and device.type == "cuda")

    def step(model, optimizer):
        return lambda: vpt.train_step(model, optimizer, scaler, images, labels, precision)

    def outcome(model):
        params = [p for p in model.parameters() if p.requires_grad]
        with coop.autocast(device, precision):
            logits = model(images).float()
        return logits.flatten(), torch.autograd.grad(F.cross_entropy(logits, labels), params)

    variants = [("as written", step(*make_vpt(method, clip_model, classnames, device)), None)]
    if method == "vpt-deep" and "hooks" in plain:
        fast = outcome(make_vpt(method, clip_model, classnames, device)[0])
        hooked = make_vpt(method, clip_model, classnames, device, hooked=True)
        difference = max_difference(fast, outcome(hooked[0]))
        variants.append(("CLIP's transformer + forward hooks", step(*hooked), difference))
    common = (batch, len(classnames), device, args.steps, args.warmup, peak)
    return side_by_side(method, variants, *common)


def format_row(r):
    verdict = "exact" if r["exact"] else "DIFFERENT"
    check = "" if r["exact"] is None else f"  max|diff| {r['max_abs_diff']:.2e} {verdict}"
    name, ms, gflop = f"{r['method']:>8} | {r['variant']:<36}", r["median_ms"], r["gflop"]
    return f"{name} | {ms:10.2f} ms | {gflop:10.2f} GFLOP{check}"


def markdown_table(rows):
    head = (
        "| method | variant | batch | classes | median ms | p10–p90 ms | peak MiB | saved MiB "
        "| GFLOP | TFLOP/s | of matmul | speed-up | max abs diff |"
    )
    lines = [head, "|" + "---|" * 13]
    base = {}
    for r in rows:
        key = r["method"]
        if r["exact"] is None:
            base[key] = r["median_ms"]
        speedup = "" if r["exact"] is None else f"{r['median_ms'] / base[key]:.2f}×"
        diff = (
            ""
            if r["exact"] is None
            else f"{r['max_abs_diff']:.1e} ({'exact' if r['exact'] else 'DIFFERENT'})"
        )
        lines.append(
            f"| {r['method']} | {r['variant']} | {r['batch']} | {r['classes']} "
            f"| {r['median_ms']:.1f} | {r['p10_ms']:.1f}–{r['p90_ms']:.1f} "
            f"| {r['peak_mib'] or '–'} | {r['saved_mib']} | {r['gflop']:.1f} | {r['tflops']:.3f} "
            f"| {100 * r['fraction_of_matmul']:.0f}% | {speedup} | {diff} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run(parse_args())
