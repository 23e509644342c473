"""Zero-shot CLIP: templates, ensembles, and the command line."""

import json
import math
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from conftest import ROOT

import zeroshot


def test_template_tables():
    assert len(zeroshot.TEMPLATES_SELECT) == 7 and len(zeroshot.TEMPLATES_80) == 80
    assert len(zeroshot.CUSTOM_TEMPLATES) == 11  # the CoOp paper's 11 datasets
    assert zeroshot.TEMPLATES_80[:2] == ["a bad photo of a {}.", "a photo of many {}."]  # in order
    assert len(set(zeroshot.TEMPLATES_80)) == 80 and all("{}" in t for t in zeroshot.TEMPLATES_80)
    assert set(zeroshot.TEMPLATES_SELECT) <= set(zeroshot.TEMPLATES_80)
    assert zeroshot.resolve_template("OxfordPets") == "a photo of a {}, a type of pet."
    with pytest.raises(SystemExit, match="has no {} for the class name"):
        zeroshot.resolve_template("a photo")


def test_ensembles():
    single = zeroshot.ensemble_templates("none", "{} texture.", False)
    assert single == ["{} texture."]
    # 7 + the dataset's = 8
    assert zeroshot.ensemble_templates("select", "{} texture.", True)[-1] == "{} texture."
    # already among the 80
    assert len(zeroshot.ensemble_templates("all", "a photo of a {}.", True)) == 80


def test_command_line(tiny_ckpt, tiny_data, shifted_data, tmp_path):
    cmd = [sys.executable, "zeroshot.py", "--backbone", tiny_ckpt, "--data", tiny_data,
        "--ensemble", "select", "--subsample", "base", "--eval-data", shifted_data, "--workers",
        "0", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "zeroshot-ensemble-select" and len(metrics["templates"]) == 7
    assert set(metrics["accuracy"]) == set(metrics["zero_shot"]) == {"test", "new", "colours_small"}
    assert "harmonic_mean" in metrics and metrics["shots"] == 0


def test_single_template_run_equals_the_classifier(tiny_ckpt, tiny_data, tmp_path):
    m = zeroshot.main(
        zeroshot.parse_args(
            ["--backbone", tiny_ckpt, "--data", tiny_data, "--workers", "0", "--out", str(tmp_path)]
        )
    )
    assert m["accuracy"] == m["zero_shot"]  # without an ensemble both are the one template
    model = zeroshot.load_clip(tiny_ckpt, torch.device("cpu"), "fp32")
    data = zeroshot.load_dataset(tiny_data)
    loader = zeroshot.make_loader(data["test"], zeroshot.test_transform(32), 5, 0, "cpu")
    features, labels = zeroshot.encode_images(
        model.encode_image, loader, torch.device("cpu"), "fp32"
    )
    w = zeroshot.zeroshot_classifier(model, data["classnames"], ["a photo of a {}."])
    assert m["accuracy"]["test"] == zeroshot.accuracy(features @ w.t(), labels)


@pytest.mark.parametrize("precision", ["amp", "fp16"])
def test_cuda_precisions_emulated_on_the_cpu(
    precision, tiny_ckpt, tiny_data, tmp_path, monkeypatch
):
    """CUDA's amp (fp16 autocast) and its fp16 weights, on the CPU: the classifier and the image
    features come out fp32, unit-norm, finite and close to fp32's, and a whole run scores."""
    half = lambda device, precision: (
        torch.autocast("cpu", dtype=torch.float16) if precision == "amp" else nullcontext()
    )
    monkeypatch.setattr(zeroshot, "autocast", half)
    cpu, data = torch.device("cpu"), zeroshot.load_dataset(tiny_data)
    model, ref = (zeroshot.load_clip(tiny_ckpt, cpu, p) for p in (precision, "fp32"))
    assert (model.visual.conv1.weight.dtype == torch.float16) == (precision == "fp16")
    w, w32 = (zeroshot.zeroshot_classifier(m, data["classnames"], zeroshot.TEMPLATES_SELECT)
              for m in (model, ref))  # fmt: skip
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(len(w)))
    torch.testing.assert_close(w, w32, atol=2e-3, rtol=0)
    loader = zeroshot.make_loader(data["test"], zeroshot.test_transform(32), 5, 0, cpu)
    f, _ = zeroshot.encode_images(model.encode_image, loader, cpu, precision)
    f32, _ = zeroshot.encode_images(ref.encode_image, loader, cpu, "fp32")
    assert f.dtype == torch.float32 and torch.isfinite(f).all()
    torch.testing.assert_close(f, f32, atol=2e-3, rtol=0)
    argv = ["--backbone", tiny_ckpt, "--data", tiny_data, "--ensemble", "select", "--precision"]
    m = zeroshot.main(
        zeroshot.parse_args(argv + [precision, "--workers", "0", "--out", str(tmp_path)])
    )
    assert m["precision"] == precision and all(math.isfinite(a) for a in m["accuracy"].values())
