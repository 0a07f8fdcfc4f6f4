"""The ``heatmap`` command line (client.commands, python -m client): a real subprocess run on a user model, exit
codes and ``error: <code>`` messages, and no progress bar when stderr is not a terminal.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from conftest import read_terminal
from PIL import Image

keras = pytest.importorskip("keras")
layers = keras.layers

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["sky", "sea", "sand"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(31)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(6, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(6, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(len(CLASSES), activation="softmax"),
        ]
    )
    model.save(folder / "beach.keras")
    (folder / "beach.json").write_text(json.dumps({"classes": CLASSES, "preprocess": "tf"}))
    image = folder / "photo.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (60, 75, 3), dtype=np.uint8)).save(image)
    return folder


def cli_env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MODELS_DIR", "VGG16_WEIGHTS", "DEFAULT_MODEL")}
    env["DATA_DIR"] = str(data_dir)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def cli(args, data_dir, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=ROOT,
        env=cli_env(data_dir),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_infer_tiled_subprocess(files, tmp_path):
    out = tmp_path / "out"
    result = cli(
        [
            "infer",
            str(files / "photo.png"),
            "--model",
            str(files / "beach.keras"),
            "--mode",
            "tiled",
            "--stride",
            "8",
            "--top-k",
            "2",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["out"] == str(out)
    assert len(printed["classes"]) == 2
    names = sorted(p.name for p in out.iterdir())
    overlays = sorted(f"overlay_{c['index']}.png" for c in printed["classes"])
    assert names == sorted(["heatmap.npz", "summary.json", "heatmap.tif", "regions.geojson", *overlays])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "tiled"
    assert summary["grid"]["stride"] == {"y": 8, "x": 8}
    assert summary["image"] == {"width": 75, "height": 60}
    with np.load(out / "heatmap.npz") as data:
        assert data["scores"].shape == (len(range(0, 29, 8)) + 1, len(range(0, 44, 8)) + 1, 2)
        assert set(data["classes"]) <= set(CLASSES)
    # Not a terminal: no progress bar (tqdm draws with '\r' and 'NN%|').
    assert "\r" not in result.stderr
    assert "%|" not in result.stderr
    assert "error:" not in result.stderr


def test_progress_bar_drawn_on_a_terminal(files, tmp_path):
    """Counter-check for the test above: with stderr on a pseudo-terminal the bar appears."""
    master, slave = pty.openpty()
    # A fresh pty is 0 columns wide, which makes tqdm draw an empty bar: give it 80 columns.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "client",
                "infer",
                str(files / "photo.png"),
                "--model",
                str(files / "beach.keras"),
                "--mode",
                "tiled",
                "--stride",
                "4",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "out"),
            ],
            cwd=ROOT,
            env=cli_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        output = read_terminal(master)
        proc.stdout.read()
        assert proc.wait(timeout=300) == 0
    finally:
        os.close(master)
    terminal = output.decode(errors="replace")
    assert "%|" in terminal and "batch" in terminal


@pytest.mark.parametrize(
    "extra,code",
    [
        (["--mode", "tiled", "--stride", "0"], "invalid_parameter"),
    ],
)
def test_bad_parameters_exit_2_subprocess(files, tmp_path, extra, code):
    out = tmp_path / "out"
    result = cli(
        ["infer", str(files / "photo.png"), "--model", str(files / "beach.keras"), *extra, "--out", str(out)], tmp_path
    )
    assert result.returncode == 2
    assert f"error: {code}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or list(out.iterdir()) == []


# In-process runs of main() for the remaining error paths (no interpreter start-up per case).


@pytest.fixture
def main(monkeypatch, tmp_path):
    from client import commands as cli_module
    from shared.settings import get_settings

    for name in ("MODELS_DIR", "VGG16_WEIGHTS", "DEFAULT_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no stray .env
    get_settings.cache_clear()
    yield cli_module.main
    get_settings.cache_clear()


@pytest.mark.parametrize(
    "extra,code",
    [
        (["--mode", "tiled", "--stride", "-8"], "invalid_parameter"),
        (["--mode", "tiled", "--stride", "33"], "invalid_parameter"),
        (["--mode", "tiled", "--batch-size", "0"], "invalid_parameter"),
        (["--top-k", "0"], "invalid_parameter"),
        (["--memory-budget-mb", "1"], "invalid_parameter"),
        (["--mode", "direct", "--stride", "8"], "invalid_parameter"),
        (["--classes", "7"], "unknown_class"),
        (["--classes", "sky,kiwi"], "unknown_class"),
    ],
)
def test_bad_parameters_exit_2(files, tmp_path, main, capsys, extra, code):
    rc = main(
        [
            "infer",
            str(files / "photo.png"),
            "--model",
            str(files / "beach.keras"),
            *extra,
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    assert f"error: {code}:" in capsys.readouterr().err


def test_unknown_model_exit_2(files, tmp_path, main, capsys):
    rc = main(["infer", str(files / "photo.png"), "--model", "no-such-model", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "error: unknown_model:" in capsys.readouterr().err


def test_image_errors_exit_2(files, tmp_path, main, capsys):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(small)
    rc = main(["infer", str(small), "--model", str(files / "beach.keras"), "--out", str(tmp_path / "o1")])
    assert rc == 2
    assert "error: image_too_small:" in capsys.readouterr().err
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    rc = main(["infer", str(garbage), "--model", str(files / "beach.keras"), "--out", str(tmp_path / "o2")])
    assert rc == 2
    assert "error: " in capsys.readouterr().err


def test_missing_image_exit_2(files, tmp_path, main, capsys):
    rc = main(
        ["infer", str(tmp_path / "nope.png"), "--model", str(files / "beach.keras"), "--out", str(tmp_path / "out")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "nope.png" in err


def test_argparse_rejects_non_numeric(files, tmp_path, main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "infer",
                str(files / "photo.png"),
                "--model",
                str(files / "beach.keras"),
                "--stride",
                "eight",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_models_command_lists_vgg16(main, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HEATMAP_SERVER", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    vgg = next(m for m in listed if m["name"] == "vgg16")
    assert vgg["num_classes"] == 1000 and vgg["preprocess"] == "caffe"
    assert vgg["available"] is False and "VGG16_WEIGHTS" in vgg["reason"]
    assert next(m for m in listed if m["name"] == "shapes")["available"] is True


def test_infer_direct_at_a_finer_stride(files, tmp_path, main):
    """`--mode direct --stride 1`: the beach model's output stride (2) halved, one flag away."""
    out = tmp_path / "out"
    args = ["infer", str(files / "photo.png"), "--model", str(files / "beach.keras"), "--out", str(out)]
    assert main([*args, "--mode", "direct", "--stride", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "direct" and summary["grid"]["stride"] == {"y": 1, "x": 1}
    assert summary["grid"]["rows"] == 60 - 32 + 1 and summary["grid"]["cols"] == 75 - 32 + 1


def test_models_command_names_each_problem_file_once(main, capsys, monkeypatch, tmp_path):
    """A model file without its sidecar is listed once under its name, with the reason."""
    monkeypatch.delenv("HEATMAP_SERVER", raising=False)
    folder = tmp_path / "user_models"
    folder.mkdir()
    (folder / "orphan.keras").write_bytes(b"not a model")
    monkeypatch.setenv("MODELS_DIR", str(folder))
    assert main(["models"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ignored"))
    assert line.count("orphan.keras") == 1 and "sidecar" in line


@pytest.mark.parametrize("mode", ["direct", "tiled"])
def test_infer_in_shards_gives_the_same_grid(files, tmp_path, mode):
    """`heatmap infer --shards 3` computes three bands one after the other and assembles
    them (what the service's workers do in parallel): the same scores as one pass."""
    outs = {}
    for shards in ("1", "3"):
        out = tmp_path / f"out{shards}"
        args = ["infer", str(files / "photo.png"), "--model", str(files / "beach.keras"), "--mode", mode]
        args += (["--stride", "4"] if mode == "tiled" else []) + ["--classes", "sky,sea", "--shards", shards]
        result = cli([*args, "--out", str(out)], tmp_path)
        assert result.returncode == 0, result.stderr
        outs[shards] = out
    summary = json.loads((outs["3"] / "summary.json").read_text())
    assert summary["shards"]["count"] == 3 and "shards" not in json.loads((outs["1"] / "summary.json").read_text())
    with np.load(outs["1"] / "heatmap.npz") as one, np.load(outs["3"] / "heatmap.npz") as three:
        np.testing.assert_allclose(three["scores"], one["scores"], rtol=1e-5, atol=1e-6)
        assert np.ptp(one["scores"]) > 0
