"""Recovery fine-tuning with PEFT: LoRA adapters trained on text, merged into the pruned model's weights.

Sparsity survives: for every targeted linear whose weight has zeros (a mask-pruned model), the adapter's
update is multiplied by the keep-mask inside the forward pass during training, so the model that is trained
is exactly the model that merging produces (``(W + s B A) * M = W + s (B A) * M`` because ``W * M = W``);
after ``merge_and_unload`` the mask is applied once more to the merged weight, so no pruned weight comes back.
Structural pruning needs nothing special: the targets are the linears that exist in the pruned layers.

Data parallel (``torchrun``, any initialized ``torch.distributed`` group): every rank calls the same ``recover_``
with the same model and data; each step's batch (the same rows on every rank, from the same seeded order) is split
into contiguous per-rank shares and the PEFT model is trained under ``DistributedDataParallel``, which averages the
LoRA gradients, so every rank ends with the same weights, those of the one-process run (up to float rounding). The
whole model must fit each rank's device: FSDP (sharded or offloaded models) is not done.
"""

from __future__ import annotations

import json
import logging
import math
import time
import types
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .api import lora_target_modules, record_pruning
from .calibration.check import CalibrationError, check_calibration
from .config import ConfigError, check_field_types
from .engine import distributed
from .evaluation import perplexity
from .model_checks import check_model
from .plan import get_plan

logger = logging.getLogger(__name__)


class NoTrainableTargetError(ValueError):
    """LoRA found no linear layer to adapt (the names match nothing in this pruned model)."""


