"""The command lines on real CLIP architectures (random weights, no download): one CPU step each."""

import json

import pytest
import torch
from conftest import clip

import coop
import zeroshot

# OpenAI's configurations: embed_dim, image_resolution, vision_layers, vision_width,
# vision_patch_size, context_length, vocab_size, transformer_width, transformer_heads,
# transformer_layers
CONFIGS = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_step_on_a_real_architecture(name, tiny_data, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "clip.pt"
    # as OpenAI's files: fp16 weights
    torch.save(clip.model.CLIP(*CONFIGS[name]).half().state_dict(), path)
    m = coop.main(coop.parse_args(["--backbone", str(path), "--data", tiny_data, "--shots", "1",
        "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out",
        str(tmp_path / "coop")]))  # fmt: skip
    assert m["epochs"] == 1 and 0 <= m["accuracy"]["test"] <= 100
    ckpt = torch.load(tmp_path / "coop" / "checkpoint.pt", weights_only=True)
    # 16 context vectors of CLIP's width 512
    assert ckpt["state"]["prompt_learner.ctx"].shape == (16, 512)
    m = coop.main(coop.parse_args(["--cocoop", "--backbone", str(path), "--data", tiny_data,
        "--shots", "1", "--epochs", "1", "--workers", "0", "--out",
        str(tmp_path / "cocoop")]))  # fmt: skip
    meta = torch.load(tmp_path / "cocoop" / "checkpoint.pt", weights_only=True)["state"][
        "meta_net.0.weight"
    ]
    vis_dim = CONFIGS[name][0]
    # 1024->64->512 for RN50, 512->32->512 for ViT-B/16
    assert meta.shape == (vis_dim // 16, vis_dim)
    zeroshot.main(zeroshot.parse_args(["--backbone", str(path), "--data", tiny_data, "--workers",
        "0", "--out", str(tmp_path / "zs")]))  # fmt: skip
    assert json.loads((tmp_path / "zs" / "metrics.json").read_text())["backbone"] == str(path)
