"""LoRA adapters (PEFT's format) applied to a base model's tensors on the fly: mergekit's `model+lora`.

mergekit 0.1.5 (`mergekit/common.py`, `ModelReference.merged`) loads the base model with
transformers, wraps it in `peft.PeftModel`, calls `merge_and_unload()` and writes the merged
model to a cache directory before merging. pyops reads the adapter's tensors and forms each
adapted weight when the merge reads it, so no merged copy is ever written:

    linear layer  W' = W + transpose(B·A, fan_in_fan_out) · scale     A [r, in], B [out, r]
    embedding     W' = W + (B·A)ᵀ · scale                            A [r, n_emb], B [dim, r]
    scale = lora_alpha / r   (use_rslora: lora_alpha / √r; alpha_pattern / rank_pattern per module)
    modules_to_save, and a base layer PEFT saved with the adapter (``<module>.base_layer.weight``,
    `save_embedding_layers`): the adapter's tensor replaces the base tensor (W above)

as PEFT's `LoraLayer.get_delta_weight` / `Embedding.get_delta_weight` and `merge` do
(Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685; Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732 for rsLoRA).
The sum is formed in fp32 (B·A in fp32, as PEFT does on the CPU) and rounded once to the base
tensor's dtype; PEFT rounds the product to that dtype first and adds in it, so on bf16 / fp16
bases the two differ by at most one rounding of the sum, and on fp32 bases they agree up to the
matmul's rounding.

Adapters PEFT can write but this module does not apply are refused naming the file and key: other
PEFT types than LORA, DoRA (`use_dora`), LoRA on biases (`lora_bias`), convolution layers,
`layer_replication`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

from pyops.merging.errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."


def split_model_lora(text: str) -> Tuple[str, Optional[str]]:
    """`"base+adapter"` -> ("base", "adapter"); `"base"` -> ("base", None). More than one "+" is
    refused, as mergekit's `ModelReference` parser does."""
    parts = text.split("+")
    if len(parts) == 1:
        return text, None
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"expected 'model' or 'model+lora_adapter', got {text!r}")
    return parts[0], parts[1]


