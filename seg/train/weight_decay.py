"""Weight decay, in one place: which parameters get none (the recipes' rules) and the optimizer's parameter groups.

The rules read module types and the original names and shapes, so the plan is made from the unwrapped model
(:func:`plan_weight_decay`, in ``SegmentationTask.configure_model``); the groups are then formed over the parameters
as the strategy left them (:func:`param_groups`), matched by their original names. This gives the same groups on
one device, under DDP and under FSDP with ``use_orig_params=True``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import nn

__all__ = ["DecayPlan", "NoDecayRule", "clean_param_name", "no_decay_names", "param_groups", "plan_weight_decay"]

# Weight-decay rules (which parameters get none), named in configs as `model.no_decay`:
# - decay_all: none exempt. PVT's Semantic FPN recipe: its mmseg config sets AdamW(lr=1e-4, weight_decay=1e-4)
#   with no paramwise_cfg, so norms, biases and position tables all decay.
# - norms_tables: normalisation layers (found by module type), position tables and FLatten's `scale`. Swin's UperNet
#   recipe (paramwise custom_keys absolute_pos_embed, relative_position_bias_table and norm at decay_mult 0), plus
#   FLatten's `positional_encoding` and `scale`, and agent attention's bias tables (the Agent-Swin recipe's
#   custom_keys an_bias ... wa_bias); other biases decay, as there.
# - norms_biases_tables: norms_tables plus every other 1-D parameter (biases): the usual rule outside the recipes.
# Rules read module types and the original names and shapes, so they are applied to the unwrapped model (FSDP
# flattens parameters and changes their shapes and names): plan_weight_decay before wrapping, param_groups after.
NoDecayRule = Literal["decay_all", "norms_tables", "norms_biases_tables"]
_POSITION_TABLES = (
    "pos_embed",  # PVT / ViT absolute position tables, Swin's absolute_pos_embed
    "pos_embedding",
    "positional_encoding",  # FLatten's learned key position table
    "relative_position_bias_table",  # Swin
    "cls_token",
    *("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"),  # agent attention's bias tables
)
_TEMPERATURES = frozenset({"scale"})  # FLatten's per-channel temperature, matched as the parameter's own name
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,  # also timm's LayerNorm / LayerNorm2d
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_WRAPPED_MARKERS = ("_flat_param", "_fsdp_wrapped_module")


def no_decay_names(model: nn.Module, rule: NoDecayRule) -> set[str]:
    """Names (as ``model.named_parameters()`` spells them) of the parameters ``rule`` exempts from weight decay.

    ``decay_all``: none. ``norms_tables``: weights and biases of normalisation layers (by module type),
    position tables (names containing ``pos_embed``, ``positional_encoding``, ``relative_position_bias_table``,
    ``cls_token``, agent attention's ``an_bias`` ... ``wa_bias``) and parameters named ``scale`` (FLatten's
    temperature). ``norms_biases_tables``: those and every other 1-D parameter (biases).

    Raises:
        ValueError: for an unknown rule, or a model already wrapped by FSDP (its names and shapes are no longer
            the original ones: classify the model before wrapping).
    """
    if rule not in get_args(NoDecayRule):
        raise ValueError(f"unknown no_decay rule {rule!r}; valid options: {', '.join(get_args(NoDecayRule))}")
    wrapped = [n for n, _ in model.named_parameters() if any(m in n for m in _WRAPPED_MARKERS)]
    if wrapped:
        raise ValueError(f"no_decay_names needs the unwrapped model, got FSDP-wrapped parameters ({wrapped[0]}, "
                         "...): classify the parameters before the strategy wraps the model")
    if rule == "decay_all":
        return set()
    exempt = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if (
                is_norm
                or any(key in name for key in _POSITION_TABLES)
                or param_name in _TEMPERATURES
                or (rule == "norms_biases_tables" and param.ndim <= 1)
            ):
                exempt.add(name)
    return exempt


# Name components that FSDP, activation checkpointing and torch.compile insert into the names of the parameters
# below the module a plan was made for (DDP wraps from outside: names seen from inside do not change).
_WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_FLAT_PARAM = "_flat_param"  # FSDP with use_orig_params=False: one flattened parameter per FSDP unit


def clean_param_name(name: str) -> str:
    """A parameter name without the components wrappers insert (``_fsdp_wrapped_module``, ...)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


@dataclass(frozen=True)
class DecayPlan:
    """The weight-decay split of a model, made before any wrapping.

    Args:
        rule: the rule it was made with.
        known: names of all trainable parameters.
        exempt: names of those that get no weight decay.
    """

    rule: NoDecayRule
    known: frozenset[str]
    exempt: frozenset[str]


def plan_weight_decay(model: nn.Module, rule: NoDecayRule) -> DecayPlan:
    """The split of ``model``'s trainable parameters under ``rule`` (call it on the unwrapped model)."""
    known = frozenset(name for name, param in model.named_parameters() if param.requires_grad)
    return DecayPlan(rule, known, frozenset(no_decay_names(model, rule)) & known)


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], plan: DecayPlan) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: ``[{'params': decayed}, {'params': exempt, 'weight_decay': 0.0}]``, one
    group for ``decay_all``. The decayed group takes the optimizer's own ``weight_decay``.

    Args:
        named_parameters: the parameters as the strategy left them (wrapper components in their names are
            dropped before matching the plan).
        plan: from :func:`plan_weight_decay` on the same model before wrapping.

    Raises:
        ValueError: FSDP with ``use_orig_params=False`` (flattened parameters) and a rule that exempts some
            parameters, or a parameter that did not exist when the plan was made.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if name.split(".")[-1] == _FLAT_PARAM:
            if plan.exempt:
                raise ValueError(
                    f"no_decay={plan.rule!r} needs per-parameter weight decay, but FSDP runs with "
                    "use_orig_params=False and flattens each unit's parameters into one: set "
                    "`use_orig_params: true` in the FSDPStrategy init_args (configs/trainer/fsdp.yaml does), or "
                    "use no_decay=decay_all"
                )
            decay.append(param)
            continue
        original = clean_param_name(name)
        if original not in plan.known:
            raise ValueError(f"parameter {original!r} did not exist when the weight-decay groups were made "
                             "(configure_model): add parameters before training starts")
        (no_decay if original in plan.exempt else decay).append(param)
    if plan.rule == "decay_all":
        return [{"params": decay}]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
