"""Caption lists and output names of the inference CLI."""
from pathlib import Path

import pytest

from audioldm_dist.infer import read_prompts, safe_name
from processes import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_both_list_forms_and_safe_unique_names(tmp_path: Path) -> None:
    path = tmp_path / "captions.lst"
    path.write_text("A dog barks\n../../etc/passwd|A cat meows\nA dog barks\nbirds|Birds sing at dawn\n")
    prompts = read_prompts(path)
    assert [p.caption for p in prompts] == ["A dog barks", "A cat meows", "A dog barks", "Birds sing at dawn"]
    assert [p.name for p in prompts] == ["A_dog_barks", "passwd", "A_dog_barks_2", "birds"]
    assert all("/" not in p.name and p.name for p in prompts)
    assert safe_name("../..") == "untitled"


@pytest.mark.parametrize("text,line", [("A dog barks\n\nA cat\n", 2), ("ok\nname|\n", 2), ("|caption only\n", 1)])
def test_bad_lines_are_reported_with_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "bad.lst"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{path}:{line}: "):
        read_prompts(path)


CAPTIONS = ["A steady sine wave tone", "A wailing siren", "A fast rhythmic beat", "White noise hiss",
            "A rising chirp"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model written in the released layout, with the tokenizer captions our exports carry."""
    import torch

    from audioldm_dist.config import load_config
    from audioldm_dist.engine.released import PREFIX
    from audioldm_dist.ldm import AudioLDM

    torch.manual_seed(0)
    model = AudioLDM(load_config(ROOT / "configs" / "tiny.yaml"), captions=CAPTIONS)
    state = {PREFIX[part] + key: tensor for part in PREFIX for key, tensor in getattr(model, part).state_dict().items()
             if key != "scale_factor"}
    state["scale_factor"] = torch.tensor(1.0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": state, "audioldm_dist": {"captions": CAPTIONS, "step": 7}}, path)
    return path


def _infer(ckpt: Path, out: Path, lst: Path, *extra: str) -> int:
    from audioldm_dist.infer import main

    return main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--ckpt", str(ckpt), "--list_inference", str(lst),
                 "--out", str(out), "--ddim_steps", "4", "--batch_size", "2", *extra])


def _audio(folder: Path) -> dict[str, "np.ndarray"]:
    import soundfile

    return {p.stem: soundfile.read(str(p))[0] for p in sorted(folder.glob("*.wav"))}


def test_rank_split_covers_every_caption_once() -> None:
    from audioldm_dist.infer import chunks_for_rank

    for count in (1, 5, 8, 13):
        for world in (1, 2, 3, 8):
            dealt = [i for r in range(world) for chunk in chunks_for_rank(count, batch_size=3, rank=r, world_size=world)
                     for i in chunk]
            assert sorted(dealt) == list(range(count)), (count, world)


@pytest.mark.slow
def test_same_seed_same_audio_on_one_or_two_ranks(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    lst = tmp_path / "captions.lst"
    lst.write_text("\n".join(CAPTIONS) + "\n")
    assert _infer(tiny_checkpoint, tmp_path / "a", lst, "--seed", "3") == 0
    assert _infer(tiny_checkpoint, tmp_path / "b", lst, "--seed", "3") == 0
    assert _infer(tiny_checkpoint, tmp_path / "c", lst, "--seed", "4") == 0
    a, b, c = _audio(tmp_path / "a"), _audio(tmp_path / "b"), _audio(tmp_path / "c")
    assert len(a) == 5 and all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(np.allclose(a[k], c[k]) for k in a)
    sidecar = json.loads((tmp_path / "a" / "A_wailing_siren.json").read_text())
    assert sidecar["caption"] == "A wailing siren" and sidecar["step"] == 7 and sidecar["seed"] == 3

    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
               "audioldm_dist.infer", "--config", "configs/tiny.yaml", "--ckpt", str(tiny_checkpoint),
               "--list_inference", str(lst), "--out", str(tmp_path / "two"), "--ddim_steps", "4", "--batch_size", "2",
               "--seed", "3"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    two = _audio(tmp_path / "two")
    assert sorted(two) == sorted(a) and all(np.allclose(two[k], a[k], atol=1e-6) for k in a)


def test_best_of_n_candidates_by_clap_and_duration(tiny_checkpoint: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept file is the candidate with the highest CLAP text-audio cosine, scored here one candidate at a
    time from the waveforms the model generated (recorded by wrapping `AudioLDM.generate`)."""
    import json

    import soundfile
    import torch

    from audioldm_dist.ldm import AudioLDM

    generated: list[tuple[AudioLDM, list[str], torch.Tensor]] = []
    generate = AudioLDM.generate

    def recording(self, texts, **kwargs):
        waveforms = generate(self, texts, **kwargs)
        generated.append((self, list(texts), waveforms.detach().float().cpu()))
        return waveforms

    monkeypatch.setattr(AudioLDM, "generate", recording)
    lst = tmp_path / "captions.lst"
    lst.write_text("tone|A steady sine wave tone\nsiren|A wailing siren\n")
    assert _infer(tiny_checkpoint, tmp_path / "best", lst, "--n_candidates", "3", "--duration", "2.56") == 0
    (model, texts, waveforms), = generated  # one batch: 2 captions × 3 candidates, (6, 1, T)
    assert texts == ["A steady sine wave tone"] * 3 + ["A wailing siren"] * 3
    for index, name in enumerate(("tone", "siren")):
        candidates = waveforms[3 * index:3 * index + 3]
        with torch.no_grad():
            scores = [float(torch.nn.functional.cosine_similarity(
                model.conditioner.encode_text([texts[3 * index]], device=torch.device("cpu")).film,
                model.conditioner.encode_audio(candidate[None], sample_rate=16000).film)) for candidate in candidates]
        best = max(range(3), key=scores.__getitem__)
        assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-6, scores  # a real choice, not a tie
        sidecar = json.loads((tmp_path / "best" / f"{name}.json").read_text())
        assert sidecar["n_candidates"] == 3 and sidecar["clap_score"] == pytest.approx(scores[best], abs=1e-5)
        kept, rate = soundfile.read(str(tmp_path / "best" / f"{name}.wav"), dtype="float32")
        assert rate == 16000 and len(kept) == 40960  # 2.56 s at 16 kHz
        distances = [float((torch.from_numpy(kept) - candidate[0]).abs().max()) for candidate in candidates]
        assert distances[best] < 1e-4 < min(d for i, d in enumerate(distances) if i != best), (distances, scores)
    assert _infer(tiny_checkpoint, tmp_path / "bad", lst, "--duration", "1.0") == 2


def test_an_unknown_checkpoint_layout_gets_the_key_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    odd = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {"encoder.layer.0.weight": torch.zeros(3, 3)}}, odd)
    lst = tmp_path / "captions.lst"
    lst.write_text("A wailing siren\n")
    assert _infer(odd, tmp_path / "out", lst) == 2
    err = capsys.readouterr().err
    assert "lacks weights of unet, vae, vocoder, conditioner" in err
    assert "part" in err and "matched" in err and "ignored (no part of ours): 1 keys" in err
    assert not list((tmp_path / "out").glob("*.wav"))
