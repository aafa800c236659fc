"""Family ``vit`` end to end on a tiny random-initialised ViT: export, a real PEFT LoRA adapter
with a trained-style classifier (``modules_to_save``), packets (lossless, data-free,
calibrated on a folder of images), and ``solar-edge run --image`` on PNG / JPEG / ``.npy``
files and folders, with one clear line per bad image."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from cli_main import run_main
from seqcls_adapter import save_with_moved_head

torch = pytest.importorskip("torch", reason="the export extra builds the ViT bundle")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image", reason="Pillow writes the test's PNG/JPEG files")

from solar_edge.errors import ImageError  # noqa: E402
from solar_edge.format import signing  # noqa: E402

SIZE, LABELS = 16, ["zero", "one", "two"]
MEAN, STD = 0.3, 0.2


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny ViT (16x16 gray, 2 layers), its bundle, a PEFT LoRA adapter with a classifier,
    its lossless packet, the merged torch model and 6 images (uint8)."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    from solar_edge.exporters.compress import prepare_adapter, sign_packet
    from solar_edge.exporters.compress_measure import lossless_records
    from solar_edge.exporters.pipeline import export_bundle
    from solar_edge.methods.peft_files import read_adapter

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vit")
    config = ViTConfig(image_size=SIZE, patch_size=4, num_channels=1, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       num_labels=3, id2label=dict(enumerate(LABELS)),
                       label2id={name: i for i, name in enumerate(LABELS)})
    ViTForImageClassification(config).save_pretrained(root / "base")
    (root / "base" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [MEAN], "image_std": [STD], "rescale_factor": 1 / 255}))
    bundle = export_bundle(str(root / "base"), "x86-64", root / "bundle").bundle
    model = get_peft_model(ViTForImageClassification.from_pretrained(root / "base"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      modules_to_save=["classifier"], init_lora_weights=False))
    save_with_moved_head(model, root / "adapter")
    key = signing.generate_private_key()
    signing.save_private_key(key, root / "key")
    signing.save_public_key(key.public_key(), root / "key.pub")
    prep = prepare_adapter(read_adapter(root / "adapter"), bundle)
    packet, _ = sign_packet(prep, lossless_records(prep), key, "digits")
    (root / "lossless.slr").write_bytes(packet)
    merged = model.merge_and_unload().eval()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for _ in range(6)]
    return {"root": root, "bundle": bundle, "key": key, "packet": packet, "merged": merged,
            "images": images}


def _torch_logits(merged, images) -> np.ndarray:
    """Preprocessing written out here as ViTImageProcessor defines it (rescale, normalise)."""
    x = np.stack([(im.astype(np.float32) / 255 - MEAN) / STD for im in images])[:, None]
    with torch.no_grad():
        return merged(pixel_values=torch.from_numpy(x)).logits.numpy()


def test_manifest_records_the_models_preprocessing(vit):
    model = vit["bundle"].manifest["model"]
    assert model["family"] == "vit"
    image = model["image"]
    assert (image["height"], image["width"], image["channels"]) == (SIZE, SIZE, 1)
    assert image["mean"] == [MEAN] and image["std"] == [STD]
    assert image["resize"] is False and image["layout"] == "NCHW"
    assert len(vit["bundle"].manifest["canary"]["inputs"]) == 3


def test_vit_bundles_carry_the_plain_slot_graph_and_serve_it_by_default(vit):
    from solar_edge.runtime.engine import EdgeRuntime

    manifest = json.loads((vit["root"] / "bundle" / "manifest.json").read_text())
    assert set(manifest["onnx"]["variants"]) >= {"lora", "lora-plain"}
    rt = EdgeRuntime(str(vit["root"] / "bundle"), [vit["key"].public_key()])
    assert rt.mechanism == "lora-native"


@pytest.mark.parametrize("mechanism", ["lora-native", "lora", "initializer"])
def test_lossless_packet_serves_what_peft_merge_and_unload_computes(vit, mechanism):
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(str(vit["root"] / "bundle"), [vit["key"].public_key()], mechanism=mechanism)
    assert rt.mechanism == mechanism
    base = rt.infer(vit["images"])   # no adapter: the unit embedding of the base model
    rt.apply(vit["packet"])
    got = rt.infer(vit["images"])
    want = _torch_logits(vit["merged"], vit["images"])
    assert got.shape == want.shape == (6, 3)
    assert np.abs(got - want).max() < 1e-4
    assert base.shape == (6, 32)
    assert rt.classify(vit["images"]) == [LABELS[i] for i in want.argmax(1)]


def test_run_image_files_and_folder_print_the_adapters_labels(vit, tmp_path, monkeypatch,
                                                              capsys):
    images = vit["images"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.png")
    np.save(folder / "b.npy", images[1])
    Image.fromarray(images[2]).save(folder / "c.jpg", quality=100, subsampling=0)
    (folder / "notes.txt").write_text("not picked up: not an image suffix")
    root = vit["root"]
    (root / "p.slr").write_bytes(vit["packet"])
    code, out, err = run_main(monkeypatch, capsys, "run", "--bundle", str(root / "bundle"),
                          "--packet", str(root / "p.slr"), "--trusted-key",
                          str(root / "key.pub"), "--image", str(folder), "--json")
    assert code == 0, err
    answers = json.loads(out)["answers"]
    assert [a["image"] for a in answers] == [str(folder / n) for n in ("a.png", "b.npy",
                                                                       "c.jpg")]
    decoded_jpeg = np.asarray(Image.open(folder / "c.jpg"))
    want = _torch_logits(vit["merged"], [images[0], images[1], decoded_jpeg])
    assert [a["label"] for a in answers] == [LABELS[i] for i in want.argmax(1)]
    assert np.abs(np.array([a["logits"] for a in answers]) - want).max() < 1e-3
    code, out, err = run_main(monkeypatch, capsys, "run", "--bundle", str(root / "bundle"),
                          "--packet", str(root / "p.slr"), "--trusted-key",
                          str(root / "key.pub"), "--image", str(folder / "a.png"))
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"{LABELS[int(want[0].argmax())]}\t(p=" \
        f"{float(np.exp(want[0]).max() / np.exp(want[0]).sum()):.3f})\t{folder / 'a.png'}"


def _bad_images(tmp_path) -> dict[str, tuple[str, str]]:
    good = np.zeros((SIZE, SIZE), np.uint8)
    Image.fromarray(good).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) - 30])
    Image.fromarray(np.zeros((SIZE, 20), np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "text.png").write_text("hello, I am a text file\n")
    np.save(tmp_path / "rgba.npy", np.zeros((SIZE, SIZE, 4)))
    return {"truncated.png": "truncated PNG",
            "wide.png": "20x16 pixels; this model takes 16x16",
            "rgb.png": "3 channels \\(RGB\\); this model takes 1 \\(grayscale\\)",
            "text.png": "not a PNG, JPEG or .npy image \\(starts with b'hello, I'\\)",
            "rgba.npy": "4 channels \\(RGBA\\)"}


def test_bad_images_give_one_clear_line_each(vit, tmp_path, monkeypatch, capsys):
    import re

    root = vit["root"]
    for name, message in _bad_images(tmp_path).items():
        code, out, err = run_main(monkeypatch, capsys, "run", "--bundle", str(root / "bundle"),
                              "--image", str(tmp_path / name))
        assert code != 0 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert re.fullmatch(f"error: ImageError: {re.escape(str(tmp_path / name))}: .*"
                            f"{message}.*", lines[0]), lines[0]


def test_texts_for_an_image_model_and_images_for_a_text_model_are_usage_errors(
        vit, minilm_bundle, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "run", "--bundle",
                              str(vit["root"] / "bundle"), "--text", "hello")
    assert code == 2 and out == "" and "takes images: give --image" in err
    image = tmp_path / "x.npy"
    np.save(image, vit["images"][0])
    code, out, err = run_main(monkeypatch, capsys, "run", "--bundle", str(minilm_bundle),
                              "--image", str(image))
    assert code == 2 and out == "" and "takes texts, not images" in err


def test_image_inputs_refused_in_the_runtime_api_too(vit):
    from solar_edge.runtime.engine import EdgeRuntime

    rt = EdgeRuntime(str(vit["root"] / "bundle"), [vit["key"].public_key()])
    with pytest.raises(ImageError, match="image 1: 8x8 pixels"):
        rt.infer([vit["images"][0], np.zeros((8, 8))])
    with pytest.raises(ImageError, match="expected a \\(height, width\\[, channels\\]\\) array"):
        rt.infer([np.array(["a", "b"])])


@pytest.mark.parametrize("calibrated", [False, True])
def test_compress_data_free_and_calibrated_on_an_image_folder(vit, tmp_path, monkeypatch,
                                                              capsys, calibrated):
    from solar_edge.runtime.engine import EdgeRuntime

    root = vit["root"]
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(
            folder / f"{i:02d}.png")
    args = ["compress", str(root / "adapter"), "--bundle", str(root / "bundle"), "--budget",
            "2000", "--signing-key", str(root / "key"), "--out", str(tmp_path / "p.slr"),
            "--json"]
    if calibrated:
        args += ["--calib-data", str(folder), "--model", str(root / "base"), "--refit", "20"]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    report = json.loads(out)
    assert report["calibration"] == (f"{folder} (12 images)" if calibrated else None)
    data = (tmp_path / "p.slr").read_bytes()
    assert len(data) <= 2000
    rt = EdgeRuntime(str(root / "bundle"), [vit["key"].public_key()])
    rt.apply(data)  # canary digest checked against the served outputs
    got = rt.infer(vit["images"])
    want = _torch_logits(vit["merged"], vit["images"])
    assert np.abs(got - want).max() < 0.25 * np.abs(want).max()


def test_a_bad_image_in_the_calibration_folder_is_a_calibration_error(tmp_path):
    from solar_edge.errors import CalibrationError
    from solar_edge.exporters.calib_data import read_calibration_file

    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", np.ones((SIZE, SIZE)))
    calib = read_calibration_file(tmp_path)
    assert len(calib) == 2 and calib.labels is None
    assert calib.texts[1].name == str(tmp_path / "b.npy")
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    with pytest.raises(CalibrationError, match=f"calibration images: {tmp_path / 'c.png'}: "
                                               "truncated PNG"):
        read_calibration_file(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="no .png, .jpg, .jpeg, .npy files"):
        read_calibration_file(empty)


def test_label_folders_are_labelled_images_and_bad_layouts_are_calibration_errors(tmp_path):
    from solar_edge.errors import CalibrationError
    from solar_edge.exporters.calib_data import read_calibration_file

    root = tmp_path / "eval"
    for folder, count in ((LABELS[2], 2), ("0", 1)):  # a label name, and an index
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((SIZE, SIZE), 40 * i, np.uint8)).save(
                root / folder / f"{i}.png")
    got = read_calibration_file(root, LABELS)
    assert got.labels == [0, 2, 2] and len(got.texts) == 3
    assert got.source == f"{root} (3 images in 2 label folders)"
    (root / "no-such-label").mkdir()
    with pytest.raises(CalibrationError, match="'no-such-label' is not one of the adapter's"):
        read_calibration_file(root, LABELS)
    (root / "no-such-label").rmdir()
    (root / "7").mkdir()
    with pytest.raises(CalibrationError, match="label index 7 is outside the adapter's 3"):
        read_calibration_file(root, LABELS)
    (root / "7").rmdir()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(root / "loose.png")
    with pytest.raises(CalibrationError, match="images and label folders side by side"):
        read_calibration_file(root, LABELS)


def test_max_drop_measured_on_labelled_image_folders(vit, tmp_path, monkeypatch, capsys):
    """``--eval-data`` a folder per label: the drop counts images the adapter gets right and
    the packet wrong, against the labels (the uncompressed adapter's accuracy is printed)."""
    root = vit["root"]
    preds = np.argmax(_torch_logits(vit["merged"], vit["images"]), axis=1)
    evald = tmp_path / "eval"
    for i, (image, pred) in enumerate(zip(vit["images"], preds, strict=True)):
        label = LABELS[int(pred) if i % 3 else (int(pred) + 1) % len(LABELS)]  # 2 of 6 wrong
        (evald / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(evald / label / f"{i}.png")
    code, out, err = run_main(monkeypatch, capsys, "compress", str(root / "adapter"),
                              "--bundle", str(root / "bundle"), "--max-drop", "100",
                              "--eval-data", str(evald), "--signing-key", str(root / "key"),
                              "--out", str(tmp_path / "p.slr"), "--json")
    assert code == 0, err
    search = json.loads(out)["search"]
    assert search["measured_on"] == f"{evald} (6 images in {len(set(os.listdir(evald)))} " \
                                    "label folders)"
    assert search["reference_accuracy"] == pytest.approx(100 * 4 / 6, abs=1e-6)


def test_an_unpacked_vit_packet_loads_into_peft_and_computes_the_same(vit, tmp_path):
    """An image classifier unpacks without a task_type (PEFT has none for images, and its
    SEQ_CLS model feeds input_ids), its head under modules_to_save."""
    from peft import PeftModel
    from transformers import ViTForImageClassification

    from solar_edge.exporters.unpack import unpack_packet

    result = unpack_packet(vit["packet"], vit["bundle"], tmp_path / "u",
                           [vit["key"].public_key()])
    assert result.task_type is None and result.head == ["classifier.bias", "classifier.weight"]
    config = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] == ["classifier"]
    model = PeftModel.from_pretrained(
        ViTForImageClassification.from_pretrained(vit["root"] / "base"), str(tmp_path / "u"))
    got = _torch_logits(model.eval(), vit["images"])
    np.testing.assert_allclose(got, _torch_logits(vit["merged"], vit["images"]), atol=1e-4)
