"""Evaluation metrics and CLI: Fréchet distance against closed forms, KL/IS, pairing, backbones, end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import soundfile
import torch

from audioldm_dist.eval.backbones import build_backbones, load_weights, read_state_dict
from audioldm_dist.eval.cli import main
from audioldm_dist.eval.config import EvalConfig, load_eval_config
from audioldm_dist.eval.files import pair_by_name
from audioldm_dist.eval.frechet import Gaussian, fit_gaussian, frechet_distance, frechet_distance_of_embeddings
from audioldm_dist.eval.metrics import METRIC_KEYS
from audioldm_dist.eval.panns import Cnn14
from audioldm_dist.eval.scores import KL_EPS, inception_score, kl_divergences
from audioldm_dist.eval.vggish import VGGish


def scipy_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The textbook closed form with scipy's general matrix square root (full-rank covariances only)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(covmean)).max() < 1e-8
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.standard_normal((dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


# --- Fréchet distance -------------------------------------------------------------------------------------------

def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    rng = np.random.default_rng(0)
    for num, dim in [(500, 8), (10, 64), (3, 512)]:  # full rank, and far fewer samples than dimensions
        x = rng.standard_normal((num, dim)) * 3.0 + 1.0
        assert frechet_distance_of_embeddings(x, x) == pytest.approx(0.0, abs=1e-9)
        assert frechet_distance(fit_gaussian(x), fit_gaussian(x)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_closed_form_for_gaussian_samples() -> None:
    rng = np.random.default_rng(1)
    dim = 6
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) + 0.5
    cov1, cov2 = random_covariance(rng, dim), random_covariance(rng, dim)
    x = rng.multivariate_normal(mu1, cov1, size=4000)
    y = rng.multivariate_normal(mu2, cov2, size=3000)
    ours = frechet_distance_of_embeddings(x, y)
    sample_mu1, sample_mu2 = x.mean(axis=0), y.mean(axis=0)
    sample_cov1, sample_cov2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # Same statistics, scipy's sqrtm(Σ₁Σ₂): equal to round-off.
    assert ours == pytest.approx(scipy_frechet(sample_mu1, sample_cov1, sample_mu2, sample_cov2), rel=1e-9)
    # The population value: within sampling error.
    assert ours == pytest.approx(scipy_frechet(mu1, cov1, mu2, cov2), rel=0.1)
    # Commuting (diagonal) covariances have an elementary closed form.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    first = Gaussian(mean=np.zeros(3), cov=np.diag(a), num_samples=2)
    second = Gaussian(mean=np.array([1.0, 0.0, 2.0]), cov=np.diag(b), num_samples=2)
    assert frechet_distance(first, second) == pytest.approx(5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-12)


def test_frechet_distance_with_fewer_clips_than_dimensions_is_finite_and_consistent() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 64))
    y = rng.standard_normal((12, 64)) * 1.5 + 0.3
    low_rank = frechet_distance_of_embeddings(x, y)  # nuclear-norm route (N < D)
    via_covariances = frechet_distance(fit_gaussian(x), fit_gaussian(y))  # eigendecomposition route
    assert np.isfinite(low_rank) and low_rank > 0
    assert low_rank == pytest.approx(via_covariances, rel=1e-10)
    # A rank-deficient pair that scipy still handles once both covariances are made full rank by a tiny ridge.
    ridge = 1e-3 * np.eye(64)
    ridged = frechet_distance(Gaussian(mean=x.mean(0), cov=np.cov(x, rowvar=False) + ridge, num_samples=10),
                              Gaussian(mean=y.mean(0), cov=np.cov(y, rowvar=False) + ridge, num_samples=12))
    assert ridged == pytest.approx(scipy_frechet(x.mean(0), np.cov(x, rowvar=False) + ridge, y.mean(0),
                                                 np.cov(y, rowvar=False) + ridge), rel=1e-8)
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        frechet_distance_of_embeddings(x[:1], y)


# --- KL, IS, pairing ---------------------------------------------------------------------------------------------

def test_kl_of_identical_outputs_is_zero_and_matches_a_hand_computation() -> None:
    logits = np.random.default_rng(3).standard_normal((7, 527)) * 4
    same = kl_divergences(logits, logits)
    # audioldm_eval's log(p + 1e-6) leaves at most C·ε: zero to that precision.
    assert same["kullback_leibler_divergence_softmax"] == pytest.approx(0.0, abs=527 * KL_EPS)
    assert same["kullback_leibler_divergence_sigmoid"] == pytest.approx(0.0, abs=527 * KL_EPS)
    # Reference p = (1/2, 1/2), generated q = (3/4, 1/4): KL(p‖q) = ½ ln(2/3) + ½ ln 2.
    kl = kl_divergences(np.array([[np.log(3.0), 0.0]]), np.array([[0.0, 0.0]]))
    assert kl["kullback_leibler_divergence_softmax"] == pytest.approx(0.5 * np.log(2 / 3) + 0.5 * np.log(2), abs=1e-5)
    assert kl_divergences(logits[::-1].copy(), logits)["kullback_leibler_divergence_softmax"] > 1.0


def test_inception_score_counts_confidently_distinct_classes() -> None:
    confident = np.full((8, 8), -30.0)
    confident[np.arange(8), np.arange(8)] = 30.0  # each clip sure of a different class
    assert inception_score(confident, splits=1)["inception_score_mean"] == pytest.approx(8.0, rel=1e-6)
    assert inception_score(np.zeros((8, 8)))["inception_score_mean"] == pytest.approx(1.0)
    # Fewer clips than the 10 chunks: one chunk of all of them (audioldm_eval would report NaN).
    assert inception_score(confident[:3])["inception_score_mean"] == pytest.approx(3.0, rel=1e-6)


def test_pairing_matches_by_name_and_reports_unmatched_files() -> None:
    pairing = pair_by_name(["a", "b", "c", "x1", "x2", "x3"], ["a", "b", "c", "r1"])
    assert pairing.paired == ["a", "b", "c"]
    report = pairing.report(max_listed=2)
    assert report["generated_only"] == {"count": 3, "names": ["x1", "x2"]}
    assert report["reference_only"] == {"count": 1, "names": ["r1"]}


# --- backbones ---------------------------------------------------------------------------------------------------

def test_backbone_parameter_names_are_the_released_ones() -> None:
    panns = {"spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight",
             "logmel_extractor.melW", "fc1.weight", "fc1.bias", "fc_audioset.weight", "fc_audioset.bias"}
    panns |= {f"bn0.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for block in range(1, 7):
        panns |= {f"conv_block{block}.conv1.weight", f"conv_block{block}.conv2.weight"}
        panns |= {f"conv_block{block}.bn{n}.{p}" for n in (1, 2)
                  for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    model = Cnn14()
    assert set(model.state_dict()) == panns
    assert model.state_dict()["spectrogram_extractor.stft.conv_real.weight"].shape == (257, 1, 512)
    assert model.state_dict()["logmel_extractor.melW"].shape == (257, 64)
    vggish = {f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13) for p in ("weight", "bias")}
    vggish |= {f"embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert set(VGGish().state_dict()) == vggish


def test_front_ends_match_their_reference_computations() -> None:
    waveform = torch.from_numpy(np.random.default_rng(4).standard_normal(16000).astype(np.float32)) * 0.1
    cnn = Cnn14()
    ours = cnn.spectrogram_extractor(waveform[None])[0, 0]  # (frames, 257)
    stft = torch.stft(waveform, n_fft=512, hop_length=160, window=torch.hann_window(512), center=True,
                      pad_mode="reflect", return_complex=True).abs().pow(2).T
    torch.testing.assert_close(ours, stft, rtol=1e-3, atol=1e-3)
    # VGGish's mel_features in numpy: strided 400-sample frames, periodic Hann, |rfft(512)|, HTK mel, log(+0.01).
    x = waveform.double().numpy()
    num_frames = 1 + (len(x) - 400) // 160
    frames = np.lib.stride_tricks.as_strided(x, shape=(num_frames, 400), strides=(x.strides[0] * 160, x.strides[0]))
    spectrum = np.abs(np.fft.rfft(frames * (0.5 - 0.5 * np.cos(2 * np.pi / 400 * np.arange(400))), 512))
    to_mel = lambda hz: 1127.0 * np.log(1.0 + hz / 700.0)  # noqa: E731
    bins, edges = to_mel(np.linspace(0, 8000, 257)), np.linspace(to_mel(125.0), to_mel(7500.0), 66)
    weights = np.stack([np.maximum(0, np.minimum((bins - edges[i]) / (edges[i + 1] - edges[i]),
                                                 (edges[i + 2] - bins) / (edges[i + 2] - edges[i + 1])))
                        for i in range(64)], axis=1)
    weights[0] = 0.0
    expected = np.log(spectrum @ weights + 0.01)[:96][None, None]  # one 96-frame patch
    np.testing.assert_allclose(VGGish().front_end(waveform).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_checkpoints_load_strictly_and_bad_paths_name_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    panns, vggish = Cnn14(), VGGish()
    panns.init_random()
    vggish.init_random()
    panns_file, vggish_file = tmp_path / "Cnn14_16k_mAP=0.438.pth", tmp_path / "vggish-10086976.pth"
    torch.save({"iteration": 1, "model": panns.state_dict()}, panns_file)  # the released layouts
    torch.save(vggish.state_dict(), vggish_file)
    try:
        loaded = build_backbones(EvalConfig(panns_ckpt=str(panns_file), vggish_ckpt=str(vggish_file), device="cpu"))
    finally:  # 600 MB: do not leave them in pytest's kept temp folders
        panns_file.unlink()
        vggish_file.unlink()
    waveform = torch.randn(1, 16000)
    with torch.no_grad():
        torch.testing.assert_close(loaded.panns(waveform)["logits"], panns(waveform)["logits"])
        torch.testing.assert_close(loaded.vggish(waveform[0]), vggish(waveform[0]))
    # Another network's file (here VGGish-like keys): an error naming the file, not a silent partial load.
    wrong = tmp_path / "vggish_as_panns.pth"
    torch.save({"features.0.weight": torch.zeros(64, 1, 3, 3)}, wrong)
    state = read_state_dict(wrong, flag="--panns-ckpt", url="URL", trust=False)
    with pytest.raises(ValueError, match=r"--panns-ckpt .*vggish_as_panns\.pth: not a Cnn14 checkpoint; missing keys: "
                                         r"bn0\.bias.*unexpected keys: features\.0\.weight"):
        load_weights(Cnn14(), state, path=wrong, flag="--panns-ckpt", url="URL")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"fc1.bias": torch.zeros(2048)}, "sampler": Path("not a tensor")}, pickled)
    with pytest.raises(ValueError, match=r"pickled\.pth: the file holds more than tensors.*--trust-checkpoints"):
        read_state_dict(pickled, flag="--panns-ckpt", url="URL", trust=False)
    assert set(read_state_dict(pickled, flag="--panns-ckpt", url="URL", trust=True)) == {"fc1.bias"}
    with pytest.raises(ValueError, match="--panns-ckpt is required"):
        EvalConfig()


def test_eval_config_file_is_checked_and_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "eval.yaml"
    path.write_text("panns_ckpt: a.pth\nvggish_ckpt: b.pth\ndevice: cpu\n")
    config = load_eval_config(path, {"panns_ckpt": "c.pth", "random_backbones": None})
    assert (config.panns_ckpt, config.vggish_ckpt, config.random_backbones) == ("c.pth", "b.pth", False)
    path.write_text("panns_ckpt: a.pth\nvgish_ckpt: b.pth\n")
    with pytest.raises(ValueError, match=r"eval\.yaml: unknown key 'vgish_ckpt' in EvalConfig"):
        load_eval_config(path, {})


def test_a_missing_checkpoint_is_an_error_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "clips"
    write_clips(folder, ["a", "b"], seed=0)
    missing = tmp_path / "nowhere" / "Cnn14_16k_mAP=0.438.pth"
    code = main(["--generated", str(folder), "--reference", str(folder), "--panns-ckpt", str(missing),
                 "--vggish-ckpt", str(tmp_path / "vggish.pth"), "--device", "cpu"])
    assert code == 2
    assert f"--panns-ckpt {missing}: no such file" in capsys.readouterr().err


# --- end to end --------------------------------------------------------------------------------------------------

def write_clips(folder: Path, names: list[str], *, seed: int, sample_rate: int = 16000, channels: int = 1,
                captions: bool = False, base_hz: float = 220.0, seconds: float = 1.05) -> None:
    """1.05 s clips (by default): a tone per name plus noise (long enough for one VGGish patch at any rate)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    for index, name in enumerate(names):
        tone = 0.3 * np.sin(2 * np.pi * (base_hz + 110 * index) * t)
        audio = tone[:, None] + 0.05 * rng.standard_normal((t.size, channels))
        soundfile.write(str(folder / f"{name}.wav"), audio.astype(np.float32), sample_rate)
        if captions:
            (folder / f"{name}.json").write_text(json.dumps({"caption": f"a tone number {index}", "step": 2}))


