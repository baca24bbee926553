"""One node's local state, built from its `NodeConfig` alone: its data partition, the model
(one shared init from `train.seed`), the optimizer, the local trainer and the defence.

A daemon builds one `Worker`; the simulator builds one per virtual node from the same kind of
config, so the two cannot disagree on the split, the optimizer or the step size schedule.
"""

from __future__ import annotations

import copy
import math

import torch

from node.algo import distill, frl
from node.algo.aggregate.vectors import flatten, float_keys
from node.algo.security import Attack, flip_labels
from node.algo.security.trust import TrustTracker
from node.config import ConfigError, NodeConfig
from node.protocol.defence import Defence
from node.protocol.train import LocalTrainer, RoundStats, make_optimizer, restore_optimizer, round_lr, set_lr
from node.task import Checked, TaskError, TensorDataset
from node.task.images import image_task
from node.task.load import digest as task_digest
from node.task.load import load as load_task

MAX_ROLLBACKS = 3  # consecutive non-finite rounds before a node gives up with an error


class NonFinite(Exception):
    """This round made the loss or the model non-finite; `where` is the metric reason."""

    def __init__(self, where: str):
        """`where`: what became non-finite, the rollback metric's reason: `loss`, `model_after_training` or
        `model_after_mixing`."""
        super().__init__(
            f"the {where.replace('_', ' ')} became non-finite (NaN/Inf): lower optim.lr or check the data"
        )
        self.where = where


class Diverged(RuntimeError):
    """The model kept becoming non-finite (NaN/Inf) after rolling back: MAX_ROLLBACKS in a row."""


def pick_device(name: str) -> torch.device:
    """`auto`: cuda, then mps, then cpu. Chosen once; every tensor is moved explicitly.
    Raises RuntimeError for cuda on a machine without it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name} requested but CUDA is not available on this machine")
    return dev


def device_label(dev: torch.device) -> str:
    """The device as a peer record names it: cpu, mps, cuda or cuda:N."""
    return dev.type if dev.index is None or dev.type != "cuda" else f"cuda:{dev.index}"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.precision` on `device`: bf16 for `auto` on CUDA where the
    GPU has it, and for `bf16` anywhere torch autocasts it (CUDA, CPU); None (float32) otherwise.
    Raises ConfigError for bf16 on a device without it."""
    if precision == "fp32":
        return None
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if cuda_bf16 else None
    if device.type == "cuda" and not cuda_bf16:
        raise ConfigError(f"invalid config: train.precision: bf16 is not supported by {device}; use fp32")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"invalid config: train.precision: bf16 autocast is not available on {device.type}")
    return torch.bfloat16


def task_for(cfg: NodeConfig) -> Checked:
    """The task of `cfg` with its hooks checked: `cfg.task` loaded (node/task/load.py), or the
    built-in image classification of `cfg.data` and `cfg.model`. Raises TaskError, ConfigError."""
    if cfg.task is None:
        return Checked(image_task(cfg), "built-in")
    return load_task(cfg.task, cfg.task_config)


def node_data(cfg: NodeConfig, task: Checked, device: torch.device):
    """(attack, partition index, training data, (x, y, num_classes, proxy_digest, proxy_x)) of node `cfg.node_index`:
    its attack rehearsal (security.attack, or None), the partition it trains on (a sybil group trains on one member's,
    with its seed), and for a labelled task its samples and labels on `device` (labels flipped for a label-flipping
    rehearsal) with the proxy set of logit exchange; (None, None, 0, "", None) for another task. Raises ConfigError
    for bad attack parameters, TaskError for a labelled task whose train_data is not TensorDataset(x, y)."""
    sec, labelled = cfg.security, task.task.labelled
    try:
        attack = Attack(sec.attack, **sec.attack_params) if sec.attack else None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config: security.attack_params: {e}") from None
    index = cfg.node_index  # a sybil group trains on one member's partition, with its seed
    if attack is not None and attack.data_of is not None:
        index = int(attack.data_of)
        if index >= cfg.node_count:
            raise ConfigError(f"invalid config: security.attack_params.data_of must be < {cfg.node_count}")
    data = task.train_data(index, cfg.node_count, cfg.data.seed)
    if labelled is None:
        if isinstance(data, TensorDataset):  # indexed in place: on the device once
            data = TensorDataset(*(t.to(device) for t in data.tensors))
        return attack, index, data, (None, None, 0, "", None)
    if not isinstance(data, TensorDataset) or len(data.tensors) != 2:
        raise TaskError(f"task {task.ref}: a labelled task's train_data must be TensorDataset(x, y)")
    x, y = data.tensors[0].to(device), data.tensors[1].to(device)
    if attack is not None and attack.flips_labels:
        y = flip_labels(y, labelled.num_classes)
    proxy_x = labelled.proxy_x.to(device) if labelled.proxy_x is not None else None
    return attack, index, TensorDataset(x, y), (x, y, labelled.num_classes, labelled.proxy_digest, proxy_x)


