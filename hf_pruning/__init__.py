"""hf_pruning: prune Hugging Face causal LMs in place and save them as ordinary Hub models.

    import hf_pruning
    model = hf_pruning.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    model.prune_(hf_pruning.PlanConfig(plan={"ops": [{"op": "drop_attention", "layer": 20}]}))
    model.save_pretrained("smollm2-pruned")

Importing the package registers the ``hf_pruning_<arch>`` model types with transformers' Auto classes, so
pruned checkpoints load without ``trust_remote_code`` wherever hf_pruning is installed.
"""

from .accounting import parameter_count, predicted_decoder_params, sparsity_report
from .api import apply_plan_, from_pretrained, lora_target_modules, prune_
from .calibration.check import CalibrationError
from .config import ConfigError, PruningConfig
from .export import ExportError, ExportReport, export
from .methods import (
    FinerCutConfig,
    FLAPConfig,
    GradMAPConfig,
    HARPConfig,
    HeadsConfig,
    LLMBarberConfig,
    MagnitudeConfig,
    PlanConfig,
    ShortGPTConfig,
    SLEBConfig,
    SparseGPTConfig,
    TaylorConfig,
    WandaConfig,
)
from .model_checks import QuantizedModelError, UnsupportedModelError, clear_quantizer_
from .plan import PlanError, PruningPlan, get_plan
from .publish import CardTemplateError, HubPushError, build_card, pruning_summary, push_to_hub, save_pretrained
from .recovery import NoTrainableTargetError, RecoveryConfig, recover_
from .registry import PruningResult, get_method, list_methods, register_method
from .remote.hf_pruning_surgery import UnsupportedArchitectureError
from .version import __version__


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .remote.configuration_hf_pruning import PRUNED_CONFIG_CLASSES
    from .remote.modeling_hf_pruning import PRUNED_MODEL_CLASSES

    for arch, config_cls in PRUNED_CONFIG_CLASSES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, PRUNED_MODEL_CLASSES[arch], exist_ok=True)


_register_auto_classes()

#: public names that were renamed: old name -> new name (the same object; reading the old name warns)
_DEPRECATED_NAMES = {"BarberConfig": "LLMBarberConfig"}


def __getattr__(name: str):
    if name in _DEPRECATED_NAMES:
        import warnings

        new = _DEPRECATED_NAMES[name]
        warnings.warn(f"hf_pruning.{name} was renamed hf_pruning.{new} (the same class); the old name will be "
                      "removed in a later release", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LLMBarberConfig",
    "CalibrationError",
    "CardTemplateError",
    "HubPushError",
    "NoTrainableTargetError",
    "RecoveryConfig",
    "build_card",
    "pruning_summary",
    "push_to_hub",
    "recover_",
    "ConfigError",
    "ExportError",
    "ExportReport",
    "export",
    "FinerCutConfig",
    "FLAPConfig",
    "GradMAPConfig",
    "HARPConfig",
    "HeadsConfig",
    "TaylorConfig",
    "SLEBConfig",
    "ShortGPTConfig",
    "MagnitudeConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "sparsity_report",
    "PlanConfig",
    "PlanError",
    "PruningConfig",
    "PruningPlan",
    "PruningResult",
    "QuantizedModelError",
    "UnsupportedArchitectureError",
    "UnsupportedModelError",
    "__version__",
    "apply_plan_",
    "clear_quantizer_",
    "from_pretrained",
    "get_method",
    "get_plan",
    "list_methods",
    "lora_target_modules",
    "parameter_count",
    "predicted_decoder_params",
    "prune_",
    "register_method",
    "save_pretrained",
]
