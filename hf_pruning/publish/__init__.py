"""Publishing a pruned model: the atomic ``save_pretrained`` (:mod:`.save`), its model card (:mod:`.card`, from
``templates/modelcard.md``), the numbers the card quotes (:mod:`.summary`), its pictures (:mod:`.plots`), the
push to the Hub (:mod:`.hub`) and the reload check of a saved folder (:mod:`.verify`).

Importing this package registers ``save_pretrained`` and ``push_to_hub`` as model methods
(:mod:`hf_pruning.model_methods`); ``hf_pruning`` imports it, so every bound model has them.
"""

from .card import CardTemplateError, build_card
from .hub import HubPushError, push_folder, push_to_hub
from .save import save_pretrained
from .summary import pruning_summary

__all__ = ["CardTemplateError", "HubPushError", "build_card", "pruning_summary", "push_folder", "push_to_hub",
           "save_pretrained"]