OUTER = "outer/"  # the checkpoint names of the round protocol's own tensors, beside the optimizer's


class OuterState:
    """Where a round protocol's own state (DiLoCo's outer momentum) meets checkpoints and joining nodes: the protocol
    `attach`es itself (`outer_tensors(private)`, and `load_outer(tensors)`, which raises ValueError when they do not
    fit), checkpoints save `tensors()` and give back `restore(...)`, before or after the protocol exists."""

    def __init__(self):
        """Nothing attached and nothing restored yet."""
        self.holder = None
        self.pending: dict[str, torch.Tensor] = {}

    def attach(self, holder) -> None:
        """`holder` keeps the state from now on; what a checkpoint restored before it existed is loaded now. Raises
        ValueError from `load_outer`."""
        self.holder = holder
        restored, self.pending = self.pending, {}
        if restored:
            holder.load_outer(restored)

    def tensors(self, private: bool = True) -> dict[str, torch.Tensor]:
        """The holder's state (names without OUTER), {} without a holder: for a checkpoint, or with `private` False
        what a joining node may take (node/net/join.py: not this node's own error-feedback residuals)."""
        return {} if self.holder is None else self.holder.outer_tensors(private)

    def reset(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put the holder back to `tensors` (what `tensors()` gave; {} is the state before the first round)."""
        if self.holder is not None:
            self.holder.load_outer(tensors)

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """A checkpoint's state: to the holder, or kept until one attaches. Raises ValueError from `load_outer`."""
        if tensors and self.holder is not None:
            self.holder.load_outer(tensors)
        elif tensors:
            self.pending = tensors


class Worker:
    """The model, data and optimizer of node `cfg.node_index` of `cfg.node_count` on its task
    (node/task: the user's own, or the built-in image classification).

    Attributes: `task` (the checked task), `model` (on `device`), `optimizer`, `trainer`, `data`
    (this node's training samples), `task_digest` (the task's name and the shapes of the tensors
    that travel, node/task/load.py),
    `defence` (trust tracker and aggregator), `init_vector` (the shared init, flat float32).
    Classification tasks (`task.labelled`) also give `x`/`y` (the partition on `device`, labels
    flipped for a label-flipping rehearsal), `num_classes`, and for `comm.exchange: logits` the
    proxy set `proxy_x`, its `proxy_digest`, the rows this node speaks for (`proxy_rows`) and a
    momentum-free `distill_opt`. The task's hooks run once at build (a batch's loss, evaluate), so
    a broken task fails here, before the node joins. `task`: a checked task to use instead of
    the config's (node/net/peer.py hosts a model this way). Raises ConfigError, TaskError, and
    DatasetMissing for data that is not installed."""

    def __init__(self, cfg: NodeConfig, device: torch.device = torch.device("cpu"), task: Checked | None = None):
        """`cfg`: the node's NodeConfig; `device`: where the model and data live (default CPU); `task`: a checked task
        to train instead of the config's, None loads the config's. Runs the task's hooks once: raises ConfigError,
        TaskError, or DatasetMissing for data that is not installed."""
        self.cfg, self.device = cfg, device
        self.task = task or task_for(cfg)
        sec = cfg.security
        self.attack, index, self.data, labels = node_data(cfg, self.task, device)
        self.x, self.y, self.num_classes, self.proxy_digest, self.proxy_x = labels
        m, o = cfg.model, cfg.optim
        self.model = self.task.model(cfg.train.seed if m.seed is None else m.seed).to(device)
        if cfg.comm.exchange == "ranks":  # FRL: the random weights stay, edge scores train
            self.model = frl.to_supermask(self.model, cfg.comm.rank_keep, cfg.train.seed)
        own = self.task.optimizer(self.model.parameters())
        self.optimizer = own or make_optimizer(self.model, o.name, o.lr, o.momentum, o.weight_decay)
        # a task's own optimizer keeps its learning rates (per group), scaled by optim.schedule
        self._base_lrs = [g["lr"] for g in own.param_groups] if own is not None else None
        seed = cfg.train.seed * 7919 + index
        self.autocast = autocast_dtype(cfg.train.precision, device)
        self.trainer = LocalTrainer(
            self.model,
            self.optimizer,
            self.data,
            self.task.loss,
            o.batch_size,
            seed,
            o.sam_rho,
            cfg.train.loader_workers,
            self.autocast,
        )
        exchanged = self.task.task.exchanged
        # the tensors that travel (`Task.exchanged`, e.g. LoRA adapters only; FRL: the scores,
        # as rankings); None: all of them
        self.shared = None if exchanged is None else [k for k in self.model.state_dict() if self.task.exchanged(k)]
        if cfg.comm.exchange == "ranks":
            self.shared = frl.score_names(self.model.state_dict())
        if self.shared is not None and not self.shared:
            raise TaskError(f"task {self.task.ref}: `exchanged` selects no tensor of the model: nothing would travel")
        self.init_vector = flatten(self.state())
        tracker = TrustTracker(flag_below=sec.flag_below, sybil_similarity=sec.sybil_similarity)
        keys = float_keys(self.state())  # the trust tracker compares what travels
        args = (sec.byzantine_fraction, seed, tracker, keys)
        self.defence = Defence(sec.aggregator, self.model, self.x, self.y, self.num_classes, *args)
        if cfg.comm.exchange == "logits":
            # its own momentum-free optimizer: see node.algo.distill.kd.distill_steps
            self.distill_opt = torch.optim.SGD(self.model.parameters(), lr=cfg.distill.lr or o.lr)
            filtered = distill.uses_filter(cfg.distill.method)
            self.proxy_rows = distill.speaking_rows(filtered, self.x, self.proxy_x, cfg.data.seed)
        self.task_digest = task_digest(self.task.task, self.state())
        self._good: tuple | None = None
        self.rollbacks_in_a_row = 0
        self.outer = OuterState()  # the round protocol's own state that checkpoints keep
        self.metrics: dict[str, float] = {}
        try_hooks(self)

    @property
    def dataset_size(self) -> int:
        """Training samples in this node's partition (1 for a stream without a length: every
        node weighs the same)."""
        try:
            return len(self.data)
        except TypeError:
            return 1

    def state(self) -> dict[str, torch.Tensor]:
        """What this node publishes and mixes: the model's state dict, or its `shared` tensors
        only (live tensors: clone before keeping them across training)."""
        sd = self.model.state_dict()
        return sd if self.shared is None else {k: sd[k] for k in self.shared}

    def round_start(self) -> dict[str, torch.Tensor]:
        """A copy of state() before this round's training: the reference a round's update
        (and the trust tracker's signals) is measured from."""
        return {k: v.detach().clone() for k, v in self.state().items()}

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model state dict (checkpoints, rollbacks), live tensors."""
        return self.model.state_dict()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Load what state() returned (copied into the model's parameters). Raises KeyError for
        tensors that do not travel."""
        if self.shared is None:
            self.model.load_state_dict(state)
            return
        extra = set(state) - set(self.shared)
        if extra:
            raise KeyError(f"tensors that do not travel: {sorted(extra)[:3]}")
        self.model.load_state_dict(state, strict=False)

    def train(self, r: int, stop=lambda: False, steps: int | None = None, gen=None) -> RoundStats:
        """Local training of round r with the round's step size (`optim.schedule`); raises
        NonFinite before anything of it can be published. `steps` and `gen` train a part of the round
        (Streaming DiLoCo's fragments): that many steps, continuing the round's batch generator
        (`self.trainer.batches(r)`)."""
        cfg = self.cfg
        o, t = cfg.optim, cfg.train
        if self._base_lrs is None:
            set_lr(self.optimizer, round_lr(o.lr, o.schedule, r, t.rounds, o.final_lr_fraction))
        else:
            factor = round_lr(1.0, o.schedule, r, t.rounds, o.final_lr_fraction)
            for group, lr in zip(self.optimizer.param_groups, self._base_lrs):
                group["lr"] = lr * factor
        if steps is not None:
            stats = self.trainer.train_round(r, steps, None, stop=stop, gen=gen)
        else:
            stats = self.trainer.train_round(r, t.local_steps, t.local_seconds, stop=stop)
        if stats.steps and not math.isfinite(stats.loss):
            raise NonFinite("loss")
        if not self.all_finite():
            raise NonFinite("model_after_training")
        return stats

    def all_finite(self) -> bool:
        """Whether every floating tensor of the model is finite."""
        return all(bool(torch.isfinite(t).all()) for t in self.state().values() if t.is_floating_point())

    @property
    def metric(self) -> str:
        """Name of the metric evaluate() returns (the task's, e.g. accuracy or mse)."""
        return self.task.task.metric

    def evaluate(self) -> float:
        """The task's metric on its held-out data (accuracy in [0, 1] for the built-in tasks);
        every metric the task returned is kept in `metrics`."""
        self.metrics = self.task.evaluate(self.model)
        return self.metrics[self.metric]

    # -- rollback of non-finite rounds ------------------------------------------------------
    def keep_good_state(self) -> None:
        """Remember the model and optimizer as they are now (finite: checked by the caller),
        the state a non-finite round rolls back to."""
        self._good = (
            {k: v.detach().clone() for k, v in self.full_state().items()},
            copy.deepcopy(self.optimizer.state_dict()),
            {k: v.detach().clone() for k, v in self.outer.tensors().items()},  # the protocol's (outer momentum)
        )
        self.rollbacks_in_a_row = 0

    def roll_back(self, r: int, where: str) -> None:
        """Undo a round that went non-finite. Raises Diverged after MAX_ROLLBACKS in a row:
        lowering the step size silently would hide a broken run."""
        self.rollbacks_in_a_row += 1
        model_sd, optim_sd, outer = self._good
        self.model.load_state_dict(model_sd)
        self.optimizer.load_state_dict(copy.deepcopy(optim_sd))
        self.outer.reset({k: v.clone() for k, v in outer.items()})
        if self.rollbacks_in_a_row >= MAX_ROLLBACKS:
            raise Diverged(
                f"the {where.replace('_', ' ')} became non-finite (NaN/Inf) in round {r} "
                f"{MAX_ROLLBACKS} times in a row, each time rolled back to the last good state; "
                f"the last good checkpoint is kept. Lower optim.lr or check the data"
            )

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_identity(self) -> dict:
        """What a checkpoint must match to be resumed by this worker."""
        c = self.cfg
        return dict(
            optimizer=c.optim.name,
            node_index=c.node_index,
            node_count=c.node_count,
            model=f"{c.model.family}/{c.model.width}" if c.task is None else f"task/{self.task_digest[:32]}",
        )

    def restore(self, model_sd: dict, optim_t: dict | None, optim_meta: dict) -> None:
        """Load a checkpoint's model and optimizer (`optim_t` None: keep the fresh optimizer state; its tensors
        named OUTER + name are the round protocol's, see OuterState); the config's hyperparameters win over the
        saved ones. Raises RuntimeError, KeyError, ValueError or TypeError if they do not fit."""
        self.model.load_state_dict(model_sd)
        if optim_t is not None:
            outer = {k[len(OUTER) :]: v for k, v in optim_t.items() if k.startswith(OUTER)}
            optim_t = {k: v for k, v in optim_t.items() if not k.startswith(OUTER)}
            restore_optimizer(self.optimizer, optim_t, optim_meta)
            self.outer.restore(outer)
        if self._base_lrs is not None:  # a task's own optimizer: its hyperparameters are its own
            return
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.cfg.optim.weight_decay
            if "momentum" in group:
                group["momentum"] = self.cfg.optim.momentum


def try_hooks(worker: Worker) -> None:
    """A batch's loss and one evaluation of `worker`, so a task whose hooks fail does so at start (TaskError).
    In eval mode and without gradients: nothing of the model changes."""
    training = worker.model.training
    worker.model.eval()
    try:
        try:
            batch = worker.trainer.peek()
        except Exception as e:  # the user's Dataset items: one line, not a traceback
            raise TaskError(
                f"task {worker.task.ref}: the items `train_data` returns cannot be batched: {type(e).__name__}: {e}"
            ) from e
        with torch.no_grad():
            worker.task.loss(worker.model, batch)
        worker.evaluate()
    finally:
        worker.model.train(training)
