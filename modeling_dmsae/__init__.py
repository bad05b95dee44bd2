"""DMSAE: Distilled Matryoshka Sparse Autoencoders as a transformers model.

Importing this package registers ``DMSAEConfig`` / ``DMSAEModel`` with ``AutoConfig`` /
``AutoModel`` and marks them for ``trust_remote_code`` export (``save_pretrained`` then writes
the code files beside the weights).
"""

from transformers import AutoConfig, AutoModel

from .configuration_dmsae import DMSAEConfig, matryoshka_group_sizes, noncore_k
from .evidence import LatentEvidence
from .interventions import SAESplice, kept_positions, logit_effect, splice_sae
from .modeling_dmsae import DMSAEModel, DMSAEOutput, DMSAEPreTrainedModel, SparseLatents, TextLatents

AutoConfig.register(DMSAEConfig.model_type, DMSAEConfig)
AutoModel.register(DMSAEConfig, DMSAEModel)
DMSAEConfig.register_for_auto_class()
DMSAEModel.register_for_auto_class("AutoModel")

__all__ = [
    "DMSAEConfig",
    "DMSAEModel",
    "DMSAEOutput",
    "DMSAEPreTrainedModel",
    "LatentEvidence",
    "SAESplice",
    "SparseLatents",
    "TextLatents",
    "kept_positions",
    "logit_effect",
    "matryoshka_group_sizes",
    "noncore_k",
    "splice_sae",
]
