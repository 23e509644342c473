"""CoOp and CoCoOp: the properties the papers and the reference code give them."""

import argparse
import functools
import json
import math
import os
import signal
import subprocess
import sys
from contextlib import nullcontext

import clip
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_clip

import coop

CPU = torch.device("cpu")
NAMES = ["red", "green circle", "blue"]


def run(argv):
    return coop.main(coop.parse_args(argv + ["--workers", "0"]))


def word_embeddings(model, text):
    tokens = coop.tokenize(model, [text])
    with torch.no_grad():
        return model.token_embedding(tokens)[0, 1 : tokens.argmax()].clone()  # between SOS and EOT


def test_word_init_gives_exactly_the_zero_shot_logits():
    model = tiny_clip(seed=4)
    cc = coop.CustomCLIP(model, NAMES, ctx_init="a photo of a")
    assert cc.prompt_learner.n_ctx == 4
    image_features = F.normalize(torch.randn(5, 32), dim=-1)
    with torch.no_grad():
        logits = cc(image_features)
        texts = [f"a photo of a {c}." for c in NAMES]
        words = F.normalize(model.encode_text(coop.tokenize(model, texts)), dim=-1)  # CLIP's own
        zero_shot = model.logit_scale.exp() * image_features @ words.t()
        ensemble_of_one = coop.zeroshot_classifier(model, NAMES, ["a photo of a {}."])
        clip_own = F.normalize(
            model.encode_text(coop.tokenize(model, [f"a photo of a {c}." for c in NAMES])), dim=-1
        )
    torch.testing.assert_close(logits, zero_shot, atol=1e-5, rtol=1e-5)  # the shared-prefix encoder
    cc.prefix_is_shared = False  # the cut encoder: CLIP's 77 positions cut after the last EOT
    with torch.no_grad():
        torch.testing.assert_close(cc(image_features), zero_shot, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        logits, model.logit_scale.exp() * image_features @ ensemble_of_one.t()
    )
    torch.testing.assert_close(
        logits, model.logit_scale.exp() * image_features @ clip_own.t(), atol=1e-4, rtol=1e-5
    )


@pytest.mark.parametrize(
    "position, text",
    [("end", "a photo of a {}."), ("middle", "a photo {} of a."), ("front", "{} a photo of a.")],
)
def test_class_token_positions(position, text):
    model = tiny_clip(seed=5)
    pl = coop.PromptLearner(model, NAMES, n_ctx=4, position=position)
    with torch.no_grad():
        pl.ctx.copy_(word_embeddings(model, "a photo of a"))
        prompts = pl()  # (n_cls, L, d)
        expected = model.token_embedding(coop.tokenize(model, [text.format(c) for c in NAMES]))
    assert prompts.shape == (3, 77, 64)
    assert torch.equal(prompts, expected)  # the class tokens sit where the paper puts them
    end = coop.tokenize(model, [f"X X X X {c}." for c in NAMES]).argmax(-1)
    assert torch.equal(pl.tokenized.argmax(-1), end)  # and the EOT position is unchanged


def test_cocoop_adds_the_same_shift_to_every_context_vector():
    model = tiny_clip(seed=6)
    pl = coop.PromptLearner(model, NAMES, n_ctx=4)
    bias = torch.randn(2, 64)
    prefix = pl.prefix(bias)  # (B, 1 + M, d): [SOS] [V]_1 + pi .. [V]_M + pi, per image
    assert prefix.shape == (2, 5, 64)
    for b in range(2):
        assert torch.equal(prefix[b, 0], pl.token_prefix[0, 0])
        torch.testing.assert_close(prefix[b, 1:], pl.ctx + bias[b])


def test_cocoop_plain_formulation_equals_the_shared_prefix_speed_up():
    model = tiny_clip(seed=6)
    cc = coop.CustomCLIP(model, NAMES, n_ctx=4, cocoop=True)
    f = F.normalize(torch.randn(3, 32), dim=-1)
    with torch.no_grad():
        fast = cc(f)
        cc.prefix_is_shared = False  # every (image, class) prompt whole through the text encoder
        torch.testing.assert_close(cc(f), fast, atol=1e-5, rtol=1e-5)


