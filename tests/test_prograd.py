"""ProGrad: the projection, its two gradients, its teacher, and CoOp's result at lambda = 0."""

import json
import math
from contextlib import nullcontext

import clip
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_clip

import coop
import prograd
import zeroshot

NAMES = ["red", "green circle", "blue"]
UNIT = lambda loss: loss  # no loss scaling (GradScaler.scale when it is off)


def test_no_conflict_leaves_the_gradient_unchanged():
    G_g = torch.randn(16, 64)
    G_d = G_g + 0.1 * torch.randn(16, 64)  # same general direction: G_d . G_g > 0
    assert (G_d * G_g).sum() > 0 and prograd.project(G_d, G_g, 1.0) is G_d


@pytest.mark.parametrize("lam", [1.0, 0.3, 0.8])
def test_conflict_removes_lambda_of_the_opposing_component(lam):
    torch.manual_seed(0)
    G_g = torch.randn(16, 64)
    G_d = -0.5 * G_g + torch.randn(16, 64)
    dot = (G_d * G_g).sum()
    assert dot < 0
    G = prograd.project(G_d, G_g, lam)
    along = (G * G_g).sum() / G_g.norm()  # component of the result along G_g
    assert math.isclose(
        along.item(), (1 - lam) * (dot / G_g.norm()).item(), rel_tol=1e-4, abs_tol=1e-4
    )
    if lam == 1.0:
        # orthogonal to G_g
        assert abs((G * G_g).sum().item()) < 1e-4 * G.norm().item() * G_g.norm().item()
    orthogonal_part = G_d - dot / G_g.norm() ** 2 * G_g
    # untouched
    torch.testing.assert_close(G - (1 - lam) * dot / G_g.norm() ** 2 * G_g, orthogonal_part)


def test_formula_equals_the_reference_normalised_form():
    torch.manual_seed(1)
    for _ in range(20):
        G_g, G_d = torch.randn(16, 512), torch.randn(16, 512)
        if (G_d * G_g).sum() >= 0:
            G_d = -G_d
        g_hat = G_g / G_g.norm()
        reference = G_d - 0.7 * (G_d * g_hat).sum() * g_hat  # the authors' code, with unit vectors
        G = prograd.project(G_d, G_g, 0.7)
        assert ((G - reference).norm() / reference.norm()).item() < 1e-5


def test_zero_general_gradient_leaves_the_gradient_unchanged():
    G_d = torch.randn(16, 64)
    assert torch.equal(prograd.project(G_d, torch.zeros(16, 64), 1.0), G_d)


def test_projection_runs_in_fp32_for_half_gradients():
    G_g = torch.randn(16, 64).half()
    G_d = (-G_g.float() + torch.randn(16, 64)).half()
    G = prograd.project(G_d, G_g, 1.0)
    assert G.dtype == torch.float16
    assert (
        abs((G.float() * G_g.float()).sum().item()) < 1e-2 * G.float().norm() * G_g.float().norm()
    )


def test_two_gradients_from_one_forward_equal_two_separate_forwards():
    torch.manual_seed(2)
    model = tiny_clip(seed=10)
    student = prograd.CustomCLIP(model, NAMES, 16, "a photo of a")
    teacher = zeroshot.zeroshot_classifier(model, NAMES, ["a photo of a {}."])
    f, labels = F.normalize(torch.randn(4, 32), dim=-1), torch.tensor([0, 1, 2, 0])
    params = [student.prompt_learner.ctx]
    G_d, G_g, *_ = prograd.two_gradients(student, f, teacher, labels, 1.0, params, "fp32", UNIT)
    t = model.logit_scale.exp() * f @ teacher.t()
    ce = F.cross_entropy(student(f), labels)  # a forward of its own for each loss
    kl = -(F.softmax(t, -1) * F.log_softmax(student(f), -1)).sum(-1).mean()  # the authors' L_kl
    torch.testing.assert_close(G_d[0], torch.autograd.grad(ce, params)[0], rtol=0, atol=0)
    torch.testing.assert_close(G_g[0], torch.autograd.grad(kl, params)[0], rtol=0, atol=0)
    # and L_kl's gradient is that of the true KL(p_zs || p_student)
    s = student(f)
    true_kl = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    torch.testing.assert_close(
        G_g[0], torch.autograd.grad(true_kl, params)[0], rtol=1e-4, atol=1e-7
    )


def test_template_init_is_right_aligned_with_zeros_before():
    model = tiny_clip(seed=11)
    pl = prograd.PromptLearner(model, NAMES, 16, "a photo of a")
    words = model.token_embedding(coop.tokenize(model, ["a photo of a"]))[0, 1:5]
    assert torch.equal(pl.ctx[:12], torch.zeros(12, 64)) and torch.equal(pl.ctx[12:], words)
    # 8 words, 9 BPE tokens
    quirk = prograd.PromptLearner(model, NAMES, 16, "a type of pet, a photo of a")
    tokens = coop.tokenize(model, ["a type of pet, a photo of a"])[0]
    # a type of pet , a photo of
    assert torch.equal(quirk.ctx[8:], model.token_embedding(tokens[1:9]))
    # the last "a" falls into the frozen suffix
    assert quirk.tokenized[0, 17].item() == tokens[9].item()


