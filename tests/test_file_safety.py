"""Files: certbnn writes only what it owns, atomically, and never through a symbolic link.

Every kind of output (JSON, safetensors, PNG, Markdown, logs) is written with a link
already at its path; the link's target must keep its hash (or, dangling, stay absent).
``--out`` refuses what is not a certbnn run, reproduce refuses colliding cells, and a
write killed with SIGKILL leaves a temporary file that the next start removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tinydata import separable_images

from certbnn import data, fileio, training
from certbnn.cli import main
from certbnn.config import make_config
from certbnn.errors import CertbnnError, ConfigError
from certbnn.evaluation.runner import EvalOptions, evaluate_run
from certbnn.posterior import load_posterior
from certbnn.reproduce import load_preset

DATASET = "tiny-files"


@pytest.fixture(scope="module", autouse=True)
def tiny_dataset():
    images, labels = separable_images()
    data.register_arrays(DATASET, {"train": (images, labels), "test": (images[:40], labels[:40])}, num_classes=2)
    yield
    data.unregister(DATASET)


def _config(**overrides):
    base = dict(
        dataset=DATASET,
        model="mlp:8",
        method="sgd",
        likelihood="ibp",
        eps=0.05,
        epochs=2,
        batch_size=32,
        val_size=40,
        val_samples=2,
        seed=1,
        device="cpu",
    )
    return make_config({}, {**base, **overrides})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Victims:
    """Files outside the work area that links point at: existing ones keep their hash,
    dangling ones are never created."""

    def __init__(self, root: Path):
        self.root = root / "elsewhere"
        self.root.mkdir()
        self.hashes: dict[Path, str] = {}
        self.absent: list[Path] = []

    def link(self, at: Path, dangling: bool = False) -> None:
        target = self.root / f"{len(self.hashes) + len(self.absent)}-{at.name}"
        if dangling:
            self.absent.append(target)
        else:
            target.write_bytes(b"someone else's file " + at.name.encode())
            self.hashes[target] = _digest(target)
        at.parent.mkdir(parents=True, exist_ok=True)
        at.symlink_to(target)

    def check(self) -> None:
        assert {p: _digest(p) for p in self.hashes} == self.hashes
        assert [p for p in self.absent if os.path.lexists(p)] == []


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


# --- every output kind through a link ------------------------------------------------------------


@pytest.mark.parametrize("dangling", [False, True])
def test_train_and_evaluate_replace_links_and_leave_their_targets_alone(tmp_path, dangling):
    victims = Victims(tmp_path)
    run = fileio.claim_dir(tmp_path / "run", "run")
    for name in (training.CONFIG, training.METRICS):
        victims.link(run / name, dangling)
    for name in (training.CHECKPOINT, training.POSTERIOR):  # an existing one would mean "already a run"
        victims.link(run / name, dangling=True)
    training.train(_config(), run, progress=False, log=lambda line: None)

    out = fileio.claim_dir(tmp_path / "eval", "eval")
    for name in ("evaluation.json", "report.md", "reliability.png", "certified_vs_eps.png"):
        victims.link(out / name, dangling)
    options = EvalOptions(
        eps=[0.0, 0.05], limit=16, samples=2, certificates=["per-sample"], attacks=["fgsm"], device="cpu"
    )
    evaluate_run(run, options, out, progress=False)

    victims.check()
    written = [run / n for n in (training.CONFIG, training.METRICS, training.CHECKPOINT, training.POSTERIOR)]
    written += [out / n for n in ("evaluation.json", "report.md", "reliability.png", "certified_vs_eps.png")]
    assert [p for p in written if p.is_symlink() or not p.is_file()] == []
    assert (out / "reliability.png").read_bytes().startswith(b"\x89PNG")
    load_posterior(run / training.POSTERIOR)
    json.loads((run / training.METRICS).read_text())


def test_writer_refuses_a_directory_in_the_way_and_keeps_permissions(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(CertbnnError, match="a directory is in the way"):
        fileio.atomic_write_text(tmp_path / "dir", "x")
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    kept.chmod(0o600)
    fileio.atomic_write_text(kept, "[]")
    assert kept.read_text() == "[]" and kept.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "kept.json"]


def test_logs_are_never_appended_through_a_link_or_into_a_fifo(tmp_path):
    victims = Victims(tmp_path)
    victims.link(tmp_path / "log.txt")
    with pytest.raises(CertbnnError, match="cannot write log .*log.txt: a symbolic link is in the way"):
        fileio.open_append(tmp_path / "log.txt")
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(CertbnnError, match="fifo.txt"):
        fileio.open_append(tmp_path / "fifo.txt")  # returns at once (no reader): never hangs
    victims.check()
    with fileio.open_append(tmp_path / "new.txt") as log:
        log.write("one\n")
    with fileio.open_append(tmp_path / "new.txt") as log:
        log.write("two\n")
    assert (tmp_path / "new.txt").read_text() == "one\ntwo\n"


def test_data_writers_never_follow_links(tmp_path):
    import numpy as np

    from certbnn.data.cifar import write_binary_batch

    victims = Victims(tmp_path)
    for mode in ("ab", "wb", "a", "w"):
        victims.link(tmp_path / f"download-{mode}.part")
        with pytest.raises(OSError):
            fileio.open_no_follow(tmp_path / f"download-{mode}.part", mode)
    victims.link(tmp_path / "data_batch_1.bin")
    write_binary_batch(tmp_path / "data_batch_1.bin", np.zeros((2, 3, 32, 32), np.uint8), np.array([1, 2]))
    victims.check()
    assert (tmp_path / "data_batch_1.bin").stat().st_size == 2 * (1 + 3 * 32 * 32)
    assert not (tmp_path / "data_batch_1.bin").is_symlink()
    with fileio.open_no_follow(tmp_path / "new.part", "wb") as part:
        part.write(b"ab")
    with fileio.open_no_follow(tmp_path / "new.part", "ab") as part:
        part.write(b"cd")
    assert (tmp_path / "new.part").read_bytes() == b"abcd"


PRESET = """
[preset]
name = "{name}"
[train]
model = "mlp:8"
epochs = 1
batch_size = 32
val_size = 40
val_samples = 2
eps = 0.05
[evaluate]
eps = [0.0, 0.05]
limit = 16
samples = 2
certificates = ["per-sample"]
attacks = ["fgsm"]
[modes.ibp]
likelihood = "ibp"
{experiments}
"""


def _preset(tmp_path: Path, experiments: str, name: str = "files") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(PRESET.format(name=name, experiments=textwrap.dedent(experiments)))
    return path


def _reproduce(preset: Path, out: Path, *extra: str) -> list[str]:
    return ["reproduce", "--preset", str(preset), "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def test_reproduce_rewrites_results_report_and_plots_without_following_links(tmp_path, capsys):
    preset = _preset(tmp_path, f'[[experiment]]\nname = "e"\ndataset = "{DATASET}"\nmethods = ["sgd"]\n')
    out = tmp_path / "out"
    assert main(_reproduce(preset, out)) == 0
    victims = Victims(tmp_path)
    cell = out / "cells" / "e__sgd__ibp"
    links = [
        out / "results.json",
        out / "RESULTS.md",
        out / "certified_vs_eps_e.png",
        out / "reliability_e.png",
        cell / "eval" / "reliability.png",
        cell / "eval" / "evaluation.json",
    ]
    assert all(p.is_file() for p in links)
    for path in links:
        path.unlink()
        victims.link(path)
    (cell / "run" / training.POSTERIOR).unlink()  # re-evaluate the cell: its eval files are written again
    assert main(_reproduce(preset, out)) == 0
    victims.check()
    assert [p for p in links if p.is_symlink() or not p.is_file()] == []

    # the cell log: a link there is refused (one line, the cell fails), its target untouched
    (cell / "log.txt").unlink()
    victims.link(cell / "log.txt")
    (cell / "run" / training.POSTERIOR).unlink()
    err = _one_line_error(capsys, _reproduce(preset, out))
    assert "1 cell(s) failed (e/sgd/ibp)" in err
    results = json.loads((out / "results.json").read_text())
    assert "a symbolic link is in the way" in results["cells"]["e/sgd/ibp"]["error"]
    victims.check()


# --- train --out: only certbnn's own run folders -------------------------------------------------


TRAIN = [
    "train",
    "--dataset",
    DATASET,
    "--model",
    "mlp:8",
    "--method",
    "sgd",
    "--epochs",
    "1",
    "--val-size",
    "40",
    "--device",
    "cpu",
    "--no-progress",
    "--out",
]


def test_out_refuses_what_is_not_a_certbnn_run(tmp_path, capsys, monkeypatch):
    foreign = tmp_path / "someone"
    foreign.mkdir()
    for name in ("config.json", "metrics.json", "notes.txt"):
        (foreign / name).write_text(f"theirs: {name}")
    before = {p.name: _digest(p) for p in foreign.iterdir()}
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    grid = fileio.claim_dir(tmp_path / "grid", "grid")
    (grid / "results.json").write_text("{}")
    monkeypatch.chdir(foreign)  # "" must not mean the current directory
    cases = {
        str(foreign): "a non-empty directory that is not a certbnn run",
        "": "--out is empty",
        " ": "--out is empty",
        "/": "refusing to write into the filesystem root",
        str(a_file): "not a directory",
        str(a_file / "sub"): "is not a directory",
        str(grid): "not a certbnn run",
        str(foreign / ".." / ".." / ".." / ".." / ".." / ".." / ".." / ".." / ".."): "filesystem root",
    }
    for value, message in cases.items():
        assert message in _one_line_error(capsys, TRAIN + [value]), value
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert "dangling symbolic link" in _one_line_error(capsys, TRAIN + [str(dangling)])
    # resume: a run copied without its marker is not taken over either
    copied = tmp_path / "copied"
    training.train(_config(epochs=1), tmp_path / "run", progress=False, log=lambda line: None)
    shutil.copytree(tmp_path / "run", copied, ignore=shutil.ignore_patterns(fileio.RUN_MARKER))
    (copied / training.POSTERIOR).unlink()
    kept = {p.name: _digest(p) for p in copied.iterdir()}
    assert "not a certbnn run" in _one_line_error(capsys, ["train", "--out", str(copied), "--resume"])
    assert {p.name: _digest(p) for p in copied.iterdir()} == kept
    assert {p.name: _digest(p) for p in foreign.iterdir()} == before
    assert a_file.read_text() == "x" and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in grid.iterdir()) == [fileio.RUN_MARKER, "results.json"]


def test_evaluate_out_refuses_empty_root_and_file_paths(tmp_path, capsys):
    run = tmp_path / "run"
    training.train(_config(epochs=1), run, progress=False, log=lambda line: None)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    before = {p.name: _digest(p) for p in run.iterdir()}
    evaluate = ["evaluate", str(run), "--device", "cpu", "--limit", "8", "--samples", "2", "--no-progress", "--out"]
    for value, message in {
        "": "--out is empty",
        "/": "filesystem root",
        str(a_file): "not a directory",
        str(a_file / "sub"): "is not a directory",
    }.items():
        assert message in _one_line_error(capsys, evaluate + [value]), value
    foreign = tmp_path / "someone"
    foreign.mkdir()
    (foreign / "report.md").write_text("theirs")
    assert "not a certbnn eval or run" in _one_line_error(capsys, evaluate + [str(foreign)])
    assert a_file.read_text() == "x" and {p.name: _digest(p) for p in run.iterdir()} == before
    assert [p.name for p in foreign.iterdir()] == ["report.md"] and (foreign / "report.md").read_text() == "theirs"
    assert main(evaluate[:-1] + ["--out", str(tmp_path / "new")]) == 0  # a new folder: marked, then written
    assert fileio.is_claimed(tmp_path / "new", "eval") and (tmp_path / "new" / "evaluation.json").is_file()
    assert main(evaluate[:-1] + ["--out", str(tmp_path / "new")]) == 0  # and written again
    assert main(evaluate[:-1] + ["--out", str(run)]) == 0  # into the run itself (the default)
    with pytest.raises(CertbnnError, match="cannot create the directory"):
        fileio.make_dir(a_file / "sub")


def test_filesystem_type_takes_the_longest_mount_point_and_decodes_escapes(tmp_path):
    table = tmp_path / "mounts"
    table.write_text(
        "root / ext4 rw 0 0\n"
        "proc /proc proc rw 0 0\n"
        f"tmpfs {tmp_path}/with\\040space tmpfs rw 0 0\n"
        f"old {tmp_path}/stack ext4 rw 0 0\n"
        f"new {tmp_path}/stack sysfs rw 0 0\n"  # mounted later over the same point: it wins
    )
    kind = lambda path: fileio.filesystem_type(path, mounts=str(table))  # noqa: E731
    assert kind("/proc/x/y") == "proc" and kind("/proc") == "proc"
    assert kind("/procfs") == "ext4"  # a prefix of the name is not a parent
    assert kind(tmp_path / "with space" / "run") == "tmpfs"
    assert kind(tmp_path / "stack" / "run") == "sysfs"
    assert fileio.filesystem_type("/", mounts=str(tmp_path / "absent")) is None


def test_out_refuses_pseudo_and_read_only_file_systems_before_any_work(tmp_path, capsys, monkeypatch):
    """As root, os.access says yes to /proc: `reproduce --dry-run --out /proc/x` used to exit 0."""
    table = tmp_path / "mounts"
    table.write_text(f"root / ext4 rw 0 0\nproc {tmp_path}/fakeproc proc rw 0 0\n")
    (tmp_path / "fakeproc").mkdir()
    real = fileio.filesystem_type
    monkeypatch.setattr(fileio, "filesystem_type", lambda path: real(path, mounts=str(table)))
    with pytest.raises(CertbnnError, match="on the proc pseudo file system"):
        fileio.check_output_dir(tmp_path / "fakeproc" / "x", "grid")
    assert list((tmp_path / "fakeproc").iterdir()) == []

    class ReadOnly:
        f_flag = os.ST_RDONLY

    (tmp_path / "ro").mkdir()
    real_statvfs = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly() if Path(p) == tmp_path / "ro" else real_statvfs(p))
    with pytest.raises(CertbnnError, match="read-only file system"):
        fileio.check_output_dir(tmp_path / "ro" / "new" / "deeper", "run")
    assert fileio.check_output_dir(tmp_path / "fine" / "new", "run") == tmp_path / "fine" / "new"
    if Path("/proc/self/mounts").is_file():  # this machine's real /proc, through the CLI
        argv = ["reproduce", "--preset", "quick", "--out", "/proc/x", "--dry-run", "--no-progress"]
        monkeypatch.setattr(fileio, "filesystem_type", real)
        assert "pseudo file system" in _one_line_error(capsys, argv)


def test_out_accepts_new_and_empty_folders_and_marks_them_first(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    order = []
    real = fileio.atomic_write_bytes

    def recording(path, *args, **kwargs):
        order.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fileio, "atomic_write_bytes", recording)
    for name in ("empty", "new/nested"):
        order.clear()
        assert main(TRAIN + [str(tmp_path / name)]) == 0
        assert order[0] == fileio.RUN_MARKER and fileio.is_claimed(tmp_path / name, "run")
        assert json.loads((tmp_path / name / fileio.RUN_MARKER).read_text())["format_version"] == 1
    with pytest.raises(CertbnnError, match="already holds a run"):
        training.train(_config(epochs=1), tmp_path / "empty", progress=False, log=lambda line: None)


# --- reproduce: one folder per cell, nothing deleted that is not the cell's -----------------------


@pytest.mark.parametrize(
    "experiments, message",
    [
        (
            '[[experiment]]\nname = "a b"\ndataset = "{d}"\nmethods = ["sgd"]\n'
            '[[experiment]]\nname = "a_b"\ndataset = "{d}"\nmethods = ["sgd"]\n',
            "cells 'a b/sgd/ibp' and 'a_b/sgd/ibp' would share the folder cells/a_b__sgd__ibp",
        ),
        (
            '[[experiment]]\nname = "Run"\ndataset = "{d}"\nmethods = ["sgd"]\n'
            '[[experiment]]\nname = "run"\ndataset = "{d}"\nmethods = ["sgd"]\n',
            "cells 'Run/sgd/ibp' and 'run/sgd/ibp' would share the folder",
        ),
        (
            '[[experiment]]\nname = "a b"\ndataset = "{d}"\nmethods = ["sgd"]\n'
            '[[experiment]]\nname = "a/b"\ndataset = "{d}"\nmethods = ["bbb"]\n',
            "experiments 'a b' and 'a/b' would share the plot files *_a_b.png",
        ),
        (
            '[[experiment]]\nname = "e"\ndataset = "{d}"\nmethods = ["sgd"]\n[experiment.sweep]\nlam = [0.5, 0.5]\n',
            "two cells have the id 'e/sgd/ibp/lam=0.5'",
        ),
        (
            '[[experiment]]\nname = "e"\ndataset = "{d}"\nmethods = ["sgd"]\n[experiment.sweep]\nlam = [0.5, 1.0]\n'
            "seed = [1, 1]\n",
            "two cells have the id",
        ),
    ],
)
def test_colliding_cells_are_refused_when_the_preset_loads(tmp_path, capsys, experiments, message):
    preset = _preset(tmp_path, experiments.format(d=DATASET))
    with pytest.raises(ConfigError, match="two cells|would share"):
        load_preset(str(preset))
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        assert message in _one_line_error(capsys, _reproduce(preset, out, *extra))
    assert not out.exists()


def test_reproduce_removes_stale_temporary_files_of_its_own_names_only(tmp_path):
    preset = _preset(tmp_path, f'[[experiment]]\nname = "x y"\ndataset = "{DATASET}"\nmethods = ["sgd"]\n')
    out = tmp_path / "out"
    assert main(_reproduce(preset, out)) == 0
    assert (out / "certified_vs_eps_x_y.png").is_file()  # plot names are file-safe
    cell = out / "cells" / "x_y__sgd__ibp"
    killed = [
        out / "results.json",
        out / "RESULTS.md",
        out / "reliability_x_y.png",
        cell / "eval" / "report.md",
        cell / "eval" / "reliability.png",
        cell / "run" / training.METRICS,
    ]
    for path in killed:
        _kill_inside_writer(path)
    (out / ".someone.abcdefgh.tmp").write_text("theirs")
    assert len(list(out.rglob("*.tmp"))) == len(killed) + 1
    (cell / "run" / training.POSTERIOR).unlink()  # the cell resumes: its run and evaluation start again
    assert main(_reproduce(preset, out)) == 0
    assert [p.name for p in out.rglob("*.tmp")] == [".someone.abcdefgh.tmp"]


def test_reproduce_deletes_nothing_in_a_cell_folder_it_did_not_make(tmp_path, capsys):
    preset = _preset(tmp_path, f'[[experiment]]\nname = "e"\ndataset = "{DATASET}"\nmethods = ["sgd"]\n')
    out = fileio.claim_dir(tmp_path / "out", "grid")
    theirs = out / "cells" / "e__sgd__ibp" / "run" / "notes.txt"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("not certbnn's")
    err = _one_line_error(capsys, _reproduce(preset, out))
    assert "1 cell(s) failed" in err
    assert "not a certbnn run" in json.loads((out / "results.json").read_text())["cells"]["e/sgd/ibp"]["error"]
    assert sorted(p.name for p in theirs.parent.iterdir()) == ["notes.txt"] and theirs.read_text() == "not certbnn's"
    # nor through a cell folder that is a link to elsewhere
    shutil.rmtree(out / "cells" / "e__sgd__ibp")
    elsewhere = tmp_path / "elsewhere-cell"
    elsewhere.mkdir()
    (out / "cells" / "e__sgd__ibp").symlink_to(elsewhere)
    assert "1 cell(s) failed" in _one_line_error(capsys, _reproduce(preset, out))
    assert "is a symbolic link" in json.loads((out / "results.json").read_text())["cells"]["e/sgd/ibp"]["error"]
    assert list(elsewhere.iterdir()) == []
    # and a grid is never written into a foreign folder
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "RESULTS.md").write_text("theirs")
    assert "not a certbnn grid" in _one_line_error(capsys, _reproduce(preset, foreign))
    for value, message in {
        str(foreign): "not a certbnn grid",
        "/": "filesystem root",
        str(foreign / "RESULTS.md"): "not a directory",
    }.items():
        assert message in _one_line_error(capsys, _reproduce(preset, Path(value), "--dry-run")), value
    assert sorted(p.name for p in foreign.iterdir()) == ["RESULTS.md"]


# --- killed writes: temporary files removed on the next start ------------------------------------


KILLED_WRITER = """
import os, signal, sys
from certbnn import fileio
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die inside the writer, data half on disk
fileio.atomic_write_bytes(sys.argv[1], b"x" * (4 << 20))
"""


def _kill_inside_writer(path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()


def test_a_write_killed_with_sigkill_leaves_no_temporary_file_after_resume(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        training.train(
            _config(epochs=2), run, progress=False, log=lambda line: (_ for _ in ()).throw(KeyboardInterrupt)
        )  # killed after epoch 1
    checkpoint = _digest(run / training.CHECKPOINT)
    for name in (training.CHECKPOINT, training.POSTERIOR, training.METRICS):
        _kill_inside_writer(run / name)
    stale = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))
    assert len(stale) == 3 and stale[0].startswith(f".{training.CHECKPOINT}.")
    assert _digest(run / training.CHECKPOINT) == checkpoint  # the old checkpoint is intact
    (run / ".notes.abcdefgh.tmp").write_text("not ours")  # another program's name: kept
    training.train(_config(epochs=2), run, resume=True, progress=False, log=lambda line: None)
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == [".notes.abcdefgh.tmp"]
    load_posterior(run / training.POSTERIOR)


def test_a_fresh_start_in_a_marked_folder_also_removes_stale_temporary_files(tmp_path):
    run = fileio.claim_dir(tmp_path / "run", "run")
    _kill_inside_writer(run / training.CONFIG)
    assert len(list(run.glob(".config.json.*.tmp"))) == 1
    training.train(_config(epochs=1), run, progress=False, log=lambda line: None)
    assert list(run.glob("*.tmp")) + list(run.glob(".*.tmp")) == []
