"""CLIP-Adapter, Tip-Adapter(-F), the linear probe: the properties the papers and code give them."""

import argparse
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, make_image_folder, tiny_clip
from PIL import Image

import adapter as ad
import zeroshot

NAMES = ["red", "green circle", "blue"]


def run(argv):
    return ad.main(ad.parse_args(argv + ["--workers", "0"]))


def raw_features(model, n=5, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.encode_image(torch.randn(n, 3, 32, 32)).float()  # (n, 32), unnormalised


# --- the methods' equations -----------------------------------------------------------------------
def test_clip_adapter_is_the_coded_bottleneck_and_alpha_zero_is_exactly_zero_shot():
    model = tiny_clip(seed=1)
    dim = model.visual.output_dim
    a = ad.ClipAdapter(dim)  # reduction 4, no biases, a ReLU after each layer
    assert [tuple(p.shape) for p in a.parameters()] == [(dim // 4, dim), (dim, dim // 4)]
    f = raw_features(model)
    W = ad.zeroshot_classifier(model, NAMES, ["a photo of a {}."])  # (C, D)
    s = model.logit_scale.exp().item()
    with torch.no_grad():
        assert (a(f) >= 0).all()
        zero_shot = s * F.normalize(f, dim=-1) @ W.t()
        assert torch.equal(ad.clip_adapter_logits(f, a, 0.0, W, s), zero_shot)
        # bias-free linear layers and ReLUs make A(c f) = c A(f) for c > 0, so blending the raw or
        # the normalised feature gives the same logits: the code's order cannot matter here
        blended = ad.clip_adapter_logits(f, a, 0.2, W, s)
        f_n = F.normalize(f, dim=-1)
        other = s * F.normalize(0.2 * a(f_n) + 0.8 * f_n, dim=-1) @ W.t()
        torch.testing.assert_close(blended, other)


def test_tip_adapter_alpha_zero_is_exactly_zero_shot():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(4, 16), dim=-1)
    W, K = F.normalize(torch.randn(3, 16), dim=-1), F.normalize(torch.randn(6, 16), dim=-1)
    V = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    logits = ad.tip_adapter_logits(f, W, K, V, 0.0, 5.5, 100.0)
    assert logits.shape == (4, 3) and torch.equal(logits, 100.0 * f @ W.t())


def test_tip_adapter_affinity_one_to_a_key_adds_alpha_times_its_value():
    torch.manual_seed(1)
    # orthonormal keys: a query equal to key 2 has affinity 1 to it, 0 to the rest
    K = torch.eye(6, 16)
    V = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    W = F.normalize(torch.randn(3, 16), dim=-1)
    f = K[2:3]
    zero_shot = 100.0 * f @ W.t()
    for alpha, beta in [(1.5, 3.0), (2.0, 200.0)]:
        added = ad.tip_adapter_logits(f, W, K, V, alpha, beta, 100.0) - zero_shot
        rest = math.exp(-beta) * (V.sum(0) - V[2])  # the other keys weigh exp(-beta (1 - 0))
        torch.testing.assert_close(added, alpha * (V[2] + rest).unsqueeze(0))
    assert torch.equal(added, 2.0 * V[2:3])  # sharp enough (beta 200), only that key's label


def test_cache_keys_average_the_raw_views_then_normalise():
    torch.manual_seed(2)
    views = torch.randn(10, 4, 8) * torch.rand(10, 4, 1) * 5  # (views, N, D), views of unequal norm
    keys, values = ad.build_cache(views, torch.tensor([1, 0, 2, 1]), 3)
    torch.testing.assert_close(keys, F.normalize(views.mean(0), dim=-1))
    assert not torch.allclose(keys, F.normalize(F.normalize(views, dim=-1).mean(0), dim=-1))
    assert torch.equal(values, torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]]).float())


