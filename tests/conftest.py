"""Fixtures: tiny random CLIPs saved as users' checkpoints are, tiny image folders made with PIL."""

import json
import os
import sys
import warnings

import pytest

# One thread per process: the tests' tiny models gain nothing from more, and on a 2-core machine
# shared with other work (or the demo's two workers) extra threads only wait for each other. Set
# before torch is imported, so that the command-line runs the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip  # noqa: E402

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (150, 50, 200),
    "orange": (240, 140, 30),
}


def tiny_clip(vit=False, seed=0, context_length=77):
    """A random CLIP small enough for CPU tests; text width 64 so that build_model infers 1 head."""
    torch.manual_seed(seed)
    model = clip.model.CLIP(
        embed_dim=32,
        image_resolution=32,
        vision_layers=2 if vit else (1, 1, 1, 1),
        vision_width=64 if vit else 8,
        vision_patch_size=16 if vit else None,
        context_length=context_length,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=2,
    )
    return model.requires_grad_(False).eval()  # frozen, as load_clip returns it


def draw(path, colour, mode="RGB", size=40):
    image = Image.new("RGB", (size, size), COLOURS.get(colour, (128, 128, 128)))
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)


def make_image_folder(root, classes, per_class, modes=("RGB",)):
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            draw(os.path.join(root, c, f"{i}.png"), c, mode=modes[i % len(modes)])


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny ResNet CLIP saved as a plain state dict (the file kind clip.load cannot read)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_rn.pt"
    torch.save(tiny_clip().state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_vit_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_vit.pt"
    torch.save(tiny_clip(vit=True).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """ImageFolder dataset: 4 colour classes, train 6 / test 3 per class, some images not RGB."""
    root = tmp_path_factory.mktemp("data") / "colours"
    classes = ["red", "green", "blue", "yellow"]
    make_image_folder(root / "train", classes, 6, modes=("RGB", "L", "RGBA", "P"))
    make_image_folder(root / "test", classes, 3)
    return str(root)


@pytest.fixture(scope="session")
def shifted_data(tmp_path_factory):
    """A second test set (a 'shifted domain') with the same classes, for --eval-data."""
    root = tmp_path_factory.mktemp("data") / "colours_small"
    make_image_folder(root, ["red", "green", "blue", "yellow"], 2)
    return str(root)


@pytest.fixture(scope="session")
def split_data(tmp_path_factory):
    """A CoOp split file over an image root, with underscores in class names."""
    root = tmp_path_factory.mktemp("data") / "splitset"
    images = root / "images"
    classes = ["red", "green", "blue", "yellow", "purple", "orange"]
    split = {"train": [], "val": [], "test": []}
    for label, c in enumerate(classes):
        os.makedirs(images / c, exist_ok=True)
        for i in range(5):
            draw(images / c / f"{i}.jpg", c)
            part = "train" if i < 3 else "val" if i == 3 else "test"
            split[part].append([f"{c}/{i}.jpg", label, f"{c}_thing"])
    with open(root / "split_zhou_Colours.json", "w") as f:
        json.dump(split, f, indent=4)
    return str(images), str(root / "split_zhou_Colours.json")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The toy world (slow tests only): built once per test session in a temporary folder, or the
    world already built at $TOYWORLD (e.g. TOYWORLD=toy). Returns (root, world.json's record)."""
    import toyworld

    root = os.environ.get("TOYWORLD") or str(tmp_path_factory.mktemp("toy"))
    return root, toyworld.build_world(root)
