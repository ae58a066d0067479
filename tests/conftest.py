"""Shared fixtures of the trainer tests (names prefixed ``qcs_``) and the hypothesis profiles."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# A micro network with the real structure (IR units, three token levels, ViT_base, cross
# modules, ViT_cross) that trains in seconds on 32 px images: 4x4 tokens per level.
QCS_MICRO_SET = [
    "qcs.backbone_depths=[1, 1, 1]", "qcs.backbone_widths=[8, 8, 16]",
    "qcs.backbone_size=32", "qcs.tokens_side=4", "qcs.embed_dim=16", "qcs.heads=2",
    "qcs.vit_depth=1", "qcs.mlp_ratio=2.0", "data.image_size=32", "data.synth_size=32",
    "data.cache_in_memory=true", "optim.lr=3e-3", "train.batch_size=16", "train.threads=1",
]


@pytest.fixture(scope="session")
def qcs_micro_root(tmp_path_factory):
    """A small built-in dataset (7 classes x 60 train / 20 test images, 32 px)."""
    from qcs.data import SynthParams, generate
    out = tmp_path_factory.mktemp("qcs_synth")
    return generate(out, SynthParams(seed=0, train_per_class=60, test_per_class=20, size=32))


@pytest.fixture
def qcs_micro_config(qcs_micro_root):
    """The micro config reading :func:`qcs_micro_root` (built-in data in RAF-DB layout)."""
    from qcs.config import apply_overrides, load_config
    return apply_overrides(load_config("tiny"), QCS_MICRO_SET + [
        "data.format=raf-db", f"data.root={qcs_micro_root}", "train.epochs=2"])


@pytest.fixture(scope="session")
def qcs_easy_root(tmp_path_factory):
    """A class-per-folder dataset that any working trainer separates within two epochs:
    3 classes told apart by colour tint, with random rectangles and noise as distractors
    (24 px, 48 train / 16 test images per class)."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp("qcs_easy")
    rng = np.random.default_rng(0)
    tints = np.array([[170, 60, 60], [60, 170, 60], [60, 60, 170]], dtype=np.float64)
    for split, n in (("train", 48), ("test", 16)):
        for k, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = tints[k] + rng.normal(0, 25, (24, 24, 3))
                y, x = rng.integers(0, 16, 2)
                img[y:y + 8, x:x + 8] = rng.uniform(0, 255, 3)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    root / split / name / f"{i}.png")
    return root


@pytest.fixture
def qcs_easy_config(qcs_easy_root):
    """The micro config on :func:`qcs_easy_root` (folder layout), 2 epochs."""
    from qcs.config import apply_overrides, load_config
    return apply_overrides(load_config("tiny"), QCS_MICRO_SET + [
        "data.format=folder", f"data.root={qcs_easy_root}", "train.epochs=2",
        "data.image_size=24", "qcs.backbone_size=32"])


# ---- the op suite (tests/test_ops.py) -----------------------------------------------------
def pytest_collection_modifyitems(items):
    """The emulated backend of the op suite at N >= 49 tokens is marked slow: each emulated
    launch runs a block's threads as host threads (~10 s per test there), and
    tests/test_emulated.py covers N = 49 in its own quick tests."""
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        shape = params.get("shape")
        if params.get("backend") == "emulated" and shape is not None and shape[1] >= 49:
            item.add_marker(pytest.mark.slow)


# ---- hypothesis profiles (tests/test_properties.py) --------------------------------------
# "ci": bounded and derandomized, so every CI run draws the same examples (~2 min).
# "long": fresh examples, >= 10,000 across the property tests; run by hand with
# QCS_HYPOTHESIS_PROFILE=long (or pytest --hypothesis-profile=long).
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("long", max_examples=4500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("QCS_HYPOTHESIS_PROFILE", "ci"))