def test_teacher_logits_equal_zeroshot(tiny_ckpt, tiny_data):
    model = zeroshot.load_clip(tiny_ckpt, torch.device("cpu"), "fp32")
    data = zeroshot.load_dataset(tiny_data)
    loader = zeroshot.make_loader(data["test"], zeroshot.test_transform(32), 4, 0, "cpu")
    f, _ = zeroshot.encode_images(model.encode_image, loader, torch.device("cpu"), "fp32")
    template = prograd.parse_args(["--data", tiny_data, "--template", "OxfordPets"]).template
    assert template == "a type of pet, a photo of a {}."
    mine = prograd.zeroshot_classifier(model, data["classnames"], [template])
    theirs = zeroshot.zeroshot_classifier(model, data["classnames"], [template])
    assert torch.equal(
        model.logit_scale.exp() * f @ mine.t(), model.logit_scale.exp() * f @ theirs.t()
    )


def test_lambda_zero_is_exactly_coop(tiny_ckpt, tiny_data, tmp_path):
    common = ["--backbone", tiny_ckpt, "--data", tiny_data, "--shots", "4", "--epochs", "3",
        "--batch-size", "8", "--lr", "0.5", "--workers", "0"]  # fmt: skip
    prograd.main(
        prograd.parse_args(
            common + ["--ctx-init", "random", "--lam", "0", "--out", str(tmp_path / "pg")]
        )
    )
    coop.main(coop.parse_args(common + ["--out", str(tmp_path / "coop")]))
    a = torch.load(tmp_path / "pg" / "checkpoint.pt", weights_only=True)["state"][
        "prompt_learner.ctx"
    ]
    b = torch.load(tmp_path / "coop" / "checkpoint.pt", weights_only=True)["state"][
        "prompt_learner.ctx"
    ]
    assert torch.equal(a, b)
    c = torch.load(tmp_path / "pg" / "checkpoint.pt", weights_only=True)
    prograd.main(
        prograd.parse_args(
            common + ["--ctx-init", "random", "--lam", "1", "--out", str(tmp_path / "pg1")]
        )
    )
    d = torch.load(tmp_path / "pg1" / "checkpoint.pt", weights_only=True)["state"][
        "prompt_learner.ctx"
    ]
    assert not torch.equal(c["state"]["prompt_learner.ctx"], d)  # and lambda = 1 is not


def test_command_line_base_to_new(tiny_ckpt, tiny_data, shifted_data, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "prograd.py", "--backbone", tiny_ckpt, "--data", tiny_data, "--shots",
        "2", "--epochs", "2", "--subsample", "base", "--eval-data", shifted_data, "--workers", "0",
        "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "prograd" and set(metrics["accuracy"]) == {
        "test",
        "new",
        "colours_small",
    }
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r["conflict_fraction"] <= 1 and -1 <= r["mean_cosine"] <= 1 for r in log)
    assert all(r["loss_ce"] > 0 and r["loss_kl"] > 0 for r in log)  # both losses, logged apart
    assert "= 1,024 parameters" in result.stdout
    assert "--template 'a photo of a {}.'" in result.stdout  # the teacher's, said once
    m = prograd.main(prograd.parse_args(["--backbone", tiny_ckpt, "--data", tiny_data,
        "--subsample", "new", "--eval-only", "--load", str(tmp_path / "checkpoint.pt"), "--workers",
        "0", "--out", str(tmp_path / "new")]))  # fmt: skip
    assert m["accuracy"]["test"] == metrics["accuracy"]["new"]


def test_bad_template_is_refused():
    template = lambda t: prograd.parse_args(["--data", "d", "--template", t]).template
    with pytest.raises(SystemExit, match="must end with"):
        template("{} texture.")
    with pytest.raises(SystemExit, match="must end with"):  # the init words would be cut wrongly
        template("photo:{}.")
    assert template("a photo of {}.") == "a photo of {}."


def test_the_teacher_template_is_the_datasets_own_by_default(capsys):
    """As the authors' code (CUSTOM_TEMPLATES[cfg.DATASET.NAME]): no --template, the dataset's."""
    pets = ["--data", "d", "--split-file", "DATA/pets/split_zhou_OxfordPets.json"]
    assert prograd.parse_args(pets).template == "a type of pet, a photo of a {}."
    assert prograd.parse_args(["--data", "d"]).template == "a photo of a {}."  # not in the table
    given = prograd.parse_args(pets + ["--template", "EuroSAT"]).template
    assert given == "a centered satellite photo of {}."  # a given --template wins
    with pytest.raises(SystemExit):
        prograd.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: the dataset's own" in shown