@dataclass(frozen=True)
class LoraTarget:
    """One adapted weight: the adapter's A and B tensor names, its kind and its scale."""
    a: str
    b: str
    kind: str            # "linear" | "embedding"
    scale: float
    fan_in_fan_out: bool


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    """PEFT's `get_pattern_key`: the first key matching the end of the module name (at a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin).

    `targets` maps each base tensor name (e.g. ``model.layers.0.self_attn.q_proj.weight``) to its
    `LoraTarget`; `replaced` maps base tensor names to the adapter's full replacement tensor
    (modules_to_save). `apply(name, base)` returns the adapted tensor."""

    def __init__(self, path: Path, config: dict, weights: Path, names: Dict[str, Tuple[Tuple[int, ...], str]]):
        self.path, self.config, self.weights = path, config, weights
        self._shapes = names
        self._tensors: Optional[dict] = None
        self.targets: Dict[str, LoraTarget] = {}
        self.replaced: Dict[str, str] = {}
        self._plan()

    # ------------------------------------------------------------------------------------ open

    @classmethod
    def open(cls, path) -> "LoraAdapter":
        path = Path(path)
        cfg_path = path / CONFIG_FILE
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: not a PEFT adapter directory (no {CONFIG_FILE})")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{cfg_path}: cannot be read as JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
        cls._check_config(cfg_path, config)
        weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no {' or '.join(WEIGHT_FILES)} next to {CONFIG_FILE}")
        return cls(path, config, weights, cls._read_names(weights))

    @staticmethod
    def _check_config(cfg_path: Path, config: dict) -> None:
        kind = config.get("peft_type")
        if kind != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type: only LORA adapters can be applied, got {kind!r}")
        refused = {"use_dora": "DoRA adapters (use_dora) are not supported",
                   "lora_bias": "LoRA on biases (lora_bias) is not supported",
                   "layer_replication": "layer_replication is not supported"}
        for key, why in refused.items():
            if config.get(key):
                raise CheckpointError(f"{cfg_path}: {key}: {why}, got {config[key]!r}")
        for key in ("r", "lora_alpha"):
            v = config.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise CheckpointError(f"{cfg_path}: {key}: expected a number > 0, got {v!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(key) or {}, dict):
                raise CheckpointError(f"{cfg_path}: {key}: expected a mapping, got {config[key]!r}")

    @staticmethod
    def _read_names(weights: Path) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """{tensor name: (shape, dtype code)} of the adapter file (its header; .bin: loaded)."""
        from pyops.merging import safetensors_io as io
        if weights.suffix == ".bin":
            return {n: (tuple(t.shape), io.dtype_code(t.dtype)) for n, t in io.read_bin(weights).items()}
        infos, _ = io.read_header(weights)
        return {n: (tuple(i.shape), i.dtype) for n, i in infos.items()}

    # ------------------------------------------------------------------------------------ plan

    def _fail(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.weights}: {key}: {what}")

    def _plan(self) -> None:
        cfg = self.config
        modules: Dict[str, Dict[str, str]] = {}
        for name in self._shapes:
            if not name.startswith(PREFIX):
                raise self._fail(name, f"expected tensor names starting with {PREFIX!r} (PEFT's layout)")
            rest = name[len(PREFIX):]
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.(weight|bias)", rest) or \
                re.fullmatch(r"(.+)\.(lora_embedding_A|lora_embedding_B)", rest)
            if m is None:
                if ".lora_" in rest or "lora_magnitude_vector" in rest:
                    raise self._fail(name, "an adapter tensor of a kind pyops does not apply (DoRA, biases, "
                                           "another LoRA variant)")
                # modules_to_save, or a saved base layer (save_embedding_layers): PEFT loads it into
                # the model in place of the base tensor, so it replaces it (the delta then adds to it)
                self.replaced[rest.replace(".base_layer.", ".")] = name
                continue
            module, part = m.group(1), m.group(2)
            if len(m.groups()) == 3 and m.group(3) == "bias":
                raise self._fail(name, "LoRA on biases (lora_bias) is not supported")
            modules.setdefault(module, {})[part] = name
        default_r, default_alpha = cfg["r"], cfg["lora_alpha"]
        rslora = bool(cfg.get("use_rslora"))
        fifo = bool(cfg.get("fan_in_fan_out"))
        for module, parts in sorted(modules.items()):
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
            if a_key not in parts or b_key not in parts:
                missing = b_key if a_key in parts else a_key
                raise self._fail(next(iter(parts.values())), f"module {module!r} has no {missing} tensor")
            a_shape, b_shape = self._shapes[parts[a_key]][0], self._shapes[parts[b_key]][0]
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise self._fail(parts[a_key], f"expected 2-D LoRA factors (linear or embedding layers), got "
                                               f"A {list(a_shape)}, B {list(b_shape)} (convolution LoRA is not supported)")
            r = a_shape[0]
            if b_shape[1] != r:
                raise self._fail(parts[b_key], f"B {list(b_shape)} does not match A {list(a_shape)} (rank {r})")
            want_r = _pattern_value(cfg.get("rank_pattern") or {}, module, default_r)
            if r != want_r:
                raise self._fail(parts[a_key], f"rank {r} of the stored A differs from the configured r = {want_r}")
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, default_alpha)
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            self.targets[f"{module}.weight"] = LoraTarget(parts[a_key], parts[b_key],
                                                          "embedding" if emb else "linear", scale, fifo and not emb)

    def expected_shape(self, name: str) -> Tuple[int, ...]:
        """The base weight shape that `name`'s adapter tensors imply."""
        t = self.targets.get(name)
        if t is None:
            return self._shapes[self.replaced[name]][0]
        (r, n_in), (n_out, _) = self._shapes[t.a][0], self._shapes[t.b][0]
        if t.kind == "embedding":
            return (n_in, n_out)
        return (n_in, n_out) if t.fan_in_fan_out else (n_out, n_in)

    def check_base(self, shapes: Mapping[str, Sequence[int]], base_label: str) -> None:
        """Every adapted or replaced tensor exists in the base with the shape the adapter implies
        (a CheckpointError naming the module otherwise)."""
        for name in sorted(set(self.targets) | set(self.replaced)):
            key = self.targets[name].a if name in self.targets else self.replaced[name]
            if name not in shapes:
                raise self._fail(key, f"targets {name!r}, which base model {base_label} does not have")
            want, got = self.expected_shape(name), tuple(shapes[name])
            if want != got:
                raise self._fail(key, f"implies {name} of shape {list(want)}, but base model {base_label} has "
                                      f"{list(got)}")

    # ----------------------------------------------------------------------------------- apply

    def _tensor(self, key: str):
        if self._tensors is None:
            from pyops.merging import safetensors_io as io
            if self.weights.suffix == ".bin":
                self._tensors = io.read_bin(self.weights)
            else:
                from safetensors.torch import load_file
                self._tensors = load_file(str(self.weights))
        return self._tensors[key]

    def touches(self, name: str) -> bool:
        return name in self.targets or name in self.replaced

    def apply(self, name: str, base):
        """The adapted tensor `name` of the base's shape and dtype: base + delta formed in fp32 and
        rounded once, the adapter's replacement (in the base's dtype), or `base` itself."""
        import torch
        if name in self.replaced:
            base = self._tensor(self.replaced[name]).to(base.dtype)
        t = self.targets.get(name)
        if t is None:
            return base
        a, b = self._tensor(t.a).to(torch.float32), self._tensor(t.b).to(torch.float32)
        delta = b @ a
        if t.kind == "embedding" or t.fan_in_fan_out:
            delta = delta.t()
        # base + delta·scale, each operation rounded once in fp32 (as PEFT's merge), in delta's memory
        return delta.mul_(t.scale).add_(base).to(base.dtype)

    def close(self) -> None:
        self._tensors = None
