"""The built-in weight maps, by config.json's model_type: each family's map, written in the same
vocabulary as a user's map (archc/interop/maps.py)."""

from __future__ import annotations

from archc.interop.families.albert import ALBERT
from archc.interop.families.bert import BERT
from archc.interop.families.bloom import BLOOM
from archc.interop.families.blt import BLT
from archc.interop.families.deepseek_v3 import DEEPSEEK_V3
from archc.interop.families.dit import DIT
from archc.interop.families.gemma import GEMMA
from archc.interop.families.gemma2 import GEMMA2
from archc.interop.families.gpt2 import GPT2
from archc.interop.families.gpt_neox import GPT_NEOX
from archc.interop.families.llama import LLAMA, MISTRAL
from archc.interop.families.mamba2 import MAMBA2
from archc.interop.families.mixtral import MIXTRAL
from archc.interop.families.olmo2 import OLMO2
from archc.interop.families.phi3 import PHI3
from archc.interop.families.qwen import QWEN2, QWEN3
from archc.interop.families.qwen2_moe import QWEN2_MOE
from archc.interop.families.sd3 import SD3
from archc.interop.families.t5 import T5
from archc.interop.families.vit import VIT

BUILTIN = {m.model_type: m for m in (GPT2, LLAMA, MISTRAL, MIXTRAL, DEEPSEEK_V3, QWEN2, QWEN3, QWEN2_MOE, PHI3, GEMMA,
                                     GEMMA2, OLMO2, GPT_NEOX, BLOOM, MAMBA2, BERT, ALBERT, VIT, T5, BLT, DIT,
                                     SD3)}
