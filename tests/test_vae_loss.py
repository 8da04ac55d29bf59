"""The VAE objective (train.target=vae) against the original's LPIPSWithDiscriminator, and its weights errors.

The reference is the original's loss written out line by line (`audioldm_train/losses/contperceptual.py`,
"CP") on taming-transformers-rom1504's own LPIPS, NLayerDiscriminator, hinge_d_loss and adopt_weight
(`pip install --no-deps taming-transformers-rom1504==0.0.6`). taming's LPIPS calls torchvision's
`vgg16(pretrained=True)` and downloads `vgg.pth`: a stand-in `torchvision` module returns a VGG16 whose
`features` is built here from torchvision's layer list, and `load_from_pretrained` is skipped; both
networks then get the same random weights.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from audioldm_dist.config import VAEConfig
from audioldm_dist.models.discriminator import NLayerDiscriminator
from audioldm_dist.models.lpips import LPIPS, load_lpips, random_lpips
from audioldm_dist.models.vae import AutoencoderKL
from audioldm_dist.engine.objectives import discriminator_loss, disc_factor, generator_loss

KL_WEIGHT, DISC_WEIGHT, DISC_START = 1000.0, 0.5, 5


def _torchvision_vgg16_features() -> nn.Sequential:
    """torchvision.models.vgg16().features, configuration "D", written out independently of our module."""
    layers, channels = [], 3
    for width in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


@pytest.fixture
def taming(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("taming", reason="pip install --no-deps taming-transformers-rom1504==0.0.6")
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(vgg16=lambda pretrained=False: types.SimpleNamespace(
        features=_torchvision_vgg16_features()))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
    for name in [m for m in sys.modules if m.startswith("taming")]:
        monkeypatch.delitem(sys.modules, name)
    from taming.modules.losses import lpips as taming_lpips
    from taming.modules.losses import vqperceptual

    monkeypatch.setattr(taming_lpips.LPIPS, "load_from_pretrained", lambda self, name="vgg_lpips": None)
    return vqperceptual


def _reference_loss(taming, *, lpips, discriminator, inputs, reconstructions, posteriors, optimizer_idx: int,
                    global_step: int, last_layer) -> tuple[torch.Tensor, dict]:
    """CP:67-158, LPIPSWithDiscriminator.forward with logvar 0, kl_weight 1000, disc_weight 0.5, hinge."""
    logvar = torch.zeros(())  # CP:30, logvar_init=0
    rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())  # CP:72
    p_loss = lpips(inputs.contiguous(), reconstructions.contiguous())  # CP:75-79, perceptual_weight 1
    rec_loss = rec_loss + 1.0 * p_loss
    nll_loss = rec_loss / torch.exp(logvar) + logvar  # CP:81
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]  # CP:86
    kl_loss = posteriors.kl()
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]  # CP:87-88
    disc_factor_ = taming.adopt_weight(1.0, global_step, threshold=DISC_START)  # CP:114-116, 148-150
    if optimizer_idx == 0:
        logits_fake = discriminator(reconstructions.contiguous())  # CP:95-104
        g_loss = -torch.mean(logits_fake)
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]  # CP:41-56
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * DISC_WEIGHT
        loss = nll_loss + KL_WEIGHT * kl_loss + d_weight * disc_factor_ * g_loss  # CP:117-119
        return loss, {"rec_loss": rec_loss.mean(), "nll_loss": nll_loss, "kl_loss": kl_loss, "g_loss": g_loss,
                      "d_weight": d_weight, "disc_factor": torch.tensor(disc_factor_), "p_loss": p_loss.mean()}
    logits_real = discriminator(inputs.contiguous().detach())  # CP:138-139
    logits_fake = discriminator(reconstructions.contiguous().detach())
    d_loss = disc_factor_ * taming.hinge_d_loss(logits_real, logits_fake)  # CP:151
    return d_loss, {"disc_loss": d_loss}


def _models(taming):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1))
    ours_lpips, ours_disc = random_lpips(seed=3), NLayerDiscriminator(input_nc=1, ndf=64, n_layers=3)
    theirs_lpips = taming.LPIPS()
    theirs_disc = taming.NLayerDiscriminator(input_nc=1, n_layers=3, use_actnorm=False).apply(taming.weights_init)
    theirs_lpips.load_state_dict(ours_lpips.state_dict())  # same key names: taming's
    theirs_disc.load_state_dict(ours_disc.state_dict())
    for module in (vae, ours_lpips, ours_disc, theirs_lpips, theirs_disc):
        module.train()  # the original's Lightning .train(): LPIPS dropout and BatchNorm batch statistics on
    return vae, ours_lpips, ours_disc, theirs_lpips, theirs_disc


@pytest.mark.parametrize("step", [DISC_START - 1, DISC_START])
def test_vae_loss_terms_equal_the_original_before_and_after_disc_start(taming, step: int) -> None:
    vae, ours_lpips, ours_disc, theirs_lpips, theirs_disc = _models(taming)
    captured = {}
    vae.decoder.conv_out.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0].detach()))
    mel = torch.randn(2, 1, 32, 64, generator=torch.Generator().manual_seed(1))
    reconstruction, posterior = vae(mel, generator=torch.Generator().manual_seed(2))
    last_layer = vae.decoder.conv_out.weight
    factor = disc_factor(step, disc_start=DISC_START)
    assert factor == (0.0 if step < DISC_START else 1.0)

    d_loss, d_terms = discriminator_loss(ours_disc, mel, reconstruction, factor=factor)
    ref_d_loss, _ = _reference_loss(taming, lpips=theirs_lpips, discriminator=theirs_disc, inputs=mel,
                                    reconstructions=reconstruction, posteriors=posterior, optimizer_idx=1,
                                    global_step=step, last_layer=last_layer)
    hinge = taming.hinge_d_loss(theirs_disc(mel), theirs_disc(reconstruction.detach()))
    assert hinge > 0  # so the factor 0/1 comparison is not vacuous
    torch.testing.assert_close(d_loss, ref_d_loss, rtol=0, atol=1e-5)

    torch.manual_seed(7)  # the same LPIPS dropout masks for both
    surrogate, g_terms = generator_loss(mel, reconstruction, posterior, discriminator=ours_disc, lpips=ours_lpips,
                                        last_layer=vae.decoder.conv_out, last_layer_input=captured["x"],
                                        perceptual_weight=1.0, kl_weight=KL_WEIGHT, disc_weight=DISC_WEIGHT,
                                        factor=factor)
    torch.manual_seed(7)
    ref_loss, ref_terms = _reference_loss(taming, lpips=theirs_lpips, discriminator=theirs_disc, inputs=mel,
                                          reconstructions=reconstruction, posteriors=posterior, optimizer_idx=0,
                                          global_step=step, last_layer=last_layer)
    for name, expected in ref_terms.items():
        torch.testing.assert_close(g_terms[name].float(), expected.float(), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(g_terms["loss"], ref_loss.detach(), rtol=1e-6, atol=1e-5)
    assert float(g_terms["d_weight"]) > 0 and float(g_terms["p_loss"]) != 0
    # the surrogate the engine backpropagates gives the VAE the original loss's gradients
    params = [p for p in vae.parameters()]
    ours_grads = torch.autograd.grad(surrogate, params, retain_graph=True, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    scale = max(float(ref.abs().max()) for ref in ref_grads)  # biases before a GroupNorm: 0 up to rounding
    for ours, ref in zip(ours_grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * scale)


def test_lpips_dropout_is_active_in_train_mode_only() -> None:
    lpips = random_lpips(seed=0)
    x, y = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    lpips.eval()
    assert torch.equal(lpips(x, y), lpips(x, y))
    lpips.train()
    assert not torch.equal(lpips(x, y), lpips(x, y))


def test_missing_lpips_weights_are_a_clear_error(tmp_path) -> None:
    from audioldm_dist.config import load_config

    with pytest.raises(ValueError, match=r"vae\.lpips_weights is not set"):
        load_lpips(weights="", random_init=False)
    with pytest.raises(ValueError, match=r"vae\.lpips_weights=.*nothing\.pt: no such file"):
        load_lpips(weights=str(tmp_path / "nothing.pt"), random_init=False)
    with pytest.raises(ValueError, match=r"train\.target=vae needs vae\.lpips_weights"):
        load_config(None, ["train.target=vae"])
    partial = tmp_path / "heads_only.pt"
    torch.save({k: v for k, v in LPIPS().state_dict().items() if k.startswith("lin")}, partial)
    with pytest.raises(ValueError, match=r"heads_only\.pt: not an LPIPS VGG16 state dict.*missing \['net\.slice1"):
        load_lpips(weights=str(partial), random_init=False)


def test_lpips_weights_file_from_torchvision_vgg16_and_taming_heads(tmp_path) -> None:
    from audioldm_dist.models.lpips import main

    features = _torchvision_vgg16_features()
    vgg16 = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg16["classifier.0.weight"] = torch.zeros(1)  # torchvision's file has the classifier too; ignored
    heads = {k: v for k, v in random_lpips(seed=5).state_dict().items() if k.startswith("lin")}
    torch.save(vgg16, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    main(["--vgg16", str(tmp_path / "vgg16.pth"), "--heads", str(tmp_path / "vgg.pth"), "--out",
          str(tmp_path / "lpips.pt")])
    lpips = load_lpips(weights=str(tmp_path / "lpips.pt"), random_init=False)
    assert torch.equal(getattr(lpips.net.slice5, "28").weight, features[28].weight)
    assert torch.equal(lpips.lin4.model[1].weight, heads["lin4.model.1.weight"])
