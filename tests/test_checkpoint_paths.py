"""User-typed paths: safe_subfolder (dropdown folders inside a root) and numbered_run (a free
output name for a new training run)."""

import os

import pytest

from training.checkpoint import RunFiles, numbered_run, safe_subfolder


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "input"
    (r / "data" / "sub").mkdir(parents=True)
    (r / "notes.txt").write_text("x")
    (tmp_path / "outside").mkdir()
    return r


# --- safe_subfolder --------------------------------------------------------------------------

def test_subfolder_inside_root_is_returned_resolved(root):
    assert safe_subfolder(root, "data") == (root / "data").resolve()
    assert safe_subfolder(str(root), "data/sub/") == (root / "data" / "sub").resolve()
    assert safe_subfolder(root, "./data") == (root / "data").resolve()


@pytest.mark.parametrize("rel", ["", "  ", ".", "./"])
def test_empty_or_root_itself_is_refused(root, rel):
    with pytest.raises(ValueError, match="no folder chosen|itself"):
        safe_subfolder(root, rel)


@pytest.mark.parametrize("rel", ["..", "../outside", "data/../../outside", "data/..", "data\\..\\..\\outside"])
def test_traversal_is_refused(root, rel):
    with pytest.raises(ValueError, match=r"must not contain '\.\.'"):
        safe_subfolder(root, rel)


def test_absolute_paths_are_refused(root, tmp_path):
    for rel in (str(tmp_path / "outside"), str(root / "data"), "/etc", "\\\\server\\share"):
        with pytest.raises(ValueError, match="absolute"):
            safe_subfolder(root, rel)


def test_symlink_escaping_root_is_refused(root, tmp_path):
    os.symlink(tmp_path / "outside", root / "escape")
    os.symlink(tmp_path / "outside", root / "data" / "deep_escape")
    for rel in ("escape", "data/deep_escape"):
        with pytest.raises(ValueError, match="outside"):
            safe_subfolder(root, rel)


def test_symlink_inside_root_is_allowed(root):
    os.symlink(root / "data" / "sub", root / "shortcut")
    assert safe_subfolder(root, "shortcut") == (root / "data" / "sub").resolve()


def test_root_reached_through_a_symlink(root, tmp_path):
    link = tmp_path / "link_to_input"
    os.symlink(root, link)
    assert safe_subfolder(link, "data") == (root / "data").resolve()


def test_missing_folder_and_file_are_refused(root):
    with pytest.raises(ValueError, match="does not exist"):
        safe_subfolder(root, "nope")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        safe_subfolder(root, "notes.txt")


# --- numbered_run ----------------------------------------------------------------------------

def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_free_name_is_used_as_is(tmp_path):
    assert numbered_run(tmp_path, "run") == (tmp_path / "run.safetensors").resolve()
    assert numbered_run(tmp_path, "run.safetensors") == (tmp_path / "run.safetensors").resolve()


def test_existing_out_file_gets_a_number(tmp_path):
    touch(tmp_path / "run.safetensors")
    assert numbered_run(tmp_path, "run") == (tmp_path / "run_001.safetensors").resolve()
    touch(tmp_path / "run_001.safetensors")
    assert numbered_run(tmp_path, "run").name == "run_002.safetensors"


@pytest.mark.parametrize("taken", ["run.ckpt.pt", "run.best.safetensors", "run.history.json"])
def test_any_run_file_counts(tmp_path, taken):
    touch(tmp_path / taken)
    assert numbered_run(tmp_path, "run").name == "run_001.safetensors"


def test_numbered_candidates_need_all_four_files_free(tmp_path):
    touch(tmp_path / "run.safetensors")
    touch(tmp_path / "run_001.history.json")
    touch(tmp_path / "run_002.ckpt.pt")
    path = numbered_run(tmp_path, "run")
    assert path.name == "run_003.safetensors"
    assert not any(p.exists() for p in RunFiles.of(path).all())


def test_names_with_subfolders(tmp_path):
    assert numbered_run(tmp_path, "runs/a") == (tmp_path / "runs" / "a.safetensors").resolve()
    touch(tmp_path / "runs" / "a.ckpt.pt")
    assert numbered_run(tmp_path, "runs/a") == (tmp_path / "runs" / "a_001.safetensors").resolve()


@pytest.mark.parametrize("name", ["../a", "runs/../../a", "/tmp/a", "", " "])
def test_names_that_escape_are_refused(tmp_path, name):
    with pytest.raises(ValueError):
        numbered_run(tmp_path / "out", name)
