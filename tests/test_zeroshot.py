"""Zero-shot CLIP: templates, ensembles, and the command line."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import zeroshot


def test_template_tables():
    assert len(zeroshot.TEMPLATES_SELECT) == 7 and len(zeroshot.TEMPLATES_80) == 80
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