def test_class_specific_context_from_words_gives_every_class_its_own_copy():
    model = tiny_clip(seed=4)
    cc = coop.CustomCLIP(model, NAMES, ctx_init="a photo of a", csc=True)
    ctx = cc.prompt_learner.ctx
    assert ctx.shape == (3, 4, 64) and all(torch.equal(ctx[c], ctx[0]) for c in range(3))
    f = F.normalize(torch.randn(5, 32), dim=-1)
    texts = [f"a photo of a {c}." for c in NAMES]
    with torch.no_grad():  # it starts at the zero-shot prompt, and each class learns its own
        words = F.normalize(model.encode_text(coop.tokenize(model, texts)), dim=-1)  # (C, D)
        expected = model.logit_scale.exp() * f @ words.t()
        torch.testing.assert_close(cc(f), expected, atol=1e-5, rtol=1e-5)


def test_model_code_raises_value_error_and_the_command_line_a_clear_exit(
    tiny_ckpt, tiny_data, tmp_path
):
    model = tiny_clip(seed=4)
    pl = coop.PromptLearner(model, NAMES, n_ctx=2, csc=True)
    with pytest.raises(ValueError, match="learned for 3 classes"):
        pl.set_classnames(model, ["a", "b"])
    with pytest.raises(ValueError, match="longer than the model's context length"):
        coop.PromptLearner(model, ["word " * 80])
    with pytest.raises(SystemExit, match="longer than the model's context length"):
        run(["--backbone", tiny_ckpt, "--data", tiny_data, "--n-ctx", "75", "--out", str(tmp_path)])


def test_cocoop_logits_are_per_image_text_features():
    model = tiny_clip(seed=7)
    cc = coop.CustomCLIP(model, NAMES, n_ctx=4, cocoop=True)
    f = F.normalize(torch.randn(3, 32), dim=-1)
    with torch.no_grad():
        logits = cc(f)
        for i in range(3):  # image i alone, with its own shifted context
            one = cc(f[i : i + 1])
            torch.testing.assert_close(logits[i : i + 1], one, atol=1e-5, rtol=1e-5)
    assert (
        logits.shape == (3, 3)
        and cc.meta_net[0].in_features == 32
        and cc.meta_net[0].out_features == 2
    )


