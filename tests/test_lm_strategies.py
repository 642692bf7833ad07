"""The continual strategies on a language model (ContinualLM on the synthetic text domains):
Replay of token blocks, EWC over the LoRA weights, TokenLwF, O-LoRA, LoRA merging; their
state in checkpoints; the general stage."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from mneme.app.core.errors import ConfigError

from tests.conftest import quiet_trainer
from tests.lm_stream import LORA, make_lm, make_stream, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return str(save_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def run(tokenizer_dir, tmp_path, callbacks, peft=LORA, seed=0, n_domains=3, **module_args):
    from mneme.callbacks.reporting.continual_metrics import ContinualMetrics

    seed_everything(seed)
    metrics = ContinualMetrics(print_table=False)
    datamodule = make_stream(n_domains=n_domains)
    module = make_lm(tokenizer_dir, peft=peft, lr=3e-2, **module_args)
    trainer = quiet_trainer(datamodule, tmp_path, callbacks=[metrics, *callbacks])
    trainer.fit(module, datamodule)
    return module, metrics, trainer


def lora_weights(module, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.lm.named_parameters() if f".{adapter}." in n}


def test_replay_keeps_token_blocks_per_domain_and_appends_them(tokenizer_dir, tmp_path):
    from mneme.callbacks.strategies.replay import Replay

    replay = Replay(buffer_size=12, policy="class_balanced", replay_batch_size=4)
    module, _, _ = run(tokenizer_dir, tmp_path, [replay])
    # class_balanced over the domain label: an equal share of blocks per domain
    assert replay.buffer["label"].bincount().tolist() == [4, 4, 4]
    assert set(replay.buffer) >= {"input_ids", "labels", "attention_mask", "task"}
    batch = {k: v[:2] for k, v in replay.buffer.items()}
    grown = replay.replay(batch, 0)
    assert len(grown["input_ids"]) == 6 and grown["input_ids"].shape[1] == 16


def test_ewc_covers_only_the_lora_weights_and_pulls_them_back(tokenizer_dir, tmp_path):
    from mneme.callbacks.strategies.ewc import EWC

    ewc = EWC(ewc_lambda=100.0)
    module, _, _ = run(tokenizer_dir, tmp_path, [ewc], n_domains=2)
    assert ewc.names and all("lora_" in n for n in ewc.names)
    assert len(ewc.fishers) == 2 and all(torch.isfinite(f).all() for f in ewc.fishers)
    assert ewc.fishers[0].sum() > 0  # a next-token NLL Fisher, not zeros
    batch = next(iter(make_stream(n_domains=2).train_experiences[0].batches(4)))
    outputs = {"logits": module(batch["input_ids"])}
    assert ewc.penalty(batch, outputs) >= 0


def test_token_lwf_distils_toward_the_previous_model(tokenizer_dir, tmp_path):
    from mneme.callbacks.strategies.token_lwf import TokenLwF

    lwf = TokenLwF(alpha=1.0, temperature=2.0)
    module, _, _ = run(tokenizer_dir, tmp_path, [lwf], n_domains=2)
    assert lwf.teacher is not None and lwf.experience == 1
    batch = next(iter(make_stream(n_domains=2).train_experiences[1].batches(4)))
    module.eval()
    with torch.no_grad():
        outputs = {"logits": module(batch["input_ids"], batch["attention_mask"])}
        loss = lwf.distillation(batch, outputs)
        # the teacher against itself: no divergence
        own = {"logits": lwf.teacher(input_ids=batch["input_ids"]).logits}
        assert lwf.distillation(batch, own).abs() < 1e-5
    assert loss > 0


def test_olora_adds_a_frozen_adapter_per_domain_and_keeps_them_orthogonal(tokenizer_dir, tmp_path):
    from mneme.callbacks.strategies.olora import OLoRA

    seed_everything(0)
    olora = OLoRA(orthogonal_lambda=10.0)
    module, _, trainer = run(tokenizer_dir, tmp_path, [olora])
    assert module.lora_adapter_names() == ["default", "olora_1", "olora_2"]
    assert module.frozen_adapters == {"default", "olora_1"}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".olora_2." in n for n in trainable)
    assert len(trainer.optimizers[0].param_groups) == 3
    # The penalty it trained against is small next to two unconstrained adapters'.
    layer = module.lora_layers()[0]
    new, old = layer.lora_A["olora_2"].weight, layer.lora_A["default"].weight
    overlap = (new @ old.T).square().sum()
    assert overlap < 0.5 * (new.norm() * old.norm()) ** 2


def test_olora_needs_lora(tokenizer_dir, tmp_path):
    from mneme.callbacks.strategies.olora import OLoRA

    with pytest.raises(ConfigError, match="OLoRA needs model.peft"):
        run(tokenizer_dir, tmp_path, [OLoRA()], peft=None, n_domains=1)


def test_lora_merging_folds_each_domain_into_the_weights(tokenizer_dir, tmp_path):
    from mneme.callbacks.strategies.lora_merging import LoRAMerging

    merging = LoRAMerging(mode="fold")
    module, _, _ = run(tokenizer_dir, tmp_path, [merging], n_domains=2)
    assert merging.merged == [0, 1]
    layer = module.lora_layers()[0]
    assert layer.lora_B["default"].weight.abs().sum() == 0  # restarted after the fold
    seed_everything(0)
    fresh = make_lm(tokenizer_dir)
    fresh._build(len(fresh.tokenizer))
    base = layer.get_base_layer().weight
    fresh_base = fresh.lora_layers()[0].get_base_layer().weight
    assert not torch.equal(base, fresh_base)  # the updates are in the weights now


def test_lora_merging_average_is_the_mean_of_the_domains_adapters(tokenizer_dir, tmp_path):
    from mneme.callbacks.strategies.lora_merging import LoRAMerging

    merging = LoRAMerging(mode="average")
    ends: list[dict] = []

    class Record(LoRAMerging):  # the adapter each domain ends with, before the average
        def on_experience_end(self, trainer, pl_module, experience):
            ends.append(lora_weights(pl_module, "default"))

    module, _, _ = run(tokenizer_dir, tmp_path, [Record(), merging], n_domains=2)
    final = lora_weights(module, "default")
    for name, value in final.items():
        assert torch.allclose(value, (ends[0][name] + ends[1][name]) / 2, atol=1e-6)


def test_per_task_adapters_route_each_row_through_its_domains(tokenizer_dir, tmp_path):
    per_task = {**LORA, "adapters": "per_task"}
    module, _, _ = run(tokenizer_dir, tmp_path, [], peft=per_task, n_domains=2)
    assert module.lora_adapter_names() == ["task_0", "task_1"]
    assert module.hparams.num_tasks == 2
    # each adapter trained on its own domain only: both moved from LoRA's B = 0
    for name in ("task_0", "task_1"):
        assert any(w.abs().sum() > 0 for w in lora_weights(module, name).values()
                   if w.shape[1] == 4)  # fmt: skip
    batch = next(iter(make_stream(n_domains=2).test_experiences[0].batches(2)))
    module.eval()
    with torch.no_grad():
        own = module(batch["input_ids"], task=torch.tensor([0, 0]))
        other = module(batch["input_ids"], task=torch.tensor([0, 1]))
    assert torch.equal(own[0], other[0]) and not torch.allclose(own[1], other[1])


def test_general_stage_trains_the_base_then_only_the_adapters(tokenizer_dir, tmp_path):
    seen: list[tuple[bool, bool]] = []
    from lightning.pytorch import Callback

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            base = any(
                p.requires_grad
                for n, p in pl_module.lm.named_parameters()
                if not pl_module.is_adapter_parameter(n)
            )
            adapters = any(p.requires_grad for n, p in pl_module.lm.named_parameters()
                           if pl_module.is_adapter_parameter(n))  # fmt: skip
            seen.append((base, adapters))

    run(tokenizer_dir, tmp_path, [Watch()], n_domains=2, general_experiences=1)
    half = len(seen) // 2
    assert set(seen[:half]) == {(True, False)} and set(seen[half:]) == {(False, True)}


# -- a SIGKILL and a resume through the CLI give the same perplexity matrix ------------------
RESUME_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  deterministic: true
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: logs, name: {name}}}
model:
  class_path: mneme.app.ContinualLM
  init_args:
    model_config: {model_config}
    tokenizer: {tokenizer}
    peft: {peft}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {{lr: 0.03}}
data:
  benchmark: tests.lm_stream.SyntheticTextDomains
  benchmark_args: {{n_domains: 3}}
  epochs_per_experience: 2
  batch_size: 16
  eval_batch_size: 16
"""
RESUME_CASES = {
    # O-LoRA's adapters (recreated before the weights load) and optimizer groups, Replay's
    # buffer: killed inside experience 2, after its adapter was added
    "olora_replay": (
        ["--trainer.callbacks+=mneme.callbacks.OLoRA",
         "--trainer.callbacks+=mneme.callbacks.Replay",
         "--trainer.callbacks.init_args.buffer_size", "12"],
        ["--trainer.callbacks.init_args.epoch", "4", "--trainer.callbacks.init_args.batch", "1"],
    ),
    # EWC's Fisher and the folded LoRA: killed after experience 1's end work, before its
    # checkpoint
    "ewc_merging": (
        ["--trainer.callbacks+=mneme.callbacks.EWC",
         "--trainer.callbacks.init_args.ewc_lambda", "10",
         "--trainer.callbacks+=mneme.callbacks.LoRAMerging"],
        ["--trainer.callbacks.init_args.epoch", "3",
         "--trainer.callbacks.init_args.hook", "train_epoch_end"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_sigkill_mid_domain_then_resume_gives_the_same_perplexity_matrix(
    tokenizer_dir, tmp_path, case
):
    import json
    import signal

    import tests.killer  # noqa: F401 - imported: the CLI takes its class
    from tests.conftest import mneme_in_fork, mneme_in_process
    from tests.lm_stream import TINY_LLAMA  # imported: the stream is registered (@stream)

    strategy, kill = RESUME_CASES[case]

    def fit(name: str, *extra: str, killed: bool = False):
        config = tmp_path / f"{name}.yaml"
        config.write_text(RESUME_CONFIG.format(
            name=name, model_config=json.dumps(TINY_LLAMA), tokenizer=tokenizer_dir,
            peft=json.dumps(LORA),
        ))  # fmt: skip
        args = ["fit", "--config", str(config), *strategy, *extra]
        return (mneme_in_fork if killed else mneme_in_process)(args, tmp_path)

    def matrix(name: str) -> list[float]:
        path = tmp_path / "logs" / name / "version_0" / "continual_metrics.json"
        rows = json.loads(path.read_text())["perplexity_matrix"]
        assert len(rows) == 3
        return [p for row in rows for p in row]

    reference = fit("reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = fit("resumed", "--trainer.callbacks+=tests.killer.KillAt", *kill, killed=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = tmp_path / "logs" / "resumed" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    resumed = fit("resumed", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert matrix("resumed") == pytest.approx(matrix("reference"), rel=1e-6)
