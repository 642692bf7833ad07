"""``model.compile``: torch.compile of the encoders and the strategies' loss terms, without
graph breaks in the strategies and without a recompile at every step or experience; the
fused-optimizer rule. Compiled with a counting ``eager``-like backend (no codegen), so these
run on a CPU in seconds."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from lightning.pytorch import Callback, seed_everything
from mneme.app import ContinualClassifier
from mneme.app.models.base import compile_options, prefer_fused, rebuild_fused
from mneme.callbacks import EWC, ContinualMetrics, LwF, Replay
from mneme.datamodules import ConfigError, ContinualDataModule
from torch._dynamo.utils import counters

from tests.conftest import digits_stream, quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts the graphs it
    was given: one per compile or recompile."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compile_option_values_and_bad_ones_name_the_field():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {"loss_terms": True}
    opts = compile_options({"mode": "max-autotune", "fullgraph": False, "dynamic": False})
    assert opts == {
        "loss_terms": True,
        "mode": "max-autotune",
        "fullgraph": False,
        "dynamic": False,
    }
    with pytest.raises(ConfigError, match=r"^model\.compile: unknown key\(s\) \['modee'\]"):
        ContinualClassifier(compile={"modee": "default"})
    with pytest.raises(ConfigError, match=r"^model\.compile\.mode: one of .*'fast'"):
        ContinualClassifier(compile={"mode": "fast"})
    with pytest.raises(ConfigError, match=r"^model\.compile: true, false or a dict"):
        ContinualClassifier(compile="yes")
    with pytest.raises(ConfigError, match=r"^model\.compile: give mode or options"):
        ContinualClassifier(compile={"mode": "default", "options": {"triton.cudagraphs": True}})


def _fit(compile_arg, n_experiences: int = 5):
    """Replay + EWC + LwF over class-incremental digits; the graphs compiled so far at each
    experience end, the accuracy rows, the trained module."""
    seed_everything(0, verbose=False)
    data = ContinualDataModule(**digits_stream(n_experiences), batch_size=128)
    model = ContinualClassifier(
        encoder="mneme_mlp", encoder_args={"hidden": [16]}, compile=compile_arg
    )
    backend = compile_arg["backend"] if compile_arg else None
    graphs: list[int] = []

    class Graphs(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            graphs.append(backend.graphs if backend else 0)

    metrics = ContinualMetrics(print_table=False)
    callbacks = [Graphs(), metrics, Replay(buffer_size=50), EWC(10.0), LwF()]
    quiet_trainer(data, callbacks=callbacks, log_every_n_steps=1).fit(model, data)
    return graphs, metrics.rows, model


def test_compiled_training_matches_eager_without_breaks_or_per_experience_recompiles():
    backend = CountingBackend()
    graphs, rows, model = _fit({"backend": backend})
    # The encoder and both loss terms went through dynamo, and nothing broke a graph.
    assert model.encoder._compiled_call_impl is not None
    assert set(model._compiled_terms) == {"ewc", "lwf"}
    assert not counters["graph_break"], dict(counters["graph_break"])
    # New classes (the head mask), a new teacher, a new Fisher and replayed rows compile a
    # few graphs in the first experiences (shapes, None -> tensor), then none: the last
    # experiences run on the graphs already made.
    assert graphs[0] > 0 and graphs[-1] == graphs[2], graphs
    # The same run in eager mode gives the same accuracy matrix; parameter names are
    # unchanged (nn.Module.compile in place: checkpoints load either way).
    eager_graphs, eager_rows, eager_model = _fit(False)
    assert eager_graphs[-1] == 0
    assert torch.tensor(rows) == pytest.approx(torch.tensor(eager_rows), abs=1e-6)
    assert list(model.state_dict()) == list(eager_model.state_dict())


def _classifier_with_data():
    torch.manual_seed(0)
    model = ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [8]},
        num_classes=4,
        num_tasks=1,
        input_shape=(1, 2, 2),
    )
    data = {
        "image": torch.randn(32, 1, 2, 2),
        "label": torch.arange(32) % 4,
        "task": torch.zeros(32, dtype=torch.long),
    }
    return model, data


def _breaks(fn, *args) -> int:
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count


@pytest.mark.parametrize("decoupled", [True, False])
def test_ewc_penalty_traces_without_graph_breaks(decoupled):
    model, data = _classifier_with_data()
    ewc = EWC(ewc_lambda=5.0, decoupled=decoupled)
    ewc.update(model, data, experience=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # away from the anchor: a non-zero penalty
    outputs = {"logits": model(data["image"][:8])}
    eager = ewc.penalty(data, outputs)
    assert eager.item() > 0
    assert _breaks(ewc.penalty, data, outputs) == 0
    compiled = torch.compile(ewc.penalty, backend="eager")(data, outputs)
    torch.testing.assert_close(compiled, eager)


def test_replay_concatenation_and_lwf_trace_without_graph_breaks():
    model, data = _classifier_with_data()
    replay = Replay(buffer_size=10, seed=0, mark_current_rows=True)
    replay.update(data, 0)
    batch = {key: value[:8] for key, value in data.items()}
    index = replay.sample(8, 0, 0, 0)  # the host-side draw, seeded per step
    assert _breaks(replay.append, batch, index) == 0
    appended = replay.append(batch, index)
    assert len(appended["image"]) == 16 and int(appended["current_rows"]) == 8

    lwf = LwF(alpha=1.0, temperature=2.0)
    lwf.set_teacher(model, experience=1, previous_classes=torch.tensor([[1, 1, 0, 0]]).bool())
    with torch.no_grad():
        model.head.weight.add_(0.5)  # the student moved away from the teacher
    features = model.features(batch["image"])
    outputs = {"logits": model.linear_logits(features), "features": features}
    assert lwf.distillation(batch, outputs).item() > 0
    assert _breaks(lwf.distillation, batch, outputs) == 0


def test_feature_distillation_traces_without_graph_breaks_and_aligner_towers_compile():
    from mneme.app.models.aligner import ContrastiveAligner
    from mneme.callbacks import FeatureDistillation

    torch.manual_seed(0)
    module = ContrastiveAligner(
        encoders={"image": {"model": "mneme_mlp", "args": {"hidden": [8]}}, "text": {}},
        embed_dim=8,
        input_shapes={"image": (1, 8, 8), "text": (16,)},
        num_classes=3,
        compile={"backend": "eager"},
    )
    module.set_prompts(["zero", "one", "two"], ["a {}"])
    # The image tower only: tracing the text tower too (prompt_alpha) takes seconds; it
    # was checked once to trace without a break as well.
    distill = FeatureDistillation(alpha=1.0)
    distill.set_teacher(module, experience=1)
    batch = {"image": torch.randn(4, 1, 8, 8), "label": torch.tensor([0, 1, 2, 0])}
    with torch.no_grad():
        for p in module.encoders["image"].parameters():
            p.add_(0.05)
    outputs = {"embeddings": module.embed(batch, ["image"])}
    assert distill.distillation(batch, outputs).item() > 0
    assert _breaks(distill.distillation, batch, outputs) == 0
    module.configure_model()  # what Lightning calls after setup
    assert all(tower._compiled_call_impl is not None for tower in module.encoders.values())


def test_fused_optimizer_only_on_cuda_and_rebuilt_with_the_same_groups():
    w, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3))
    groups = [{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lr_scale": 0.5}]
    adamw = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    assert prefer_fused(adamw) is adamw  # CPU parameters: left alone
    # The rebuild itself (CPU has a fused AdamW kernel too): same groups, same update.
    fused = rebuild_fused(adamw)
    assert fused is not adamw and fused.defaults["fused"] is True
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    assert fused.param_groups[1]["lr_scale"] == 0.5
    w2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (w, b))
    reference = torch.optim.AdamW(
        [{"params": [w2]}, {"params": [b2], "weight_decay": 0.0}], lr=0.1, weight_decay=0.1
    )
    for p, q in ((w, w2), (b, b2)):
        p.grad = q.grad = torch.ones_like(p)
    fused.step()
    reference.step()
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(b, b2)
    # A config that chose foreach (or fused) keeps its choice.
    chosen = torch.optim.AdamW([w], lr=0.1, foreach=True)
    assert rebuild_fused(chosen) is chosen