def test_cli_evaluates_every_validation_folder_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    names = ["clip_a", "clip_b", "clip_c", "clip_d"]
    write_clips(run / "val_step0000020", names, seed=1, captions=True)
    write_clips(run / "val_step0000010", names + ["only_generated"], seed=2, captions=True)
    (run / "val_step0000010" / "broken.wav").write_bytes(b"RIFF\x00\x00not audio")
    write_clips(run / "val_reference", names + ["only_reference"], seed=3, sample_rate=22050, channels=2)
    args = ["--log_path", str(run), "--random-backbones", "--device", "cpu"]

    assert main(args) == 0

    step10 = json.loads((run / "val_step0000010.metrics.json").read_text())
    step20 = json.loads((run / "val_step0000020.metrics.json").read_text())
    for report in (step10, step20):
        assert set(report["metrics"]) == set(METRIC_KEYS)
        assert all(np.isfinite(report["metrics"][key]) for key in METRIC_KEYS), report["skipped_metrics"]
        assert report["metrics"]["frechet_distance"] > 0 and report["metrics"]["frechet_audio_distance"] > 0
        assert report["reference"] == str(run / "val_reference")
        assert "NOT comparable" in report["warning"]
        assert report["counts"]["paired"] == 4 and report["counts"]["clap_scored"] == report["counts"]["generated_used"]
    assert step10["counts"]["generated_files"] == 6 and step10["counts"]["generated_used"] == 5
    assert step10["failed_files"]["generated"]["count"] == 1
    assert step10["failed_files"]["generated"]["files"][0]["path"].endswith("broken.wav")
    assert step10["unmatched"]["generated_only"] == {"count": 2, "names": ["broken", "only_generated"]}
    assert step10["unmatched"]["reference_only"] == {"count": 1, "names": ["only_reference"]}

    summary = (run / "eval_summary.md").read_text()
    assert summary in capsys.readouterr().out
    rows = [line for line in summary.splitlines() if line.startswith("| val_step")]
    assert [row.split("|")[1].strip() for row in rows] == ["val_step0000010", "val_step0000020"]
    assert "WARNING" in summary and "NOT comparable" in summary

    # A second run reuses the stored results (same settings) instead of recomputing them.
    before = (run / "val_step0000020.metrics.json").read_text()
    assert main(args) == 0
    assert (run / "val_step0000020.metrics.json").read_text() == before


