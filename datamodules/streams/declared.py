"""A stream that declares its samples: the fields in order, and its zero-shot prompts.

Avalanche's scenarios yield positional tuples (``[x, y, t]``) and know nothing of prompts.
A Mneme stream factory returns a :class:`DeclaredStream`: the Avalanche scenario plus the
names of its sample fields (``label`` second, where Avalanche's generators keep the class)
and, for captioned streams, the class names and prompt templates of zero-shot evaluation.
The datamodule reads the fields from here, so a config names them nowhere (a
``data.sample_keys`` that contradicts them is refused), and an aligner takes its prompts
from here, not from attributes set on Avalanche objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# What Avalanche's classic benchmarks yield: input, class, task label.
AVALANCHE_FIELDS = ("image", "label", "task")


@dataclass(frozen=True)
class DeclaredStream:
    """An Avalanche scenario with the declaration of its samples.

    Args:
        scenario: the Avalanche scenario (``train_stream``, ``test_stream``).
        fields: the names of a sample's fields, in order; ``label`` is the class index,
            ``task`` (last) may be absent, then 0.
        class_names: one name per class index, for zero-shot prompts (``None``: none).
        prompt_templates: templates with ``{}`` for the class name.

    ``train_stream``/``test_stream`` are the scenario's, so code written for an Avalanche
    scenario (an Avalanche strategy, a plain loop) runs on it unchanged.

    Example::

        return DeclaredStream(scenario, fields=("image", "label", "text", "task"),
                              class_names=["zero", "one"], prompt_templates=["a {}"])
    """

    scenario: Any
    fields: Sequence[str] = AVALANCHE_FIELDS
    class_names: Sequence[str] | None = None
    prompt_templates: Sequence[str] = field(default=("{}",))
    # (mean, std) the images were standardized with from [0, 1] (None: served in [0, 1]); a
    # pretrained backbone undoes it before applying its own normalization.
    input_normalization: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if "label" not in self.fields:
            raise ValueError(f"fields must include 'label', got {list(self.fields)}")

    @property
    def train_stream(self):
        return self.scenario.train_stream

    @property
    def test_stream(self):
        return self.scenario.test_stream
