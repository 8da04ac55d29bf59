"""Loading released AudioLDM checkpoints (Lightning `state_dict` layout) into our parts, with a key report.

Prefixes: `model.diffusion_model.` → UNet, `first_stage_model.` → VAE (its `vocoder.` → HiFi-GAN, in
weight-norm form or plain as the original saves it after `remove_weight_norm`),
top-level `scale_factor` → the VAE's scale, `generator.` → HiFi-GAN (a vocoder checkpoint),
`model_ema.` → EMA weights of the UNet (LitEma stores names without dots), `cond_stage_model.` →
the conditioner (laion_clap names; the transformers port needs its own `from_pretrained`). Keys a
released file lacks are warnings (the released files omit some parts); a shape mismatch is an
error naming the key.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "vocoder", "conditioner")


class CheckpointError(ValueError):
    """An unreadable checkpoint or a tensor whose shape does not fit; names the file or key."""


@dataclass
class PartReport:
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    parts: dict[str, PartReport] = field(default_factory=lambda: {part: PartReport() for part in PARTS})
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(report.mismatched for report in self.parts.values())

    def summary(self) -> str:
        lines = [f"{'part':<12}{'matched':>9}{'missing':>9}{'unexpected':>12}{'shape errors':>14}"]
        for name, report in self.parts.items():
            lines.append(f"{name:<12}{len(report.matched):>9}{len(report.missing):>9}{len(report.unexpected):>12}"
                         f"{len(report.mismatched):>14}")
        if self.ema:
            lines.append(f"EMA weights of the UNet: {len(self.ema)} tensors")
        if self.other:
            lines.append(f"ignored (no part of ours): {len(self.other)} keys, e.g. {', '.join(self.other[:3])}")
        for name, report in self.parts.items():
            for key in report.mismatched:
                lines.append(f"SHAPE ERROR {name}: {key}")
            for key in report.missing[:10]:
                lines.append(f"missing {name}: {key}")
            if len(report.missing) > 10:
                lines.append(f"missing {name}: ... and {len(report.missing) - 10} more")
            for key in report.unexpected[:10]:
                lines.append(f"unexpected {name}: {key}")
            if len(report.unexpected) > 10:
                lines.append(f"unexpected {name}: ... and {len(report.unexpected) - 10} more")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt/.bin (Lightning `state_dict`, a raw state dict, or `generator`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]})") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    elif isinstance(raw, dict) and isinstance(raw.get("generator"), dict):  # a HiFi-GAN checkpoint
        raw = {f"generator.{key}": value for key, value in raw["generator"].items()}
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or one under 'state_dict')")
    return raw


def read_export_metadata(path: str | Path) -> dict:
    """The `audioldm_dist` metadata of a file written by our export (config, step, captions), else {}."""
    try:
        raw = torch.load(Path(path), map_location="cpu", weights_only=False)
    except Exception:
        return {}
    return raw.get("audioldm_dist", {}) if isinstance(raw, dict) else {}


def _route(key: str) -> tuple[str, str] | None:
    """Released key → (part, our key)."""
    if key.startswith("model.diffusion_model."):
        return "unet", key[len("model.diffusion_model."):]
    if key.startswith("first_stage_model.vocoder."):
        return "vocoder", key[len("first_stage_model.vocoder."):]
    if key.startswith("first_stage_model."):
        return "vae", key[len("first_stage_model."):]
    if key == "scale_factor":
        return "vae", "scale_factor"
    if key.startswith("generator."):
        return "vocoder", key[len("generator."):]
    if key.startswith("cond_stage_model."):
        return "conditioner", key[len("cond_stage_model."):]
    return None


def weight_norm_form(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain weight → (weight_g, weight_v) of `nn.utils.weight_norm(dim=0)` that give it back exactly.

    g = ‖w‖ over every dim but 0 and v = w, so g·v/‖v‖ = w (for Conv1d and ConvTranspose1d alike)."""
    norm = weight.flatten(1).norm(dim=1).reshape(-1, *([1] * (weight.dim() - 1)))
    return norm, weight.clone()


def _vocoder_to_weight_norm(part_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
    """The original saves HiFi-GAN after `remove_weight_norm` (plain `.weight`, utilities/model_util.py `get_vocoder`);
    ours keeps weight norm (`weight_g`/`weight_v`): convert the plain form wherever the model expects the other."""
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in part_state.items():
        stem = name[: -len("weight")]
        if name.endswith(".weight") and name not in expected and stem + "weight_g" in expected:
            converted[stem + "weight_g"], converted[stem + "weight_v"] = weight_norm_form(tensor)
        else:
            converted[name] = tensor
    return converted


def map_state_dict(state: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> tuple[dict[str, dict], LoadReport]:
    """Splits a released state dict into per-part state dicts and reports what matched."""
    report = LoadReport()
    per_part: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    expected = {part: module.state_dict() for part, module in modules.items()}
    state = _normalise_vocoder(state, expected.get("vocoder"))
    ema_names = {name.replace(".", ""): name for name in expected.get("unet", {})}
    for key, tensor in state.items():
        if key.startswith("model_ema."):
            name = ema_names.get(key[len("model_ema."):].removeprefix("diffusion_model"))
            if name is not None:
                report.ema[name] = tensor
            continue
        routed = _route(key)
        if routed is None:
            report.other.append(key)
            continue
        part, name = routed
        if part not in expected:
            report.other.append(key)
            continue
        if name == "scale_factor" and tensor.dim() == 0 and part == "vae":
            per_part[part][name] = tensor.reshape(())
            report.parts[part].matched.append(key)
        elif name not in expected[part]:
            report.parts[part].unexpected.append(key)
        elif tuple(expected[part][name].shape) != tuple(tensor.shape):
            report.parts[part].mismatched.append(
                f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[part][name].shape)}")
        else:
            per_part[part][name] = tensor
            report.parts[part].matched.append(key)
    for part, names in expected.items():
        report.parts[part].missing = sorted(set(names) - set(per_part[part]))
    return per_part, report


def _normalise_vocoder(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor] | None
                       ) -> dict[str, torch.Tensor]:
    """`state` with a plain-weight vocoder (either prefix) put in weight-norm form; other keys untouched."""
    if expected is None:
        return state
    out: dict[str, torch.Tensor] = {}
    for prefix in ("first_stage_model.vocoder.", "generator."):
        vocoder = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        out.update({prefix + key: value for key, value in _vocoder_to_weight_norm(vocoder, expected).items()})
    out.update({key: value for key, value in state.items()
                if not key.startswith(("first_stage_model.vocoder.", "generator."))})
    return out


def load_pretrained(model: nn.Module, source: str | Path | dict[str, torch.Tensor], *,
                    parts: tuple[str, ...] = PARTS) -> LoadReport:
    """Loads what matches into `model` (an `AudioLDM`), like the original's strict=False, but loud.

    Missing keys are logged as warnings; shape mismatches raise `CheckpointError` naming every key.
    """
    state = read_state_dict(source) if not isinstance(source, dict) else source
    modules = {part: getattr(model, part) for part in parts if hasattr(model, part)}
    per_part, report = map_state_dict(state, modules)
    if not report.ok:
        raise CheckpointError("checkpoint does not fit the model config:\n" +
                              "\n".join(f"  {part}: {key}" for part, r in report.parts.items() for key in r.mismatched))
    for part, module in modules.items():
        if per_part[part]:
            module.load_state_dict(per_part[part], strict=False)
    for line in report.summary().splitlines():
        log.warning(line) if line.startswith(("missing", "unexpected")) else log.info(line)
    return report
