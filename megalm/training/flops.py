"""FLOPs of a training iteration, TFLOP/s per device and model-FLOPs utilisation (MFU).

Per token, with N the parameters that take part in matrix products (the transformer layers and the output
layer; not the embedding lookups):

    model FLOPs / token = 6 N + 6 L s a (d_qk + d_v)   (forward + backward of the weights, plus attention scores
                                                         and values: a heads of widths d_qk and d_v, x3 for backward;
                                                         12 L h s when a d = h)

L counts multi-token prediction's layers too (each one transformer layer, and N its projection and one more use
of the output layer); multi-latent attention's d_qk is the RoPE-free and rotated widths together, d_v its own, and
N its down- and up-projections: what its matmuls really are.

Recomputation adds one more forward of what it redoes: with full recomputation the layers' part counts 8/6 of
itself, with selective recomputation the attention term does. TFLOP/s per device counts that work (the
hardware's), MFU divides the model FLOPs alone by the device's peak.

Under LoRA the frozen weights (the base, the output layer) need no weight gradient: 4 FLOPs per parameter and
token (forward, and the input's gradient) instead of 6; the adapters, which train, count 6. (Autograd also skips
the first layer's query, key and value input gradients, which nothing trained below needs: a share of about
1/(4 L) of what LoRA saves that the formula still counts.)
"""
from __future__ import annotations

from typing import Optional

from megalm.config import ModelConfig

# dense bf16 peak TFLOP/s of one device, by a name that appears in torch.cuda.get_device_name()
PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0, "MI300X": 1307.0, "MI250X": 383.0}


def peak_tflops(device_name: str, configured: Optional[float] = None) -> Optional[float]:
    if configured is not None:
        return configured
    for name, peak in PEAK_TFLOPS.items():
        if name in device_name:
            return peak
    return None


def flops_per_token(cfg: ModelConfig, layer_params: int, output_params: int,
                    trained_layer_params: Optional[int] = None) -> tuple:
    """(model FLOPs, FLOPs done with recomputation) per token; ``layer_params`` are the transformer layers'
    parameters, ``output_params`` the output layer's (vocab x hidden, tied or not); ``trained_layer_params``: under
    LoRA, the adapters among the layers' parameters (everything else frozen)."""
    if trained_layer_params is None:
        layers, output = 6 * layer_params, 6 * output_params
    else:
        layers = 6 * trained_layer_params + 4 * (layer_params - trained_layer_params)
        output = 4 * output_params
    layers_deep = cfg.num_layers + (cfg.mtp_num_layers or 0)
    attention = 6 * layers_deep * cfg.seq_length * cfg.num_attention_heads * (cfg.query_head_dim + cfg.value_head_dim)
    model = layers + attention + output
    if cfg.recompute_granularity == "full":  # one more forward of the layers: 2 FLOPs per parameter and token
        return model, model + 2 * layer_params + attention / 3
    if cfg.recompute_granularity == "selective":
        return model, model + attention / 3
    return model, model


class Throughput:
    """Turns (tokens, seconds) of an iteration into tokens/s, TFLOP/s per device and MFU."""

    def __init__(self, cfg: ModelConfig, layer_params: int, output_params: int, world_size: int,
                 peak: Optional[float], trained_layer_params: Optional[int] = None):
        self.model_flops, self.hardware_flops = flops_per_token(cfg, layer_params, output_params,
                                                                trained_layer_params)
        self.world_size, self.peak = world_size, peak

    def __call__(self, tokens: int, seconds: float) -> dict:
        tflops = self.hardware_flops * tokens / seconds / self.world_size / 1e12
        out = {"tokens_per_sec": tokens / seconds, "tflops_per_device": tflops}
        if self.peak:
            out["mfu"] = self.model_flops * tokens / seconds / self.world_size / 1e12 / self.peak
        return out
