"""Checks of a model folder that can run before Ray starts or any weights load: config.json readable, weights
present, lengths within the model's, LoRA target modules present. Each failure is one UserError line; inside
vLLM or a Ray Train worker the same mistake costs an engine start or max_failures retries and 100+ lines of log."""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError

WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")


def read_model_config(folder: Path, where: str) -> dict:
    """config.json of a local model folder, checked to be a JSON object."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: {folder}/config.json is not valid JSON ({str(e).splitlines()[0][:100]}); "
                        f"restore it from the model's original files") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: {folder}/config.json is not a JSON object; restore it from the model's original "
                        f"files")
    return cfg


def check_model_files(folder: Path, where: str) -> None:
    """A local HF model folder that transformers and vLLM can load: a readable config.json and a weights file."""
    read_model_config(folder, where)
    if not any(next(folder.glob(g), None) for g in WEIGHTS):
        raise UserError(f"{where}: {folder} has a config.json but no weights (*.safetensors or *.bin); copy the "
                        f"model's weight files there, or rerun `bash scripts/setup.sh` for the embedded models")


def max_positions(cfg: dict) -> int | None:
    """The longest sequence the model was built for (text config of a multimodal model included)."""
    for c in (cfg, cfg.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(c.get(key), int):
                return c[key]
    return None


def check_max_model_len(path: str, max_model_len: int, where: str) -> None:
    """model.max_model_len within the model's max_position_embeddings (vLLM refuses it deep in its engine)."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: vLLM checks it
    limit = max_positions(read_model_config(folder, where))
    if limit is not None and max_model_len > limit:
        raise UserError(f"{where}: model.max_model_len={max_model_len} is beyond what {path} supports "
                        f"(max_position_embeddings={limit} in its config.json); set model.max_model_len <= {limit}")


def module_names(path: str, trust_remote_code: bool = False) -> dict[str, bool] | None:
    """{module name: is a leaf} of the model, built from its config on the meta device (no weights read, no
    memory); None if the architecture cannot be built that way (then peft reports it as before)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a best-effort early check; the real load reports its own errors
        return None
    return {name: next(m.children(), None) is None for name, m in model.named_modules() if name}


def check_lora_targets(path: str, lora: dict, where: str) -> None:
    """lora_config.target_modules must match some module of the model, as peft matches them (a name, or the end of
    a dotted name; a string is a regex over the whole name)."""
    targets = lora.get("target_modules")
    if not targets or targets == "all-linear" or "all-linear" in targets:
        return
    names = module_names(path)
    if names is None:
        return
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_cfg = peft.LoraConfig(**lora)
    if any(check_target_module_exists(peft_cfg, n) for n in names):
        return
    leaves = sorted({n.rsplit(".", 1)[-1] for n, leaf in names.items() if leaf})
    raise UserError(f"{where}: lora_config.target_modules {targets} match no module of {path}; its modules are "
                    f"named {leaves}: pick from these (e.g. the attention/MLP projections)")
