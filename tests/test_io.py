import pytest
import torch

from dfq.io import atomic_dir, atomic_path, load_torch, save_json


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_old_output_on_failure(tmp_path):
    out = tmp_path / "calib"
    with atomic_dir(out) as tmp:
        save_json({"a": 1}, tmp / "meta.json")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "batch_00000.pt").write_text("partial")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib"]
    assert [p.name for p in out.iterdir()] == ["meta.json"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="evil.pt: refused to load"):
        load_torch(path)


def test_truncated_file_gets_clear_error(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="w.pt: cannot read"):
        load_torch(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_torch(tmp_path / "nope.pt")


def test_save_torch_is_byte_reproducible(tmp_path):
    from dfq.io import save_torch

    x = {"images": torch.arange(1000, dtype=torch.uint8)}
    save_torch(x, tmp_path / "a.pt")
    save_torch(x, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(load_torch(tmp_path / "a.pt")["images"], x["images"])