def test_cli_compares_two_folders_and_a_folder_with_itself(tmp_path: Path) -> None:
    generated, reference = tmp_path / "generated", tmp_path / "reference"
    write_clips(generated, ["x", "y", "z"], seed=5)
    write_clips(reference, ["x", "y", "z"], seed=6, sample_rate=44100, base_hz=2000.0)
    out_self, out_other = tmp_path / "self.json", tmp_path / "other.json"
    common = ["--random-backbones", "--device", "cpu"]
    assert main(["--generated", str(generated), "--reference", str(generated), "--out", str(out_self), *common]) == 0
    assert main(["--generated", str(generated), "--reference", str(reference), "--out", str(out_other), *common]) == 0
    same, other = json.loads(out_self.read_text()), json.loads(out_other.read_text())
    assert same["metrics"]["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert same["metrics"]["frechet_audio_distance"] == pytest.approx(0.0, abs=1e-6)
    assert same["metrics"]["kullback_leibler_divergence_softmax"] == pytest.approx(0.0, abs=527 * KL_EPS)
    assert other["metrics"]["frechet_distance"] > 1e-3 and other["metrics"]["frechet_audio_distance"] > 1e-3
    assert same["metrics"]["clap_score"] is None and "no captions" in same["skipped_metrics"]["clap_score"]


def test_clips_shorter_than_a_vggish_patch_are_listed_or_padded_with_pad_short(tmp_path: Path) -> None:
    generated, reference = tmp_path / "generated", tmp_path / "reference"
    write_clips(generated, ["x", "y", "z"], seed=5, seconds=0.64)  # the demo's trained length
    write_clips(reference, ["x", "y", "z"], seed=6)
    common = ["--generated", str(generated), "--reference", str(reference), "--random-backbones", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "skipped.json")]) == 0
    skipped = json.loads((tmp_path / "skipped.json").read_text())
    assert skipped["failed_files"]["generated"]["count"] == 3
    assert "too_short" in json.dumps(skipped["failed_files"]["generated"])
    assert skipped["metrics"]["frechet_audio_distance"] is None
    assert main([*common, "--out", str(tmp_path / "padded.json"), "--pad-short"]) == 0
    padded = json.loads((tmp_path / "padded.json").read_text())
    assert padded["failed_files"]["generated"]["count"] == 0 and padded["settings"]["pad_short"] is True
    assert padded["metrics"]["frechet_audio_distance"] > 1e-3 and padded["metrics"]["frechet_distance"] > 1e-3
