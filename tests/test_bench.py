"""bench.py: it runs on the CPU for every method, and its exactness check can fail."""

import json

import torch
from conftest import tiny_clip

import bench

CPU = torch.device("cpu")


def test_bench_runs_every_method_on_the_cpu(tiny_ckpt, tmp_path):
    out = tmp_path / "bench.json"
    bench.run(bench.parse_args(["--arch", tiny_ckpt, "--classes", "5", "--batch-size", "2",
        "--steps", "2", "--warmup", "1", "--device", "cpu", "--out", str(out)]))  # fmt: skip
    result = json.loads(out.read_text())
    rows = result["rows"]
    written = bench.TEXT_VARIANTS["shared"]
    assert {r["method"] for r in rows if r["variant"] == written} == {
        "coop-text",
        "coop",
        "cocoop",
        "prograd",
    }
    assert all(r["median_ms"] > 0 for r in rows)
    # FLOPs are counted (an adapter step on the tiny CLIP's cached features rounds to 0 GFLOP)
    assert all(r["gflop"] > 0 or r["variant"] == "on cached features" for r in rows)
    assert all(r["gflop"] >= 0 for r in rows)
    plain = [r for r in rows if r["exact"] is not None]
    # a ResNet: every method but the ViT-only ones (PromptAlign, PromptSync, VPT's prompt tokens)
    assert {r["method"] for r in rows} == {
        "coop-text", "coop", "cocoop", "prograd", "clip-adapter", "tip-f", "tip", "probe",
        "eval", "tpt", "vpt-pad",
    }  # fmt: skip
    assert {r["variant"] for r in plain} == {
        bench.TEXT_VARIANTS["cut"],
        bench.TEXT_VARIANTS["full"],
        "teacher with its own image forward",
        "re-encoded for each classifier",
        "image features recomputed every epoch",
        "77 positions, features recomputed",
    }
    assert all(r["peak_mib"] is not None for r in rows)  # the CPU's resident-memory peak
    kept = {r["variant"]: r["saved_mib"] for r in rows if r["method"] == "coop-text"}
    assert kept[written] < kept[bench.TEXT_VARIANTS["cut"]] < kept[bench.TEXT_VARIANTS["full"]]
    assert all(r["exact"] for r in plain)  # every speed-up keeps the results
    assert result["note"].startswith("CPU run")


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


class EncoderOffByOne(bench.FullTextEncoder):
    """A deliberately wrong formulation: the feature one position before the end-of-text token."""

    def forward(self, prompts, tokenized):
        return super().forward(
            prompts, (tokenized.argmax(dim=-1, keepdim=True) - 1 == torch.arange(77)).int()
        )


def test_the_exactness_check_reports_a_wrong_formulation():
    model = tiny_clip(seed=12)
    names = ["red", "green", "blue"]
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    fast = bench.logits_and_grads(
        "coop",
        model,
        *bench.make_method("coop", model, names, CPU, "fp32")[:2],
        images,
        labels,
        "fp32",
    )
    for text in ("cut", "full"):
        right = bench.make_method("coop", model, names, CPU, "fp32", text)
        assert bench.max_difference(
            fast, bench.logits_and_grads("coop", model, *right[:2], images, labels, "fp32")
        )[1]
    wrong = bench.make_method("coop", model, names, CPU, "fp32", "full")
    wrong[0].text_encoder = EncoderOffByOne(model)
    diff, exact = bench.max_difference(
        fast, bench.logits_and_grads("coop", model, *wrong[:2], images, labels, "fp32")
    )
    assert not exact and diff > 0


def test_bench_times_only_the_plain_rows_asked_for(tiny_ckpt):
    result = bench.run(bench.parse_args(["--arch", tiny_ckpt, "--methods", "prograd", "--plain",
        "teacher", "--classes", "3", "--batch-size", "2", "--steps", "1", "--warmup", "1",
        "--device", "cpu"]))  # fmt: skip
    assert [r["variant"] for r in result["rows"]] == [
        bench.TEXT_VARIANTS["shared"],
        "teacher with its own image forward",
    ]


def test_bench_checks_the_vit_only_rows_too(tiny_vit_ckpt):
    """PromptAlign, PromptSync and VPT's prompt tokens need a ViT: their rows, and the exactness
    checks of TPT's, PromptAlign's and VPT-deep's plain formulations, on the tiny ViT."""
    args = ["--arch", tiny_vit_ckpt, "--classes", "3", "--batch-size", "8", "--steps", "1"]
    args += ["--warmup", "1", "--device", "cpu", "--plain", "hooks"]
    methods = "tpt,align,sync,vpt-shallow,vpt-deep,vpt-pad"
    rows = bench.run(bench.parse_args(args + ["--methods", methods]))["rows"]
    written = [r["method"] for r in rows if r["exact"] is None]
    assert written == ["tpt", "promptalign", "promptsync", "vpt-shallow", "vpt-deep", "vpt-pad"]
    plain = {(r["method"], r["variant"]): r["exact"] for r in rows if r["exact"] is not None}
    assert plain == {
        ("tpt", "77 positions, features recomputed"): True,
        ("promptalign", "77 positions, features recomputed"): True,
        ("vpt-deep", "CLIP's transformer + forward hooks"): True,
    }
    assert all(r["median_ms"] > 0 and r["gflop"] > 0 for r in rows)
