"""Loading released AudioLDM checkpoints (Lightning `state_dict` layout) into our parts, with a key report.

Prefixes: `model.diffusion_model.` → UNet, `first_stage_model.` → VAE (its `vocoder.` → HiFi-GAN, in
weight-norm form or plain as the original saves it after `remove_weight_norm`),
top-level `scale_factor` → the VAE's scale, `generator.` → HiFi-GAN (a vocoder checkpoint),
`model_ema.` → EMA weights of the UNet (LitEma stores names without dots), `cond_stage_model.` (and
the training repo's `cond_stage_models.0.`) → the conditioner. A CLAP in laion_clap names (released
files) is converted to transformers' `ClapModel` names (`models/clap.py`); its keys with no ClapModel
counterpart (torchlibrosa front end, attention masks, AudioSet head, transform MLPs) are reported as
`ignored`. Our exports store `cond_stage_model.model.<ClapModel key>` and load as they are. Keys a
released file lacks are warnings (the released files omit some parts); a shape mismatch is an
error naming the key.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from audioldm_dist.models.clap import convert_laion_state_dict, is_laion_layout

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
    ignored: list[str] = field(default_factory=list)
    """Known keys of the released layout that we do not need (the laion CLAP's extras)."""


@dataclass
class LoadReport:
    parts: dict[str, PartReport] = field(default_factory=lambda: {part: PartReport() for part in PARTS})
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    ema_num_updates: int | None = None
    """LitEma's `model_ema.num_updates` (sets where the EMA's decay warm-up stands), when the file has it."""
    other: list[str] = field(default_factory=list)
    not_read: list[str] = field(default_factory=list)
    """Keys of our parts that the caller did not ask for (`load_pretrained(parts=...)`, e.g. `vae.reload_from_ckpt`)."""

    @property
    def ok(self) -> bool:
        return not any(report.mismatched for report in self.parts.values())

    def summary(self) -> str:
        lines = [f"{'part':<12}{'matched':>9}{'missing':>9}{'unexpected':>12}{'shape errors':>14}{'ignored':>9}"]
        for name, report in self.parts.items():
            lines.append(f"{name:<12}{len(report.matched):>9}{len(report.missing):>9}{len(report.unexpected):>12}"
                         f"{len(report.mismatched):>14}{len(report.ignored):>9}")
        if self.ema:
            lines.append(f"EMA weights of the UNet: {len(self.ema)} tensors")
        if self.other:
            lines.append(f"ignored (no part of ours): {len(self.other)} keys, e.g. {', '.join(self.other[:3])}")
        if self.not_read:
            lines.append(f"not read (parts not asked for): {len(self.not_read)} keys, e.g. {', '.join(self.not_read[:3])}")
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
    for prefix in CONDITIONER_PREFIXES:
        if key.startswith(prefix):
            return "conditioner", key[len(prefix):]
    return None


CONDITIONER_PREFIXES = ("cond_stage_model.", "cond_stage_models.0.")
"""Released files and our exports; the training repo's ModuleList (DDPM:1035, 1146)."""


def convert_laion_conditioner(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A laion_clap CLAP under the conditioner prefixes → `cond_stage_model.model.<ClapModel key>`;
    returns the new state dict and the ignored original keys (unchanged when not in laion layout)."""
    laion = {key: value for key, value in state.items() if key.startswith(CONDITIONER_PREFIXES)}
    if not is_laion_layout(laion):
        return state, []
    converted, ignored = convert_laion_state_dict(laion)
    rest = {key: value for key, value in state.items() if key not in laion}
    return rest | {f"cond_stage_model.model.{key}": value for key, value in converted.items()}, ignored


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
    if "conditioner" in expected and any(key.startswith("model.text_model.") for key in expected["conditioner"]):
        state, report.parts["conditioner"].ignored = convert_laion_conditioner(state)
    state = _normalise_vocoder(state, expected.get("vocoder"))
    ema_names = {name.replace(".", ""): name for name in expected.get("unet", {})}
    for key, tensor in state.items():
        if key == "model_ema.num_updates":
            report.ema_num_updates = int(tensor)
            continue
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
            report.not_read.append(key)
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


def load_conditioner_unless_supplied(model: nn.Module, report: LoadReport | None, *,
                                     checkpoint: str | Path | None) -> None:
    """After `load_pretrained`: the checkpoint's conditioner if it filled every tensor (then
    `conditioner.pretrained` is not read), else `conditioner.load_weights()` from `pretrained`.

    A checkpoint that fills only part of the conditioner is a `CheckpointError` naming the missing keys."""
    part = report.parts["conditioner"] if report is not None else PartReport()
    if part.matched and not part.missing:
        log.info("conditioner: %d tensors from %s; conditioner.pretrained is not read", len(part.matched), checkpoint)
        return
    if part.matched:
        raise CheckpointError(f"{checkpoint}: has {len(part.matched)} conditioner tensors but lacks "
                              f"{len(part.missing)}, e.g. {', '.join(part.missing[:3])}")
    model.conditioner.load_weights()
