"""`flowtok generate --prompts-file` and `flowtok caption FOLDER`: streamed batches, JSONL results."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowtok.bulk import caption_folder, generate_from_file
from flowtok.cli import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_load.py"
    spec = importlib.util.spec_from_file_location("demo_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_untrained_pipeline(tmp_path_factory.mktemp("bulk"), "tiny")


def test_generate_from_prompts_file(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue star\n" + "x" * 5000 + "\na green square\n", encoding="utf-8")
    out = tmp_path / "images"
    code = main(["generate", "--prompts-file", str(prompts), "--out-dir", str(out), "--batch-size", "2",
                 "--model", str(tiny_model), "--device", "cpu", "--steps", "2"])
    assert code == 2  # one prompt was refused; the others were made
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in lines] == [1, 3, 4, 5]
    assert [("file" in r, "error" in r) for r in lines] == [(True, False), (True, False), (False, True), (True, False)]
    assert "5000 characters" in lines[2]["error"]
    for r in lines:
        if "file" in r:
            assert Image.open(out / r["file"]).size == (32, 32)
    assert "3 images" in capsys.readouterr().out
    assert not list(out.glob(".*tmp*"))


def test_generate_needs_one_source(tmp_path, capsys):
    assert main(["generate"]) == 2
    assert "either a prompt or --prompts-file" in capsys.readouterr().err
    assert main(["generate", "--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert "prompts file not found" in capsys.readouterr().err


def test_caption_folder(tiny_model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    jsonl = tmp_path / "caps.jsonl"
    code = main(["caption", str(folder), "--jsonl", str(jsonl), "--batch-size", "2", "--model", str(tiny_model),
                 "--device", "cpu", "--steps", "2"])
    assert code == 2
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [r["file"] for r in lines] == ["a.jpg", "b.png", "broken.png", "sub/c.png"]
    assert "not a readable image" in lines[2]["error"]
    assert all(isinstance(r.get("caption"), str) for i, r in enumerate(lines) if i != 2)
    assert main(["caption", str(folder), str(folder / "a.jpg")]) == 2
    assert "one folder" in capsys.readouterr().err


class _CountingPipe:
    """Records the largest batch it was handed: the streaming bound, whatever the input count."""

    device = None

    def __init__(self) -> None:
        self.largest = 0
        self.calls = 0

    def text_to_image(self, prompts, generator=None, **_):
        self.largest = max(self.largest, len(prompts))
        self.calls += 1
        return [Image.new("RGB", (4, 4))] * len(prompts)

    def image_to_text(self, paths, **_):
        self.largest = max(self.largest, len(paths))
        self.calls += 1
        return ["x"] * len(paths)


def test_batches_stay_bounded(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(1000)))
    pipe = _CountingPipe()
    done, failed = generate_from_file(pipe, prompts, tmp_path / "o", lambda img, path: None, batch_size=7,
                                      progress=False)
    assert (done, failed, pipe.largest, pipe.calls) == (1000, 0, 7, 143)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(50):
        (folder / f"{i:03d}.png").write_bytes(b"")
    pipe = _CountingPipe()
    assert caption_folder(pipe, folder, tmp_path / "c.jsonl", batch_size=8, progress=False) == (50, 0)
    assert (pipe.largest, pipe.calls) == (8, 7)
