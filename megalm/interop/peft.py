"""LoRA adapters as PEFT writes them: ``adapter_config.json`` and ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads onto the transformers model exported from the base.

megalm's adapters sit beside the same projections PEFT adapts (one per q, k, v, gate, up and down projection:
megalm keeps them apart as transformers does), so each is PEFT's ``lora_A`` (``[r, in]``) and ``lora_B``
(``[out, r]``) under the transformers name of its layer, which the family's renames give. Experts have no PEFT
form here (transformers fuses them into one parameter): such adapters are exported merged.
"""
from __future__ import annotations

import json
import logging
import os

from megalm.interop.families import ConversionError, family_of
from megalm.interop.families.base import Rename

log = logging.getLogger("megalm")


def peft_tensors(cfg, adapters: dict) -> tuple:
    """(PEFT's tensors by name, the transformers modules they adapt) of megalm's adapter tensors."""
    family = family_of(cfg.model)
    theirs = {r.ours: r.theirs for r in family.renames(cfg.model) if isinstance(r, Rename) and not r.transpose}
    tensors, modules = {}, set()
    for name, value in adapters.items():
        layer, _, leaf = name.partition(".lora.")
        if leaf not in ("a", "b"):
            raise ConversionError(f"{name}: adapters on experts have no PEFT form ({family.architecture} fuses its "
                                  f"experts): export them merged (--merge-lora)")
        weight = theirs.get(layer + ".weight")
        if weight is None:
            raise ConversionError(f"{name}: {family.architecture} has no plain linear layer for {layer} that PEFT "
                                  f"could adapt: export merged (--merge-lora)")
        module = weight[: -len(".weight")]
        tensors[f"base_model.model.{module}.lora_{leaf.upper()}.weight"] = value.contiguous()
        modules.add(module.rsplit(".", 1)[-1])
    return tensors, sorted(modules)


def export_peft(state: dict, output: str) -> str:
    """``state``: ``read_checkpoint`` of a checkpoint of adapters."""
    from safetensors.torch import save_file

    cfg, lora = state["config"], state["meta"]["lora"]
    tensors, modules = peft_tensors(cfg, state["model"])
    os.makedirs(output, exist_ok=True)
    save_file(tensors, os.path.join(output, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["lora_rank"], "lora_alpha": lora["lora_alpha"],
              "lora_dropout": cfg.posttrain.lora_dropout, "target_modules": modules, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "base_model_name_or_path": None}
    with open(os.path.join(output, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    log.info("exported the LoRA adapters of %s (%d projections: %s) as PEFT's to %s", state["path"], len(tensors) // 2,
             " ".join(modules), output)
    return output