@dataclass
class RecoveryConfig:
    """LoRA recovery settings (the defaults suit a ~100M-1B model on a CPU or a small GPU)."""

    method: ClassVar[str] = "lora_recovery"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "Recovery fine-tuning: LoRA adapters trained on text and merged into the weights, with the sparsity "
        "masks kept (pruned weights stay zero)."
    )

    steps: int = 100
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    #: last name components to adapt (e.g. ["q_proj", "v_proj"]); None = every linear in the decoder layers
    target_modules: list[str] | None = None
    seq_len: int = 256  # window length when texts are given
    preserve_sparsity: bool = True
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)  # ConfigError (a ValueError) naming the field, e.g. lr="x" or lr=inf
        for name in ("steps", "batch_size", "r", "seq_len", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ConfigError(f"recovery {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"recovery lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"recovery weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


#: what recovery accepts as training data (its error messages end with it)
_DATA_HINT = ("give token ids (a LongTensor [n_samples, seq_len], e.g. from hf_pruning.calibration.build_calibration("
              "tokenizer, source=\"default:calibration\", n_samples=64, seq_len=256)), a text, a list of texts, or a "
              "source such as \"default:calibration\" or a text file (with tokenizer=)")


def _token_batches(model: nn.Module, data, tokenizer, seq_len: int) -> torch.Tensor:
    """Training ids ``[n, seq_len]`` from token ids, a text, a list of texts or a text source name, checked
    against ``model`` (shape, dtype, ids inside its vocabulary) before training starts."""
    from .calibration.data import evaluation_windows, load_text

    if data is None or (isinstance(data, (str, list, tuple)) and not data):
        raise CalibrationError(f"recovery needs training data, got {data!r}; {_DATA_HINT}")
    if not isinstance(data, (torch.Tensor, str, list, tuple)) and not hasattr(data, "column_names") \
            and not hasattr(data, "__fspath__"):
        raise CalibrationError(f"recovery data of type {type(data).__name__} is not supported; {_DATA_HINT}")
    if not isinstance(data, torch.Tensor):
        if tokenizer is None:
            raise ValueError("recovery from text needs tokenizer=; or pass token ids [n_samples, seq_len]")
        if isinstance(data, (list, tuple)):
            if not all(isinstance(t, str) for t in data):
                raise CalibrationError(f"recovery data is a list of {sorted({type(t).__name__ for t in data})}; give a "
                                       f"list of texts, or token ids as a LongTensor; {_DATA_HINT}")
            if not any(t.strip() for t in data):
                raise CalibrationError(f"recovery data is a list of {len(data)} empty text(s); {_DATA_HINT}")
            text = "\n\n".join(data)
        else:
            text = load_text(data)  # a file, a folder, "default:calibration", a dataset name...
        data = evaluation_windows(tokenizer, text, seq_len)  # [n, seq_len], consecutive; raises when too short
    return check_calibration(model, data, name="recovery data")


def _masked_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT ``lora.Linear`` forward whose update ``s * B @ A`` is multiplied by the keep-mask (shape of W)."""
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # [r, in], [out, r]
        delta = (b @ a) * (self.scaling[name] * self.hf_pruning_keep)  # [out, in]
        result = result + F.linear(self.lora_dropout[name](x.to(a.dtype)), delta).to(result.dtype)
    return result


def attach_masked_lora(model: nn.Module, lora_config, masks: dict[str, torch.Tensor]):
    """``get_peft_model(model, lora_config)`` with the update of each module named in ``masks`` multiplied by its
    keep-mask (bool, shape of the weight) in the forward pass."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    peft_modules = dict(peft_model.base_model.model.named_modules())
    for name, keep in masks.items():
        layer = peft_modules[name]
        layer.hf_pruning_keep = keep.to(layer.base_layer.weight.dtype)
        layer.forward = types.MethodType(_masked_lora_forward, layer)
    return peft_model


def merge_masked_lora_(peft_model, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Merge the adapters into ``model`` and re-apply ``masks``; raises if a pruned weight came back."""
    peft_modules = dict(peft_model.base_model.model.named_modules())
    for name in masks:
        del peft_modules[name].forward  # back to PEFT's own forward and merge
        del peft_modules[name].hf_pruning_keep
    merged = peft_model.merge_and_unload()
    if merged is not model:
        raise RuntimeError("PEFT returned a different model object from merge_and_unload; cannot recover in place")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in masks.items():
            w = modules[name].weight
            w.mul_(keep.to(w.dtype))
            if int((w != 0).sum()) > int(keep.sum()):
                raise RuntimeError(f"merging refilled pruned weights of {name}")


def recover_(model: nn.Module, data, tokenizer=None, config: RecoveryConfig | None = None,
             eval_ids: torch.Tensor | None = None, **overrides) -> dict:
    """Fine-tune LoRA adapters on ``data`` and merge them into ``model`` in place; returns a report.

    ``data`` is a LongTensor ``[n_samples, seq_len]``, a text, a list of texts or a source
    :func:`hf_pruning.calibration.load_text` accepts (then ``tokenizer`` is needed). Settings come from
    ``config`` (:class:`RecoveryConfig`) with keyword ``overrides``. With ``eval_ids`` the report holds the
    perplexity before and after. The model keeps its class, plan and sparsity; ``pruning_config`` records the
    recovery. Raises :class:`NoTrainableTargetError` when no linear matches the targets.

    Under a process group (``torchrun``) training is data parallel: every rank passes the same model, settings and
    data (checked; ranks that differ all raise :class:`~hf_pruning.engine.distributed.DistributedError`), takes its
    contiguous share of each step's ``batch_size`` rows, and DDP averages the LoRA gradients. Shares differ by one
    row when ``batch_size`` is not a multiple of the world size: each rank's loss is then weighted by its share of
    the rows, so the gradient is still the whole batch's; a ``batch_size`` under the world size is refused. The
    logged losses are the whole batches' (summed over the ranks), the same on every rank; the perplexities are
    computed by every rank on all of ``eval_ids`` and rank 0's number is reported by all. Every rank ends with the
    same weights, bit for bit (the adapters are compared), those of one process up to float rounding. Dropout
    (``lora_dropout`` > 0, or the model's own, e.g. OPT's) draws other masks on each rank's rows than one process
    would: the result is then equal in distribution only. A model offloaded to CPU or disk is refused, as without
    a group: sharded training (FSDP) is not done.
    """
    from peft import LoraConfig

    config, ids, eval_ids, targets = _checked_inputs(model, data, tokenizer, config, eval_ids, overrides)
    masks = _keep_masks(model, targets) if config.preserve_sparsity else {}
    report = {"targets": len(targets), "masked_targets": len(masks), "data_tokens": int(ids.numel()),
              "trained_tokens": config.steps * config.batch_size * int(ids.shape[1]), "settings": asdict(config)}
    if distributed.active():
        report["ranks"] = distributed.world()[1]
    if eval_ids is not None:
        report["ppl_before"] = _perplexity(model, eval_ids)

    torch.manual_seed(config.seed)
    was_training = model.training
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none")
    peft_model = attach_masked_lora(model, lora, masks)
    try:
        losses = _train(peft_model, ids, config, report)
    except BaseException:  # leave the model as it was: adapters removed unmerged, PEFT's forwards back
        _unload_unmerged(peft_model, masks)
        _give_back(model, was_training)
        raise
    merge_masked_lora_(peft_model, model, masks)
    _give_back(model, was_training)
    report["losses"] = losses
    report["loss_first"], report["loss_last"] = losses[0], losses[-1]
    if eval_ids is not None:
        report["ppl_after"] = _perplexity(model, eval_ids)
    entry = {"method": "lora_recovery", **{k: v for k, v in asdict(config).items() if k != "gradient_checkpointing"}}
    record_pruning(model, get_plan(model), pruning_config=entry)
    model.hf_pruning_evaluation = None
    logger.info("LoRA recovery: %d targets (%d masked), %d steps, loss %.3f -> %.3f", len(targets), len(masks),
                config.steps, losses[0], losses[-1])
    return report


def _checked_inputs(model: nn.Module, data, tokenizer, config: RecoveryConfig | None, eval_ids, overrides: dict):
    """``(settings, training ids, eval ids, target names)``, checked before anything changes; under a process
    group a failure on one rank raises on every rank, and the ranks must agree on the model, settings and data."""
    with distributed.together("checking the recovery model, settings and data"):
        check_model(model, offload_ok=False)
        config = _settings(config, overrides)
        ids = _token_batches(model, data, tokenizer, config.seq_len)
        if eval_ids is not None:
            eval_ids = check_calibration(model, eval_ids, name="eval_ids")
        targets = lora_target_modules(model, config.target_modules)
        if not targets:
            raise NoTrainableTargetError(
                f"no linear layer in the decoder layers matches target_modules={config.target_modules}; this pruned "
                "model has none of them (e.g. q_proj is gone from value-only layers). Pass other names, or None for "
                "every linear projection"
            )
        ranks, rows = distributed.world()[1], min(config.batch_size, int(ids.shape[0]))
        if rows < ranks:
            raise ConfigError(f"recovery batches of {rows} row(s) (batch_size={config.batch_size}, {ids.shape[0]} "
                              f"data rows) cannot be split among {ranks} ranks (each trains on a share of every "
                              f"batch): use batch_size >= {ranks} and as many data rows, or launch fewer processes")
    if distributed.active():  # data parallel: the same call everywhere, each rank on its share of every batch
        distributed.agree("model, settings or recovery data", distributed.digest_of(
            get_plan(model).to_json(), json.dumps(asdict(config), sort_keys=True, default=str), targets,
            distributed.model_sample(model), ids, *([] if eval_ids is None else [eval_ids])),
            "every rank must call recover_ with the same model, settings, data and eval_ids (each trains on its "
            "share of every batch)")
    return config, ids, eval_ids, targets


def _perplexity(model: nn.Module, eval_ids: torch.Tensor) -> float:
    """:func:`perplexity` on all of ``eval_ids`` (by every rank under a process group: rank 0's number for all)."""
    return distributed.same_on_every_rank(perplexity(model, eval_ids), "the perplexity")


def _settings(config: RecoveryConfig | None, overrides: dict) -> RecoveryConfig:
    """``config`` (default :class:`RecoveryConfig`) with the keyword ``overrides`` applied and checked."""
    config = config or RecoveryConfig()
    if not isinstance(config, RecoveryConfig):
        raise ConfigError(f"config must be a hf_pruning.RecoveryConfig, got {type(config).__name__}")
    if overrides:
        unknown = sorted(set(overrides) - set(asdict(config)))
        if unknown:
            raise ConfigError(f"unknown recovery setting(s) {unknown}; known: {sorted(asdict(config))}")
        config = RecoveryConfig(**{**asdict(config), **overrides})
    return config


def _keep_masks(model: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """Target name -> keep-mask (``weight != 0``, ``[out, in]``) for the targets that have zeros."""
    modules = dict(model.named_modules())
    masks = {}
    for name in targets:
        keep = modules[name].weight != 0  # [out, in]
        if not bool(keep.all()):
            masks[name] = keep
    return masks


def _train(peft_model, ids: torch.Tensor, config: RecoveryConfig, report: dict) -> list[float]:
    """``config.steps`` AdamW steps on batches of ``ids`` ``[n, seq_len]`` (reshuffled every epoch); the
    losses. Adds ``trainable_params`` and ``train_s`` to ``report``. Under a process group each rank runs the
    forward and backward of its share of every batch in ``DistributedDataParallel``."""
    if config.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    report["trainable_params"] = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    losses = []
    peft_model.train()
    step_model = distributed.data_parallel(peft_model, trainable)  # peft_model itself without a process group
    rank, ranks = distributed.world()
    if ranks > 1:  # other dropout draws on each rank's rows (the LoRA weights were drawn alike, then synced)
        torch.manual_seed(config.seed + 7919 * rank)
    start = time.perf_counter()
    order = torch.randperm(ids.shape[0], generator=g)
    cursor = 0
    for _ in tqdm(range(config.steps), desc="LoRA recovery", unit="step", leave=False,
                  disable=not distributed.is_main()):
        if cursor + config.batch_size > order.numel():  # a new epoch: reshuffle
            order, cursor = torch.randperm(ids.shape[0], generator=g), 0
        batch = ids[order[cursor: cursor + config.batch_size]]  # [batch, seq_len], the same on every rank
        cursor += config.batch_size
        losses.append(_step(step_model, batch, config))
        opt.step()
        opt.zero_grad(set_to_none=True)
    report["train_s"] = time.perf_counter() - start
    del step_model
    if config.gradient_checkpointing:
        peft_model.gradient_checkpointing_disable()
    distributed.agree("LoRA weights", distributed.digest_of(*trainable),
                      "data-parallel training must end with the same weights on every rank (a non-deterministic "
                      "collective or kernel?); every rank stops")
    return losses


def _step(step_model: nn.Module, batch: torch.Tensor, config: RecoveryConfig) -> float:
    """Forward and backward of this rank's rows of ``batch`` (all of them without a process group); returns the
    whole batch's loss. A share of ``k`` of the ``n`` rows is weighted ``k / n`` (times the world size, as DDP
    averages the gradients over the ranks), so the averaged gradient is the whole batch's even when the shares
    differ: every row has the same number of tokens, so the batch's mean token loss is the rows' weighted mean."""
    rows, ranks = distributed.own_rows(batch.shape[0]), distributed.world()[1]
    share = batch[rows]  # [k, seq_len], contiguous
    loss = step_model(input_ids=share, labels=share, use_cache=False).loss
    value = loss.item()
    if distributed.active():  # the whole batch's loss, the same number on every rank
        value = distributed.all_sum_scalar(value * share.shape[0] / batch.shape[0], "the training loss")
    if not math.isfinite(value):
        raise FloatingPointError(f"the recovery loss became {value}; lower lr (now {config.lr})")
    scale = share.shape[0] * ranks / batch.shape[0]
    (loss if scale == 1 else loss * scale).backward()
    return value


def _unload_unmerged(peft_model, masks: dict[str, torch.Tensor]) -> None:
    """Remove the adapters without merging them, and the masked forwards :func:`attach_masked_lora` set."""
    for name in masks:
        layer = dict(peft_model.base_model.model.named_modules())[name]
        del layer.forward, layer.hf_pruning_keep
    peft_model.unload()


def _give_back(model: nn.Module, was_training: bool) -> None:
    """A normal model again: PEFT froze the base weights; the train/eval mode as it was."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.train(was_training)
