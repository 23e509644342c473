"""TPT and PromptAlign on MaPLe's prompts: the properties the papers and the code give them."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_clip
from PIL import Image

import promptsync as ps

NAMES = ["red", "green circle", "blue"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are faster on one thread, and much faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(argv):
    return ps.main(ps.parse_args(argv + ["--workers", "0"]))


def entropy(logits):
    p = logits.softmax(dim=-1)
    return -(p * p.log()).sum(dim=-1)


def test_select_confident_keeps_exactly_the_lowest_entropy_views():
    torch.manual_seed(0)
    logits = torch.randn(64, 10) * torch.linspace(0.1, 8, 64)[torch.randperm(64)].unsqueeze(1)
    for rho, k in [(0.1, 6), (0.25, 16), (0.5, 32)]:
        kept = ps.select_confident(logits, rho)
        assert len(kept) == k == int(64 * rho) and len(set(kept.tolist())) == k
        others = torch.ones(64, dtype=torch.bool)
        others[kept] = False
        assert entropy(logits[kept]).max() <= entropy(logits[others]).min()


def test_marginal_entropy_is_the_entropy_of_the_mean_prediction_and_stays_finite():
    torch.manual_seed(1)
    logits = torch.randn(6, 100) * 5
    p_bar = logits.softmax(dim=-1).mean(dim=0)
    naive = -(p_bar * p_bar.log()).sum()
    torch.testing.assert_close(ps.marginal_entropy(logits), naive, rtol=1e-6, atol=1e-6)
    # extreme logits: two views, each certain of a different class -> p_bar = (1/2, 1/2, 0)
    extreme = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, float("-inf")]], requires_grad=True)
    h = ps.marginal_entropy(extreme)
    h.backward()
    assert torch.isfinite(h) and torch.isfinite(extreme.grad).all()
    assert abs(h.item() - math.log(2)) < 1e-6
    fp16 = (torch.randn(6, 1000) * 50).half()  # the dtype autocast gives; computed in fp32
    assert torch.isfinite(ps.marginal_entropy(fp16))


def test_token_alignment_is_zero_when_the_statistics_match_and_grows_with_their_distance():
    torch.manual_seed(2)
    means, variances = [torch.randn(7, 16) for _ in range(2)], [torch.rand(7, 16) for _ in range(2)]
    assert ps.token_alignment(means, variances, means, variances) == 0
    shift = [torch.randn(7, 16) for _ in range(2)]
    distances = [
        ps.token_alignment([m + a * s for m, s in zip(means, shift)], variances, means, variances)
        for a in (0.1, 0.5, 1.0, 2.0)
    ]
    assert all(x < y for x, y in zip(distances, distances[1:]))
    expected = sum(0.5 * (a * s).abs().mean() for a, s in zip([1.0, 1.0], shift))
    torch.testing.assert_close(distances[2], expected)  # [PromptAlign, code] 0.5 L1 of the means
    wider = [v + 1.0 for v in variances]
    assert ps.token_alignment(means, wider, means, variances).item() == pytest.approx(1.0)


@pytest.mark.parametrize("n_ctx", [4, 2])
def test_zero_depth_and_no_step_give_exactly_zero_shot_clip(n_ctx):
    clip_model = tiny_clip(vit=True, seed=3)
    model = ps.MultimodalPromptedCLIP(clip_model, NAMES, n_ctx=n_ctx, depth=0)
    texts = [f"a photo of a {c}." for c in NAMES]
    weights = ps.zeroshot_classifier(clip_model, NAMES, ["a photo of a {}."])
    with torch.no_grad():
        # TPT's context through the shared-prefix encoder: CLIP's own text features of the words
        text = model.text_features()
        words = F.normalize(clip_model.encode_text(ps.tokenize(clip_model, texts)), dim=-1)
        torch.testing.assert_close(text, words, rtol=1e-5, atol=1e-6)  # CLIP's own, 77 positions
        by_hand = text_by_hand(
            clip_model, model.prompts.text_prompts(), model.prompts.tokenized, []
        )
        torch.testing.assert_close(text, F.normalize(by_hand, dim=-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.text_features(), weights)  # CLIP's own words
    views, optimizer = ps.Views(32, n_views=8), torch.optim.AdamW(model.parameters())
    torch.manual_seed(3)
    for _ in range(4):
        image = Image.fromarray((torch.rand(48, 40, 3) * 255).byte().numpy())
        x = views(image)
        with torch.no_grad():
            f = F.normalize(clip_model.encode_image(ps.test_transform(32)(image)[None]), dim=-1)
            zero_shot = clip_model.logit_scale.exp() * f @ weights.t()
            torch.testing.assert_close(model.logits(model.image_features(x))[:1], zero_shot)
        prediction = int(zero_shot.argmax())
        assert ps.adapt(model, x, optimizer, None, steps=0, rho=0.25) == (prediction, prediction, 0)


def test_maple_prompts_start_from_a_photo_and_deep_copies_of_one_coupling():
    clip_model = tiny_clip(vit=True, seed=4)
    model = ps.MultimodalPromptedCLIP(clip_model, NAMES, n_ctx=2, depth=2)
    pl = model.prompts
    with torch.no_grad():
        words = clip_model.token_embedding(
            ps.tokenize(clip_model, [f"a photo of a {c}." for c in NAMES])
        )
    assert torch.equal(pl.text_prompts(), words)  # [MaPLe] ctx = "a photo"; "of a" stays fixed
    assert len(pl.deep_text) == 1 and pl.deep_text[0].std().item() == pytest.approx(0.02, rel=0.5)
    assert len(pl.vision_prompts()) == 2 and pl.vision_prompts()[0].shape == (2, 64)
    deep3 = ps.MultimodalPrompts(clip_model, NAMES, n_ctx=2, depth=2)
    assert not torch.equal(deep3.proj.weight, deep3.deep_proj[0].weight)
    with pytest.raises(ValueError, match="depth 3"):
        ps.MultimodalPrompts(clip_model, NAMES, depth=3)  # the tiny towers have 2 layers
    with pytest.raises(ValueError, match="ViT"):
        ps.MultimodalPrompts(tiny_clip(), NAMES, depth=1)
    learned = {k for k, v in model.named_parameters() if v.requires_grad}
    assert learned == {"prompts.ctx", "prompts.deep_text.0", "prompts.proj.weight",
        "prompts.proj.bias", "prompts.deep_proj.0.weight", "prompts.deep_proj.0.bias"}  # fmt: skip


def text_by_hand(clip_model, prompts, tokenized, deep):
    """MaPLe's text tower the plain way: all 77 positions, positions 1..M overwritten before the
    blocks 1..J-1."""
    x = (prompts + clip_model.positional_embedding).permute(1, 0, 2)  # (77, C, d)
    for j, block in enumerate(clip_model.transformer.resblocks):
        if 1 <= j <= len(deep):
            x = torch.cat([x[:1], deep[j - 1][:, None].expand(-1, x.shape[1], -1), x[3:]])
        x = block(x)  # CLIP's own block and causal mask
    x = clip_model.ln_final(x.permute(1, 0, 2))[torch.arange(x.shape[1]), tokenized.argmax(-1)]
    return x @ clip_model.text_projection


def test_the_towers_with_prompts_are_clips_own_with_the_prompts_in_place():
    clip_model = tiny_clip(vit=True, seed=5)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = ps.encode_image(clip_model.visual, images)  # the explicit forward, no prompt
        torch.testing.assert_close(plain, clip_model.encode_image(images), rtol=0, atol=0)
        model = ps.MultimodalPromptedCLIP(clip_model, NAMES, n_ctx=2, depth=2)
        pl = model.prompts
        pl.deep_text[0].add_(0.3)
        deep = list(pl.deep_text)
        plain = ps.text_encoder(clip_model, pl.text_prompts(), pl.tokenized, deep)  # [MaPLe]
        by_hand = text_by_hand(clip_model, pl.text_prompts(), pl.tokenized, deep)
        torch.testing.assert_close(plain, by_hand, rtol=1e-5, atol=1e-6)
        text = model.text_features()  # the speed-up (shared_prefix): the plain loop's numbers
        torch.testing.assert_close(text, F.normalize(plain, dim=-1), rtol=1e-5, atol=1e-6)
        no_deep = text_by_hand(clip_model, pl.text_prompts(), pl.tokenized, [])
        assert (text - F.normalize(no_deep, dim=-1)).abs().max() > 1e-3  # deep prompts matter
        # the vision prompts: after ln_pre at block 0, then written straight into blocks 1..J-1
        tokens = []
        model.image_features(images, tokens)
        prompts = pl.vision_prompts()
        assert len(tokens) == 2 and tokens[0].shape == (1 + 4 + 2, 3, 64)
        torch.testing.assert_close(tokens[1][-2:], prompts[1].unsqueeze(1).expand(-1, 3, -1))
        ln_pre = clip_model.visual.ln_pre(prompts[0])
        torch.testing.assert_close(tokens[0][-2:], ln_pre.unsqueeze(1).expand(-1, 3, -1))


def test_token_statistics_merge_batches_exactly_as_two_passes():
    clip_model = tiny_clip(vit=True, seed=6)
    model = ps.MultimodalPromptedCLIP(clip_model, NAMES, n_ctx=2, depth=2)
    torch.manual_seed(6)
    batches = [(torch.randn(b, 3, 32, 32), None) for b in (5, 1, 7)]
    means, variances = ps.token_statistics(model, batches, torch.device("cpu"), "fp32")
    with torch.no_grad():
        tokens = []
        model.image_features(torch.cat([b for b, _ in batches]), tokens)
    x = torch.stack(tokens)  # (L, T, B, W)
    assert means.shape == (2, 7, 64)
    torch.testing.assert_close(means, x.mean(dim=2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(variances, x.var(dim=2, unbiased=False), rtol=1e-4, atol=1e-6)


def test_views_are_the_original_then_crops_and_the_same_for_the_same_image_index(tiny_data):
    path = os.path.join(tiny_data, "test", "red", "0.png")
    views = ps.Views(32, n_views=5, augmix=True)
    items = [(0, path, 0), (1, path, 0)]
    a, b = ps.ViewDataset(items, views, seed=1), ps.ViewDataset(items, views, seed=1)
    (x0, label, i), (x1, _, _) = a[0], a[1]
    assert x0.shape == (5, 3, 32, 32) and label == 0 and i == 0
    assert torch.equal(x0[0], ps.test_transform(32)(Image.open(path).convert("RGB")))
    assert torch.equal(b[0][0], x0) and not torch.equal(x1[1:], x0[1:])


@pytest.fixture(scope="module")
def source_ckpt(tiny_vit_ckpt, tiny_data, tmp_path_factory):
    """A source stage on the tiny ViT through the command line, in a subprocess."""
    out = tmp_path_factory.mktemp("source")
    cmd = [sys.executable, os.path.join(ROOT, "promptsync.py"), "--stage", "source", "--backbone",
        tiny_vit_ckpt, "--data", tiny_data, "--depth", "2", "--shots", "2", "--epochs", "2", "--lr",
        "0.05", "--workers", "0", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("maple colours shots=2 seed=1")
    return str(out / "checkpoint.pt")


def test_source_stage_saves_prompts_and_the_token_statistics(source_ckpt):
    ckpt = torch.load(source_ckpt, weights_only=True)
    assert ckpt["config"] == dict(
        method="maple", backbone=ckpt["config"]["backbone"], n_ctx=2, depth=2
    )
    assert ckpt["means"].shape == ckpt["variances"].shape == (2, 1 + 4 + 2, 64)  # (L, T, W)
    assert (ckpt["variances"] >= 0).all() and ckpt["variances"][0, -2:].abs().max() < 1e-8
    log = [
        json.loads(line) for line in open(os.path.join(os.path.dirname(source_ckpt), "log.jsonl"))
    ]
    assert [r["lr"] for r in log] == [1e-5, 0.05]  # the warm-up epoch, then the cosine


def test_every_test_image_starts_from_the_same_prompts_and_optimizer(
    source_ckpt, tiny_vit_ckpt, tiny_data, tmp_path, monkeypatch
):
    seen, step = [], ps.train_step

    def recording_step(model, optimizer, *args, **kwargs):
        seen.append(copy.deepcopy((model.prompts.state_dict(), optimizer.state_dict())))
        out = step(model, optimizer, *args, **kwargs)
        assert any(
            not torch.equal(v, seen[-1][0][k]) for k, v in model.prompts.state_dict().items()
        )
        return out

    monkeypatch.setattr(ps, "train_step", recording_step)
    metrics = run(["--loss", "align", "--backbone", tiny_vit_ckpt, "--data", tiny_data, "--load",
        source_ckpt, "--views", "8", "--rho", "0.25", "--out", str(tmp_path)])  # fmt: skip
    assert len(seen) == 12 and metrics["method"] == "promptalign"
    loaded = torch.load(source_ckpt, weights_only=True)["state"]
    for prompts, opt in seen:
        assert all(torch.equal(v, loaded["prompts." + k]) for k, v in prompts.items())
        assert opt == seen[0][1] and opt["state"] == {}  # a fresh AdamW every image


def test_align_gap_tool_measures_the_loss_terms_before_and_after_the_step_which_shrinks_them(
    source_ckpt, tiny_vit_ckpt, tiny_data, tmp_path
):
    """tools/align_gap.py: the gap per block, [mean|mu_l - mu^_l|, mean|var_l - var^_l|], is the
    alignment loss's pair of terms on the kept views: at the loaded prompts before the step, at the
    tuned ones after it. A step with a large alignment weight (the entropy negligible) shrinks them.
    (Target statistics moved off the source's: at those, the prompt positions match exactly, an
    L1 kink that any step of the prompts can only widen.)"""
    model, _, views = loaded_maple(source_ckpt, tiny_vit_ckpt)
    ckpt = torch.load(source_ckpt, weights_only=True)
    stats = [[m + 0.1 for m in ckpt["means"][:2]], [v * 1.5 + 0.01 for v in ckpt["variances"][:2]]]

    def terms_by_hand(kept):
        tokens = []
        with torch.no_grad():
            model.image_features(views[kept], tokens)
        x = [tokens[l] for l in (0, 1)]  # (T, k, W): blocks 0 and 1
        means, variances = [t.mean(dim=1) for t in x], [t.var(dim=1, unbiased=False) for t in x]
        pairs = zip(means, variances, *stats)
        terms = [[(m - a).abs().mean().item(), (v - b).abs().mean().item()] for m, v, a, b in pairs]
        return terms, ps.token_alignment(means, variances, *stats).item()

    with torch.no_grad():
        kept = ps.select_confident(model(views), 0.25)
    before, loss = terms_by_hand(kept)
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(learned, 1e-3, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import align_gap

    gap = align_gap.image_gap(model, views, optimizer, scaler, ([0, 1], *stats, 1e4), 1, 0.25)
    assert gap["before"] == [pytest.approx(t, rel=1e-5) for t in before]
    assert 0.5 * sum(map(sum, gap["before"])) == pytest.approx(loss, rel=1e-5)  # [PromptAlign]
    assert gap["after"] == [pytest.approx(t, rel=1e-5) for t in terms_by_hand(kept)[0]]
    assert sum(map(sum, gap["after"])) < sum(map(sum, gap["before"]))
    # the command line: every test image, promptsync.py's options; the JSON's means are the images'
    argv = ["--backbone", tiny_vit_ckpt, "--data", tiny_data, "--load", source_ckpt, "--views",
        "8", "--rho", "0.25", "--workers", "0", "--out", str(tmp_path)]  # fmt: skip
    result = align_gap.main(argv)
    saved = json.load(open(tmp_path / "align_gap.json"))
    assert list(result["before"]) == ["0", "1"] and len(saved["images"]) == 12
    mean = sum(g["before"][1][0] for g in saved["images"]) / 12
    assert saved["before"] == result["before"] and result["before"]["1"][0] == pytest.approx(mean)


def test_shards_together_equal_one_run_and_resume_continues(tiny_vit_ckpt, tiny_data, tmp_path):
    common = ["--backbone", tiny_vit_ckpt, "--data", tiny_data, "--views", "8", "--rho", "0.25",
        "--lr", "0.5"]  # fmt: skip
    run(common + ["--out", str(tmp_path / "whole")])
    shards = [str(tmp_path / f"shard{k}") for k in range(3)]
    for k, out in enumerate(shards):
        run(common + ["--shard", f"{k}/3", "--out", out])
    records = ps.read_predictions(str(tmp_path / "whole"))
    merged = {k: r for out in shards for k, r in ps.read_predictions(out).items()}
    assert merged == records and len(records) == 12
    # a killed shard: two finished images and a line cut short; --resume does only the rest
    path = os.path.join(shards[0], "predictions.jsonl")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:2]) + "\n" + lines[2][:15])
    run(common + ["--shard", "0/3", "--out", shards[0], "--resume"])
    assert open(path).read().splitlines() == lines


def test_bad_input_stops_with_a_clear_message(tiny_vit_ckpt, tiny_ckpt, tiny_data, tmp_path):
    common = ["--backbone", tiny_vit_ckpt, "--data", tiny_data, "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--loss align .* --load"):
        run(common + ["--loss", "align"])
    with pytest.raises(SystemExit, match="keeps no view"):
        run(common + ["--views", "8"])
    with pytest.raises(SystemExit, match="--shard"):
        run(common + ["--shard", "3/3"])
    with pytest.raises(SystemExit, match="ViT"):
        run(["--backbone", tiny_ckpt, "--data", tiny_data, "--stage", "source", "--depth", "1"])


@pytest.mark.slow
def test_tpt_on_sketches_and_promptalign_from_the_proxy_source(world, tmp_path):
    """On the toy world (ViT tower) TPT's one step changes a handful of the 600 sketches and breaks
    no more than it fixes; PromptAlign's step from the proxy source's MaPLe prompts acts (at its DG
    learning rate 4e-2 it loses points on the other domains: docs/toyworld.md)."""
    root, _ = world
    common = ["--backbone", os.path.join(root, "clip_vit.pt")]
    sketch = ["--data", os.path.join(root, "sketch")]
    tpt = run(common + sketch + ["--out", str(tmp_path / "tpt")])
    records = ps.read_predictions(str(tmp_path / "tpt")).values()
    fixed = sum(r["after"] == r["label"] != r["before"] for r in records)
    broken = sum(r["before"] == r["label"] != r["after"] for r in records)
    print(f"TPT on sketch: {tpt['zero_shot']} -> {tpt['accuracy']}, {fixed} fixed, {broken} broken")
    assert tpt["accuracy"]["test"] >= tpt["zero_shot"]["test"] and fixed >= broken
    source = str(tmp_path / "maple")  # the source stage on the proxy set (no crops: 32-px shapes)
    run(common + ["--stage", "source", "--data", os.path.join(root, "proxy"), "--crop-scale", "1",
        "--out", source])  # fmt: skip
    stats = torch.load(source + "/checkpoint.pt", weights_only=True)["means"]
    assert stats.shape == (4, 1 + 16 + 2, 128)  # 4 blocks; class token, 4x4 patches, 2 prompts
    align = run(common + sketch + ["--loss", "align", "--load", source + "/checkpoint.pt",
        "--shard", "0/4", "--out", str(tmp_path / "align")])  # fmt: skip
    print(f"PromptAlign on a quarter of sketch: {align['zero_shot']} -> {align['accuracy']}")
    records = ps.read_predictions(str(tmp_path / "align")).values()
    assert align["method"] == "promptalign" and len(records) == 150  # every 4th of 600 sketches
    # its step acts: one AdamW step at 4e-2 from the source prompts changes some predictions
    assert sum(r["after"] != r["before"] for r in records) > 0


# ------------------------------------------------------------------------------------------------
# PromptSync
# ------------------------------------------------------------------------------------------------
def discrimination_by_hand(views, prototypes, class_views, weights, tau):
    """L_D with explicit sums of exponentials (small tau-free numbers only)."""
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1)
    total = 0.0
    for k in range(len(prototypes)):
        e = lambda a, b: math.exp(cos(a, b).item() / tau)
        pos = sum(e(v, prototypes[k]) for v in views) / len(views)
        others = [j for j in range(len(prototypes)) if j != k]
        neg = sum(e(prototypes[k], prototypes[j]) for j in others)
        neg += sum(e(v, prototypes[j]) for v in views for j in others) / len(views)
        neg += (
            sum(e(prototypes[k], u) for j in others for u in class_views[j]) / class_views.shape[1]
        )
        total += weights[k].item() * -math.log(pos / neg)
    return total


def test_discrimination_loss_is_the_papers_ratio_and_falls_as_views_join_their_prototype():
    torch.manual_seed(10)
    prototypes, class_views = torch.randn(4, 8), torch.randn(4, 3, 8)
    views, weights = torch.randn(5, 8), torch.tensor([0.1, 0.6, 0.3, 0.0])
    loss = ps.discrimination_loss(views, prototypes, class_views, weights, tau=0.5)
    expected = discrimination_by_hand(views, prototypes, class_views, weights, 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    one_hot = torch.tensor([0.0, 1.0, 0.0, 0.0])
    losses = []
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):  # the views move to class 1's prototype
        moved = (1 - a) * views + a * prototypes[1]
        losses.append(ps.discrimination_loss(moved, prototypes, class_views, one_hot, 0.1).item())
    assert all(x > y for x, y in zip(losses, losses[1:]))
    q = torch.linalg.qr(torch.randn(8, 8))[0][:4]  # orthonormal prototypes
    away = views - (views @ q[[0, 2, 3]].t()) @ q[[0, 2, 3]]  # no part along the other classes
    d = lambda v: ps.discrimination_loss(v, q, class_views, one_hot, 0.1)
    assert d(away) < d(views)
    # tau = 0.01 (CLIP's) stays finite; classes of one group are not each other's negatives
    assert torch.isfinite(ps.discrimination_loss(views, prototypes, class_views, weights, 0.01))
    groups = torch.tensor([0, 0, 1, 2])
    twin = torch.cat([prototypes[:1], prototypes[:1], prototypes[2:]])  # classes 0 and 1 alike
    grouped = ps.discrimination_loss(views, twin, class_views, one_hot, 0.5, groups)
    without_0 = discrimination_by_hand(views, twin[1:], class_views[1:], one_hot[1:], 0.5)
    assert grouped.item() == pytest.approx(without_0, rel=1e-5)


def test_prototype_alignment_is_zero_at_the_class_prototype_and_ignores_zero_weight_classes():
    torch.manual_seed(11)
    prototypes = torch.randn(5, 16)
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    zero = pytest.approx(0, abs=1e-6)  # 1 - cos rounds to ~1e-7 in fp32
    assert ps.prototype_alignment(prototypes[2], prototypes, one_hot).item() == zero
    assert ps.prototype_alignment(prototypes, prototypes, torch.rand(5)).item() == zero  # per class
    p_hat = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    x = torch.randn(16)
    moved = prototypes.clone()
    moved[[1, 4]] += 10 * torch.randn(2, 16)  # classes with p^ = 0 moved: no change
    a, b = ps.prototype_alignment(x, prototypes, p_hat), ps.prototype_alignment(x, moved, p_hat)
    assert a.item() == b.item() > 0
    # each term grows with the distance: amplitude (same direction, longer) and angle (same norm)
    d = [ps.prototype_alignment(s * prototypes[2], prototypes, one_hot) for s in (1, 1.5, 2, 3)]
    assert all(u < v for u, v in zip(d, d[1:]))
    q = prototypes[2]
    r = torch.randn(16)
    r = r - (r @ q) / (q @ q) * q
    r = r / r.norm() * q.norm()  # orthogonal to q, same norm
    turns = [math.cos(t) * q + math.sin(t) * r for t in (0.0, 0.3, 0.8, 1.5)]
    d = [ps.prototype_alignment(t, prototypes, one_hot) for t in turns]
    assert all(u < v for u, v in zip(d, d[1:]))
    mse, cos = (q - turns[2]).square().mean(), math.cos(0.8)
    assert d[2].item() == pytest.approx(math.log1p(mse.item()) + math.log(2 - cos), rel=1e-5)


def test_class_prototypes_are_the_class_means():
    features, labels = torch.randn(7, 3), torch.tensor([0, 2, 2, 0, 1, 2, 1])
    protos = ps.class_prototypes(features, labels, 3)
    assert protos.shape == (3, 3)
    torch.testing.assert_close(protos[2], features[[1, 2, 5]].mean(dim=0))
    with pytest.raises(ValueError, match=r"\[3\]"):
        ps.class_prototypes(features, labels, 4)


@pytest.mark.parametrize("steps, expected", [(1, 0.5 + 4.7), (2, 0.5 + 9.0)])
def test_meta_update_averages_the_two_gradients_by_hand(steps, expected):
    """w = 0.5, L_D = (w - 1)^2, L_A = 3 (w - 2)^2, inner lr 0.1 (Adam's first step: 0.1 sign g).
    Iteration 1: g_D = -1, temporary w' = 0.6, g_A = 6 (0.6 - 2) = -8.4, average -4.7.
    Iteration 2 (from w' = 0.6): g_D = -0.8, w'' = 0.7, g_A = -7.8, average -4.3; sum -9.0.
    One SGD step (lr 1) from w = 0.5 with the sum."""
    w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    optimizer, at = torch.optim.SGD([w], lr=1.0), []
    loss_D = lambda: at.append(("D", w.item())) or (w - 1) ** 2
    loss_test = lambda: at.append(("test", w.item())) or 3 * (w - 2) ** 2
    assert ps.meta_update([w], optimizer, loss_D, loss_test, lr=0.1, steps=steps)
    assert w.item() == pytest.approx(expected)  # the update is applied to w = 0.5, not to w'
    # each loss built once per iteration: L_D at P, the meta-test loss at P'
    points = [("D", 0.5), ("test", 0.6), ("D", 0.6), ("test", 0.7)][: 2 * steps]
    assert [k for k, _ in at] == [k for k, _ in points]
    assert [x for _, x in at] == pytest.approx([x for _, x in points])


@pytest.mark.parametrize("steps", [1, 3])
def test_a_loss_of_weight_zero_changes_nothing(steps):
    """A loss of weight 0 is None (no backward pass): the same update as 0 * the loss."""
    final = []
    for weight in (None, 0.0):
        w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        train = lambda: None if weight is None else weight * (w - 1) ** 2
        ps.meta_update([w], torch.optim.SGD([w], lr=1.0), train, lambda: 3 * (w - 2) ** 2,
                       lr=0.1, steps=steps)  # fmt: skip
        final.append(w.item())
    # 0.5 - steps * (0 + 6 (0.5 - 2)) / 2: with g_D = 0 the point never moves
    assert final[0] == final[1] == pytest.approx(0.5 + 4.5 * steps)
    w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))  # no test loss
    ps.meta_update(
        [w], torch.optim.SGD([w], lr=1.0), lambda: (w - 1) ** 2, lambda: None, 0.1, steps
    )
    # g_D at 0.5, 0.6, 0.7 = -1, -0.8, -0.6; half of their sum applied from w = 0.5
    assert w.item() == pytest.approx({1: 1.0, 3: 1.7}[steps])


def test_a_gradient_that_is_not_finite_skips_the_meta_update():
    """An fp16 overflow (inf or nan in a gradient) leaves the prompts as they were, as a loss
    scaler skips such a step, instead of writing nan prompts that predict class 0."""
    w = torch.nn.Parameter(torch.tensor([0.5, 1.0]))
    loss_D, loss_test = lambda: (w * torch.tensor([1.0, math.inf])).sum(), lambda: (w**2).sum()
    assert not ps.meta_update([w], torch.optim.SGD([w], lr=1.0), loss_D, loss_test, lr=0.1)
    assert w.tolist() == [0.5, 1.0] and w.grad is None


def sync_run(source_ckpt, tiny_vit_ckpt, tiny_data, out, *extra):
    common = ["--loss", "sync", "--backbone", tiny_vit_ckpt, "--data", tiny_data]
    return run(
        common + ["--load", source_ckpt, "--views", "8", "--rho", "0.25", "--out", str(out), *extra]
    )


def test_source_stage_saves_the_class_prototypes_of_both_branches(source_ckpt, tiny_vit_ckpt):
    ckpt = torch.load(source_ckpt, weights_only=True)
    assert ckpt["proto_classnames"] == ["blue", "green", "red", "yellow"]
    assert ckpt["proto_cls"].shape == ckpt["proto_tokens"].shape == ckpt["proto_text"].shape
    assert ckpt["proto_cls"].shape == (4, 32) and ckpt["proto_views"].shape == (4, 8, 32)
    clip_model = ps.load_clip(tiny_vit_ckpt, torch.device("cpu"), "fp32")
    model = ps.MultimodalPromptedCLIP(clip_model, ckpt["proto_classnames"], n_ctx=2, depth=2)
    model.load_state_dict(ckpt["state"], strict=False)
    with torch.no_grad():  # the text prototypes: the learned prompts' class features
        torch.testing.assert_close(ckpt["proto_text"], model.text_features())
    assert torch.allclose(ckpt["proto_views"].norm(dim=-1), torch.ones(4, 8))
    # a class the source lacks borrows the nearest source class's prototypes
    names = ["red", "crimson"]
    model.prompts.set_classnames(clip_model, names)
    matched = ps.match_prototypes(model, ckpt, names, torch.device("cpu"))
    assert matched["groups"][0] == 2 and torch.equal(matched["cls"][0], ckpt["proto_cls"][2])
    with torch.no_grad():
        text = model.text_features()
        nearest = int((text[1] @ ckpt["proto_text"].t()).argmax())
    assert matched["groups"][1] == nearest and torch.equal(matched["text_at_load"], text)


def test_stored_class_views_are_crops_of_as_many_images_as_they_can_be(tiny_vit_ckpt, tiny_data):
    cpu, data = torch.device("cpu"), ps.load_dataset(tiny_data)
    items, names = data["train"], data["classnames"]  # 6 images of each of 4 classes
    model = ps.MultimodalPromptedCLIP(
        ps.load_clip(tiny_vit_ckpt, cpu, "fp32"), names, n_ctx=2, depth=2
    )
    views = ps.Views(32, 4, crop_scale=0.5)  # the original and 3 crops of each
    out = ps.source_prototypes(model, items, names, views, 1, cpu, "fp32", n_views=3)
    assert out["proto_views"].shape == (4, 3, 32)
    indexed = [(i, *item) for i, item in enumerate(items)]
    with torch.no_grad():  # the same views (seeded by image index), each image's own features
        per_image = [
            (y, ps.vision_vectors(model, x)[0]) for x, y, _ in ps.ViewDataset(indexed, views, 1)
        ]
    for c in range(4):  # the first crop of each of the class's first 3 images, not 3 views of one
        first_crops = torch.stack([f[1] for y, f in per_image if y == c][:3])
        torch.testing.assert_close(out["proto_views"][c], F.normalize(first_crops, dim=-1))


def test_one_text_pass_serves_the_selection_and_the_losses_exactly(
    source_ckpt, tiny_vit_ckpt, monkeypatch
):
    """The speed-up in sync_terms: the confidence selection takes the text features of the graph
    pass, detached, instead of running the text tower again; it equals the plain pass. meta-train
    builds only L_D, meta-test only L_ent and L_A; the prediction before tuning, computed first on
    the original view, is the first selection pass's."""
    cpu, ckpt = torch.device("cpu"), torch.load(source_ckpt, weights_only=True)
    names = ckpt["proto_classnames"]
    model = ps.MultimodalPromptedCLIP(
        ps.load_clip(tiny_vit_ckpt, cpu, "fp32"), names, n_ctx=2, depth=2
    )
    model.load_state_dict(ckpt["state"], strict=False)
    sync = dict(ps.match_prototypes(model, ckpt, names, cpu), weights=[1.0, 1.0, 1.0])
    torch.manual_seed(0)
    views = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        plain = model(views)  # (8, 4): a selection pass of its own, the text tower again
    text_features, calls = model.text_features, []
    model.text_features = lambda: calls.append(1) or text_features()
    *losses, logits = ps.sync_terms(model, views, sync, rho=0.25)
    assert torch.equal(logits, plain) and all(loss.requires_grad for loss in losses)
    assert len(calls) == 1  # one text-tower pass serves both
    assert ps.sync_terms(model, views, sync, 0.25, part="D")[:2] == (None, None)
    assert ps.sync_terms(model, views, sync, 0.25, part="test")[2] is None
    # adapt_sync's prediction before tuning: the same as the first selection pass (loaded prompts)
    seen, sync_terms = [], ps.sync_terms
    monkeypatch.setattr(ps, "sync_terms", lambda *a: seen.append(sync_terms(*a)) or seen[-1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 0.5)
    before, _, _ = ps.adapt_sync(model, views, optimizer, sync, 2, 0.25)
    assert len(seen) == 4 and not torch.equal(seen[3][3], seen[0][3])  # the prompts moved
    assert before == int(plain[0].argmax()) == int(seen[0][3][0].argmax())


@pytest.mark.parametrize("weights", [(0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (2, 3, 5)])
def test_the_sync_weights_weigh_entropy_alignment_and_discrimination_in_their_places(
    source_ckpt, tiny_vit_ckpt, monkeypatch, weights
):
    """--sync-weights E,A,D: meta-train minimises D * L_D, meta-test E * L_ent + A * L_A; a loss of
    weight 0 is left out (None), as in Table 5's ablation rows."""
    cpu, ckpt = torch.device("cpu"), torch.load(source_ckpt, weights_only=True)
    names = ckpt["proto_classnames"]
    model = ps.MultimodalPromptedCLIP(
        ps.load_clip(tiny_vit_ckpt, cpu, "fp32"), names, n_ctx=2, depth=2
    )
    model.load_state_dict(ckpt["state"], strict=False)
    sync = dict(ps.match_prototypes(model, ckpt, names, cpu), weights=list(weights))
    torch.manual_seed(0)
    views = torch.randn(8, 3, 32, 32)
    entropy, align, discrimination, _ = ps.sync_terms(model, views, sync, rho=0.25)
    seen = {}

    def record(params, optimizer, loss_D, loss_test, lr, steps, scale):
        train, test = loss_D(), loss_test()
        seen.update(
            {k: None if v is None else v.item() for k, v in zip(("train", "test"), (train, test))}
        )

    monkeypatch.setattr(ps, "meta_update", record)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 5e-3)
    ps.adapt_sync(model, views, optimizer, sync, 1, 0.25)
    E, A, D = weights
    expected_test = E * entropy.item() + A * align.item() if E or A else None
    assert seen["train"] == (pytest.approx(D * discrimination.item()) if D else None)
    assert seen["test"] == (pytest.approx(expected_test) if expected_test is not None else None)


def test_promptsync_resets_prompts_and_optimizer_for_every_image_end_to_end(
    source_ckpt, tiny_vit_ckpt, tiny_data, tmp_path, monkeypatch
):
    seen, update = [], ps.meta_update

    def recording_update(params, optimizer, *args, **kwargs):
        seen.append(copy.deepcopy((optimizer.state_dict(), [p.detach().clone() for p in params])))
        stepped = update(params, optimizer, *args, **kwargs)
        assert any(not torch.equal(p, q) for p, q in zip(params, seen[-1][1]))  # it moved
        return stepped

    monkeypatch.setattr(ps, "meta_update", recording_update)
    metrics = sync_run(source_ckpt, tiny_vit_ckpt, tiny_data, tmp_path, "--lr", "0.05")
    assert len(seen) == 12 and metrics["method"] == "promptsync"
    loaded = torch.load(source_ckpt, weights_only=True)["state"]
    clip_model = ps.load_clip(tiny_vit_ckpt, torch.device("cpu"), "fp32")
    model = ps.MultimodalPromptedCLIP(clip_model, NAMES, n_ctx=2, depth=2)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    for opt, params in seen:
        assert all(torch.equal(p, loaded[k]) for k, p in zip(names, params))
        assert opt["state"] == {}  # a fresh AdamW every image


def test_zero_weights_predict_with_the_loaded_prompts(
    source_ckpt, tiny_vit_ckpt, tiny_data, tmp_path
):
    off = sync_run(
        source_ckpt, tiny_vit_ckpt, tiny_data, tmp_path / "w0", "--sync-weights", "0,0,0"
    )
    records = ps.read_predictions(str(tmp_path / "w0")).values()
    assert all(r["before"] == r["after"] for r in records) and off["accuracy"] == off["zero_shot"]
    # the loaded prompts' own prediction on the original view (no tuning at all)
    clip_model = ps.load_clip(tiny_vit_ckpt, torch.device("cpu"), "fp32")
    model = ps.MultimodalPromptedCLIP(
        clip_model, ["blue", "green", "red", "yellow"], n_ctx=2, depth=2
    )
    model.load_state_dict(torch.load(source_ckpt, weights_only=True)["state"], strict=False)
    items = ps.load_dataset(tiny_data)["test"]
    with torch.no_grad():
        for r in records:
            image = ps.test_transform(32)(Image.open(items[r["index"]][0]).convert("RGB"))
            assert r["after"] == int(model(image[None])[0].argmax())


def test_promptsync_and_its_ablations_through_the_command_line(
    source_ckpt, tiny_vit_ckpt, tiny_data, tmp_path, monkeypatch
):
    cmd = [sys.executable, os.path.join(ROOT, "promptsync.py"), "--loss", "sync", "--backbone"]
    cmd += [tiny_vit_ckpt, "--data", tiny_data, "--load", source_ckpt, "--views", "8"]
    cmd += ["--rho", "0.25", "--lr", "0.5", "--workers", "0", "--steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "all"
    result = subprocess.run(
        cmd + ["--out", str(out)], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("promptsync colours shots=0")
    assert len(ps.read_predictions(str(out))) == 12
    run_args = json.load(open(out / "args.json"))
    assert run_args["sync_weights"] == "1,1,1" and run_args["lr"] == 0.5
    # Table 5's ablation rows: a part off is a weight 0, and the weights reach every image's update
    # (in-process: no second interpreter start)
    seen, adapt_sync = [], ps.adapt_sync
    record = lambda *a, **k: seen.append(a[3]["weights"]) or adapt_sync(*a, **k)
    monkeypatch.setattr(ps, "adapt_sync", record)
    ablation = run(cmd[2:-2] + ["--sync-weights", "0,0,1", "--out", str(tmp_path / "d")])
    assert ablation["method"] == "promptsync" and seen == [[0.0, 0.0, 1.0]] * 12
    for bad in ("1,colour,1", "1,1", "1,-1,1", "1,nan,1"):
        with pytest.raises(SystemExit, match="--sync-weights"):
            run(cmd[2:-2] + ["--sync-weights", bad, "--out", str(tmp_path / "bad")])


def loaded_maple(source_ckpt, tiny_vit_ckpt, precision="fp32"):
    """The tiny ViT with the source stage's prompts and PromptSync's prototypes, and 8 views."""
    cpu, ckpt = torch.device("cpu"), torch.load(source_ckpt, weights_only=True)
    names = ckpt["proto_classnames"]
    clip_model = ps.load_clip(tiny_vit_ckpt, cpu, precision)
    model = ps.MultimodalPromptedCLIP(clip_model, names, n_ctx=2, depth=2)
    model.load_state_dict(ckpt["state"], strict=False)
    sync = dict(ps.match_prototypes(model, ckpt, names, cpu), weights=[1.0, 1.0, 1.0])
    torch.manual_seed(0)
    return model, sync, torch.randn(8, 3, 32, 32)


@pytest.fixture
def emulated_cuda(monkeypatch):
    """CUDA's mixed precision on the CPU: fp16 autocast for --precision amp, a loss scaler on."""
    fp16 = lambda device, precision: (
        torch.autocast("cpu", dtype=torch.float16) if precision == "amp" else ps.nullcontext()
    )
    monkeypatch.setattr(ps, "autocast", fp16)
    scaler = torch.amp.GradScaler
    return lambda: scaler("cpu", init_scale=1000, enabled=True)


def learned_tensors(model):
    return [p.detach().clone() for p in model.prompts.parameters()]


@pytest.mark.parametrize("precision", ["amp", "fp16"])
@pytest.mark.parametrize("loss", ["tpt", "align", "sync"])
def test_each_test_time_step_runs_under_fp16_with_a_loss_scaler(
    source_ckpt, tiny_vit_ckpt, emulated_cuda, precision, loss
):
    """GPU readiness: each loss's step under fp16 (autocast, or CLIP's own fp16 weights) with an
    enabled loss scaler moves the fp32 prompts to finite values, and skips no step; PromptSync's
    update stays near the fp32 one (signs of tiny gradient coordinates may differ)."""
    model, sync, views = loaded_maple(source_ckpt, tiny_vit_ckpt, precision)
    if loss == "tpt":
        model = ps.MultimodalPromptedCLIP(model.clip, sync and NAMES, n_ctx=4, depth=0)
    start, lr = learned_tensors(model), 5e-3
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr)
    align = None
    if loss == "align":
        ckpt = torch.load(source_ckpt, weights_only=True)
        align = ([0, 1], list(ckpt["means"][:2]), list(ckpt["variances"][:2]), 100 / 3)
    if loss == "sync":
        out = ps.adapt_sync(model, views, optimizer, sync, 1, 0.25, precision, emulated_cuda())
    else:
        out = ps.adapt(model, views, optimizer, emulated_cuda(), 1, 0.25, precision, align)
    after = learned_tensors(model)
    assert out[2] == 0 and all(torch.isfinite(t).all() for t in after)
    assert any(not torch.equal(a, b) for a, b in zip(start, after))
    if loss == "sync":  # the same update in fp32
        model, sync, views = loaded_maple(source_ckpt, tiny_vit_ckpt)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr)
        ps.adapt_sync(model, views, optimizer, sync, 1, 0.25)
        moved = torch.cat([(a - b).flatten() for a, b in zip(after, learned_tensors(model))])
        assert (moved.abs() < 0.1 * lr).float().mean() > 0.9


@pytest.mark.parametrize("precision", ["amp", "fp16"])
def test_the_source_step_runs_under_fp16_with_a_loss_scaler(
    tiny_vit_ckpt, emulated_cuda, precision
):
    clip_model = ps.load_clip(tiny_vit_ckpt, torch.device("cpu"), precision)
    model = ps.MultimodalPromptedCLIP(clip_model, NAMES, n_ctx=2, depth=2)
    learned, start = [p for p in model.parameters() if p.requires_grad], learned_tensors(model)
    optimizer = torch.optim.SGD(learned, 0.05, 0.9)
    torch.manual_seed(1)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss = ps.train_step(model, optimizer, emulated_cuda(), images, precision, labels=labels)
    after = learned_tensors(model)
    assert math.isfinite(loss) and all(torch.isfinite(t).all() for t in after)
    assert any(not torch.equal(a, b) for a, b in zip(start, after))


def overflow(monkeypatch, name):
    """A loss whose scaled gradient overflows fp16 (an injected overflow)."""
    loss = getattr(ps, name)
    monkeypatch.setattr(ps, name, lambda *a, **k: loss(*a, **k) * 1e30)


@pytest.mark.parametrize("loss", ["tpt", "sync"])
def test_an_overflow_skips_the_images_step_and_is_counted(
    source_ckpt, tiny_vit_ckpt, tiny_data, tmp_path, emulated_cuda, monkeypatch, loss
):
    """TPT's loss scaler (new per image) skips an overflowing step; PromptSync's meta-update does
    the same: the prompts stay the loaded ones, and metrics.json counts the skipped steps."""
    model, sync, views = loaded_maple(source_ckpt, tiny_vit_ckpt)
    start = learned_tensors(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 0.05)
    overflow(monkeypatch, "marginal_entropy")
    if loss == "sync":
        before, after, skipped = ps.adapt_sync(model, views, optimizer, sync, 1, 0.25, "amp",
                                               emulated_cuda())  # fmt: skip
    else:
        before, after, skipped = ps.adapt(model, views, optimizer, emulated_cuda(), 1, 0.25, "amp")
    assert skipped == 1 and before == after
    assert all(torch.equal(a, b) for a, b in zip(start, learned_tensors(model)))
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: emulated_cuda())
    metrics = sync_run(source_ckpt, tiny_vit_ckpt, tiny_data, tmp_path, "--loss", loss,
                       "--precision", "amp")  # fmt: skip
    assert metrics["skipped_steps"] == 12 and metrics["accuracy"] == metrics["zero_shot"]


def test_a_run_killed_mid_image_keeps_every_finished_prediction_and_resume_continues(
    tiny_vit_ckpt, tiny_data, tmp_path, monkeypatch
):
    common = ["--backbone", tiny_vit_ckpt, "--data", tiny_data, "--views", "8", "--rho", "0.25"]
    whole = run(common + ["--out", str(tmp_path / "whole")])
    adapt, calls = ps.adapt, []

    def killed_in_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # e.g. a cluster's SIGUSR1 or a preemption, during the third image
            raise SystemExit("killed")
        return adapt(*args, **kwargs)

    monkeypatch.setattr(ps, "adapt", killed_in_the_third)
    out = ["--out", str(tmp_path / "run"), "--resume"]
    with pytest.raises(SystemExit, match="killed"):
        run(common + out)
    assert len(ps.read_predictions(str(tmp_path / "run"))) == 2  # both finished images kept
    again = run(common + out)  # the same command
    assert len(calls) == 13 and again["accuracy"] == whole["accuracy"]
    finished = [ps.read_predictions(str(tmp_path / r)) for r in ("run", "whole")]
    assert finished[0] == finished[1]


def test_presets_give_each_loss_and_setting_its_papers_values_and_help_shows_them(capsys):
    lr = lambda *argv: ps.parse_args(["--data", "d", *argv]).lr
    assert lr() == 5e-3 and lr("--stage", "source") == 0.0026  # TPT; MaPLe's source recipe
    assert lr("--loss", "align") == 4e-2 and lr("--loss", "sync") == 4e-2  # PromptAlign's DG
    assert lr("--loss", "align", "--setting", "fine-grained") == 5e-4  # its fine-grained config
    assert lr("--loss", "align", "--lr", "0.1") == 0.1
    args = ps.parse_args(["--data", "d", "--setting", "fine-grained"])
    assert (args.augmix, args.corrupt, args.n_ctx, args.depth) == (1, 0, 4, 0)  # TPT's AugMix
    args = ps.parse_args(["--data", "d", "--loss", "sync"])
    assert (args.augmix, args.corrupt, args.n_ctx, args.depth, args.shots) == (0, 1, 2, 3, 0)
    with pytest.raises(SystemExit):
        ps.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "align: 0.04 (--setting dg), 0.0005 (--setting fine-grained)" in shown
    assert "source: 0.0026; tpt: 0.005" in shown


@pytest.mark.slow
def test_promptsync_next_to_tpt_and_promptalign_on_the_toy_world(world, tmp_path):
    """The proxy source stage, then TPT+MaPLe, PromptAlign and PromptSync (lr 5e-3 each, the toy's
    prompt coordinates are about 0.03) on a quarter of the sketches: printed side by side; only
    what holds is asserted (finite, within 10 points of the loaded prompts)."""
    root, _ = world
    common = ["--backbone", os.path.join(root, "clip_vit.pt"), "--workers", "0"]
    source = str(tmp_path / "maple")
    run(
        common
        + ["--stage", "source", "--data", os.path.join(root, "proxy"), "--crop-scale", "1"]
        + ["--out", source]
    )
    test = common + ["--data", os.path.join(root, "sketch"), "--shard", "0/4", "--lr", "5e-3"]
    test += ["--load", source + "/checkpoint.pt"]
    results = {}
    for loss in ("tpt", "align", "sync"):
        m = run(test + ["--loss", loss, "--out", str(tmp_path / loss)])
        results[loss] = (m["zero_shot"]["test"], m["accuracy"]["test"])
    print("sketch, a quarter (150 images): loaded prompts -> after, per loss:", results)
    for before, after in results.values():
        assert math.isfinite(after) and abs(after - before) <= 10


def test_tpt_views_tool_scores_tpts_target_against_the_original_image():
    """tools/tpt_views.py: whether TPT's confident views are right more often than the image."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import tpt_views

    labels = torch.tensor([0, 1])
    logits = torch.zeros(2, 4, 3)  # 2 images, 4 views (view 0 the original), 3 classes
    logits[0, 0, 0] = 1.0  # image 0: the original right but unsure; one view sure and wrong
    logits[0, 1, 2] = 9.0
    logits[1, 0, 0] = 1.0  # image 1: the original wrong; one view sure and right
    logits[1, 2, 1] = 9.0
    acc = tpt_views.view_accuracies(logits, labels, rhos=(0.25, 1.0))
    assert acc["original"] == 50.0 and acc["any view"] == 100.0
    assert acc["most confident view"] == 50.0  # image 1's sure view is right, image 0's wrong
    assert acc["confident views' mean, rho 0.25"] == 50.0  # one view kept: the most confident
    mean_all = (logits.softmax(-1).mean(1).argmax(-1) == labels).float().mean().item() * 100
    assert acc["confident views' mean, rho 1.0"] == mean_all  # every view kept