def test_alpha_beta_search_is_the_authors_grid_with_the_first_best_pair():
    torch.manual_seed(3)
    f = F.normalize(torch.randn(40, 16), dim=-1)
    W, K = F.normalize(torch.randn(4, 16), dim=-1), F.normalize(torch.randn(12, 16), dim=-1)
    V, y = F.one_hot(torch.arange(12) % 4, 4).float(), torch.randint(4, (40,))
    acc, alpha, beta = ad.search_alpha_beta(f, y, W, K, V, 10.0, (7.0, 3.0), (12, 6))
    best = (0, None, None)  # the authors' loop: beta outer, alpha inner, strict '>'
    for i in range(12):
        for j in range(6):
            b, a = 0.1 + i * (7.0 - 0.1) / 12, 0.1 + j * (3.0 - 0.1) / 6
            correct = (ad.tip_adapter_logits(f, W, K, V, a, b, 10.0).argmax(-1) == y).sum().item()
            if correct > best[0]:
                best = (correct, a, b)
    assert (alpha, beta) == (best[1], best[2]) and acc == 100.0 * best[0] / 40


def test_linear_probe_reaches_the_optimum_of_sklearns_objective():
    torch.manual_seed(4)
    X, y = torch.randn(30, 8), torch.arange(30) % 3
    X[torch.arange(30), y] += 6  # separable
    for C in (1e-2, 1.0, 1e4):
        P, b = ad.fit_linear_probe(X, y, 3, C)
        P, b = P.clone().requires_grad_(), b.clone().requires_grad_()
        loss = F.cross_entropy(X @ P.t() + b, y) + (P**2).sum() / (2 * C * 30)
        grads = torch.autograd.grad(loss, [P, b])
        assert max(g.abs().max().item() for g in grads) < 1e-3  # stationary (convex: the optimum)
    assert ((X @ P.t() + b).argmax(-1) == y).all()  # weak regularisation fits
    with pytest.raises(ValueError, match="must be positive"):
        ad.fit_linear_probe(X, y, 3, -1.0)


def test_C_reg_search_follows_coops_coarse_list_then_log_bisection():
    fitted = []

    def fit(C_reg):
        fitted.append(C_reg)
        return C_reg

    # validation accuracy peaks at C_reg = 10**0.3; CoOp's steps (by hand) end at 10**0.296875
    C_reg, probe, acc = ad.search_C_reg(fit, lambda C_reg: -abs(math.log10(C_reg) - 0.3))
    assert math.isclose(C_reg, 10**0.296875) and probe == C_reg and math.isclose(acc, -0.003125)
    assert fitted[:7] == [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    assert len(fitted) == len(set(fitted))  # every C is fitted once


# --- a step changes only the method's parameters --------------------------------------------------
@pytest.mark.parametrize("method", ["clip-adapter", "tip-f"])
def test_a_train_step_changes_only_the_methods_parameters(method):
    model = tiny_clip(seed=5)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    views = raw_features(model, 8).view(2, 4, -1)  # (views, N, D) cached
    labels = torch.tensor([0, 1, 2, 0])
    W = ad.zeroshot_classifier(model, NAMES, ["a photo of a {}."])
    W0, cache0, s = W.clone(), views.clone(), model.logit_scale.exp().item()
    if method == "clip-adapter":
        net = ad.ClipAdapter(32)
        forward = lambda f: ad.clip_adapter_logits(f, net, 0.2, W, s)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        net = ad.TipAdapterF(*ad.build_cache(views, labels, 3))
        forward = lambda f: net(F.normalize(f, dim=-1), W, 1.0, 1.0, s)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, eps=1e-4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ad.train_step(forward, optimizer, views[0], labels)
    learned = {n for n, p in net.named_parameters()}
    assert learned == (
        {"fc.0.weight", "fc.2.weight"} if method == "clip-adapter" else {"cache_keys"}
    )
    for k, v in net.state_dict().items():
        # learned ones moved, the values did not
        assert torch.equal(v, before[k]) != (k in learned), k
    assert torch.equal(W, W0) and torch.equal(views, cache0)
    # CLIP bit-identical
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())


def test_tip_f_training_lowers_the_loss():
    torch.manual_seed(6)
    W = F.normalize(torch.randn(3, 16), dim=-1)
    f, y = F.normalize(torch.randn(12, 16), dim=-1), torch.arange(12) % 3
    net = ad.TipAdapterF(f.clone(), F.one_hot(torch.randint(3, (12,)), 3).float())  # noisy values
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, eps=1e-4)
    step = lambda: ad.train_step(lambda x: net(x, W, 1.0, 5.0, 10.0), optimizer, f, y)[0]
    first = step()
    assert [step() for _ in range(50)][-1] < 0.8 * first


