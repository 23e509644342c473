"""bench.py: every method's rows run on the CPU, the exactness check can fail, the counters count
what they say, and the CUDA paths (fp16 autocast, loss scaling, fp16 weights) work in emulation."""

import argparse
import contextlib
import json
import weakref

import pytest
import torch
import torch.nn as nn
from conftest import tiny_clip

import adapter
import bench
import coop
import prograd
import promptsync
import vpt
from bench import full_text_encoder

CPU = torch.device("cpu")
VIT_ONLY = {
    "promptalign",
    "promptsync",
    "vpt-shallow",
    "vpt-deep",
}  # MaPLe's or VPT's prompt tokens
EVERY = {"coop-text", "coop", "cocoop", "prograd", "clip-adapter", "tip-f", "tip", "probe", "tpt",
         "vpt-pad"} | VIT_ONLY  # fmt: skip


def run(ckpt, *args):
    argv = ["--arch", ckpt, "--classes", "3", "--batch-size", "2", "--steps", "1", "--warmup", "1"]
    return bench.run(bench.parse_args(argv + ["--device", "cpu", *args]))


def test_bench_runs_every_method_on_the_cpu(tiny_ckpt, tmp_path):
    out = tmp_path / "bench.json"
    bench.run(bench.parse_args(["--arch", tiny_ckpt, "--classes", "5", "--batch-size", "2",
        "--steps", "2", "--warmup", "1", "--device", "cpu", "--out", str(out)]))  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["rows"]
    written = bench.TEXT_VARIANTS["shared"]
    prompts = {r["method"] for r in rows if r["variant"] == written}
    assert prompts == {"coop-text", "coop", "cocoop", "prograd"}
    assert all(r["median_ms"] > 0 for r in rows)
    # FLOPs are counted (an adapter step on the tiny CLIP's cached features rounds to 0 GFLOP)
    assert all(r["gflop"] > 0 or r["variant"] == "on cached features" for r in rows)
    assert all(r["gflop"] >= 0 for r in rows)
    plain = [r for r in rows if r["exact"] is not None]
    assert {r["method"] for r in rows} == EVERY - VIT_ONLY  # a ResNet: no prompt tokens in it
    assert {r["variant"] for r in plain} == {
        bench.TEXT_VARIANTS["cut"],
        bench.TEXT_VARIANTS["full"],
        "teacher with its own image forward",
        "image features recomputed every epoch",
        "77 positions, features recomputed",
    }
    assert all(r["peak_mib"] is not None for r in rows)  # the CPU's resident-memory peak
    kept = {r["variant"]: r["saved_mib"] for r in rows if r["method"] == "coop-text"}
    assert kept[written] < kept[bench.TEXT_VARIANTS["cut"]] < kept[bench.TEXT_VARIANTS["full"]]
    assert all(r["exact"] for r in plain)  # every speed-up keeps the results
    assert result["note"].startswith("CPU run") and set(result["tf32"]) == {"matmul", "cudnn"}


def test_saved_memory_counts_what_autograd_keeps_and_not_the_frozen_weights():
    x, w = torch.randn(1000, requires_grad=True), torch.randn(1000)
    bench.FROZEN.clear()  # no other run's weights
    assert bench.saved_mib(lambda: x.exp().sum().backward()) == 4000 / 2**20  # exp keeps its output
    bench.FROZEN.add(w.untyped_storage().data_ptr())
    try:
        # mul keeps only w for x's grad
        assert bench.saved_mib(lambda: (x * w).sum().backward()) == 0
    finally:
        bench.FROZEN.discard(w.untyped_storage().data_ptr())


def test_saved_memory_leaves_out_autocasts_copies_of_frozen_weights():
    """Under fp16 autocast a matrix product keeps the fp16 copy of a frozen weight for the input's
    gradient: a copy made anew at every use, not an activation. Another tensor's copy counts."""
    x = torch.randn(8, 512, requires_grad=True)
    w, other = torch.randn(512, 512), torch.randn(512, 512)
    step = lambda weight: (x @ weight).float().sum().backward()
    bench.FROZEN.clear()
    bench.FROZEN.add(w.untyped_storage().data_ptr())
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            assert bench.saved_mib(lambda: step(w)) == 0
            assert bench.saved_mib(lambda: step(other)) == 512 * 512 * 2 / 2**20  # fp16 copy
    finally:
        bench.FROZEN.clear()


def test_the_flop_counter_counts_autograd_grad_as_backward():
    """A module fed a learned leaf (MaPLe's projection of the context), differentiated with
    torch.autograd.grad as PromptSync's update does: stock FlopCounterMode's module tracking refuses
    it; bench's counter counts it as it counts .backward()."""
    proj, ctx = nn.Linear(64, 64).requires_grad_(False), nn.Parameter(torch.randn(8, 64))
    loss = lambda: proj(ctx).square().sum()
    by_backward = bench.count_flops(lambda: loss().backward())
    by_grad = bench.count_flops(lambda: torch.autograd.grad(loss(), [ctx]))
    assert by_backward == by_grad == 2 * (2 * 8 * 64 * 64)  # the forward product and ctx's gradient


def encoder_off_by_one(clip_model, prompts, tokenized, deep=()):
    """A deliberately wrong formulation: the feature one position before the end-of-text token."""
    before = (tokenized.argmax(dim=-1, keepdim=True) - 1 == torch.arange(77)).int()
    return full_text_encoder(clip_model, prompts, before, deep)


