"""ProGrad: the projection, its two gradients, its teacher, and CoOp's result at lambda = 0."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_clip

import coop
import prograd
import zeroshot

NAMES = ["red", "green circle", "blue"]


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
    G_d, G_g, _, _ = prograd.two_gradients(student, f, teacher, labels, 1.0, params)
    t = model.logit_scale.exp() * f @ teacher.t()
    ce, _ = prograd.prograd_losses(student(f), t, labels, 1.0)
    _, kl = prograd.prograd_losses(student(f), t, labels, 1.0)
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
    template = prograd.resolve_template("OxfordPets")
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
    assert "= 1,024 parameters" in result.stdout
    m = prograd.main(prograd.parse_args(["--backbone", tiny_ckpt, "--data", tiny_data,
        "--subsample", "new", "--eval-only", "--load", str(tmp_path / "checkpoint.pt"), "--workers",
        "0", "--out", str(tmp_path / "new")]))  # fmt: skip
    assert m["accuracy"]["test"] == metrics["accuracy"]["new"]


def test_bad_template_is_refused():
    with pytest.raises(SystemExit, match="must end with"):
        prograd.resolve_template("{} texture.")
    with pytest.raises(SystemExit, match="must end with"):  # the init words would be cut wrongly
        prograd.resolve_template("photo:{}.")
    assert prograd.resolve_template("a photo of {}.") == "a photo of {}."


def test_mixed_precision_logits_fp32_losses_and_gradients():
    model = tiny_clip(seed=10)
    student = prograd.CustomCLIP(model, NAMES, 16, "a photo of a")
    teacher = zeroshot.zeroshot_classifier(model, NAMES, ["a photo of a {}."])
    f, labels = F.normalize(torch.randn(4, 32), dim=-1), torch.tensor([0, 1, 2, 0])
    params = [student.prompt_learner.ctx]
    exact = prograd.two_gradients(student, f, teacher, labels, 1.0, params)
    amp = prograd.two_gradients(student, f, teacher, labels, 1.0, params, precision="amp")
    assert amp[3].dtype == torch.float32 and amp[0][0].dtype == amp[1][0].dtype == torch.float32
    for a, b in ((amp[0][0], exact[0][0]), (amp[1][0], exact[1][0])):  # bf16 logits on the CPU
        assert (
            torch.isfinite(a).all() and F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
        )