def test_an_epoch_shows_every_image_once_as_one_of_its_views():
    views = torch.arange(3 * 5).float().view(3, 5, 1)  # view v of image i has the value 5v + i
    labels = torch.arange(5)
    batches = list(ad.epoch_batches(views, labels, 2, torch.Generator().manual_seed(0)))
    f, y = torch.cat([b[0] for b in batches]).flatten(), torch.cat([b[1] for b in batches])
    assert [len(b[1]) for b in batches] == [2, 2, 1] and sorted(y.tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(f.long() % 5, y)  # each image's own feature, from some view


def test_schedule_is_coops():
    assert ad.lr_at_epoch(0, 0.002, 50) == 1e-5 and ad.lr_at_epoch(1, 0.002, 50) == 0.002
    assert math.isclose(ad.lr_at_epoch(49, 0.002, 50), 7.885e-6, rel_tol=1e-3)
    assert [ad.epochs_for_shots(argparse.Namespace(shots=k)) for k in (1, 2, 4, 8, 16)] == [
        50,
        100,
        100,
        200,
        200,
    ]


# --- the precomputed features -------------------------------------------------------------------
def test_precomputed_features_equal_features_computed_in_the_loop(tiny_data):
    model = tiny_clip(seed=7)
    items = ad.load_dataset(tiny_data)["train"][:5]
    transform, cpu = ad.train_transform(32, 0.5), torch.device("cpu")
    cache = ad.encode_views(
        model.encode_image, items, transform, cpu, "fp32", 2, 11, 0, batch_size=4
    )
    assert cache.shape == (2, 5, 32)
    for v in range(2):  # in the loop: view v of every image drawn again, and encoded
        images = []
        for i, (path, _) in enumerate(items):
            torch.random.default_generator.manual_seed(11 * 1_000_003 + v * 5 + i)
            images.append(transform(Image.open(path).convert("RGB")))
        with torch.no_grad():
            loop = model.encode_image(torch.stack(images))
        torch.testing.assert_close(cache[v], loop, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cache[0], cache[1])  # the views differ
    again = ad.encode_views(
        model.encode_image, items, transform, cpu, "fp32", 2, 11, 0, batch_size=3
    )
    torch.testing.assert_close(again, cache)  # independent of batching
    # the test transform is CLIP's own preprocess (which converts to RGB after resizing)
    test = ad.encode_views(model.encode_image, items, ad.test_transform(32), cpu, "fp32", workers=0)
    preprocess = ad.clip.clip._transform(32)
    with torch.no_grad():
        rgb = [preprocess(Image.open(p).convert("RGB")) for p, _ in items]
        torch.testing.assert_close(
            test[0], model.encode_image(torch.stack(rgb)), atol=1e-5, rtol=1e-5
        )


def test_the_validation_set_comes_from_val_when_there_is_one(
    tiny_ckpt, split_data, tmp_path, capsys
):
    images, split_file = split_data  # 3 train, 1 val, 1 test image per class; 6 classes
    argv = ["--method", "tip", "--backbone", tiny_ckpt, "--data", images, "--split-file",
        split_file]  # fmt: skip
    m = run(argv + ["--shots", "2", "--aug-views", "1", "--out", str(tmp_path)])
    assert "1 views of 12 training images, 6 validation images" in capsys.readouterr().out
    assert m["dataset"] == "Colours" and set(m["chosen"]) >= {"alpha", "beta", "val_acc"}


def test_the_papers_datasets_are_recognised_by_their_folders_and_split_files():
    name = lambda data, split=None: ad.paper_dataset(ad.parse_args(["--data", data] + (
        ["--split-file", split] if split else [])))  # fmt: skip
    assert (
        name("DATA/oxford_pets/images", "DATA/oxford_pets/split_zhou_OxfordPets.json")
        == "OxfordPets"
    )
    assert (
        name("DATA/dtd/images") == "DescribableTextures" and name("DATA/eurosat/2750") == "EuroSAT"
    )
    assert name("DATA/imagenet") == "ImageNet" and name("toy/sketch") is None


# --- the choices never see the test set -----------------------------------------------------------
@pytest.mark.parametrize("method", ["tip", "tip-f", "linear-probe"])
def test_the_choices_on_validation_never_read_test_features(
    method, tiny_ckpt, tiny_data, monkeypatch, tmp_path
):
    events, test_paths = [], {p for p, _ in ad.load_dataset(tiny_data)["test"]}
    encode_views, search_ab, search_C_reg = ad.encode_views, ad.search_alpha_beta, ad.search_C_reg

    def spy_encode(encode, items, *a, **k):
        events.append(
            ("encode test" if {p for p, _ in items} & test_paths else "encode", len(items))
        )
        return encode_views(encode, items, *a, **k)

    def spy_search(search, name):
        def spy(features, *a, **k):
            events.append((name, len(features) if torch.is_tensor(features) else None))
            return search(features, *a, **k)

        return spy

    monkeypatch.setattr(ad, "encode_views", spy_encode)
    monkeypatch.setattr(ad, "search_alpha_beta", spy_search(search_ab, "search"))
    monkeypatch.setattr(ad, "search_C_reg", spy_search(search_C_reg, "search"))
    argv = ["--method", method, "--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "2"]
    argv += ["--epochs", "2", "--search-step", "5", "4"]
    m = run(argv + ["--out", str(tmp_path)])
    kinds = [e[0] for e in events]
    assert kinds.count("search") == 1 and kinds.index("search") < kinds.index("encode test")
    # no val/ folder: 2 validation images per class from the 4 training images left after the shots
    assert (
        events[1] == ("encode", 8) and ("search", 8 if method != "linear-probe" else None) in events
    )
    assert all(e == ("encode test", 12) for e in events[kinds.index("encode test") :])
    assert set(m["chosen"]) >= ({"C_reg"} if method == "linear-probe" else {"alpha", "beta"})


# --- each method's defaults: its paper's or code's ----------------------------------------------
def test_presets_are_each_methods_settings_and_help_prints_them(capsys):
    preset = lambda method, data, *more: ad.parse_args(["--method", method, "--data", data, *more])
    imagenet, pets, eurosat = "DATA/imagenet", "DATA/oxford_pets/images", "DATA/eurosat/2750"
    # ImageNet: Tip-Adapter's code ensembles the 7 templates; CLIP-Adapter's code keeps one
    assert preset("tip", imagenet).ensemble == preset("tip-f", imagenet).ensemble == "select"
    assert preset("tip", pets).ensemble == preset("clip-adapter", imagenet).ensemble == "none"
    assert preset("clip-adapter", imagenet).template == "a photo of a {}."
    assert preset("linear-probe", imagenet).template == "a photo of a {}."
    assert preset("tip", pets).template == "a photo of a {}, a type of pet."
    # CLIP-Adapter: CoOp's epochs by shots (ImageNet 50); Tip-F: 20 (EuroSAT 100)
    a = preset("clip-adapter", pets, "--shots", "2")
    assert (a.epochs, a.batch_size, a.lr, a.weight_decay, a.alpha) == (100, 32, 0.002, 5e-4, 0.2)
    assert preset("clip-adapter", imagenet).epochs == 50 and preset("tip-f", eurosat).epochs == 100
    t = preset("tip-f", pets)
    assert (t.epochs, t.batch_size, t.lr, t.weight_decay, t.beta) == (20, 256, 0.001, 0.01, 1.0)
    assert (t.alpha, t.search_scale, t.val_shots) == (1.17, (7, 3), None)  # None: all of val/
    assert (
        preset("tip", "toy/sketch").alpha == 1.0 and preset("tip", pets, "--alpha", "3").alpha == 3
    )
    assert preset("linear-probe", pets, "--shots", "16").val_shots == 4  # lpclip's min(shots, 4)
    with pytest.raises(SystemExit):
        ad.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "clip-adapter: 0.002; tip-f: 0.001" in shown and "20, EuroSAT 100" in shown


def test_tip_chooses_on_the_whole_val_split_the_probe_on_lpclips_share(tmp_path, tiny_ckpt, capsys):
    root, classes = tmp_path / "colours", ["red", "green", "blue"]
    for split, n in [("train", 4), ("val", 5), ("test", 2)]:
        make_image_folder(root / split, classes, n)
    argv = ["--backbone", tiny_ckpt, "--data", str(root), "--shots", "2", "--aug-views", "1"]
    argv += ["--epochs", "1", "--search-step", "4", "2"]
    for method, more, n_val in [("tip", [], 15), ("tip-f", [], 15), ("linear-probe", [], 6),
                                ("tip", ["--val-shots", "3"], 9)]:  # fmt: skip
        run(argv + ["--method", method, "--out", str(tmp_path / method), *more])
        assert f"training images, {n_val} validation images" in capsys.readouterr().out, method


# --- the CUDA precisions, emulated on the CPU -----------------------------------------------------
@pytest.mark.parametrize("precision", ["amp", "fp16"])
@pytest.mark.parametrize("method", ["clip-adapter", "tip-f"])
def test_cuda_precisions_emulated_on_the_cpu(method, precision, tiny_ckpt, tiny_data, tmp_path,
                                             monkeypatch):  # fmt: skip
    """CUDA's amp (fp16 autocast) and its fp16 weights, on the CPU: the image encoder fills the
    cache in that precision; the steps on the cached fp32 features run in fp32 (no loss scaling):
    the learned tensors stay fp32 and finite, and they learn."""
    half = lambda device, precision: (
        torch.autocast("cpu", dtype=torch.float16) if precision == "amp" else nullcontext()
    )
    monkeypatch.setattr(ad, "autocast", half)
    cpu, labels = torch.device("cpu"), torch.tensor([0, 1, 2, 0])
    model = ad.load_clip(tiny_ckpt, cpu, precision)
    assert (model.visual.conv1.weight.dtype == torch.float16) == (precision == "fp16")
    items = ad.load_dataset(tiny_data)["train"][:4]
    views = ad.encode_views(model.encode_image, items, ad.train_transform(32, 0.5), cpu, precision,
                            2, 1, 0)  # fmt: skip
    assert views.dtype == torch.float32 and torch.isfinite(views).all()
    W, s = (
        ad.zeroshot_classifier(model, NAMES, ["a photo of a {}."]),
        model.logit_scale.exp().item(),
    )
    if method == "clip-adapter":
        net = ad.ClipAdapter(32)
        forward = lambda f: ad.clip_adapter_logits(f, net, 0.2, W, s)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    else:
        net = ad.TipAdapterF(*ad.build_cache(views, labels, 3))
        forward = lambda f: net(F.normalize(f, dim=-1), W, 1.0, 1.0, s)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, eps=1e-4)
    before = [p.detach().clone() for p in net.parameters()]
    with half(cpu, precision):  # main runs it outside autocast; within one it holds up too
        loss, _ = ad.train_step(forward, optimizer, views[0].float(), labels)
    assert math.isfinite(loss)
    for p, p0 in zip(net.parameters(), before):
        assert p.dtype == torch.float32 and torch.isfinite(p).all() and not torch.equal(p, p0)
    argv = ["--method", method, "--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "2"]
    argv += ["--aug-views", "2", "--epochs", "2", "--search-step", "5", "4"]
    m = run(argv + ["--precision", precision, "--out", str(tmp_path)])  # the whole run
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ckpt["state"].values())
    assert m["precision"] == precision and all(math.isfinite(a) for a in m["accuracy"].values())
    # the checkpoint's backbone fingerprint does not depend on the precision: fp32 evaluates it
    load = ["--load", str(tmp_path / "checkpoint.pt"), "--eval-only", "--precision", "fp32"]
    again = run(argv + load + ["--out", str(tmp_path / "fp32")])
    assert set(again["accuracy"]) == set(m["accuracy"])


def test_the_backbone_fingerprint_ignores_precision_and_device_but_tells_backbones_apart(tiny_ckpt):
    cpu = torch.device("cpu")
    sums = {p: ad.visual_sum(ad.load_clip(tiny_ckpt, cpu, p)) for p in ("fp32", "amp", "fp16")}
    assert len(set(sums.values())) == 1, sums  # fp16 weights are what the fingerprint rounds to
    other = tiny_clip(seed=123)
    assert ad.visual_sum(other) != sums["fp32"]
    if torch.cuda.is_available():
        assert ad.visual_sum(ad.load_clip(tiny_ckpt, torch.device("cuda"), "fp16")) == sums["fp32"]


def test_the_template_is_checked_and_select_is_an_ensemble_as_in_zeroshot(
    tiny_ckpt, tiny_data, tmp_path
):
    argv = ["--method", "tip", "--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "2"]
    argv += ["--aug-views", "1", "--search-step", "4", "2", "--workers", "0"]
    for bad in ("a photo", "select"):  # no {}: every class would get the same text
        with pytest.raises(SystemExit, match="has no {} for the class name"):
            run(argv + ["--template", bad, "--out", str(tmp_path / "bad")])
    m = run(argv + ["--ensemble", "select", "--out", str(tmp_path / "tip")])
    z = zeroshot.main(zeroshot.parse_args(["--backbone", tiny_ckpt, "--data", tiny_data,
        "--ensemble", "select", "--workers", "0", "--out", str(tmp_path / "zs")]))  # fmt: skip
    assert m["zero_shot"]["test"] == z["accuracy"]["test"]  # the same 7 templates


# --- end to end through the command line ----------------------------------------------------------
def test_tip_f_command_line_base_to_new_with_eval_data(
    tiny_ckpt, tiny_data, shifted_data, tmp_path
):
    out = tmp_path / "run"
    cmd = [sys.executable, "adapter.py", "--method", "tip-f", "--backbone", tiny_ckpt, "--data",
           tiny_data, "--shots", "2", "--aug-views", "3", "--epochs", "3", "--subsample", "base",
           "--eval-data", shifted_data, "--search-step", "10", "5", "--workers", "0",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (
        "precomputed features: 3 views of 4 training images, 4 validation images" in result.stdout
    )
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("tip-f colours shots=2 seed=1: accuracy test=")
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["accuracy"]) == set(m["zero_shot"]) == {"test", "new", "colours_small"}
    assert m["accuracy"]["new"] == m["zero_shot"]["new"]  # no cached key of a new class: zero-shot
    assert 1 <= m["chosen"]["epoch"] <= 3 and m["epochs"] == 3 and "harmonic_mean" in m
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and all("val_acc" in r for r in log)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ckpt["state"]) == {"cache_keys"} and ckpt["state"]["cache_keys"].shape == (4, 32)
    assert set(ckpt["fixed"]) == {"cache_values"} and ckpt["fixed"]["cache_values"].shape == (4, 2)
    assert ckpt["config"]["method"] == "tip-f"
    assert ckpt["chosen"]["alpha"] == m["chosen"]["alpha"]


def test_clip_adapter_trains_scores_new_classes_and_evaluates_its_checkpoint(
    tiny_ckpt, tiny_data, tmp_path
):
    argv = ["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "2", "--aug-views", "2"]
    m = run(argv + ["--epochs", "3", "--subsample", "base", "--out", str(tmp_path / "a")])
    assert m["method"] == "clip-adapter" and m["epochs"] == 3 and m["chosen"]["alpha"] == 0.2
    assert set(m["accuracy"]) == {"test", "new"}  # the adapter is class-agnostic
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[0]["lr"] == 1e-5 and log[1]["lr"] == 0.002  # CoOp's warm-up epoch, then cosine
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert set(ckpt["state"]) == {"fc.0.weight", "fc.2.weight"}  # D = 32 read from the model
    assert ckpt["state"]["fc.0.weight"].shape == (8, 32)
    again = run(argv + ["--subsample", "base", "--load", str(tmp_path / "a" / "checkpoint.pt"),
                        "--eval-only", "--out", str(tmp_path / "b")])  # fmt: skip
    assert again["accuracy"] == m["accuracy"] and again["epochs"] == 0


def test_tip_is_training_free_and_its_checkpoint_evaluates_alone(tiny_ckpt, tiny_data, tmp_path):
    argv = ["--method", "tip", "--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "2"]
    m = run(argv + ["--aug-views", "2", "--out", str(tmp_path / "a")])
    assert m["epochs"] == 0 and not (tmp_path / "a" / "log.jsonl").exists()
    assert 0.1 <= m["chosen"]["alpha"] < 50 and 0.1 <= m["chosen"]["beta"] < 50  # (50, 50) grid
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt["state"] == {} and set(ckpt["fixed"]) == {"cache_keys", "cache_values"}  # built
    load = ["--load", str(tmp_path / "a" / "checkpoint.pt"), "--eval-only"]
    again = run(argv + load + ["--out", str(tmp_path / "b")])
    assert again["accuracy"] == m["accuracy"] and again["chosen"] == m["chosen"]


def test_linear_probe_scores_only_its_classes(tiny_ckpt, tiny_data, shifted_data, tmp_path):
    argv = ["--method", "linear-probe", "--backbone", tiny_ckpt, "--data", tiny_data, "--shots",
        "2"]  # fmt: skip
    # C's search: test_the_choices_on_validation_never_read_test_...
    m = run(argv + ["--subsample", "base", "--eval-data", shifted_data, "--out", str(tmp_path)])
    assert set(m["accuracy"]) == {"test"} and set(m["not_scored"]) == {"new", "colours_small"}
    assert set(m["chosen"]) == {"C_reg", "val_acc"} and "harmonic_mean" not in m
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(ckpt["state"]) == {"weight", "bias"} and ckpt["state"]["weight"].shape == (2, 32)
    m = run(argv + ["--eval-data", shifted_data, "--out", str(tmp_path / "all")])
    assert set(m["accuracy"]) == {"test", "colours_small"}  # all four classes: every set scored


# --- bad input: a clear message before any long work ----------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alpha", "1.5"], "residual ratio lies in \\[0, 1\\]"),
        (["--method", "tip", "--beta", "-1"], "weight and sharpness lie in"),
        (["--method", "tip", "--search-scale", "0.05", "3"], "must exceed 0.1"),
        (["--load", "checkpoint.pt"], "--load needs --eval-only"),
        (["--aug-views", "0"], "must be at least 1"),
        (["--method", "tip", "--shots", "6"], "no validation image of the classes"),
        (["--method", "tip", "--eval-only"], "--eval-only needs --load"),
    ],
)
def test_bad_input_stops_with_a_clear_message(extra, message, tiny_ckpt, tiny_data, tmp_path):
    with pytest.raises(SystemExit, match=message):
        run(
            ["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "2", "--out", str(tmp_path)]
            + extra
        )


def test_a_checkpoint_of_another_method_or_backbone_is_refused(
    tiny_ckpt, tiny_vit_ckpt, tiny_data, tmp_path
):
    argv = ["--data", tiny_data, "--shots", "1", "--aug-views", "1", "--epochs", "1"]
    run(argv + ["--backbone", tiny_ckpt, "--out", str(tmp_path / "a")])
    load = [
        "--load",
        str(tmp_path / "a" / "checkpoint.pt"),
        "--eval-only",
        "--out",
        str(tmp_path / "b"),
    ]
    with pytest.raises(SystemExit, match="not of --method tip-f"):
        run(argv + ["--backbone", tiny_ckpt, "--method", "tip-f"] + load)
    with pytest.raises(SystemExit, match="does not fit this run"):
        run(argv + ["--backbone", tiny_vit_ckpt] + load)


# --- slow: the toy world --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["clip-adapter", "tip-f"])
def test_adapters_beat_zero_shot_on_the_shifted_domain_they_were_trained_on(
    method, world, tmp_path
):
    root, _ = world
    argv = ["--method", method, "--backbone", os.path.join(root, "clip_rn.pt"), "--data",
            os.path.join(root, "sketch"), "--shots", "4", "--subsample", "base",
            "--out", str(tmp_path)]  # fmt: skip
    m = run(argv)  # views: the cache's random crops keep half the 32-pixel image or more (0.5)
    # measured on a built world: CLIP-Adapter 28.7, Tip-Adapter-F 34.0, zero-shot 14.7 (30-way)
    assert m["accuracy"]["test"] > m["zero_shot"]["test"] + 5, json.dumps(m)
