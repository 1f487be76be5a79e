"""Export on the node, then use the prompt as a public user would: same logits, clear errors."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_to_proto
from PIL import Image

import client_app as client_module
import server_app as server_module
from dpfpl_app.backbones.backbone import FrozenClip, load_frozen_clip
from dpfpl_app.config import RunConfig
from dpfpl_app.data.features import encode_pixels
from dpfpl_app.data.image_processing import images_to_pixel_values
from dpfpl_app.data.offline_data import DIGIT_CLASS_NAMES, federated_pool
from dpfpl_app.federation.client_node import build_trainer, save_state, state_directory
from dpfpl_app.federation.prompt_export import export_path
from dpfpl_app.method.client_trainer import ClientTrainer
from dpfpl_app.method.prompt_file import PromptFile, PromptFileError, load_prompt_file
from dpfpl_app.privacy.dp_channel import Guarantee
from dpfpl_app.service.cli import main as cli_main
from dpfpl_app.service.predict import Prediction, PromptClassifier, classify
from tests.flower_harness import federation_config, run_server_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp: Path, **overrides: object) -> RunConfig:
    return RunConfig.from_flower(
        federation_config(tmp, **{"min-nodes": 3, "batch-size": 16, **overrides})
    )


@pytest.fixture(scope="module")
def exported(
    digits_backbone: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ClientTrainer, Path]:
    """A client trained two per-sample DP rounds, its prompt exported by ``save_state``."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = _config(tmp, **{"reproducible-noise": False})  # secret noise: an accounted epsilon
    context = Context(
        run_id=7,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config=cfg.to_flower(),
    )
    trainer = build_trainer(cfg, context)
    global_prompt = 0.02 * torch.randn(
        trainer.learner.global_prompt.shape, generator=torch.Generator().manual_seed(1)
    )
    for server_round in (1, 2):
        trainer.train_round(global_prompt, server_round)
    save_state(trainer, cfg, context)
    return trainer, export_path(state_directory(cfg, context, 0))


@pytest.fixture(scope="module")
def digits_clip(digits_backbone: Path) -> FrozenClip:
    return load_frozen_clip(str(digits_backbone), device="cpu")


def _write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"img-{i:02d}.png")
        Image.fromarray(image, mode="L").save(paths[-1])
    return paths


def test_export_load_predict_gives_the_client_models_logits(
    exported: tuple[ClientTrainer, Path],
) -> None:
    trainer, path = exported
    features = torch.cat([trainer.data.local_features, trainer.data.neighbour_features])

    classifier = PromptClassifier.from_file(path, device="cpu")  # backbone named in the file

    assert torch.equal(classifier.logits(features), trainer.learner.logits(features))


def test_export_records_the_trainers_real_privacy_spend(
    exported: tuple[ClientTrainer, Path],
) -> None:
    trainer, path = exported

    meta = load_prompt_file(path).metadata

    privacy = meta.privacy
    assert privacy.guarantee is Guarantee.ACCOUNTED and "composed" in privacy.meaning
    assert privacy.steps == trainer.steps_taken == 2
    # at the node's own declared rate, which is below the plan's bound here
    assert privacy.epsilon == pytest.approx(trainer.plan.epsilon(2, trainer.sample_rate))
    assert 0 < privacy.epsilon < trainer.plan.epsilon(2)
    assert meta.class_names == DIGIT_CLASS_NAMES
    assert (meta.method.value, meta.rank, meta.n_ctx, meta.rounds_done) == ("dpfpl", 8, 16, 2)
    assert meta.backbone == "dpfpl-tiny-digits" and meta.backbone_sha256.startswith("sha256:")


def test_predict_on_image_files_matches_the_federated_feature_path(
    exported: tuple[ClientTrainer, Path], digits_clip: FrozenClip, tmp_path: Path
) -> None:
    # Prepare: 12 digit images as PNG files, and their features as the clients compute them
    trainer, path = exported
    images = federated_pool("digits").images[:12]
    paths = _write_pngs(tmp_path / "imgs", images)
    reference = encode_pixels(digits_clip, images_to_pixel_values(digits_clip.processor, images))
    classifier = PromptClassifier(load_prompt_file(path), digits_clip)

    # Execute
    results = list(classify(classifier, [tmp_path / "imgs"], top_k=3, batch_size=5))

    # Assert: same pixels and features, top-1 and probabilities of the client's model
    expected = torch.softmax(trainer.learner.logits(reference), dim=1)
    assert [r.path for r in results] == [str(p) for p in paths]
    for row, result in enumerate(results):
        assert isinstance(result, Prediction) and len(result.top) == 3
        name, prob = result.top[0]
        assert name == DIGIT_CLASS_NAMES[int(expected[row].argmax())]
        assert prob == pytest.approx(float(expected[row].max()), abs=1e-4)