def test_presets_are_the_papers_settings(capsys):
    args = prograd.parse_args(["--data", "d", "--shots", "4"])
    assert (args.backbone, args.n_ctx, args.ctx_init) == ("RN50", 16, "template")
    assert (args.lam, args.temperature, args.batch_size, args.lr) == (1.0, 1.0, 32, 0.002)
    assert args.epochs == 100 and prograd.parse_args(["--data", "d"]).epochs == 200  # CoOp's
    with pytest.raises(SystemExit):
        prograd.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for fact in ("default: 'RN50'", "default: 1.0", "50/100/200 epochs", "0.002", "momentum 0.9"):
        assert fact in shown, fact


# --- the CUDA mixed-precision path, emulated on the CPU ------------------------------------------
def emulate_cuda(monkeypatch):
    """CUDA's amp on the CPU: fp16 autocast (the CPU's own amp is bf16, which needs no scaler)."""
    fp16 = lambda device, precision: (
        torch.autocast("cpu", dtype=torch.float16) if precision == "amp" else nullcontext()
    )
    monkeypatch.setattr(prograd, "autocast", fp16)


def student_and_batch(precision):
    model = tiny_clip(seed=10)
    if precision == "fp16":  # CLIP's fp16 weights, as load_clip gives them
        clip.model.convert_weights(model)
    student = prograd.CustomCLIP(model, NAMES, 16, "a photo of a")
    teacher = zeroshot.zeroshot_classifier(model, NAMES, ["a photo of a {}."])
    optimizer = torch.optim.SGD([student.prompt_learner.ctx], lr=0.1, momentum=0.9)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    return model, student, teacher, optimizer, images, labels


@pytest.mark.parametrize("precision", ["amp", "fp16"])
def test_train_step_under_emulated_cuda_mixed_precision(monkeypatch, precision):
    """The scaled losses overflow fp16 at first (this tiny CLIP's gradients are large): those steps
    are skipped and the scale halves, as GradScaler does; then the context learns, in fp32."""
    emulate_cuda(monkeypatch)
    model, student, teacher, optimizer, images, labels = student_and_batch(precision)
    ctx = student.prompt_learner.ctx
    before, scaler = ctx.detach().clone(), torch.amp.GradScaler("cpu", enabled=True)
    step = (student, model.encode_image, teacher, optimizer, scaler, images, labels, precision)
    cosines = [prograd.train_step(*step, 1.0, 1.0)[3] for _ in range(8)]
    skipped = [math.isnan(c) for c in cosines]
    assert scaler.get_scale() == 2.0**16 / 2 ** sum(skipped) and 0 < sum(skipped) < 8
    assert all(-1 <= c <= 1 for c in cosines if not math.isnan(c))
    assert ctx.dtype == torch.float32 and torch.isfinite(ctx).all() and not torch.equal(ctx, before)


def test_an_overflow_in_the_general_gradient_skips_the_step_and_lowers_the_scale(monkeypatch):
    """G_g = inf (an fp16 overflow of the scaled L_kl) must not be projected away silently: the
    step is skipped, the scale halves, and the logged cosine is NaN (not counted as a conflict)."""
    emulate_cuda(monkeypatch)
    two_gradients = prograd.two_gradients

    def overflowing(*a, **k):
        G_d, G_g, *rest = two_gradients(*a, **k)
        G_g[0][0, 0] = math.inf
        return G_d, G_g, *rest

    monkeypatch.setattr(prograd, "two_gradients", overflowing)
    model, student, teacher, optimizer, images, labels = student_and_batch("amp")
    ctx = student.prompt_learner.ctx
    before, scaler = ctx.detach().clone(), torch.amp.GradScaler("cpu", enabled=True)
    step = (student, model.encode_image, teacher, optimizer, scaler, images, labels, "amp", 1, 1)
    *_, cosine = prograd.train_step(*step)
    assert torch.equal(ctx, before) and scaler.get_scale() == 2.0**15 and math.isnan(cosine)
    assert not optimizer.state  # SGD never ran: no momentum buffer either
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # unscaled (fp32): an error, not a skip
    with pytest.raises(FloatingPointError, match="not finite"):
        prograd.train_step(*step[:4], scaler, *step[5:])


def test_mixed_precision_logits_fp32_losses_and_gradients():
    model = tiny_clip(seed=10)
    student = prograd.CustomCLIP(model, NAMES, 16, "a photo of a")
    teacher = zeroshot.zeroshot_classifier(model, NAMES, ["a photo of a {}."])
    f, labels = F.normalize(torch.randn(4, 32), dim=-1), torch.tensor([0, 1, 2, 0])
    params = [student.prompt_learner.ctx]
    exact = prograd.two_gradients(student, f, teacher, labels, 1.0, params, "fp32", UNIT)
    amp = prograd.two_gradients(student, f, teacher, labels, 1.0, params, "amp", UNIT)
    assert amp[4].dtype == torch.float32 and amp[0][0].dtype == amp[1][0].dtype == torch.float32
    for a, b in ((amp[0][0], exact[0][0]), (amp[1][0], exact[1][0])):  # bf16 logits on the CPU
        assert (
            torch.isfinite(a).all() and F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
        )
