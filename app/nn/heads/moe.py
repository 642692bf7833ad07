"""A mixture-of-experts head: top-k gating over expert MLPs with a load-balancing loss,
and, for streams, experts added per experience with the old ones frozen.

Routing (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021):
a linear gate gives each sample a softmax over the ``E`` experts; the sample goes to its
``top_k`` most probable experts, whose outputs are summed with the gate probabilities as
weights (renormalized over the chosen ``k`` with ``normalize_top_k``, as GShard's top-2 and
Mixtral do). Only the chosen experts run on a sample (a sparse dispatch per expert,
``index_add_``), so the compute grows with ``k``, not ``E``.

The load-balancing loss is Switch's ``E * sum_i f_i * P_i``, where ``f_i`` is the fraction
of routing slots (samples x ``k``) sent to expert ``i`` and ``P_i`` the mean gate
probability of expert ``i`` over the batch: 1.0 when routing is uniform, ``E`` when every
sample goes to one expert (top-1). It is added to the training loss through the module's
``loss_terms`` extension point (``train/loss_moe_balance``), times ``balance_weight``.

Streams (``experts_per_experience: n``; the idea of MoE-Adapters, Yu et al., CVPR 2024):
experience 0 trains ``num_experts`` experts; each later experience adds ``n`` experts and
their gate rows and freezes the earlier ones (``freeze_old``), so what an old expert learnt
cannot be overwritten; the gate still chooses among all of them. Experts of one experience
are one *generation*, with their own optimizer parameter group (added to the running
optimizer when the generation is created); a resumed run rebuilds as many generations as
its checkpoint holds before the weights load (:meth:`MoEHead.restore`). Frozen gate rows do
not stop the new rows from drawing old classes' samples to the new experts: MoE-Adapters
adds a distribution discriminator for that; here replay keeps the gate honest.

The routing distribution of each experience's training samples is logged at its end:
``moe/expert_<i>_fraction`` (x-axis = experience) and the histogram ``moe/routing``.

Example (YAML)::

    model:
      class_path: mneme.app.ContinualClassifier
      init_args:
        encoder: mneme_mlp
        head: {name: moe, num_experts: 4, top_k: 2, hidden: 128, balance_weight: 0.01,
               experts_per_experience: 2}     # 0: a fixed set of experts
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from mneme.app.core.errors import ConfigError
from torch import Tensor, nn

MOE = "moe"
BALANCE_OUTPUT = "moe_balance"  # the key of the training outputs the loss term reads
FIELD = "model.head"


def _distributed() -> bool:
    """Whether this process is one of several of an initialized process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Expert(nn.Module):
    """``Linear -> GELU -> Linear``: one expert MLP."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def balance_loss(probs: Tensor, chosen: Tensor, num_experts: int) -> Tensor:
    """Switch's load-balancing loss ``E * sum_i f_i * P_i`` from the gate probabilities
    ``probs`` ``(N, E)`` and the chosen experts ``chosen`` ``(N, k)``; ``f_i`` counts the
    routing slots (GShard's top-k generalization: each of the ``k`` choices is a slot)."""
    if chosen.numel() == 0:  # an empty batch: nothing to balance
        return probs.sum() * 0
    slots = F.one_hot(chosen, num_experts).sum(dim=(0, 1)).to(probs.dtype)
    fraction = slots / chosen.numel()  # f_i: not differentiable (an argmax count)
    return num_experts * (fraction * probs.mean(dim=0)).sum()


class MoEHead(nn.Module):
    """Top-k routed expert MLPs ``in_dim -> out_dim`` (see the module docstring).

    Args:
        in_dim, out_dim: feature width in, logits out.
        num_experts: experts of experience 0 (all of them without ``experts_per_experience``).
        top_k: experts each sample is routed to (1 <= top_k <= num_experts).
        hidden: width of each expert's hidden layer.
        experts_per_experience: experts added at each later experience (0: none).
        freeze_old: freeze the earlier generations' experts and gate rows when adding.
        balance_weight: weight of the load-balancing loss in the training loss.
        normalize_top_k: renormalize the chosen experts' weights to sum to 1.
        dropout: dropout inside each expert.
    """

    # its config keys (``model.head``), checked by the head registry
    spec_keys: ClassVar[tuple[str, ...]] = (
        "num_experts", "top_k", "hidden", "experts_per_experience", "freeze_old",
        "balance_weight", "normalize_top_k", "dropout",
    )  # fmt: skip

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_experts: int = 4,
        top_k: int = 2,
        hidden: int = 128,
        experts_per_experience: int = 0,
        freeze_old: bool = True,
        balance_weight: float = 0.01,
        normalize_top_k: bool = True,
        dropout: float = 0.0,
        field: str = FIELD,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_experts", num_experts, 1),
            ("top_k", top_k, 1),
            ("hidden", hidden, 1),
            ("experts_per_experience", experts_per_experience, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{field}.{name}: must be an integer >= {low}, got {value!r}")
        if top_k > num_experts:
            raise ConfigError(
                f"{field}.top_k: {top_k} is more than num_experts ({num_experts}); each "
                "sample goes to top_k distinct experts: lower top_k or add experts"
            )
        if balance_weight < 0:
            raise ConfigError(f"{field}.balance_weight: must be >= 0, got {balance_weight}")
        self.in_dim, self.out_dim, self.hidden, self.dropout = in_dim, out_dim, hidden, dropout
        self.top_k = top_k
        self.num_initial = num_experts
        self.experts_per_experience = experts_per_experience
        self.freeze_old = freeze_old
        self.balance_weight = balance_weight
        self.normalize_top_k = normalize_top_k
        self.experts = nn.ModuleList()
        self.gates = nn.ModuleList()  # one Linear(in_dim, experts of the generation) each
        self.register_buffer("routing_counts", torch.zeros(0))  # this experience's slots
        self.last_balance_loss: Tensor | None = None
        self._last_counts: Tensor | None = None
        # parameters made after DDP wrapped the model (see start_experience)
        self._outside_ddp: list[nn.Parameter] = []
        self.grow_to(1)

    # -- generations ----------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def num_generations(self) -> int:
        return len(self.gates)

    def generation_parameters(self, generation: int) -> list[nn.Parameter]:
        """The parameters of one generation: its experts and its gate rows."""
        start = sum(g.out_features for g in self.gates[:generation])
        size = self.gates[generation].out_features
        experts = self.experts[start : start + size]
        return [*self.gates[generation].parameters(), *experts.parameters()]

    def grow_to(self, generations: int) -> list[list[nn.Parameter]]:
        """Add generations until there are ``generations`` (idempotent), freezing the older
        ones with ``freeze_old``; returns the parameters of each generation added."""
        added = []
        device = self.routing_counts.device
        while self.num_generations < generations:
            size = self.num_initial if self.num_generations == 0 else self.experts_per_experience
            if self.freeze_old:
                for p in self.parameters():
                    p.requires_grad_(False)
            self.gates.append(nn.Linear(self.in_dim, size, bias=False).to(device))
            for _ in range(size):
                expert = Expert(self.in_dim, self.hidden, self.out_dim, self.dropout)
                self.experts.append(expert.to(device))
            self.routing_counts = torch.cat([self.routing_counts, torch.zeros(size, device=device)])
            added.append(self.generation_parameters(self.num_generations - 1))
        return added

    def generations_for(self, experience: int) -> int:
        """How many generations experience ``experience`` trains with."""
        return 1 + experience if self.experts_per_experience else 1

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer parameter group per generation, frozen ones included, so that the
        groups of a resumed run match those its checkpoint's optimizer state was saved with."""
        return [{"params": self.generation_parameters(g)} for g in range(self.num_generations)]

    def restore(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Rebuild the generations a checkpoint's ``state_dict`` holds (keys ``prefix +
        'gates.<g>.weight'``) before it loads."""
        pattern = re.compile(re.escape(prefix) + r"gates\.(\d+)\.weight")
        found = [int(m.group(1)) for k in state_dict if (m := pattern.fullmatch(k))]
        if found:
            self.grow_to(max(found) + 1)

    # -- routing --------------------------------------------------------------------------
    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gate probabilities ``(N, E)``, the chosen experts ``(N, k)`` and their weights."""
        probs = torch.cat([gate(x) for gate in self.gates], dim=-1).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, chosen, weights

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        probs, chosen, weights = self.route(x)
        if torch.compiler.is_exporting():  # torch.export / ONNX: no data-dependent shapes
            return self._dense(x, probs, chosen, weights).view(*shape, self.out_dim)
        out = None
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            y = expert(x[rows]) * weights[rows, slot, None].to(x.dtype)
            if out is None:
                out = y.new_zeros(len(x), self.out_dim)
            out = out.index_add(0, rows, y.to(out.dtype))
        if out is None:  # an empty batch
            out = x.new_zeros(0, self.out_dim)
        self.last_balance_loss = balance_loss(probs, chosen, self.num_experts)
        self._last_counts = F.one_hot(chosen, self.num_experts).sum(dim=(0, 1)).detach()
        return out.view(*shape, self.out_dim)

    def _dense(self, x: Tensor, probs: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
        """The same sum as the sparse dispatch, every expert run on every sample with a
        weight of 0 where it was not chosen: the traceable form an export records."""
        dense = torch.zeros_like(probs).scatter(1, chosen, weights.to(probs.dtype))
        outputs = torch.stack([expert(x) for expert in self.experts], dim=1)  # (N, E, out)
        return (outputs * dense.to(outputs.dtype).unsqueeze(-1)).sum(dim=1)

    def step_outputs(self) -> dict[str, Tensor]:
        """What the training step's outputs carry from the head's last forward (the
        load-balancing loss, for the loss term); counts that step's routing. The host
        calls it once per step, right after its own forward, so forwards that strategies
        run later (DER on buffer samples, LwF's teacher) change neither."""
        if self._last_counts is not None:
            self.routing_counts += self._last_counts.to(self.routing_counts)
        return {BALANCE_OUTPUT: self.last_balance_loss}

    # -- the host's hooks (mneme.app.nn.heads.lifecycle.HeadLifecycle) --------------------
    def add_loss_terms(self, module: Any) -> None:
        """Register the load-balancing loss as the module's loss term ``moe_balance`` (once);
        the term reads the loss the training step's outputs carry."""
        if BALANCE_OUTPUT in module.loss_terms:
            return

        def term(batch: dict[str, Any], outputs: dict[str, Any]) -> Tensor:
            return self.balance_weight * outputs[BALANCE_OUTPUT]

        module.add_loss_term(BALANCE_OUTPUT, term)

    def start_experience(self, experience: int, optimizers: Sequence[Any], first_epoch: bool):
        """Grow to the generations ``experience`` needs (each new one becomes a parameter
        group of the running optimizer); clear the routing counts at its first epoch."""
        for params in self.grow_to(self.generations_for(experience)):
            for optimizer in optimizers[:1]:
                optimizer.add_param_group({"params": params})
            if _distributed():
                # DDP registered the parameters it wrapped at the start of the fit; a
                # generation made since is not among them: its gradients would stay each
                # rank's own, and the ranks' experts drift apart (a run resumed here, whose
                # DDP wraps them, would then differ from the uninterrupted one). Start them
                # equal and average their gradients as DDP would (average_outside_ddp).
                for p in params:
                    torch.distributed.broadcast(p.data, src=0)
                self._outside_ddp += params
        if first_epoch:
            self.routing_counts.zero_()

    def average_outside_ddp(self) -> None:
        """Average the gradients of the generations made after DDP wrapped the model over
        the ranks, as DDP's reducer averages the others (with unused-parameter detection: a
        rank that did not use a parameter adds zeros; unused on every rank, its gradient
        stays ``None``). The host calls it before each optimizer step, on every rank."""
        params = [p for p in self._outside_ddp if p.requires_grad]
        if not params or not _distributed():
            return
        used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        # divided before the sum, as DDP's reducer does: the same bits as its average
        flat = torch.cat([g.flatten() for g in grads]) / torch.distributed.get_world_size()
        torch.distributed.all_reduce(used)
        torch.distributed.all_reduce(flat)
        chunks = flat.split([p.numel() for p in params])
        for p, chunk, count in zip(params, chunks, used.tolist(), strict=True):
            if count > 0:
                p.grad = chunk.view_as(p).clone()

    def routing_fractions(self) -> Tensor:
        """Fraction of the running experience's routing slots each expert got."""
        total = self.routing_counts.sum()
        return self.routing_counts / total if total > 0 else self.routing_counts.clone()

    def log_routing(self, loggers: Sequence[Any], experience: int) -> None:
        """``moe/expert_<i>_fraction`` at step ``experience``, and the TensorBoard histogram
        ``moe/routing`` of the slots per expert index."""
        fractions = self.routing_fractions().cpu()
        scalars = {f"moe/expert_{i}_fraction": float(f) for i, f in enumerate(fractions)}
        counts = self.routing_counts.detach().cpu().double()
        index = torch.arange(len(counts), dtype=torch.float64)
        for logger in loggers:
            logger.log_metrics(scalars, step=experience)
            experiment = getattr(logger, "experiment", None)
            if counts.sum() > 0 and hasattr(experiment, "add_histogram_raw"):
                experiment.add_histogram_raw(  # exact buckets: one per expert index
                    "moe/routing",
                    min=0.0,
                    max=float(len(counts) - 1),
                    num=float(counts.sum()),
                    sum=float((counts * index).sum()),
                    sum_squares=float((counts * index**2).sum()),
                    bucket_limits=(index + 0.5).tolist(),
                    bucket_counts=counts.tolist(),
                    global_step=experience,
                )