@pytest.mark.parametrize("cocoop", [False, True])
def test_a_train_step_changes_only_the_learned_parameters(cocoop):
    model = tiny_clip(seed=8)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    cc = coop.CustomCLIP(model, NAMES, n_ctx=4, cocoop=cocoop)
    learned = [p for p in cc.parameters() if p.requires_grad]
    before = {k: v.clone() for k, v in coop.learned_state(cc).items()}
    optimizer = torch.optim.SGD(learned, lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    coop.train_step(cc, model.encode_image, optimizer, scaler, images, labels, "fp32")
    after = coop.learned_state(cc)
    assert set(after) == (
        {"prompt_learner.ctx"}
        | (
            {"meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}
            if cocoop
            else set()
        )
    )
    assert all(not torch.equal(before[k], after[k]) for k in after)
    # CLIP bit-identical
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())


def test_training_fits_the_labels():
    torch.manual_seed(0)
    model = tiny_clip(seed=9)
    cc = coop.CustomCLIP(model, NAMES, n_ctx=4)
    optimizer = torch.optim.SGD([cc.prompt_learner.ctx], lr=0.5, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    # two noisy images of each class
    features = torch.randn(3, 32).repeat(2, 1) + 0.1 * torch.randn(6, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    losses = [
        coop.train_step(cc, lambda x: x, optimizer, scaler, features, labels, "fp32")[0]
        for _ in range(30)
    ]
    assert losses[-1] < 0.85 * losses[0]  # a random tiny CLIP; the toy world shows real learning


def test_schedule_matches_the_reference_learning_rates():
    cocoop = [coop.lr_at_epoch(e, 0.002, 10) for e in range(10)]
    expected = [
        1e-5,
        2e-3,
        1.951e-3,
        1.809e-3,
        1.588e-3,
        1.309e-3,
        1.0e-3,
        6.91e-4,
        4.12e-4,
        1.91e-4,
    ]
    assert all(math.isclose(a, b, rel_tol=2e-3) for a, b in zip(cocoop, expected))
    assert math.isclose(coop.lr_at_epoch(199, 0.002, 200), 4.934e-7, rel_tol=1e-3)
    assert math.isclose(coop.lr_at_epoch(49, 0.002, 50), 7.885e-6, rel_tol=1e-3)
    assert [coop.epochs_for_shots(argparse.Namespace(shots=k)) for k in (1, 2, 4, 8, 16)] == [
        50,
        100,
        100,
        200,
        200,
    ]


# --- end to end through the command line ----------------------------------------------------------
def test_command_line_base_to_new_with_eval_data(tiny_ckpt, tiny_data, shifted_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "coop.py", "--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "2",
        "--epochs", "2", "--subsample", "base", "--eval-data", shifted_data, "--workers", "0",
        "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "= 1,024 parameters" in result.stdout  # 16 context vectors x 64 (the tiny text width)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .startswith("coop colours shots=2 seed=1: accuracy test=")
    )
    assert set(metrics) >= {"method", "backbone", "dataset", "shots", "seed", "zero_shot",
        "accuracy", "harmonic_mean", "epochs", "train_seconds", "device", "torch"}  # fmt: skip
    assert set(metrics["accuracy"]) == set(metrics["zero_shot"]) == {"test", "new", "colours_small"}
    a = metrics["accuracy"]
    assert math.isclose(metrics["harmonic_mean"], 2 * a["test"] * a["new"] / (a["test"] + a["new"]))
    assert metrics["epochs"] == 2 and metrics["train_seconds"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[0]["lr"] == 1e-5
    assert set(json.loads((out / "args.json").read_text())) >= {"backbone", "data", "shots"}
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ckpt["state"]) == {"prompt_learner.ctx"}  # the learned context only, no class names


def test_cocoop_command_line_is_the_published_setting(
    tiny_ckpt, tiny_data, tmp_path, monkeypatch, capsys
):
    batches = []
    step = coop.train_step
    monkeypatch.setattr(coop, "train_step", lambda *a: batches.append(len(a[5])) or step(*a))
    metrics = run(["--cocoop", "--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "1",
        "--out", str(tmp_path)])  # fmt: skip
    assert metrics["method"] == "cocoop" and metrics["epochs"] == 10  # CoCoOp: 10 epochs, batch 1
    assert set(batches) == {1} and len(batches) == 10 * 4
    assert "cocoop: 4 context vectors ('a photo of a')" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 10 and all(r["images_per_s"] > 0 for r in log)


def test_eval_only_with_other_class_names(tiny_ckpt, tiny_data, tmp_path):
    run(["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "1", "--epochs", "1", "--out",
        str(tmp_path / "a"), "--subsample", "base"])  # fmt: skip
    ckpt = str(tmp_path / "a" / "checkpoint.pt")
    m = run(["--backbone", tiny_ckpt, "--data", tiny_data, "--subsample", "new", "--eval-only",
        "--load", ckpt, "--out", str(tmp_path / "b")])  # fmt: skip
    trained = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["epochs"] == 0 and m["accuracy"]["test"] == trained["accuracy"]["new"]


def test_an_evaluation_never_overwrites_its_training_run(
    tiny_ckpt, tiny_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the default run folders: runs/coop/<dataset>/1shot_seed1[_eval]
    run(["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "1", "--epochs", "1"])
    trained = tmp_path / "runs" / "coop" / os.path.basename(tiny_data) / "1shot_seed1"
    run(["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "1", "--eval-only", "--load",
        str(trained / "checkpoint.pt")])  # fmt: skip
    assert json.loads((trained / "metrics.json").read_text())["epochs"] == 1  # kept
    evaluated = json.loads((trained.parent / "1shot_seed1_eval" / "metrics.json").read_text())
    assert evaluated["epochs"] == 0


def test_resume_continues_exactly(tiny_ckpt, tiny_data, tmp_path, monkeypatch):
    args = ["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "4", "--epochs", "4",
        "--batch-size", "4", "--lr", "0.5"]  # fmt: skip
    run(args + ["--out", str(tmp_path / "full")])
    save = coop.save_progress
    calls = []

    def interrupted(*a):
        calls.append(1)
        # epoch 3 is in the log, but the machine goes down before its checkpoint
        if len(calls) == 3:
            raise KeyboardInterrupt
        save(*a)

    monkeypatch.setattr(coop, "save_progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(args + ["--out", str(tmp_path / "cut")])
    assert [
        json.loads(x)["epoch"] for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    ] == [1, 2, 3]
    monkeypatch.setattr(coop, "save_progress", save)
    run(args + ["--out", str(tmp_path / "cut"), "--resume"])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert cut["epoch"] == 4 and torch.equal(
        full["state"]["prompt_learner.ctx"], cut["state"]["prompt_learner.ctx"]
    )
    log = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]  # epoch 3 once, not twice


def test_resume_after_sigkill_at_a_random_moment_logs_each_epoch_once(
    tiny_ckpt, tiny_data, tmp_path
):
    import random
    import signal
    import time

    args = [sys.executable, "coop.py", "--backbone", tiny_ckpt, "--data", tiny_data,
        "--shots", "2", "--epochs", "40", "--batch-size", "2", "--workers", "0", "--out",
        str(tmp_path)]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # each epoch's line as soon as it is printed
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    # wait for a random epoch among the first half, then kill at a random moment after it (an
    # epoch of the tiny run takes a few tens of milliseconds: the kill lands in the second half)
    kill_after = random.randint(2, 20)  # its line is printed just before its checkpoint
    for line in proc.stdout:
        if line.startswith(f"epoch {kill_after}/40"):
            break
    time.sleep(random.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"]
    assert kill_after - 1 <= done < 40, "the run ended before the kill; the test needs a longer run"
    subprocess.run(args + ["--resume"], cwd=ROOT, check=True, capture_output=True)
    log = [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 41))


@pytest.mark.parametrize("drop_last, steps", [(False, 2), (True, 1)])
def test_the_last_partial_batch_is_kept_unless_asked(
    tiny_ckpt, tiny_data, tmp_path, monkeypatch, drop_last, steps
):
    calls = []
    step = coop.train_step
    monkeypatch.setattr(coop, "train_step", lambda *a: calls.append(len(a[5])) or step(*a))
    run(["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "6", "--epochs", "1",
        "--batch-size", "16", "--out",
        str(tmp_path)] + (["--drop-last"] if drop_last else []))  # fmt: skip
    assert len(calls) == steps and sum(calls) == (16 if drop_last else 24)


def test_checkpoint_from_another_configuration(tiny_ckpt, tiny_data, tmp_path):
    run(["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "1", "--epochs", "1", "--n-ctx",
        "4", "--out", str(tmp_path / "a")])  # fmt: skip
    ckpt = str(tmp_path / "a" / "checkpoint.pt")
    # another context length
    with pytest.raises(SystemExit, match="does not fit this run.*'n_ctx': 4"):
        run(["--backbone", tiny_ckpt, "--data", tiny_data, "--eval-only", "--load", ckpt, "--out",
            str(tmp_path / "b")])  # fmt: skip
    # another class-token position: the same shapes, other prompts
    with pytest.raises(SystemExit, match="does not fit.*'position': 'end'.*'position': 'front'"):
        run(["--backbone", tiny_ckpt, "--data", tiny_data, "--n-ctx", "4", "--eval-only", "--load",
            ckpt, "--class-token-position", "front", "--out", str(tmp_path / "d")])  # fmt: skip
    wide = tmp_path / "wide.pt"
    state = clip_with_text_width(128)
    torch.save(state, wide)
    with pytest.raises(SystemExit, match="does not fit this run"):  # another backbone width
        run(["--backbone", str(wide), "--data", tiny_data, "--n-ctx", "4", "--eval-only", "--load",
            ckpt, "--out", str(tmp_path / "c")])  # fmt: skip


def clip_with_text_width(width):
    import clip

    torch.manual_seed(0)
    return clip.model.CLIP(
        32, 32, (1, 1, 1, 1), 8, None, 77, 49408, width, width // 64, 1
    ).state_dict()


def test_bad_options_are_refused(tiny_ckpt, tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="--eval-only needs --load"):
        run(["--backbone", tiny_ckpt, "--data", tiny_data, "--eval-only", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="RN51 not found"):
        run(["--backbone", "RN51", "--data", tiny_data, "--out", str(tmp_path)])


def test_class_specific_context_has_one_context_per_class(tiny_ckpt, tiny_data, tmp_path, capsys):
    run(["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "1", "--epochs", "1", "--csc",
        "--n-ctx", "2", "--out", str(tmp_path)])  # fmt: skip
    assert "= 512 parameters" in capsys.readouterr().out  # 4 classes x 2 vectors x 64
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"][
        "prompt_learner.ctx"
    ].shape == (4, 2, 64)


def test_class_specific_context_scores_only_its_own_classes(tiny_ckpt, tiny_data, tmp_path):
    m = run(["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "1", "--epochs", "1", "--csc",
        "--subsample", "base", "--ctx-init", "a photo of", "--out", str(tmp_path)])  # fmt: skip
    assert set(m["accuracy"]) == {"test"} and "new" in m["not_scored"] and "harmonic_mean" not in m
    assert set(m["zero_shot"]) == {"test"}
    # args.json records the M the run used (the init words' 3 tokens), not the preset's 16
    assert json.loads((tmp_path / "args.json").read_text())["n_ctx"] == 3


def test_presets_are_the_papers_settings():
    coop_args = coop.parse_args(["--data", "d", "--shots", "1"])
    assert (coop_args.backbone, coop_args.n_ctx, coop_args.ctx_init) == ("RN50", 16, "")
    assert (coop_args.epochs, coop_args.batch_size, coop_args.lr) == (50, 32, 0.002)
    assert [coop.parse_args(["--data", "d", "--shots", str(k)]).epochs for k in (2, 8)] == [
        100,
        200,
    ]
    cocoop = coop.parse_args(["--cocoop", "--data", "d"])  # the published setting, backbone too
    assert (cocoop.backbone, cocoop.n_ctx, cocoop.ctx_init) == ("ViT-B/16", 4, "a photo of a")
    assert (cocoop.epochs, cocoop.batch_size, cocoop.lr, cocoop.shots) == (10, 1, 0.002, 16)
    mine = coop.parse_args(["--cocoop", "--data", "d", "--epochs", "3", "--backbone", "RN50"])
    assert (mine.epochs, mine.backbone, mine.batch_size) == (3, "RN50", 1)  # given options win


def test_help_reads_like_the_paper():
    env = dict(os.environ, COLUMNS="200")  # no wrapping inside the facts
    out = subprocess.run([sys.executable, "coop.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env=env).stdout  # fmt: skip
    facts = ("0.002", "momentum 0.9", "weight decay 5e-4", "1e-05", "coop: 'RN50'",
             "cocoop: 'ViT-B/16'", "coop: 32; cocoop: 1", "cocoop: 10", "cocoop: 'a photo of a'",
             "coop: 50/100/200 epochs for 1/2-4/8-16 shots")  # fmt: skip
    for fact in facts:
        assert fact in out, fact


@pytest.mark.parametrize("precision", ["amp", "fp16"])
def test_mixed_precision_keeps_the_learned_context_fp32(tiny_ckpt, tiny_data, tmp_path, precision):
    m = run(["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "1", "--epochs", "2",
        "--precision", precision, "--out", str(tmp_path)])  # fmt: skip
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (
        m["precision"] == precision and ckpt["state"]["prompt_learner.ctx"].dtype == torch.float32
    )
    assert torch.isfinite(ckpt["state"]["prompt_learner.ctx"]).all()


# --- the CUDA mixed-precision path, emulated on the CPU ------------------------------------------
def emulate_cuda(monkeypatch):
    """CUDA's amp on the CPU: fp16 autocast (the CPU's own amp is bf16, which needs no scaler)."""
    fp16 = lambda device, precision: (
        torch.autocast("cpu", dtype=torch.float16) if precision == "amp" else nullcontext()
    )
    monkeypatch.setattr(coop, "autocast", fp16)


@pytest.mark.parametrize("cocoop", [False, True])
@pytest.mark.parametrize("precision", ["amp", "fp16"])
def test_train_step_under_emulated_cuda_mixed_precision(monkeypatch, cocoop, precision):
    """fp16 arithmetic with the loss scaled: overflowing steps are skipped and the scale halves;
    the learned tensors (the context, CoCoOp's meta-network) stay fp32, finite, and learn."""
    emulate_cuda(monkeypatch)
    model = tiny_clip(seed=8)
    if precision == "fp16":  # CLIP's fp16 weights, as load_clip gives them
        clip.model.convert_weights(model)
    cc = coop.CustomCLIP(model, NAMES, n_ctx=4, cocoop=cocoop)
    learned = [p for p in cc.parameters() if p.requires_grad]
    before = {k: v.clone() for k, v in coop.learned_state(cc).items()}
    optimizer = torch.optim.SGD(learned, lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(8):
        loss, _ = coop.train_step(cc, model.encode_image, optimizer, scaler, images, labels,
                                  precision)  # fmt: skip
        assert math.isfinite(loss)
    after = coop.learned_state(cc)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())
    assert all(not torch.equal(before[k], after[k]) for k in after) and scaler.get_scale() <= 2**16


def test_resume_restores_the_loss_scale(tiny_ckpt, tiny_data, tmp_path, monkeypatch):
    """--precision fp16 scales the loss; --resume goes on with the saved scale, not a fresh one."""
    args = ["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "2", "--epochs", "3",
        "--batch-size", "4", "--lr", "0.5", "--precision", "fp16"]  # fmt: skip
    save = coop.save_progress
    with monkeypatch.context() as m:  # a scaler that starts below a fresh one's 2**16
        m.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=1024))
        run(args + ["--out", str(tmp_path / "full")])
        # the same run, killed after its first epoch's checkpoint
        m.setattr(coop, "save_progress", lambda *a: save(*a) or sys.exit("killed"))
        with pytest.raises(SystemExit, match="killed"):
            run(args + ["--out", str(tmp_path / "cut")])
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["scaler"]["scale"]
    scales, step = [], coop.train_step
    monkeypatch.setattr(coop, "train_step", lambda *a: scales.append(a[3].get_scale()) or step(*a))
    run(args + ["--out", str(tmp_path / "cut"), "--resume"])  # a fresh GradScaler: 2**16
    assert scales[0] == saved == 1024
    full, cut = [
        torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("full", "cut")
    ]
    assert torch.equal(full["state"]["prompt_learner.ctx"], cut["state"]["prompt_learner.ctx"])


def test_a_run_killed_by_sigusr1_resumes_from_its_checkpoint_as_an_uninterrupted_run(
    tiny_ckpt, tiny_data, tmp_path
):
    args = [sys.executable, "coop.py", "--backbone", tiny_ckpt, "--data", tiny_data, "--shots",
        "2", "--epochs", "6", "--batch-size", "2", "--lr", "0.5", "--workers", "0"]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # each epoch's line as soon as it is printed
    subprocess.run(args + ["--out", str(tmp_path / "full")], cwd=ROOT, check=True, env=env,
                   capture_output=True)  # fmt: skip
    cut = args + ["--out", str(tmp_path / "cut")]
    proc = subprocess.Popen(cut, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("epoch 2/6"):  # epoch 1's checkpoint is written
            proc.send_signal(signal.SIGUSR1)  # a cluster's warning: its default action ends us
            break
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGUSR1
    done = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < 6  # killed mid-run, with at least the first epoch's checkpoint
    subprocess.run(cut + ["--resume"], cwd=ROOT, check=True, env=env, capture_output=True)
    a, b = [torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("full", "cut")]
    assert torch.equal(a["state"]["prompt_learner.ctx"], b["state"]["prompt_learner.ctx"])
    timing = ("seconds", "images_per_s")
    logs = [[{k: v for k, v in json.loads(line).items() if k not in timing}
             for line in (tmp_path / r / "log.jsonl").read_text().splitlines()]
            for r in ("full", "cut")]  # fmt: skip
    assert logs[0] == logs[1] and [r["epoch"] for r in logs[1]] == [1, 2, 3, 4, 5, 6]