def test_the_exactness_check_reports_a_wrong_formulation(monkeypatch):
    env = argparse.Namespace(clip=tiny_clip(seed=12), names=["red", "green", "blue"], device=CPU,
                             precision="fp32", batch=2, plain={"cut", "full"})  # fmt: skip
    outcomes = [r.outcome() for r in bench.prompt_rows("coop", env)]  # as written, cut, full
    assert len(outcomes) == 3 and all(bench.max_difference(outcomes[0], o)[1] for o in outcomes)
    monkeypatch.setattr(bench, "full_text_encoder", encoder_off_by_one)
    wrong = bench.prompt_rows("coop", env)[2].outcome()
    diff, exact = bench.max_difference(outcomes[0], wrong)
    assert not exact and diff > 0


def test_bench_times_only_the_plain_rows_asked_for(tiny_ckpt):
    rows = run(tiny_ckpt, "--methods", "prograd", "--plain", "teacher")["rows"]
    variants = [r["variant"] for r in rows]
    assert variants == [bench.TEXT_VARIANTS["shared"], "teacher with its own image forward"]


def test_bench_checks_the_vit_only_rows_too(tiny_vit_ckpt):
    """PromptAlign, PromptSync and VPT's prompt tokens need a ViT: their rows, and the exactness
    checks of TPT's, PromptAlign's and VPT-deep's plain formulations, on the tiny ViT."""
    methods = "tpt,align,sync,vpt-shallow,vpt-deep,vpt-pad"
    rows = run(tiny_vit_ckpt, "--batch-size", "8", "--plain", "hooks", "--methods", methods)["rows"]
    written = [r["method"] for r in rows if r["exact"] is None]
    assert written == ["tpt", "promptalign", "promptsync", "vpt-shallow", "vpt-deep", "vpt-pad"]
    plain = {(r["method"], r["variant"]): r["exact"] for r in rows if r["exact"] is not None}
    assert plain == {
        ("tpt", "77 positions, features recomputed"): True,
        ("promptalign", "77 positions, features recomputed"): True,
        ("vpt-deep", "CLIP's transformer + forward hooks"): True,
    }
    assert all(r["median_ms"] > 0 and r["gflop"] > 0 for r in rows)


def test_each_methods_models_are_freed_before_the_next_is_built(tiny_ckpt, monkeypatch):
    """CUDA's peak memory counts every live tensor: a row's peak must not hold earlier rows'."""
    made, alive = [], []

    class Recorded(coop.CustomCLIP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    time_rows = bench.time_rows

    def recorded(rows, *args):  # how many models live when a method's rows are timed
        alive.append(sum(ref() is not None for ref in made))
        return time_rows(rows, *args)

    monkeypatch.setattr(coop, "CustomCLIP", Recorded)
    monkeypatch.setattr(bench, "time_rows", recorded)
    run(tiny_ckpt, "--methods", "coop-text,coop,cocoop", "--plain", "cut")
    assert len(made) == 6 and alive == [2, 2, 2]  # as written and cut, of this method only
    assert all(ref() is None for ref in made)


@pytest.fixture
def emulated_cuda(monkeypatch):
    """The CUDA paths on the CPU: every file's autocast runs fp16 (CUDA's amp; the CPU's is bf16),
    so that bench switches the loss scaler on and takes fp16's tolerance."""
    fp16 = lambda device, precision: (
        torch.autocast("cpu", dtype=torch.float16)
        if precision == "amp"
        else contextlib.nullcontext()
    )
    for module in (coop, prograd, vpt, promptsync, adapter):
        monkeypatch.setattr(module, "autocast", fp16)


@pytest.mark.parametrize("precision", ["amp", "fp16"])
def test_every_row_is_exact_under_emulated_cuda_precision(tiny_vit_ckpt, emulated_cuda, precision):
    """amp: fp16 autocast with the loss scaler on; fp16: CLIP's weights in fp16. Every row runs,
    every number is finite, and every speed-up is exact within fp16's tolerance (10 units in the
    last place: the tolerance comes from the precision, not from the outputs' fp32 dtype)."""
    env = argparse.Namespace(device=CPU, precision=precision)
    assert bench.grad_scaler(env).is_enabled() == (precision == "amp")
    assert bench.compute_dtype(CPU, precision) == torch.float16
    methods = [] if precision == "amp" else ["--methods", "coop,prograd,align,sync,vpt-deep"]
    rows = run(tiny_vit_ckpt, "--precision", precision, *methods)["rows"]
    assert precision == "fp16" or {r["method"] for r in rows} == EVERY
    keys = ("median_ms", "gflop", "saved_mib", "tflops", "max_abs_diff")
    numbers = [r[k] for r in rows for k in keys if r[k] is not None]
    assert all(torch.isfinite(torch.tensor(numbers)))
    plain = [r for r in rows if r["exact"] is not None]
    assert len(plain) >= 5 and all(r["exact"] for r in plain), plain


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA accepts --device cuda")
def test_device_cuda_without_cuda_fails_clearly():
    with pytest.raises(SystemExit, match="CUDA is not available here; use --device cpu"):
        bench.parse_args(["--device", "cuda"])