def test_a_prompt_is_refused_on_another_backbone(
    exported: tuple[ClientTrainer, Path], clip: FrozenClip, digits_clip: FrozenClip, tmp_path: Path
) -> None:
    # Prepare: the same prompt on the random plumbing CLIP, and a prompt of another width
    _, path = exported
    prompt_file = load_prompt_file(path)
    narrow_meta = prompt_file.metadata.model_copy(update={"text_width": 64})
    narrow = PromptFile(prompt=torch.zeros(16, 64), metadata=narrow_meta)
    narrow_path = narrow.save(tmp_path / "narrow.safetensors")

    # Execute / Assert
    with pytest.raises(PromptFileError, match="only works on the exact weights"):
        PromptClassifier(prompt_file, clip)
    with pytest.raises(PromptFileError, match="embedding width 64"):
        PromptClassifier(load_prompt_file(narrow_path), digits_clip)


def test_bad_inputs_are_reported_and_the_rest_of_the_batch_is_classified(
    exported: tuple[ClientTrainer, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: good PNGs, a text file, a truncated PNG, random bytes, a missing file, and a
    # folder that cannot be listed (root ignores chmod, so listing it raises by patch)
    _, path = exported
    folder = tmp_path / "batch"
    good = _write_pngs(folder, federated_pool("digits").images[:3])
    (folder / "notes.txt").write_text("not an image")
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:-30])  # cut mid-IDAT
    (folder / "noise.jpg").write_bytes(bytes(range(256)) * 4)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_iterdir = pathlib.Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    args = ["predict", "--prompt", str(path), "--json", "--device", "cpu", "--top-k", "2"]

    # Execute
    code = cli_main([*args, str(folder), str(tmp_path / "missing.png"), str(locked)])

    # Assert
    out = json.loads(capsys.readouterr().out)
    by_name = {Path(r["path"]).name: r for r in out}
    assert code == 1
    assert all(len(by_name[p.name]["top"]) == 2 for p in good)
    assert "not an image format" in by_name["notes.txt"]["error"]
    assert "cannot decode" in by_name["truncated.png"]["error"]
    assert "not an image format" in by_name["noise.jpg"]["error"]
    assert "no such file" in by_name["missing.png"]["error"]
    assert "Permission denied" in by_name["locked"]["error"]
    assert len(out) == 8


def test_a_bad_file_is_named_once_per_line_of_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: no image is readable, so the classifier is never asked and a stub will do
    missing = tmp_path / "missing.png"
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    monkeypatch.setattr(PromptClassifier, "from_file", classmethod(lambda cls, *a, **k: None))

    # Execute
    prompt = str(tmp_path / "p.safetensors")
    code = cli_main(["predict", "--prompt", prompt, str(missing), str(notes)])

    # Assert: every line that mentions a file mentions it exactly once
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert code == 1
    for path in (missing, notes):
        mentioning = [line for line in lines if str(path) in line]
        assert len(mentioning) == 2  # the result line (stdout) and the error line (stderr)
        assert all(line.count(str(path)) == 1 for line in mentioning), mentioning


def test_a_tampered_prompt_file_stops_predict_with_a_clear_error(
    exported: tuple[ClientTrainer, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, path = exported
    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    tampered.write_bytes(bytes(data))

    code = cli_main(["predict", "--prompt", str(tampered), str(tmp_path)])

    assert code == 2
    assert "failed its integrity check" in capsys.readouterr().err


def test_exports_stay_on_the_nodes_and_record_the_runs_composed_epsilon(
    digits_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: the real ClientApp, which exports after every train and evaluate message
    cfg = _config(tmp_path, **{"min-nodes": 3})
    replies: list[Message] = []

    # Execute
    run_server_app(
        server_module.app,
        client_app=client_module.app,
        num_nodes=3,
        run_config=cfg.to_flower(),
        on_reply=replies.append,
    )

    # Assert: every node exported; each file's composed epsilon is the one the server
    # recorded for that node (same public plan, same steps, the node's declared rate),
    # the largest of them is the run's printed after round 3; no reply carries the prompt
    doc = json.loads((tmp_path / "runs" / "t" / "results.json").read_text())
    rounds = doc["rounds"]
    node_epsilons = [e["epsilon"] for e in doc["summary"]["privacy"]["node-epsilons"].values()]
    files = sorted((tmp_path / "state" / "t").glob("partition-*/prompt.safetensors"))
    assert len(files) == 3
    exports = [load_prompt_file(f) for f in files]
    for export in exports:
        # the tests' runs derive their noise from the public seed: the file must say so
        assert export.metadata.privacy.guarantee is Guarantee.NOMINAL_PUBLIC_SEED
        assert "NOT a guarantee" in export.metadata.privacy.meaning
        assert export.metadata.rounds_done == 3
    assert sorted(e.metadata.privacy.epsilon for e in exports) == pytest.approx(
        sorted(node_epsilons)
    )
    assert max(node_epsilons) == pytest.approx(rounds[2]["epsilon"])
    for reply in replies:
        wire_bytes = message_to_proto(reply).SerializeToString()
        for export in exports:
            assert export.prompt.numpy().tobytes()[:64] not in wire_bytes
        for record in reply.content.array_records.values():
            for tensor in record.to_torch_state_dict().values():
                assert all(not torch.allclose(tensor, e.prompt, atol=1e-6) for e in exports)
